//! The sidecar-facing HTTPS server (HTTP/2 over TLS): `POST /v1/watch` (or `GET`) streams
//! NDJSON [`WatchEvent`]s for the caller's scope, `POST /v1/ack` records applied revisions,
//! `POST /v1/audit` is handed to the audit ingest handler when one is mounted.
//!
//! On `POST /v1/watch` the sidecar sends its acks on the request body, `{"revision":N}` per
//! line, while the response streams: the stream's own authentication covers them. With
//! `GET /v1/watch`, acks travel as separate `POST /v1/ack` requests on the same HTTP/2
//! connection, naming the stream with the `keybrake-stream-id` header the watch response
//! carried; the stream and the ack must authenticate as the same service account.
use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use keybrake_api::{
    TokenHash,
    budget::BUDGET_PATH,
    stream::{
        ACK_PATH, AUDIT_INGEST_PATH, Ack, MAX_ACK_LINE_BYTES, NDJSON, RESUME_PARAM, WATCH_PATH,
        WatchEvent,
    },
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{AuthError, Authenticator, bearer_token, jwt_expiry},
    enforcement::{AckError, EnforcementTracker, StreamId},
    index::{Catchup, EncodedSnapshot, PolicyIndex, Scope, ScopeFeed},
    metrics::Metrics,
};

/// Response header naming the watch stream that acks refer to.
pub const STREAM_ID_HEADER: &str = "keybrake-stream-id";

pub type Body = BoxBody<Bytes, Infallible>;

/// A handler mounted on `POST /v1/audit`, called after the sidecar authenticated.
pub trait IngestHandler: Send + Sync + 'static {
    fn handle(
        &self,
        scope: Scope,
        request: Request<Incoming>,
    ) -> BoxFuture<'static, Response<Body>>;
}

pub struct StreamServer {
    pub index: Arc<PolicyIndex>,
    pub tracker: Arc<EnforcementTracker>,
    pub auth: Arc<Authenticator>,
    pub metrics: Metrics,
    pub heartbeat: Duration,
    /// Longest life of one watch stream (also capped by the token's `exp`): the sidecar then
    /// reconnects and is authenticated again.
    pub max_stream: Duration,
    /// True once the initial watch sync completed; streams wait for it before their snapshot.
    pub synced: tokio::sync::watch::Receiver<bool>,
    pub audit: Option<Arc<dyn IngestHandler>>,
    /// The token each open stream authenticated with (acks on it skip TokenReview).
    pub stream_tokens: StreamTokens,
    pub shutdown: CancellationToken,
}

/// The token hash and scope of every open stream. An ack that carries its stream's own token
/// is authenticated by the stream itself: the stream was reviewed at connect and ends at that
/// token's `exp`, and it keeps receiving keys on that review, so re-reviewing its acks adds
/// nothing but a TokenReview round trip on the propagation path whenever the cache expires.
#[derive(Default)]
pub struct StreamTokens(Mutex<HashMap<StreamId, (TokenHash, Scope)>>);

impl StreamTokens {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, (TokenHash, Scope)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(&self, id: StreamId, token: &TokenHash, scope: Scope) {
        self.lock().insert(id, (*token, scope));
    }

    pub fn close(&self, id: StreamId) {
        self.lock().remove(&id);
    }

    /// The stream's scope if `token` is the one stream `id` authenticated with.
    pub fn scope_for(&self, id: StreamId, token: &TokenHash) -> Option<Scope> {
        self.lock()
            .get(&id)
            .filter(|(hash, _)| hash == token)
            .map(|(_, scope)| scope.clone())
    }
}

fn stream_id_of(req: &Request<Incoming>) -> Option<StreamId> {
    req.headers()
        .get(STREAM_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(StreamId)
}

fn full(status: StatusCode, text: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(text.into()).boxed());
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn auth_failure(e: &AuthError) -> Response<Body> {
    match e {
        AuthError::Unavailable(_) => full(
            StatusCode::SERVICE_UNAVAILABLE,
            "token review unavailable\n",
        ),
        other => {
            let mut res = full(StatusCode::UNAUTHORIZED, format!("{other}\n"));
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            res
        }
    }
}

fn since_revision(query: Option<&str>) -> Result<u64, ()> {
    let Some(query) = query else { return Ok(0) };
    for pair in query.split('&') {
        if let Some(v) = pair
            .strip_prefix(RESUME_PARAM)
            .and_then(|r| r.strip_prefix('='))
        {
            return v.parse().map_err(|_| ());
        }
    }
    Ok(0)
}

/// Splits a duplex watch's request body into acknowledged revisions.
#[derive(Default)]
struct AckLines {
    partial: Vec<u8>,
}

impl AckLines {
    /// The revisions of every complete line in `data` (only the highest matters, but each is
    /// checked); an error for a line that is not `{"revision":N}` or too long.
    fn push(&mut self, data: &[u8]) -> Result<Vec<u64>, &'static str> {
        let mut revisions = Vec::new();
        let mut rest = data;
        while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
            let (line, tail) = rest.split_at(pos);
            rest = &tail[1..];
            let revision = if self.partial.is_empty() {
                parse_ack(line)?
            } else {
                self.partial.extend_from_slice(line);
                let whole = std::mem::take(&mut self.partial);
                parse_ack(&whole)?
            };
            revisions.extend(revision);
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX_ACK_LINE_BYTES {
            return Err("ack line too long");
        }
        Ok(revisions)
    }
}

/// `None` for a blank line.
fn parse_ack(line: &[u8]) -> Result<Option<u64>, &'static str> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if line.len() > MAX_ACK_LINE_BYTES {
        return Err("ack line too long");
    }
    serde_json::from_slice::<Ack>(line)
        .map(|a| Some(a.revision))
        .map_err(|_| "ack line is not {\"revision\":N}")
}

fn heartbeat_line(revision: u64) -> Bytes {
    let mut line = serde_json::to_vec(&WatchEvent::Heartbeat { revision }).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// One write to the stream: the lines joined (one copy) when there are several, so a burst goes
/// out as one frame; a single shared line as is.
fn join_lines(lines: Vec<Bytes>) -> Bytes {
    match <[Bytes; 1]>::try_from(lines) {
        Ok([line]) => line,
        Err(lines) => Bytes::from(lines.concat()),
    }
}

impl StreamServer {
    /// Accepts TLS connections until shutdown.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<()> {
        let acceptor = TlsAcceptor::from(tls);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => accepted?,
                () = self.shutdown.cancelled() => return Ok(()),
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let server = self.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Some(Duration::from_secs(10)))
                    .keep_alive_timeout(Duration::from_secs(20));
                let service = hyper::service::service_fn(move |req| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.route(req).await) }
                });
                if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
            });
        }
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        if ![WATCH_PATH, ACK_PATH, AUDIT_INGEST_PATH, BUDGET_PATH].contains(&path.as_str()) {
            return full(StatusCode::NOT_FOUND, "not found\n");
        }
        let authorization: Option<String> = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let authorization = authorization.as_deref();
        let token_hash = bearer_token(authorization).map(TokenHash::of);
        let stream_scope = match (&method, path.as_str(), &token_hash, stream_id_of(&req)) {
            (&Method::POST, ACK_PATH, Some(hash), Some(id)) => {
                self.stream_tokens.scope_for(id, hash)
            }
            _ => None,
        };
        let authenticated = match stream_scope {
            Some(scope) => Ok(scope),
            None => self.auth.authenticate(authorization).await,
        };
        let scope = match authenticated {
            Ok(scope) => scope,
            Err(e) => {
                tracing::info!(path, error = %e, "refused sidecar request");
                return auth_failure(&e);
            }
        };
        match (method, path.as_str()) {
            (Method::GET | Method::POST, WATCH_PATH) => match since_revision(req.uri().query()) {
                Ok(since) => {
                    let expiry = authorization
                        .and_then(|h| h.strip_prefix("Bearer "))
                        .and_then(|t| jwt_expiry(t.trim()));
                    let token_left = expiry.map(|exp| {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs();
                        Duration::from_secs(exp.saturating_sub(now))
                    });
                    let lifetime = token_left.map_or(self.max_stream, |t| t.min(self.max_stream));
                    // Authenticated, so a bearer token was present.
                    let token_hash = token_hash.unwrap_or_else(|| TokenHash::of(""));
                    // POST: the request body carries the acks (full duplex).
                    let acks = (req.method() == Method::POST).then(|| req.into_body());
                    self.clone()
                        .watch(scope, since, lifetime, token_hash, acks)
                        .await
                }
                Err(()) => full(
                    StatusCode::BAD_REQUEST,
                    "sinceRevision must be an integer\n",
                ),
            },
            (Method::POST, ACK_PATH) => self.ack(scope, req).await,
            (Method::POST, AUDIT_INGEST_PATH | BUDGET_PATH) => match &self.audit {
                Some(handler) => handler.handle(scope, req).await,
                None => full(StatusCode::NOT_IMPLEMENTED, "audit ingest is not enabled\n"),
            },
            _ => full(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        }
    }

    async fn watch(
        self: Arc<Self>,
        scope: Scope,
        since: u64,
        lifetime: Duration,
        token_hash: TokenHash,
        acks: Option<Incoming>,
    ) -> Response<Body> {
        let mut synced = self.synced.clone();
        let ready = tokio::time::timeout(Duration::from_secs(30), synced.wait_for(|s| *s)).await;
        if !matches!(ready, Ok(Ok(_))) {
            return full(
                StatusCode::SERVICE_UNAVAILABLE,
                "controller has not synced yet\n",
            );
        }
        self.index.ensure_revision_above(since);
        let (feed, mut subscription) = self.index.subscribe(&scope);
        subscription.borrow_and_update();
        let snapshot = feed.snapshot(since);
        let stream_id = self
            .tracker
            .register(scope.clone(), feed.clone(), snapshot.revision);
        self.stream_tokens
            .open(stream_id, &token_hash, scope.clone());
        self.metrics.streams_connected.inc();
        tracing::info!(%scope, stream = stream_id.0, revision = snapshot.revision, keys = snapshot.keys, lines = snapshot.lines.len(), "sidecar stream opened");

        let (tx, mut rx) = mpsc::channel::<Bytes>(64);
        let ended = CancellationToken::new();
        if let Some(acks) = acks {
            tokio::spawn(
                self.clone()
                    .read_acks(scope.clone(), stream_id, acks, ended.clone()),
            );
        }
        let server = self.clone();
        tokio::spawn(async move {
            server
                .pump(
                    &scope,
                    stream_id,
                    &feed,
                    snapshot,
                    &mut subscription,
                    tx,
                    lifetime,
                )
                .await;
            ended.cancel();
            server.tracker.unregister(stream_id);
            server.stream_tokens.close(stream_id);
            server.metrics.streams_connected.dec();
            tracing::info!(%scope, stream = stream_id.0, "sidecar stream closed");
        });
        let body = StreamBody::new(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
                .map(|o| o.map(|b| Ok::<_, Infallible>(Frame::data(b))))
        }));
        let mut res = Response::new(BodyExt::boxed(body));
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(NDJSON),
        );
        headers.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        headers.insert(STREAM_ID_HEADER, header::HeaderValue::from(stream_id.0));
        res
    }

    /// Sends the snapshot, then forwards every scope change as soon as it is published (no
    /// debounce, no batching timer) and a heartbeat when the stream has been quiet. The lines
    /// are the feed's, encoded once per change for every stream of the scope.
    #[allow(clippy::too_many_arguments)]
    async fn pump(
        &self,
        scope: &Scope,
        stream_id: StreamId,
        feed: &ScopeFeed,
        snapshot: Arc<EncodedSnapshot>,
        subscription: &mut tokio::sync::watch::Receiver<u64>,
        tx: mpsc::Sender<Bytes>,
        lifetime: Duration,
    ) {
        // The revision written on the stream so far, and where in the feed it stands.
        let mut revision = snapshot.revision;
        let mut cursor = snapshot.cursor;
        for line in &snapshot.lines {
            if tx.send(line.clone()).await.is_err() {
                return;
            }
        }
        drop(snapshot);
        let end_of_life = tokio::time::sleep(lifetime);
        tokio::pin!(end_of_life);
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + self.heartbeat, self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let lines: Vec<Bytes> = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return,
                () = tx.closed() => return,
                () = &mut end_of_life => {
                    tracing::debug!(%scope, "stream reached its lifetime; the sidecar reconnects");
                    return;
                }
                changed = subscription.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    subscription.borrow_and_update();
                    match feed.changes_after(cursor) {
                        Catchup::Changes { lines, cursor: next } => {
                            cursor = next;
                            if lines.is_empty() {
                                continue;
                            }
                            revision = revision.max(next);
                            lines
                        }
                        Catchup::Lagged => {
                            // Too far behind the change log: start over from a snapshot, which
                            // the sidecar applies as a replacement.
                            let snapshot = feed.snapshot(revision);
                            tracing::info!(%scope, stream = stream_id.0, revision = snapshot.revision, "stream behind the change log; resending the snapshot");
                            cursor = snapshot.cursor;
                            revision = snapshot.revision;
                            snapshot.lines.clone()
                        }
                    }
                }
                _ = heartbeat.tick() => vec![heartbeat_line(revision)],
            };
            // Recorded before the bytes leave, so an immediate ack is never "from the future".
            self.tracker.sent(stream_id, revision);
            heartbeat.reset();
            if tx.send(join_lines(lines)).await.is_err() {
                return;
            }
        }
    }

    /// Reads `{"revision":N}` lines from a duplex watch's request body until the body or the
    /// stream ends. A malformed line stops reading acks (the stream itself goes on).
    async fn read_acks(
        self: Arc<Self>,
        scope: Scope,
        stream_id: StreamId,
        mut body: Incoming,
        ended: CancellationToken,
    ) {
        let mut lines = AckLines::default();
        loop {
            let frame = tokio::select! {
                () = ended.cancelled() => return,
                frame = body.frame() => frame,
            };
            let data = match frame {
                None | Some(Err(_)) => return,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
            };
            let now = Instant::now();
            match lines.push(&data) {
                Ok(revisions) => {
                    for revision in revisions {
                        if let Err(e) = self.record_ack(stream_id, &scope, revision, now) {
                            tracing::warn!(%scope, stream = stream_id.0, revision, error = %e, "ack refused");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(%scope, stream = stream_id.0, error = e, "unreadable acks; ignoring the rest");
                    return;
                }
            }
        }
    }

    fn record_ack(
        &self,
        stream_id: StreamId,
        scope: &Scope,
        revision: u64,
        now: Instant,
    ) -> Result<(), AckError> {
        for a in self.tracker.ack(stream_id, scope, revision, now)? {
            self.metrics.propagation.observe(a.latency.as_secs_f64());
        }
        Ok(())
    }

    async fn ack(&self, scope: Scope, req: Request<Incoming>) -> Response<Body> {
        let Some(stream_id) = stream_id_of(&req) else {
            return full(
                StatusCode::BAD_REQUEST,
                "missing keybrake-stream-id header\n",
            );
        };
        let body = match Limited::new(req.into_body(), 1024).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return full(StatusCode::PAYLOAD_TOO_LARGE, "ack body too large\n"),
        };
        let Ok(ack) = serde_json::from_slice::<Ack>(&body) else {
            return full(StatusCode::BAD_REQUEST, "body must be {\"revision\":N}\n");
        };
        match self.record_ack(stream_id, &scope, ack.revision, Instant::now()) {
            Ok(()) => {
                let mut res = Response::new(Full::new(Bytes::new()).boxed());
                *res.status_mut() = StatusCode::NO_CONTENT;
                res
            }
            Err(e @ AckError::UnknownStream) => full(StatusCode::NOT_FOUND, format!("{e}\n")),
            Err(e @ AckError::WrongScope) => full(StatusCode::FORBIDDEN, format!("{e}\n")),
            Err(e @ AckError::FutureRevision(_)) => full(StatusCode::BAD_REQUEST, format!("{e}\n")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_parameter_parses() {
        assert_eq!(since_revision(None), Ok(0));
        assert_eq!(since_revision(Some("sinceRevision=42")), Ok(42));
        assert_eq!(since_revision(Some("a=1&sinceRevision=7")), Ok(7));
        assert_eq!(since_revision(Some("sinceRevision=x")), Err(()));
    }

    #[test]
    fn lines_are_newline_terminated_and_joined_per_write() {
        let out = join_lines(vec![heartbeat_line(1), heartbeat_line(2)]);
        assert_eq!(
            &out[..],
            b"{\"type\":\"heartbeat\",\"revision\":1}\n{\"type\":\"heartbeat\",\"revision\":2}\n"
        );
        let one = heartbeat_line(3);
        assert_eq!(join_lines(vec![one.clone()]).as_ptr(), one.as_ptr());
    }

    #[test]
    fn duplex_ack_lines_split_across_frames_and_are_bounded() {
        let mut lines = AckLines::default();
        assert_eq!(lines.push(b"{\"revision\":1}\n{\"rev").unwrap(), vec![1]);
        assert_eq!(
            lines.push(b"ision\":2}\n\n{\"revision\":3}\n").unwrap(),
            vec![2, 3]
        );
        assert!(lines.push(b"{\"revision\":\"x\"}\n").is_err());
        let mut lines = AckLines::default();
        assert!(lines.push(&[b' '; MAX_ACK_LINE_BYTES + 1]).is_err());
    }

    #[test]
    fn acks_skip_review_only_with_their_streams_own_token() {
        let tokens = StreamTokens::default();
        let scope = Scope::new("agents", "refund");
        let mine = TokenHash::of("tok-refund");
        tokens.open(StreamId(7), &mine, scope.clone());
        assert_eq!(tokens.scope_for(StreamId(7), &mine), Some(scope));
        assert_eq!(
            tokens.scope_for(StreamId(7), &TokenHash::of("rotated")),
            None
        );
        assert_eq!(tokens.scope_for(StreamId(8), &mine), None);
        tokens.close(StreamId(7));
        assert_eq!(tokens.scope_for(StreamId(7), &mine), None);
    }

    /// A scope far past the 1 MiB line bound reaches a real sidecar stream client through the
    /// real TLS/HTTP/2 server, is applied as one snapshot, and its duplex ack is counted.
    #[tokio::test]
    async fn a_scope_of_thousands_of_keys_streams_and_is_acknowledged() {
        use std::collections::BTreeMap;

        use keybrake_api::{
            AgentRef, KeyGrant, KeyId, KeyState, Limits, OnStale, SecretKeyRef, Upstream,
            VaultKeySpec, Vendor, WorkloadRef,
            stream::{MAX_LINE_BYTES, PolicyApply},
        };
        use keybrake_sidecar::stream_client::{StreamClient, StreamClientConfig};

        use crate::{
            auth::TokenReviewer, enforcement::EnforcementTracker, index::KeySource,
            tls::ServingIdentity,
        };

        struct Reviewer;
        impl TokenReviewer for Reviewer {
            fn review(&self, token: String) -> BoxFuture<'static, Result<Scope, AuthError>> {
                Box::pin(async move {
                    match token.as_str() {
                        "tok" => Ok(Scope::new("agents", "refund")),
                        _ => Err(AuthError::Rejected),
                    }
                })
            }
        }
        #[derive(Default)]
        struct Held(Mutex<(usize, u64, usize)>);
        impl PolicyApply for Held {
            fn replace_all(&self, keys: Vec<KeyGrant>, revision: u64) {
                let mut held = self.0.lock().unwrap();
                *held = (keys.len(), revision, held.2 + 1);
            }
            fn upsert(&self, _: KeyGrant, _: u64) {}
            fn remove(&self, _: &KeyId, _: u64) {}
            fn mark_fresh(&self, _: u64) {}
        }

        const KEYS: usize = 4_000;
        let index = Arc::new(PolicyIndex::new(1));
        let bytes = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.as_bytes().to_vec())]);
        index.upsert_secret("agents", "up", bytes("api-key", "sk_live_x"));
        let spec = |i: usize| VaultKeySpec {
            vendor: Vendor::Stripe,
            upstream: Upstream {
                secret_ref: SecretKeyRef {
                    name: "up".into(),
                    key: "api-key".into(),
                },
                base_url: Some("http://127.0.0.1:9".into()),
            },
            state: KeyState::Active,
            expires_at: None,
            ttl: None,
            agent: AgentRef {
                name: "refund-agent".into(),
                run_id: Some(format!("run-{i}")),
            },
            workload: WorkloadRef {
                service_account_name: "refund".into(),
            },
            allow: vec![],
            customers: vec![],
            limits: Limits::default(),
            on_stale: OnStale::Deny,
        };
        for i in 0..KEYS {
            let name = format!("key-{i:05}");
            index.upsert_secret(
                "agents",
                &keybrake_api::policy::token_secret_name(&name),
                bytes("VAULT_KEY", &format!("vault_key_{i}")),
            );
            index.upsert_vault_key(
                KeyId::new("agents", &name),
                KeySource {
                    spec: spec(i),
                    created: None,
                    generation: 1,
                },
            );
        }
        let scope = Scope::new("agents", "refund");
        let (feed, _rx) = index.subscribe(&scope);
        let snapshot = feed.snapshot(0);
        let bytes_total: usize = snapshot.lines.iter().map(Bytes::len).sum();
        assert!(
            bytes_total > MAX_LINE_BYTES,
            "{bytes_total} bytes fit one line"
        );

        let tracker = Arc::new(EnforcementTracker::new());
        let identity = ServingIdentity::generate(&["127.0.0.1".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, identity.generated_ca_pem.as_ref().unwrap()).unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let server = Arc::new(StreamServer {
            index: index.clone(),
            tracker: tracker.clone(),
            auth: Arc::new(Authenticator::new(Arc::new(Reviewer))),
            metrics: Metrics::new(),
            heartbeat: Duration::from_secs(5),
            max_stream: Duration::from_secs(3600),
            synced: tokio::sync::watch::channel(true).1,
            audit: None,
            stream_tokens: StreamTokens::default(),
            shutdown: shutdown.clone(),
        });
        tokio::spawn(server.serve(listener, identity.server_config().unwrap()));
        let held = Arc::new(Held::default());
        let mut config = StreamClientConfig::new(&url, &token);
        config.ca_file = Some(ca);
        let client = StreamClient::new(config, held.clone()).unwrap();
        let stop = shutdown.clone();
        tokio::spawn(client.run(async move { stop.cancelled().await }));

        let some_key = KeyId::new("agents", "key-00042");
        let revision = index.published(&some_key).unwrap().1;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let view = tracker.view(&some_key, &scope, snapshot.revision);
            if view.sidecars == 1 && view.acknowledged == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no ack of the snapshot: {view:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(revision <= snapshot.revision);
        let (keys, applied_revision, snapshots) = *held.0.lock().unwrap();
        assert_eq!(
            (keys, applied_revision, snapshots),
            (KEYS, snapshot.revision, 1)
        );
        shutdown.cancel();
    }
}
