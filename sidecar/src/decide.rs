//! The policy decision, in DESIGN.md's order: unknown key, revoked, suspended, expired, stale
//! policy, operation not allowed, customer not allowed, rate cap, per-call cap, daily cap.
//! Pure functions; the proxy calls them in that order and stops at the first denial. The body
//! is only read after the operation check, so the steps are split in two groups.
use http::Method;
use jiff::Timestamp;
use keybrake_api::{KeyGrant, KeyState, OnStale, Usd, Verdict};

use crate::{
    path::{CheckedPath, PathError, template_matches},
    vendors::{CustomerScope, Operation, VendorModule},
};

/// A refusal: the verdict plus a short machine-readable reason for logs and the audit row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    pub verdict: Verdict,
    pub reason: &'static str,
}

impl Denied {
    pub const fn new(verdict: Verdict, reason: &'static str) -> Self {
        Denied { verdict, reason }
    }

    /// What the agent reads in the vendor envelope's message.
    pub fn message(&self) -> String {
        if self.verdict.is_allow() {
            // Allowed by policy, but the upstream failed (unreachable, timeout).
            return format!(
                "keybrake: the vendor API could not be reached ({})",
                self.reason
            );
        }
        format!(
            "keybrake: request denied ({verdict}: {reason}); see docs/verdicts.md",
            verdict = self.verdict,
            reason = self.reason
        )
    }
}

/// Which catalogue operation (if any) and which template allowed the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperationMatch<'a> {
    pub operation: Option<&'static Operation>,
    pub template: &'a str,
}

/// Steps 2–5: key state, expiry and freshness. `Ok(true)` means "allowed although stale"
/// (onStale: Allow), which the caller meters.
pub fn check_key(grant: &KeyGrant, now: Timestamp, stale: bool) -> Result<bool, Denied> {
    match grant.state {
        KeyState::Revoked => return Err(Denied::new(Verdict::KeyRevoked, "revoked")),
        KeyState::Suspended => return Err(Denied::new(Verdict::KeySuspended, "suspended")),
        KeyState::Active => {}
    }
    if grant.is_expired_at(now) {
        return Err(Denied::new(Verdict::KeyExpired, "expired"));
    }
    if stale {
        return match grant.on_stale {
            OnStale::Deny => Err(Denied::new(Verdict::PolicyStale, "policy_stream_stale")),
            OnStale::Allow => Ok(true),
        };
    }
    Ok(false)
}

/// Step 6: the call must match an allow rule — a catalogue operation by name, or a method plus
/// path template. A path that failed hygiene checks matches nothing.
pub fn check_operation<'a>(
    grant: &'a KeyGrant,
    module: &dyn VendorModule,
    method: &Method,
    path: Result<CheckedPath<'_>, PathError>,
) -> Result<OperationMatch<'a>, Denied> {
    let path = path.map_err(|_| Denied::new(Verdict::OperationDenied, "path_refused"))?;
    let operation = module.match_checked(method, path);
    let path = path.as_str();
    for rule in &grant.allow {
        if let (Some(name), Some(op)) = (&rule.operation, operation)
            && name == op.name
        {
            return Ok(OperationMatch {
                operation,
                template: op.path,
            });
        }
        if let (Some(rule_method), Some(template)) = (rule.method, &rule.path)
            && rule_method.as_str() == method.as_str()
            && template_matches(template, path)
        {
            return Ok(OperationMatch {
                operation,
                template,
            });
        }
    }
    Err(Denied::new(Verdict::OperationDenied, "not_in_allowlist"))
}

/// Step 7: every customer the call touches must be on the key's list (when it has one).
pub fn check_customers(grant: &KeyGrant, scope: &CustomerScope) -> Result<(), Denied> {
    if grant.customers.is_empty() {
        return Ok(());
    }
    match scope {
        CustomerScope::NotApplicable => Ok(()),
        CustomerScope::Missing => Err(Denied::new(
            Verdict::CustomerDenied,
            "customer_not_identified",
        )),
        CustomerScope::Ids(ids) => {
            let allowed = |id: &String| {
                grant
                    .customers
                    .iter()
                    .any(|c| c == id || (id.contains('.') && c.eq_ignore_ascii_case(id)))
            };
            if !ids.is_empty() && ids.iter().all(allowed) {
                Ok(())
            } else {
                Err(Denied::new(Verdict::CustomerDenied, "customer_not_allowed"))
            }
        }
    }
}

/// Step 9: the pre-flight estimate must not exceed `perCallUsdMax`.
pub fn check_per_call(grant: &KeyGrant, estimate: Option<Usd>) -> Result<(), Denied> {
    match (grant.limits.per_call_usd_max, estimate) {
        (Some(max), Some(cost)) if cost > max => Err(Denied::new(
            Verdict::PerCallCap,
            "estimate_over_per_call_max",
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use keybrake_api::{
        AgentRef, AllowRule, HttpMethod, KeyId, Limits, SecretString, TokenHash, Vendor,
    };

    use super::*;
    use crate::{path::checked_path, vendors::module_for};

    fn grant() -> KeyGrant {
        KeyGrant {
            id: KeyId::new("ns", "k"),
            token_sha256: TokenHash::of("t"),
            vendor: Vendor::Stripe,
            base_url: "http://127.0.0.1:9".into(),
            upstream_secret: SecretString::new("sk"),
            state: KeyState::Active,
            expires_at: None,
            agent: AgentRef {
                name: "a".into(),
                run_id: None,
            },
            allow: vec![
                AllowRule {
                    operation: Some("refunds.create".into()),
                    method: None,
                    path: None,
                },
                AllowRule {
                    operation: None,
                    method: Some(HttpMethod::GET),
                    path: Some("/v1/customers/{id}".into()),
                },
            ],
            customers: vec!["cus_123".into()],
            limits: Limits {
                per_call_usd_max: Some("50".parse().unwrap()),
                ..Limits::default()
            },
            on_stale: OnStale::Deny,
            policy_revision: 1,
        }
    }

    #[test]
    fn key_state_checks_come_in_order() {
        let now = Timestamp::now();
        let mut g = grant();
        assert_eq!(check_key(&g, now, false), Ok(false));
        // Revoked beats expired beats stale.
        g.state = KeyState::Revoked;
        g.expires_at = Some(now - jiff::SignedDuration::from_secs(1));
        assert_eq!(
            check_key(&g, now, true).unwrap_err().verdict,
            Verdict::KeyRevoked
        );
        g.state = KeyState::Suspended;
        assert_eq!(
            check_key(&g, now, true).unwrap_err().verdict,
            Verdict::KeySuspended
        );
        g.state = KeyState::Active;
        assert_eq!(
            check_key(&g, now, true).unwrap_err().verdict,
            Verdict::KeyExpired
        );
        g.expires_at = Some(now + jiff::SignedDuration::from_secs(60));
        assert_eq!(
            check_key(&g, now, true).unwrap_err().verdict,
            Verdict::PolicyStale
        );
        g.on_stale = OnStale::Allow;
        assert_eq!(check_key(&g, now, true), Ok(true));
    }

    #[test]
    fn operations_by_name_or_template() {
        let g = grant();
        let stripe = module_for(Vendor::Stripe);
        let m = check_operation(&g, stripe, &Method::POST, checked_path("/v1/refunds")).unwrap();
        assert_eq!(m.operation.unwrap().name, "refunds.create");
        let m = check_operation(
            &g,
            stripe,
            &Method::GET,
            checked_path("/v1/customers/cus_1"),
        )
        .unwrap();
        assert_eq!(m.template, "/v1/customers/{id}");
        for (method, path) in [
            (Method::POST, "/v1/charges"),
            (Method::POST, "/v1/customers/cus_1"),
            (Method::GET, "/v1/refunds"),
            (Method::GET, "/v1/customers/cus_1/sources"),
        ] {
            assert_eq!(
                check_operation(&g, stripe, &method, checked_path(path))
                    .unwrap_err()
                    .verdict,
                Verdict::OperationDenied,
                "{method} {path}"
            );
        }
        assert_eq!(
            check_operation(&g, stripe, &Method::POST, Err(PathError::DotSegment))
                .unwrap_err()
                .reason,
            "path_refused"
        );
        let mut empty = grant();
        empty.allow.clear();
        assert!(
            check_operation(&empty, stripe, &Method::POST, checked_path("/v1/refunds")).is_err()
        );
    }

    #[test]
    fn customers_must_all_be_listed() {
        let g = grant();
        let ids = |v: &[&str]| CustomerScope::Ids(v.iter().map(|s| s.to_string()).collect());
        assert!(check_customers(&g, &ids(&["cus_123"])).is_ok());
        assert!(check_customers(&g, &CustomerScope::NotApplicable).is_ok());
        assert!(check_customers(&g, &ids(&["cus_123", "cus_999"])).is_err());
        assert!(check_customers(&g, &ids(&["CUS_123"])).is_err());
        assert_eq!(
            check_customers(&g, &CustomerScope::Missing)
                .unwrap_err()
                .verdict,
            Verdict::CustomerDenied
        );
        let mut open = grant();
        open.customers.clear();
        assert!(check_customers(&open, &CustomerScope::Missing).is_ok());
        let mut domains = grant();
        domains.customers = vec!["Acme.com".into()];
        assert!(check_customers(&domains, &ids(&["acme.com"])).is_ok());
    }

    #[test]
    fn per_call_cap_compares_the_estimate() {
        let g = grant();
        assert!(check_per_call(&g, Some("50".parse().unwrap())).is_ok());
        assert_eq!(
            check_per_call(&g, Some("50.01".parse().unwrap()))
                .unwrap_err()
                .verdict,
            Verdict::PerCallCap
        );
        assert!(check_per_call(&g, None).is_ok());
    }
}
