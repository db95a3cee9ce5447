//! Keep-alive connections to the upstreams, on hyper's low-level HTTP/1 client.
//!
//! A connection has no task of its own: the call using it drives it ([`conn`]), from the wait
//! for the response head through the end of the response body, and in the pool it sits still.
//!
//! Per upstream (scheme + authority) a LIFO stack of idle connections: the most recently used
//! connection is the warmest and the likeliest still open, and the old ones at the bottom are
//! the ones the idle timeout reaps. A connection goes back to the stack only once its response
//! body has been read to the end ([`PooledBody`]); a long streamed response simply holds its
//! connection until it is done. A request that never reached the wire (the idle connection had
//! been closed by the upstream) is retried on another connection; one that was written is not
//! (it may not be idempotent).
//!
//! Connections per upstream are capped ([`PoolSettings::max_connections_per_upstream`]): each
//! costs ~40 KB of buffers, and past a few dozen more of them do not make one core faster. A
//! call beyond the cap waits its turn (first come, first served) for a connection to finish or
//! close, at most the connect timeout, and then fails like an unreachable upstream. A connection
//! is in use until its response body has ended, so a long stream holds its slot throughout.
//!
//! The wait is built to be cheap, since at a few hundred concurrent calls most calls wait: a
//! finished connection goes straight to the oldest waiter, slot and all, under the same lock
//! that would have put it back on the stack (no second checkout, no semaphore), and the waits
//! are timed out by one timer per pool (the housekeeping task sleeps until the oldest waiter's
//! deadline) rather than one per waiting call.
mod conn;

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasherDefault, Hash, Hasher},
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, uri::Authority};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{
    net::TcpStream,
    sync::{Notify, oneshot},
};
use tokio_rustls::TlsConnector;

use conn::{UpstreamConn, UpstreamIo};

pub type UpstreamRequest = Request<Full<Bytes>>;
/// Connections move between the pool and the calls using them: boxed, that is one pointer.
type Conn = Box<UpstreamConn>;

/// Idle connections that turn out closed are skipped; after this many that looked open but
/// refused the request anyway, a new one is opened.
const MAX_STALE_SKIPS: usize = 16;

/// Default of [`PoolSettings::max_connections_per_upstream`] (`--upstream-max-connections`).
pub const DEFAULT_MAX_CONNECTIONS_PER_UPSTREAM: usize = 64;

#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// An idle connection older than this is closed, never reused.
    pub idle_timeout: Duration,
    /// Idle connections kept per upstream; a connection freed beyond that is closed.
    pub max_idle_per_upstream: usize,
    /// Connections open at once per upstream, in use or idle (0 = no cap). Calls beyond it
    /// queue in arrival order for at most `connect_timeout`, then fail with
    /// [`SendError::NoConnectionFree`].
    pub max_connections_per_upstream: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to the upstream: {0}")]
    Connect(std::io::Error),
    #[error("connecting to the upstream took longer than {0:?}")]
    ConnectTimeout(Duration),
    #[error("upstream host {0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("TLS handshake with the upstream: {0}")]
    Tls(std::io::Error),
    #[error("HTTP handshake with the upstream: {0}")]
    Handshake(hyper::Error),
    #[error("upstream request failed: {0}")]
    Request(hyper::Error),
    #[error("all {cap} connections to the upstream stayed busy for {waited:?}")]
    NoConnectionFree { cap: usize, waited: Duration },
}

/// Which upstream a connection belongs to: scheme and authority, hashed once when a key's
/// base URL is parsed (per call the pool only compares, mostly by pointer).
#[derive(Debug, Clone)]
pub struct UpstreamKey(Arc<KeyParts>);

#[derive(Debug)]
struct KeyParts {
    https: bool,
    authority: Authority,
    /// The authority in lower case: what equality compares.
    normalized: Box<str>,
    hash: u64,
}

impl UpstreamKey {
    pub fn new(https: bool, authority: Authority) -> Self {
        let normalized: Box<str> = authority.as_str().to_ascii_lowercase().into();
        // Fixed keys: equal upstreams must hash alike wherever their keys were made. (Upstreams
        // come from the policy, not from callers: no flooding concern.)
        let mut hasher = std::hash::DefaultHasher::new();
        (https, &normalized).hash(&mut hasher);
        let hash = hasher.finish();
        UpstreamKey(Arc::new(KeyParts {
            https,
            authority,
            normalized,
            hash,
        }))
    }

    pub fn https(&self) -> bool {
        self.0.https
    }

    pub fn authority(&self) -> &Authority {
        &self.0.authority
    }
}

impl PartialEq for UpstreamKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.https == other.0.https && self.0.normalized == other.0.normalized)
    }
}

impl Eq for UpstreamKey {}

impl Hash for UpstreamKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Equal keys have equal normalized forms, hence equal precomputed hashes.
        state.write_u64(self.0.hash);
    }
}

/// Passes an [`UpstreamKey`]'s precomputed hash through.
#[derive(Default)]
struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is ever used; fold anything else in anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type UpstreamMap = HashMap<UpstreamKey, UpstreamState, BuildHasherDefault<PrehashedHasher>>;

/// One upstream's idle connections and, when capped, its slots and the calls waiting for one.
#[derive(Default)]
struct UpstreamState {
    /// Oldest at the bottom, most recently freed on top.
    idle: Vec<IdleConn>,
    /// Slots taken: connections in use or being opened (idle ones hold none). Only counted
    /// when capped; never above the cap, and below it only while nobody waits.
    in_use: usize,
    /// Calls turned away at the cap, oldest first (so deadlines ascend too). One that gave up
    /// leaves an entry with a closed channel, skipped when its turn comes and swept by the
    /// housekeeping task.
    waiters: VecDeque<Waiter>,
}

impl UpstreamState {
    /// Gives `turn` (a slot, and the connection that freed it if reusable) to the oldest
    /// waiter still waiting; hands it back when there is none.
    fn hand_over(&mut self, mut turn: Turn) -> Result<(), Turn> {
        while let Some(waiter) = self.waiters.pop_front() {
            match waiter.turn.send(turn) {
                Ok(()) => return Ok(()),
                // That one had given up.
                Err(back) => turn = back,
            }
        }
        Err(turn)
    }
}

/// A waiter's turn: a slot, with a connection ready for its request when one was freed.
type Turn = Option<Conn>;

struct Waiter {
    turn: oneshot::Sender<Turn>,
    /// Dropping `turn` at this instant fails the wait.
    deadline: tokio::time::Instant,
}

struct IdleConn {
    conn: Conn,
    since: Instant,
}

struct Shared {
    tls: TlsConnector,
    settings: PoolSettings,
    upstreams: Mutex<UpstreamMap>,
    /// Wakes the housekeeping task when a call starts waiting and it is timing no wait.
    waiter_queued: Arc<Notify>,
    /// Whether the housekeeping task knows some call waits (it then wakes by itself at the
    /// oldest waiter's deadline, which no later waiter can precede). Written under the map lock.
    expiry_armed: AtomicBool,
}

/// Cheap to clone: every clone shares the same idle connections.
#[derive(Clone)]
pub struct UpstreamPool {
    shared: Arc<Shared>,
}

impl UpstreamPool {
    /// Must run inside a Tokio runtime: a background task closes expired idle connections and
    /// times out calls waiting beyond the cap (it ends when the last clone of the pool is
    /// dropped).
    pub fn new(tls: rustls::ClientConfig, settings: PoolSettings) -> Self {
        let waiter_queued = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            tls: TlsConnector::from(Arc::new(tls)),
            settings,
            upstreams: Mutex::new(UpstreamMap::default()),
            waiter_queued: waiter_queued.clone(),
            expiry_armed: AtomicBool::new(false),
        });
        tokio::spawn(housekeeping(Arc::downgrade(&shared), waiter_queued));
        UpstreamPool { shared }
    }

    /// Sends `request` (origin-form URI, `Host` set) to `upstream` on an idle connection, or a
    /// new one. The response body returns the connection to the pool once read to the end.
    pub async fn send(
        &self,
        upstream: &UpstreamKey,
        mut request: UpstreamRequest,
    ) -> Result<Response<PooledBody>, SendError> {
        let (mut idle, held) = match self.shared.claim(upstream) {
            Claim::Ready { idle, slot } => (idle, slot),
            Claim::Wait(turn) => match self.wait_turn(upstream, turn).await? {
                Some(conn) => (Some(conn), true),
                // A connection closed and left its slot: perhaps one went idle meanwhile.
                None => (self.shared.checkout(upstream), true),
            },
        };
        // From here on, however the call ends (error, cancelled), the slot is given back.
        let slot = Slot {
            shared: self.shared.clone(),
            upstream: upstream.clone(),
            held,
        };
        let mut tries = 0;
        while let Some(mut conn) = idle.take() {
            // A connection that asked for its next request is polled once by `send` before it
            // takes the request (hyper reads before it writes): a close that happened while it
            // sat idle is seen then, and the request comes back unsent. One still finishing its
            // last response is polled here until it asks, or found closed.
            if conn.is_ready() || (conn.is_open() && conn.ready().await) {
                match conn.send(request).await {
                    Ok(response) => return Ok(lease(conn, slot, response)),
                    Err(mut failed) => match failed.take_message() {
                        // Never written: the upstream had closed this connection; try another.
                        Some(unsent) => request = unsent,
                        None => return Err(SendError::Request(failed.into_error())),
                    },
                }
                tries += 1;
                if tries == MAX_STALE_SKIPS {
                    break;
                }
            } // else: closed while idle, dropped here
            idle = self.shared.checkout(upstream);
        }
        let mut conn = self.shared.connect(upstream).await?;
        let response = conn
            .send(request)
            .await
            .map_err(|failed| SendError::Request(failed.into_error()))?;
        Ok(lease(conn, slot, response))
    }

    /// Waits for the turn queued in [`Shared::claim`]: fails once the housekeeping task drops
    /// it at the deadline. Dropped (the call gave up), a turn already handed over is passed on.
    async fn wait_turn(
        &self,
        upstream: &UpstreamKey,
        turn: oneshot::Receiver<Turn>,
    ) -> Result<Turn, SendError> {
        let mut waiting = Waiting {
            shared: &self.shared,
            upstream,
            turn,
        };
        (&mut waiting.turn)
            .await
            .map_err(|_| SendError::NoConnectionFree {
                cap: self.shared.settings.max_connections_per_upstream,
                waited: self.shared.settings.connect_timeout,
            })
    }

    /// Idle connections to `upstream` right now (tests, diagnostics).
    pub fn idle_count(&self, upstream: &UpstreamKey) -> usize {
        self.shared.lock().get(upstream).map_or(0, |s| s.idle.len())
    }

    /// Calls waiting for a connection to `upstream` right now (tests, diagnostics).
    pub fn waiting_count(&self, upstream: &UpstreamKey) -> usize {
        self.shared.lock().get(upstream).map_or(0, |s| {
            s.waiters.iter().filter(|w| !w.turn.is_closed()).count()
        })
    }
}

/// A queued call's end of its turn. Dropped before the turn was taken (the call gave up just
/// as it came), the turn goes to the next waiter or back to the pool: no slot is ever lost.
struct Waiting<'a> {
    shared: &'a Shared,
    upstream: &'a UpstreamKey,
    turn: oneshot::Receiver<Turn>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // After a taken turn (or a timeout) there is nothing to receive.
        self.turn.close();
        if let Ok(turn) = self.turn.try_recv() {
            match turn {
                Some(conn) => self.shared.checkin(self.upstream, conn, true),
                None => self.shared.free_slot(self.upstream),
            }
        }
    }
}

/// What a call gets from the pool at once.
enum Claim {
    /// A slot (if capped: `slot` says whether one is held) and perhaps an idle connection.
    Ready { idle: Option<Conn>, slot: bool },
    /// Every slot is taken: the call is queued and its turn comes through this.
    Wait(oneshot::Receiver<Turn>),
}

/// One slot of a capped upstream, given back when dropped (`held` is false when uncapped,
/// or once the slot has gone with its connection to a waiter).
struct Slot {
    shared: Arc<Shared>,
    upstream: UpstreamKey,
    held: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held {
            self.shared.free_slot(&self.upstream);
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, UpstreamMap> {
        // The map holds no invariant a panicking holder could break half-way.
        self.upstreams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free slot and the warmest idle connection, under one lock; or, at the cap, a place
    /// at the end of the queue. A newcomer never overtakes a waiter: slots below the cap only
    /// exist while nobody waits.
    fn claim(&self, upstream: &UpstreamKey) -> Claim {
        let cap = self.settings.max_connections_per_upstream;
        let mut upstreams = self.lock();
        let state = upstreams.entry(upstream.clone()).or_default();
        if cap > 0 {
            if state.in_use >= cap {
                return Claim::Wait(self.queue(state));
            }
            state.in_use += 1;
        }
        Claim::Ready {
            idle: self.pop_idle(state),
            slot: cap > 0,
        }
    }

    fn queue(&self, state: &mut UpstreamState) -> oneshot::Receiver<Turn> {
        // Those at the front that gave up are gone for good: no need to keep them.
        while state.waiters.front().is_some_and(|w| w.turn.is_closed()) {
            state.waiters.pop_front();
        }
        let (turn, receiver) = oneshot::channel();
        state.waiters.push_back(Waiter {
            turn,
            deadline: tokio::time::Instant::now() + self.settings.connect_timeout,
        });
        if !self.expiry_armed.load(Ordering::Relaxed) {
            self.expiry_armed.store(true, Ordering::Relaxed);
            self.waiter_queued.notify_one();
        }
        receiver
    }

    /// Fails the waits past their deadline (dropping their senders) and forgets the waiters
    /// that left. Returns the earliest deadline still pending.
    fn expire_waits(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let mut upstreams = self.lock();
        let mut earliest: Option<tokio::time::Instant> = None;
        for state in upstreams.values_mut() {
            // Oldest first: the expired ones are a prefix.
            while state.waiters.front().is_some_and(|w| w.deadline <= now) {
                state.waiters.pop_front();
            }
            state.waiters.retain(|w| !w.turn.is_closed());
            if let Some(oldest) = state.waiters.front() {
                earliest = Some(earliest.map_or(oldest.deadline, |e| e.min(oldest.deadline)));
            }
        }
        if earliest.is_none() {
            self.expiry_armed.store(false, Ordering::Relaxed);
        }
        earliest
    }

    /// The most recently returned open connection younger than the idle timeout.
    fn checkout(&self, upstream: &UpstreamKey) -> Option<Conn> {
        let mut upstreams = self.lock();
        let state = upstreams.get_mut(upstream)?;
        self.pop_idle(state)
    }

    /// The warmest connection unless it is too old; whether it is still open is checked by
    /// the caller, outside the lock.
    fn pop_idle(&self, state: &mut UpstreamState) -> Option<Conn> {
        let stack = &mut state.idle;
        let entry = stack.pop()?;
        if self.expired(&entry, Instant::now()) {
            // The stack is ordered by age: everything below is older still.
            stack.clear();
            return None;
        }
        Some(entry.conn)
    }

    /// A finished connection: to the oldest waiter with its slot (`slot_held`), else onto the
    /// idle stack (freeing the slot). A closed one only frees its slot.
    fn checkin(&self, upstream: &UpstreamKey, conn: Conn, slot_held: bool) {
        if !conn.is_reusable() {
            drop(conn);
            if slot_held {
                self.free_slot(upstream);
            }
            return;
        }
        let mut upstreams = self.lock();
        let state = upstreams.entry(upstream.clone()).or_default();
        let conn = if slot_held {
            match state.hand_over(Some(conn)) {
                Ok(()) => return,
                Err(back) => {
                    state.in_use -= 1;
                    // What went in comes back: a connection.
                    let Some(conn) = back else { return };
                    conn
                }
            }
        } else {
            conn
        };
        if state.idle.len() < self.settings.max_idle_per_upstream {
            state.idle.push(IdleConn {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// A slot whose connection closed (or never opened): to the oldest waiter, who opens one.
    fn free_slot(&self, upstream: &UpstreamKey) {
        let mut upstreams = self.lock();
        // A held slot keeps its upstream's state from being reaped.
        if let Some(state) = upstreams.get_mut(upstream)
            && state.hand_over(None).is_err()
        {
            state.in_use -= 1;
        }
    }

    fn expired(&self, entry: &IdleConn, now: Instant) -> bool {
        now.saturating_duration_since(entry.since) > self.settings.idle_timeout
    }

    fn reap(&self) {
        let now = Instant::now();
        let mut upstreams = self.lock();
        for state in upstreams.values_mut() {
            let stack = &mut state.idle;
            // Oldest first: the expired ones are a prefix.
            let expired = stack.partition_point(|e| self.expired(e, now));
            stack.drain(..expired);
            // Polls each once (nobody is woken by it while idle) to drop the ones that ended.
            stack.retain_mut(|e| e.conn.is_open());
        }
        // An upstream nobody uses any more is forgotten (no slot is taken, nobody waits).
        upstreams.retain(|_, state| {
            !state.idle.is_empty() || state.in_use > 0 || !state.waiters.is_empty()
        });
    }

    async fn connect(&self, upstream: &UpstreamKey) -> Result<Conn, SendError> {
        let timeout = self.settings.connect_timeout;
        let https = upstream.https();
        let host = upstream.authority().host();
        // `[::1]` in a URL, `::1` to the resolver and in a certificate.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = upstream
            .authority()
            .port_u16()
            .unwrap_or(if https { 443 } else { 80 });
        let connected = tokio::time::timeout(timeout, async {
            let tcp = TcpStream::connect((host, port))
                .await
                .map_err(SendError::Connect)?;
            tcp.set_nodelay(true).map_err(SendError::Connect)?;
            if !https {
                return handshake(UpstreamIo::Plain(tcp)).await;
            }
            let name = ServerName::try_from(host.to_owned())
                .map_err(|_| SendError::ServerName(host.to_owned()))?;
            let tls = self.tls.connect(name, tcp).await.map_err(SendError::Tls)?;
            handshake(UpstreamIo::Tls(Box::new(tls))).await
        })
        .await;
        connected.unwrap_or(Err(SendError::ConnectTimeout(timeout)))
    }
}

async fn handshake(io: UpstreamIo) -> Result<Conn, SendError> {
    let (sender, driver) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(SendError::Handshake)?;
    // Not spawned: the calls using the connection drive it.
    Ok(Box::new(UpstreamConn::new(sender, driver)))
}

/// Closes idle connections past the idle timeout even when no call comes to reuse them, and
/// fails the calls that waited beyond the cap for as long as the connect timeout: one timer for
/// all of them, set to the oldest waiter's deadline.
async fn housekeeping(shared: Weak<Shared>, waiter_queued: Arc<Notify>) {
    let reap_every = match shared.upgrade() {
        Some(s) => (s.settings.idle_timeout / 2).max(Duration::from_millis(10)),
        None => return,
    };
    let mut next_reap = tokio::time::Instant::now() + reap_every;
    loop {
        let wake_at = {
            // Not held while asleep: the pool ends when its last user drops it.
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let now = tokio::time::Instant::now();
            if now >= next_reap {
                shared.reap();
                next_reap = now + reap_every;
            }
            shared
                .expire_waits(now)
                .map_or(next_reap, |deadline| deadline.min(next_reap))
        };
        // Woken early when a call starts waiting while none did.
        let _ = tokio::time::timeout_at(wake_at, waiter_queued.notified()).await;
    }
}

/// A connection on loan to one response, with its slot.
struct Lease {
    /// Driven by the body while it is read; dropped (closed) with an unfinished body, before
    /// its slot is freed.
    conn: Conn,
    slot: Slot,
}

fn lease(conn: Conn, slot: Slot, response: Response<Incoming>) -> Response<PooledBody> {
    response.map(|inner| {
        let mut body = PooledBody {
            inner,
            lease: Some(Lease { conn, slot }),
        };
        // An empty body (204, HEAD, Content-Length: 0) may never be polled.
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    })
}

/// An upstream response body that gives its connection back to the pool when it has been read
/// to the end. Dropped earlier (agent gone, timeout, error), the connection is closed instead:
/// its unread rest would otherwise be read as the next response.
pub struct PooledBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("leased", &self.lease.is_some())
            .finish_non_exhaustive()
    }
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(Lease { conn, mut slot }) = self.lease.take() {
            // The slot goes along with the connection (to a waiter, or freed at the stack).
            let held = std::mem::take(&mut slot.held);
            slot.shared.checkin(&slot.upstream, conn, held);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let inner = &mut this.inner;
        let polled = match this.lease.as_mut() {
            Some(lease) => lease
                .conn
                .poll_driven(cx, |cx| Pin::new(&mut *inner).poll_frame(cx)),
            // Released: the body has ended.
            None => Pin::new(inner).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(None) => self.release(),
            // hyper's server stops polling a body that says it has ended: release here too.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::{
        io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
        net::TcpListener,
        sync::mpsc,
    };

    use super::*;

    const BODY: &str = "hello from upstream";

    /// A minimal HTTP/1.1 upstream: answers each request (`GET /path`) with a fixed body, or
    /// for `/close` closes the connection right after answering, or for `/stream` sends the
    /// head and one chunk of a chunked body and waits, or for `/slow` sends the head and half
    /// the body and the rest when told (keeping the connection). Reports accepted connections and
    /// closes.
    struct Upstream {
        addr: std::net::SocketAddr,
        accepted: Arc<AtomicUsize>,
        closed: mpsc::UnboundedReceiver<()>,
        /// Per request: the connection number it arrived on.
        requests: mpsc::UnboundedReceiver<usize>,
        /// Lets a `/bye` connection close after its answer, or a `/slow` body finish.
        close_idle: Arc<tokio::sync::Notify>,
    }

    impl Upstream {
        async fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let (closed_tx, closed) = mpsc::unbounded_channel();
            let (req_tx, requests) = mpsc::unbounded_channel();
            let counter = accepted.clone();
            let close_idle = Arc::new(tokio::sync::Notify::new());
            let bye = close_idle.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let (closed_tx, req_tx) = (closed_tx.clone(), req_tx.clone());
                    let (tls, bye) = (tls.clone(), bye.clone());
                    tokio::spawn(async move {
                        match tls {
                            Some(acceptor) => {
                                if let Ok(stream) = acceptor.accept(tcp).await {
                                    serve_conn(stream, n, &req_tx, &bye).await;
                                }
                            }
                            None => serve_conn(tcp, n, &req_tx, &bye).await,
                        }
                        let _ = closed_tx.send(());
                    });
                }
            });
            Upstream {
                addr,
                accepted,
                closed,
                requests,
                close_idle,
            }
        }

        fn key(&self, https: bool) -> UpstreamKey {
            UpstreamKey::new(https, self.addr.to_string().parse().unwrap())
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }

        async fn next_request_conn(&mut self) -> usize {
            tokio::time::timeout(Duration::from_secs(5), self.requests.recv())
                .await
                .expect("the upstream saw no request within 5 s")
                .unwrap()
        }

        async fn next_close(&mut self) {
            tokio::time::timeout(Duration::from_secs(5), self.closed.recv())
                .await
                .expect("no upstream connection closed within 5 s")
                .unwrap();
        }
    }

    async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(
        stream: S,
        n: usize,
        requests: &mpsc::UnboundedSender<usize>,
        close_idle: &tokio::sync::Notify,
    ) {
        let mut stream = BufReader::new(stream);
        loop {
            let mut request_line = String::new();
            if stream.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                return;
            }
            loop {
                let mut line = String::new();
                if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                if line == "\r\n" {
                    break;
                }
            }
            let _ = requests.send(n);
            let path = request_line.split(' ').nth(1).unwrap_or("/").to_owned();
            let out = stream.get_mut();
            if path == "/stream" {
                let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                let _ = out.write_all(head.as_bytes()).await;
                let _ = out.flush().await;
                // Holds the stream open until the client goes away.
                let mut rest = String::new();
                let _ = stream.read_line(&mut rest).await;
                return;
            }
            if path == "/slow" {
                let (first, rest) = BODY.split_at(BODY.len() / 2);
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", BODY.len());
                let _ = out.write_all(format!("{head}{first}").as_bytes()).await;
                let _ = out.flush().await;
                close_idle.notified().await;
                let _ = out.write_all(rest.as_bytes()).await;
                let _ = out.flush().await;
                continue;
            }
            let close = path == "/close";
            // Closes after answering (when told to) without saying so: an idle keep-alive
            // connection the upstream drops.
            let bye = path == "/bye";
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{}\r\n{BODY}",
                BODY.len(),
                if close { "connection: close\r\n" } else { "" }
            );
            if out.write_all(response.as_bytes()).await.is_err() || close {
                let _ = out.shutdown().await;
                return;
            }
            if bye {
                let _ = out.flush().await;
                close_idle.notified().await;
                let _ = out.shutdown().await;
                return;
            }
            let _ = out.flush().await;
        }
    }

    fn settings(idle_timeout: Duration) -> PoolSettings {
        PoolSettings {
            connect_timeout: Duration::from_secs(5),
            idle_timeout,
            max_idle_per_upstream: 256,
            max_connections_per_upstream: 0,
        }
    }

    fn plain_pool(idle_timeout: Duration) -> UpstreamPool {
        let roots = rustls::RootCertStore::empty();
        UpstreamPool::new(tls_config(roots), settings(idle_timeout))
    }

    fn tls_config(roots: rustls::RootCertStore) -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    fn get(upstream: &Upstream, path: &str) -> UpstreamRequest {
        Request::get(path)
            .header(http::header::HOST, upstream.addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn read_all(response: Response<PooledBody>) -> String {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Polls `cond` until it holds or 5 s pass.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_finished_response_frees_its_connection_for_the_next_call() {
        let mut upstream = Upstream::start(None).await;
        let pool = plain_pool(Duration::from_secs(60));
        let key = upstream.key(false);
        for _ in 0..5 {
            let response = pool.send(&key, get(&upstream, "/a")).await.unwrap();
            assert_eq!(read_all(response).await, BODY);
            assert_eq!(upstream.next_request_conn().await, 0);
        }
        assert_eq!(upstream.accepted(), 1);
        assert_eq!(pool.idle_count(&key), 1);
        // Keys made separately for the same upstream share its connections.
        assert_eq!(pool.idle_count(&upstream.key(false)), 1);
        assert_eq!(pool.idle_count(&upstream.key(true)), 0);
    }

    #[tokio::test]
    async fn a_connection_is_ready_for_the_next_request_once_its_body_is_read() {
        let mut upstream = Upstream::start(None).await;
        let pool = plain_pool(Duration::from_secs(60));
        let key = upstream.key(false);
        read_all(pool.send(&key, get(&upstream, "/a")).await.unwrap()).await;
        upstream.next_request_conn().await;
        // No task drives an idle connection: reading the body through must have left it
        // asking for its next request, and nothing registered to wake a finished call.
        {
            let upstreams = pool.shared.lock();
            let idle = &upstreams[&key].idle;
            assert_eq!(idle.len(), 1);
            assert!(idle[0].conn.is_ready());
        }
        // A streamed body is read as its chunks come, each read driving the connection.
        let mut streaming = pool.send(&key, get(&upstream, "/stream")).await.unwrap();
        let first = streaming.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "first");
        assert_eq!(upstream.accepted(), 1, "the idle connection was reused");
        assert_eq!(
            pool.idle_count(&key),
            0,
            "a streaming response holds its connection"
        );
    }

    #[tokio::test]
    async fn the_most_recently_freed_connection_is_reused_first() {
        let mut upstream = Upstream::start(None).await;
        let pool = plain_pool(Duration::from_secs(60));
        let key = upstream.key(false);
        // Two calls in flight at once need two connections.
        let first = pool.send(&key, get(&upstream, "/a")).await.unwrap();
        let second = pool.send(&key, get(&upstream, "/a")).await.unwrap();
        let mut seen = [
            upstream.next_request_conn().await,
            upstream.next_request_conn().await,
        ];
        seen.sort_unstable();
        assert_eq!(seen, [0, 1]);
        // Connection 0's response body finishes last: it is on top of the stack.
        let (first_conn, second_conn) = (0, 1);
        read_all(second).await;
        read_all(first).await;
        assert_eq!(pool.idle_count(&key), 2);
        for _ in 0..3 {
            read_all(pool.send(&key, get(&upstream, "/a")).await.unwrap()).await;
            assert_eq!(upstream.next_request_conn().await, first_conn);
        }
        assert_ne!(first_conn, second_conn);
        assert_eq!(upstream.accepted(), 2);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_replaced_without_failing_the_call() {
        let mut upstream = Upstream::start(None).await;
        let pool = plain_pool(Duration::from_secs(60));
        let key = upstream.key(false);
        // The upstream answers and closes: the connection may go back to the pool before
        // hyper has seen the close.
        for _ in 0..20 {
            let response = pool.send(&key, get(&upstream, "/close")).await.unwrap();
            assert_eq!(read_all(response).await, BODY);
        }
        assert_eq!(upstream.accepted(), 20, "a closed connection was reused");
        for _ in 0..20 {
            upstream.next_request_conn().await;
        }
        // A keep-alive connection the upstream closes while it sits idle is skipped.
        read_all(pool.send(&key, get(&upstream, "/bye")).await.unwrap()).await;
        upstream.next_request_conn().await;
        let conns_before = upstream.accepted();
        assert_eq!(pool.idle_count(&key), 1);
        upstream.close_idle.notify_one();
        eventually("the idle connection is seen closed", || {
            pool.shared
                .lock()
                .get_mut(&key)
                .expect("the upstream is known")
                .idle
                .iter_mut()
                .all(|e| !e.conn.is_open())
        })
        .await;
        assert_eq!(pool.idle_count(&key), 1, "still in the stack, closed");
        assert_eq!(
            read_all(pool.send(&key, get(&upstream, "/a")).await.unwrap()).await,
            BODY
        );
        assert_eq!(upstream.accepted(), conns_before + 1);
    }

    #[tokio::test]
    async fn an_idle_connection_closed_unseen_gets_the_request_back_and_another_takes_it() {
        let mut upstream = Upstream::start(None).await;
        let pool = plain_pool(Duration::from_secs(60));
        let key = upstream.key(false);
        read_all(pool.send(&key, get(&upstream, "/bye")).await.unwrap()).await;
        upstream.next_request_conn().await;
        upstream.close_idle.notify_one();
        upstream.next_close().await;
        // Deferred until the runtime has polled its I/O driver: the close is recorded on the
        // socket, and nobody has polled the idle connection since.
        tokio::task::yield_now().await;
        {
            let upstreams = pool.shared.lock();
            let idle = &upstreams[&key].idle;
            assert_eq!(idle.len(), 1);
            assert!(idle[0].conn.is_ready(), "not polled since");
        }
        assert_eq!(
            read_all(pool.send(&key, get(&upstream, "/a")).await.unwrap()).await,
            BODY
        );
        assert_eq!(upstream.accepted(), 2);
        assert_eq!(upstream.next_request_conn().await, 1);
    }

    #[tokio::test]
    async fn an_unfinished_body_does_not_free_its_connection() {
        let mut upstream = Upstream::start(None).await;
        let pool = plain_pool(Duration::from_secs(60));
        let key = upstream.key(false);
        let mut streaming = pool.send(&key, get(&upstream, "/stream")).await.unwrap();
        let first = streaming.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "first");
        // A stream in progress does not hold up the next call: it gets a connection of its own.
        read_all(pool.send(&key, get(&upstream, "/a")).await.unwrap()).await;
        assert_eq!(upstream.accepted(), 2);
        assert_eq!(pool.idle_count(&key), 1);
        // Given up half-way: that connection is closed, not pooled.
        drop(streaming);
        upstream.next_close().await;
        assert_eq!(pool.idle_count(&key), 1);
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.push(upstream.next_request_conn().await);
        }
        read_all(pool.send(&key, get(&upstream, "/a")).await.unwrap()).await;
        assert_eq!(upstream.next_request_conn().await, seen[1]);
        assert_eq!(upstream.accepted(), 2);
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let mut upstream = Upstream::start(None).await;
        let idle_timeout = Duration::from_millis(100);
        let pool = plain_pool(idle_timeout);
        let key = upstream.key(false);
        read_all(pool.send(&key, get(&upstream, "/a")).await.unwrap()).await;
        assert_eq!(pool.idle_count(&key), 1);
        // The reaper closes it without any further call.
        upstream.next_close().await;
        assert_eq!(pool.idle_count(&key), 0);
        read_all(pool.send(&key, get(&upstream, "/a")).await.unwrap()).await;
        assert_eq!(upstream.accepted(), 2);

        // Expired but not yet reaped: checkout refuses it too.
        let stale = plain_pool(Duration::from_secs(60));
        read_all(stale.send(&key, get(&upstream, "/a")).await.unwrap()).await;
        stale.shared.lock().get_mut(&key).unwrap().idle[0].since = Instant::now()
            .checked_sub(Duration::from_secs(61))
            .expect("the monotonic clock is older than a minute");
        assert!(stale.shared.checkout(&key).is_none());
    }

    #[tokio::test]
    async fn idle_connections_per_upstream_are_bounded() {
        let upstream = Upstream::start(None).await;
        let pool = UpstreamPool::new(
            tls_config(rustls::RootCertStore::empty()),
            PoolSettings {
                max_idle_per_upstream: 2,
                ..settings(Duration::from_secs(60))
            },
        );
        let key = upstream.key(false);
        let mut in_flight = Vec::new();
        for _ in 0..4 {
            in_flight.push(pool.send(&key, get(&upstream, "/a")).await.unwrap());
        }
        for response in in_flight {
            read_all(response).await;
        }
        assert_eq!(upstream.accepted(), 4);
        assert_eq!(pool.idle_count(&key), 2);
    }

    fn capped_pool(cap: usize, connect_timeout: Duration) -> UpstreamPool {
        UpstreamPool::new(
            tls_config(rustls::RootCertStore::empty()),
            PoolSettings {
                connect_timeout,
                max_connections_per_upstream: cap,
                ..settings(Duration::from_secs(60))
            },
        )
    }

    /// Starts a call that reads its whole body and then notes `name` in `log`.
    fn spawn_call(
        pool: &UpstreamPool,
        upstream: &Upstream,
        name: &'static str,
        log: &Arc<Mutex<Vec<&'static str>>>,
    ) -> tokio::task::JoinHandle<Result<String, SendError>> {
        let (pool, key, request, log) = (
            pool.clone(),
            upstream.key(false),
            get(upstream, "/a"),
            log.clone(),
        );
        tokio::spawn(async move {
            let body = read_all(pool.send(&key, request).await?).await;
            log.lock().unwrap().push(name);
            Ok(body)
        })
    }

    #[tokio::test]
    async fn calls_beyond_the_cap_wait_in_order_for_a_connection_to_finish() {
        let mut upstream = Upstream::start(None).await;
        let pool = capped_pool(1, Duration::from_secs(5));
        let key = upstream.key(false);
        let mut held = pool.send(&key, get(&upstream, "/slow")).await.unwrap();
        upstream.next_request_conn().await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let second = spawn_call(&pool, &upstream, "second", &log);
        eventually("the second call waits", || pool.waiting_count(&key) == 1).await;
        let third = spawn_call(&pool, &upstream, "third", &log);
        eventually("the third call waits", || pool.waiting_count(&key) == 2).await;
        assert_eq!(upstream.accepted(), 1, "the cap was exceeded");
        assert!(log.lock().unwrap().is_empty());

        // The held body ends: its connection goes to the first waiter, then to the next.
        upstream.close_idle.notify_one();
        let mut body = Vec::new();
        while let Some(frame) = held.body_mut().frame().await {
            body.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(body, BODY.as_bytes());
        assert_eq!(second.await.unwrap().unwrap(), BODY);
        assert_eq!(third.await.unwrap().unwrap(), BODY);
        assert_eq!(*log.lock().unwrap(), ["second", "third"]);
        assert_eq!(
            upstream.accepted(),
            1,
            "the waiters reused the one connection"
        );
        assert_eq!(pool.waiting_count(&key), 0);
        assert_eq!(pool.idle_count(&key), 1);
    }

    #[tokio::test]
    async fn a_waiter_gets_a_new_connection_when_a_busy_one_closes() {
        let mut upstream = Upstream::start(None).await;
        let pool = capped_pool(1, Duration::from_secs(5));
        let key = upstream.key(false);
        let mut streaming = pool.send(&key, get(&upstream, "/stream")).await.unwrap();
        streaming.body_mut().frame().await.unwrap().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let waiter = spawn_call(&pool, &upstream, "waiter", &log);
        eventually("the call waits", || pool.waiting_count(&key) == 1).await;
        assert_eq!(upstream.accepted(), 1);
        // Abandoned mid-stream: that connection closes and its slot goes to the waiter.
        drop(streaming);
        assert_eq!(waiter.await.unwrap().unwrap(), BODY);
        upstream.next_close().await;
        assert_eq!(upstream.accepted(), 2);
        assert_eq!(pool.waiting_count(&key), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_holds_no_slot() {
        let mut upstream = Upstream::start(None).await;
        let wait = Duration::from_millis(200);
        let pool = capped_pool(1, wait);
        let key = upstream.key(false);
        let mut held = pool.send(&key, get(&upstream, "/slow")).await.unwrap();
        upstream.next_request_conn().await;

        // One waits out the bound and fails closed; one is cancelled by its caller.
        let started = tokio::time::Instant::now();
        let err = pool.send(&key, get(&upstream, "/a")).await.unwrap_err();
        assert!(
            matches!(err, SendError::NoConnectionFree { cap: 1, waited } if waited == wait),
            "{err}"
        );
        assert!(started.elapsed() >= wait);
        let log = Arc::new(Mutex::new(Vec::new()));
        let cancelled = spawn_call(&pool, &upstream, "cancelled", &log);
        eventually("the call waits", || pool.waiting_count(&key) == 1).await;
        cancelled.abort();
        assert!(cancelled.await.unwrap_err().is_cancelled());
        assert_eq!(pool.waiting_count(&key), 0);

        // Neither kept the only slot: once the held body ends, calls go through at once.
        upstream.close_idle.notify_one();
        while let Some(frame) = held.body_mut().frame().await {
            frame.unwrap();
        }
        for _ in 0..3 {
            let response = pool.send(&key, get(&upstream, "/a")).await.unwrap();
            assert_eq!(read_all(response).await, BODY);
        }
        assert_eq!(upstream.accepted(), 1);
        assert!(log.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn many_concurrent_calls_never_open_more_than_the_cap() {
        let upstream = Upstream::start(None).await;
        let pool = capped_pool(3, Duration::from_secs(5));
        let log = Arc::new(Mutex::new(Vec::new()));
        let calls: Vec<_> = (0..40)
            .map(|_| spawn_call(&pool, &upstream, "call", &log))
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), BODY);
        }
        assert_eq!(log.lock().unwrap().len(), 40);
        assert!(upstream.accepted() <= 3, "opened {}", upstream.accepted());
        // Uncapped, the same burst opens a connection per call in flight.
        let uncapped = plain_pool(Duration::from_secs(60));
        let before = upstream.accepted();
        let held: Vec<_> = held_calls(&uncapped, &upstream, 5).await;
        assert_eq!(upstream.accepted() - before, 5);
        drop(held);
    }

    /// `n` calls whose bodies are not read yet (each holds its connection).
    async fn held_calls(
        pool: &UpstreamPool,
        upstream: &Upstream,
        n: usize,
    ) -> Vec<Response<PooledBody>> {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(
                pool.send(&upstream.key(false), get(upstream, "/a"))
                    .await
                    .unwrap(),
            );
        }
        held
    }

    /// A key for an upstream the wait tests never reach: they hold its only slot themselves.
    fn unreached() -> (UpstreamKey, UpstreamRequest) {
        let key = UpstreamKey::new(false, "127.0.0.1:1".parse().unwrap());
        let request = Request::get("/")
            .header(http::header::HOST, "127.0.0.1:1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        (key, request)
    }

    fn take_slot(pool: &UpstreamPool, key: &UpstreamKey) {
        assert!(
            matches!(pool.shared.claim(key), Claim::Ready { slot: true, .. }),
            "a slot was free"
        );
    }

    fn queue(pool: &UpstreamPool, key: &UpstreamKey) -> oneshot::Receiver<Turn> {
        match pool.shared.claim(key) {
            Claim::Wait(turn) => turn,
            Claim::Ready { .. } => panic!("got a slot beyond the cap"),
        }
    }

    fn slots_in_use(pool: &UpstreamPool, key: &UpstreamKey) -> usize {
        pool.shared.lock().get(key).map_or(0, |s| s.in_use)
    }

    #[tokio::test]
    async fn freed_slots_go_to_the_waiters_in_arrival_order() {
        let pool = capped_pool(1, Duration::from_secs(10));
        let (key, _) = unreached();
        take_slot(&pool, &key);
        let mut first = queue(&pool, &key);
        let mut second = queue(&pool, &key);
        assert_eq!(pool.waiting_count(&key), 2);

        pool.shared.free_slot(&key);
        assert!(
            matches!(first.try_recv(), Ok(None)),
            "the first waiter's turn"
        );
        assert!(second.try_recv().is_err(), "not yet the second's");
        assert_eq!(slots_in_use(&pool, &key), 1, "the slot moved, not freed");
        pool.shared.free_slot(&key);
        assert!(matches!(second.try_recv(), Ok(None)));
        pool.shared.free_slot(&key);
        assert_eq!(slots_in_use(&pool, &key), 0);
        assert_eq!(pool.waiting_count(&key), 0);
        take_slot(&pool, &key);
    }

    #[tokio::test(start_paused = true)]
    async fn each_wait_fails_at_its_own_deadline() {
        let wait = Duration::from_secs(10);
        let pool = capped_pool(1, wait);
        let (key, _) = unreached();
        take_slot(&pool, &key);
        let start = tokio::time::Instant::now();
        let wait_from = |at: Duration| {
            let pool = pool.clone();
            let (key, request) = unreached();
            tokio::spawn(async move {
                tokio::time::sleep_until(start + at).await;
                let err = pool.send(&key, request).await.unwrap_err();
                assert!(
                    matches!(err, SendError::NoConnectionFree { cap: 1, waited } if waited == wait),
                    "{err}"
                );
                start.elapsed()
            })
        };
        let (early, late) = (wait_from(Duration::ZERO), wait_from(Duration::from_secs(3)));
        // Bounded: a timer that never fired would otherwise idle the paused clock forever.
        let (early, late) = tokio::time::timeout(Duration::from_secs(60), async {
            (early.await.unwrap(), late.await.unwrap())
        })
        .await
        .expect("the waits ended by their deadlines");
        // The pool's one timer wakes at the oldest deadline, then at the next (ms resolution).
        let slack = Duration::from_millis(5);
        assert!(early >= wait && early <= wait + slack, "{early:?}");
        let late_deadline = wait + Duration::from_secs(3);
        assert!(
            late >= late_deadline && late <= late_deadline + slack,
            "{late:?}"
        );
        assert_eq!(pool.waiting_count(&key), 0);
        assert!(pool.shared.lock()[&key].waiters.is_empty(), "swept");
        assert_eq!(slots_in_use(&pool, &key), 1, "only the slot held here");
    }

    #[tokio::test]
    async fn a_waiter_dropped_before_its_turn_holds_nothing() {
        let pool = capped_pool(1, Duration::from_secs(10));
        let (key, request) = unreached();
        take_slot(&pool, &key);
        let mut gone = Box::pin(pool.send(&key, request));
        assert!(futures::poll!(gone.as_mut()).is_pending());
        assert_eq!(pool.waiting_count(&key), 1);
        drop(gone);
        assert_eq!(pool.waiting_count(&key), 0);
        // Its place is skipped: the slot is freed, not handed to nobody.
        pool.shared.free_slot(&key);
        assert_eq!(slots_in_use(&pool, &key), 0);
        assert!(pool.shared.lock()[&key].waiters.is_empty());
        take_slot(&pool, &key);
    }

    #[tokio::test]
    async fn a_waiter_dropped_just_after_its_turn_came_passes_it_on() {
        let pool = capped_pool(1, Duration::from_secs(10));
        let (key, request) = unreached();
        take_slot(&pool, &key);
        let mut first = Box::pin(pool.send(&key, request));
        assert!(futures::poll!(first.as_mut()).is_pending());
        let mut second = queue(&pool, &key);
        // The first waiter's turn comes, and it gives up before it runs again.
        pool.shared.free_slot(&key);
        assert_eq!(pool.waiting_count(&key), 1);
        drop(first);
        assert!(matches!(second.try_recv(), Ok(None)), "passed on");
        assert_eq!(slots_in_use(&pool, &key), 1);
        pool.shared.free_slot(&key);
        assert_eq!(slots_in_use(&pool, &key), 0, "no slot lost on the way");
    }

    #[tokio::test]
    async fn a_finished_connection_goes_straight_to_the_oldest_waiter() {
        let mut upstream = Upstream::start(None).await;
        let pool = capped_pool(1, Duration::from_secs(5));
        let key = upstream.key(false);
        let mut held = pool.send(&key, get(&upstream, "/slow")).await.unwrap();
        upstream.next_request_conn().await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let waiter = spawn_call(&pool, &upstream, "waiter", &log);
        eventually("the call waits", || pool.waiting_count(&key) == 1).await;

        upstream.close_idle.notify_one();
        while let Some(frame) = held.body_mut().frame().await {
            frame.unwrap();
        }
        // Not via the idle stack (where a newcomer could take it): handed over with its slot.
        assert_eq!(pool.idle_count(&key), 0);
        assert_eq!(pool.waiting_count(&key), 0);
        assert_eq!(slots_in_use(&pool, &key), 1);
        assert_eq!(waiter.await.unwrap().unwrap(), BODY);
        assert_eq!(upstream.next_request_conn().await, 0, "the same connection");
        assert_eq!(pool.idle_count(&key), 1);
        assert_eq!(slots_in_use(&pool, &key), 0);
    }

    #[tokio::test]
    async fn unreachable_upstream_is_an_error_not_a_hang() {
        // Port 1 on loopback: nothing listens there.
        let key = UpstreamKey::new(false, "127.0.0.1:1".parse().unwrap());
        let pool = plain_pool(Duration::from_secs(60));
        let request = Request::get("/")
            .header(http::header::HOST, "127.0.0.1:1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let err = pool.send(&key, request).await.unwrap_err();
        assert!(matches!(err, SendError::Connect(_)), "{err}");
    }

    #[tokio::test]
    async fn tls_upstreams_are_pooled_and_need_a_trusted_ca() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(
            rustls::crypto::ring::default_provider().into(),
        )
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der()).into(),
        )
        .unwrap();
        let mut upstream =
            Upstream::start(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))).await;
        let key = upstream.key(true);

        let untrusting = plain_pool(Duration::from_secs(60));
        let err = untrusting
            .send(&key, get(&upstream, "/a"))
            .await
            .unwrap_err();
        assert!(matches!(err, SendError::Tls(_)), "{err}");

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let pool = UpstreamPool::new(tls_config(roots), settings(Duration::from_secs(60)));
        for _ in 0..3 {
            assert_eq!(
                read_all(pool.send(&key, get(&upstream, "/a")).await.unwrap()).await,
                BODY
            );
            upstream.next_request_conn().await;
        }
        // The refused handshake plus one pooled connection.
        assert_eq!(upstream.accepted(), 2);
    }
}
