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

    /// Like [`QueueReceiver::recv_batch`], but when the first rows make less than half a batch,
    /// waits `linger` once and takes what arrived meanwhile. At moderate rates that makes one
    /// write (one transaction, one wake-up of the delivery task) per `linger` instead of one
    /// per call, and that work shares the request path's core. Rows reach the sink up to
    /// `linger` later; a closed queue still ends the batch after at most `linger`.
    pub async fn recv_batch_lingering(
        &mut self,
        max: usize,
        linger: std::time::Duration,
    ) -> Option<Vec<AuditRow>> {
        let mut batch = self.recv_batch(max).await?;
        if !linger.is_zero() && batch.len() < max / 2 {
            tokio::time::sleep(linger).await;
            self.fill(&mut batch, max);
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::AuditMetrics;

    fn row(n: usize) -> AuditRow {
        serde_json::from_value(serde_json::json!({
            "id": format!("row-{n}"), "started_at": "2026-11-30T02:00:00Z", "duration_ms": 1,
            "vault_key_id": null, "agent_name": null, "agent_run_id": null, "namespace": null,
            "pod": null, "vendor": "stripe", "operation": null, "method": "GET",
            "path_template": null, "policy_verdict": "allow", "verdict_reason": null,
            "customer_scope_id": null, "vendor_status": 200, "vendor_request_id": null,
            "cost_usd_parsed": null, "cost_source": "none", "cap_usage_after_usd": null,
            "policy_revision": 1
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn lingering_collects_rows_that_arrive_meanwhile() {
        let linger = Duration::from_millis(500);
        let (queue, mut receiver) = channel(100, AuditMetrics::unregistered());
        queue.record(row(0)).unwrap();
        let started = std::time::Instant::now();
        let take = tokio::spawn(async move {
            let batch = receiver.recv_batch_lingering(100, linger).await;
            (batch, receiver)
        });
        // Well inside the linger window.
        for n in 1..5 {
            queue.record(row(n)).unwrap();
        }
        let (batch, mut receiver) = take.await.unwrap();
        assert_eq!(batch.unwrap().len(), 5, "one batch for the linger window");
        assert!(started.elapsed() >= linger);
        drop(queue);
        assert!(receiver.recv_batch_lingering(100, linger).await.is_none());
    }

    #[tokio::test]
    async fn a_half_full_batch_goes_at_once() {
        let (queue, mut receiver) = channel(100, AuditMetrics::unregistered());
        for n in 0..6 {
            queue.record(row(n)).unwrap();
        }
        let started = std::time::Instant::now();
        let batch = receiver
            .recv_batch_lingering(10, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(batch.len(), 6);
        assert!(started.elapsed() < Duration::from_secs(10), "no linger");
    }
}
