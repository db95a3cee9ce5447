//! Fake vendor APIs that speak each vendor's wire format closely enough for the official SDKs:
//! OpenAI (chat completions with SSE streaming, responses, embeddings, models), Twilio
//! (messages), Resend (emails, batch) and Stripe (charges, refunds, customers, payment intents;
//! prefer Stripe's own stripe-mock where it builds). Each fake checks the upstream secret the
//! way the vendor does, answers in the vendor's envelope, and records every request it received
//! so tests can prove what did (and did not) reach it. Loopback only.
#![forbid(unsafe_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeKind {
    Stripe,
    Openai,
    Twilio,
    Resend,
}

impl FakeKind {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "stripe" => Some(FakeKind::Stripe),
            "openai" => Some(FakeKind::Openai),
            "twilio" => Some(FakeKind::Twilio),
            "resend" => Some(FakeKind::Resend),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FakeKind::Stripe => "stripe",
            FakeKind::Openai => "openai",
            FakeKind::Twilio => "twilio",
            FakeKind::Resend => "resend",
        }
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path and query, exactly as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl RecordedRequest {
    /// Every header value and the body as one string, to search for leaked secrets.
    pub fn everything(&self) -> String {
        let mut out = format!("{} {}\n", self.method, self.target);
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        out.push_str(&String::from_utf8_lossy(&self.body));
        out
    }
}

/// Header every fake response carries, so a test can tell which upstream answered.
pub const FAKE_VENDOR_HEADER: &str = "x-fake-vendor";

struct State {
    kind: FakeKind,
    /// The upstream secret the fake accepts (Twilio: `ACCOUNT_SID:AUTH_TOKEN`).
    secret: String,
    requests: Mutex<Vec<RecordedRequest>>,
    /// While false, streaming responses stop after their first event.
    streams_open: watch::Sender<bool>,
    ids: AtomicU64,
}

pub struct FakeVendor {
    addr: SocketAddr,
    tls: bool,
    state: Arc<State>,
    shutdown: watch::Sender<bool>,
}

impl FakeVendor {
    /// Starts a fake on `127.0.0.1:0`.
    pub async fn start(kind: FakeKind, secret: &str) -> std::io::Result<FakeVendor> {
        Self::start_on(kind, secret, "127.0.0.1:0".parse().expect("valid address")).await
    }

    pub async fn start_on(
        kind: FakeKind,
        secret: &str,
        addr: SocketAddr,
    ) -> std::io::Result<FakeVendor> {
        Self::start_inner(kind, secret, addr, None).await
    }

    /// Starts a fake that serves HTTPS with the given PEM certificate chain and private key
    /// (for testing the sidecar's TLS client and its extra-CA option).
    pub async fn start_tls(
        kind: FakeKind,
        secret: &str,
        cert_chain_pem: &str,
        key_pem: &str,
    ) -> std::io::Result<FakeVendor> {
        let invalid = |e: &dyn std::fmt::Display| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
        };
        let certs =
            rustls_pemfile::certs(&mut cert_chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())?
            .ok_or_else(|| invalid(&"no private key in PEM"))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(&e))?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::start_inner(
            kind,
            secret,
            "127.0.0.1:0".parse().expect("valid address"),
            Some(acceptor),
        )
        .await
    }

    async fn start_inner(
        kind: FakeKind,
        secret: &str,
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<FakeVendor> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let is_tls = tls.is_some();
        let (streams_open, _) = watch::channel(true);
        let state = Arc::new(State {
            kind,
            secret: secret.to_owned(),
            requests: Mutex::new(Vec::new()),
            streams_open,
            ids: AtomicU64::new(1),
        });
        let (shutdown, mut stop) = watch::channel(false);
        let serving = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let state = serving.clone();
                        let tls = tls.clone();
                        tokio::spawn(async move {
                            let service = service_fn(move |req| handle(state.clone(), req));
                            match tls {
                                Some(acceptor) => {
                                    if let Ok(stream) = acceptor.accept(stream).await {
                                        let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                                    }
                                }
                                None => {
                                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                                }
                            }
                        });
                    }
                    _ = stop.changed() => return,
                }
            }
        });
        Ok(FakeVendor {
            addr,
            tls: is_tls,
            state,
            shutdown,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: the base URL to configure as the key's upstream.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn request_count(&self) -> usize {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Streaming responses send their first event, then wait for [`FakeVendor::release_streams`].
    pub fn hold_streams(&self) {
        self.state.streams_open.send_replace(false);
    }

    pub fn release_streams(&self) {
        self.state.streams_open.send_replace(true);
    }
}

impl Drop for FakeVendor {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

type FakeBody = UnsyncBoxBody<Bytes, Infallible>;

fn full(body: impl Into<Bytes>) -> FakeBody {
    Full::new(body.into()).boxed_unsync()
}

fn json_response(kind: FakeKind, status: StatusCode, body: Value) -> Response<FakeBody> {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("static"),
    );
    h.insert(FAKE_VENDOR_HEADER, kind.as_str().parse().expect("static"));
    let request_id_header = match kind {
        FakeKind::Stripe => "request-id",
        FakeKind::Twilio => "twilio-request-id",
        FakeKind::Openai | FakeKind::Resend => "x-request-id",
    };
    h.insert(request_id_header, "req_fake_0001".parse().expect("static"));
    r
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<FakeBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    state
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(RecordedRequest {
            method: parts.method.clone(),
            target,
            headers: parts.headers.clone(),
            body: body.clone(),
        });
    let kind = state.kind;
    if !authorized(&state, &parts.headers) {
        return Ok(auth_error(kind));
    }
    let path = parts.uri.path();
    let id = state.ids.fetch_add(1, Ordering::Relaxed);
    Ok(match kind {
        FakeKind::Openai => openai(&state, &parts.method, path, &body, id),
        FakeKind::Twilio => twilio(&parts.method, path, &body, id),
        FakeKind::Resend => resend(&parts.method, path, &body, id),
        FakeKind::Stripe => stripe(&parts.method, path, &body, id),
    })
}

fn authorized(state: &State, headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    match state.kind {
        FakeKind::Twilio => value
            .strip_prefix("Basic ")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .is_some_and(|raw| raw == state.secret.as_bytes()),
        _ => value.strip_prefix("Bearer ") == Some(state.secret.as_str()),
    }
}

fn auth_error(kind: FakeKind) -> Response<FakeBody> {
    let status = StatusCode::UNAUTHORIZED;
    let body = match kind {
        FakeKind::Stripe => {
            json!({"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}})
        }
        FakeKind::Openai => {
            json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})
        }
        FakeKind::Twilio => {
            json!({"code": 20003, "message": "Authenticate", "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401})
        }
        FakeKind::Resend => {
            json!({"statusCode": 401, "name": "missing_api_key", "message": "Missing API key in the authorization header."})
        }
    };
    json_response(kind, status, body)
}

fn not_found(kind: FakeKind, method: &Method, path: &str) -> Response<FakeBody> {
    let message = format!("Unrecognized request URL ({method}: {path})");
    let body = match kind {
        FakeKind::Stripe => json!({"error": {"type": "invalid_request_error", "message": message}}),
        FakeKind::Openai => {
            json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": "unknown_url"}})
        }
        FakeKind::Twilio => {
            json!({"code": 20404, "message": "The requested resource was not found", "more_info": "https://www.twilio.com/docs/errors/20404", "status": 404})
        }
        FakeKind::Resend => json!({"statusCode": 404, "name": "not_found", "message": message}),
    };
    json_response(kind, StatusCode::NOT_FOUND, body)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn form(body: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------------
// OpenAI

fn openai(state: &State, method: &Method, path: &str, body: &[u8], id: u64) -> Response<FakeBody> {
    let kind = FakeKind::Openai;
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("gpt-4o-mini")
        .to_owned();
    match (method, path) {
        (&Method::POST, "/v1/chat/completions") => {
            if request.get("stream").and_then(Value::as_bool) == Some(true) {
                return openai_stream(state, &model, id);
            }
            json_response(
                kind,
                StatusCode::OK,
                json!({
                    "id": format!("chatcmpl-fake{id}"),
                    "object": "chat.completion",
                    "created": now_secs(),
                    "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fake.", "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                              "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
                    "system_fingerprint": "fp_fake"
                }),
            )
        }
        (&Method::POST, "/v1/responses") => json_response(
            kind,
            StatusCode::OK,
            json!({
                "id": format!("resp_fake{id}"),
                "object": "response",
                "created_at": now_secs(),
                "status": "completed",
                "model": model,
                "output": [{"type": "message", "id": format!("msg_fake{id}"), "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": "Hello from the fake.", "annotations": []}]}],
                "usage": {"input_tokens": 12, "output_tokens": 5, "total_tokens": 17,
                          "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
                "parallel_tool_calls": true, "tool_choice": "auto", "tools": []
            }),
        ),
        (&Method::POST, "/v1/embeddings") => json_response(
            kind,
            StatusCode::OK,
            json!({
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093, 0.0158]}],
                "model": model,
                "usage": {"prompt_tokens": 8, "total_tokens": 8}
            }),
        ),
        (&Method::GET, "/v1/models") => json_response(
            kind,
            StatusCode::OK,
            json!({
                "object": "list",
                "data": [{"id": "gpt-4o-mini", "object": "model", "created": 1_700_000_000, "owned_by": "openai"}]
            }),
        ),
        _ => not_found(kind, method, path),
    }
}

/// An SSE stream of chat completion chunks: the first event at once, the rest once streams are
/// released (see [`FakeVendor::hold_streams`]), then a usage chunk and `[DONE]`.
fn openai_stream(state: &State, model: &str, id: u64) -> Response<FakeBody> {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let chunk = |delta: Value, finish: Value, usage: Value| {
        let event = json!({
            "id": format!("chatcmpl-fake{id}"), "object": "chat.completion.chunk", "created": now_secs(),
            "model": model, "system_fingerprint": "fp_fake",
            "choices": if usage.is_null() { json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]) } else { json!([]) },
            "usage": usage,
        });
        Bytes::from(format!("data: {event}\n\n"))
    };
    let events = vec![
        chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            Value::Null,
        ),
        chunk(json!({"content": "Hello"}), Value::Null, Value::Null),
        chunk(
            json!({"content": " from the fake."}),
            Value::Null,
            Value::Null,
        ),
        chunk(json!({}), json!("stop"), Value::Null),
        chunk(
            Value::Null,
            Value::Null,
            json!({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}),
        ),
        Bytes::from_static(b"data: [DONE]\n\n"),
    ];
    let mut open = state.streams_open.subscribe();
    tokio::spawn(async move {
        let mut events = events.into_iter();
        if let Some(first) = events.next()
            && tx.send(first).await.is_err()
        {
            return;
        }
        // Bounded wait: a test that forgets to release still ends.
        let _ = tokio::time::timeout(Duration::from_secs(30), open.wait_for(|o| *o)).await;
        for event in events {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(UnsyncBoxBody::new(ChannelBody(rx)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        "text/event-stream; charset=utf-8".parse().expect("static"),
    );
    h.insert(FAKE_VENDOR_HEADER, "openai".parse().expect("static"));
    h.insert("x-request-id", "req_fake_stream".parse().expect("static"));
    r
}

struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

// ---------------------------------------------------------------------------------------------
// Twilio

fn twilio(method: &Method, path: &str, body: &[u8], id: u64) -> Response<FakeBody> {
    let kind = FakeKind::Twilio;
    let segments: Vec<&str> = path.split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::POST, ["", "2010-04-01", "Accounts", account, "Messages.json"]) => {
            let fields = form(body);
            let Some(to) = field(&fields, "To") else {
                return json_response(
                    kind,
                    StatusCode::BAD_REQUEST,
                    json!({
                        "code": 21604, "message": "A 'To' phone number is required.",
                        "more_info": "https://www.twilio.com/docs/errors/21604", "status": 400
                    }),
                );
            };
            let sid = format!("SM{id:032x}");
            let text = field(&fields, "Body").unwrap_or_default();
            json_response(
                kind,
                StatusCode::CREATED,
                json!({
                    "account_sid": account, "api_version": "2010-04-01", "body": text,
                    "date_created": "Mon, 30 Nov 2026 23:00:00 +0000", "date_sent": null, "date_updated": "Mon, 30 Nov 2026 23:00:00 +0000",
                    "direction": "outbound-api", "error_code": null, "error_message": null,
                    "from": field(&fields, "From"), "messaging_service_sid": field(&fields, "MessagingServiceSid"),
                    "num_media": "0", "num_segments": "1", "price": null, "price_unit": "USD",
                    "sid": sid, "status": "queued", "subresource_uris": {"media": format!("/2010-04-01/Accounts/{account}/Messages/{sid}/Media.json")},
                    "to": to, "uri": format!("/2010-04-01/Accounts/{account}/Messages/{sid}.json")
                }),
            )
        }
        _ => not_found(kind, method, path),
    }
}

// ---------------------------------------------------------------------------------------------
// Resend

fn resend(method: &Method, path: &str, body: &[u8], id: u64) -> Response<FakeBody> {
    let kind = FakeKind::Resend;
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let invalid = |message: &str| {
        json_response(
            kind,
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"statusCode": 422, "name": "validation_error", "message": message}),
        )
    };
    match (method, path) {
        (&Method::POST, "/emails") => {
            if request.get("to").is_none() || request.get("from").is_none() {
                return invalid("Missing `to` or `from` field.");
            }
            json_response(
                kind,
                StatusCode::OK,
                json!({"id": format!("49a3999c-0ce1-4ea6-ab68-{id:012x}")}),
            )
        }
        (&Method::POST, "/emails/batch") => match request.as_array() {
            Some(emails) => {
                let data: Vec<Value> = (0..emails.len())
                    .map(|i| json!({"id": format!("ae2014de-c168-4c61-8267-{:012x}", id * 100 + i as u64)}))
                    .collect();
                json_response(kind, StatusCode::OK, json!({"data": data}))
            }
            None => invalid("The batch must be an array of emails."),
        },
        _ => not_found(kind, method, path),
    }
}

// ---------------------------------------------------------------------------------------------
// Stripe (a small subset; stripe-mock is the faithful one)

fn stripe(method: &Method, path: &str, body: &[u8], id: u64) -> Response<FakeBody> {
    let kind = FakeKind::Stripe;
    let fields = form(body);
    let segments: Vec<&str> = path.split('/').collect();
    let amount = field(&fields, "amount").and_then(|a| a.parse::<i64>().ok());
    let missing = |param: &str| {
        json_response(
            kind,
            StatusCode::BAD_REQUEST,
            json!({"error": {"type": "invalid_request_error", "code": "parameter_missing",
            "param": param, "message": format!("Missing required param: {param}.")}}),
        )
    };
    match (method, segments.as_slice()) {
        (&Method::POST, ["", "v1", "charges"]) => {
            let Some(amount) = amount else {
                return missing("amount");
            };
            json_response(
                kind,
                StatusCode::OK,
                json!({
                    "id": format!("ch_fake{id}"), "object": "charge", "amount": amount,
                    "currency": field(&fields, "currency").unwrap_or("usd"), "customer": field(&fields, "customer"),
                    "paid": true, "status": "succeeded", "livemode": false, "created": now_secs()
                }),
            )
        }
        (&Method::POST, ["", "v1", "payment_intents"]) => {
            let Some(amount) = amount else {
                return missing("amount");
            };
            json_response(
                kind,
                StatusCode::OK,
                json!({
                    "id": format!("pi_fake{id}"), "object": "payment_intent", "amount": amount,
                    "currency": field(&fields, "currency").unwrap_or("usd"), "customer": field(&fields, "customer"),
                    "status": "requires_payment_method", "livemode": false, "created": now_secs()
                }),
            )
        }
        (&Method::POST, ["", "v1", "refunds"]) => json_response(
            kind,
            StatusCode::OK,
            json!({
                "id": format!("re_fake{id}"), "object": "refund", "amount": amount.unwrap_or(500),
                "charge": field(&fields, "charge"), "currency": "usd", "status": "succeeded", "created": now_secs()
            }),
        ),
        (&Method::GET, ["", "v1", "customers", customer]) => json_response(
            kind,
            StatusCode::OK,
            json!({
                "id": customer, "object": "customer", "email": "jenny@example.com", "livemode": false, "created": now_secs()
            }),
        ),
        (&Method::GET, ["", "v1", "balance"]) => json_response(
            kind,
            StatusCode::OK,
            json!({
                "object": "balance", "available": [{"amount": 0, "currency": "usd"}], "pending": [], "livemode": false
            }),
        ),
        _ => not_found(kind, method, path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for k in [
            FakeKind::Stripe,
            FakeKind::Openai,
            FakeKind::Twilio,
            FakeKind::Resend,
        ] {
            assert_eq!(FakeKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(FakeKind::parse("paypal"), None);
    }
}
