//! The VaultKey lifecycle as pure functions: effective expiry, phase, the status the leader
//! should write, the Events a transition deserves and when to look at the key again.
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use keybrake_api::{
    EnforcementStatus, KeyState, Phase, SecretKeyRef, VaultKeySpec, VaultKeyStatus,
    duration::{DurationError, parse_ttl},
};

use crate::{
    index::GrantProblem,
    token::{TOKEN_SECRET_KEY, token_secret_name},
};

pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_PROPAGATED: &str = "Propagated";

/// `expiresAt`, or creation + `ttl`, or none.
pub fn effective_expiry(
    spec: &VaultKeySpec,
    created: Option<Timestamp>,
) -> Result<Option<Timestamp>, DurationError> {
    if let Some(at) = &spec.expires_at {
        return Ok(Some(at.0));
    }
    match (&spec.ttl, created) {
        (Some(ttl), Some(created)) => {
            let ttl = parse_ttl(ttl)?;
            let ttl = jiff::SignedDuration::try_from(ttl)
                .map_err(|_| DurationError(spec.ttl.clone().unwrap_or_default()))?;
            Ok(Some(created.saturating_add(ttl).map_err(|_| {
                DurationError(spec.ttl.clone().unwrap_or_default())
            })?))
        }
        (Some(ttl), None) => parse_ttl(ttl).map(|_| None),
        (None, _) => Ok(None),
    }
}

/// Revoked is final and wins; then expiry; then the requested state.
pub fn phase_at(state: KeyState, expiry: Option<Timestamp>, now: Timestamp) -> Phase {
    match state {
        KeyState::Revoked => Phase::Revoked,
        _ if expiry.is_some_and(|at| now >= at) => Phase::Expired,
        KeyState::Suspended => Phase::Suspended,
        KeyState::Active => Phase::Active,
    }
}

/// How many of the sidecars holding a key acknowledged its latest revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnforcementView {
    pub sidecars: u32,
    pub acknowledged: u32,
    pub last_propagation_ms: Option<u64>,
}

impl EnforcementView {
    pub fn is_complete(&self) -> bool {
        self.acknowledged >= self.sidecars
    }
}

/// What the reconciler knows about one VaultKey.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub name: &'a str,
    pub spec: &'a VaultKeySpec,
    pub created: Option<Timestamp>,
    pub generation: Option<i64>,
    pub current: Option<&'a VaultKeyStatus>,
    pub token_minted: bool,
    /// Why sidecars cannot be given this key, if they cannot.
    pub grant_problem: Option<GrantProblem>,
    pub enforcement: EnforcementView,
}

/// The status the leader writes (every field this controller owns).
pub fn desired_status(obs: &Observed<'_>, now: Timestamp) -> VaultKeyStatus {
    let expiry = effective_expiry(obs.spec, obs.created);
    let phase = phase_at(obs.spec.state, expiry.as_ref().ok().copied().flatten(), now);
    let current = obs.current;
    let revoked_at = match phase {
        Phase::Revoked => Some(
            current
                .and_then(|s| s.revoked_at.clone())
                .unwrap_or(Time(now)),
        ),
        _ => None,
    };
    let (ready_status, ready_reason, ready_message) = match (&expiry, &obs.grant_problem) {
        (Err(e), _) => ("False", "InvalidTtl", e.to_string()),
        (Ok(_), Some(problem)) => ("False", problem.reason(), problem.to_string()),
        (Ok(_), None) if !obs.token_minted => (
            "False",
            "TokenNotIssued",
            "the vault key has not been minted yet".to_owned(),
        ),
        (Ok(_), None) => (
            "True",
            "Enforceable",
            format!(
                "sidecars of service account {} hold this key",
                obs.spec.workload.service_account_name
            ),
        ),
    };
    let e = &obs.enforcement;
    let (prop_status, prop_reason, prop_message) = if e.sidecars == 0 {
        (
            "True",
            "NoSidecarsConnected",
            "no sidecar of this workload is connected; new ones receive the latest policy first"
                .to_owned(),
        )
    } else if e.is_complete() {
        let took = e
            .last_propagation_ms
            .map(|ms| format!(" in {ms} ms"))
            .unwrap_or_default();
        (
            "True",
            "AllSidecarsAcknowledged",
            format!(
                "{} enforced by {}/{} sidecars{took}",
                phase_word(phase),
                e.acknowledged,
                e.sidecars
            ),
        )
    } else {
        (
            "False",
            "AwaitingAcknowledgements",
            format!(
                "{}/{} sidecars acknowledged the latest revision",
                e.acknowledged, e.sidecars
            ),
        )
    };
    let conditions = vec![
        condition(
            current,
            CONDITION_READY,
            ready_status,
            ready_reason,
            ready_message,
            obs.generation,
            now,
        ),
        condition(
            current,
            CONDITION_PROPAGATED,
            prop_status,
            prop_reason,
            prop_message,
            obs.generation,
            now,
        ),
    ];
    VaultKeyStatus {
        phase: Some(phase),
        token_secret_ref: obs.token_minted.then(|| SecretKeyRef {
            name: token_secret_name(obs.name),
            key: TOKEN_SECRET_KEY.to_owned(),
        }),
        expires_at: expiry.ok().flatten().map(Time),
        revoked_at,
        enforcement: Some(EnforcementStatus::new(
            e.sidecars,
            e.acknowledged,
            e.last_propagation_ms,
        )),
        // Owned by the audit pipeline, not by this writer.
        spent_today_usd: None,
        budget: None,
        conditions,
        observed_generation: obs.generation,
    }
}

fn phase_word(phase: Phase) -> &'static str {
    match phase {
        Phase::Active => "Active;",
        Phase::Suspended => "Suspended;",
        Phase::Revoked => "Revoked;",
        Phase::Expired => "Expired;",
    }
}

/// A condition whose `lastTransitionTime` only moves when its status does.
fn condition(
    current: Option<&VaultKeyStatus>,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let previous = current.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_));
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Whether `desired` differs from `current` in any field this controller owns.
pub fn status_changed(current: Option<&VaultKeyStatus>, desired: &VaultKeyStatus) -> bool {
    let Some(current) = current else { return true };
    let mut ours = current.clone();
    ours.spent_today_usd = None;
    ours.budget = None;
    ours != *desired
}

/// Something worth a Kubernetes Event. Never carries a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// Events for the move from the written status to the desired one.
pub fn notices(current: Option<&VaultKeyStatus>, desired: &VaultKeyStatus) -> Vec<Notice> {
    let old_phase = current.and_then(|s| s.phase);
    let mut out = Vec::new();
    if old_phase != desired.phase {
        match desired.phase {
            Some(Phase::Revoked) => out.push(Notice {
                warning: false,
                reason: "Revoked",
                note: "vault key revoked; sidecars deny it with key_revoked".into(),
            }),
            Some(Phase::Expired) => out.push(Notice {
                warning: false,
                reason: "Expired",
                note: "vault key expired; sidecars deny it with key_expired".into(),
            }),
            Some(Phase::Suspended) => out.push(Notice {
                warning: false,
                reason: "Suspended",
                note: "vault key suspended; sidecars deny it with key_suspended".into(),
            }),
            Some(Phase::Active) if old_phase == Some(Phase::Suspended) => out.push(Notice {
                warning: false,
                reason: "Resumed",
                note: "vault key active again".into(),
            }),
            _ => {}
        }
    }
    let ready = |s: Option<&VaultKeyStatus>| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_READY))
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    if let Some((status, reason)) = ready(Some(desired))
        && status == "False"
        && reason != "TokenNotIssued"
        && ready(current) != Some((status, reason))
    {
        let message = desired
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_READY)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        out.push(Notice {
            warning: true,
            reason: "NotEnforceable",
            note: format!("{message}; sidecars deny this key as unknown until fixed"),
        });
    }
    out
}

/// What the reconciler does after writing status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Look again at this instant (expiry, or end of the garbage-collection grace).
    RequeueAfter(Duration),
    /// The key expired more than the grace ago: delete it.
    Delete,
    /// Nothing scheduled: only a change wakes the key.
    AwaitChange,
}

pub fn next_step(
    phase: Phase,
    expiry: Option<Timestamp>,
    now: Timestamp,
    gc_grace: Option<Duration>,
) -> Next {
    let until = |at: Timestamp| {
        let d = at.duration_since(now);
        // A few ms late is better than a wake-up just before the instant.
        Duration::try_from(d).unwrap_or_default() + Duration::from_millis(5)
    };
    match (phase, expiry) {
        (Phase::Revoked, _) => Next::AwaitChange,
        (Phase::Expired, Some(at)) => match gc_grace {
            None => Next::AwaitChange,
            Some(grace) => {
                let collect_at = jiff::SignedDuration::try_from(grace)
                    .ok()
                    .and_then(|g| at.checked_add(g).ok())
                    .unwrap_or(Timestamp::MAX);
                if now >= collect_at {
                    Next::Delete
                } else {
                    Next::RequeueAfter(until(collect_at))
                }
            }
        },
        (Phase::Expired, None) => Next::AwaitChange,
        (_, Some(at)) if at > now => Next::RequeueAfter(until(at)),
        (_, _) => Next::AwaitChange,
    }
}

#[cfg(test)]
mod tests {
    use keybrake_api::{AgentRef, Limits, OnStale, Upstream, Vendor, WorkloadRef};

    use super::*;

    fn spec() -> VaultKeySpec {
        VaultKeySpec {
            vendor: Vendor::Stripe,
            upstream: Upstream {
                secret_ref: SecretKeyRef {
                    name: "stripe-live".into(),
                    key: "api-key".into(),
                },
                base_url: None,
            },
            state: KeyState::Active,
            expires_at: None,
            ttl: None,
            agent: AgentRef {
                name: "refund-agent".into(),
                run_id: None,
            },
            workload: WorkloadRef {
                service_account_name: "refund".into(),
            },
            allow: vec![],
            customers: vec![],
            limits: Limits::default(),
            on_stale: OnStale::Deny,
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn observed<'a>(spec: &'a VaultKeySpec, current: Option<&'a VaultKeyStatus>) -> Observed<'a> {
        Observed {
            name: "k",
            spec,
            created: Some(ts("2026-01-01T00:00:00Z")),
            generation: Some(2),
            current,
            token_minted: true,
            grant_problem: None,
            enforcement: EnforcementView {
                sidecars: 2,
                acknowledged: 2,
                last_propagation_ms: Some(41),
            },
        }
    }

    #[test]
    fn expiry_comes_from_expires_at_or_ttl() {
        let mut s = spec();
        assert_eq!(effective_expiry(&s, None).unwrap(), None);
        s.ttl = Some("1h30m".into());
        assert_eq!(
            effective_expiry(&s, Some(ts("2026-01-01T00:00:00Z"))).unwrap(),
            Some(ts("2026-01-01T01:30:00Z"))
        );
        s.ttl = Some("bogus".into());
        assert!(effective_expiry(&s, Some(ts("2026-01-01T00:00:00Z"))).is_err());
        s.ttl = None;
        s.expires_at = Some(Time(ts("2026-02-01T00:00:00Z")));
        assert_eq!(
            effective_expiry(&s, None).unwrap(),
            Some(ts("2026-02-01T00:00:00Z"))
        );
    }

    #[test]
    fn revoked_wins_over_expiry_and_expiry_over_suspension() {
        let at = Some(ts("2026-01-01T00:00:00Z"));
        let before = ts("2025-12-31T23:59:59Z");
        let after = ts("2026-01-01T00:00:00Z");
        assert_eq!(phase_at(KeyState::Revoked, at, after), Phase::Revoked);
        assert_eq!(phase_at(KeyState::Suspended, at, after), Phase::Expired);
        assert_eq!(phase_at(KeyState::Suspended, at, before), Phase::Suspended);
        assert_eq!(phase_at(KeyState::Active, at, before), Phase::Active);
        assert_eq!(phase_at(KeyState::Active, None, after), Phase::Active);
    }

    #[test]
    fn status_reports_token_enforcement_and_conditions() {
        let s = spec();
        let now = ts("2026-01-01T00:00:05Z");
        let st = desired_status(&observed(&s, None), now);
        assert_eq!(st.phase, Some(Phase::Active));
        assert_eq!(st.token_secret_ref.as_ref().unwrap().name, "k-token");
        assert_eq!(st.enforcement.as_ref().unwrap().summary, "2/2");
        assert_eq!(st.observed_generation, Some(2));
        let ready = &st.conditions[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            ("Ready", "True")
        );
        let prop = &st.conditions[1];
        assert_eq!(prop.status, "True");
        assert!(
            prop.message.contains("2/2 sidecars in 41 ms"),
            "{}",
            prop.message
        );
        assert!(!status_changed(
            Some(&st),
            &desired_status(&observed(&s, Some(&st)), now)
        ));
    }

    #[test]
    fn revocation_stamps_revoked_at_once_and_waits_for_acks() {
        let mut s = spec();
        s.state = KeyState::Revoked;
        let t1 = ts("2026-01-01T00:00:05Z");
        let mut obs = observed(&s, None);
        obs.enforcement = EnforcementView {
            sidecars: 3,
            acknowledged: 1,
            last_propagation_ms: None,
        };
        let first = desired_status(&obs, t1);
        assert_eq!(first.revoked_at, Some(Time(t1)));
        assert_eq!(first.conditions[1].status, "False");
        assert_eq!(
            notices(None, &first),
            vec![Notice {
                warning: false,
                reason: "Revoked",
                note: "vault key revoked; sidecars deny it with key_revoked".into()
            }]
        );
        let mut obs = observed(&s, Some(&first));
        obs.enforcement.last_propagation_ms = Some(12);
        let second = desired_status(&obs, ts("2026-01-01T00:00:09Z"));
        assert_eq!(second.revoked_at, Some(Time(t1)), "revokedAt must not move");
        assert_eq!(second.conditions[1].status, "True");
        assert_eq!(
            second.conditions[1].last_transition_time,
            Time(ts("2026-01-01T00:00:09Z"))
        );
        assert!(notices(Some(&first), &second).is_empty());
    }

    #[test]
    fn missing_upstream_secret_is_not_ready_and_explained() {
        let s = spec();
        let mut obs = observed(&s, None);
        obs.grant_problem = Some(GrantProblem::UpstreamSecretMissing {
            name: "stripe-live".into(),
        });
        let st = desired_status(&obs, ts("2026-01-01T00:00:05Z"));
        assert_eq!(st.conditions[0].status, "False");
        assert_eq!(st.conditions[0].reason, "UpstreamSecretMissing");
        let n = notices(None, &st);
        assert!(
            n.iter()
                .any(|n| n.warning && n.note.contains("stripe-live")),
            "{n:?}"
        );
    }

    #[test]
    fn requeues_at_expiry_then_collects_after_grace() {
        let at = ts("2026-01-01T01:00:00Z");
        let now = ts("2026-01-01T00:59:00Z");
        assert_eq!(
            next_step(Phase::Active, Some(at), now, None),
            Next::RequeueAfter(Duration::from_millis(60_005))
        );
        let grace = Some(Duration::from_secs(600));
        assert_eq!(
            next_step(Phase::Expired, Some(at), ts("2026-01-01T01:05:00Z"), grace),
            Next::RequeueAfter(Duration::from_millis(300_005))
        );
        assert_eq!(
            next_step(Phase::Expired, Some(at), ts("2026-01-01T01:10:00Z"), grace),
            Next::Delete
        );
        assert_eq!(
            next_step(Phase::Expired, Some(at), now, None),
            Next::AwaitChange
        );
        assert_eq!(
            next_step(Phase::Revoked, Some(at), now, grace),
            Next::AwaitChange
        );
        assert_eq!(
            next_step(Phase::Active, None, now, grace),
            Next::AwaitChange
        );
    }
}
