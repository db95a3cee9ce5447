//! `POST /v1/audit` identity: rows may only be attributed to keys bound to the caller's
//! service account, checked against a real index (no apiserver needed).
use std::sync::Mutex;

use http::StatusCode;
use keybrake_api::{
    AgentRef, KeyId, KeyState, Limits, OnStale, SecretKeyRef, Upstream, VaultKeySpec, Vendor,
    WorkloadRef, audit::AuditRow,
};
use keybrake_audit::{AuditSink, SinkError, WriteOutcome, ingest::IngestLimits};
use keybrake_controller::{
    audit_ingest::ingest_for_scope,
    index::{KeySource, PolicyIndex, Scope},
    metrics::Metrics,
};

#[derive(Default)]
struct MemorySink {
    rows: Mutex<Vec<AuditRow>>,
}

impl AuditSink for MemorySink {
    fn write_batch(
        &self,
        rows: &[AuditRow],
    ) -> impl Future<Output = Result<WriteOutcome, SinkError>> + Send {
        self.rows.lock().unwrap().extend_from_slice(rows);
        let inserted = rows.len() as u64;
        async move {
            Ok(WriteOutcome {
                inserted,
                duplicates: 0,
            })
        }
    }
}

fn source(sa: &str) -> KeySource {
    KeySource {
        spec: VaultKeySpec {
            vendor: Vendor::Stripe,
            upstream: Upstream {
                secret_ref: SecretKeyRef {
                    name: "stripe-live".into(),
                    key: "api-key".into(),
                },
                base_url: None,
            },
            state: KeyState::Active,
            expires_at: None,
            ttl: None,
            agent: AgentRef {
                name: "agent".into(),
                run_id: None,
            },
            workload: WorkloadRef {
                service_account_name: sa.into(),
            },
            allow: vec![],
            customers: vec![],
            limits: Limits::default(),
            on_stale: OnStale::Deny,
        },
        created: None,
        generation: 1,
    }
}

fn row(id: &str, key: Option<&str>) -> String {
    let key = key.map_or("null".to_owned(), |k| format!("\"{k}\""));
    format!(
        r#"{{"id":"{id}","started_at":"2026-11-30T23:00:00Z","duration_ms":12,"vault_key_id":{key},"agent_name":"a","agent_run_id":null,"namespace":"agents","pod":null,"vendor":"stripe","operation":null,"method":"GET","path_template":null,"policy_verdict":"allow","verdict_reason":null,"customer_scope_id":null,"vendor_status":200,"vendor_request_id":null,"cost_usd_parsed":null,"cost_source":"none","cap_usage_after_usd":null,"policy_revision":1}}"#
    ) + "\n"
}

fn index() -> PolicyIndex {
    let index = PolicyIndex::new(1);
    index.upsert_vault_key(KeyId::new("agents", "mine"), source("refund"));
    index.upsert_vault_key(KeyId::new("agents", "theirs"), source("billing"));
    index.upsert_vault_key(KeyId::new("other-ns", "other-key"), source("refund"));
    index
}

async fn ingest(sink: &MemorySink, index: &PolicyIndex, body: &str) -> StatusCode {
    let scope = Scope::new("agents", "refund");
    let (status, _) = ingest_for_scope(
        sink,
        index,
        &scope,
        body.as_bytes(),
        &IngestLimits::default(),
        &Metrics::new(),
    )
    .await;
    status
}

fn stored_key(sink: &MemorySink, id: &str) -> Option<Option<String>> {
    sink.rows
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.id == id)
        .map(|r| r.vault_key_id.clone())
}

#[tokio::test]
async fn another_namespaces_key_refuses_the_whole_batch() {
    let sink = MemorySink::default();
    let index = index();
    for foreign in [
        "other-ns/other-key",
        "other-ns/missing",
        "no-slash",
        "agents/a/b",
    ] {
        let body = row("ok", Some("agents/mine")) + &row("bad", Some(foreign));
        assert_eq!(
            ingest(&sink, &index, &body).await,
            StatusCode::FORBIDDEN,
            "{foreign}"
        );
    }
    assert!(
        sink.rows.lock().unwrap().is_empty(),
        "nothing of a refused batch is stored"
    );
}

#[tokio::test]
async fn own_keys_are_kept_and_keys_not_held_are_stored_unattributed() {
    let sink = MemorySink::default();
    let index = index();
    let body = row("own", Some("agents/mine"))
        + &row("other-sa", Some("agents/theirs"))
        + &row("deleted", Some("agents/gone"))
        + &row("unknown-key", None);
    assert_eq!(ingest(&sink, &index, &body).await, StatusCode::OK);
    assert_eq!(stored_key(&sink, "own"), Some(Some("agents/mine".into())));
    assert_eq!(stored_key(&sink, "other-sa"), Some(None));
    assert_eq!(stored_key(&sink, "deleted"), Some(None));
    assert_eq!(stored_key(&sink, "unknown-key"), Some(None));
    assert!(
        sink.rows
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.namespace.as_deref() == Some("agents"))
    );
}
