//! Shared test helpers: row builders and the throwaway PostgreSQL started by
//! scripts/with-postgres.sh.
#![allow(dead_code)]

use jiff::{SignedDuration, Timestamp};
use keybrake_api::{
    Usd, Vendor, Verdict,
    audit::{AuditRow, CostSource},
};

pub const POSTGRES_ENV: &str = "KEYBRAKE_TEST_POSTGRES_URL";

/// URL of a fresh, empty database for one test. Fails (never skips) without PostgreSQL.
pub async fn fresh_postgres_database(name: &str) -> String {
    let admin_url = std::env::var(POSTGRES_ENV).unwrap_or_else(|_| {
        panic!(
            "{POSTGRES_ENV} is not set: this test needs a real PostgreSQL. Run it as \
             `scripts/with-postgres.sh cargo test -p keybrake-audit` (or `make test-unit`)"
        )
    });
    let (client, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {POSTGRES_ENV}: {e}"));
    tokio::spawn(connection);
    let db = format!("kb_audit_{name}");
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    client
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let (path, query) = admin_url.split_once('?').unwrap_or((&admin_url, ""));
    let (prefix, _) = path
        .rsplit_once('/')
        .expect("postgres URL has a database path");
    // Keep the parameters (sslmode=disable from scripts/with-postgres.sh).
    if query.is_empty() {
        format!("{prefix}/{db}")
    } else {
        format!("{prefix}/{db}?{query}")
    }
}

pub fn t0() -> Timestamp {
    "2026-11-30T02:00:00Z".parse().unwrap()
}

pub fn minutes_before_t0(minutes: i64) -> Timestamp {
    t0() - SignedDuration::from_mins(minutes)
}

/// A plausible allowed Stripe call; tests override what they care about.
pub fn row(id: &str, started_at: Timestamp) -> AuditRow {
    AuditRow {
        id: id.to_owned(),
        started_at,
        duration_ms: 42,
        vault_key_id: Some("shop/stripe".into()),
        agent_name: Some("refunder".into()),
        agent_run_id: None,
        namespace: Some("shop".into()),
        pod: Some("refunder-7d9f-0".into()),
        vendor: Vendor::Stripe,
        operation: Some("charges.create".into()),
        method: "POST".into(),
        path_template: Some("/v1/charges".into()),
        policy_verdict: Verdict::Allow,
        verdict_reason: None,
        customer_scope_id: None,
        vendor_status: 200,
        vendor_request_id: Some(format!("req_{id}")),
        cost_usd_parsed: None,
        cost_source: CostSource::None,
        cap_usage_after_usd: Some(Usd::from_micros(1_000_000)),
        policy_revision: 3,
    }
}

#[allow(clippy::too_many_arguments)]
pub fn call(
    id: &str,
    minutes_ago: i64,
    key: &str,
    vendor: Vendor,
    run: Option<&str>,
    verdict: Verdict,
    customer: Option<&str>,
    cost_micros: Option<i64>,
) -> AuditRow {
    let mut r = row(id, minutes_before_t0(minutes_ago));
    r.vault_key_id = Some(key.to_owned());
    r.vendor = vendor;
    r.agent_run_id = run.map(str::to_owned);
    r.policy_verdict = verdict;
    r.customer_scope_id = customer.map(str::to_owned);
    r.cost_usd_parsed = cost_micros.map(Usd::from_micros);
    r.cost_source = if cost_micros.is_some() {
        CostSource::Parsed
    } else {
        CostSource::None
    };
    if !verdict.is_allow() {
        r.vendor_status = 0;
        r.verdict_reason = Some(format!("{verdict} by policy revision 3"));
    }
    r
}

/// The known data the playbook queries are checked against (see tests/sinks.rs).
pub fn playbook_rows() -> Vec<AuditRow> {
    use Vendor::*;
    use Verdict::*;
    vec![
        call(
            "r01",
            40,
            "shop/stripe",
            Stripe,
            Some("run-A"),
            Allow,
            Some("cus_1"),
            Some(1_000_000),
        ),
        call(
            "r02",
            20,
            "shop/stripe",
            Stripe,
            Some("run-A"),
            Allow,
            Some("cus_1"),
            Some(12_345_678),
        ),
        call(
            "r03",
            10,
            "shop/stripe",
            Stripe,
            Some("run-A"),
            DailyCap,
            Some("cus_2"),
            None,
        ),
        call(
            "r04",
            5,
            "shop/openai",
            Openai,
            Some("run-A"),
            Allow,
            Some("cus_2"),
            Some(150),
        ),
        call(
            "r05",
            1,
            "shop/stripe",
            Stripe,
            Some("run-B"),
            Allow,
            Some("cus_3"),
            Some(250_000_000),
        ),
        call(
            "r06",
            2,
            "shop/twilio",
            Twilio,
            Some("run-B"),
            RateLimited,
            Some("cus_3"),
            None,
        ),
        call(
            "r07",
            3,
            "shop/stripe",
            Stripe,
            Some("run-B"),
            DailyCap,
            Some("cus_3"),
            None,
        ),
        call(
            "r08",
            15,
            "shop/resend",
            Resend,
            None,
            Allow,
            None,
            Some(2_000),
        ),
        call(
            "r09",
            20,
            "shop/stripe",
            Stripe,
            Some("run-A"),
            Allow,
            Some("cus_1"),
            Some(500_000),
        ),
        // A refund: money came back.
        call(
            "r10",
            50,
            "shop/stripe",
            Stripe,
            None,
            Allow,
            Some("cus_4"),
            Some(-5_250_000),
        ),
        // Outside every window the tests use (after t0).
        call(
            "r11",
            -5,
            "shop/stripe",
            Stripe,
            Some("run-A"),
            DailyCap,
            Some("cus_1"),
            Some(7),
        ),
    ]
}

/// `n` rows with ids that sort in recording order.
pub fn numbered_rows(range: std::ops::Range<usize>) -> Vec<AuditRow> {
    range
        .map(|i| {
            let mut r = row(
                &format!("row-{i:06}"),
                t0() + SignedDuration::from_millis(i as i64),
            );
            r.agent_run_id = Some("run-bulk".into());
            r
        })
        .collect()
}
