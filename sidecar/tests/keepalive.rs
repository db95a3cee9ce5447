//! A refused request must not cost the agent its keep-alive connection: the sidecar reads and
//! discards a refused request's body up to a bound (proxy::REFUSED_BODY_DRAIN_BYTES), then
//! serves the next request on the same connection. A body above the bound is not read: the
//! connection is closed after the refusal.
mod common;

use std::time::Duration;

use common::*;
use keybrake_api::Vendor;
use keybrake_sidecar::{Freshness, proxy::REFUSED_BODY_DRAIN_BYTES};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const STRIPE_KEY: &str = "vault_key_stripe_keepalive";

async fn setup() -> (Fakes, Harness) {
    let fakes = Fakes::start().await;
    let mut stripe = grant(
        "stripe-keepalive",
        STRIPE_KEY,
        Vendor::Stripe,
        &fakes.stripe.url(),
    );
    stripe.allow = vec![op("charges.create"), op("balance.retrieve")];
    let h = Harness::start(Freshness::AlwaysFresh, Some(vec![stripe])).await;
    (fakes, h)
}

/// A keep-alive request (no `Connection: close`).
fn keep_alive_request(method: &str, target: &str, auth: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// Reads one response (Content-Length or chunked) from a kept-alive connection. `None` if
/// the server closed the connection before a whole response arrived.
async fn read_one(stream: &mut TcpStream) -> Option<RawResponse> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = parse_response(&buf[..end + 4]).expect("a response head");
            match head.header("content-length") {
                Some(length) => {
                    let length: usize = length.parse().unwrap();
                    if buf.len() >= end + 4 + length {
                        return parse_response(&buf[..end + 4 + length]);
                    }
                }
                // Chunked: complete once the last chunk has arrived.
                None if buf[end + 4..].windows(5).any(|w| w == b"0\r\n\r\n") => {
                    return parse_response(&buf);
                }
                None => {}
            }
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("a response within 10 s")
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An allowed Stripe charge on `stream`, and its answer (`None`: the connection closed).
async fn allowed_charge(stream: &mut TcpStream) -> Option<RawResponse> {
    stream
        .write_all(&keep_alive_request(
            "POST",
            "/stripe/v1/charges",
            &bearer(STRIPE_KEY),
            b"amount=500&currency=usd",
        ))
        .await
        .unwrap();
    read_one(stream).await
}

/// `true` once the server has closed the connection (EOF or reset), within 10 s.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn refused_requests_with_bodies_keep_the_connection() {
    let (fakes, h) = setup().await;
    let mut stream = TcpStream::connect(h.proxy).await.unwrap();
    let body = vec![b'a'; 32 * 1024];
    let refusals = [
        // Refused before the body is looked at: unknown key, then an operation not allowed.
        (
            keep_alive_request(
                "POST",
                "/stripe/v1/charges",
                &bearer("vault_key_nobody_knows_this_one"),
                &body,
            ),
            401,
            "key_unknown",
        ),
        (
            keep_alive_request("POST", "/stripe/v1/refunds", &bearer(STRIPE_KEY), &body),
            403,
            "operation_denied",
        ),
    ];
    for (request, status, verdict) in refusals {
        stream.write_all(&request).await.unwrap();
        let r = read_one(&mut stream)
            .await
            .unwrap_or_else(|| panic!("the connection closed instead of answering {verdict}"));
        assert_eq!(r.status, status, "{r:?}");
        assert_eq!(r.verdict(), verdict);
    }
    // The same connection still carries an allowed call to the upstream.
    let r = allowed_charge(&mut stream)
        .await
        .expect("the connection survived both refusals");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.verdict(), "allow");
    assert_eq!(
        fakes.stripe.request_count(),
        1,
        "only the allowed call went out"
    );
}

#[tokio::test]
async fn a_refused_body_above_the_drain_bound_closes_the_connection() {
    let (fakes, h) = setup().await;
    let mut stream = TcpStream::connect(h.proxy).await.unwrap();
    let announced = REFUSED_BODY_DRAIN_BYTES as usize * 4;
    let head = format!(
        "POST /stripe/v1/charges HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer vault_key_nobody_knows_this_one\r\nContent-Length: {announced}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // Part of the body; the rest never comes. The sidecar must neither wait for it nor keep
    // the connection.
    stream.write_all(&vec![b'a'; 16 * 1024]).await.unwrap();
    let r = read_one(&mut stream)
        .await
        .expect("the refusal is answered");
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.verdict(), "key_unknown");
    assert!(
        closed_by_server(&mut stream).await,
        "a body above the drain bound must close the connection"
    );

    // A refused body within the bound that stops arriving is not waited on forever either:
    // the harness's body read timeout (500 ms) ends the drain and the connection.
    let mut slow = TcpStream::connect(h.proxy).await.unwrap();
    let head = "POST /stripe/v1/charges HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer vault_key_nobody_knows_this_one\r\nContent-Length: 1000\r\n\r\nabc";
    slow.write_all(head.as_bytes()).await.unwrap();
    let r = read_one(&mut slow).await.expect("the refusal is answered");
    assert_eq!(r.status, 401);
    assert!(
        closed_by_server(&mut slow).await,
        "a stalled refused body must not hold the connection open"
    );
    assert_eq!(fakes.total_requests(), 0);
}

/// The header read timeout (500 ms in the harness) also bounds how long a kept-alive connection
/// may wait for its next request: counted from the end of the last response, not from the
/// connection's start, and never while a call is being served.
#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_one_header_timeout_after_its_last_response() {
    let (fakes, h) = setup().await;
    let mut stream = TcpStream::connect(h.proxy).await.unwrap();
    let started = tokio::time::Instant::now();
    // Calls paced 150 ms apart until the connection has lived two timeouts: it never waits one.
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(1) {
        if calls > 0 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let r = allowed_charge(&mut stream)
            .await
            .unwrap_or_else(|| panic!("closed after {calls} calls while calls kept coming"));
        assert_eq!(r.status, 200, "{r:?}");
        calls += 1;
    }
    let answered = tokio::time::Instant::now();
    assert!(
        closed_by_server(&mut stream).await,
        "an idle connection stays open"
    );
    let idle = answered.elapsed();
    // The server starts counting just before the response leaves: allow a little slack.
    assert!(
        idle >= Duration::from_millis(450),
        "closed after {idle:?} idle"
    );
    assert_eq!(fakes.stripe.request_count(), calls);
}
