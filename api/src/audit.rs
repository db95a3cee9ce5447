//! One row of `agent_call_audit`: one per call, allowed or denied. Never holds a secret or a
//! vault key (only the key's id, which is `namespace/name`).
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{crd::Vendor, money::Usd, verdict::Verdict};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CostSource {
    /// Read from the vendor's response (OpenAI usage, Twilio price, Stripe amount).
    Parsed,
    /// Computed from the request (Twilio segments, Resend recipients) when no price came back.
    Estimated,
    /// No money moved, or it could not be priced (e.g. a currency without a configured rate).
    None,
}

impl CostSource {
    pub const fn as_str(self) -> &'static str {
        match self {
            CostSource::Parsed => "parsed",
            CostSource::Estimated => "estimated",
            CostSource::None => "none",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    /// Unique per call (UUID v4 text); makes replays from the spool idempotent.
    pub id: String,
    pub started_at: Timestamp,
    pub duration_ms: i64,
    pub vault_key_id: Option<String>,
    pub agent_name: Option<String>,
    pub agent_run_id: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub vendor: Vendor,
    pub operation: Option<String>,
    pub method: String,
    pub path_template: Option<String>,
    pub policy_verdict: Verdict,
    pub verdict_reason: Option<String>,
    pub customer_scope_id: Option<String>,
    /// 0 when the call was never forwarded.
    pub vendor_status: i32,
    pub vendor_request_id: Option<String>,
    pub cost_usd_parsed: Option<Usd>,
    pub cost_source: CostSource,
    pub cap_usage_after_usd: Option<Usd>,
    pub policy_revision: i64,
}
