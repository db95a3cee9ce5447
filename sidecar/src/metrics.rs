//! Prometheus metrics, names as agreed across the project (see the preamble).
use keybrake_audit::metrics::AuditMetrics;
use prometheus::{
    CounterVec, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::store::PolicyStore;

pub struct Metrics {
    registry: Registry,
    pub calls: IntCounterVec,
    pub cost_usd: CounterVec,
    pub upstream_duration: HistogramVec,
    pub policy_revision: IntGauge,
    pub policy_staleness: Gauge,
    pub stale_allowed: IntCounterVec,
    /// `keybrake_audit_*`: defined and registered by keybrake-audit (the one owner), on this
    /// registry.
    pub audit: AuditMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let calls = IntCounterVec::new(
            Opts::new(
                "keybrake_calls_total",
                "Vendor calls seen by the sidecar, by policy verdict.",
            ),
            &["namespace", "agent", "vault_key", "vendor", "verdict"],
        )
        .expect("valid metric");
        let cost_usd = CounterVec::new(
            Opts::new(
                "keybrake_cost_usd_total",
                "Spend attributed to calls, in US dollars.",
            ),
            &["namespace", "agent", "vault_key", "vendor"],
        )
        .expect("valid metric");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "keybrake_upstream_duration_seconds",
                "Time from forwarding a call to the upstream's response headers.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["vendor"],
        )
        .expect("valid metric");
        let policy_revision = IntGauge::new(
            "keybrake_policy_revision",
            "Revision of the policy this sidecar enforces.",
        )
        .expect("valid metric");
        let policy_staleness = Gauge::new(
            "keybrake_policy_staleness_seconds",
            "Seconds since the policy source last proved alive (0 for a local file).",
        )
        .expect("valid metric");
        let stale_allowed = IntCounterVec::new(
            Opts::new(
                "keybrake_stale_allowed_calls_total",
                "Calls allowed on a stale policy because the key says onStale: Allow.",
            ),
            &["namespace", "vault_key"],
        )
        .expect("valid metric");
        for c in [
            Box::new(calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(cost_usd.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(policy_revision.clone()),
            Box::new(policy_staleness.clone()),
            Box::new(stale_allowed.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        let audit = AuditMetrics::register(&registry).expect("audit metric names are unique");
        Metrics {
            registry,
            calls,
            cost_usd,
            upstream_duration,
            policy_revision,
            policy_staleness,
            stale_allowed,
            audit,
        }
    }

    /// The registry, for other components (audit shipper, stream client) to add their metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn upstream_timer(&self, vendor: &str) -> Histogram {
        self.upstream_duration.with_label_values(&[vendor])
    }

    /// Prometheus text exposition, with the policy gauges read from the store at scrape time.
    pub fn render(&self, store: &PolicyStore) -> String {
        self.policy_revision.set(store.revision() as i64);
        self.policy_staleness.set(store.staleness().as_secs_f64());
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
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
    fn audit_series_are_exported_once() {
        let metrics = Metrics::new();
        metrics.audit.dropped_rows.inc();
        let text = metrics.render(&PolicyStore::new(crate::store::Freshness::AlwaysFresh));
        for name in [
            "keybrake_audit_queue_depth",
            "keybrake_audit_spool_bytes",
            "keybrake_audit_dropped_rows_total",
        ] {
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name} in:\n{text}"
            );
        }
        assert!(
            text.contains("keybrake_audit_dropped_rows_total 1"),
            "{text}"
        );
    }
}
