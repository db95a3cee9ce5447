//! The controller's Prometheus metrics (names shared with the dashboards and alerts).
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub streams_connected: IntGauge,
    pub propagation: Histogram,
    pub audit_ingested_rows: IntCounter,
    pub audit_sink_errors: IntCounter,
    pub leader: IntGauge,
    pub webhook_injections: IntCounterVec,
    pub budget_grants: IntCounterVec,
}

/// `result` values of `keybrake_controller_budget_grants_total`: one per answer of
/// `POST /v1/budget` (a bounded set: no per-key labels).
pub const BUDGET_RESULTS: [&str; 6] = [
    "granted",
    "refused",
    "released",
    "conflict_retry",
    "rejected",
    "error",
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "keybrake_controller_reconciles_total",
                "VaultKey reconciliations by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "keybrake_controller_reconcile_errors_total",
                "Failed VaultKey reconciliations by error kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "keybrake_controller_reconcile_duration_seconds",
                "Time spent reconciling one VaultKey.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
        )
        .expect("valid metric");
        let streams_connected = IntGauge::new(
            "keybrake_controller_streams_connected",
            "Sidecar policy watch streams connected to this replica.",
        )
        .expect("valid metric");
        let propagation = Histogram::with_opts(
            HistogramOpts::new(
                "keybrake_controller_propagation_seconds",
                "From this replica observing a VaultKey or Secret change to a sidecar acknowledging it, per sidecar.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        let audit_ingested_rows = IntCounter::new(
            "keybrake_controller_audit_ingested_rows_total",
            "Audit rows received from sidecars and written to the sink.",
        )
        .expect("valid metric");
        let audit_sink_errors = IntCounter::new(
            "keybrake_controller_audit_sink_errors_total",
            "Audit sink write failures.",
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "keybrake_controller_leader",
            "1 while this replica holds the leader Lease (writes status, collects garbage).",
        )
        .expect("valid metric");
        let webhook_injections = IntCounterVec::new(
            Opts::new(
                "keybrake_webhook_injections_total",
                "Sidecar injection decisions by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let budget_grants = IntCounterVec::new(
            Opts::new(
                "keybrake_controller_budget_grants_total",
                "Budget-slice lease requests (POST /v1/budget) by result; conflict_retry counts \
                 status writes retried after another writer's change.",
            ),
            &["result"],
        )
        .expect("valid metric");
        // Every result exported from start-up at 0, so rate() and absence checks work at once.
        for result in BUDGET_RESULTS {
            budget_grants.with_label_values(&[result]);
        }
        for kind in crate::reconcile::ReconcileError::KINDS {
            reconcile_errors.with_label_values(&[kind]);
        }
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_errors.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(streams_connected.clone()),
            Box::new(propagation.clone()),
            Box::new(audit_ingested_rows.clone()),
            Box::new(audit_sink_errors.clone()),
            Box::new(leader.clone()),
            Box::new(webhook_injections.clone()),
            Box::new(budget_grants.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            streams_connected,
            propagation,
            audit_ingested_rows,
            audit_sink_errors,
            leader,
            webhook_injections,
            budget_grants,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reconcile_error_kind_is_exported_from_start() {
        let text = Metrics::new().encode();
        for kind in crate::reconcile::ReconcileError::KINDS {
            let series = format!("keybrake_controller_reconcile_errors_total{{kind=\"{kind}\"}} 0");
            assert!(text.contains(&series), "missing {series} in:\n{text}");
        }
    }

    #[test]
    fn exposes_the_shared_metric_names() {
        let m = Metrics::new();
        m.reconciles.with_label_values(&["ok"]).inc();
        m.reconcile_errors.with_label_values(&["kube"]).inc();
        m.webhook_injections.with_label_values(&["injected"]).inc();
        m.propagation.observe(0.01);
        m.reconcile_duration.observe(0.01);
        let text = m.encode();
        for name in [
            "keybrake_controller_reconciles_total{result=\"ok\"} 1",
            "keybrake_controller_reconcile_errors_total{kind=\"kube\"} 1",
            "keybrake_controller_reconcile_duration_seconds_bucket",
            "keybrake_controller_streams_connected 0",
            "keybrake_controller_propagation_seconds_bucket",
            "keybrake_controller_audit_ingested_rows_total 0",
            "keybrake_controller_audit_sink_errors_total 0",
            "keybrake_controller_leader 0",
            "keybrake_webhook_injections_total{result=\"injected\"} 1",
            "keybrake_controller_budget_grants_total{result=\"granted\"} 0",
            "keybrake_controller_budget_grants_total{result=\"conflict_retry\"} 0",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
