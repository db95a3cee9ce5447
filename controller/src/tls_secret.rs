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
    path::PathBuf,
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
    #[error("reading the certificate files: {0}")]
    Files(std::io::Error),
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
    /// `--tls-cert`/`--tls-key` (cert-manager's mounted Secret), re-read every refresh so a
    /// renewed certificate is served without a restart; `--tls-ca` is the CA to publish.
    Files(Box<PemFiles>),
}

pub struct PemFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
    /// Contents last loaded: (certificate, key, CA).
    pub loaded: (Vec<u8>, Vec<u8>, Option<String>),
}

impl PemFiles {
    pub fn read(cert: PathBuf, key: PathBuf, ca: Option<PathBuf>) -> std::io::Result<Self> {
        let mut files = PemFiles {
            cert,
            key,
            ca,
            loaded: Default::default(),
        };
        files.loaded = files.contents()?;
        Ok(files)
    }

    fn contents(&self) -> std::io::Result<(Vec<u8>, Vec<u8>, Option<String>)> {
        Ok((
            std::fs::read(&self.cert)?,
            std::fs::read(&self.key)?,
            self.ca.as_ref().map(std::fs::read_to_string).transpose()?,
        ))
    }
}

impl IdentitySource {
    /// The CA to publish, when this process knows it.
    fn ca_pem(&self) -> Option<&str> {
        match self {
            IdentitySource::Secret(backed) => Some(&backed.current.ca_cert_pem),
            IdentitySource::Files(files) => files.loaded.2.as_deref(),
        }
    }
}

/// Refreshes between full re-checks of the published ConfigMaps (5 minutes at the default 10 s).
const RECHECK_EVERY_TICKS: u64 = 30;

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
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = leader.changed() => if changed.is_err() { return },
                () = shutdown.cancelled() => return,
            }
            // Now and then check every ConfigMap again: someone may have deleted or edited one.
            ticks += 1;
            if ticks.is_multiple_of(RECHECK_EVERY_TICKS) {
                published.clear();
            }
            let is_leader = *leader.borrow_and_update();
            if let Err(e) = self.refresh_identity(is_leader).await {
                tracing::warn!(error = %e, "refreshing the serving identity failed");
            }
            if !is_leader {
                published.clear();
                continue;
            }
            let Some(ca) = self.source.ca_pem().map(str::to_owned) else {
                continue;
            };
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
        let backed = match &mut self.source {
            IdentitySource::Secret(backed) => backed,
            IdentitySource::Files(files) => {
                let now = files.contents().map_err(TlsSecretError::Files)?;
                if now != files.loaded {
                    let key = crate::serving_cert::certified_key_from_pem(&now.0, &now.1).map_err(
                        |source| TlsSecretError::Invalid {
                            name: files.cert.display().to_string(),
                            source,
                        },
                    )?;
                    self.cert.set(key);
                    files.loaded = now;
                    tracing::info!(cert = %files.cert.display(), "reloaded the serving certificate");
                }
                return Ok(());
            }
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

    fn write_identity(dir: &std::path::Path, id: &SharedIdentity) {
        let (data, _) = id.to_secret_parts();
        for (key, file) in [
            ("tls.crt", "tls.crt"),
            ("tls.key", "tls.key"),
            ("ca.crt", "ca.crt"),
        ] {
            std::fs::write(dir.join(file), &data[key]).unwrap();
        }
    }

    /// cert-manager renews the mounted Secret: the next refresh serves the new certificate.
    #[tokio::test]
    async fn mounted_files_are_reloaded_on_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let sans: BTreeSet<String> = ["localhost".to_string()].into();
        let day = Duration::from_secs(86_400);
        let first = SharedIdentity::generate(&sans, Timestamp::now(), day).unwrap();
        write_identity(dir.path(), &first);
        let files = PemFiles::read(
            dir.path().join("tls.crt"),
            dir.path().join("tls.key"),
            Some(dir.path().join("ca.crt")),
        )
        .unwrap();
        let cert = SwappableCert::new(first.certified_key().unwrap());
        // Never contacted: file reloads need no API call.
        let client =
            Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let mut distributor = CaDistributor {
            client,
            source: IdentitySource::Files(Box::new(files)),
            cert: cert.clone(),
            webhook_configuration: None,
            ca_configmap: "keybrake-ca".into(),
            index: Arc::new(PolicyIndex::new(1)),
            refresh: Duration::from_secs(1),
        };
        assert_eq!(
            distributor.source.ca_pem(),
            Some(first.ca_cert_pem.as_str())
        );
        distributor.refresh_identity(true).await.unwrap();
        assert_eq!(cert.current().cert, first.certified_key().unwrap().cert);

        let second = first.renewed(&sans, Timestamp::now(), day).unwrap();
        write_identity(dir.path(), &second);
        distributor.refresh_identity(false).await.unwrap();
        assert_eq!(cert.current().cert, second.certified_key().unwrap().cert);

        // A half-written key is refused and the last good certificate kept.
        std::fs::write(dir.path().join("tls.key"), b"garbage").unwrap();
        assert!(distributor.refresh_identity(false).await.is_err());
        assert_eq!(cert.current().cert, second.certified_key().unwrap().cert);
    }

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
