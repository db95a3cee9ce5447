//! Every name the injector reads from or writes into a pod, in one place, so the chart, the
//! controller and the docs can refer to the same strings.

/// Pod annotation (or label) that opts a pod in. Only the value `"true"` opts in.
pub const INJECT: &str = "keybrake.dev/inject";
/// Optional pod annotation: the sidecar's cap on connections open at once to one vendor
/// (`--upstream-max-connections`; "0" = no cap). For agents that hold more concurrent
/// streams to one vendor than the sidecar's default allows.
pub const UPSTREAM_MAX_CONNECTIONS: &str = "keybrake.dev/upstream-max-connections";
/// Pod annotation naming the VaultKey whose token Secret feeds `VAULT_KEY`.
pub const VAULT_KEY_ANNOTATION: &str = "keybrake.dev/vault-key";
/// Optional pod annotation: comma-separated container names that receive the agent env.
/// Without it every regular container does.
pub const AGENT_CONTAINERS: &str = "keybrake.dev/agent-containers";
/// Written by the injector: marks a pod as injected (idempotency, and for humans).
pub const INJECTED_ANNOTATION: &str = "keybrake.dev/injected";
/// Written by the injector: lets a PodMonitor select injected pods in every namespace.
pub const SIDECAR_LABEL: &str = "keybrake.dev/sidecar";
/// Namespace label: `disabled` keeps the webhook away from the whole namespace.
pub const NAMESPACE_OPT_OUT_LABEL: &str = "keybrake.dev/inject";
pub const NAMESPACE_OPT_OUT_VALUE: &str = "disabled";

pub const SIDECAR_CONTAINER: &str = "keybrake-sidecar";
pub const TOKEN_VOLUME: &str = "keybrake-token";
pub const CA_VOLUME: &str = "keybrake-ca";
pub const SPOOL_VOLUME: &str = "keybrake-spool";
/// Port name of the sidecar's admin listener (`/live`, `/ready`, `/metrics`); a PodMonitor
/// scrapes it by this name.
pub const ADMIN_PORT_NAME: &str = "keybrake-admin";

pub const TOKEN_DIR: &str = "/var/run/secrets/keybrake/token";
pub const TOKEN_FILE: &str = "token";
pub const CA_DIR: &str = "/var/run/secrets/keybrake/ca";
pub const SPOOL_DIR: &str = "/var/lib/keybrake/spool";

/// The token Secret the controller mints for a VaultKey: `<vaultkey>-token`, key `VAULT_KEY`.
pub use keybrake_api::policy::{TOKEN_SECRET_KEY, token_secret_name};
/// The env var the agent reads its vault key from.
pub const VAULT_KEY_ENV: &str = "VAULT_KEY";

/// RFC 1123 subdomain, the rule for Secret and VaultKey names.
pub(crate) fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_subdomain_rules() {
        assert!(is_dns_subdomain("refund-agent-run-42"));
        assert!(is_dns_subdomain("a.b-c.d"));
        assert!(!is_dns_subdomain(""));
        assert!(!is_dns_subdomain("Upper"));
        assert!(!is_dns_subdomain("-lead"));
        assert!(!is_dns_subdomain("trail-"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(!is_dns_subdomain("under_score"));
        assert!(!is_dns_subdomain(&"a".repeat(254)));
    }

    #[test]
    fn token_secret_follows_the_convention() {
        assert_eq!(
            token_secret_name("refund-agent-run-42"),
            "refund-agent-run-42-token"
        );
    }
}
