//! The `VaultKey` custom resource (`keybrake.dev/v1alpha1`). The apiserver enforces what can be
//! enforced declaratively (structural schema + CEL), so a malformed key is refused at `kubectl
//! apply` rather than discovered by a sidecar.
// kube's `printcolumn(...)` repeats `type_ = …` once per column by design.
#![allow(clippy::duplicated_attributes)]
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::money::Usd;

/// Longest VaultKey name: its token Secret `<name>-token` must stay within Kubernetes' 253
/// characters. The CRD's root CEL rule spells the same number.
pub const MAX_NAME_LEN: usize = 253 - "-token".len();

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keybrake.dev",
    version = "v1alpha1",
    kind = "VaultKey",
    namespaced,
    shortname = "vk",
    status = "VaultKeyStatus",
    derive = "PartialEq",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Vendor", type_ = "string", json_path = ".spec.vendor"),
    printcolumn(name = "Agent", type_ = "string", json_path = ".spec.agent.name"),
    printcolumn(
        name = "Spent Today",
        type_ = "string",
        json_path = ".status.spentTodayUsd"
    ),
    printcolumn(
        name = "Enforced",
        type_ = "string",
        json_path = ".status.enforcement.summary"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    // `<name>-token` (its Secret) must fit a 253-character object name: see MAX_NAME_LEN.
    validation = Rule::new("size(self.metadata.name) <= 247").message("a VaultKey name is at most 247 characters: its token Secret is named <name>-token, and object names end at 253")
)]
#[x_kube(
    validation = Rule::new("!(has(self.expiresAt) && has(self.ttl))").message("set either expiresAt or ttl, not both"),
    validation = Rule::new("self.vendor != 'custom' || (has(self.upstream.baseUrl) && self.upstream.baseUrl != '')").message("vendor custom has no default upstream: set upstream.baseUrl")
)]
#[serde(rename_all = "camelCase")]
pub struct VaultKeySpec {
    /// Which vendor this key calls; decides the auth slot, operation catalogue and error envelope.
    pub vendor: Vendor,
    /// Where the real secret lives and where calls go.
    pub upstream: Upstream,
    /// Active | Suspended | Revoked. Revoked is final.
    #[serde(default)]
    #[x_kube(validation = Rule::new("oldSelf != 'Revoked' || self == 'Revoked'").message("a Revoked VaultKey stays Revoked: revocation is final, issue a new VaultKey instead"))]
    pub state: KeyState,
    /// Absolute expiry (RFC 3339). Mutually exclusive with `ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// Lifetime counted from creation, e.g. `30m`, `1h30m`. Mutually exclusive with `expiresAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 24))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]{1,6}[hms]){1,3}$')").message("ttl must be a duration such as \"30m\" or \"1h30m\" (units h, m, s)"))]
    pub ttl: Option<String>,
    /// Which agent run holds this key (copied into every audit row).
    pub agent: AgentRef,
    /// Which pods' sidecars receive this key.
    pub workload: WorkloadRef,
    /// Endpoint allowlist. Empty means every call is denied.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub allow: Vec<AllowRule>,
    /// customer_scope_id allowlist (Stripe customer, Twilio `To`, Resend recipient domain).
    /// Empty means no customer restriction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub customers: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    /// What a sidecar does when its policy stream has been silent past the staleness bound.
    #[serde(default)]
    pub on_stale: OnStale,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    Stripe,
    Openai,
    Twilio,
    Resend,
    Custom,
}

impl Vendor {
    pub const ALL: [Vendor; 5] = [
        Vendor::Stripe,
        Vendor::Openai,
        Vendor::Twilio,
        Vendor::Resend,
        Vendor::Custom,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Vendor::Stripe => "stripe",
            Vendor::Openai => "openai",
            Vendor::Twilio => "twilio",
            Vendor::Resend => "resend",
            Vendor::Custom => "custom",
        }
    }

    pub fn parse(text: &str) -> Option<Vendor> {
        Vendor::ALL.into_iter().find(|v| v.as_str() == text)
    }

    /// The production API host, used when `upstream.baseUrl` is not set.
    pub const fn default_base_url(self) -> Option<&'static str> {
        match self {
            Vendor::Stripe => Some("https://api.stripe.com"),
            Vendor::Openai => Some("https://api.openai.com"),
            Vendor::Twilio => Some("https://api.twilio.com"),
            Vendor::Resend => Some("https://api.resend.com"),
            Vendor::Custom => None,
        }
    }
}

impl std::fmt::Display for Vendor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    /// The Secret (same namespace) holding the real vendor secret.
    pub secret_ref: SecretKeyRef,
    /// Defaults per vendor; override for tests, regional hosts or `custom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#@]+(/[^?#]*)?$')").message("baseUrl must be an http(s) URL with a host and no query, fragment or credentials"))]
    pub base_url: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum KeyState {
    #[default]
    Active,
    Suspended,
    Revoked,
}

impl KeyState {
    pub const fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "Active",
            KeyState::Suspended => "Suspended",
            KeyState::Revoked => "Revoked",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub run_id: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: String,
}

/// One allowlist entry: a catalogue operation name, or an HTTP method plus a path template.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.operation) ? !has(self.method) && !has(self.path) : has(self.method) && has(self.path)").message("an allow entry is either {operation: NAME} or {method: METHOD, path: /TEMPLATE}, not a mix and not empty")
)]
pub struct AllowRule {
    /// A name from the vendor's operation catalogue, e.g. `refunds.create`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z][a-z0-9_]*([.][a-z][a-z0-9_]*)+$')").message("operation must be a catalogue name such as refunds.create"))]
    pub operation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,
    /// Path template; `{name}` matches one path segment, e.g. `/v1/customers/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("self.matches('^(/([A-Za-z0-9._~-]+|[{][A-Za-z0-9_]+[}]))+/?$')").message("path must be an absolute template such as /v1/customers/{id}"))]
    pub path: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum HttpMethod {
    GET,
    POST,
    PUT,
    PATCH,
    DELETE,
}

impl HttpMethod {
    pub const fn as_str(self) -> &'static str {
        match self {
            HttpMethod::GET => "GET",
            HttpMethod::POST => "POST",
            HttpMethod::PUT => "PUT",
            HttpMethod::PATCH => "PATCH",
            HttpMethod::DELETE => "DELETE",
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Spend per UTC day, e.g. "250.00".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_usd_cap: Option<Usd>,
    /// Largest single call, e.g. "50.00".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_call_usd_max: Option<Usd>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000000").message("callsPerMinute must be between 1 and 1000000"))]
    pub calls_per_minute: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum OnStale {
    /// Fail closed (the default).
    #[default]
    Deny,
    /// Keep enforcing the last known policy. Explicit, documented and metered.
    Allow,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultKeyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The Secret (owned by this VaultKey) holding the minted vault key, for the agent's env.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
    /// The effective expiry, from `expiresAt` or creation + `ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<EnforcementStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent_today_usd: Option<Usd>,
    /// Today's budget-slice leases to sidecars (see docs/verdicts.md, "Several sidecars").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::budget::BudgetBook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    Active,
    Suspended,
    Revoked,
    Expired,
}

/// How many sidecars hold this key's latest revision.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnforcementStatus {
    /// Connected sidecars that should hold this key.
    pub sidecars: u32,
    /// Of those, how many acknowledged the latest revision.
    pub acknowledged: u32,
    /// Change seen by the controller → the slowest acknowledgement of the latest revision by a
    /// sidecar that received it live. Set once every sidecar holds that revision; absent while
    /// it propagates, or when every sidecar got it in its first snapshot (nothing to time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_propagation_ms: Option<u64>,
    /// `acknowledged/sidecars`, for `kubectl get vk`.
    pub summary: String,
}

impl EnforcementStatus {
    pub fn new(sidecars: u32, acknowledged: u32, last_propagation_ms: Option<u64>) -> Self {
        EnforcementStatus {
            sidecars,
            acknowledged,
            last_propagation_ms,
            summary: format!("{acknowledged}/{sidecars}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    #[test]
    fn the_name_rule_leaves_room_for_the_token_secret() {
        let longest = "k".repeat(MAX_NAME_LEN);
        assert_eq!(crate::policy::token_secret_name(&longest).len(), 253);
        let crd = serde_json::to_string(&VaultKey::crd()).unwrap();
        assert!(
            crd.contains(&format!("size(self.metadata.name) <= {MAX_NAME_LEN}")),
            "the root CEL rule must use MAX_NAME_LEN"
        );
    }

    #[test]
    fn crd_carries_the_cel_rules_and_columns() {
        let crd = serde_json::to_string(&VaultKey::crd()).unwrap();
        for needle in [
            "oldSelf != 'Revoked'",
            "set either expiresAt or ttl, not both",
            "vendor custom has no default upstream",
            "an allow entry is either",
            "must be a non-negative decimal amount",
            "\"shortNames\":[\"vk\"]",
            ".status.enforcement.summary",
        ] {
            assert!(crd.contains(needle), "CRD lacks {needle}");
        }
    }

    #[test]
    fn spec_round_trips_design_example() {
        let yaml = r#"
vendor: stripe
upstream: {secretRef: {name: stripe-live, key: api-key}}
state: Active
expiresAt: "2026-11-30T03:00:00Z"
agent: {name: refund-agent, runId: run-42}
workload: {serviceAccountName: refund-agent}
allow:
  - operation: refunds.create
  - {method: GET, path: "/v1/customers/{id}"}
customers: [cus_123]
limits: {dailyUsdCap: "250.00", perCallUsdMax: "50.00", callsPerMinute: 120}
onStale: Deny
"#;
        let spec: VaultKeySpec = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(spec.limits.daily_usd_cap, Some("250".parse().unwrap()));
        assert_eq!(spec.allow[1].method, Some(HttpMethod::GET));
        let back: VaultKeySpec =
            serde_yaml::from_str(&serde_yaml::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }
}
