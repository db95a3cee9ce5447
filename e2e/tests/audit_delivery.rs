//! Audit delivery end to end: the real `keybrake-sidecar` binary in controller mode (policy from
//! the watch stream, rows shipped to `POST /v1/audit` over HTTP/2 + TLS with its ServiceAccount
//! token), the real controller writing them to its SQLite sink, on the shared kube-apiserver.
//!
//! The controller is killed mid-run while the agent keeps calling: rows go to the sidecar's disk
//! spool, and once a new controller answers on the same address they are replayed. Every call
//! ends up as exactly one row, and the spool drains back to 0 bytes.
use std::{path::Path, process::Command, sync::Arc, time::Duration};

use keybrake_api::{SecretString, audit::AuditRow};
use keybrake_audit::{
    row::Value,
    sink::SqliteSink,
    transport::{HttpTransport, StaticToken, Transport, TransportError},
};
use keybrake_e2e::{
    fixtures::{self, SidecarProcess},
    processes::{ControllerTls, free_port, poll},
};
use keybrake_testkit::{FakeKind, FakeVendor};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);
const STRIPE_SECRET: &str = "sk_test_upstream_audit_e2e";
const KEY: &str = "audit-key";
const SA: &str = "agent";

/// What the agent did, to compare with what the controller stored.
#[derive(Default)]
struct Tally {
    allowed: i64,
    denied: i64,
}

impl Tally {
    fn total(&self) -> i64 {
        self.allowed + self.denied
    }

    /// `n` allowed reads and one call outside the allowlist.
    async fn calls(&mut self, sidecar: &SidecarProcess, vault_key: &str, n: usize) {
        for _ in 0..n {
            let (status, verdict) = sidecar
                .call("GET", "/stripe/v1/customers/cus_1", vault_key)
                .await;
            assert_eq!((status, verdict.as_str()), (200, "allow"));
            self.allowed += 1;
        }
        let (status, verdict) = sidecar.call("POST", "/stripe/v1/refunds", vault_key).await;
        assert_eq!((status, verdict.as_str()), (403, "operation_denied"));
        self.denied += 1;
    }
}

async fn stored(db: &Path, sql: &str) -> Vec<Vec<Value>> {
    let sink = SqliteSink::open(db.to_owned())
        .await
        .expect("open the controller's audit db");
    sink.query(sql, &[]).await.expect("audit query")
}

async fn stored_count(db: &Path) -> i64 {
    stored(db, "SELECT count(*) FROM agent_call_audit").await[0][0]
        .as_i64()
        .unwrap()
}

async fn setup_key(ns: &keybrake_e2e::TestNamespace<'_>, stripe_url: &str) -> String {
    fixtures::put_upstream_secret(ns, fixtures::UPSTREAM_SECRET, STRIPE_SECRET).await;
    let key = fixtures::stripe_vault_key(
        KEY,
        SA,
        stripe_url,
        json!({"agent": {"name": "refund-agent", "runId": "run-audit"}}),
    );
    fixtures::create_key(ns, &key).await;
    fixtures::minted_token(ns, KEY).await
}

fn row(id: &str, namespace: &str, vault_key_id: &str) -> AuditRow {
    serde_json::from_value(json!({
        "id": id, "started_at": "2026-11-30T23:00:00Z", "duration_ms": 1,
        "vault_key_id": vault_key_id, "agent_name": "refund-agent", "agent_run_id": null,
        "namespace": namespace, "pod": null, "vendor": "stripe", "operation": null,
        "method": "GET", "path_template": null, "policy_verdict": "allow", "verdict_reason": null,
        "customer_scope_id": null, "vendor_status": 200, "vendor_request_id": null,
        "cost_usd_parsed": null, "cost_source": "none", "cap_usage_after_usd": null,
        "policy_revision": 1,
    }))
    .expect("AuditRow")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_rows_survive_a_controller_outage_exactly_once() {
    let ns = fixtures::namespace_with_crds("audit-dlv").await;
    let tls = ControllerTls::new();
    let db_path = tls.dir.path().join("audit.db");
    let db = db_path.as_path();
    let sink = format!("sqlite://{}", db.display());
    let port = free_port();
    let mut controller =
        fixtures::ready_controller(&ns, &tls, "audit-a", port, &["--audit-sink", &sink]).await;
    let stripe = FakeVendor::start(FakeKind::Stripe, STRIPE_SECRET)
        .await
        .unwrap();
    let vault_key = setup_key(&ns, &stripe.url()).await;
    let sa_token = fixtures::sa_token(&ns, SA).await;
    let token_file = tls.dir.path().join("sa-token");
    std::fs::write(&token_file, &sa_token).unwrap();

    let sidecar_process = SidecarProcess::controller_mode(
        tls.dir.path(),
        &controller.stream_url,
        &tls.ca(),
        &token_file,
        &[
            "--spool-max-bytes",
            "10000000",
            "--audit-retry-max",
            "200ms",
            // The outage below must not make the policy stale: calls keep being allowed.
            "--staleness-bound",
            "5m",
        ],
    )
    .await;
    let sidecar = &sidecar_process;
    sidecar.wait_ready().await;

    // 1. Controller up: rows arrive as calls happen.
    let mut tally = Tally::default();
    tally.calls(sidecar, &vault_key, 10).await;
    let expected = tally.total();
    poll(
        "rows of the first calls in SQLite",
        DEADLINE,
        || async move { (stored_count(db).await == expected).then_some(()) },
    )
    .await;

    // 2. Controller gone: calls keep working, their rows go to the spool.
    controller.kill();
    tally.calls(sidecar, &vault_key, 20).await;
    poll(
        "rows spooled while the controller is down",
        DEADLINE,
        || async move { (sidecar.metric("keybrake_audit_spool_bytes").await > 0.0).then_some(()) },
    )
    .await;
    assert_eq!(
        stored_count(db).await,
        expected,
        "nothing stored while down"
    );
    let spooled_bytes = sidecar.metric("keybrake_audit_spool_bytes").await;

    // 3. A new controller on the same address: the spool replays, then new rows follow.
    let controller =
        fixtures::ready_controller(&ns, &tls, "audit-b", port, &["--audit-sink", &sink]).await;
    let back = std::time::Instant::now();
    tally.calls(sidecar, &vault_key, 5).await;
    let expected = tally.total();
    poll(
        "every row stored once the controller is back",
        DEADLINE,
        || async move {
            let n = stored_count(db).await;
            assert!(n <= expected, "{n} rows for {expected} calls");
            (n == expected).then_some(())
        },
    )
    .await;
    poll("the spool drained", DEADLINE, || async move {
        (sidecar.metric("keybrake_audit_spool_bytes").await == 0.0).then_some(())
    })
    .await;
    eprintln!(
        "audit_delivery: {} rows ({spooled_bytes} bytes were spooled) stored, spool drained, \
         {} ms after the controller was ready again",
        tally.total(),
        back.elapsed().as_millis()
    );
    assert_eq!(
        sidecar.metric("keybrake_audit_dropped_rows_total").await,
        0.0
    );

    // Exactly once, and the right rows.
    let counts = stored(
        db,
        "SELECT count(*), count(DISTINCT id), \
         sum(CASE WHEN policy_verdict = 'allow' AND vendor_status = 200 THEN 1 ELSE 0 END), \
         sum(CASE WHEN policy_verdict = 'operation_denied' AND vendor_status = 0 THEN 1 ELSE 0 END) \
         FROM agent_call_audit",
    )
    .await;
    let counts: Vec<i64> = counts[0].iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(
        counts,
        vec![expected, expected, tally.allowed, tally.denied],
        "[rows, distinct ids, allowed, denied]"
    );
    let keys = stored(
        db,
        "SELECT DISTINCT namespace, vault_key_id, agent_name FROM agent_call_audit",
    )
    .await;
    let key_id = format!("{}/{KEY}", ns.name());
    assert_eq!(
        keys,
        vec![vec![
            Value::Text(ns.name().to_owned()),
            Value::Text(key_id),
            Value::Text("refund-agent".into()),
        ]]
    );
    assert_eq!(stripe.request_count() as i64, tally.allowed);

    // The ingest endpoint only takes rows of the caller's own namespace.
    let transport = HttpTransport::new(
        &controller.stream_url,
        &std::fs::read(tls.ca()).unwrap(),
        Arc::new(StaticToken(SecretString::new(sa_token.clone()))),
        Duration::from_secs(10),
    )
    .unwrap();
    match transport
        .send(&[row("forged-ns", "someone-else", "someone-else/k")])
        .await
    {
        Err(TransportError::Status { status: 403, .. }) => {}
        other => panic!("a row of another namespace must be refused, got {other:?}"),
    }
    assert_eq!(stored_count(db).await, expected);

    // SIGTERM: the sidecar flushes and exits 0; no secret in its logs or the stored rows.
    let mut sidecar = sidecar_process;
    let pid = sidecar.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = poll("the sidecar to exit", DEADLINE, || {
        let exited = sidecar.child.try_wait().ok().flatten();
        async move { exited }
    })
    .await;
    let logs = sidecar.log_text();
    assert!(status.success(), "exit {status:?}:\n{logs}");
    let dump = stored(db, "SELECT * FROM agent_call_audit").await;
    let dump = format!("{dump:?}");
    for secret in [vault_key.as_str(), STRIPE_SECRET, sa_token.as_str()] {
        assert!(!logs.contains(secret), "a secret reached the sidecar log");
        assert!(!dump.contains(secret), "a secret reached the audit rows");
    }
}
