//! The bounded in-memory queue between the request path and the shipper. Recording never
//! blocks and never awaits: when the queue is full the row is dropped, counted and logged, and
//! the caller learns it from the result (the sidecar decides whether that fails the call).
//!
//! Accounting is exact: every accepted row is either delivered by the consumer or counted in
//! `keybrake_audit_dropped_rows_total`. The receiver counts the rows of the batch it handed out
//! (in hand until the consumer asks for more) before the depth gauge moves, and when it is
//! dropped (delivery ended or was cancelled at a timed-out shutdown) it counts that batch and
//! whatever is still queued as dropped.
//!
//! The depth gauge only moves by atomic adds: a row counts before it is offered (un-counted if
//! refused) and stops counting when the receiver takes it. It never reads below the rows
//! really queued and is exact whenever the queue is quiet; setting it from either end's view
//! of the channel let a late writer leave a stale value.
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
    /// Rows of the last batch handed out. The consumer is done with a batch (delivered it,
    /// spooled it, or dropped and counted it) when it asks for the next one; until then a
    /// dropped receiver counts them as lost.
    in_hand: usize,
}

pub fn channel(capacity: usize, metrics: AuditMetrics) -> (AuditQueue, QueueReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        AuditQueue {
            tx,
            metrics: metrics.clone(),
            drops: Arc::new(AtomicU64::new(0)),
        },
        QueueReceiver {
            rx,
            metrics,
            in_hand: 0,
        },
    )
}

impl AuditQueue {
    pub fn record(&self, row: AuditRow) -> Result<(), RecordError> {
        // Counted before the receiver can see it, so the gauge never dips below zero.
        self.metrics.queue_depth.inc();
        let result = self.tx.try_send(row).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RecordError::Full,
            mpsc::error::TrySendError::Closed(_) => RecordError::Closed,
        });
        if let Err(e) = &result {
            self.metrics.queue_depth.dec();
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
    /// Asking for a batch settles the previous one (see [`QueueReceiver::in_hand`]).
    pub async fn recv_batch(&mut self, max: usize) -> Option<Vec<AuditRow>> {
        self.in_hand = 0;
        let first = self.rx.recv().await?;
        // Counted before any await or gauge update: from here on the row is this batch's.
        self.in_hand = 1;
        self.metrics.queue_depth.dec();
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
        self.in_hand = 0;
        let mut batch = Vec::new();
        self.fill(&mut batch, max);
        batch
    }

    /// Rows handed out in the last batch and not yet settled by asking for the next one.
    pub fn in_hand(&self) -> usize {
        self.in_hand
    }

    fn fill(&mut self, batch: &mut Vec<AuditRow>, max: usize) {
        let before = batch.len();
        while batch.len() < max {
            match self.rx.try_recv() {
                Ok(row) => {
                    batch.push(row);
                    self.in_hand += 1;
                }
                Err(_) => break,
            }
        }
        self.metrics.queue_depth.sub((batch.len() - before) as i64);
    }
}

impl Drop for QueueReceiver {
    /// The end of delivery: rows still queued and the batch in the consumer's hands (when it was
    /// cancelled before settling it) are lost, and counted here, exactly once.
    fn drop(&mut self) {
        // No sender can add rows once the receiver is gone; close first so none arrives while
        // we count.
        self.rx.close();
        let queued = self.rx.len();
        let lost = self.in_hand + queued;
        self.metrics.queue_depth.sub(queued as i64);
        if lost > 0 {
            self.metrics.dropped_rows.inc_by(lost as u64);
            tracing::error!(
                dropped_rows = lost,
                "audit delivery stopped with rows undelivered; they are lost"
            );
        }
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

    #[tokio::test]
    async fn a_dropped_receiver_counts_its_unsettled_batch_and_the_queue_as_dropped() {
        let metrics = AuditMetrics::unregistered();
        let (queue, mut receiver) = channel(100, metrics.clone());
        for n in 0..7 {
            queue.record(row(n)).unwrap();
        }
        let batch = receiver.recv_batch(3).await.unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(receiver.in_hand(), 3);
        // The gauge has already moved: the batch is no longer "queued" anywhere but here.
        assert_eq!(metrics.queue_depth.get(), 4);
        drop(batch);
        drop(receiver);
        assert_eq!(metrics.dropped_rows.get(), 7, "3 in hand + 4 queued");
        assert_eq!(metrics.queue_depth.get(), 0);
        assert_eq!(queue.record(row(8)), Err(RecordError::Closed));
        assert_eq!(metrics.dropped_rows.get(), 8);
    }

    #[tokio::test]
    async fn asking_for_the_next_batch_settles_the_previous_one() {
        let metrics = AuditMetrics::unregistered();
        let (queue, mut receiver) = channel(100, metrics.clone());
        for n in 0..5 {
            queue.record(row(n)).unwrap();
        }
        assert_eq!(receiver.recv_batch(2).await.unwrap().len(), 2);
        assert_eq!(receiver.try_recv_batch(10).len(), 3);
        assert_eq!(receiver.in_hand(), 3);
        drop(queue);
        assert!(receiver.recv_batch(10).await.is_none());
        assert_eq!(receiver.in_hand(), 0);
        drop(receiver);
        assert_eq!(metrics.dropped_rows.get(), 0, "every batch was settled");
    }

    #[tokio::test]
    async fn a_refused_row_does_not_count_as_queued() {
        let metrics = AuditMetrics::unregistered();
        let (queue, receiver) = channel(2, metrics.clone());
        for n in 0..3 {
            let _ = queue.record(row(n));
        }
        assert_eq!(metrics.queue_depth.get(), 2, "the third was refused: full");
        drop(receiver);
        assert_eq!(metrics.queue_depth.get(), 0);
        assert_eq!(queue.record(row(4)), Err(RecordError::Closed));
        assert_eq!(metrics.queue_depth.get(), 0, "refused: closed");
        assert_eq!(
            metrics.dropped_rows.get(),
            4,
            "1 full + 2 queued at the end + 1 closed"
        );
    }

    /// Producers and the consumer race on other threads; whatever interleaving happened, the
    /// gauge never read below zero and is back at exactly zero once everything is taken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_depth_gauge_is_exact_once_producers_and_consumer_are_done() {
        let metrics = AuditMetrics::unregistered();
        let (queue, mut receiver) = channel(16, metrics.clone());
        let producers: Vec<_> = (0..4)
            .map(|_| {
                let queue = queue.clone();
                let gauge = metrics.queue_depth.clone();
                tokio::task::spawn_blocking(move || {
                    let mut accepted = 0;
                    for n in 0..2_000 {
                        accepted += usize::from(queue.record(row(n)).is_ok());
                        assert!(gauge.get() >= 0, "depth read below zero");
                    }
                    accepted
                })
            })
            .collect();
        drop(queue);
        let consumer = tokio::spawn(async move {
            let mut taken = 0;
            while let Some(batch) = receiver.recv_batch(5).await {
                taken += batch.len();
            }
            taken
        });
        let mut accepted = 0;
        for producer in producers {
            accepted += producer.await.unwrap();
        }
        let taken = consumer.await.unwrap();
        assert_eq!(taken, accepted, "every accepted row reached the consumer");
        assert_eq!(metrics.queue_depth.get(), 0);
        assert_eq!(metrics.dropped_rows.get() as usize, 8_000 - accepted);
    }

    /// The window a timed-out shutdown used to miss: the batch is off the queue (gauge at 0)
    /// while the consumer lingers for more; cancelling it there loses the rows, counted.
    #[tokio::test]
    async fn cancelling_a_lingering_batch_counts_its_rows() {
        let metrics = AuditMetrics::unregistered();
        let (queue, mut receiver) = channel(100, metrics.clone());
        queue.record(row(0)).unwrap();
        queue.record(row(1)).unwrap();
        let take = receiver.recv_batch_lingering(100, Duration::from_secs(3600));
        let cancelled = tokio::time::timeout(Duration::from_millis(50), take)
            .await
            .is_err();
        assert!(cancelled, "the batch lingers");
        assert_eq!(metrics.queue_depth.get(), 0);
        assert_eq!(receiver.in_hand(), 2);
        drop(receiver);
        assert_eq!(metrics.dropped_rows.get(), 2);
    }
}
