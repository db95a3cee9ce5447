//! Slow clients: a connection waiting for a request head (a new connection, or a kept-alive one
//! between requests) is closed once it has waited `timeout`, as hyper's `header_read_timeout`
//! would, but with one timer per connection instead of one per request. hyper's creates a timer
//! for every request head (an allocation, a clock read, a timer-wheel insert and remove: ~1,500
//! instructions, 4 % of a proxied call). Here the service marks when a request starts and its
//! response body's drop marks when the connection waits again; the connection's single timer is
//! never moved per call: when it fires early (the connection was busy, or waited less), it is
//! set again for the real deadline, at most once per `timeout`.
use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::drain::Drainable;

/// What one connection is doing, shared by its wrapper, its service and its response bodies.
#[derive(Debug)]
pub struct HeadClock {
    /// Instants below are nanoseconds since this.
    origin: Instant,
    /// When the connection began waiting for a request head, or [`BUSY`] while a request is
    /// being served (head read, response not finished).
    waiting_since: AtomicU64,
}

const BUSY: u64 = u64::MAX;

impl HeadClock {
    /// A connection accepted at `now`: waiting for its first head from then on.
    pub fn new(now: Instant) -> Arc<HeadClock> {
        Arc::new(HeadClock {
            origin: now,
            waiting_since: AtomicU64::new(0),
        })
    }

    /// A request head has arrived (hyper calls the service once it has parsed one).
    fn request_started(&self) {
        self.waiting_since.store(BUSY, Ordering::Relaxed);
    }

    /// The response is finished (its body dropped): the connection waits for a head again.
    fn response_finished(&self, now: Instant) {
        let since = now.saturating_duration_since(self.origin).as_nanos();
        // Saturate below BUSY (584 years of uptime).
        let since = u64::try_from(since).unwrap_or(BUSY - 1).min(BUSY - 1);
        self.waiting_since.store(since, Ordering::Relaxed);
    }

    /// When the head being waited for is late, or `None` while a request is being served.
    fn deadline(&self, timeout: Duration) -> Option<Instant> {
        match self.waiting_since.load(Ordering::Relaxed) {
            BUSY => None,
            since => Some(self.origin + Duration::from_nanos(since) + timeout),
        }
    }

    /// Marks a request as started and tracks the body of the response `response` resolves to.
    /// (A hand-written future: an `async` block around `response` would copy the whole call's
    /// future once more per request.)
    pub fn serve<F>(self: &Arc<Self>, response: F) -> TrackResponse<F> {
        self.request_started();
        TrackResponse {
            response,
            clock: Some(self.clone()),
        }
    }
}

pin_project_lite::pin_project! {
    /// The service's future: the handler's, with its response body tracked.
    pub struct TrackResponse<F> {
        #[pin]
        response: F,
        clock: Option<Arc<HeadClock>>,
    }

    impl<F> PinnedDrop for TrackResponse<F> {
        /// Dropped without a response (hyper gave up on the request, or the handler failed):
        /// no body will mark the end, so the connection waits for a head from now on rather
        /// than staying busy with no deadline.
        fn drop(this: Pin<&mut Self>) {
            if let Some(clock) = this.project().clock.take() {
                clock.response_finished(Instant::now());
            }
        }
    }
}

impl<F, B, E> Future for TrackResponse<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.response.poll(cx))?;
        let clock = this
            .clock
            .take()
            .expect("TrackResponse polled after completion");
        Poll::Ready(Ok(response.map(|body| TrackedBody { inner: body, clock })))
    }
}

/// A response body that, when dropped (hyper drops it once it has its last frame, or when the
/// connection ends), marks its connection as waiting for the next head.
pub struct TrackedBody<B> {
    inner: B,
    clock: Arc<HeadClock>,
}

impl<B> Drop for TrackedBody<B> {
    fn drop(&mut self) {
        self.clock.response_finished(Instant::now());
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for TrackedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionEnd {
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("no complete request head within {0:?}: connection closed")]
    HeadTimeout(Duration),
}

/// A connection closed once it has waited `timeout` for a request head (see the module docs).
pub struct HeadDeadline<C> {
    conn: Pin<Box<C>>,
    clock: Arc<HeadClock>,
    timeout: Duration,
    /// Armed once, at the first deadline; afterwards only reset when it fires.
    timer: Pin<Box<Sleep>>,
    /// The waker the timer was last polled with: while it is the current one and the timer has
    /// not fired, polling the timer again would only re-register the same waker.
    timer_waker: Option<Waker>,
}

impl<C> HeadDeadline<C> {
    /// `clock` must be the one the connection's service marks (`request_started`, `track`).
    pub fn new(conn: C, clock: Arc<HeadClock>, timeout: Duration) -> Self {
        let first = clock
            .deadline(timeout)
            .unwrap_or_else(|| Instant::now() + timeout);
        HeadDeadline {
            conn: Box::pin(conn),
            clock,
            timeout,
            timer: Box::pin(tokio::time::sleep_until(first)),
            timer_waker: None,
        }
    }
}

impl<C, E> Future for HeadDeadline<C>
where
    C: Future<Output = Result<(), E>>,
    ConnectionEnd: From<E>,
{
    type Output = Result<(), ConnectionEnd>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(done) = this.conn.as_mut().poll(cx) {
            return Poll::Ready(done.map_err(ConnectionEnd::from));
        }
        let registered = this
            .timer_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if registered && !this.timer.is_elapsed() {
            return Poll::Pending;
        }
        // Bounded: after a reset to an instant still ahead, the timer is pending.
        loop {
            if this.timer.as_mut().poll(cx).is_pending() {
                if !registered {
                    this.timer_waker = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            let now = Instant::now();
            let next = match this.clock.deadline(this.timeout) {
                Some(deadline) if now >= deadline => {
                    // Dropping the connection closes it, as hyper does on its header timeout.
                    return Poll::Ready(Err(ConnectionEnd::HeadTimeout(this.timeout)));
                }
                Some(deadline) => deadline,
                // Serving a request: look again one timeout from now.
                None => now + this.timeout,
            };
            this.timer.as_mut().reset(next);
        }
    }
}

impl<C, E> Drainable for HeadDeadline<C>
where
    C: Drainable + Future<Output = Result<(), E>>,
    ConnectionEnd: From<E>,
{
    fn start_draining(mut self: Pin<&mut Self>) {
        self.conn.as_mut().start_draining();
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// A connection that never ends by itself.
    struct Forever;
    impl Future for Forever {
        type Output = Result<(), Infallible>;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
            Poll::Pending
        }
    }
    impl From<Infallible> for ConnectionEnd {
        fn from(never: Infallible) -> Self {
            match never {}
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// Spawns a never-ending connection under the deadline; returns it and its clock.
    fn spawn_conn() -> (
        tokio::task::JoinHandle<Result<(), ConnectionEnd>>,
        Arc<HeadClock>,
    ) {
        let clock = HeadClock::new(Instant::now());
        let conn = HeadDeadline::new(Forever, clock.clone(), TIMEOUT);
        (tokio::spawn(conn), clock)
    }

    /// A request on `clock` whose response has come back: the connection is busy until the
    /// returned body is dropped.
    async fn answered<B>(clock: &Arc<HeadClock>, body: B) -> TrackedBody<B> {
        let response = clock.serve(async { Ok::<_, Infallible>(http::Response::new(body)) });
        response.await.unwrap().into_body()
    }

    /// Lets spawned tasks run at the current (paused) instant.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_no_head_is_closed_after_the_timeout() {
        let (conn, _clock) = spawn_conn();
        tokio::time::advance(TIMEOUT - Duration::from_millis(1)).await;
        settle().await;
        assert!(!conn.is_finished(), "closed before the timeout");
        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert!(conn.is_finished(), "still open at the timeout");
        let end = conn.await.unwrap().unwrap_err();
        assert!(
            matches!(end, ConnectionEnd::HeadTimeout(t) if t == TIMEOUT),
            "{end:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_dropped_without_a_response_leaves_the_connection_waiting() {
        let (conn, clock) = spawn_conn();
        let unanswered = clock.serve(std::future::pending::<
            Result<http::Response<http_body_util::Empty<Bytes>>, Infallible>,
        >());
        assert_eq!(clock.deadline(TIMEOUT), None, "busy while served");
        drop(unanswered);
        assert_eq!(clock.deadline(TIMEOUT), Some(Instant::now() + TIMEOUT));
        tokio::time::advance(TIMEOUT).await;
        settle().await;
        assert!(conn.is_finished(), "left busy forever");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_being_served_is_never_cut_and_the_wait_restarts_after_it() {
        let (conn, clock) = spawn_conn();
        tokio::time::advance(Duration::from_secs(5)).await;
        let body = answered(&clock, http_body_util::Empty::<Bytes>::new()).await;
        // A long response (a stream): three timeouts pass while it is served.
        tokio::time::advance(3 * TIMEOUT).await;
        settle().await;
        assert!(!conn.is_finished(), "a busy connection was closed");
        drop(body);
        // Kept alive: it waits for the next head for one timeout from the response's end.
        tokio::time::advance(TIMEOUT - Duration::from_millis(1)).await;
        settle().await;
        assert!(
            !conn.is_finished(),
            "closed before a full timeout of waiting"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert!(
            conn.is_finished(),
            "an idle kept-alive connection stays open"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_between_push_the_deadline_without_resetting_the_timer_per_call() {
        let (conn, clock) = spawn_conn();
        // A call every second for 25 s: the connection never waits a full timeout.
        for _ in 0..25 {
            tokio::time::advance(Duration::from_millis(900)).await;
            let body = answered(&clock, http_body_util::Empty::<Bytes>::new()).await;
            tokio::time::advance(Duration::from_millis(100)).await;
            drop(body);
            settle().await;
            assert!(!conn.is_finished(), "closed while requests kept coming");
        }
        tokio::time::advance(TIMEOUT).await;
        settle().await;
        assert!(conn.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn the_tracked_body_passes_frames_and_hints_through() {
        let clock = HeadClock::new(Instant::now());
        let mut body = answered(
            &clock,
            http_body_util::Full::new(Bytes::from_static(b"abc")),
        )
        .await;
        assert_eq!(body.size_hint().exact(), Some(3));
        assert!(!body.is_end_stream());
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        assert!(body.is_end_stream());
        assert_eq!(
            clock.deadline(TIMEOUT),
            None,
            "busy until the body is dropped"
        );
        drop(body);
        assert_eq!(clock.deadline(TIMEOUT), Some(Instant::now() + TIMEOUT));
    }
}
