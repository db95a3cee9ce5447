//! The hyper floor: the cheapest correct hyper-based HTTP/1.1 reverse proxy for the one route
//! the data-plane benchmark calls. It does exactly what the nginx baseline does (strip
//! `/stripe`, replace `Authorization`, relay the response) and nothing the sidecar does on top
//! (no policy lookup, no metering, no pool, no timers, no audit), so sidecar ÷ relay is the
//! sidecar's own work and relay ÷ nginx is what hyper + tokio cost.
//!
//! Shape: one task per client connection (hyper's http1 server, keep-alive); each client
//! connection gets one dedicated upstream connection (hyper's http1 client), opened on its
//! first request and driven by a task of its own, as hyper's client docs do it.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::{
    Request, Response, StatusCode, Uri,
    body::Incoming,
    client::conn::http1::SendRequest,
    header::{self, HeaderValue},
    http::uri::PathAndQuery,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// The prefix the relay serves; anything else is 404.
pub const ROUTE_PREFIX: &str = "/stripe/";

/// The body a client gets: the upstream's, streamed, or nothing (404, 502).
pub type RelayBody = Either<Incoming, Empty<Bytes>>;

#[derive(Clone)]
pub struct Relay {
    upstream: SocketAddr,
    authorization: HeaderValue,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the upstream credential is not a valid header value")]
    InvalidCredential,
}

impl Relay {
    /// `upstream_secret` goes upstream as `Authorization: Bearer <secret>`.
    pub fn new(upstream: SocketAddr, upstream_secret: &str) -> Result<Self, RelayError> {
        let mut authorization =
            HeaderValue::from_maybe_shared(Bytes::from(format!("Bearer {upstream_secret}")))
                .map_err(|_| RelayError::InvalidCredential)?;
        authorization.set_sensitive(true);
        Ok(Relay {
            upstream,
            authorization,
        })
    }
}

/// `/stripe/<rest>?q` -> `/<rest>?q`; `None` outside the prefix.
pub fn upstream_path(uri: &Uri) -> Option<PathAndQuery> {
    let path_and_query = uri.path_and_query()?.as_str();
    let rest = path_and_query.strip_prefix(ROUTE_PREFIX)?;
    // Keep the slash that ends the prefix: "/stripe/v1/x" -> "/v1/x".
    let kept = &path_and_query[path_and_query.len() - rest.len() - 1..];
    PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(kept.as_bytes())).ok()
}

/// Accepts connections until the listener fails, one task per connection.
pub async fn serve(listener: TcpListener, relay: Relay) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(serve_connection(stream, relay.clone()));
    }
}

async fn serve_connection(stream: TcpStream, relay: Relay) {
    // The upstream sender of this client connection; hyper's http1 server calls the service
    // for one request at a time, so the lock is never contended.
    let sender: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
    let service = service_fn(move |request| forward(relay.clone(), sender.clone(), request));
    // A client hanging up is normal under load; nothing to report.
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn forward(
    relay: Relay,
    slot: Arc<Mutex<Option<SendRequest<Incoming>>>>,
    mut request: Request<Incoming>,
) -> Result<Response<RelayBody>, Infallible> {
    let Some(path) = upstream_path(request.uri()) else {
        return Ok(empty(StatusCode::NOT_FOUND));
    };
    *request.uri_mut() = Uri::from(path);
    request
        .headers_mut()
        .insert(header::AUTHORIZATION, relay.authorization.clone());
    let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    let mut sender = match taken {
        Some(sender) if !sender.is_closed() => sender,
        _ => match connect(relay.upstream).await {
            Some(sender) => sender,
            None => return Ok(empty(StatusCode::BAD_GATEWAY)),
        },
    };
    if sender.ready().await.is_err() {
        return Ok(empty(StatusCode::BAD_GATEWAY));
    }
    let response = sender.send_request(request);
    // The next request on this client connection waits for `ready`, i.e. for this response's
    // body to be read to the end; a closed sender is dropped then and a new one opened.
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
    match response.await {
        Ok(response) => Ok(response.map(Either::Left)),
        Err(_) => Ok(empty(StatusCode::BAD_GATEWAY)),
    }
}

/// A new upstream connection, its task spawned; `None` if it cannot be opened.
async fn connect(upstream: SocketAddr) -> Option<SendRequest<Incoming>> {
    let stream = TcpStream::connect(upstream).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(async move {
        // The upstream closing is seen by the next request (`is_closed`, `ready`).
        let _ = connection.await;
    });
    Some(sender)
}

fn empty(status: StatusCode) -> Response<RelayBody> {
    let mut response = Response::new(Either::Right(Empty::new()));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, Full};

    #[test]
    fn strips_the_prefix_and_keeps_the_query() {
        let path = |uri: &str| upstream_path(&uri.parse().unwrap()).map(|p| p.to_string());
        assert_eq!(
            path("/stripe/v1/customers/cus_1?expand=x").as_deref(),
            Some("/v1/customers/cus_1?expand=x")
        );
        assert_eq!(path("/stripe/").as_deref(), Some("/"));
        assert_eq!(path("/stripe"), None);
        assert_eq!(path("/openai/v1/x"), None);
    }

    /// An upstream that answers with what it received (path, Authorization) in headers and a
    /// body big enough to arrive in many chunks.
    async fn echo_upstream(body: Bytes) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let body = body.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    let seen_auth = request.headers().get(header::AUTHORIZATION).cloned();
                    let response = Response::builder()
                        .header("x-seen-path", request.uri().to_string())
                        .header(
                            "x-seen-authorization",
                            seen_auth.unwrap_or(HeaderValue::from_static("none")),
                        )
                        .body(Full::new(body.clone()))
                        .unwrap();
                    async move { Ok::<_, Infallible>(response) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    async fn start_relay(upstream: SocketAddr) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = Relay::new(upstream, "sk_test_upstream").unwrap();
        tokio::spawn(serve(listener, relay));
        addr
    }

    async fn client(relay: SocketAddr) -> SendRequest<Empty<Bytes>> {
        let stream = TcpStream::connect(relay).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        sender
    }

    fn get(path: &str) -> Request<Empty<Bytes>> {
        Request::get(path)
            .header(header::AUTHORIZATION, "Bearer vault_key_client")
            .body(Empty::new())
            .unwrap()
    }

    #[tokio::test]
    async fn swaps_the_credential_and_relays_the_body_over_keep_alive() {
        let body = Bytes::from((0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let relay = start_relay(echo_upstream(body.clone()).await).await;
        let mut sender = client(relay).await;
        // Two calls on one client connection: the second reuses its upstream connection.
        for path in ["/v1/customers/cus_1", "/v1/charges?limit=3"] {
            sender.ready().await.unwrap();
            let response = sender
                .send_request(get(&format!("/stripe{path}")))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()["x-seen-path"], path);
            assert_eq!(
                response.headers()["x-seen-authorization"],
                "Bearer sk_test_upstream"
            );
            let got = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(got.len(), body.len());
            assert!(got == body, "relayed body differs from the upstream's");
        }
    }

    #[tokio::test]
    async fn answers_404_off_the_route_and_502_without_an_upstream() {
        // A port nothing listens on: bound, then released.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let relay = start_relay(closed).await;
        let mut sender = client(relay).await;
        let response = sender.send_request(get("/openai/v1/x")).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        sender.ready().await.unwrap();
        let response = sender.send_request(get("/stripe/v1/x")).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    }
}
