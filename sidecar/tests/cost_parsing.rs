//! Cost, customer and request-id parsing against recorded vendor responses (tests/data/), through
//! the real sidecar: each key points at a replay upstream on loopback that answers with one
//! recorded response, sent in small chunks so parsers see it split the way a network splits it.
mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use common::*;
use keybrake_api::{HttpMethod, Limits, Usd, Vendor, audit::CostSource};
use keybrake_sidecar::{Freshness, pricing::Prices};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

/// Requests a replay upstream received: (head, body).
type Recorded = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A one-response upstream: every request gets `status`, `headers` and `body` (chunked, in
/// `chunk`-byte pieces). Requests are recorded (head, body).
struct Replay {
    addr: SocketAddr,
    seen: Recorded,
    task: JoinHandle<()>,
}

impl Drop for Replay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Replay {
    async fn start(status: u16, headers: &[(&str, &str)], body: Vec<u8>, chunk: usize) -> Replay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Recorded = Arc::default();
        let mut head = format!("HTTP/1.1 {status} X\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
        let recorded = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                // Read the head, then Content-Length bytes of body.
                let (head_end, length) = loop {
                    let n = stream.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        break (None, 0);
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let text = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0usize);
                        break (Some(p + 4), length);
                    }
                };
                let Some(head_end) = head_end else { continue };
                while buf.len() < head_end + length {
                    let n = stream.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
                recorded.lock().unwrap().push((
                    String::from_utf8_lossy(&buf[..head_end]).into_owned(),
                    buf[head_end..].to_vec(),
                ));
                let _ = stream.write_all(head.as_bytes()).await;
                for piece in body.chunks(chunk.max(1)) {
                    let framed =
                        [format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat();
                    if stream.write_all(&framed).await.is_err() {
                        break;
                    }
                    let _ = stream.flush().await;
                }
                let _ = stream.write_all(b"0\r\n\r\n").await;
                let _ = stream.shutdown().await;
            }
        });
        Replay { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn last_request_body(&self) -> Vec<u8> {
        self.seen.lock().unwrap().last().unwrap().1.clone()
    }
}

fn data(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn usd(s: &str) -> Usd {
    s.parse().unwrap()
}

struct Case {
    name: &'static str,
    vendor: Vendor,
    op: &'static str,
    method: &'static str,
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
    file: &'static str,
    response_headers: &'static [(&'static str, &'static str)],
    cost: Option<&'static str>,
    source: CostSource,
    customer: Option<&'static str>,
    request_id: Option<&'static str>,
}

const JSON: &str = "application/json";
const FORM: &str = "application/x-www-form-urlencoded";
const TWILIO_PATH: &str = "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json";

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "stripe charge in USD: customer from the request",
            vendor: Vendor::Stripe,
            op: "charges.create",
            method: "POST",
            path: "/v1/charges",
            content_type: FORM,
            body: "amount=1099&currency=usd&customer=cus_NffrFeUfNV2Hib&source=tok_visa",
            file: "stripe_charge_usd.json",
            response_headers: &[("Request-Id", "req_usd_1")],
            cost: Some("10.99"),
            source: CostSource::Parsed,
            customer: Some("cus_NffrFeUfNV2Hib"),
            request_id: Some("req_usd_1"),
        },
        Case {
            name: "stripe charge in JPY (zero-decimal): 5000 yen, not 50",
            vendor: Vendor::Stripe,
            op: "charges.create",
            method: "POST",
            path: "/v1/charges",
            content_type: FORM,
            body: "amount=5000&currency=jpy&source=tok_visa",
            file: "stripe_charge_jpy.json",
            response_headers: &[("Request-Id", "req_jpy_1")],
            // 5000 × 0.0067
            cost: Some("33.5"),
            source: CostSource::Parsed,
            // The request named none: the charge's customer.
            customer: Some("cus_JpyCustomer01"),
            request_id: Some("req_jpy_1"),
        },
        Case {
            name: "stripe charge in KRW without a rate: never counted as USD",
            vendor: Vendor::Stripe,
            op: "charges.create",
            method: "POST",
            path: "/v1/charges",
            content_type: FORM,
            body: "amount=65000&currency=krw&source=tok_visa",
            file: "stripe_charge_krw.json",
            response_headers: &[("Request-Id", "req_krw_1")],
            cost: None,
            source: CostSource::None,
            customer: Some("cus_KrwCustomer01"),
            request_id: Some("req_krw_1"),
        },
        Case {
            name: "stripe payment intent in KWD (three-decimal), expanded customer",
            vendor: Vendor::Stripe,
            op: "payment_intents.create",
            method: "POST",
            path: "/v1/payment_intents",
            content_type: FORM,
            body: "amount=1500&currency=kwd",
            file: "stripe_payment_intent_kwd.json",
            response_headers: &[("Request-Id", "req_kwd_1")],
            // 1.500 KWD × 3.25
            cost: Some("4.875"),
            source: CostSource::Parsed,
            customer: Some("cus_KwdCustomer01"),
            request_id: Some("req_kwd_1"),
        },
        Case {
            name: "stripe refund without an amount (full refund): the response tells",
            vendor: Vendor::Stripe,
            op: "refunds.create",
            method: "POST",
            path: "/v1/refunds",
            content_type: FORM,
            body: "charge=ch_1NirD82eZvKYlo2CIvbtLWuY",
            file: "stripe_refund.json",
            response_headers: &[("Request-Id", "req_refund_1")],
            cost: Some("10.00"),
            source: CostSource::Parsed,
            customer: None,
            request_id: Some("req_refund_1"),
        },
        Case {
            name: "openai chat completion: cached tokens inside prompt tokens",
            vendor: Vendor::Openai,
            op: "chat.completions.create",
            method: "POST",
            path: "/v1/chat/completions",
            content_type: JSON,
            body: r#"{"model":"gpt-4o","max_tokens":600,"messages":[{"role":"user","content":"describe"}]}"#,
            file: "openai_chat_completion.json",
            response_headers: &[("x-request-id", "req_oa_1"), ("Content-Type", JSON)],
            // 1000 × 2.50/M + 1000 × 1.25/M + 500 × 10/M
            cost: Some("0.00875"),
            source: CostSource::Parsed,
            customer: None,
            request_id: Some("req_oa_1"),
        },
        Case {
            name: "openai unknown model: the most expensive configured rates, never $0",
            vendor: Vendor::Openai,
            op: "chat.completions.create",
            method: "POST",
            path: "/v1/chat/completions",
            content_type: JSON,
            body: r#"{"model":"acme-frontier-preview","max_tokens":1000,"messages":[]}"#,
            file: "openai_chat_unknown_model.json",
            response_headers: &[("x-request-id", "req_oa_2"), ("Content-Type", JSON)],
            // 1000 × 15/M (o1 input) + 1000 × 60/M (o1 output)
            cost: Some("0.075"),
            source: CostSource::Parsed,
            customer: None,
            request_id: Some("req_oa_2"),
        },
        Case {
            name: "twilio message without a price yet: estimated from segments",
            vendor: Vendor::Twilio,
            op: "messages.create",
            method: "POST",
            path: TWILIO_PATH,
            content_type: FORM,
            body: "To=%2B14155552345&From=%2B14155552344&Body=Hi+there",
            file: "twilio_message_queued.json",
            response_headers: &[("Twilio-Request-Id", "RQ_tw_1")],
            cost: Some("0.0083"),
            source: CostSource::Estimated,
            customer: Some("+14155552345"),
            request_id: Some("RQ_tw_1"),
        },
        Case {
            name: "twilio message with a price: its absolute value",
            vendor: Vendor::Twilio,
            op: "messages.create",
            method: "POST",
            path: TWILIO_PATH,
            content_type: FORM,
            body: "To=%2B14155552345&From=%2B14155552344&Body=Hi+there",
            file: "twilio_message_priced.json",
            response_headers: &[("Twilio-Request-Id", "RQ_tw_2")],
            cost: Some("0.0075"),
            source: CostSource::Parsed,
            customer: Some("+14155552345"),
            request_id: Some("RQ_tw_2"),
        },
        Case {
            name: "resend email: recipients × rate, customer = domains, id from the body",
            vendor: Vendor::Resend,
            op: "emails.send",
            method: "POST",
            path: "/emails",
            content_type: JSON,
            body: r#"{"from":"a@me.dev","to":["x@acme.com","y@acme.com"],"cc":"z@other.io","bcc":["w@acme.com"],"subject":"s","html":"h"}"#,
            file: "resend_email.json",
            response_headers: &[("Content-Type", JSON)],
            cost: Some("0.0036"),
            source: CostSource::Estimated,
            customer: Some("acme.com,other.io"),
            request_id: Some("49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"),
        },
        Case {
            name: "resend batch: every recipient of every email counts",
            vendor: Vendor::Resend,
            op: "emails.batch",
            method: "POST",
            path: "/emails/batch",
            content_type: JSON,
            body: r#"[{"from":"a@me.dev","to":"a@one.com","subject":"s","html":"h"},{"from":"a@me.dev","to":["b@two.com","c@two.com"],"subject":"s","html":"h"}]"#,
            file: "resend_batch.json",
            response_headers: &[("Content-Type", JSON)],
            cost: Some("0.0027"),
            source: CostSource::Estimated,
            customer: Some("one.com,two.com"),
            request_id: Some("ae2014de-c168-4c61-8267-70d2662a1ce1"),
        },
    ]
}

fn auth(vendor: Vendor, token: &str) -> String {
    match vendor {
        Vendor::Twilio => basic(TWILIO_SID, token),
        _ => bearer(token),
    }
}

fn test_prices() -> Prices {
    let mut prices = Prices::default();
    prices
        .stripe
        .usd_per_unit
        .insert("jpy".into(), usd("0.0067"));
    prices.stripe.usd_per_unit.insert("kwd".into(), usd("3.25"));
    prices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_responses_are_priced_per_vendor() {
    let cases = cases();
    let mut replays = Vec::new();
    let mut grants = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut headers = case.response_headers.to_vec();
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            headers.push(("Content-Type", JSON));
        }
        let replay = Replay::start(200, &headers, data(case.file), 97).await;
        let token = format!("vault_key_cost{i:02}");
        let mut g = grant(&format!("cost{i:02}"), &token, case.vendor, &replay.url());
        g.allow = vec![op(case.op)];
        // A generous cap: the row's cap_usage_after_usd then shows the booked cost.
        g.limits = Limits {
            daily_usd_cap: Some(usd("1000")),
            ..Limits::default()
        };
        grants.push(g);
        replays.push((replay, token));
    }
    let mut h = Harness::start_with(Freshness::AlwaysFresh, Some(grants), |s| {
        s.prices = Arc::new(test_prices());
    })
    .await;
    for (case, (replay, token)) in cases.iter().zip(&replays) {
        let target = format!("/{}{}", case.vendor.as_str(), case.path);
        let response = raw(
            h.proxy,
            &request(
                case.method,
                &target,
                &[
                    ("Authorization", &auth(case.vendor, token)),
                    ("Content-Type", case.content_type),
                ],
                case.body.as_bytes(),
            ),
        )
        .await
        .expect("a response");
        assert_eq!(response.status, 200, "{}: {response:?}", case.name);
        // The agent gets the vendor's bytes untouched.
        assert_eq!(response.body, data(case.file), "{}", case.name);
        assert_eq!(replay.seen.lock().unwrap().len(), 1, "{}", case.name);
        let row = h.next_row().await;
        assert_eq!(
            row.cost_usd_parsed,
            case.cost.map(usd),
            "{}: cost",
            case.name
        );
        assert_eq!(row.cost_source, case.source, "{}: source", case.name);
        assert_eq!(
            row.customer_scope_id.as_deref(),
            case.customer,
            "{}: customer",
            case.name
        );
        assert_eq!(
            row.vendor_request_id.as_deref(),
            case.request_id,
            "{}: request id",
            case.name
        );
        match case.cost {
            Some(cost) => assert_eq!(row.cap_usage_after_usd, Some(usd(cost)), "{}", case.name),
            // Unpriceable: the reservation (the pessimistic default) is booked, never $0.
            None => assert_eq!(
                row.cap_usage_after_usd,
                Some(Prices::default().stripe.unbounded_reserve),
                "{}",
                case.name
            ),
        }
    }
    // keybrake_cost_usd_total counts what the rows say was spent.
    let metrics = raw(h.admin, &request("GET", "/metrics", &[], b""))
        .await
        .unwrap();
    let text = String::from_utf8(metrics.body).unwrap();
    let stripe_total: f64 = text
        .lines()
        .filter(|l| l.starts_with("keybrake_cost_usd_total{") && l.contains("vendor=\"stripe\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    let expected = 10.99 + 33.5 + 4.875 + 10.0;
    assert!(
        (stripe_total - expected).abs() < 1e-6,
        "stripe cost total {stripe_total}, want {expected}\n{text}"
    );
}

/// Streams: usage comes from the final chunk. When the agent did not ask for it, the sidecar
/// asks (stream_options.include_usage) and keeps the extra chunk from the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_usage_comes_from_the_final_chunk() {
    let sse = data("openai_chat_stream_usage.sse");
    let headers = [
        ("Content-Type", "text/event-stream; charset=utf-8"),
        ("x-request-id", "req_stream_1"),
    ];
    // Small pieces: events arrive split across chunks.
    let plain = Replay::start(200, &headers, sse.clone(), 13).await;
    let asked = Replay::start(200, &headers, sse.clone(), 13).await;
    let mut g1 = grant(
        "stream-plain",
        "vault_key_stream1",
        Vendor::Openai,
        &plain.url(),
    );
    g1.allow = vec![route(HttpMethod::POST, "/v1/chat/completions")];
    let mut g2 = grant(
        "stream-asked",
        "vault_key_stream2",
        Vendor::Openai,
        &asked.url(),
    );
    g2.allow = vec![op("chat.completions.create")];
    let mut h = Harness::start(Freshness::AlwaysFresh, Some(vec![g1, g2])).await;

    let call = |token: &str, body: &str| {
        let authorization = bearer(token);
        request(
            "POST",
            "/openai/v1/chat/completions",
            &[
                ("Authorization", authorization.as_str()),
                ("Content-Type", JSON),
            ],
            body.as_bytes(),
        )
    };
    // 1. The agent did not ask for usage.
    let response = raw(
        h.proxy,
        &call(
            "vault_key_stream1",
            r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":200000,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
    let sent: serde_json::Value = serde_json::from_slice(&plain.last_request_body()).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true, "{sent}");
    assert_eq!(sent["messages"][0]["content"], "hi");
    let body = String::from_utf8(response.body).unwrap();
    assert!(body.contains(r#""content":"Hello""#), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(
        !body.contains("\"usage\":{"),
        "usage chunk reached the agent: {body}"
    );
    assert_eq!(body.matches("data: ").count(), 4, "{body}");
    let row = h.next_row().await;
    // 1,000,000 prompt × $0.15/M + 100,000 completion × $0.60/M
    assert_eq!(row.cost_usd_parsed, Some(usd("0.21")));
    assert_eq!(row.cost_source, CostSource::Parsed);
    assert_eq!(row.vendor_request_id.as_deref(), Some("req_stream_1"));

    // 2. The agent asked: the body is forwarded byte for byte, usage chunk included.
    let response = raw(
        h.proxy,
        &call(
            "vault_key_stream2",
            r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        ),
    )
    .await
    .unwrap();
    assert_eq!(response.body, sse);
    assert_eq!(
        asked.last_request_body(),
        br#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#
    );
    let row = h.next_row().await;
    assert_eq!(row.cost_usd_parsed, Some(usd("0.21")));
    assert_eq!(row.cost_source, CostSource::Parsed);
}

#[test]
fn prices_flag_loads_a_file_and_refuses_a_bad_one() {
    use clap::Parser as _;
    use keybrake_sidecar::cli::Cli;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("prices.yaml");
    std::fs::write(
        &good,
        "stripe:\n  usdPerUnit: {eur: \"1.10\"}\nresend:\n  usdPerEmail: \"0.001\"\n",
    )
    .unwrap();
    let cli = Cli::try_parse_from([
        "keybrake-sidecar",
        "--config=policy.yaml",
        &format!("--prices={}", good.display()),
    ])
    .unwrap();
    let prices = cli.run.settings().prices;
    assert_eq!(prices.stripe_usd(1000, "eur"), Some(usd("11")));
    assert_eq!(prices.resend.usd_per_email, usd("0.001"));
    // Sections the file omits keep the defaults.
    assert_eq!(prices.twilio, Prices::default().twilio);
    // Without the flag: the built-in defaults.
    let cli = Cli::try_parse_from(["keybrake-sidecar", "--config=policy.yaml"]).unwrap();
    assert_eq!(*cli.run.settings().prices, Prices::default());

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "openai:\n  modles: {}\n").unwrap();
    let err = Cli::try_parse_from([
        "keybrake-sidecar",
        "--config=policy.yaml",
        &format!("--prices={}", bad.display()),
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("modles"), "{err}");
}

/// A stream that ends without its usage chunk cannot be priced: the whole reservation is booked
/// (fail closed) and the row says `none`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_usage_books_its_reservation() {
    let sse = data("openai_chat_stream_usage.sse");
    let text = String::from_utf8(sse).unwrap();
    let cut: String = text.split_inclusive("\n\n").take(2).collect();
    let replay = Replay::start(
        200,
        &[("Content-Type", "text/event-stream")],
        cut.clone().into_bytes(),
        11,
    )
    .await;
    let mut g = grant("cut", "vault_key_cut", Vendor::Openai, &replay.url());
    g.allow = vec![op("chat.completions.create")];
    g.limits = Limits {
        daily_usd_cap: Some(usd("10")),
        ..Limits::default()
    };
    let mut h = Harness::start(Freshness::AlwaysFresh, Some(vec![g])).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":1000,"messages":[]}"#;
    let authorization = bearer("vault_key_cut");
    let response = raw(
        h.proxy,
        &request(
            "POST",
            "/openai/v1/chat/completions",
            &[("Authorization", &authorization), ("Content-Type", JSON)],
            body.as_bytes(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(response.body, cut.as_bytes());
    let row = h.next_row().await;
    assert_eq!(row.cost_usd_parsed, None);
    assert_eq!(row.cost_source, CostSource::None);
    // 1000 output tokens at $0.60/M + the request bytes at $0.15/M.
    let reserve = usd("0.0006")
        .saturating_add(Usd::from_micros(150_000).mul_div_ceil(body.len() as u64, 1_000_000));
    assert_eq!(row.cap_usage_after_usd, Some(reserve));
}
