//! Budget-slice leases: how several sidecars share one key's `dailyUsdCap` without overshooting
//! it. A sidecar asks the controller (`POST /v1/budget`, same ServiceAccount-token auth as
//! `/v1/ack`) for a lease on a key; it may book calls only against the lease's `granted` total,
//! for at most `ttlMs` from when it sent the request. The controller keeps every key's leases of
//! the UTC day in `status.budget` ([`BudgetBook`]), written with optimistic concurrency, so two
//! replicas can never hand out the same dollars. See docs/verdicts.md, "Several sidecars".
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{money::Usd, policy::KeyId};

pub const BUDGET_PATH: &str = "/v1/budget";

/// Most leases one key's book holds at a time (the schema's bound, which keeps the apiserver's
/// validation cost in budget). A controller refuses to open more: fail closed.
pub const MAX_LEASES: usize = 32;

/// One sidecar's ask for one key: report what it booked on its lease, and ask for more.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetRequest {
    pub key: KeyId,
    /// The lease this sidecar holds on the key; `None` to open a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// Money booked against that lease so far (settled plus still held), never less than the
    /// last report.
    #[serde(default)]
    pub used: Usd,
    /// The smallest headroom that is any use now (the pending call's reservation); the
    /// controller grants at least this much or nothing.
    #[serde(default)]
    pub want: Usd,
    /// Close the lease: `used` is final and the unspent rest returns to the key.
    #[serde(default)]
    pub release: bool,
}

/// The controller's answer: the lease's cumulative grant. The sidecar may book up to `granted`
/// in total on this lease, until `ttlMs` after it sent the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetGrant {
    pub lease: String,
    pub granted: Usd,
    /// Zero for a released lease (or one that may no longer be used, e.g. at the end of the day).
    pub ttl_ms: u64,
    /// The key's committed total today (spent, plus every lease's unspent headroom).
    pub committed: Usd,
}

/// A key's budget for one UTC day, as kept in `status.budget`. Written by any controller
/// replica with a resourceVersion precondition (a lost race is retried from a fresh read).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetBook {
    /// The UTC day (`YYYY-MM-DD`) these leases belong to; a new day starts an empty book.
    #[schemars(length(max = 10))]
    pub day: String,
    /// Final spend of released leases (and of leases folded away as stranded).
    pub settled_usd: Usd,
    /// Open leases, and expired ones whose sidecar never reported (counted at their grant).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub leases: Vec<BudgetLease>,
}

/// One sidecar's lease on the key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetLease {
    #[schemars(length(max = 32))]
    pub id: String,
    /// Cumulative grant: the most the sidecar may book on this lease.
    pub granted_usd: Usd,
    /// What the sidecar last reported booked.
    pub used_usd: Usd,
    /// After this the sidecar no longer books on the lease.
    pub expires_at: Time,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_defaults_and_round_trips() {
        let r: BudgetRequest = serde_json::from_str(r#"{"key":"ns/k"}"#).unwrap();
        assert_eq!(r.lease, None);
        assert_eq!(r.used, Usd::ZERO);
        assert!(!r.release);
        let text = serde_json::to_string(&BudgetRequest {
            lease: Some("l1".into()),
            want: Usd::from_cents(250),
            ..r
        })
        .unwrap();
        assert_eq!(
            text,
            r#"{"key":"ns/k","lease":"l1","used":"0.00","want":"2.50","release":false}"#
        );
    }
}
