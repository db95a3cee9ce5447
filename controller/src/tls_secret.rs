//! Kubernetes side of the shared serving identity and of the CA's distribution:
//! - `--tls-secret`: every replica loads the CA + serving certificate from one Secret in its
//!   namespace, creating it if absent (create-if-not-exists: of two racing replicas one create
//!   wins with 201, the other gets 409 and reads the winner's); the leader re-issues the serving
//!   certificate when a third of its validity remains; followers pick the new one up on their
//!   next refresh.
//! - The leader writes the CA into the webhook's MutatingWebhookConfiguration
//!   (`--webhook-configuration`) and into ConfigMap `--ca-configmap` (key `ca.crt`) of every
//!   namespace that has VaultKeys, where injected sidecars mount it.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        core::v1::{ConfigMap, Secret},
    },
};
use keybrake_inject::webhook_config::{WEBHOOK_NAME, ca_bundle_patch};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    index::PolicyIndex,
    serving_cert::{CA_CERT_KEY, CertError, SharedIdentity},
    tls::SwappableCert,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsSecretError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("Secret {name}: {source}")]
    Invalid { name: String, source: CertError },
    #[error("Secret {0} kept changing under us")]
    Contended(String),
}

fn identity_of(secret: &Secret) -> Result<SharedIdentity, CertError> {
    let data: BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    SharedIdentity::from_secret_parts(&data, &annotations)
}

fn secret_of(name: &str, identity: &SharedIdentity, resource_version: Option<String>) -> Secret {
    let (data, annotations) = identity.to_secret_parts();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(annotations),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "keybrake-controller".to_string(),
            )])),
            resource_version,
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Secret::default()
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Reads the shared identity, creating it if absent. Both racing replicas end up with the same.
pub async fn load_or_create(
    api: &Api<Secret>,
    name: &str,
    sans: &BTreeSet<String>,
    validity: Duration,
) -> Result<SharedIdentity, TlsSecretError> {
    let invalid = |source| TlsSecretError::Invalid {
        name: name.to_owned(),
        source,
    };
    for _ in 0..3 {
        if let Some(secret) = api.get_opt(name).await? {
            return identity_of(&secret).map_err(invalid);
        }
        let fresh = SharedIdentity::generate(sans, Timestamp::now(), validity).map_err(invalid)?;
        match api
            .create(&PostParams::default(), &secret_of(name, &fresh, None))
            .await
        {
            Ok(_) => {
                tracing::info!(secret = name, "created the shared serving identity");
                return Ok(fresh);
            }
            // Another replica created it first: use theirs.
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(TlsSecretError::Contended(name.to_owned()))
}

pub struct SecretBacked {
    pub api: Api<Secret>,
    pub name: String,
    pub sans: BTreeSet<String>,
    pub validity: Duration,
    pub current: SharedIdentity,
}

/// Where the serving identity comes from, for [`CaDistributor`].
pub enum IdentitySource {
    /// `--tls-secret`: reloaded every refresh; renewed by the leader.
    Secret(Box<SecretBacked>),
    /// `--tls-cert`/`--tls-key` with `--tls-ca`: fixed for the life of the process.
    Fixed { ca_pem: String },
}

impl IdentitySource {
    fn ca_pem(&self) -> &str {
        match self {
            IdentitySource::Secret(backed) => &backed.current.ca_cert_pem,
            IdentitySource::Fixed { ca_pem } => ca_pem,
        }
    }
}

pub struct CaDistributor {
    pub client: Client,
    pub source: IdentitySource,
    pub cert: Arc<SwappableCert>,
    /// MutatingWebhookConfiguration whose caBundle the leader keeps current.
    pub webhook_configuration: Option<String>,
    /// ConfigMap name (key `ca.crt`) published into every namespace with VaultKeys.
    pub ca_configmap: String,
    pub index: Arc<PolicyIndex>,
    pub refresh: Duration,
}

impl CaDistributor {
    /// Refreshes, renews and publishes until shutdown: at once on becoming leader, then every
    /// `refresh`.
    pub async fn run(mut self, mut leader: watch::Receiver<bool>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Namespace → CA last written there (saves a GET per namespace per tick).
        let mut published: HashMap<String, String> = HashMap::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = leader.changed() => if changed.is_err() { return },
                () = shutdown.cancelled() => return,
            }
            let is_leader = *leader.borrow_and_update();
            if let Err(e) = self.refresh_identity(is_leader).await {
                tracing::warn!(error = %e, "refreshing the serving identity failed");
            }
            if !is_leader {
                published.clear();
                continue;
            }
            let ca = self.source.ca_pem().to_owned();
            if let Some(name) = &self.webhook_configuration
                && let Err(e) = self.ensure_ca_bundle(name, &ca).await
            {
                tracing::warn!(configuration = name, error = %e, "writing the webhook caBundle failed");
            }
            for namespace in self.index.namespaces() {
                if published.get(&namespace) == Some(&ca) {
                    continue;
                }
                match self.ensure_ca_configmap(&namespace, &ca).await {
                    Ok(()) => {
                        published.insert(namespace, ca.clone());
                    }
                    Err(e) => {
                        tracing::warn!(namespace, error = %e, "publishing the CA ConfigMap failed")
                    }
                }
            }
        }
    }

    /// Secret mode: picks up another replica's renewal; the leader renews when due.
    async fn refresh_identity(&mut self, leader: bool) -> Result<(), TlsSecretError> {
        let IdentitySource::Secret(backed) = &mut self.source else {
            return Ok(());
        };
        let SecretBacked {
            api,
            name,
            sans,
            validity,
            current,
        } = &mut **backed;
        let Some(secret) = api.get_opt(name).await? else {
            // Deleted: recreate (any replica; create-if-not-exists keeps them in agreement).
            *current = load_or_create(api, name, sans, *validity).await?;
            self.cert.set(
                current
                    .certified_key()
                    .map_err(|source| TlsSecretError::Invalid {
                        name: name.clone(),
                        source,
                    })?,
            );
            return Ok(());
        };
        let stored = identity_of(&secret).map_err(|source| TlsSecretError::Invalid {
            name: name.clone(),
            source,
        })?;
        let next = if leader && stored.needs_renewal(sans, Timestamp::now()) {
            let renewed = stored
                .renewed(sans, Timestamp::now(), *validity)
                .map_err(|source| TlsSecretError::Invalid {
                    name: name.clone(),
                    source,
                })?;
            // resourceVersion makes a concurrent writer's update fail with 409 (retried next tick).
            api.replace(
                name,
                &PostParams::default(),
                &secret_of(name, &renewed, secret.metadata.resource_version.clone()),
            )
            .await?;
            tracing::info!(secret = %name, not_after = %renewed.not_after, "renewed the serving certificate");
            renewed
        } else {
            stored
        };
        if next != *current {
            self.cert.set(
                next.certified_key()
                    .map_err(|source| TlsSecretError::Invalid {
                        name: name.clone(),
                        source,
                    })?,
            );
            *current = next;
        }
        Ok(())
    }

    async fn ensure_ca_bundle(&self, name: &str, ca: &str) -> Result<(), kube::Error> {
        let api = Api::<MutatingWebhookConfiguration>::all(self.client.clone());
        let Some(configuration) = api.get_opt(name).await? else {
            tracing::warn!(
                configuration = name,
                "MutatingWebhookConfiguration not found; caBundle not written"
            );
            return Ok(());
        };
        let current = configuration
            .webhooks
            .iter()
            .flatten()
            .find(|w| w.name == WEBHOOK_NAME)
            .and_then(|w| w.client_config.ca_bundle.as_ref());
        if current.is_some_and(|b| b.0 == ca.as_bytes()) {
            return Ok(());
        }
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Json::<()>(ca_bundle_patch(ca.as_bytes())),
        )
        .await?;
        tracing::info!(configuration = name, "wrote the webhook caBundle");
        Ok(())
    }

    async fn ensure_ca_configmap(&self, namespace: &str, ca: &str) -> Result<(), kube::Error> {
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), namespace);
        let name = &self.ca_configmap;
        let data = BTreeMap::from([(CA_CERT_KEY.to_string(), ca.to_owned())]);
        match api.get_opt(name).await? {
            Some(existing) if existing.data.as_ref() == Some(&data) => Ok(()),
            Some(mut existing) => {
                existing.data = Some(data);
                api.replace(name, &PostParams::default(), &existing).await?;
                Ok(())
            }
            None => {
                let configmap = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_string(),
                            "keybrake-controller".to_string(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    data: Some(data),
                    ..ConfigMap::default()
                };
                match api.create(&PostParams::default(), &configmap).await {
                    Ok(_) => Ok(()),
                    Err(e) if is_conflict(&e) => Ok(()),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_object_round_trips() {
        let sans: BTreeSet<String> = ["127.0.0.1".to_string()].into();
        let id =
            SharedIdentity::generate(&sans, Timestamp::now(), Duration::from_secs(86_400)).unwrap();
        let secret = secret_of("keybrake-tls", &id, Some("7".into()));
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(secret.metadata.resource_version.as_deref(), Some("7"));
        assert!(identity_of(&secret).unwrap() == id);
        let mut empty = secret.clone();
        empty.data = None;
        assert!(identity_of(&empty).is_err());
    }
}
