//! Prometheus metrics, names as agreed across the project (see the preamble).
use std::sync::OnceLock;

use keybrake_api::{KeyGrant, Vendor, Verdict};
use keybrake_audit::metrics::AuditMetrics;
use prometheus::{
    Counter, CounterVec, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::store::PolicyStore;

/// One key's labelled series, resolved on first use and then reused: `with_label_values`
/// hashes every label on each call, which is measurable on the request path. Lives on the
/// key's store entry, so a policy change (a new entry, maybe a new agent name) resolves anew.
/// The per-verdict slots are allocated on the key's first call: most of 10,000 loaded keys
/// are never used by one sidecar, and their empty slots would cost ~200 bytes each.
#[derive(Debug, Default)]
pub struct KeyCounters {
    calls: OnceLock<Box<VerdictCounters>>,
    cost_usd: OnceLock<Counter>,
}

type VerdictCounters = [OnceLock<IntCounter>; Verdict::ALL.len()];

/// `keybrake_calls_total` series of calls that matched no key: empty key labels, by vendor
/// (or `none` when no vendor was routed) and verdict.
type UnkeyedCalls = [[OnceLock<IntCounter>; Verdict::ALL.len()]; Vendor::ALL.len() + 1];

pub struct Metrics {
    registry: Registry,
    unkeyed_calls: UnkeyedCalls,
    upstream_timers: [OnceLock<Histogram>; Vendor::ALL.len()],
    pub calls: IntCounterVec,
    pub cost_usd: CounterVec,
    pub upstream_duration: HistogramVec,
    pub policy_revision: IntGauge,
    pub policy_staleness: Gauge,
    pub stale_allowed: IntCounterVec,
    /// Calls refused because every connection to their upstream stayed busy (the
    /// `--upstream-max-connections` cap); one series per vendor, exported from start-up at 0.
    pub upstream_busy: IntCounterVec,
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
        let upstream_busy = IntCounterVec::new(
            Opts::new(
                "keybrake_upstream_busy_calls_total",
                "Allowed calls answered 502 upstream_busy: every connection to the upstream stayed \
                 busy for --upstream-connect-timeout (cap: --upstream-max-connections).",
            ),
            &["vendor"],
        )
        .expect("valid metric");
        for vendor in Vendor::ALL {
            upstream_busy.with_label_values(&[vendor.as_str()]);
        }
        for c in [
            Box::new(calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(cost_usd.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(policy_revision.clone()),
            Box::new(policy_staleness.clone()),
            Box::new(stale_allowed.clone()),
            Box::new(upstream_busy.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        let audit = AuditMetrics::register(&registry).expect("audit metric names are unique");
        Metrics {
            registry,
            unkeyed_calls: Default::default(),
            upstream_timers: Default::default(),
            calls,
            cost_usd,
            upstream_duration,
            policy_revision,
            policy_staleness,
            stale_allowed,
            upstream_busy,
            audit,
        }
    }

    /// The registry, for other components (audit shipper, stream client) to add their metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// One call of a known key, counted through the key's cached series.
    pub fn count_key_call(&self, counters: &KeyCounters, grant: &KeyGrant, verdict: Verdict) {
        counters.calls.get_or_init(Box::default)[verdict as usize]
            .get_or_init(|| {
                self.calls.with_label_values(&[
                    grant.id.namespace(),
                    grant.agent.name.as_str(),
                    grant.id.name(),
                    grant.vendor.as_str(),
                    verdict.as_str(),
                ])
            })
            .inc();
    }

    /// One call that matched no key (its key labels are empty).
    pub fn count_unkeyed_call(&self, vendor: Option<Vendor>, verdict: Verdict) {
        let slot = vendor.map_or(Vendor::ALL.len(), |v| v as usize);
        self.unkeyed_calls[slot][verdict as usize]
            .get_or_init(|| {
                let vendor = vendor.map(Vendor::as_str).unwrap_or("none");
                self.calls
                    .with_label_values(&["", "", "", vendor, verdict.as_str()])
            })
            .inc();
    }

    /// Spend of a known key, through its cached series.
    pub fn add_key_cost(&self, counters: &KeyCounters, grant: &KeyGrant, usd: f64) {
        counters
            .cost_usd
            .get_or_init(|| {
                self.cost_usd.with_label_values(&[
                    grant.id.namespace(),
                    grant.agent.name.as_str(),
                    grant.id.name(),
                    grant.vendor.as_str(),
                ])
            })
            .inc_by(usd);
    }

    pub fn upstream_timer(&self, vendor: Vendor) -> &Histogram {
        self.upstream_timers[vendor as usize]
            .get_or_init(|| self.upstream_duration.with_label_values(&[vendor.as_str()]))
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
    fn cached_series_carry_the_agreed_labels() {
        let metrics = Metrics::new();
        let mut grant = crate::store::tests::grant("k1", "t1");
        let counters = KeyCounters::default();
        metrics.count_key_call(&counters, &grant, Verdict::Allow);
        metrics.count_key_call(&counters, &grant, Verdict::Allow);
        metrics.count_key_call(&counters, &grant, Verdict::DailyCap);
        metrics.add_key_cost(&counters, &grant, 0.25);
        metrics.add_key_cost(&counters, &grant, 0.5);
        metrics.count_unkeyed_call(None, Verdict::OperationDenied);
        metrics.count_unkeyed_call(Some(Vendor::Stripe), Verdict::KeyUnknown);
        metrics.count_unkeyed_call(Some(Vendor::Stripe), Verdict::KeyUnknown);
        // A new policy entry (new counters) with another agent name: a new series.
        grant.agent.name = "b".into();
        metrics.count_key_call(&KeyCounters::default(), &grant, Verdict::Allow);
        let text = metrics.render(&PolicyStore::new(crate::store::Freshness::AlwaysFresh));
        for line in [
            r#"keybrake_calls_total{agent="a",namespace="ns",vault_key="k1",vendor="stripe",verdict="allow"} 2"#,
            r#"keybrake_calls_total{agent="a",namespace="ns",vault_key="k1",vendor="stripe",verdict="daily_cap"} 1"#,
            r#"keybrake_calls_total{agent="b",namespace="ns",vault_key="k1",vendor="stripe",verdict="allow"} 1"#,
            r#"keybrake_calls_total{agent="",namespace="",vault_key="",vendor="none",verdict="operation_denied"} 1"#,
            r#"keybrake_calls_total{agent="",namespace="",vault_key="",vendor="stripe",verdict="key_unknown"} 2"#,
            r#"keybrake_cost_usd_total{agent="a",namespace="ns",vault_key="k1",vendor="stripe"} 0.75"#,
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        assert_eq!(text.matches("keybrake_calls_total{").count(), 5, "{text}");
    }

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
