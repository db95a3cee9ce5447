//! The audit pipeline's Prometheus series, registered into the caller's registry.
use prometheus::{IntCounter, IntGauge, Registry};

#[derive(Clone)]
pub struct AuditMetrics {
    /// Rows waiting in the in-memory queue.
    pub queue_depth: IntGauge,
    /// Bytes of spool segments on disk (delivered parts are freed per segment).
    pub spool_bytes: IntGauge,
    /// Rows lost: queue full, spool full, or an unreadable spool line.
    pub dropped_rows: IntCounter,
    /// 1 while the delivery thread runs at idle CPU priority (`SCHED_IDLE`), 0 if the OS refused.
    pub delivery_idle_priority: IntGauge,
}

impl AuditMetrics {
    pub fn register(registry: &Registry) -> Result<AuditMetrics, prometheus::Error> {
        let metrics = AuditMetrics::unregistered();
        registry.register(Box::new(metrics.queue_depth.clone()))?;
        registry.register(Box::new(metrics.spool_bytes.clone()))?;
        registry.register(Box::new(metrics.dropped_rows.clone()))?;
        registry.register(Box::new(metrics.delivery_idle_priority.clone()))?;
        Ok(metrics)
    }

    /// Metrics not exported anywhere (benchmarks, tools).
    pub fn unregistered() -> AuditMetrics {
        AuditMetrics {
            queue_depth: IntGauge::new(
                "keybrake_audit_queue_depth",
                "Audit rows waiting in the in-memory queue",
            )
            .expect("valid metric"),
            spool_bytes: IntGauge::new(
                "keybrake_audit_spool_bytes",
                "Bytes of audit rows spooled to disk while the collector is unreachable",
            )
            .expect("valid metric"),
            dropped_rows: IntCounter::new(
                "keybrake_audit_dropped_rows_total",
                "Audit rows lost because the queue or the spool was full, or a spool line was unreadable",
            )
            .expect("valid metric"),
            delivery_idle_priority: IntGauge::new(
                "keybrake_audit_delivery_idle_priority",
                "1 while audit delivery runs at idle CPU priority (SCHED_IDLE), 0 if the OS refused it",
            )
            .expect("valid metric"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_the_agreed_names() {
        let registry = Registry::new();
        let m = AuditMetrics::register(&registry).unwrap();
        m.dropped_rows.inc();
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "keybrake_audit_delivery_idle_priority",
                "keybrake_audit_dropped_rows_total",
                "keybrake_audit_queue_depth",
                "keybrake_audit_spool_bytes"
            ]
        );
        assert!(
            AuditMetrics::register(&registry).is_err(),
            "double registration must fail"
        );
    }
}
