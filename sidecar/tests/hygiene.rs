//! Bad input never reaches an upstream it should not: auth header abuse, oversized bodies, slow
//! clients, path tricks, absolute-form targets, CONNECT, cross-vendor keys. Plus streaming,
//! per-vendor ports, the admin port and graceful shutdown.
mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use keybrake_api::{HttpMethod, Vendor};
use keybrake_sidecar::Freshness;
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpStream};

const STRIPE_KEY: &str = "vault_key_stripe_hygiene";
const OPENAI_KEY: &str = "vault_key_openai_hygiene";

async fn setup() -> (Fakes, Harness) {
    let fakes = Fakes::start().await;
    let mut stripe = grant(
        "stripe-hygiene",
        STRIPE_KEY,
        Vendor::Stripe,
        &fakes.stripe.url(),
    );
    stripe.allow = vec![
        op("charges.create"),
        op("balance.retrieve"),
        route(HttpMethod::GET, "/v1/customers/{id}"),
    ];
    let mut openai = grant(
        "openai-hygiene",
        OPENAI_KEY,
        Vendor::Openai,
        &fakes.openai.url(),
    );
    openai.allow = vec![op("chat.completions.create"), op("models.list")];
    let h = Harness::start(Freshness::AlwaysFresh, Some(vec![stripe, openai])).await;
    (fakes, h)
}

#[tokio::test]
async fn path_tricks_and_foreign_targets_never_reach_an_upstream() {
    let (fakes, h) = setup().await;
    let stripe_auth = bearer(STRIPE_KEY);
    let openai_auth = bearer(OPENAI_KEY);
    let tricks: Vec<(&str, &str, &str)> = vec![
        ("GET", "/stripe/../openai/v1/models", openai_auth.as_str()),
        ("GET", "/stripe/../openai/v1/models", stripe_auth.as_str()),
        ("GET", "/openai/../stripe/v1/balance", stripe_auth.as_str()),
        (
            "GET",
            "/stripe/v1/../../openai/v1/models",
            stripe_auth.as_str(),
        ),
        ("GET", "/stripe/v1/./balance", stripe_auth.as_str()),
        ("GET", "/stripe/v1%2Fbalance", stripe_auth.as_str()),
        ("GET", "/stripe/v1%2fbalance", stripe_auth.as_str()),
        ("GET", "/stripe%2Fv1/balance", stripe_auth.as_str()),
        (
            "GET",
            "/stripe/v1/customers/%2e%2e%2Fbalance",
            stripe_auth.as_str(),
        ),
        (
            "GET",
            "/stripe/v1/customers/%252e%252e",
            stripe_auth.as_str(),
        ),
        ("GET", "//stripe/v1/balance", stripe_auth.as_str()),
        ("GET", "/stripe//v1/balance", stripe_auth.as_str()),
        ("GET", "/stripe/v1//balance", stripe_auth.as_str()),
        ("GET", "/stripe/v1\\..\\balance", stripe_auth.as_str()),
        ("GET", "/evil.example.com/v1/balance", stripe_auth.as_str()),
        ("GET", "/openai/v1/models", stripe_auth.as_str()),
        ("GET", "/stripe/v1/balance", openai_auth.as_str()),
        ("GET", "http://127.0.0.1:1/v1/balance", stripe_auth.as_str()),
        (
            "GET",
            "http://evil.example.com/stripe/v1/balance",
            stripe_auth.as_str(),
        ),
        ("CONNECT", "evil.example.com:443", stripe_auth.as_str()),
        ("GET", "*", stripe_auth.as_str()),
    ];
    for (method, target, auth) in tricks {
        let r = raw(
            h.proxy,
            &request(method, target, &[("Authorization", auth)], b""),
        )
        .await;
        if let Some(r) = &r {
            assert!(
                r.status >= 400,
                "{method} {target} was answered {}",
                r.status
            );
        }
        assert_eq!(
            fakes.total_requests(),
            0,
            "{method} {target} reached an upstream"
        );
    }
    // The same calls done properly do arrive, at the right upstream only.
    let ok = raw(
        h.proxy,
        &request(
            "GET",
            "/stripe/v1/balance",
            &[("Authorization", &stripe_auth)],
            b"",
        ),
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.header("x-fake-vendor"), Some("stripe"));
    let ok = raw(
        h.vendor_port(Vendor::Openai),
        &request("GET", "/v1/models", &[("Authorization", &openai_auth)], b""),
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.header("x-fake-vendor"), Some("openai"));
    assert_eq!(
        (fakes.stripe.request_count(), fakes.openai.request_count()),
        (1, 1)
    );
}

#[tokio::test]
async fn bad_auth_headers_are_refused_in_the_vendor_envelope() {
    let (fakes, h) = setup().await;
    let huge = format!("Bearer {}", "v".repeat(5000));
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![], "auth_missing"),
        (vec![("Authorization", "Bearer")], "auth_malformed"),
        (vec![("Authorization", "Bearer a b")], "auth_malformed"),
        (
            vec![("Authorization", "Token vault_key_x")],
            "auth_wrong_scheme",
        ),
        (
            vec![("Authorization", "Basic dmF1bHRfa2V5Og==")],
            "auth_wrong_scheme",
        ),
        (vec![("Authorization", huge.as_str())], "auth_too_large"),
        (
            vec![
                ("Authorization", "Bearer vault_key_stripe_hygiene"),
                ("Authorization", "Bearer x"),
            ],
            "auth_malformed",
        ),
    ];
    for (headers, reason) in cases {
        let r = raw(
            h.vendor_port(Vendor::Openai),
            &request("GET", "/v1/models", &headers, b""),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 401, "{reason}: {r:?}");
        assert_eq!(r.verdict(), "key_unknown");
        let body = r.json();
        assert_eq!(body["error"]["code"], "key_unknown");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(reason),
            "{body}"
        );
    }
    // A giant header is refused either by the head-size limit (431) or as an oversized credential.
    let giant = format!("Bearer {}", "v".repeat(100 * 1024));
    let r = raw(
        h.proxy,
        &request(
            "GET",
            "/openai/v1/models",
            &[("Authorization", &giant)],
            b"",
        ),
    )
    .await;
    if let Some(r) = r {
        assert!(r.status == 431 || r.status == 401, "{r:?}");
    }
    assert_eq!(fakes.total_requests(), 0);
}

#[tokio::test]
async fn oversized_bodies_and_slow_clients_are_cut_off() {
    let (fakes, h) = setup().await;
    let auth = bearer(STRIPE_KEY);
    let big = vec![b'a'; 65 * 1024];
    let r = raw(
        h.proxy,
        &request(
            "POST",
            "/stripe/v1/charges",
            &[("Authorization", &auth)],
            &big,
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 413, "{r:?}");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("body_too_large")
    );

    // Declared too large: refused before a byte of the body is read.
    let head = format!(
        "POST /stripe/v1/charges HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n"
    );
    let r = raw(h.proxy, head.as_bytes()).await.unwrap();
    assert_eq!(r.status, 413);

    // Chunked, growing past the limit.
    let mut chunked = format!(
        "POST /stripe/v1/charges HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..5 {
        chunked.extend_from_slice(format!("{:x}\r\n", 20 * 1024).as_bytes());
        chunked.extend_from_slice(&vec![b'b'; 20 * 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = raw(h.proxy, &chunked).await.unwrap();
    assert_eq!(r.status, 413);

    // Slow body: 10 of 100 promised bytes, then silence. The body timeout (500 ms) answers 408.
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    let head = format!(
        "POST /stripe/v1/charges HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 100\r\nConnection: close\r\n\r\namount=500"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("answered within 5 s")
        .unwrap();
    let r = parse_response(&buf).unwrap();
    assert_eq!(r.status, 408, "{r:?}");

    // Slow head: half a request line, then silence. The header timeout closes the connection.
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(b"GET /stripe/v1/bal").await.unwrap();
    let mut buf = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(done.is_ok(), "a stalled request head must be cut off");
    assert_eq!(fakes.total_requests(), 0);
}

#[tokio::test]
async fn sse_streams_reach_the_agent_chunk_by_chunk() {
    let (fakes, mut h) = setup().await;
    fakes.openai.hold_streams();
    let stream = TcpStream::connect(h.proxy).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/openai/v1/chat/completions")
        .header("host", "127.0.0.1")
        .header("authorization", bearer(OPENAI_KEY))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["keybrake-verdict"], "allow");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = response.into_body();
    // The upstream has sent only its first event and is holding the rest: if the sidecar
    // buffered, this read would not complete.
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first SSE event arrives while the upstream holds the rest")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert!(first.starts_with("data: {"), "{first}");
    assert!(!first.contains("[DONE]"));
    // No audit row yet: the call is still running.
    assert!(h.audit.try_recv().is_err());
    fakes.openai.release_streams();
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    let rest = String::from_utf8(rest.to_vec()).unwrap();
    assert!(rest.contains("from the fake"), "{rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    let row = h.next_row().await;
    assert_eq!(row.operation.as_deref(), Some("chat.completions.create"));
    assert_eq!(row.vendor_request_id.as_deref(), Some("req_fake_stream"));
}

#[tokio::test]
async fn shutdown_drains_in_flight_streams() {
    let (fakes, mut h) = setup().await;
    fakes.openai.hold_streams();
    let stream = TcpStream::connect(h.proxy).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/openai/v1/chat/completions")
        .header("host", "127.0.0.1")
        .header("authorization", bearer(OPENAI_KEY))
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","stream":true,"messages":[]}"#,
        )))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    let mut body = response.into_body();
    let _first = body.frame().await.unwrap().unwrap();
    let sidecar = h.sidecar.take().unwrap();
    let shutdown = tokio::spawn(sidecar.shutdown());
    // New connections are refused once shutdown began...
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(h.proxy).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "listener still accepting"
        );
        tokio::task::yield_now().await;
    }
    assert!(
        !shutdown.is_finished(),
        "shutdown must wait for the in-flight stream"
    );
    // ...while the in-flight stream still completes.
    fakes.openai.release_streams();
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown finishes after the drain")
        .unwrap();
    assert_eq!(
        h.next_row().await.policy_verdict,
        keybrake_api::Verdict::Allow
    );
}

#[tokio::test]
async fn admin_port_reports_liveness_readiness_and_metrics() {
    let empty = Harness::start(Freshness::AlwaysFresh, None).await;
    let live = raw(empty.admin, &request("GET", "/live", &[], b""))
        .await
        .unwrap();
    assert_eq!(live.status, 200);
    let ready = raw(empty.admin, &request("GET", "/ready", &[], b""))
        .await
        .unwrap();
    assert_eq!(ready.status, 503, "not ready before a policy is loaded");

    let (_fakes, h) = setup().await;
    assert_eq!(
        raw(h.admin, &request("GET", "/ready", &[], b""))
            .await
            .unwrap()
            .status,
        200
    );
    let auth = bearer(STRIPE_KEY);
    raw(
        h.proxy,
        &request(
            "GET",
            "/stripe/v1/balance",
            &[("Authorization", &auth)],
            b"",
        ),
    )
    .await
    .unwrap();
    raw(
        h.proxy,
        &request(
            "POST",
            "/stripe/v1/refunds",
            &[("Authorization", &auth)],
            b"charge=ch_1",
        ),
    )
    .await
    .unwrap();
    let metrics = raw(h.admin, &request("GET", "/metrics", &[], b""))
        .await
        .unwrap();
    let text = String::from_utf8(metrics.body).unwrap();
    for needle in [
        r#"keybrake_calls_total{agent="test-agent",namespace="agents",vault_key="stripe-hygiene",vendor="stripe",verdict="allow"} 1"#,
        r#"keybrake_calls_total{agent="test-agent",namespace="agents",vault_key="stripe-hygiene",vendor="stripe",verdict="operation_denied"} 1"#,
        "keybrake_policy_revision 1",
        "keybrake_policy_staleness_seconds 0",
        "keybrake_upstream_duration_seconds_bucket{vendor=\"stripe\"",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(!text.contains(STRIPE_KEY) && !text.contains(STRIPE_SECRET));
}
