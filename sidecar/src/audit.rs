//! The audit seam: after each call the proxy hands one [`AuditRow`] to an [`AuditSink`]. The
//! sink must not block the request path. Built in: [`NoopAudit`] and [`JsonLinesAudit`] (a
//! bounded queue drained to stdout by a task). The audit work plugs the SQLite/PostgreSQL sinks
//! and the controller shipper in behind the same trait.
use std::{io::Write, sync::Arc};

use keybrake_api::audit::AuditRow;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

pub trait AuditSink: Send + Sync {
    /// Queues one row. Never blocks; a full queue drops (and counts) the row.
    fn submit(&self, row: AuditRow);

    /// `false` lets the proxy skip building rows nobody keeps.
    fn wants_rows(&self) -> bool {
        true
    }
}

pub struct NoopAudit;

impl AuditSink for NoopAudit {
    fn submit(&self, _row: AuditRow) {}

    fn wants_rows(&self) -> bool {
        false
    }
}

/// JSON lines on stdout, written by a background task from a bounded queue.
pub struct JsonLinesAudit {
    tx: mpsc::Sender<AuditRow>,
    metrics: Arc<Metrics>,
}

impl JsonLinesAudit {
    /// Must be called inside a Tokio runtime (spawns the writer task).
    pub fn spawn(capacity: usize, metrics: Arc<Metrics>) -> Self {
        let (tx, mut rx) = mpsc::channel::<AuditRow>(capacity.max(1));
        let depth = metrics.audit_queue_depth.clone();
        tokio::spawn(async move {
            while let Some(row) = rx.recv().await {
                depth.dec();
                let mut line = serde_json::to_vec(&row).unwrap_or_default();
                line.push(b'\n');
                // stdout is a pipe to the log collector; a write error there has nowhere to go.
                let _ = std::io::stdout().lock().write_all(&line);
            }
        });
        JsonLinesAudit { tx, metrics }
    }
}

impl AuditSink for JsonLinesAudit {
    fn submit(&self, row: AuditRow) {
        match self.tx.try_send(row) {
            Ok(()) => self.metrics.audit_queue_depth.inc(),
            Err(_) => self.metrics.audit_dropped.inc(),
        }
    }
}

/// A sink that hands rows to a channel: tests and in-process consumers read them.
pub struct ChannelAudit(pub mpsc::UnboundedSender<AuditRow>);

impl AuditSink for ChannelAudit {
    fn submit(&self, row: AuditRow) {
        let _ = self.0.send(row);
    }
}

/// A fresh row id: UUID version 4 text, so spool replays are idempotent.
pub fn new_row_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_ids_are_uuid_v4() {
        let id = new_row_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(id, new_row_id());
    }
}
