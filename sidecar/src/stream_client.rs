//! Controller stream client: `POST /v1/watch` over HTTP/2 + TLS with the pod's projected
//! ServiceAccount token (audience `keybrake`), NDJSON [`WatchEvent`]s decoded with a bounded
//! line length and applied to the policy store. The same HTTP/2 stream is full duplex: each
//! applied revision is acknowledged with a `{"revision":N}` line on the request body (no request
//! per ack). Reconnects with jittered exponential backoff, resuming with
//! `sinceRevision=<last applied>`; the controller answers with a fresh snapshot whose revision is
//! never below it.
//!
//! A snapshot larger than one line arrives as `snapshotPart` lines closed by the `snapshot`
//! line; the parts are gathered and the whole applied (and acknowledged) as one replacement
//! when the closing line arrives.
//!
//! Fail closed: an undecodable or oversized line ends the session without applying it; the
//! store keeps the last policy and its staleness clock (restarted only by received events)
//! decides when `onStale` applies.
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use keybrake_api::{
    KeyGrant,
    stream::{Ack, MAX_LINE_BYTES, NDJSON, PolicyApply, RESUME_PARAM, WATCH_PATH, WatchEvent},
};
use rand::Rng;
use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone)]
pub struct StreamClientConfig {
    /// Controller base URL, e.g. `https://keybrake-controller.keybrake-system.svc:8443`.
    pub controller_url: String,
    /// Projected ServiceAccount token file; re-read on every connect (the kubelet rotates it).
    pub token_file: PathBuf,
    /// PEM CA bundle that signed the controller's certificate; platform roots when `None`.
    pub ca_file: Option<PathBuf>,
    /// First reconnect delay ceiling; doubles per failed attempt up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Reconnect when nothing (not even a heartbeat) arrived for this long.
    pub idle_timeout: Duration,
    /// Limit for connecting and receiving the response headers.
    pub connect_timeout: Duration,
}

impl StreamClientConfig {
    pub fn new(controller_url: impl Into<String>, token_file: impl Into<PathBuf>) -> Self {
        StreamClientConfig {
            controller_url: controller_url.into(),
            token_file: token_file.into(),
            ca_file: None,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamClientError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("connecting to the controller: {0}")]
    Connect(String),
    #[error("controller answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("timed out")]
    Timeout,
    #[error("stream protocol error: {0}")]
    Protocol(String),
    #[error("stream ended by the controller")]
    Ended,
}

/// What the client currently knows, for readiness and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientState {
    pub connected: bool,
    /// Last applied (and acknowledged) revision; 0 before the first snapshot.
    pub revision: u64,
}

/// Splits a byte stream into lines, refusing any line of `max` bytes or more.
#[derive(Debug)]
pub struct LineDecoder {
    buf: BytesMut,
    max: usize,
}

impl LineDecoder {
    pub fn new(max: usize) -> Self {
        LineDecoder {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Appends `chunk` and returns every complete line (without the newline).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Bytes>, StreamClientError> {
        self.buf.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            if pos >= self.max {
                return Err(StreamClientError::Protocol(format!(
                    "line of {pos} bytes exceeds the {} byte bound",
                    self.max
                )));
            }
            let line = self.buf.split_to(pos).freeze();
            self.buf.advance(1);
            if !line.iter().all(u8::is_ascii_whitespace) {
                lines.push(line);
            }
        }
        if self.buf.len() >= self.max {
            return Err(StreamClientError::Protocol(format!(
                "unterminated line exceeds the {} byte bound",
                self.max
            )));
        }
        Ok(lines)
    }
}

/// Gathers `snapshotPart` lines into the closing `snapshot`.
#[derive(Debug, Default)]
pub struct SnapshotAssembler {
    /// Revision and keys of the parts received so far.
    pending: Option<(u64, Vec<KeyGrant>)>,
}

impl SnapshotAssembler {
    /// `Ok(None)` while a snapshot is being gathered; otherwise the event to apply (a closing
    /// snapshot carries every part's keys). Parts of another revision, or anything but parts
    /// and the closing line in between, are a protocol error.
    pub fn push(&mut self, event: WatchEvent) -> Result<Option<WatchEvent>, StreamClientError> {
        let mismatch = |what: &str| {
            StreamClientError::Protocol(format!("{what} inside a snapshot that was being sent"))
        };
        match (event, self.pending.take()) {
            (WatchEvent::SnapshotPart { revision, keys }, None) => {
                self.pending = Some((revision, keys));
                Ok(None)
            }
            (WatchEvent::SnapshotPart { revision, keys }, Some((at, mut gathered))) => {
                if revision != at {
                    return Err(mismatch("a part of another revision"));
                }
                gathered.extend(keys);
                self.pending = Some((at, gathered));
                Ok(None)
            }
            (WatchEvent::Snapshot { revision, keys }, Some((at, mut gathered))) => {
                if revision != at {
                    return Err(mismatch("a closing line of another revision"));
                }
                gathered.extend(keys);
                Ok(Some(WatchEvent::Snapshot {
                    revision,
                    keys: gathered,
                }))
            }
            (event, None) => Ok(Some(event)),
            (_, Some(_)) => Err(mismatch("an update")),
        }
    }
}

/// Exponential backoff with full jitter: attempt n waits a uniform delay in
/// `[0, min(max, initial × 2^n)]`, so a fleet of sidecars does not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The ceiling for the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, BoxBody<Bytes, Infallible>>;

pub struct StreamClient {
    config: StreamClientConfig,
    store: Arc<dyn PolicyApply>,
    http: HttpsClient,
    state: watch::Sender<ClientState>,
}

pub(crate) fn tls_config(
    ca_file: Option<&PathBuf>,
) -> Result<rustls::ClientConfig, StreamClientError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| StreamClientError::Read {
                path: path.display().to_string(),
                source,
            })?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| StreamClientError::Tls(e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| StreamClientError::Tls(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(StreamClientError::Tls(format!(
                    "{} holds no certificate",
                    path.display()
                )));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| StreamClientError::Tls(e.to_string()))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// The HTTP/2-over-TLS client every sidecar → controller channel uses (watch stream, budget
/// leases): the controller's CA, TCP_NODELAY, keep-alive pings.
pub(crate) fn controller_client<B>(
    config: &StreamClientConfig,
) -> Result<Client<hyper_rustls::HttpsConnector<HttpConnector>, B>, StreamClientError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = tls_config(config.ca_file.as_ref())?;
    let mut connector = HttpConnector::new();
    connector.enforce_http(false);
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .wrap_connector(connector);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_only(true)
        .http2_keep_alive_interval(Some(Duration::from_secs(10)))
        .http2_keep_alive_timeout(Duration::from_secs(20))
        .build(https))
}

impl StreamClient {
    pub fn new(
        config: StreamClientConfig,
        store: Arc<dyn PolicyApply>,
    ) -> Result<Self, StreamClientError> {
        let http = controller_client(&config)?;
        Ok(StreamClient {
            config,
            store,
            http,
            state: watch::Sender::new(ClientState::default()),
        })
    }

    /// Connection state and last applied revision.
    pub fn state(&self) -> watch::Receiver<ClientState> {
        self.state.subscribe()
    }

    /// Runs sessions until `shutdown` resolves, reconnecting with jittered backoff.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        loop {
            let outcome = tokio::select! {
                () = &mut shutdown => return,
                outcome = self.session() => outcome,
            };
            self.state.send_modify(|s| s.connected = false);
            let (received, error) = outcome;
            if received {
                // The last session worked: come back quickly.
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "policy stream interrupted");
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn read_token(&self) -> Result<String, StreamClientError> {
        let token = std::fs::read_to_string(&self.config.token_file).map_err(|source| {
            StreamClientError::Read {
                path: self.config.token_file.display().to_string(),
                source,
            }
        })?;
        Ok(token.trim().to_owned())
    }

    /// One connection. Returns whether a snapshot was applied, and why it ended.
    pub async fn session(&self) -> (bool, StreamClientError) {
        let mut applied_snapshot = false;
        let error = match self.session_inner(&mut applied_snapshot).await {
            Ok(()) => StreamClientError::Ended,
            Err(e) => e,
        };
        (applied_snapshot, error)
    }

    async fn session_inner(&self, applied_snapshot: &mut bool) -> Result<(), StreamClientError> {
        let token = self.read_token()?;
        let base = self.config.controller_url.trim_end_matches('/');
        let since = self.state.borrow().revision;
        // The request body stays open for the session: it carries the acks.
        let (ack_sink, ack_lines) = mpsc::channel::<Bytes>(8);
        let ack_body = AckBody(ack_lines);
        let request = Request::post(format!("{base}{WATCH_PATH}?{RESUME_PARAM}={since}"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::ACCEPT, NDJSON)
            .header(header::CONTENT_TYPE, NDJSON)
            .body(BodyExt::boxed(ack_body))
            .map_err(|e| StreamClientError::Connect(e.to_string()))?;
        let response =
            tokio::time::timeout(self.config.connect_timeout, self.http.request(request))
                .await
                .map_err(|_| StreamClientError::Timeout)?
                .map_err(|e| StreamClientError::Connect(format!("{e:?}")))?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            let body = tokio::time::timeout(
                Duration::from_secs(2),
                http_body_util::Limited::new(response.into_body(), 4096).collect(),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
            return Err(StreamClientError::Status { status, body });
        }
        let (ack_tx, ack_task) = spawn_acker(ack_sink);
        let result = self
            .read_events(response.into_body(), &ack_tx, applied_snapshot)
            .await;
        ack_task.abort();
        result
    }

    async fn read_events(
        &self,
        mut body: hyper::body::Incoming,
        ack: &watch::Sender<u64>,
        applied_snapshot: &mut bool,
    ) -> Result<(), StreamClientError> {
        let mut decoder = LineDecoder::new(MAX_LINE_BYTES);
        let mut snapshot = SnapshotAssembler::default();
        loop {
            let frame = match tokio::time::timeout(self.config.idle_timeout, body.frame()).await {
                Err(_) => return Err(StreamClientError::Timeout),
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => return Err(StreamClientError::Connect(e.to_string())),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for line in decoder.push(&data)? {
                let event: WatchEvent = serde_json::from_slice(&line)
                    .map_err(|e| StreamClientError::Protocol(format!("undecodable event: {e}")))?;
                let Some(event) = snapshot.push(event)? else {
                    continue;
                };
                let is_snapshot = matches!(event, WatchEvent::Snapshot { .. });
                if !*applied_snapshot && !is_snapshot {
                    return Err(StreamClientError::Protocol(
                        "first event was not a snapshot".into(),
                    ));
                }
                let is_heartbeat = matches!(event, WatchEvent::Heartbeat { .. });
                let started = Instant::now();
                let revision = self.store.apply(event);
                if is_snapshot {
                    *applied_snapshot = true;
                    tracing::info!(revision, "policy snapshot applied");
                } else if !is_heartbeat {
                    tracing::debug!(
                        revision,
                        took_us = started.elapsed().as_micros() as u64,
                        "policy update applied"
                    );
                }
                self.state.send_modify(|s| {
                    s.connected = true;
                    s.revision = revision;
                });
                if !is_heartbeat || *ack.borrow() < revision {
                    ack.send_replace(revision);
                }
            }
        }
    }
}

/// A duplex watch's request body: the ack lines, for as long as the session lasts.
struct AckBody(mpsc::Receiver<Bytes>);

impl http_body::Body for AckBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

/// Acks run beside the reader so a slow ack never delays applying the next event; only the
/// latest revision matters, so a watch channel coalesces them into the request body.
fn spawn_acker(sink: mpsc::Sender<Bytes>) -> (watch::Sender<u64>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = watch::channel(0u64);
    let task = tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let revision = *rx.borrow_and_update();
            if sink.send(ack_line(revision)).await.is_err() {
                tracing::warn!(revision, "the controller stopped reading acks");
                return;
            }
        }
    });
    (tx, task)
}

fn ack_line(revision: u64) -> Bytes {
    let mut line = serde_json::to_vec(&Ack { revision }).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_splits_across_chunks_and_bounds_lines() {
        let mut d = LineDecoder::new(16);
        assert!(d.push(b"{\"a\":").unwrap().is_empty());
        let lines = d.push(b"1}\n\n{\"b\":2}\n{\"c").unwrap();
        assert_eq!(
            lines,
            vec![
                Bytes::from_static(b"{\"a\":1}"),
                Bytes::from_static(b"{\"b\":2}")
            ]
        );
        assert_eq!(
            d.push(b"\":3}\n").unwrap(),
            vec![Bytes::from_static(b"{\"c\":3}")]
        );
        assert!(d.push(&[b'x'; 15]).is_ok());
        assert!(matches!(d.push(b"x"), Err(StreamClientError::Protocol(_))));
        let mut d = LineDecoder::new(4);
        assert!(matches!(
            d.push(b"12345\n"),
            Err(StreamClientError::Protocol(_))
        ));
    }

    fn grant(name: &str) -> KeyGrant {
        serde_json::from_value(serde_json::json!({
            "id": format!("agents/{name}"),
            "tokenSha256": "0".repeat(64),
            "vendor": "stripe",
            "baseUrl": "http://127.0.0.1:9",
            "upstreamSecret": "sk_test",
            "state": "Active",
            "agent": {"name": "a"},
        }))
        .expect("a grant")
    }

    #[test]
    fn snapshot_parts_are_applied_as_one_snapshot() {
        let mut a = SnapshotAssembler::default();
        let heartbeat = WatchEvent::Heartbeat { revision: 3 };
        assert_eq!(a.push(heartbeat.clone()).unwrap(), Some(heartbeat));
        for name in ["k1", "k2"] {
            let part = WatchEvent::SnapshotPart {
                revision: 9,
                keys: vec![grant(name)],
            };
            assert_eq!(a.push(part).unwrap(), None);
        }
        let closing = WatchEvent::Snapshot {
            revision: 9,
            keys: vec![grant("k3")],
        };
        match a.push(closing).unwrap() {
            Some(WatchEvent::Snapshot { revision: 9, keys }) => {
                let names: Vec<&str> = keys.iter().map(|k| k.id.name()).collect();
                assert_eq!(names, ["k1", "k2", "k3"]);
            }
            other => panic!("{other:?}"),
        }
        // Anything else inside a snapshot is a protocol error (fail closed, reconnect).
        let part = |revision| WatchEvent::SnapshotPart {
            revision,
            keys: vec![],
        };
        let mut a = SnapshotAssembler::default();
        a.push(part(9)).unwrap();
        assert!(a.push(WatchEvent::Heartbeat { revision: 9 }).is_err());
        let mut a = SnapshotAssembler::default();
        a.push(part(9)).unwrap();
        assert!(a.push(part(10)).is_err());
    }

    #[test]
    fn backoff_grows_caps_jitters_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            let ceiling = b.ceiling();
            let delay = b.next_delay();
            assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        // Jitter: 50 draws from [0, 1s] are not all equal.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let draws: std::collections::HashSet<Duration> = (0..50).map(|_| b.next_delay()).collect();
        assert!(draws.len() > 1);
    }
}
