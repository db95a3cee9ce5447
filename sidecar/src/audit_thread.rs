//! The audit delivery thread: one OS thread named `keybrake-audit` with its own current-thread
//! Tokio runtime, at idle CPU priority, where everything that moves audit rows runs — batching,
//! the SQLite writes and spool I/O (on this runtime's blocking threads, `keybrake-aud-io`, also
//! at idle priority), the PostgreSQL connection and COPY encoding, the HTTP shipper.
//!
//! Why: the proxy may run on a single-threaded runtime pinned to one core. Delivery work spawned
//! on that runtime would run between calls and delay them; at `SCHED_IDLE` a waking proxy thread
//! preempts delivery at once. The cost is starvation under saturation: with the core 100 % busy
//! with calls, delivery runs only in the gaps, the bounded queue fills and rows are dropped and
//! counted (`keybrake_audit_dropped_rows_total`). Audit must never take CPU from a call.
//!
//! Setting the policy can fail (a seccomp profile, a non-Linux OS): that is logged once at warn
//! and delivery runs at normal priority; `keybrake_audit_delivery_idle_priority` says which.
use std::{
    future::Future,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use prometheus::IntGauge;
use tokio::sync::oneshot;

pub const DELIVERY_THREAD_NAME: &str = "keybrake-audit";
pub const DELIVERY_IO_THREAD_NAME: &str = "keybrake-aud-io";

/// How long the thread waits, after delivery ended, for its blocking threads (an SQLite write
/// still running after a timed-out shutdown) before it lets them go.
const RUNTIME_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DeliveryThreadError {
    #[error("starting the audit delivery thread: {0}")]
    Spawn(std::io::Error),
    #[error("building the audit delivery runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the audit delivery thread died during setup")]
    Died,
}

/// The running thread. Dropping it leaves delivery running until the queue closes.
pub struct DeliveryThread {
    finished: oneshot::Receiver<()>,
    cancel: Option<oneshot::Sender<()>>,
}

impl DeliveryThread {
    /// Starts the thread and runs `setup` on it (so connections it opens live on the delivery
    /// runtime, not the caller's); the job `setup` returns then runs there until it ends or
    /// [`DeliveryThread::wait`] gives up. Returns once setup is done, with its error if any.
    pub async fn start<Setup, SetupFuture, Job, E>(
        idle_priority_gauge: IntGauge,
        setup: Setup,
    ) -> Result<DeliveryThread, E>
    where
        Setup: FnOnce() -> SetupFuture + Send + 'static,
        SetupFuture: Future<Output = Result<Job, E>>,
        Job: Future<Output = ()>,
        E: From<DeliveryThreadError> + Send + 'static,
    {
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), E>>();
        let (finished_tx, finished_rx) = oneshot::channel();
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(DELIVERY_THREAD_NAME.into())
            .spawn(move || {
                let idle = lower_current_thread_priority();
                idle_priority_gauge.set(i64::from(idle));
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name(DELIVERY_IO_THREAD_NAME)
                    .on_thread_start(move || {
                        if idle {
                            lower_current_thread_priority();
                        }
                    })
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(DeliveryThreadError::Runtime(e).into()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let job = match setup().await {
                        Ok(job) => job,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let cancelled = async {
                        // A dropped handle is not a cancel: delivery goes on until the queue closes.
                        if cancel_rx.await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::select! {
                        () = job => {}
                        () = cancelled => tracing::debug!("audit delivery cancelled"),
                    }
                });
                let _ = finished_tx.send(());
                runtime.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
            })
            .map_err(|e| E::from(DeliveryThreadError::Spawn(e)))?;
        ready_rx
            .await
            .unwrap_or_else(|_| Err(DeliveryThreadError::Died.into()))?;
        Ok(DeliveryThread {
            finished: finished_rx,
            cancel: Some(cancel_tx),
        })
    }

    /// Waits up to `timeout` for the job to end (a panicked thread counts as ended); on timeout
    /// cancels it and returns false.
    pub async fn wait(&mut self, timeout: Duration) -> bool {
        match tokio::time::timeout(timeout, &mut self.finished).await {
            Ok(_) => true,
            Err(_) => {
                if let Some(cancel) = self.cancel.take() {
                    let _ = cancel.send(());
                }
                false
            }
        }
    }

    /// After [`DeliveryThread::wait`] gave up: waits up to `grace` for the cancelled job to be
    /// dropped (a thread at idle priority may wait for CPU); true once it was.
    pub async fn wait_cancelled(&mut self, grace: Duration) -> bool {
        tokio::time::timeout(grace, &mut self.finished)
            .await
            .is_ok()
    }
}

/// Puts the calling thread at `SCHED_IDLE`; false (logged once per process) if the OS refused.
fn lower_current_thread_priority() -> bool {
    static WARNED: AtomicBool = AtomicBool::new(false);
    match set_idle_policy() {
        Ok(()) => true,
        Err(reason) => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    %reason,
                    "audit delivery runs at normal CPU priority (SCHED_IDLE refused): it competes with calls for CPU"
                );
            }
            false
        }
    }
}

#[cfg(target_os = "linux")]
fn set_idle_policy() -> Result<(), String> {
    use thread_priority::{
        ThreadPriority,
        unix::{
            NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
            thread_native_id,
        },
    };
    set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    )
    .map_err(|e| format!("{e:?}"))
}

#[cfg(not(target_os = "linux"))]
fn set_idle_policy() -> Result<(), String> {
    Err("SCHED_IDLE exists on Linux only".into())
}

#[cfg(all(test, target_os = "linux"))]
pub(crate) mod tests {
    /// `SCHED_IDLE` in `/proc/<pid>/task/<tid>/stat`'s `policy` field.
    pub const SCHED_IDLE: u32 = 5;

    /// (tid, policy) of every thread of this process named `name`.
    pub fn thread_policies(name: &str) -> Vec<(u32, u32)> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
            let dir = entry.expect("task entry").path();
            let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
                continue; // the thread ended meanwhile
            };
            if comm.trim_end() != name {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
                continue;
            };
            found.push((
                dir.file_name().unwrap().to_string_lossy().parse().unwrap(),
                stat_policy(&stat),
            ));
        }
        found
    }

    /// Field 41 (`policy`) of a stat line; the name in field 2 may hold spaces and parentheses,
    /// so fields are counted after its last `)`.
    fn stat_policy(stat: &str) -> u32 {
        let after_name = &stat[stat.rfind(')').expect("stat has (comm)") + 1..];
        // after_name starts at field 3.
        after_name
            .split_whitespace()
            .nth(41 - 3)
            .expect("stat has a policy field")
            .parse()
            .expect("numeric policy")
    }

    #[test]
    fn stat_policy_counts_fields_after_the_name() {
        let line = "42 (a) b) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 39 19 1 0 100 0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 5 0 0 0";
        assert_eq!(stat_policy(line), 5);
    }

    #[test]
    fn the_calling_thread_can_be_put_at_idle_priority() {
        let handle = std::thread::Builder::new()
            .name("kb-idle-probe".into())
            .spawn(|| {
                assert!(super::lower_current_thread_priority(), "SCHED_IDLE refused");
                let policies = thread_policies("kb-idle-probe");
                assert!(!policies.is_empty());
                for (tid, policy) in policies {
                    assert_eq!(policy, SCHED_IDLE, "thread {tid}");
                }
            })
            .unwrap();
        handle.join().unwrap();
    }
}
