//! The audit seam: after each call the proxy hands one [`AuditRow`] to an [`AuditSink`], which
//! must never block the request path.
//!
//! [`AuditPipeline`] is the real one: rows go into keybrake-audit's bounded queue (a full queue
//! drops the row and counts it in `keybrake_audit_dropped_rows_total`); the request path does
//! nothing else. Delivery runs on its own thread at idle CPU priority
//! ([`crate::audit_thread`]), draining the queue in batches to the [`AuditTarget`]:
//! - standalone mode: a sink (`sqlite:///path`, `postgres://…`, `stdout`) written directly;
//! - controller mode: the controller's `POST /v1/audit` over HTTP/2 + TLS, bearer = the projected
//!   ServiceAccount token. With a spool directory, batches the controller cannot take go to disk
//!   (bounded) and are replayed in order once it answers again.
//!
//! Shutdown ([`AuditPipeline::shutdown`]) closes the queue and waits, bounded, for it to drain.
use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, RwLock},
    time::Duration,
};

use keybrake_api::audit::AuditRow;
use keybrake_audit::{
    AnySink, SinkConfig, SinkError,
    metrics::AuditMetrics,
    queue::{self, AuditQueue, QueueReceiver},
    shipper::{Shipper, ShipperConfig},
    spool::{Spool, SpoolConfig, SpoolError},
    transport::{HttpTransport, SinkTransport, TokenFile, Transport, TransportError},
};
use tokio::sync::mpsc;

use crate::audit_thread::{DeliveryThread, DeliveryThreadError};

/// After a timed-out flush, how long shutdown waits for the cancelled delivery to stop (and its
/// queue receiver to count what it leaves behind).
const CANCEL_GRACE: Duration = Duration::from_secs(1);

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

/// A sink that hands rows to a channel: tests and in-process consumers read them.
pub struct ChannelAudit(pub mpsc::UnboundedSender<AuditRow>);

impl AuditSink for ChannelAudit {
    fn submit(&self, row: AuditRow) {
        let _ = self.0.send(row);
    }
}

/// Where audit rows go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditTarget {
    /// Discard rows (metrics still count every call).
    None,
    /// Standalone mode: write to this sink directly.
    Sink(SinkConfig),
    /// Controller mode: ship to `<base_url>/v1/audit`.
    Controller {
        base_url: String,
        ca_file: PathBuf,
        token_file: PathBuf,
    },
}

#[derive(Clone, Debug)]
pub struct AuditConfig {
    pub target: AuditTarget,
    /// Rows the in-memory queue holds before new rows are dropped.
    pub queue_capacity: usize,
    /// Disk spool for rows the destination could not take (`None`: retry from memory only).
    pub spool: Option<SpoolConfig>,
    pub shipper: ShipperConfig,
    /// One send to the controller gives up after this long (then retried or spooled).
    pub send_timeout: Duration,
    /// How long shutdown waits for queued rows to be delivered (or spooled).
    pub flush_timeout: Duration,
}

impl AuditConfig {
    pub fn new(target: AuditTarget) -> AuditConfig {
        AuditConfig {
            target,
            queue_capacity: 10_000,
            spool: None,
            shipper: ShipperConfig::default(),
            send_timeout: Duration::from_secs(10),
            flush_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditSetupError {
    #[error("opening the audit sink: {0}")]
    Sink(#[from] SinkError),
    #[error("opening the audit spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("reading the controller CA {path}: {source}")]
    Ca {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit transport: {0}")]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Thread(#[from] DeliveryThreadError),
}

/// The request path's end of the pipeline. Closing it (at shutdown) drops the queue's sender so
/// the delivery task sees the end of the rows even if a straggling connection still holds this.
struct QueuedAudit {
    queue: RwLock<Option<AuditQueue>>,
    metrics: AuditMetrics,
}

impl AuditSink for QueuedAudit {
    fn submit(&self, row: AuditRow) {
        let queue = self.queue.read().unwrap_or_else(|p| p.into_inner());
        match queue.as_ref() {
            // A full queue is counted and logged by the queue itself.
            Some(q) => {
                let _ = q.record(row);
            }
            None => self.metrics.dropped_rows.inc(),
        }
    }
}

impl QueuedAudit {
    fn close(&self) {
        self.queue.write().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// The running audit pipeline: hand [`AuditPipeline::sink`] to the proxy, call
/// [`AuditPipeline::shutdown`] after the proxy has drained.
pub struct AuditPipeline {
    sink: Arc<dyn AuditSink>,
    queued: Option<Arc<QueuedAudit>>,
    delivery: Option<DeliveryThread>,
    flush_timeout: Duration,
    metrics: AuditMetrics,
}

impl AuditPipeline {
    /// Starts the delivery thread, which opens the destination (and the spool) and then drains
    /// the queue. Returns once the destination is open, with its error if it could not be.
    pub async fn start(
        config: AuditConfig,
        metrics: AuditMetrics,
    ) -> Result<AuditPipeline, AuditSetupError> {
        if config.target == AuditTarget::None {
            return Ok(AuditPipeline {
                sink: Arc::new(NoopAudit),
                queued: None,
                delivery: None,
                flush_timeout: config.flush_timeout,
                metrics,
            });
        }
        let (queue, receiver) = queue::channel(config.queue_capacity, metrics.clone());
        let delivery = DeliveryThread::start(metrics.delivery_idle_priority.clone(), {
            let (config, metrics) = (config.clone(), metrics.clone());
            move || open_and_deliver(config, metrics, receiver)
        })
        .await?;
        let queued = Arc::new(QueuedAudit {
            queue: RwLock::new(Some(queue)),
            metrics: metrics.clone(),
        });
        Ok(AuditPipeline {
            sink: queued.clone(),
            queued: Some(queued),
            delivery: Some(delivery),
            flush_timeout: config.flush_timeout,
            metrics,
        })
    }

    /// The proxy's sink.
    pub fn sink(&self) -> Arc<dyn AuditSink> {
        self.sink.clone()
    }

    /// Stops taking rows and waits up to the flush timeout for the queued ones to be delivered
    /// (or spooled, in controller mode with a spool). After that delivery is cancelled: the rows
    /// still queued and the batch it held are lost, counted as dropped by the queue's receiver
    /// as it is dropped (exactly: a batch taken off the queue is counted until it is settled).
    pub async fn shutdown(mut self) {
        let Some(queued) = self.queued.take() else {
            return;
        };
        queued.close();
        let Some(mut delivery) = self.delivery.take() else {
            return;
        };
        // Read before the wait: the cancelled receiver may count its rows before we look again.
        let dropped_before = self.metrics.dropped_rows.get();
        match delivery.wait(self.flush_timeout).await {
            true => tracing::info!("audit queue flushed"),
            false => {
                let stopped = delivery.wait_cancelled(CANCEL_GRACE).await;
                tracing::error!(
                    dropped_rows = self.metrics.dropped_rows.get() - dropped_before,
                    timeout = ?self.flush_timeout,
                    delivery_stopped = stopped,
                    "audit queue not flushed in time; rows not delivered are lost"
                );
            }
        }
    }
}

type DeliveryJob = Pin<Box<dyn Future<Output = ()>>>;

/// Runs on the delivery thread: opens the destination there (its connection tasks then live on
/// that thread's runtime) and returns the job that drains `receiver` into it.
async fn open_and_deliver(
    config: AuditConfig,
    metrics: AuditMetrics,
    receiver: QueueReceiver,
) -> Result<DeliveryJob, AuditSetupError> {
    match &config.target {
        AuditTarget::None => Ok(Box::pin(async {})),
        AuditTarget::Sink(sink) => {
            let sink = AnySink::open(sink).await?;
            delivery(SinkTransport(sink), &config, &metrics, receiver)
        }
        AuditTarget::Controller {
            base_url,
            ca_file,
            token_file,
        } => {
            let ca_pem = std::fs::read(ca_file).map_err(|source| AuditSetupError::Ca {
                path: ca_file.clone(),
                source,
            })?;
            let transport = HttpTransport::new(
                base_url,
                &ca_pem,
                Arc::new(TokenFile(token_file.clone())),
                config.send_timeout,
            )?;
            delivery(transport, &config, &metrics, receiver)
        }
    }
}

/// The delivery job for `transport`: the keybrake-audit shipper when a spool is configured,
/// else a retry-from-memory loop.
fn delivery<T: Transport>(
    transport: T,
    config: &AuditConfig,
    metrics: &AuditMetrics,
    receiver: QueueReceiver,
) -> Result<DeliveryJob, AuditSetupError> {
    let shipper_config = config.shipper.clone();
    match &config.spool {
        Some(spool_config) => {
            let spool = Spool::open(spool_config.clone(), metrics.clone())?;
            Ok(Box::pin(async move {
                let report = Shipper::new(transport, receiver, spool, shipper_config)
                    .run()
                    .await;
                tracing::info!(?report, "audit shipper stopped");
            }))
        }
        None => Ok(Box::pin(deliver_from_memory(
            transport,
            receiver,
            shipper_config,
            metrics.clone(),
        ))),
    }
}

/// No spool: each batch is retried (with backoff) until the destination takes it, while new
/// rows wait in the bounded queue (and are dropped, counted, once it is full). A batch the
/// destination refuses as malformed is dropped and counted. A batch counts as in hand (and as
/// lost if delivery is cancelled) until the next one is asked for.
async fn deliver_from_memory<T: Transport>(
    transport: T,
    mut receiver: QueueReceiver,
    config: ShipperConfig,
    metrics: AuditMetrics,
) {
    while let Some(batch) = receiver
        .recv_batch_lingering(config.batch_rows, config.linger)
        .await
    {
        let mut backoff = config.retry_min;
        loop {
            match transport.send(&batch).await {
                Ok(()) => break,
                Err(e) if e.is_permanent() => {
                    metrics.dropped_rows.inc_by(batch.len() as u64);
                    tracing::error!(error = %e, rows = batch.len(), "audit batch refused; dropped");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, rows = batch.len(), retry_in = ?backoff, "audit write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(config.retry_max);
                }
            }
        }
    }
}

/// A fresh row id: UUIDv7 text. Time-ordered, so PostgreSQL's primary-key index appends
/// instead of taking random inserts; unique, so spool replays are idempotent.
pub fn new_row_id() -> String {
    keybrake_audit::row::new_row_id()
}

#[cfg(test)]
mod tests {
    use keybrake_api::{Vendor, audit::CostSource, verdict::Verdict};
    use keybrake_audit::sink::SqliteSink;

    use super::*;

    fn row(n: usize) -> AuditRow {
        AuditRow {
            id: new_row_id(),
            started_at: jiff::Timestamp::now(),
            duration_ms: 1,
            vault_key_id: Some("standalone/k".into()),
            agent_name: Some("agent".into()),
            agent_run_id: None,
            namespace: Some("standalone".into()),
            pod: None,
            vendor: Vendor::Stripe,
            operation: Some(format!("op-{n}")),
            method: "GET".into(),
            path_template: None,
            policy_verdict: Verdict::Allow,
            verdict_reason: None,
            customer_scope_id: None,
            vendor_status: 200,
            vendor_request_id: None,
            cost_usd_parsed: None,
            cost_source: CostSource::None,
            cap_usage_after_usd: None,
            policy_revision: 1,
        }
    }

    /// A pipeline writing to a fresh SQLite file in `dir`.
    async fn start_sqlite_pipeline(
        dir: &tempfile::TempDir,
    ) -> (std::path::PathBuf, AuditMetrics, AuditPipeline) {
        let db = dir.path().join("audit.db");
        let metrics = AuditMetrics::unregistered();
        let pipeline = AuditPipeline::start(
            AuditConfig::new(AuditTarget::Sink(SinkConfig::Sqlite(db.clone()))),
            metrics.clone(),
        )
        .await
        .unwrap();
        (db, metrics, pipeline)
    }

    async fn count_in(db: std::path::PathBuf, sql: &str) -> Option<i64> {
        let rows = SqliteSink::open(db)
            .await
            .unwrap()
            .query(sql, &[])
            .await
            .unwrap();
        rows[0][0].as_i64()
    }

    #[tokio::test]
    async fn standalone_sqlite_rows_are_written_and_flushed_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let (db, metrics, pipeline) = start_sqlite_pipeline(&dir).await;
        let sink = pipeline.sink();
        assert!(sink.wants_rows());
        for n in 0..25 {
            sink.submit(row(n));
        }
        pipeline.shutdown().await;
        sink.submit(row(99)); // after shutdown: counted, not written
        assert_eq!(
            count_in(db, "SELECT count(DISTINCT id) FROM agent_call_audit").await,
            Some(25)
        );
        assert_eq!(metrics.dropped_rows.get(), 1);
        assert_eq!(metrics.queue_depth.get(), 0);
    }

    /// Delivery, and the SQLite writes it hands to blocking threads, run at SCHED_IDLE on
    /// threads of their own, never on the caller's runtime.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "current_thread")]
    async fn delivery_runs_on_its_own_threads_at_idle_priority() {
        use crate::audit_thread::{
            DELIVERY_IO_THREAD_NAME, DELIVERY_THREAD_NAME,
            tests::{SCHED_IDLE, thread_policies},
        };
        let dir = tempfile::tempdir().unwrap();
        let (db, metrics, pipeline) = start_sqlite_pipeline(&dir).await;
        assert_eq!(metrics.delivery_idle_priority.get(), 1);
        let sink = pipeline.sink();
        for n in 0..10 {
            sink.submit(row(n));
        }
        // The batch is written on a blocking thread of the delivery runtime, which then idles
        // (kept alive for 10 s): wait until the queue is empty and that thread exists.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let io_threads = loop {
            let io = thread_policies(DELIVERY_IO_THREAD_NAME);
            if metrics.queue_depth.get() == 0 && !io.is_empty() {
                break io;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {DELIVERY_IO_THREAD_NAME} thread; queue depth {}",
                metrics.queue_depth.get()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let delivery_threads = thread_policies(DELIVERY_THREAD_NAME);
        assert!(
            !delivery_threads.is_empty(),
            "no {DELIVERY_THREAD_NAME} thread"
        );
        // Other tests' pipelines may run in this process too: every such thread must be idle.
        for (tid, policy) in delivery_threads.iter().chain(&io_threads) {
            assert_eq!(*policy, SCHED_IDLE, "thread {tid} is not SCHED_IDLE");
        }
        let this_thread = std::thread::current();
        assert_ne!(this_thread.name(), Some(DELIVERY_THREAD_NAME));
        pipeline.shutdown().await;
        assert_eq!(
            count_in(db, "SELECT count(*) FROM agent_call_audit").await,
            Some(10)
        );
    }

    /// A destination that cannot be opened fails start, as before the thread existed.
    #[tokio::test]
    async fn a_sink_that_cannot_open_fails_start() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, "x").unwrap();
        let result = AuditPipeline::start(
            AuditConfig::new(AuditTarget::Sink(SinkConfig::Sqlite(
                not_a_dir.join("audit.db"),
            ))),
            AuditMetrics::unregistered(),
        )
        .await;
        assert!(
            matches!(result, Err(AuditSetupError::Sink(_))),
            "{:?}",
            result.as_ref().err()
        );
    }

    #[tokio::test]
    async fn none_takes_no_rows() {
        let pipeline = AuditPipeline::start(
            AuditConfig::new(AuditTarget::None),
            AuditMetrics::unregistered(),
        )
        .await
        .unwrap();
        assert!(!pipeline.sink().wants_rows());
        pipeline.shutdown().await;
    }

    /// A controller that is down: the request path never waits, a full queue drops and counts,
    /// and shutdown gives up after the flush timeout, counting what it leaves behind.
    #[tokio::test]
    async fn an_unreachable_controller_never_blocks_and_shutdown_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "sa-token").unwrap();
        // Port 1: nothing listens there (a bound-then-freed ephemeral port can be taken by a
        // parallel test's server).
        let mut config = AuditConfig::new(AuditTarget::Controller {
            base_url: "https://127.0.0.1:1".to_owned(),
            ca_file,
            token_file,
        });
        let (capacity, batch_rows) = (4, 4);
        config.queue_capacity = capacity;
        config.shipper.batch_rows = batch_rows;
        config.flush_timeout = Duration::from_millis(300);
        let metrics = AuditMetrics::unregistered();
        let pipeline = AuditPipeline::start(config, metrics.clone()).await.unwrap();
        let sink = pipeline.sink();
        let started = std::time::Instant::now();
        for n in 0..100 {
            sink.submit(row(n));
        }
        // Generous for a loaded CI machine: a submit is a queue push, it never waits for the
        // controller.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "submit never waits"
        );
        // At most the queue plus one batch in the delivery thread's hands survive (that thread
        // runs while we submit, so the batch size is what bounds it).
        let dropped = metrics.dropped_rows.get();
        let survivors = (capacity + batch_rows) as u64;
        assert!(
            (100 - survivors..=100).contains(&dropped),
            "dropped {dropped}"
        );
        let started = std::time::Instant::now();
        pipeline.shutdown().await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "shutdown is bounded"
        );
        assert_eq!(
            metrics.dropped_rows.get(),
            100,
            "rows left in memory at the timeout count as dropped"
        );
    }

    /// A shutdown that times out while the delivery thread holds a batch it took off the queue
    /// (here: lingering for more rows) loses that batch, and must count it: every submitted row
    /// is either in the database or in `keybrake_audit_dropped_rows_total`. The old accounting
    /// (queue depth + a batch stored as in hand after the take) missed it: dropped 0, written 0.
    #[tokio::test]
    async fn a_timed_out_shutdown_counts_the_batch_the_delivery_thread_holds() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let mut config = AuditConfig::new(AuditTarget::Sink(SinkConfig::Sqlite(db.clone())));
        config.shipper.linger = Duration::from_secs(3600);
        config.flush_timeout = Duration::from_millis(200);
        let metrics = AuditMetrics::unregistered();
        let pipeline = AuditPipeline::start(config, metrics.clone()).await.unwrap();
        let sink = pipeline.sink();
        let submitted = 3;
        for n in 0..submitted {
            sink.submit(row(n));
        }
        // Wait until the delivery thread has taken rows (the gauge moves after the take; it may
        // have taken the first row before the others were submitted, which then stay queued).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while metrics.queue_depth.get() >= submitted as i64 {
            assert!(
                std::time::Instant::now() < deadline,
                "the delivery thread never took the rows"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        pipeline.shutdown().await;
        let written = count_in(db, "SELECT count(*) FROM agent_call_audit")
            .await
            .unwrap();
        assert_eq!(written, 0, "the batch was still lingering");
        assert_eq!(
            metrics.dropped_rows.get() + written as u64,
            submitted as u64,
            "every row is written or counted as dropped"
        );
    }

    #[test]
    fn row_ids_are_uuid_v7() {
        let id = new_row_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "7");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(id, new_row_id());
    }
}
