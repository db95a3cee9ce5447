//! What the controller tells the injector: which sidecar image, where the controller's streams
//! are, and how the sidecar is sized. Built once from controller flags, validated at startup so a
//! bad flag stops the controller instead of producing pods that cannot start.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::names::is_dns_subdomain;

/// The sidecar's listeners (see the shared port conventions). Proxy listeners bind 127.0.0.1;
/// the admin listener binds all addresses because the kubelet probes it on the pod IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SidecarPorts {
    /// Prefix-routed proxy: `/stripe/…`, `/openai/…`, `/twilio/…`, `/resend/…`.
    pub proxy: u16,
    pub stripe: u16,
    pub openai: u16,
    pub twilio: u16,
    pub resend: u16,
    /// `/live`, `/ready`, `/metrics`.
    pub admin: u16,
}

impl Default for SidecarPorts {
    fn default() -> Self {
        SidecarPorts {
            proxy: 15001,
            stripe: 15002,
            openai: 15003,
            twilio: 15004,
            resend: 15005,
            admin: 15020,
        }
    }
}

impl SidecarPorts {
    pub fn all(&self) -> [u16; 6] {
        [
            self.proxy,
            self.stripe,
            self.openai,
            self.twilio,
            self.resend,
            self.admin,
        ]
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct InjectionConfig {
    pub sidecar_image: String,
    /// `None` leaves the cluster default (`IfNotPresent` unless the tag is `latest`).
    pub image_pull_policy: Option<String>,
    pub ports: SidecarPorts,
    /// Base URL of the controller's stream endpoint, e.g.
    /// `https://keybrake-controller-streams.keybrake-system.svc:8443`.
    pub controller_url: String,
    /// ConfigMap, present in every namespace with injected pods, holding the CA that signed the
    /// controller's serving certificate (the controller publishes it).
    pub ca_bundle_configmap: String,
    pub ca_bundle_key: String,
    /// How long the sidecar trusts its policy without hearing from the controller.
    pub staleness_bound: Duration,
    /// Audience of the projected ServiceAccount token; the controller's TokenReview requires it.
    pub token_audience: String,
    pub token_expiration_seconds: i64,
    pub resources: ResourceRequirements,
    /// Size limit of the emptyDir where the sidecar spools audit rows while the controller is away.
    pub spool_size_limit: Quantity,
    pub run_as_user: i64,
    /// Never inject here, whatever the pod says (kube-system, the controller's own namespace).
    /// The webhook's namespaceSelector already keeps them out; this is the second lock.
    pub excluded_namespaces: BTreeSet<String>,
    /// Cluster-wide `--upstream-max-connections` for injected sidecars; a pod's
    /// `keybrake.dev/upstream-max-connections` annotation wins. `None`: the sidecar's default.
    pub upstream_max_connections: Option<u32>,
}

/// Largest connection cap the injector passes on (a larger one is a typo, refused).
pub const MAX_UPSTREAM_CONNECTIONS: u32 = 1_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("sidecar image must be set")]
    MissingImage,
    #[error("controller URL {0:?} must be an https:// URL with a host")]
    ControllerUrl(String),
    #[error("CA bundle ConfigMap name {0:?} is not a valid object name")]
    CaConfigMap(String),
    #[error("CA bundle key must be set")]
    CaKey,
    #[error("sidecar ports must be non-zero and distinct, got {0:?}")]
    Ports(SidecarPorts),
    #[error("staleness bound must be at least one second")]
    StalenessBound,
    #[error("token audience must be set")]
    TokenAudience,
    #[error("token expiration must be between 600 and 86400 seconds, got {0}")]
    TokenExpiration(i64),
    #[error("sidecar upstream connection cap must be at most {MAX_UPSTREAM_CONNECTIONS}, got {0}")]
    UpstreamMaxConnections(u32),
}

impl InjectionConfig {
    /// The shared defaults: ports per the conventions, `keybrake-ca` ConfigMap with key `ca.crt`,
    /// 30 s staleness bound, audience `keybrake`, one-hour tokens, a small sidecar.
    pub fn new(sidecar_image: impl Into<String>, controller_url: impl Into<String>) -> Self {
        InjectionConfig {
            sidecar_image: sidecar_image.into(),
            image_pull_policy: None,
            ports: SidecarPorts::default(),
            controller_url: controller_url.into(),
            ca_bundle_configmap: "keybrake-ca".into(),
            ca_bundle_key: "ca.crt".into(),
            staleness_bound: Duration::from_secs(30),
            token_audience: "keybrake".into(),
            token_expiration_seconds: 3600,
            resources: default_resources(),
            spool_size_limit: Quantity("256Mi".into()),
            run_as_user: 65532,
            excluded_namespaces: ["kube-system".to_string()].into(),
            upstream_max_connections: None,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.sidecar_image.trim().is_empty() {
            return Err(ConfigError::MissingImage);
        }
        if let Some(cap) = self.upstream_max_connections
            && cap > MAX_UPSTREAM_CONNECTIONS
        {
            return Err(ConfigError::UpstreamMaxConnections(cap));
        }
        let host = self.controller_url.strip_prefix("https://").unwrap_or("");
        if host.is_empty() || host.starts_with('/') || host.contains('@') {
            return Err(ConfigError::ControllerUrl(self.controller_url.clone()));
        }
        if !is_dns_subdomain(&self.ca_bundle_configmap) {
            return Err(ConfigError::CaConfigMap(self.ca_bundle_configmap.clone()));
        }
        if self.ca_bundle_key.is_empty() {
            return Err(ConfigError::CaKey);
        }
        let ports = self.ports.all();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        if ports.contains(&0) || distinct.len() != ports.len() {
            return Err(ConfigError::Ports(self.ports));
        }
        if self.staleness_bound < Duration::from_secs(1) {
            return Err(ConfigError::StalenessBound);
        }
        if self.token_audience.is_empty() {
            return Err(ConfigError::TokenAudience);
        }
        // The kubelet refuses projected tokens shorter than 10 minutes.
        if !(600..=86400).contains(&self.token_expiration_seconds) {
            return Err(ConfigError::TokenExpiration(self.token_expiration_seconds));
        }
        Ok(())
    }
}

fn default_resources() -> ResourceRequirements {
    let quantities = |cpu: &str, memory: &str| {
        BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(memory.into())),
        ])
    };
    ResourceRequirements {
        requests: Some(quantities("50m", "32Mi")),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("128Mi".into()),
        )])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> InjectionConfig {
        InjectionConfig::new(
            "ghcr.io/keybrake/sidecar:0.1.0",
            "https://keybrake-controller-streams.keybrake-system.svc:8443",
        )
    }

    #[test]
    fn defaults_validate() {
        assert_eq!(valid().validate(), Ok(()));
    }

    #[test]
    fn rejects_plain_http_controller() {
        let mut config = valid();
        config.controller_url = "http://controller:8443".into();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::ControllerUrl(_))
        ));
        config.controller_url = "https://".into();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::ControllerUrl(_))
        ));
    }

    #[test]
    fn rejects_duplicate_ports() {
        let mut config = valid();
        config.ports.openai = config.ports.stripe;
        assert!(matches!(config.validate(), Err(ConfigError::Ports(_))));
    }

    #[test]
    fn rejects_short_tokens_and_bad_names() {
        let mut config = valid();
        config.token_expiration_seconds = 60;
        assert_eq!(config.validate(), Err(ConfigError::TokenExpiration(60)));
        let mut config = valid();
        config.ca_bundle_configmap = "Not_A_Name".into();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::CaConfigMap(_))
        ));
        let mut config = valid();
        config.sidecar_image = " ".into();
        assert_eq!(config.validate(), Err(ConfigError::MissingImage));
        let mut config = valid();
        config.staleness_bound = Duration::from_millis(200);
        assert_eq!(config.validate(), Err(ConfigError::StalenessBound));
    }
}
