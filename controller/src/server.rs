//! The sidecar-facing HTTPS server (HTTP/2 over TLS): `GET /v1/watch` streams NDJSON
//! [`WatchEvent`]s for the caller's scope, `POST /v1/ack` records applied revisions,
//! `POST /v1/audit` is handed to the audit ingest handler when one is mounted.
//!
//! Acks travel as separate `POST /v1/ack` requests on the same HTTP/2 connection, naming the
//! stream with the `keybrake-stream-id` header the watch response carried, body
//! `{"revision":N}`. The stream and the ack must authenticate as the same service account.
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
        ACK_PATH, AUDIT_INGEST_PATH, Ack, MAX_LINE_BYTES, NDJSON, RESUME_PARAM, WATCH_PATH,
        WatchEvent,
    },
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{AuthError, Authenticator, bearer_token, jwt_expiry},
    enforcement::{AckError, EnforcementTracker, StreamId},
    index::{PolicyIndex, Scope, ScopeState, diff},
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

/// Serializes events as NDJSON lines; `None` if one would exceed the line bound.
fn encode_lines(events: &[WatchEvent]) -> Option<Bytes> {
    let mut out = Vec::new();
    for event in events {
        let line = serde_json::to_vec(event).ok()?;
        if line.len() >= MAX_LINE_BYTES {
            return None;
        }
        out.extend_from_slice(&line);
        out.push(b'\n');
    }
    Some(Bytes::from(out))
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
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
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
            (Method::GET, WATCH_PATH) => match since_revision(req.uri().query()) {
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
                    self.clone().watch(scope, since, lifetime, token_hash).await
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
        let mut subscription = self.index.subscribe(&scope);
        let current = subscription.borrow_and_update().clone();
        let snapshot_revision = current.revision.max(since);
        let sent = Arc::new(ScopeState {
            revision: snapshot_revision,
            keys: current.keys.clone(),
        });
        let Some(first) = encode_lines(&[current.snapshot_event(since)]) else {
            tracing::error!(%scope, "snapshot exceeds the line bound; refusing the stream");
            return full(StatusCode::INTERNAL_SERVER_ERROR, "snapshot too large\n");
        };
        let stream_id = self.tracker.register(scope.clone(), sent.clone());
        self.stream_tokens
            .open(stream_id, &token_hash, scope.clone());
        self.metrics.streams_connected.inc();
        tracing::info!(%scope, stream = stream_id.0, revision = snapshot_revision, keys = sent.keys.len(), "sidecar stream opened");

        let (tx, mut rx) = mpsc::channel::<Bytes>(64);
        // Capacity 64 and an empty channel: the snapshot always fits.
        let _ = tx.try_send(first);
        let server = self.clone();
        tokio::spawn(async move {
            server
                .pump(
                    scope.clone(),
                    stream_id,
                    sent,
                    &mut subscription,
                    tx,
                    lifetime,
                )
                .await;
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

    /// Forwards every scope change as soon as it is published (no debounce, no batching timer)
    /// and a heartbeat when the stream has been quiet.
    async fn pump(
        &self,
        scope: Scope,
        stream_id: StreamId,
        mut sent: Arc<ScopeState>,
        subscription: &mut tokio::sync::watch::Receiver<Arc<ScopeState>>,
        tx: mpsc::Sender<Bytes>,
        lifetime: Duration,
    ) {
        let end_of_life = tokio::time::sleep(lifetime);
        tokio::pin!(end_of_life);
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + self.heartbeat, self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let chunk = tokio::select! {
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
                    let next = subscription.borrow_and_update().clone();
                    let events = diff(&sent, &next);
                    if events.is_empty() {
                        continue;
                    }
                    let next = Arc::new(ScopeState {
                        revision: next.revision.max(sent.revision),
                        keys: next.keys.clone(),
                    });
                    let Some(chunk) = encode_lines(&events) else {
                        tracing::error!(%scope, "event exceeds the line bound; closing the stream");
                        return;
                    };
                    // Recorded before the bytes leave, so an immediate ack is never "from the future".
                    self.tracker.sent(stream_id, next.clone());
                    sent = next;
                    heartbeat.reset();
                    chunk
                }
                _ = heartbeat.tick() => {
                    match encode_lines(&[WatchEvent::Heartbeat { revision: sent.revision }]) {
                        Some(chunk) => chunk,
                        None => return,
                    }
                }
            };
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
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
        match self
            .tracker
            .ack(stream_id, &scope, ack.revision, Instant::now())
        {
            Ok(acknowledged) => {
                for a in acknowledged {
                    self.metrics.propagation.observe(a.latency.as_secs_f64());
                }
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
    fn lines_are_newline_terminated_and_bounded() {
        let out = encode_lines(&[
            WatchEvent::Heartbeat { revision: 1 },
            WatchEvent::Heartbeat { revision: 2 },
        ])
        .unwrap();
        assert_eq!(
            &out[..],
            b"{\"type\":\"heartbeat\",\"revision\":1}\n{\"type\":\"heartbeat\",\"revision\":2}\n"
        );
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
}
