//! The shipper task: drains the queue into batches and hands them to a [`Transport`]. While the
//! transport fails, every row goes to the disk spool, in order; once it answers again the spool
//! is replayed oldest first before any newer row is sent, so the collector sees rows in the
//! order they were recorded (a replayed batch may arrive twice; row ids deduplicate it).
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use keybrake_api::audit::AuditRow;
use tokio::time::Instant;

use crate::{
    metrics::AuditMetrics,
    queue::QueueReceiver,
    spool::{Peeked, Spool, SpoolError},
    transport::{Transport, TransportError},
};

#[derive(Clone, Debug)]
pub struct ShipperConfig {
    pub batch_rows: usize,
    /// How long a batch of fewer than `batch_rows / 2` rows waits for more before it is sent
    /// (see [`QueueReceiver::recv_batch_lingering`]).
    pub linger: Duration,
    /// First retry delay after a failed send; doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for ShipperConfig {
    fn default() -> Self {
        ShipperConfig {
            batch_rows: 500,
            linger: Duration::from_millis(20),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
        }
    }
}

/// What the shipper did over its life (returned when the queue closes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShipperReport {
    pub sent_rows: u64,
    pub spooled_rows: u64,
    pub replayed_rows: u64,
    pub failed_sends: u64,
    /// Rows the collector refused as malformed, dropped one by one after bisecting the batch.
    pub rejected_rows: u64,
}

pub struct Shipper<T> {
    transport: T,
    queue: QueueReceiver,
    spool: Arc<Mutex<Spool>>,
    config: ShipperConfig,
    report: ShipperReport,
    metrics: AuditMetrics,
}

impl<T: Transport> Shipper<T> {
    pub fn new(transport: T, queue: QueueReceiver, spool: Spool, config: ShipperConfig) -> Self {
        Shipper {
            metrics: spool.metrics().clone(),
            transport,
            queue,
            spool: Arc::new(Mutex::new(spool)),
            config,
            report: ShipperReport::default(),
        }
    }

    /// Runs until every [`crate::queue::AuditQueue`] handle is dropped and what can be delivered
    /// has been; rows still undeliverable then stay in the spool for the next process.
    pub async fn run(mut self) -> ShipperReport {
        let mut backoff = self.config.retry_min;
        let mut queue_open = true;
        loop {
            if self.spool_is_empty().await {
                if !queue_open {
                    break;
                }
                let Some(batch) = self
                    .queue
                    .recv_batch_lingering(self.config.batch_rows, self.config.linger)
                    .await
                else {
                    break;
                };
                match self.deliver(&batch).await {
                    Ok(()) => self.report.sent_rows += batch.len() as u64,
                    Err(e) => {
                        self.report.failed_sends += 1;
                        tracing::warn!(error = %e, rows = batch.len(), "audit collector unavailable; spooling");
                        self.spool_append(batch).await;
                        backoff = self.config.retry_min;
                    }
                }
                continue;
            }
            // Degraded: everything new goes behind what is already spooled.
            if queue_open {
                loop {
                    let batch = self.queue.try_recv_batch(self.config.batch_rows);
                    if batch.is_empty() {
                        break;
                    }
                    self.spool_append(batch).await;
                }
            }
            match self.replay_one().await {
                Ok(()) => backoff = self.config.retry_min,
                Err(e) => {
                    self.report.failed_sends += 1;
                    tracing::debug!(error = %e, retry_in = ?backoff, "audit replay failed");
                    if !queue_open {
                        break; // shutting down: the spool keeps the rest for the next start
                    }
                    queue_open = self.absorb_until(Instant::now() + backoff).await;
                    backoff = (backoff * 2).min(self.config.retry_max);
                }
            }
        }
        self.report
    }

    /// Spools incoming rows until `deadline`; false if the queue closed meanwhile.
    async fn absorb_until(&mut self, deadline: Instant) -> bool {
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return true,
                batch = self.queue.recv_batch(self.config.batch_rows) => match batch {
                    Some(batch) => self.spool_append(batch).await,
                    None => return false,
                },
            }
        }
    }

    /// Sends a batch. If the collector refuses its content (a row it cannot parse), bisects to
    /// find the offending rows, drops only those (counted and logged) and delivers the rest, so
    /// one bad row can never wedge the spool. A transient error aborts: the caller spools the
    /// whole batch and parts already stored are deduplicated on replay.
    async fn deliver(&mut self, rows: &[AuditRow]) -> Result<(), TransportError> {
        let mut pending: Vec<std::ops::Range<usize>> = Vec::new();
        pending.push(0..rows.len());
        while let Some(range) = pending.pop() {
            match self.transport.send(&rows[range.clone()]).await {
                Ok(()) => {}
                Err(e) if e.is_permanent() => {
                    if range.len() == 1 {
                        self.report.rejected_rows += 1;
                        self.metrics.dropped_rows.inc();
                        tracing::error!(error = %e, row_id = %rows[range.start].id, "audit row refused by the collector; dropped");
                    } else {
                        let mid = range.start + range.len() / 2;
                        pending.push(mid..range.end); // popped second: keeps order
                        pending.push(range.start..mid);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn replay_one(&mut self) -> Result<(), TransportError> {
        let batch_rows = self.config.batch_rows;
        let peeked = self.with_spool(move |s| s.peek(batch_rows)).await;
        let peeked: Option<Peeked> = match peeked {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "audit spool unreadable");
                return Err(TransportError::Unreachable(e.to_string()));
            }
        };
        let Some(peeked) = peeked else {
            return Ok(());
        };
        self.deliver(&peeked.rows).await?;
        self.report.replayed_rows += peeked.rows.len() as u64;
        if let Err(e) = self.with_spool(move |s| s.commit(peeked)).await {
            tracing::error!(error = %e, "audit spool commit failed; rows may be sent again");
        }
        Ok(())
    }

    async fn spool_append(&mut self, rows: Vec<AuditRow>) {
        let count = rows.len() as u64;
        match self.with_spool(move |s| s.append(&rows)).await {
            Ok(outcome) => self.report.spooled_rows += outcome.spooled as u64,
            Err(e) => {
                self.metrics.dropped_rows.inc_by(count);
                tracing::error!(error = %e, rows = count, "audit rows lost: spool write failed");
            }
        }
    }

    async fn spool_is_empty(&self) -> bool {
        self.spool.lock().map(|s| s.is_empty()).unwrap_or(true)
    }

    /// Spool I/O (fsync) runs on the blocking pool, never on the async workers.
    async fn with_spool<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Spool) -> Result<R, SpoolError> + Send + 'static,
    ) -> Result<R, SpoolError> {
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = spool.lock().unwrap_or_else(|p| p.into_inner());
            work(&mut guard)
        })
        .await
        .unwrap_or_else(|e| {
            Err(SpoolError::Io {
                path: Default::default(),
                source: std::io::Error::other(e.to_string()),
            })
        })
    }
}
