//! One upstream connection driven by the call using it, not by a task of its own.
//!
//! hyper's low-level HTTP/1 client splits a connection into a request handle ([`SendRequest`])
//! and the state machine that does the reading and writing ([`Connection`], a future). The usual
//! way is to spawn the latter; then every call crosses tasks twice (the request to the
//! connection's task, the response back), each crossing a wake-up and a trip through the
//! scheduler. Here both halves stay together and the call polls the connection itself: while
//! waiting for the response head, and (through the pool's response body) until the body ends.
//!
//! Waking is arranged so that the connection is the only thing that ever registers the call's
//! waker: hyper's response channel and body channel are only ever filled while the connection
//! is being polled, so they are polled with a no-op waker right after it and never need one of
//! their own (a real one there would make every delivery wake the very task doing it).
use std::{
    future::Future,
    io,
    pin::{Pin, pin},
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    client::conn::{
        TrySendError,
        http1::{Connection, SendRequest},
    },
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

use super::UpstreamRequest;

/// A connection's byte stream: plain TCP or TLS over it.
pub(super) enum UpstreamIo {
    Plain(TcpStream),
    /// Boxed: a TLS session's state is large and would make every plain connection as big.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            UpstreamIo::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            UpstreamIo::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(tcp) => tcp.is_write_vectored(),
            UpstreamIo::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            UpstreamIo::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            UpstreamIo::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

type Sender = SendRequest<Full<Bytes>>;
type Driver = Connection<TokioIo<UpstreamIo>, Full<Bytes>>;

/// A request handle with the connection state machine it feeds.
pub(super) struct UpstreamConn {
    sender: Sender,
    /// `None` once the connection has ended: a finished future is never polled again.
    driver: Option<Driver>,
}

/// For polls whose wake-ups the connection's own registrations already cover.
fn quiet() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

impl UpstreamConn {
    pub(super) fn new(sender: Sender, driver: Driver) -> Self {
        UpstreamConn {
            sender,
            driver: Some(driver),
        }
    }

    /// Lets the connection read and write what it can; `false` once it has ended (closed by
    /// either side, or failed). Registers `cx` for whatever it waits on next.
    pub(super) fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(driver) = self.driver.as_mut() else {
            return false;
        };
        match Pin::new(driver).poll(cx) {
            Poll::Pending => true,
            Poll::Ready(ended) => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
                // Dropping the state machine answers whatever it still holds: a request it
                // never wrote comes back (retryable), one it wrote fails.
                self.driver = None;
                false
            }
        }
    }

    /// Whether the connection is still open, checked without waiting: an idle connection has
    /// nobody to wake, but the runtime still records that its socket became readable, so one
    /// poll notices an upstream that closed it in the meantime.
    pub(super) fn is_open(&mut self) -> bool {
        self.drive(&mut quiet()) && !self.sender.is_closed()
    }

    /// Worth keeping for another call: neither side has closed it.
    pub(super) fn is_reusable(&self) -> bool {
        self.driver.is_some() && !self.sender.is_closed()
    }

    /// Ready for a request (checked after [`Self::is_open`], which lets the connection ask for
    /// its next one).
    pub(super) fn is_ready(&self) -> bool {
        self.driver.is_some() && self.sender.is_ready()
    }

    /// Drives the connection until it asks for a request; `false` if it ends first.
    pub(super) async fn ready(&mut self) -> bool {
        std::future::poll_fn(|cx| {
            if !self.drive(cx) {
                return Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|ready| ready.is_ok())
        })
        .await
    }

    /// Writes `request` and reads the response head, driving the connection meanwhile. A
    /// request the connection never wrote comes back in the error
    /// ([`TrySendError::take_message`]).
    pub(super) async fn send(
        &mut self,
        request: UpstreamRequest,
    ) -> Result<Response<Incoming>, TrySendError<UpstreamRequest>> {
        // Hands the request over at once; the future only waits for the answer. Unconstrained:
        // polled with no waker, it must never be the one to run out of the task's cooperative
        // budget (that wakes the given waker to say "poll me again", here nobody).
        let mut answer = pin!(tokio::task::unconstrained(
            self.sender.try_send_request(request)
        ));
        let mut written = false;
        std::future::poll_fn(|cx| {
            if !std::mem::replace(&mut written, true) {
                // First poll: the answer cannot be there yet. Write the request and wait for
                // the socket with this task's waker (one poll instead of two).
                self.drive(cx);
                return answer.as_mut().poll(&mut quiet());
            }
            self.poll_driven(cx, |cx| answer.as_mut().poll(cx))
        })
        .await
    }

    /// Polls `check` for something only this connection produces (the answer to a request,
    /// the next chunk of its body), letting the connection make progress in between.
    ///
    /// The connection is first polled with no waker: what it delivers then (a response head,
    /// a body chunk, both often from one read) was registered with nobody, so taking it wakes
    /// nobody. Only when `check` is still waiting is the connection polled again with `cx`, so
    /// that it wakes this task when its socket is ready. `check` itself gets a waker only once
    /// the connection has ended (then nothing more will come from it).
    pub(super) fn poll_driven<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut check: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        if let Poll::Ready(done) = check(&mut quiet()) {
            return Poll::Ready(done);
        }
        if !self.drive(&mut quiet()) {
            return check(cx);
        }
        if let Poll::Ready(done) = check(&mut quiet()) {
            return Poll::Ready(done);
        }
        if !self.drive(cx) {
            return check(cx);
        }
        check(&mut quiet())
    }
}
