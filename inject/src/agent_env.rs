//! The env an agent container gets: its vault key (from the token Secret the controller mints)
//! and base URLs that point each vendor SDK at the sidecar.
//!
//! Which SDKs honour which variable (checked in the SDK sources):
//! - `OPENAI_BASE_URL`: openai-python 3.x and openai-node 6.x read it when no `base_url` is passed.
//!   Their default is `https://api.openai.com/v1`, so the value keeps the `/v1` suffix.
//! - `RESEND_API_URL`: resend-python 2.x (`resend.api_url`). `RESEND_BASE_URL`: resend-node 6.x.
//!   Both default to `https://api.resend.com` (no path).
//! - `STRIPE_API_BASE`, `TWILIO_API_BASE`: no official SDK reads these; they are Keybrake's
//!   convention for the one line of client setup (`stripe.api_base = os.environ["STRIPE_API_BASE"]`,
//!   Stripe Node `{host, port, protocol}` parsed from it, Twilio `client.api.base_url`). They point
//!   at per-vendor listeners because those SDKs cannot add a path prefix.
//! - `KEYBRAKE_PROXY_URL`: the prefix-routed listener, for hand-written clients.
//!
//! A variable the container already sets in `env` is left alone (the user wins); the caller gets
//! a warning, because a base URL that bypasses the sidecar means the vault key goes straight to
//! the vendor, which refuses it.
use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};

use crate::config::SidecarPorts;
use crate::names;

/// Vendor base-URL variables, in the order they are added.
pub fn vendor_base_urls(ports: &SidecarPorts) -> Vec<(&'static str, String)> {
    let local = |port: u16| format!("http://127.0.0.1:{port}");
    vec![
        ("KEYBRAKE_PROXY_URL", local(ports.proxy)),
        (
            "OPENAI_BASE_URL",
            format!("{}/openai/v1", local(ports.proxy)),
        ),
        ("STRIPE_API_BASE", local(ports.stripe)),
        ("TWILIO_API_BASE", local(ports.twilio)),
        ("RESEND_API_URL", local(ports.resend)),
        ("RESEND_BASE_URL", local(ports.resend)),
    ]
}

/// `VAULT_KEY` from `<vault-key>-token`/`VAULT_KEY`. Not optional: until the controller has
/// minted the Secret the kubelet holds the agent back, which is the fail-closed behaviour we want.
pub fn vault_key_env(vault_key: &str) -> EnvVar {
    EnvVar {
        name: names::VAULT_KEY_ENV.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: names::token_secret_name(vault_key),
                key: names::TOKEN_SECRET_KEY.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Everything one agent container should get, before dropping what it already sets.
pub fn agent_env(vault_key: Option<&str>, ports: &SidecarPorts) -> Vec<EnvVar> {
    let mut env: Vec<EnvVar> = vault_key.map(vault_key_env).into_iter().collect();
    env.extend(
        vendor_base_urls(ports)
            .into_iter()
            .map(|(name, value)| EnvVar {
                name: name.into(),
                value: Some(value),
                ..Default::default()
            }),
    );
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_base_url_keeps_the_v1_suffix_the_sdk_expects() {
        let urls = vendor_base_urls(&SidecarPorts::default());
        let openai = urls.iter().find(|(n, _)| *n == "OPENAI_BASE_URL").unwrap();
        assert_eq!(openai.1, "http://127.0.0.1:15001/openai/v1");
        let stripe = urls.iter().find(|(n, _)| *n == "STRIPE_API_BASE").unwrap();
        assert_eq!(stripe.1, "http://127.0.0.1:15002");
    }

    #[test]
    fn every_url_is_loopback() {
        for (name, url) in vendor_base_urls(&SidecarPorts::default()) {
            assert!(url.starts_with("http://127.0.0.1:"), "{name}={url}");
        }
    }

    #[test]
    fn vault_key_comes_from_the_token_secret() {
        let env = vault_key_env("refund-agent-run-42");
        let secret = env.value_from.unwrap().secret_key_ref.unwrap();
        assert_eq!(secret.name, "refund-agent-run-42-token");
        assert_eq!(secret.key, "VAULT_KEY");
        assert_eq!(secret.optional, Some(false));
        assert!(env.value.is_none());
    }

    #[test]
    fn without_a_vault_key_only_urls_are_set() {
        let env = agent_env(None, &SidecarPorts::default());
        assert!(env.iter().all(|e| e.name != "VAULT_KEY"));
        assert_eq!(env.len(), vendor_base_urls(&SidecarPorts::default()).len());
    }
}
