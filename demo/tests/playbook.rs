//! The demo's audit path against a real SQLite store: JSON lines in through the ingest code,
//! the playbook queries out, with every column named.
use jiff::{SignedDuration, Timestamp};
use keybrake_api::{
    Usd,
    audit::{AuditRow, CostSource},
    crd::Vendor,
    verdict::Verdict,
};
use keybrake_demo::playbook;

fn row(n: i64, now: Timestamp, verdict: Verdict, customer: &str, cents: i64) -> AuditRow {
    let allowed = verdict == Verdict::Allow;
    AuditRow {
        id: format!("00000000-0000-4000-8000-{n:012}"),
        started_at: now - SignedDuration::from_secs(60 - n),
        duration_ms: 3,
        vault_key_id: Some("keybrake-demo/refund-agent-run-42".into()),
        agent_name: Some("refund-agent".into()),
        agent_run_id: Some("run-42".into()),
        namespace: Some("keybrake-demo".into()),
        pod: None,
        vendor: Vendor::Stripe,
        operation: Some("refunds.create".into()),
        method: "POST".into(),
        path_template: Some("/v1/refunds".into()),
        policy_verdict: verdict,
        verdict_reason: None,
        customer_scope_id: Some(customer.into()),
        vendor_status: if allowed { 200 } else { 0 },
        vendor_request_id: None,
        cost_usd_parsed: allowed.then(|| Usd::from_cents(cents)),
        cost_source: if allowed {
            CostSource::Estimated
        } else {
            CostSource::None
        },
        cap_usage_after_usd: None,
        policy_revision: 1,
    }
}

#[tokio::test]
async fn rows_load_once_and_the_playbook_answers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let now = Timestamp::now();
    let rows = [
        row(1, now, Verdict::Allow, "cus_a", 1250),
        row(2, now, Verdict::Allow, "cus_b", 500),
        row(3, now, Verdict::Allow, "cus_a", 250),
        row(4, now, Verdict::KeyRevoked, "cus_b", 0),
    ];
    let body: String = rows
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    let sink = playbook::open(&db).await.unwrap();
    let first = playbook::load(&sink, body.as_bytes()).await.unwrap();
    assert_eq!((first.rows, first.inserted, first.duplicates), (4, 4, 0));
    // Loading the same file again stores nothing twice.
    let again = playbook::load(&sink, body.as_bytes()).await.unwrap();
    assert_eq!((again.inserted, again.duplicates), (0, 4));

    let answers = playbook::morning_after(&sink, "keybrake-demo/refund-agent-run-42", now)
        .await
        .unwrap();
    for a in &answers {
        for r in &a.rows {
            assert_eq!(
                r.len(),
                a.columns.len(),
                "{}: columns {:?}",
                a.query.title,
                a.columns
            );
        }
    }
    assert_eq!(answers[0].rows.len(), 4, "the key's timeline");
    assert_eq!(
        answers[1].rows,
        [
            vec!["cus_a".to_owned(), "2".into(), "15.000000".into()],
            vec!["cus_b".to_owned(), "2".into(), "5.000000".into()],
        ]
    );
    assert_eq!(
        answers[2].rows,
        [vec![
            "keybrake-demo/refund-agent-run-42".to_owned(),
            "3".into()
        ]]
    );
    assert_eq!(
        answers[3].rows,
        [vec!["key_revoked".to_owned(), "1".into()]]
    );
    let rendered = answers[1].render(None);
    let header: Vec<&str> = rendered
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["customer_scope_id", "calls", "cost_usd"]);
}
