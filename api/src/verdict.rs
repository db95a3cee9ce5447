//! The policy verdicts, in the order the sidecar checks them.
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    KeyUnknown,
    KeyRevoked,
    KeySuspended,
    KeyExpired,
    PolicyStale,
    OperationDenied,
    CustomerDenied,
    RateLimited,
    PerCallCap,
    DailyCap,
}

impl Verdict {
    /// Every verdict, in decision order (`Allow` first only because it is the happy path).
    pub const ALL: [Verdict; 11] = [
        Verdict::Allow,
        Verdict::KeyUnknown,
        Verdict::KeyRevoked,
        Verdict::KeySuspended,
        Verdict::KeyExpired,
        Verdict::PolicyStale,
        Verdict::OperationDenied,
        Verdict::CustomerDenied,
        Verdict::RateLimited,
        Verdict::PerCallCap,
        Verdict::DailyCap,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::KeyUnknown => "key_unknown",
            Verdict::KeyRevoked => "key_revoked",
            Verdict::KeySuspended => "key_suspended",
            Verdict::KeyExpired => "key_expired",
            Verdict::PolicyStale => "policy_stale",
            Verdict::OperationDenied => "operation_denied",
            Verdict::CustomerDenied => "customer_denied",
            Verdict::RateLimited => "rate_limited",
            Verdict::PerCallCap => "per_call_cap",
            Verdict::DailyCap => "daily_cap",
        }
    }

    pub fn parse(text: &str) -> Option<Verdict> {
        Verdict::ALL.into_iter().find(|v| v.as_str() == text)
    }

    pub const fn is_allow(self) -> bool {
        matches!(self, Verdict::Allow)
    }

    /// The HTTP status a denial carries. Authentication failures are 401 so SDKs raise their auth
    /// error; scope is 403; budget is 402 — never a retryable 429 — while the per-minute rate
    /// limit is a genuine, retryable 429.
    pub const fn http_status(self) -> u16 {
        match self {
            Verdict::Allow => 200,
            Verdict::KeyUnknown | Verdict::KeyRevoked | Verdict::KeyExpired => 401,
            Verdict::KeySuspended | Verdict::OperationDenied | Verdict::CustomerDenied => 403,
            Verdict::PolicyStale => 503,
            Verdict::RateLimited => 429,
            Verdict::PerCallCap | Verdict::DailyCap => 402,
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for v in Verdict::ALL {
            assert_eq!(Verdict::parse(v.as_str()), Some(v));
            assert_eq!(
                serde_json::to_string(&v).unwrap(),
                format!("\"{}\"", v.as_str())
            );
        }
    }

    #[test]
    fn budget_denials_are_not_retryable_429() {
        assert_ne!(Verdict::DailyCap.http_status(), 429);
        assert_ne!(Verdict::PerCallCap.http_status(), 429);
    }
}
