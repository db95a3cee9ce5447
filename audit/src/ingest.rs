//! The controller's audit ingest: an NDJSON body in, rows in the sink, counts or a typed error
//! out. Framework-agnostic (bytes in, result out) so the controller mounts it on
//! `POST /v1/audit` behind its own authentication; [`read_body_limited`] collects a hyper body
//! without ever buffering more than the limit.
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use keybrake_api::audit::AuditRow;

use crate::sink::{AuditSink, SinkError, WriteOutcome};

#[derive(Clone, Copy, Debug)]
pub struct IngestLimits {
    pub max_body_bytes: usize,
    pub max_line_bytes: usize,
    /// Rows per sink write.
    pub batch_rows: usize,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_body_bytes: 8 * 1024 * 1024,
            max_line_bytes: 64 * 1024,
            batch_rows: 2000,
        }
    }
}

/// Longest accepted row id (a UUID is 36 characters).
pub const MAX_ID_LEN: usize = 128;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IngestReport {
    pub rows: u64,
    pub inserted: u64,
    pub duplicates: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("audit body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("audit body: line {line} longer than {limit} bytes")]
    LineTooLong { line: usize, limit: usize },
    #[error("audit body: line {line}: {reason}")]
    InvalidRow { line: usize, reason: String },
    #[error("audit body could not be read: {0}")]
    Body(String),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

impl IngestError {
    /// The HTTP status to answer with. A sink failure is 503 so the sidecar spools and retries;
    /// a malformed body is 4xx (retrying it would never succeed).
    pub fn http_status(&self) -> u16 {
        match self {
            IngestError::BodyTooLarge { .. } | IngestError::LineTooLong { .. } => 413,
            IngestError::InvalidRow { .. } | IngestError::Body(_) => 400,
            IngestError::Sink(_) => 503,
        }
    }
}

/// Parses and validates a whole body before anything is written: a bad line rejects the batch.
pub fn parse_ndjson(body: &[u8], limits: &IngestLimits) -> Result<Vec<AuditRow>, IngestError> {
    if body.len() > limits.max_body_bytes {
        return Err(IngestError::BodyTooLarge {
            limit: limits.max_body_bytes,
        });
    }
    let mut rows = Vec::new();
    for (index, line) in body.split(|b| *b == b'\n').enumerate() {
        let line_no = index + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > limits.max_line_bytes {
            return Err(IngestError::LineTooLong {
                line: line_no,
                limit: limits.max_line_bytes,
            });
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let row: AuditRow = serde_json::from_slice(line).map_err(|e| IngestError::InvalidRow {
            line: line_no,
            reason: e.to_string(),
        })?;
        if row.id.is_empty() || row.id.len() > MAX_ID_LEN {
            return Err(IngestError::InvalidRow {
                line: line_no,
                reason: format!("id must be 1..={MAX_ID_LEN} characters"),
            });
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Parses `body` and writes its rows to `sink` in batches.
pub async fn ingest_ndjson<S: AuditSink>(
    sink: &S,
    body: &[u8],
    limits: &IngestLimits,
) -> Result<IngestReport, IngestError> {
    let rows = parse_ndjson(body, limits)?;
    let mut outcome = WriteOutcome::default();
    for chunk in rows.chunks(limits.batch_rows.max(1)) {
        outcome.add(sink.write_batch(chunk).await?);
    }
    Ok(IngestReport {
        rows: rows.len() as u64,
        inserted: outcome.inserted,
        duplicates: outcome.duplicates,
    })
}

/// Collects a request body, failing with [`IngestError::BodyTooLarge`] past `limit` bytes.
pub async fn read_body_limited<B>(body: B, limit: usize) -> Result<Bytes, IngestError>
where
    B: http_body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(IngestError::BodyTooLarge { limit })
        }
        Err(e) => Err(IngestError::Body(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROW: &str = r#"{"id":"r1","started_at":"2026-11-30T23:00:00Z","duration_ms":12,"vault_key_id":"shop/stripe","agent_name":"refunder","agent_run_id":"run-1","namespace":"shop","pod":"refunder-0","vendor":"stripe","operation":"refunds.create","method":"POST","path_template":"/v1/refunds","policy_verdict":"allow","verdict_reason":null,"customer_scope_id":"cus_1","vendor_status":200,"vendor_request_id":"req_1","cost_usd_parsed":"12.50","cost_source":"parsed","cap_usage_after_usd":"40.00","policy_revision":7}"#;

    #[test]
    fn parses_rows_and_skips_blank_lines() {
        let body = format!("{ROW}\n\n{}\r\n", ROW.replace("\"r1\"", "\"r2\""));
        let rows = parse_ndjson(body.as_bytes(), &IngestLimits::default()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].id, "r2");
        assert_eq!(rows[0].cost_usd_parsed.unwrap().micros(), 12_500_000);
    }

    #[test]
    fn rejects_oversized_and_malformed_bodies() {
        let limits = IngestLimits {
            max_body_bytes: ROW.len() * 2,
            max_line_bytes: ROW.len(),
            batch_rows: 10,
        };
        let too_big = format!("{ROW}\n{ROW}\n{ROW}\n");
        let err = parse_ndjson(too_big.as_bytes(), &limits).unwrap_err();
        assert_eq!(err.http_status(), 413);
        let long_line = format!("{ROW} ");
        assert!(matches!(
            parse_ndjson(long_line.as_bytes(), &limits),
            Err(IngestError::LineTooLong { line: 1, .. })
        ));
        let bad = format!("{ROW}\n{{\"id\":\"x\"}}\n");
        let err = parse_ndjson(bad.as_bytes(), &IngestLimits::default()).unwrap_err();
        assert!(
            matches!(err, IngestError::InvalidRow { line: 2, .. }),
            "{err}"
        );
        assert_eq!(err.http_status(), 400);
        let empty_id = ROW.replace("\"r1\"", "\"\"");
        assert!(parse_ndjson(empty_id.as_bytes(), &IngestLimits::default()).is_err());
    }

    #[tokio::test]
    async fn body_limit_is_enforced_while_reading() {
        let body = Full::new(Bytes::from(vec![b'x'; 100]));
        assert!(matches!(
            read_body_limited(body, 99).await,
            Err(IngestError::BodyTooLarge { limit: 99 })
        ));
        let body = Full::new(Bytes::from(vec![b'x'; 100]));
        assert_eq!(read_body_limited(body, 100).await.unwrap().len(), 100);
    }

    use http_body_util::Full;
}
