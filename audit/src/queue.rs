//! The bounded in-memory queue between the request path and the shipper. Recording never
//! blocks and never awaits: when the queue is full the row is dropped, counted and logged, and
//! the caller learns it from the result (the sidecar decides whether that fails the call).
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use keybrake_api::audit::AuditRow;
use tokio::sync::mpsc;

use crate::metrics::AuditMetrics;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("audit queue full; row dropped")]
    Full,
    #[error("audit shipper stopped; row dropped")]
    Closed,
}

/// The request path's handle. Cheap to clone.
#[derive(Clone)]
pub struct AuditQueue {
    tx: mpsc::Sender<AuditRow>,
    metrics: AuditMetrics,
    drops: Arc<AtomicU64>,
}

/// The shipper's end.
pub struct QueueReceiver {
    rx: mpsc::Receiver<AuditRow>,
    metrics: AuditMetrics,
}

pub fn channel(capacity: usize, metrics: AuditMetrics) -> (AuditQueue, QueueReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        AuditQueue {
            tx,
            metrics: metrics.clone(),
            drops: Arc::new(AtomicU64::new(0)),
        },
        QueueReceiver { rx, metrics },
    )
}

impl AuditQueue {
    pub fn record(&self, row: AuditRow) -> Result<(), RecordError> {
        let result = self.tx.try_send(row).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RecordError::Full,
            mpsc::error::TrySendError::Closed(_) => RecordError::Closed,
        });
        self.metrics
            .queue_depth
            .set((self.tx.max_capacity() - self.tx.capacity()) as i64);
        if let Err(e) = &result {
            self.metrics.dropped_rows.inc();
            // Log the 1st, 2nd, 4th, 8th... drop: visible without flooding the log.
            let n = self.drops.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::error!(dropped_rows = n, reason = %e, "audit rows dropped");
            }
        }
        result
    }
}

impl QueueReceiver {
    /// Waits for at least one row, then takes what is already queued, up to `max` rows.
    /// `None` once every [`AuditQueue`] is dropped and the queue is empty.
    pub async fn recv_batch(&mut self, max: usize) -> Option<Vec<AuditRow>> {
        let first = self.rx.recv().await?;
        let mut batch = vec![first];
        self.fill(&mut batch, max);
        Some(batch)
    }

    /// Whatever is queued now, up to `max` rows, without waiting.
    pub fn try_recv_batch(&mut self, max: usize) -> Vec<AuditRow> {
        let mut batch = Vec::new();
        self.fill(&mut batch, max);
        batch
    }

    fn fill(&mut self, batch: &mut Vec<AuditRow>, max: usize) {
        while batch.len() < max {
            match self.rx.try_recv() {
                Ok(row) => batch.push(row),
                Err(_) => break,
            }
        }
        self.metrics.queue_depth.set(self.rx.len() as i64);
    }
}
