//! Caps before the money moves: pre-flight reservations against `perCallUsdMax` and
//! `dailyUsdCap`, held atomically and settled from the response. Real sidecar, testkit fake
//! vendors on loopback.
mod common;

use common::*;
use keybrake_api::{KeyGrant, Limits, Usd, Vendor, Verdict};
use keybrake_sidecar::Freshness;

fn usd(s: &str) -> Usd {
    s.parse().unwrap()
}

fn stripe_key(name: &str, token: &str, base_url: &str, limits: Limits) -> KeyGrant {
    let mut g = grant(name, token, Vendor::Stripe, base_url);
    g.allow = vec![op("charges.create")];
    g.limits = limits;
    g
}

fn charge(token: &str, cents: u32) -> Vec<u8> {
    request(
        "POST",
        "/stripe/v1/charges",
        &[
            ("Authorization", &bearer(token)),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        format!("amount={cents}&currency=usd&source=tok_visa").as_bytes(),
    )
}

/// Fires `n` charges of `cents` at once; returns the verdicts.
async fn concurrent_charges(
    proxy: std::net::SocketAddr,
    token: &str,
    n: usize,
    cents: u32,
) -> Vec<String> {
    let calls = (0..n).map(|_| {
        let req = charge(token, cents);
        tokio::spawn(async move {
            let r = raw(proxy, &req).await.expect("a response");
            assert!(
                (r.status == 200 && r.verdict() == "allow")
                    || (r.status == 402 && r.verdict() == "daily_cap"),
                "{r:?}"
            );
            r.verdict().to_owned()
        })
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_calls_never_overshoot_a_nearly_exhausted_cap() {
    let fakes = Fakes::start().await;
    let limits = Limits {
        daily_usd_cap: Some(usd("10.00")),
        per_call_usd_max: Some(usd("9.50")),
        ..Limits::default()
    };
    let key = stripe_key("race", "vault_key_race", &fakes.stripe.url(), limits);
    let mut h = Harness::start(Freshness::AlwaysFresh, Some(vec![key])).await;

    // Spend $9.50 of $10: $0.50 is left.
    let first = raw(h.proxy, &charge("vault_key_race", 950)).await.unwrap();
    assert_eq!(first.verdict(), "allow", "{first:?}");
    assert_eq!(h.next_row().await.cap_usage_after_usd, Some(usd("9.50")));

    // 50 charges of $0.10 at once: exactly five fit.
    let verdicts = concurrent_charges(h.proxy, "vault_key_race", 50, 10).await;
    let allowed = verdicts.iter().filter(|v| *v == "allow").count();
    let mut rows = Vec::new();
    for _ in 0..50 {
        rows.push(h.next_row().await);
    }
    let allowed_cost = rows
        .iter()
        .filter(|r| r.policy_verdict == Verdict::Allow)
        .map(|r| r.cost_usd_parsed.expect("allowed charges are priced"))
        .fold(usd("9.50"), Usd::saturating_add);
    assert!(
        allowed_cost <= usd("10.00"),
        "spent {allowed_cost} of a $10.00 cap"
    );
    assert_eq!(allowed, 5, "{verdicts:?}");
    assert_eq!(allowed_cost, usd("10.00"));
    // Only the allowed calls reached the vendor: no money moved for the others.
    assert_eq!(fakes.stripe.request_count(), 1 + allowed);
    let usage = rows.iter().filter_map(|r| r.cap_usage_after_usd).max();
    assert_eq!(usage, Some(usd("10.00")));

    // Used up: the next call of any size stops.
    let after = raw(h.proxy, &charge("vault_key_race", 1)).await.unwrap();
    assert_eq!(after.status, 402);
    assert_eq!(after.verdict(), "daily_cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_cap_uses_the_preflight_amount() {
    let fakes = Fakes::start().await;
    let limits = Limits {
        per_call_usd_max: Some(usd("5.00")),
        ..Limits::default()
    };
    let key = stripe_key("percall", "vault_key_percall", &fakes.stripe.url(), limits);
    let h = Harness::start(Freshness::AlwaysFresh, Some(vec![key])).await;
    let over = raw(h.proxy, &charge("vault_key_percall", 501))
        .await
        .unwrap();
    assert_eq!(over.status, 402);
    assert_eq!(over.verdict(), "per_call_cap");
    let at = raw(h.proxy, &charge("vault_key_percall", 500))
        .await
        .unwrap();
    assert_eq!(at.verdict(), "allow");
    assert_eq!(fakes.stripe.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upstream_call_releases_its_reservation() {
    // A port nothing listens on: bind, note the port, close.
    // Port 1 (privileged, never bound by tests): a just-freed ephemeral port could be taken by
    // another test's listener running in parallel, which once answered instead of refusing.
    let url = "http://127.0.0.1:1".to_owned();
    let limits = Limits {
        daily_usd_cap: Some(usd("1.00")),
        ..Limits::default()
    };
    let key = stripe_key("down", "vault_key_down", &url, limits);
    let mut h = Harness::start(Freshness::AlwaysFresh, Some(vec![key])).await;
    // Each $0.80 call fits only if the previous one's hold was released.
    for _ in 0..3 {
        let r = raw(h.proxy, &charge("vault_key_down", 80)).await.unwrap();
        assert_eq!(r.status, 502, "{r:?}");
        assert_eq!(r.verdict(), "allow");
        let row = h.next_row().await;
        assert_eq!(row.vendor_status, 0);
        assert_eq!(row.cost_usd_parsed, None);
    }
}

/// The sidecar's own connection cap is told apart from a vendor that is down: 502 with reason
/// `upstream_busy` in the audit row, counted per vendor, and the held money released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_finds_every_upstream_connection_busy_is_refused_as_upstream_busy() {
    // An upstream that accepts and never answers: the first call holds the only connection.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
            let _ = accepted_tx.send(());
        }
    });
    let limits = Limits {
        daily_usd_cap: Some(usd("1.00")),
        ..Limits::default()
    };
    let key = stripe_key("busy", "vault_key_busy", &url, limits);
    let mut h = Harness::start_with(Freshness::AlwaysFresh, Some(vec![key]), |settings| {
        settings.upstream_max_connections = 1;
        settings.upstream_connect_timeout = std::time::Duration::from_millis(200);
    })
    .await;
    let proxy = h.proxy;
    let first = tokio::spawn(async move { raw(proxy, &charge("vault_key_busy", 60)).await });
    accepted
        .recv()
        .await
        .expect("the first call reaches the upstream");

    // $0.60 is held by the first call; the second fits only because nothing else is.
    let busy = raw(h.proxy, &charge("vault_key_busy", 30)).await.unwrap();
    assert_eq!(busy.status, 502, "{busy:?}");
    assert_eq!(busy.verdict(), "allow");
    let row = h.next_row().await;
    assert_eq!(row.verdict_reason.as_deref(), Some("upstream_busy"));
    assert_eq!(row.vendor_status, 0);
    assert_eq!(
        accepted.try_recv().ok(),
        None,
        "no second connection was opened"
    );
    // The busy call's $0.30 hold was released: $0.60 held + $0.35 fits the $1.00 cap only then
    // (this call is busy too, but passes the cap check first).
    let after = raw(h.proxy, &charge("vault_key_busy", 35)).await.unwrap();
    assert_eq!(after.verdict(), "allow", "{after:?}");
    assert_eq!(
        h.next_row().await.verdict_reason.as_deref(),
        Some("upstream_busy")
    );

    let metrics = raw(h.admin, &request("GET", "/metrics", &[], b""))
        .await
        .unwrap();
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(
        text.contains("keybrake_upstream_busy_calls_total{vendor=\"stripe\"} 2"),
        "{text}"
    );
    first.abort();
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_releases_the_difference_and_unbounded_calls_reserve_the_default() {
    let fakes = Fakes::start().await;
    let mut key = grant("llm", "vault_key_llm", Vendor::Openai, &fakes.openai.url());
    key.allow = vec![op("chat.completions.create")];
    // Enough for a bounded call, not for 16,384 output tokens of gpt-4o ($0.16).
    key.limits = Limits {
        daily_usd_cap: Some(usd("0.05")),
        ..Limits::default()
    };
    let mut h = Harness::start(Freshness::AlwaysFresh, Some(vec![key])).await;
    let call = |body: &str| {
        request(
            "POST",
            "/openai/v1/chat/completions",
            &[
                ("Authorization", &bearer("vault_key_llm")),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
    };
    // No max tokens: the pessimistic default does not fit the cap.
    let r = raw(
        h.proxy,
        &call(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(r.verdict(), "daily_cap");
    h.next_row().await;
    // 4,000 output tokens of gpt-4o-mini reserve ~$0.0024; the fake's usage (12 prompt and 5
    // completion tokens) is what gets booked.
    for _ in 0..3 {
        let r = raw(
            h.proxy,
            &call(r#"{"model":"gpt-4o-mini","max_tokens":4000,"messages":[{"role":"user","content":"hi"}]}"#),
        )
        .await
        .unwrap();
        assert_eq!(r.verdict(), "allow", "{r:?}");
        let row = h.next_row().await;
        let cost = row.cost_usd_parsed.unwrap();
        assert!(cost < usd("0.0001"), "{cost}");
        assert!(row.cap_usage_after_usd.unwrap() < usd("0.001"));
    }
    assert_eq!(fakes.openai.request_count(), 3);
}

/// The documented multi-sidecar bound: each sidecar enforces the whole cap locally, so N
/// sidecars sharing one key can spend at most N × the cap (docs/verdicts.md, "Caps").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_sidecars_stay_within_n_times_the_cap() {
    let fakes = Fakes::start().await;
    let limits = Limits {
        daily_usd_cap: Some(usd("3.00")),
        ..Limits::default()
    };
    let key = stripe_key("shared", "vault_key_shared", &fakes.stripe.url(), limits);
    let a = Harness::start(Freshness::AlwaysFresh, Some(vec![key.clone()])).await;
    let b = Harness::start(Freshness::AlwaysFresh, Some(vec![key])).await;
    let (va, vb) = tokio::join!(
        concurrent_charges(a.proxy, "vault_key_shared", 20, 100),
        concurrent_charges(b.proxy, "vault_key_shared", 20, 100),
    );
    let allowed_a = va.iter().filter(|v| *v == "allow").count();
    let allowed_b = vb.iter().filter(|v| *v == "allow").count();
    assert!(allowed_a <= 3 && allowed_b <= 3, "{allowed_a} {allowed_b}");
    let total = allowed_a + allowed_b;
    assert!(
        total <= 2 * 3,
        "spent ${total} across 2 sidecars with a $3 cap"
    );
    assert_eq!(fakes.stripe.request_count(), total);
}
