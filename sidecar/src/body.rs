//! Bodies: bounded reading of request bodies, and the streamed response body that enforces the
//! upstream idle/total timeouts and reports completion (audit row, settlement) when it ends.
use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited, combinators::UnsyncBoxBody};
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("request body not received in time")]
    Timeout,
    #[error("request body could not be read")]
    Broken,
}

/// Reads a whole request body, refusing more than `max` bytes or taking longer than `timeout`.
pub async fn read_bounded<B>(body: B, max: usize, timeout: Duration) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > max as u64 {
        return Err(BodyError::TooLarge(max));
    }
    let collected = tokio::time::timeout(timeout, Limited::new(body, max).collect())
        .await
        .map_err(|_| BodyError::Timeout)?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(max)),
        Err(_) => Err(BodyError::Broken),
    }
}

/// How a streamed response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    Complete,
    UpstreamError,
    IdleTimeout,
    TotalTimeout,
    /// The agent went away before the end.
    Dropped,
}

/// Told about every response chunk and, once, about the end. The proxy's implementation writes
/// the audit row and settles the spend reservation; response cost parsing hooks in here.
pub trait StreamObserver: Send {
    fn on_chunk(&mut self, _chunk: &Bytes) {}
    fn finish(self: Box<Self>, end: StreamEnd, bytes: u64);
}

#[derive(Debug, thiserror::Error)]
#[error("upstream response {0}")]
pub struct StreamTimeout(&'static str);

/// The upstream's body, passed through frame by frame (never buffered).
pub struct ObservedBody<B> {
    inner: B,
    idle: Pin<Box<Sleep>>,
    idle_for: Duration,
    total: Pin<Box<Sleep>>,
    observer: Option<Box<dyn StreamObserver>>,
    bytes: u64,
}

impl<B> ObservedBody<B> {
    pub fn new(
        inner: B,
        idle_for: Duration,
        total_deadline: Instant,
        observer: Box<dyn StreamObserver>,
    ) -> Self {
        ObservedBody {
            inner,
            idle: Box::pin(tokio::time::sleep(idle_for)),
            idle_for,
            total: Box::pin(tokio::time::sleep_until(total_deadline)),
            observer: Some(observer),
            bytes: 0,
        }
    }

    fn end(&mut self, how: StreamEnd) {
        if let Some(observer) = self.observer.take() {
            observer.finish(how, self.bytes);
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.observer.is_none() {
            return Poll::Ready(None);
        }
        if this.total.as_mut().poll(cx).is_ready() {
            this.end(StreamEnd::TotalTimeout);
            return Poll::Ready(Some(Err(Box::new(StreamTimeout(
                "exceeded the total timeout",
            )))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                    if let Some(observer) = this.observer.as_mut() {
                        observer.on_chunk(data);
                    }
                }
                let deadline = Instant::now() + this.idle_for;
                this.idle.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.end(StreamEnd::UpstreamError);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.end(StreamEnd::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.idle.as_mut().poll(cx).is_ready() {
                    this.end(StreamEnd::IdleTimeout);
                    return Poll::Ready(Some(Err(Box::new(StreamTimeout("went idle too long")))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.observer.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        // An empty body may never be polled: if the inner body had already ended, it is complete.
        self.end(StreamEnd::Dropped);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::StreamBody;

    use super::*;

    struct Record(Arc<Mutex<Option<(StreamEnd, u64)>>>);
    impl StreamObserver for Record {
        fn finish(self: Box<Self>, end: StreamEnd, bytes: u64) {
            *self.0.lock().unwrap() = Some((end, bytes));
        }
    }

    #[tokio::test]
    async fn bounded_read_refuses_oversized_bodies() {
        let ok = read_bounded(
            Full::new(Bytes::from_static(b"abc")),
            3,
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(ok.unwrap(), Bytes::from_static(b"abc"));
        let big = read_bounded(
            Full::new(Bytes::from_static(b"abcd")),
            3,
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(big.unwrap_err(), BodyError::TooLarge(3));
        // A body whose size is not known up front is cut at the limit too.
        let chunks = futures_stream(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]);
        let streamed = read_bounded(StreamBody::new(chunks), 3, Duration::from_secs(1)).await;
        assert_eq!(streamed.unwrap_err(), BodyError::TooLarge(3));
    }

    fn futures_stream(
        chunks: Vec<Bytes>,
    ) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>> {
        futures::stream::iter(chunks.into_iter().map(|c| Ok(Frame::data(c))))
    }

    #[tokio::test]
    async fn observed_body_reports_completion() {
        let seen = Arc::new(Mutex::new(None));
        let body = ObservedBody::new(
            Full::new(Bytes::from_static(b"hello")),
            Duration::from_secs(5),
            Instant::now() + Duration::from_secs(5),
            Box::new(Record(seen.clone())),
        );
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(out, Bytes::from_static(b"hello"));
        assert_eq!(*seen.lock().unwrap(), Some((StreamEnd::Complete, 5)));
    }
}
