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

use crate::vendors::Capture;

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
    if body.is_end_stream() {
        // GETs and other bodiless requests: no timer, no collection.
        return Ok(Bytes::new());
    }
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
    /// Sees one chunk from the upstream and returns what goes on to the agent: the same bytes
    /// unless the observer filters (see [`ObservedBody::set_rewriting`]).
    fn on_chunk(&mut self, chunk: Bytes) -> Bytes {
        chunk
    }
    /// Bytes a filtering observer still holds when the upstream body ends.
    fn flush(&mut self) -> Bytes {
        Bytes::new()
    }
    /// Called once, when the body ends (or is dropped); the observer is dropped right after.
    fn finish(&mut self, end: StreamEnd, bytes: u64);
}

/// Largest single server-sent event kept while looking for usage; a longer one ends the
/// scanning (and filtering) for that response.
const MAX_SSE_EVENT_BYTES: usize = 1 << 20;

/// A bounded look at a response on its way to the agent (never a second copy of the whole
/// body): the first `limit` bytes of a JSON body, or the last SSE event carrying `usage`.
#[derive(Debug)]
pub enum ResponseCapture {
    None,
    Json {
        buf: Vec<u8>,
        limit: usize,
        overflowed: bool,
    },
    Sse(SseUsage),
}

impl ResponseCapture {
    pub fn new(capture: Capture) -> Self {
        match capture {
            Capture::None => ResponseCapture::None,
            Capture::Json { limit } => ResponseCapture::Json {
                buf: Vec::new(),
                limit,
                overflowed: false,
            },
            Capture::SseUsage { strip_usage_chunk } => ResponseCapture::Sse(SseUsage {
                strip: strip_usage_chunk,
                ..SseUsage::default()
            }),
        }
    }

    /// Whether the bytes to the agent may differ from the upstream's.
    pub fn rewrites(&self) -> bool {
        matches!(self, ResponseCapture::Sse(s) if s.strip)
    }

    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        match self {
            ResponseCapture::None => chunk,
            ResponseCapture::Json {
                buf,
                limit,
                overflowed,
            } => {
                if !*overflowed {
                    if buf.len() + chunk.len() > *limit {
                        *overflowed = true;
                        *buf = Vec::new();
                    } else {
                        buf.extend_from_slice(&chunk);
                    }
                }
                chunk
            }
            ResponseCapture::Sse(sse) => sse.push(chunk),
        }
    }

    pub fn flush(&mut self) -> Bytes {
        match self {
            // Only a filtering capture holds bytes back; otherwise `pending` is a copy of bytes
            // already passed on.
            ResponseCapture::Sse(sse) if sse.strip => Bytes::from(std::mem::take(&mut sse.pending)),
            _ => Bytes::new(),
        }
    }

    /// The captured JSON (body or usage event), if any.
    pub fn into_json(self) -> Option<serde_json::Value> {
        match self {
            ResponseCapture::None => None,
            ResponseCapture::Json {
                buf, overflowed, ..
            } => (!overflowed)
                .then(|| serde_json::from_slice(&buf).ok())
                .flatten(),
            ResponseCapture::Sse(sse) => sse.last_usage,
        }
    }
}

/// Scans server-sent events for the one carrying `usage` (OpenAI's final chunk with
/// `stream_options.include_usage`, or the Responses API's `response.completed`). With `strip`,
/// that usage-only chunk (empty `choices`) is not passed on: the agent did not ask for it.
#[derive(Debug, Default)]
pub struct SseUsage {
    strip: bool,
    pending: Vec<u8>,
    last_usage: Option<serde_json::Value>,
    given_up: bool,
}

impl SseUsage {
    fn push(&mut self, chunk: Bytes) -> Bytes {
        if self.given_up {
            return chunk;
        }
        self.pending.extend_from_slice(&chunk);
        let mut out = self.strip.then(|| Vec::with_capacity(self.pending.len()));
        let mut start = 0;
        while let Some((end, sep)) = event_end(&self.pending[start..]) {
            let event = &self.pending[start..start + end];
            let (usage, usage_only) = inspect_event(event);
            if usage.is_some() {
                self.last_usage = usage;
            }
            if let Some(out) = out.as_mut()
                && !usage_only
            {
                out.extend_from_slice(&self.pending[start..start + end + sep]);
            }
            start += end + sep;
        }
        self.pending.drain(..start);
        if self.pending.len() > MAX_SSE_EVENT_BYTES {
            self.given_up = true;
            let rest = std::mem::take(&mut self.pending);
            if let Some(out) = out.as_mut() {
                out.extend_from_slice(&rest);
            }
        }
        match out {
            Some(out) => Bytes::from(out),
            None => chunk,
        }
    }
}

/// Length of the first complete event in `data` and of its blank-line separator.
fn event_end(data: &[u8]) -> Option<(usize, usize)> {
    let lf = data.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The event's JSON when it carries a `usage` object (top level or under `response`), and
/// whether it is a usage-only chat chunk (`choices: []`).
fn inspect_event(event: &[u8]) -> (Option<serde_json::Value>, bool) {
    let mut data = Vec::new();
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
        }
    }
    // Cheap test before parsing: most chunks carry no usage.
    if !data.windows(7).any(|w| w == b"\"usage\"") {
        return (None, false);
    }
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&data) else {
        return (None, false);
    };
    let top = json.get("usage").is_some_and(serde_json::Value::is_object);
    let nested = json
        .get("response")
        .and_then(|r| r.get("usage"))
        .is_some_and(serde_json::Value::is_object);
    if !top && !nested {
        return (None, false);
    }
    let usage_only = top
        && json
            .get("choices")
            .and_then(serde_json::Value::as_array)
            .is_some_and(Vec::is_empty);
    (Some(json), usage_only)
}

#[derive(Debug, thiserror::Error)]
#[error("upstream response {0}")]
pub struct StreamTimeout(&'static str);

/// The upstream's body, passed through frame by frame (never buffered). The observer lives in
/// the body itself (one allocation per call when the body is boxed, not two).
pub struct ObservedBody<B, O: StreamObserver> {
    inner: B,
    /// One timer for both limits, armed the first time the upstream makes the agent wait (a
    /// response already read in full never arms one). A frame does not move it: when it fires
    /// early (frames came since it was set), it is set again for the real deadline. Resetting it
    /// on every frame would re-register it with the runtime's timer wheel each time.
    timer: Option<Pin<Box<Sleep>>>,
    idle_for: Duration,
    total_deadline: Instant,
    /// When the last frame arrived (or the body was created): the idle deadline counts from it.
    last_frame_at: Instant,
    observer: Option<O>,
    bytes: u64,
    /// The observer may change the bytes: no exact size is promised to the agent.
    rewrites: bool,
    /// The upstream body ended; the next poll finishes (after a flushed tail, if any).
    inner_done: bool,
}

impl<B, O: StreamObserver> ObservedBody<B, O> {
    /// `now`: the caller's current time (it has just read the clock).
    pub fn new(
        now: Instant,
        inner: B,
        idle_for: Duration,
        total_deadline: Instant,
        observer: O,
    ) -> Self {
        ObservedBody {
            inner,
            timer: None,
            idle_for,
            total_deadline,
            last_frame_at: now,
            observer: Some(observer),
            bytes: 0,
            rewrites: false,
            inner_done: false,
        }
    }

    /// The observer filters chunks: drop the upstream's size hint (the caller removes any
    /// `Content-Length`).
    ///
    /// In place: the body, observer included, is not moved.
    pub fn set_rewriting(&mut self, rewrites: bool) {
        self.rewrites = rewrites;
    }

    fn end(&mut self, how: StreamEnd) {
        if let Some(mut observer) = self.observer.take() {
            observer.finish(how, self.bytes);
        }
    }

    /// When the body gives up waiting: `idle_for` after the last frame, at the latest at the
    /// total deadline.
    fn deadline(&self) -> Instant {
        (self.last_frame_at + self.idle_for).min(self.total_deadline)
    }

    /// Polls the timer (arming it first if need be); `Ready` once the real deadline has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline();
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // Bounded: after a reset to a deadline still ahead, the timer is pending.
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            // Set when an earlier frame was the last; frames came since.
            timer.as_mut().reset(deadline);
        }
    }

    fn total_timeout(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.end(StreamEnd::TotalTimeout);
        Poll::Ready(Some(Err(Box::new(StreamTimeout(
            "exceeded the total timeout",
        )))))
    }
}

impl<B, O> Body for ObservedBody<B, O>
where
    B: Body<Data = Bytes> + Unpin,
    O: StreamObserver + Unpin,
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
        if this.inner_done {
            this.end(StreamEnd::Complete);
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // An upstream that never pauses never lets the timer be polled: check the
                    // total deadline here too.
                    let now = Instant::now();
                    if now >= this.total_deadline {
                        return this.total_timeout();
                    }
                    this.last_frame_at = now;
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        // Trailers pass untouched.
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    this.bytes += data.len() as u64;
                    let was_empty = data.is_empty();
                    let out = match this.observer.as_mut() {
                        Some(observer) => observer.on_chunk(data),
                        None => data,
                    };
                    if out.is_empty() && !was_empty {
                        // Everything was held back (a partial or filtered event): read on.
                        continue;
                    }
                    // hyper's server stops polling (and drops) a body that says it has ended
                    // after a frame: the call is complete now, not "dropped" later.
                    if !this.rewrites && this.inner.is_end_stream() {
                        this.end(StreamEnd::Complete);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.end(StreamEnd::UpstreamError);
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(None) => {
                    let tail = this
                        .observer
                        .as_mut()
                        .map(|o| o.flush())
                        .unwrap_or_default();
                    if !tail.is_empty() {
                        this.inner_done = true;
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                    this.end(StreamEnd::Complete);
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    if this.poll_deadline(cx).is_ready() {
                        if Instant::now() >= this.total_deadline {
                            return this.total_timeout();
                        }
                        this.end(StreamEnd::IdleTimeout);
                        return Poll::Ready(Some(Err(Box::new(StreamTimeout(
                            "went idle too long",
                        )))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.observer.is_none() || (!self.rewrites && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.rewrites {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl<B, O: StreamObserver> Drop for ObservedBody<B, O> {
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
        fn finish(&mut self, end: StreamEnd, bytes: u64) {
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

    fn sse(strip: bool) -> ResponseCapture {
        ResponseCapture::new(Capture::SseUsage {
            strip_usage_chunk: strip,
        })
    }

    const STREAM: &[u8] =
        b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n\
data: [DONE]\n\n";

    /// Feeds `data` in `size`-byte chunks; returns what the agent would get.
    fn feed(capture: &mut ResponseCapture, data: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in data.chunks(size) {
            out.extend_from_slice(&capture.push(Bytes::copy_from_slice(piece)));
        }
        out.extend_from_slice(&capture.flush());
        out
    }

    #[test]
    fn sse_usage_is_found_across_any_chunking_and_stripped_when_asked() {
        for size in [1, 7, 64, STREAM.len()] {
            let mut keep = sse(false);
            assert_eq!(feed(&mut keep, STREAM, size), STREAM, "size {size}");
            let usage = keep.into_json().unwrap();
            assert_eq!(usage["usage"]["prompt_tokens"], 3);

            let mut strip = sse(true);
            assert!(strip.rewrites());
            let out = feed(&mut strip, STREAM, size);
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains("prompt_tokens"), "{text}");
            assert!(text.starts_with("data: {\"choices\":[{"), "{text}");
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            assert_eq!(strip.into_json().unwrap()["usage"]["completion_tokens"], 1);
        }
    }

    #[test]
    fn sse_with_crlf_and_responses_api_events() {
        let stream = b"event: response.completed\r\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-4o\",\"usage\":{\"input_tokens\":5,\"output_tokens\":2}}}\r\n\r\n";
        let mut c = sse(false);
        assert_eq!(feed(&mut c, stream, 5), stream);
        let json = c.into_json().unwrap();
        assert_eq!(json["response"]["usage"]["output_tokens"], 2);
    }

    #[test]
    fn sse_gives_up_on_an_endless_event_and_passes_everything_on() {
        let mut c = sse(true);
        let big = vec![b'x'; MAX_SSE_EVENT_BYTES + 10];
        let out = feed(&mut c, &big, 64 * 1024);
        assert_eq!(out.len(), big.len());
        assert!(c.into_json().is_none());
    }

    #[test]
    fn json_capture_is_bounded() {
        let mut c = ResponseCapture::new(Capture::Json { limit: 8 });
        assert_eq!(feed(&mut c, b"{\"a\":1}", 3), b"{\"a\":1}");
        assert_eq!(c.into_json().unwrap()["a"], 1);
        let mut c = ResponseCapture::new(Capture::Json { limit: 8 });
        assert_eq!(feed(&mut c, b"{\"a\":12345}", 3).len(), 11);
        assert!(
            c.into_json().is_none(),
            "longer than the limit: nothing kept"
        );
    }

    #[tokio::test]
    async fn a_body_read_the_way_hypers_server_does_is_complete() {
        // hyper polls until a frame leaves `is_end_stream()` true, then drops the body.
        let seen = Arc::new(Mutex::new(None));
        let mut body = ObservedBody::new(
            Instant::now(),
            Full::new(Bytes::from_static(b"hello")),
            Duration::from_secs(5),
            Instant::now() + Duration::from_secs(5),
            Record(seen.clone()),
        );
        assert!(!body.is_end_stream());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"hello"));
        assert!(body.is_end_stream());
        drop(body);
        assert_eq!(*seen.lock().unwrap(), Some((StreamEnd::Complete, 5)));

        // Given up before its end, it is reported dropped.
        let seen = Arc::new(Mutex::new(None));
        let chunks = futures_stream(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]);
        let mut body = ObservedBody::new(
            Instant::now(),
            StreamBody::new(chunks),
            Duration::from_secs(5),
            Instant::now() + Duration::from_secs(5),
            Record(seen.clone()),
        );
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(*seen.lock().unwrap(), Some((StreamEnd::Dropped, 2)));
    }

    #[test]
    fn sse_without_filtering_never_repeats_an_unterminated_tail() {
        let stream = b"data: {\"choices\":[]}\n\ndata: [DONE]";
        let mut c = sse(false);
        assert_eq!(feed(&mut c, stream, 4), stream);
    }

    #[tokio::test]
    async fn observed_body_reports_completion() {
        let seen = Arc::new(Mutex::new(None));
        let body = ObservedBody::new(
            Instant::now(),
            Full::new(Bytes::from_static(b"hello")),
            Duration::from_secs(5),
            Instant::now() + Duration::from_secs(5),
            Record(seen.clone()),
        );
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(out, Bytes::from_static(b"hello"));
        assert_eq!(*seen.lock().unwrap(), Some((StreamEnd::Complete, 5)));
    }

    /// `count` chunks of `ab`, one every `every` (a slow upstream).
    fn paced(
        count: usize,
        every: Duration,
    ) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>> + Unpin {
        Box::pin(futures::stream::unfold(0, move |sent| async move {
            if sent == count {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok(Frame::data(Bytes::from_static(b"ab"))), sent + 1))
        }))
    }

    async fn read_all<B: Body<Data = Bytes, Error = BoxError> + Unpin>(
        mut body: B,
    ) -> (usize, Option<String>) {
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(_) => frames += 1,
                Err(e) => return (frames, Some(e.to_string())),
            }
        }
        (frames, None)
    }

    // Paused clock: time moves only when every task waits, so gaps and deadlines are exact.
    #[tokio::test(start_paused = true)]
    async fn a_silent_upstream_times_out_after_its_last_frame() {
        use futures::StreamExt;
        let seen = Arc::new(Mutex::new(None));
        let one_then_silence = futures::stream::iter([Ok::<_, std::convert::Infallible>(
            Frame::data(Bytes::from_static(b"ab")),
        )])
        .chain(futures::stream::pending());
        let started = Instant::now();
        let body = ObservedBody::new(
            Instant::now(),
            StreamBody::new(one_then_silence),
            Duration::from_millis(50),
            Instant::now() + Duration::from_secs(30),
            Record(seen.clone()),
        );
        let (frames, error) = read_all(body).await;
        assert_eq!(frames, 1);
        assert_eq!(
            error.as_deref(),
            Some("upstream response went idle too long")
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(*seen.lock().unwrap(), Some((StreamEnd::IdleTimeout, 2)));
    }

    // Paused clock: time moves only when every task waits, so gaps and deadlines are exact.
    #[tokio::test(start_paused = true)]
    async fn frames_keep_a_slow_stream_alive_past_the_idle_limit() {
        // Ten frames 30 ms apart take longer than the 200 ms idle limit in all, but no gap
        // comes near it: the timer, armed at the first wait, must be moved on, not fire.
        let seen = Arc::new(Mutex::new(None));
        let started = Instant::now();
        let body = ObservedBody::new(
            Instant::now(),
            StreamBody::new(paced(10, Duration::from_millis(30))),
            Duration::from_millis(200),
            Instant::now() + Duration::from_secs(30),
            Record(seen.clone()),
        );
        let (frames, error) = read_all(body).await;
        assert_eq!((frames, error), (10, None));
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(*seen.lock().unwrap(), Some((StreamEnd::Complete, 20)));
    }

    // Paused clock: time moves only when every task waits, so gaps and deadlines are exact.
    #[tokio::test(start_paused = true)]
    async fn a_stream_that_never_pauses_long_still_ends_at_the_total_deadline() {
        let seen = Arc::new(Mutex::new(None));
        let started = Instant::now();
        let body = ObservedBody::new(
            Instant::now(),
            StreamBody::new(paced(1000, Duration::from_millis(10))),
            Duration::from_secs(30),
            Instant::now() + Duration::from_millis(150),
            Record(seen.clone()),
        );
        let (frames, error) = read_all(body).await;
        assert!(frames < 1000, "{frames} frames");
        assert_eq!(
            error.as_deref(),
            Some("upstream response exceeded the total timeout")
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
        let (end, _) = seen.lock().unwrap().unwrap();
        assert_eq!(end, StreamEnd::TotalTimeout);
    }
}
