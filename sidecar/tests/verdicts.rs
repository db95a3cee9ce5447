//! Every verdict, for every vendor, through the real sidecar against the fake vendors: the
//! status, the `keybrake-verdict` header, the vendor's own envelope, the audit row, and whether
//! the upstream was reached (only for `allow`, with the secret swapped in).
mod common;

use std::time::Duration;

use common::*;
use keybrake_api::{KeyGrant, KeyState, OnStale, Vendor, Verdict};
use keybrake_sidecar::Freshness;
use serde_json::Value;

/// How to make one vendor call in a test.
struct Case {
    vendor: Vendor,
    /// Path under the vendor (no prefix).
    ok_path: &'static str,
    ok_body: &'static str,
    content_type: &'static str,
    allowed_op: &'static str,
    /// A catalogue call the keys do not allow.
    other_path: &'static str,
    other_body: &'static str,
    /// The allowed call aimed at a customer not on the list (None: the vendor has no customers).
    evil_customer_body: Option<&'static str>,
    customers: &'static [&'static str],
    /// A request whose pre-flight estimate exceeds `cap`.
    cap: &'static str,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            vendor: Vendor::Stripe,
            ok_path: "/v1/charges",
            ok_body: "amount=500&currency=usd&customer=cus_ok&source=tok_visa",
            content_type: "application/x-www-form-urlencoded",
            allowed_op: "charges.create",
            other_path: "/v1/refunds",
            other_body: "charge=ch_1",
            evil_customer_body: Some("amount=500&currency=usd&customer=cus_evil"),
            customers: &["cus_ok"],
            cap: "1.00",
        },
        Case {
            vendor: Vendor::Openai,
            ok_path: "/v1/chat/completions",
            ok_body: r#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#,
            content_type: "application/json",
            allowed_op: "chat.completions.create",
            other_path: "/v1/embeddings",
            other_body: r#"{"model":"text-embedding-3-small","input":"hi"}"#,
            evil_customer_body: None,
            customers: &[],
            // gpt-4o-mini: 100 output tokens at $0.60/M plus the prompt bound is ~$0.00007.
            cap: "0.00005",
        },
        Case {
            vendor: Vendor::Twilio,
            ok_path: "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json",
            ok_body: "To=%2B15550001111&From=%2B15559990000&Body=hello",
            content_type: "application/x-www-form-urlencoded",
            allowed_op: "messages.create",
            other_path: "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Calls.json",
            other_body: "To=%2B15550001111&From=%2B15559990000&Url=http%3A%2F%2Fx",
            evil_customer_body: Some("To=%2B15550009999&From=%2B15559990000&Body=hello"),
            customers: &["+15550001111"],
            cap: "0.001",
        },
        Case {
            vendor: Vendor::Resend,
            ok_path: "/emails",
            ok_body: r#"{"from":"agent@me.dev","to":["ops@acme.com"],"subject":"s","html":"<p>h</p>"}"#,
            content_type: "application/json",
            allowed_op: "emails.send",
            other_path: "/emails/batch",
            other_body: r#"[{"from":"agent@me.dev","to":["ops@acme.com"],"subject":"s","html":"h"}]"#,
            evil_customer_body: Some(
                r#"{"from":"agent@me.dev","to":["ops@acme.com","x@evil.io"],"subject":"s","html":"h"}"#,
            ),
            customers: &["acme.com"],
            cap: "0.0001",
        },
    ]
}

fn auth(vendor: Vendor, token: &str) -> String {
    match vendor {
        Vendor::Twilio => basic(TWILIO_SID, token),
        _ => bearer(token),
    }
}

fn call(case: &Case, token: &str, path: &str, body: &str) -> Vec<u8> {
    let prefixed = format!("/{}{}", case.vendor, path);
    request(
        "POST",
        &prefixed,
        &[
            ("Authorization", &auth(case.vendor, token)),
            ("Content-Type", case.content_type),
        ],
        body.as_bytes(),
    )
}

/// Checks the body is the vendor's own error envelope carrying `verdict`.
fn assert_envelope(vendor: Vendor, verdict: Verdict, status: u16, body: &Value) {
    let code = verdict.as_str();
    match vendor {
        Vendor::Stripe => {
            assert_eq!(body["error"]["code"], code, "{body}");
            assert!(body["error"]["type"].is_string());
            assert!(body["error"]["message"].as_str().unwrap().contains(code));
        }
        Vendor::Openai => {
            assert_eq!(body["error"]["code"], code, "{body}");
            assert!(body["error"]["type"].is_string());
            assert!(body["error"].get("param").is_some());
            assert!(body["error"]["message"].as_str().unwrap().contains(code));
        }
        Vendor::Twilio => {
            assert_eq!(body["status"], status, "{body}");
            assert!(body["code"].as_u64().unwrap() >= 20000);
            let more_info = format!("https://www.twilio.com/docs/errors/{}", body["code"]);
            assert_eq!(body["more_info"], more_info.as_str(), "{body}");
            assert!(body["message"].as_str().unwrap().contains(code));
        }
        Vendor::Resend => {
            assert_eq!(body["statusCode"], status, "{body}");
            assert!(body["name"].is_string());
            assert!(body["message"].as_str().unwrap().contains(code));
        }
        Vendor::Custom => unreachable!(),
    }
}

struct Scenario {
    verdict: Verdict,
    token: String,
    body: &'static str,
    path: &'static str,
}

#[tokio::test]
async fn every_verdict_for_every_vendor() {
    let fakes = Fakes::start().await;
    let mut grants: Vec<KeyGrant> = Vec::new();
    let mut scenarios: Vec<(Vendor, Vec<Scenario>)> = Vec::new();
    let now = jiff::Timestamp::now();
    for case in cases() {
        let v = case.vendor;
        let base = fakes.get(v).url();
        let token = |s: &str| format!("vault_key_{v}_{s}");
        let mk = |s: &str| {
            let mut g = grant(&format!("{v}-{}", s.replace('_', "-")), &token(s), v, &base);
            g.allow = vec![op(case.allowed_op)];
            g.customers = case.customers.iter().map(|c| c.to_string()).collect();
            g
        };
        grants.push(mk("allow"));
        grants.push(KeyGrant {
            state: KeyState::Revoked,
            ..mk("revoked")
        });
        grants.push(KeyGrant {
            state: KeyState::Suspended,
            ..mk("suspended")
        });
        grants.push(KeyGrant {
            expires_at: Some(now - jiff::SignedDuration::from_secs(5)),
            ..mk("expired")
        });
        grants.push(mk("scoped"));
        let mut rate = mk("rate");
        rate.limits.calls_per_minute = Some(1);
        grants.push(rate);
        let mut per_call = mk("percall");
        per_call.limits.per_call_usd_max = Some(case.cap.parse().unwrap());
        grants.push(per_call);
        let mut daily = mk("daily");
        daily.limits.daily_usd_cap = Some(case.cap.parse().unwrap());
        grants.push(daily);

        let mut list = vec![
            Scenario {
                verdict: Verdict::Allow,
                token: token("allow"),
                body: case.ok_body,
                path: case.ok_path,
            },
            Scenario {
                verdict: Verdict::KeyUnknown,
                token: token("nobody"),
                body: case.ok_body,
                path: case.ok_path,
            },
            Scenario {
                verdict: Verdict::KeyRevoked,
                token: token("revoked"),
                body: case.ok_body,
                path: case.ok_path,
            },
            Scenario {
                verdict: Verdict::KeySuspended,
                token: token("suspended"),
                body: case.ok_body,
                path: case.ok_path,
            },
            Scenario {
                verdict: Verdict::KeyExpired,
                token: token("expired"),
                body: case.ok_body,
                path: case.ok_path,
            },
            Scenario {
                verdict: Verdict::OperationDenied,
                token: token("scoped"),
                body: case.other_body,
                path: case.other_path,
            },
            // The first call spends the only token of the minute; see below for the second.
            Scenario {
                verdict: Verdict::Allow,
                token: token("rate"),
                body: case.ok_body,
                path: case.ok_path,
            },
            Scenario {
                verdict: Verdict::RateLimited,
                token: token("rate"),
                body: case.ok_body,
                path: case.ok_path,
            },
            Scenario {
                verdict: Verdict::PerCallCap,
                token: token("percall"),
                body: case.ok_body,
                path: case.ok_path,
            },
            Scenario {
                verdict: Verdict::DailyCap,
                token: token("daily"),
                body: case.ok_body,
                path: case.ok_path,
            },
        ];
        if let Some(evil) = case.evil_customer_body {
            list.push(Scenario {
                verdict: Verdict::CustomerDenied,
                token: token("scoped"),
                body: evil,
                path: case.ok_path,
            });
        }
        scenarios.push((v, list));
    }
    let mut h = Harness::start(Freshness::AlwaysFresh, Some(grants)).await;

    let cases = cases();
    for (vendor, list) in scenarios {
        let case = cases.iter().find(|c| c.vendor == vendor).unwrap();
        for s in list {
            let fake = fakes.get(vendor);
            let before = fakes.total_requests();
            let response = raw(h.proxy, &call(case, &s.token, s.path, s.body))
                .await
                .expect("a response");
            let what = format!("{vendor} {}", s.verdict);
            assert_eq!(
                response.verdict(),
                s.verdict.as_str(),
                "{what}: {response:?}"
            );
            let row = h.next_row().await;
            assert_eq!(row.policy_verdict, s.verdict, "{what}");
            assert_eq!(row.vendor, vendor);
            assert!(
                !serde_json::to_string(&row).unwrap().contains(&s.token),
                "{what}: token in audit row"
            );
            if s.verdict.is_allow() {
                assert!(
                    response.status == 200 || response.status == 201,
                    "{what}: {response:?}"
                );
                assert_eq!(response.header("x-fake-vendor"), Some(vendor.as_str()));
                assert_eq!(fakes.total_requests(), before + 1);
                let seen = fake.requests().pop().unwrap();
                let expected_auth = match vendor {
                    Vendor::Twilio => {
                        let (sid, tok) = TWILIO_SECRET.split_once(':').unwrap();
                        basic(sid, tok)
                    }
                    v => bearer(Fakes::secret(v)),
                };
                assert_eq!(
                    seen.headers.get("authorization").unwrap(),
                    expected_auth.as_str()
                );
                let everything = seen.everything();
                assert!(
                    !everything.contains(&s.token),
                    "{what}: vault key reached the upstream"
                );
                assert!(
                    !everything.to_ascii_lowercase().contains("keybrake-"),
                    "{what}: keybrake header forwarded"
                );
                assert_eq!(seen.target, s.path);
                assert_eq!(row.vendor_status, i32::from(response.status));
                assert_eq!(row.operation.as_deref(), Some(case.allowed_op));
                // Twilio (no price yet at send time) and Resend are estimated; OpenAI's usage
                // is parsed from the response (tests/cost_parsing.rs covers each vendor).
                match vendor {
                    Vendor::Twilio | Vendor::Resend => {
                        assert_eq!(
                            row.cost_source,
                            keybrake_api::audit::CostSource::Estimated,
                            "{what}"
                        );
                        assert!(row.cost_usd_parsed.unwrap() > keybrake_api::Usd::ZERO);
                    }
                    Vendor::Openai => {
                        assert_eq!(row.cost_source, keybrake_api::audit::CostSource::Parsed)
                    }
                    _ => {}
                }
            } else {
                assert_eq!(
                    response.status,
                    s.verdict.http_status(),
                    "{what}: {response:?}"
                );
                assert_envelope(vendor, s.verdict, response.status, &response.json());
                assert_eq!(
                    fakes.total_requests(),
                    before,
                    "{what}: a denied call reached an upstream"
                );
                assert_eq!(row.vendor_status, 0);
                assert!(row.verdict_reason.is_some());
                if s.verdict != Verdict::RateLimited && s.verdict != Verdict::PolicyStale {
                    assert_ne!(
                        response.status, 429,
                        "{what}: budget/scope denials are not retryable 429s"
                    );
                }
            }
        }
    }
    let metrics = raw(h.admin, &request("GET", "/metrics", &[], b""))
        .await
        .unwrap();
    let text = String::from_utf8(metrics.body).unwrap();
    for line in [
        r#"keybrake_cost_usd_total{agent="test-agent",namespace="agents",vault_key="twilio-allow",vendor="twilio"} 0.0083"#,
        r#"keybrake_cost_usd_total{agent="test-agent",namespace="agents",vault_key="resend-allow",vendor="resend"} 0.0009"#,
        r#"keybrake_cost_usd_total{agent="test-agent",namespace="agents",vault_key="stripe-allow",vendor="stripe"} 5"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    h.sidecar.take().unwrap().shutdown().await;
}

#[tokio::test]
async fn stale_policy_fails_closed_unless_the_key_says_allow() {
    let fakes = Fakes::start().await;
    let mut grants = Vec::new();
    for case in cases() {
        let v = case.vendor;
        let mut deny = grant(
            &format!("{v}-deny"),
            &format!("vault_key_{v}_deny"),
            v,
            &fakes.get(v).url(),
        );
        deny.allow = vec![op(case.allowed_op)];
        deny.customers = case.customers.iter().map(|c| c.to_string()).collect();
        let mut allow = deny.clone();
        allow.id = keybrake_api::KeyId::new("agents", &format!("{v}-allow"));
        allow.token_sha256 = keybrake_api::TokenHash::of(&format!("vault_key_{v}_allow"));
        allow.on_stale = OnStale::Allow;
        grants.push(deny);
        grants.push(allow);
    }
    // A stream-fed store that never hears from its source again goes stale after 1 ms.
    let mut h = Harness::start(
        Freshness::StaleAfter(Duration::from_millis(1)),
        Some(grants),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !h.store.is_stale() {
        assert!(
            std::time::Instant::now() < deadline,
            "store never went stale"
        );
        tokio::task::yield_now().await;
    }
    for case in cases() {
        let v = case.vendor;
        let before = fakes.total_requests();
        let r = raw(
            h.proxy,
            &call(
                &case,
                &format!("vault_key_{v}_deny"),
                case.ok_path,
                case.ok_body,
            ),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 503, "{v}: {r:?}");
        assert_eq!(r.verdict(), "policy_stale");
        assert_envelope(v, Verdict::PolicyStale, 503, &r.json());
        assert_eq!(fakes.total_requests(), before);
        assert_eq!(h.next_row().await.policy_verdict, Verdict::PolicyStale);

        let r = raw(
            h.proxy,
            &call(
                &case,
                &format!("vault_key_{v}_allow"),
                case.ok_path,
                case.ok_body,
            ),
        )
        .await
        .unwrap();
        assert!(r.status < 300, "{v}: {r:?}");
        assert_eq!(r.verdict(), "allow");
        assert_eq!(fakes.total_requests(), before + 1);
        assert_eq!(h.next_row().await.policy_verdict, Verdict::Allow);
    }
    let metrics = raw(h.admin, &request("GET", "/metrics", &[], b""))
        .await
        .unwrap();
    let text = String::from_utf8(metrics.body).unwrap();
    for v in ["stripe", "openai", "twilio", "resend"] {
        let line = format!(
            "keybrake_stale_allowed_calls_total{{namespace=\"agents\",vault_key=\"{v}-allow\"}} 1"
        );
        assert!(text.contains(&line), "missing {line} in\n{text}");
    }
    h.sidecar.take().unwrap().shutdown().await;
}
