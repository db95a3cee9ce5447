//! `POST /v1/audit`: sidecars ship NDJSON audit rows; the controller validates them and writes
//! them to the configured sink (keybrake-audit). A sidecar may only report calls of its own
//! namespace: rows naming another namespace, or a `vault_key_id` of another namespace, reject
//! the whole batch (403). A `vault_key_id` of the caller's namespace that is not bound to the
//! caller's service account (another SA's key, or a key this replica does not know, e.g. deleted
//! since) is stored with `vault_key_id` cleared: the row is kept but never attributed to a key
//! the caller does not hold. Refusing instead would wedge the sidecar's spool (403 is retried
//! forever) for legitimate rows of a key deleted or re-bound while they were spooled.
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use keybrake_api::{KeyId, audit::AuditRow};
use keybrake_audit::{
    AuditSink, WriteOutcome,
    ingest::{IngestError, IngestLimits, parse_ndjson, read_body_limited},
};

use crate::{
    index::{PolicyIndex, Scope},
    metrics::Metrics,
    server::{Body, IngestHandler},
    spend::SpendLedger,
};

pub struct AuditIngest<S: AuditSink> {
    sink: Arc<S>,
    index: Arc<PolicyIndex>,
    spend: Option<Arc<SpendLedger>>,
    limits: IngestLimits,
    metrics: Metrics,
}

impl<S: AuditSink> AuditIngest<S> {
    pub fn new(
        sink: Arc<S>,
        index: Arc<PolicyIndex>,
        limits: IngestLimits,
        metrics: Metrics,
    ) -> Self {
        AuditIngest {
            sink,
            index,
            spend: None,
            limits,
            metrics,
        }
    }

    /// Counts the stored rows' spend into `ledger` (for `status.spentTodayUsd`).
    pub fn with_spend(mut self, ledger: Arc<SpendLedger>) -> Self {
        self.spend = Some(ledger);
        self
    }
}

/// What a row's `vault_key_id` claims, judged against the caller's scope.
#[derive(Debug, PartialEq, Eq)]
enum KeyClaim {
    /// No key (e.g. a `key_unknown` denial) or a key bound to the caller's service account.
    Held,
    /// A key of the caller's namespace not bound to the caller (another SA's, or unknown here).
    NotHeld,
    /// Malformed or another namespace's key: a sidecar never receives those.
    Foreign,
}

fn judge_key(index: &PolicyIndex, scope: &Scope, row: &AuditRow) -> KeyClaim {
    let Some(text) = row.vault_key_id.as_deref() else {
        return KeyClaim::Held;
    };
    let Some((namespace, name)) = text.split_once('/') else {
        return KeyClaim::Foreign;
    };
    if namespace != scope.namespace || name.is_empty() || name.contains('/') {
        return KeyClaim::Foreign;
    }
    match index.bound_service_account(&KeyId::new(namespace, name)) {
        Some(sa) if sa == scope.service_account => KeyClaim::Held,
        _ => KeyClaim::NotHeld,
    }
}

/// The ingest decision for one authenticated body: status and a short JSON or text answer.
pub async fn ingest_for_scope<S: AuditSink>(
    sink: &S,
    index: &PolicyIndex,
    scope: &Scope,
    body: &[u8],
    limits: &IngestLimits,
    metrics: &Metrics,
) -> (StatusCode, String) {
    ingest_counting_spend(sink, index, None, scope, body, limits, metrics).await
}

/// [`ingest_for_scope`], adding the spend of newly stored rows to `spend`. A chunk the sink
/// reports duplicates for (a replay) is not counted: which of its rows are new is unknown.
pub async fn ingest_counting_spend<S: AuditSink>(
    sink: &S,
    index: &PolicyIndex,
    spend: Option<&SpendLedger>,
    scope: &Scope,
    body: &[u8],
    limits: &IngestLimits,
    metrics: &Metrics,
) -> (StatusCode, String) {
    let mut rows = match parse_ndjson(body, limits) {
        Ok(rows) => rows,
        Err(e) => return (status_of(&e), format!("{e}\n")),
    };
    for row in &mut rows {
        match row.namespace.as_deref() {
            None => row.namespace = Some(scope.namespace.clone()),
            Some(ns) if ns == scope.namespace => {}
            Some(_) => {
                return (
                    StatusCode::FORBIDDEN,
                    "rows must belong to the caller's namespace\n".into(),
                );
            }
        }
        match judge_key(index, scope, row) {
            KeyClaim::Held => {}
            KeyClaim::Foreign => {
                return (
                    StatusCode::FORBIDDEN,
                    "rows must name keys of the caller's namespace\n".into(),
                );
            }
            KeyClaim::NotHeld => {
                tracing::warn!(
                    %scope,
                    row = %row.id,
                    vault_key_id = row.vault_key_id.as_deref().unwrap_or_default(),
                    "audit row names a key not bound to the caller's service account; storing it unattributed"
                );
                row.vault_key_id = None;
            }
        }
    }
    let mut outcome = WriteOutcome::default();
    for chunk in rows.chunks(limits.batch_rows.max(1)) {
        match sink.write_batch(chunk).await {
            Ok(o) => {
                if let Some(spend) = spend
                    && o.duplicates == 0
                {
                    spend.record_rows(chunk, jiff::Timestamp::now());
                }
                outcome.add(o);
            }
            Err(e) => {
                self::log_sink_error(&e);
                metrics.audit_sink_errors.inc();
                // 503: the sidecar keeps the rows spooled and retries.
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit sink unavailable\n".into(),
                );
            }
        }
    }
    metrics.audit_ingested_rows.inc_by(outcome.inserted);
    (
        StatusCode::OK,
        serde_json::json!({
            "rows": rows.len(),
            "inserted": outcome.inserted,
            "duplicates": outcome.duplicates,
        })
        .to_string(),
    )
}

fn log_sink_error(e: &keybrake_audit::SinkError) {
    tracing::warn!(error = %e, "audit sink write failed");
}

fn status_of(e: &IngestError) -> StatusCode {
    StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST)
}

impl<S: AuditSink> IngestHandler for AuditIngest<S> {
    fn handle(
        &self,
        scope: Scope,
        request: Request<Incoming>,
    ) -> BoxFuture<'static, Response<Body>> {
        let sink = self.sink.clone();
        let index = self.index.clone();
        let spend = self.spend.clone();
        let limits = self.limits;
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let (status, text) =
                match read_body_limited(request.into_body(), limits.max_body_bytes).await {
                    Ok(body) => {
                        ingest_counting_spend(
                            &*sink,
                            &index,
                            spend.as_deref(),
                            &scope,
                            &body,
                            &limits,
                            &metrics,
                        )
                        .await
                    }
                    Err(e) => (status_of(&e), format!("{e}\n")),
                };
            let mut res = Response::new(Full::new(Bytes::from(text)).boxed());
            *res.status_mut() = status;
            let content_type = if status == StatusCode::OK {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            };
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(content_type),
            );
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use keybrake_api::audit::AuditRow;
    use keybrake_audit::SinkError;

    use super::*;

    #[derive(Default)]
    struct MemorySink {
        rows: Mutex<Vec<AuditRow>>,
        fail: bool,
    }

    impl AuditSink for MemorySink {
        fn write_batch(
            &self,
            rows: &[AuditRow],
        ) -> impl Future<Output = Result<WriteOutcome, SinkError>> + Send {
            let result = if self.fail {
                Err(SinkError::BadConfig("down".into()))
            } else {
                self.rows.lock().unwrap().extend_from_slice(rows);
                Ok(WriteOutcome {
                    inserted: rows.len() as u64,
                    duplicates: 0,
                })
            };
            async move { result }
        }
    }

    fn row(id: &str, namespace: Option<&str>) -> String {
        let ns = namespace.map_or("null".to_owned(), |n| format!("\"{n}\""));
        format!(
            r#"{{"id":"{id}","started_at":"2026-11-30T23:00:00Z","duration_ms":12,"vault_key_id":"agents/k","agent_name":"a","agent_run_id":null,"namespace":{ns},"pod":null,"vendor":"stripe","operation":null,"method":"GET","path_template":null,"policy_verdict":"allow","verdict_reason":null,"customer_scope_id":null,"vendor_status":200,"vendor_request_id":null,"cost_usd_parsed":null,"cost_source":"none","cap_usage_after_usd":null,"policy_revision":1}}"#
        )
    }

    #[tokio::test]
    async fn writes_own_namespace_rows_and_refuses_others() {
        let sink = MemorySink::default();
        let metrics = Metrics::new();
        let scope = Scope::new("agents", "refund");
        let index = PolicyIndex::new(1);
        let limits = IngestLimits::default();
        let body = format!("{}\n{}\n", row("r1", Some("agents")), row("r2", None));
        let (status, text) =
            ingest_for_scope(&sink, &index, &scope, body.as_bytes(), &limits, &metrics).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert!(text.contains("\"inserted\":2"));
        assert_eq!(
            sink.rows.lock().unwrap()[1].namespace.as_deref(),
            Some("agents")
        );
        assert_eq!(metrics.audit_ingested_rows.get(), 2);

        let foreign = row("r3", Some("billing"));
        let (status, _) =
            ingest_for_scope(&sink, &index, &scope, foreign.as_bytes(), &limits, &metrics).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(sink.rows.lock().unwrap().len(), 2);

        let (status, _) =
            ingest_for_scope(&sink, &index, &scope, b"{not json}\n", &limits, &metrics).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        let down = MemorySink {
            fail: true,
            ..MemorySink::default()
        };
        let (status, _) =
            ingest_for_scope(&down, &index, &scope, body.as_bytes(), &limits, &metrics).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(metrics.audit_sink_errors.get(), 1);
    }
}
