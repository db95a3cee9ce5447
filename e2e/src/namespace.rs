//! A fresh namespace per test, so tests share one plane without seeing each other's objects.
//! Namespaces are never deleted: without kube-controller-manager they would stay Terminating
//! anyway, and they vanish with the plane.
use std::collections::BTreeMap;
use std::process::Command;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, Resource};

use crate::error::HarnessError;
use crate::plane::{ControlPlane, random_token};

/// Label on every test namespace.
pub const TEST_NAMESPACE_LABEL: &str = "keybrake.dev/e2e";

/// A namespace created for one test, with an admin client.
pub struct TestNamespace<'p> {
    name: String,
    client: Client,
    plane: &'p ControlPlane,
}

impl TestNamespace<'static> {
    /// A fresh namespace `<prefix>-<random>` on the shared plane ([`crate::shared_plane`]).
    /// Panics with a useful message if the plane cannot start.
    pub async fn new(prefix: &str) -> Self {
        let plane = tokio::task::spawn_blocking(crate::shared_plane)
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        TestNamespace::create(plane, prefix)
            .await
            .unwrap_or_else(|e| panic!("creating a test namespace failed: {e}"))
    }
}

impl<'p> TestNamespace<'p> {
    /// A fresh namespace on `plane`.
    pub async fn create(plane: &'p ControlPlane, prefix: &str) -> Result<Self, HarnessError> {
        let client = plane.client();
        let name = unique_name(prefix);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    TEST_NAMESPACE_LABEL.to_string(),
                    "true".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        Ok(TestNamespace {
            name,
            client,
            plane,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Admin client (made in the runtime that called `new`/`create`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn plane(&self) -> &'p ControlPlane {
        self.plane
    }

    /// `Api<K>` for a namespaced kind in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// `kubectl` for this plane with `--namespace=<this namespace>`.
    pub fn kubectl(&self) -> Command {
        let mut cmd = self.plane.kubectl();
        cmd.arg(format!("--namespace={}", self.name));
        cmd
    }

    /// Creates a ServiceAccount (if missing) in this namespace.
    pub async fn service_account(&self, name: &str) -> Result<ServiceAccount, HarnessError> {
        let api: Api<ServiceAccount> = self.api();
        if let Some(existing) = api.get_opt(name).await? {
            return Ok(existing);
        }
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        Ok(api.create(&PostParams::default(), &account).await?)
    }

    /// A projected ServiceAccount token (TokenRequest) for `account` with `audience`, as a
    /// sidecar would get it (audience `keybrake`). Creates the ServiceAccount if missing.
    pub async fn service_account_token(
        &self,
        account: &str,
        audience: &str,
    ) -> Result<String, HarnessError> {
        self.service_account(account).await?;
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.to_string()],
                expiration_seconds: Some(3600),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let api: Api<ServiceAccount> = self.api();
        let issued = api
            .create_token_request(account, &PostParams::default(), &request)
            .await?;
        issued
            .status
            .map(|s| s.token)
            .ok_or_else(|| HarnessError::UnexpectedAnswer("TokenRequest without status".into()))
    }
}

/// `<prefix>-<6 random>` as a DNS label (lowercase, at most 63 characters).
fn unique_name(prefix: &str) -> String {
    let mut clean: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    clean.truncate(50);
    let clean = clean.trim_matches('-');
    let clean = if clean.is_empty() { "test" } else { clean };
    format!("{clean}-{}", random_token(6).to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_dns_labels() {
        let a = unique_name("CRD_Refusals: revoked!");
        let b = unique_name("CRD_Refusals: revoked!");
        assert_ne!(a, b);
        for name in [a, unique_name(""), unique_name(&"x".repeat(100))] {
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{name}"
            );
            assert!(!name.starts_with('-') && !name.ends_with('-'), "{name}");
        }
    }
}
