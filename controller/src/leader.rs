//! Leader election on a `coordination.k8s.io/v1` Lease: create it, renew it while we hold it,
//! take it over once its holder stopped renewing for `leaseDurationSeconds`. Only the leader
//! writes status and collects garbage; losing the lease stops that within one renew period.
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub renew_every: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Create,
    Renew,
    TakeOver,
    Follow { holder: String },
}

/// What to do with the Lease as it stands.
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Create;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    if holder == identity {
        return Decision::Renew;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let expired = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .is_none_or(|t| t.0.checked_add(duration).is_ok_and(|end| end <= now));
    if expired {
        Decision::TakeOver
    } else {
        Decision::Follow { holder }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease API: {0}")]
    Kube(#[from] kube::Error),
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, config: LeaseConfig) -> Self {
        LeaderElector { api, config }
    }

    /// One election round; true when we hold the lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaseError> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.config.name).await?;
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.config.identity,
            now,
        );
        let seconds = i32::try_from(self.config.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let result = match (decision, current) {
            (Decision::Follow { .. }, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.config.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::TakeOver {
                    spec.holder_identity = Some(self.config.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(MicroTime(now));
                // `replace` carries metadata.resourceVersion: a concurrent writer makes it 409.
                self.api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (_, None) => return Ok(false),
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the lease up so another replica need not wait for it to expire.
    pub async fn release(&self) -> Result<(), LeaseError> {
        if let Some(mut lease) = self.api.get_opt(&self.config.name).await?
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.config.identity.as_str())
        {
            spec.holder_identity = None;
            match self
                .api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => {}
                Err(e) if is_conflict(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Runs elections until shutdown, publishing leadership on `leader`.
    pub async fn run(
        self,
        leader: watch::Sender<bool>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) {
        let mut last_renewed: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(self.config.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let holds = match self.try_acquire_or_renew().await {
                Ok(true) => {
                    last_renewed = Some(tokio::time::Instant::now());
                    true
                }
                Ok(false) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    // Keep leading only while the lease we last wrote is still valid.
                    last_renewed.is_some_and(|t| t.elapsed() < self.config.duration)
                        && *leader.borrow()
                }
            };
            if holds != *leader.borrow() {
                tracing::info!(identity = %self.config.identity, leader = holds, "leadership changed");
            }
            leader.send_if_modified(|l| std::mem::replace(l, holds) != holds);
            metrics.leader.set(i64::from(holds));
        }
        if *leader.borrow() {
            leader.send_replace(false);
            metrics.leader.set(0);
            if let Err(e) = self.release().await {
                tracing::warn!(error = %e, "could not release the lease");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed: &str, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(seconds),
            renew_time: Some(MicroTime(renewed.parse().unwrap())),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn elections_follow_the_lease() {
        let now: Timestamp = "2026-01-01T00:00:10Z".parse().unwrap();
        assert_eq!(decide(None, "a", now), Decision::Create);
        let fresh = spec(Some("b"), "2026-01-01T00:00:05Z", 15);
        assert_eq!(
            decide(Some(&fresh), "a", now),
            Decision::Follow { holder: "b".into() }
        );
        assert_eq!(decide(Some(&fresh), "b", now), Decision::Renew);
        let stale = spec(Some("b"), "2026-01-01T00:00:00Z", 10);
        assert_eq!(decide(Some(&stale), "a", now), Decision::TakeOver);
        let released = spec(None, "2026-01-01T00:00:09Z", 15);
        assert_eq!(decide(Some(&released), "a", now), Decision::TakeOver);
    }
}
