//! Where replicas publish their enforcement reports: one `coordination.k8s.io/v1` Lease per
//! replica, `<lease-name>-<identity>`, in the leader-election namespace. The Lease's holder and
//! renew time say the replica is alive; the annotation `keybrake.dev/enforcement` holds its
//! [`ReplicaReport`] (JSON, a few hundred bytes per scope with streams).
//!
//! Write rate per replica: at most one write per `--enforcement-report-ms` (default 1 s) while
//! its counts change, otherwise one renewal per lease-duration/3. Every replica watches the
//! reports (label `keybrake.dev/enforcement-report=<lease-name>`) so a new leader has them at
//! once; a report not renewed within the lease duration stops counting.
use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    enforcement::EnforcementTracker,
    index::PolicyIndex,
    peer_enforcement::{PeerReports, ReplicaReport, ScopeKeys},
    reconcile::{FIELD_MANAGER, local_view},
};

pub const REPORT_LABEL: &str = "keybrake.dev/enforcement-report";
pub const REPORT_ANNOTATION: &str = "keybrake.dev/enforcement";

#[derive(Clone, Debug)]
pub struct ReportConfig {
    /// The leader-election Lease name; reports are `<lease_name>-<identity>`.
    pub lease_name: String,
    pub identity: String,
    /// Reports not renewed within this long stop counting.
    pub duration: Duration,
    /// Shortest interval between two writes of a changing report.
    pub period: Duration,
}

impl ReportConfig {
    pub fn report_name(&self) -> String {
        report_name(&self.lease_name, &self.identity)
    }
}

/// A valid object name for a replica's report Lease.
pub fn report_name(lease_name: &str, identity: &str) -> String {
    let raw = format!("{lease_name}-{identity}").to_ascii_lowercase();
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(253);
    name.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

fn report_lease(config: &ReportConfig, report: &ReplicaReport) -> serde_json::Value {
    let seconds = i32::try_from(config.duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let spec = LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(seconds),
        renew_time: Some(MicroTime(Timestamp::now())),
        ..LeaseSpec::default()
    };
    serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": config.report_name(),
            "labels": {REPORT_LABEL: config.lease_name},
            "annotations": {
                REPORT_ANNOTATION: serde_json::to_string(report).unwrap_or_default()
            },
        },
        "spec": spec,
    })
}

/// Publishes this replica's report until shutdown, then deletes it (so the leader stops
/// counting these streams at once rather than after the lease duration).
pub async fn publish_reports(
    api: Api<Lease>,
    config: ReportConfig,
    scope_keys: Arc<ScopeKeys>,
    index: Arc<PolicyIndex>,
    tracker: Arc<EnforcementTracker>,
    shutdown: CancellationToken,
) {
    let renew_every = config.duration / 3;
    let mut tick = tokio::time::interval(config.period.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(ReplicaReport, Instant)> = None;
    // Failures are logged when they start and when they stop, not once per period.
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => break,
        }
        let report = ReplicaReport::build(&scope_keys, |id, scope| {
            local_view(&index, &tracker, id, scope)
        });
        let due = match &last {
            None => true,
            Some((previous, at)) => *previous != report || at.elapsed() >= renew_every,
        };
        if !due {
            continue;
        }
        let patch = report_lease(&config, &report);
        match api
            .patch(
                &config.report_name(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => {
                if std::mem::replace(&mut failing, false) {
                    tracing::info!("enforcement report published again");
                }
                last = Some((report, Instant::now()));
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(
                    error = %e,
                    "could not publish the enforcement report; the leader will not count this \
                     replica's sidecars until it succeeds (RBAC: leases create/patch)"
                );
            }
            Err(e) => tracing::debug!(error = %e, "enforcement report still not published"),
        }
    }
    if last.is_some()
        && let Err(e) = api
            .delete(&config.report_name(), &DeleteParams::default())
            .await
    {
        tracing::warn!(error = %e, "could not delete the enforcement report");
    }
}

fn parse(lease: &Lease) -> Option<(String, ReplicaReport)> {
    let holder = lease.spec.as_ref()?.holder_identity.clone()?;
    let text = lease.annotations().get(REPORT_ANNOTATION)?;
    match serde_json::from_str(text) {
        Ok(report) => Some((holder, report)),
        Err(e) => {
            tracing::warn!(lease = %lease.name_any(), error = %e, "unreadable enforcement report");
            None
        }
    }
}

/// Whether the report was renewed recently enough to count (at list time: a replica that died
/// long ago left its Lease behind).
fn fresh(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = lease.spec.as_ref() else {
        return false;
    };
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    spec.renew_time
        .as_ref()
        .is_some_and(|t| t.0.as_second() + seconds >= now.as_second())
}

/// Keeps `peers` current from the report Leases until shutdown.
pub async fn watch_reports(
    api: Api<Lease>,
    lease_name: String,
    peers: Arc<PeerReports>,
    ttl: Duration,
    shutdown: CancellationToken,
) {
    let config = watcher::Config::default().labels(&format!("{REPORT_LABEL}={lease_name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut expiry = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = expiry.tick() => {
                peers.expire(std::time::Instant::now());
                continue;
            }
            event = events.next() => match event {
                Some(event) => event,
                None => return,
            },
        };
        match event {
            Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => {
                if fresh(&lease, Timestamp::now())
                    && let Some((holder, report)) = parse(&lease)
                {
                    peers.update(&holder, report, std::time::Instant::now());
                }
            }
            Ok(watcher::Event::Delete(lease)) => {
                if let Some(holder) = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()) {
                    peers.remove(&holder);
                }
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(e) => tracing::warn!(error = %e, "enforcement report watch error; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_are_valid_object_names() {
        assert_eq!(
            report_name("keybrake-controller", "Node_1:4242"),
            "keybrake-controller-node-1-4242"
        );
        assert_eq!(report_name("x", "-"), "x");
        assert!(report_name("l", &"a".repeat(400)).len() <= 253);
    }

    #[test]
    fn report_lease_carries_holder_label_and_report() {
        let config = ReportConfig {
            lease_name: "kc".into(),
            identity: "rep-a".into(),
            duration: Duration::from_secs(15),
            period: Duration::from_secs(1),
        };
        let value = report_lease(&config, &ReplicaReport::default());
        let lease: Lease = serde_json::from_value(value).unwrap();
        assert_eq!(lease.name_any(), "kc-rep-a");
        assert_eq!(
            lease.labels().get(REPORT_LABEL).map(String::as_str),
            Some("kc")
        );
        assert!(fresh(&lease, Timestamp::now()));
        let (holder, report) = parse(&lease).unwrap();
        assert_eq!(
            (holder.as_str(), report),
            ("rep-a", ReplicaReport::default())
        );
        let later = Timestamp::now() + jiff::SignedDuration::from_secs(60);
        assert!(!fresh(&lease, later));
    }
}
