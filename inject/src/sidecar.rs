//! The sidecar container and the volumes it needs.
//!
//! Native sidecar: an init container with `restartPolicy: Always`, so it starts before the
//! agent, stays up beside it, and the agent starts only once the sidecar's startup probe
//! (`/ready`: first policy snapshot applied) passes. Only the sidecar mounts the projected token:
//! that token opens the policy stream, which carries upstream secrets, so the agent must not have it.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, Probe, ProjectedVolumeSource,
    SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::config::InjectionConfig;
use crate::names;

/// Kubernetes' `terminationGracePeriodSeconds` when the pod sets none.
pub const DEFAULT_GRACE_SECS: i64 = 30;
/// What the sidecar spends releasing budget leases at shutdown (fixed in the sidecar).
const LEASE_RELEASE_SECS: i64 = 2;
/// Left for process exit and the kubelet's own bookkeeping.
const SHUTDOWN_MARGIN_SECS: i64 = 3;

/// How the sidecar splits the pod's grace period after SIGTERM: drain in-flight calls, release
/// budget leases, flush audit rows (what is not delivered is already on the spool volume).
/// Together they end [`SHUTDOWN_MARGIN_SECS`] before the kubelet's SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownBudget {
    pub drain_secs: i64,
    pub audit_flush_secs: i64,
}

impl ShutdownBudget {
    /// The split for a pod whose `terminationGracePeriodSeconds` is `grace_secs` (default 30 s:
    /// drain 20 s + leases 2 s + flush 5 s). Below about 8 s nothing fits; every step still gets
    /// one second.
    pub fn for_grace(grace_secs: Option<i64>) -> Self {
        let grace = grace_secs.unwrap_or(DEFAULT_GRACE_SECS);
        let audit_flush_secs = if grace >= 20 { 5 } else { (grace / 4).max(1) };
        let drain_secs =
            (grace - audit_flush_secs - LEASE_RELEASE_SECS - SHUTDOWN_MARGIN_SECS).max(1);
        ShutdownBudget {
            drain_secs,
            audit_flush_secs,
        }
    }

    /// Seconds from SIGTERM until the sidecar has exited at the latest (margin excluded).
    pub fn total_secs(&self) -> i64 {
        self.drain_secs + LEASE_RELEASE_SECS + self.audit_flush_secs
    }
}

/// What the pod itself decides about its sidecar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodSettings {
    /// The pod's `terminationGracePeriodSeconds` (see [`ShutdownBudget`]).
    pub grace_secs: Option<i64>,
    /// From [`names::UPSTREAM_MAX_CONNECTIONS`]; `None` falls back to the cluster's
    /// [`InjectionConfig::upstream_max_connections`], then to the sidecar's default.
    pub upstream_max_connections: Option<u32>,
}

/// Command-line flags the sidecar is started with. Kept here, in one list, so the sidecar's
/// parser and this injector can be checked against each other.
pub fn sidecar_args(config: &InjectionConfig, pod: PodSettings) -> Vec<String> {
    let p = &config.ports;
    let shutdown = ShutdownBudget::for_grace(pod.grace_secs);
    let mut args = vec![
        format!("--controller-url={}", config.controller_url),
        format!("--token-file={}/{}", names::TOKEN_DIR, names::TOKEN_FILE),
        format!("--ca-file={}/{}", names::CA_DIR, config.ca_bundle_key),
        format!("--staleness-bound={}s", config.staleness_bound.as_secs()),
        format!("--spool-dir={}", names::SPOOL_DIR),
        "--listen-addr=127.0.0.1".to_string(),
        format!("--proxy-port={}", p.proxy),
        format!("--stripe-port={}", p.stripe),
        format!("--openai-port={}", p.openai),
        format!("--twilio-port={}", p.twilio),
        format!("--resend-port={}", p.resend),
        // The kubelet probes on the pod IP, so admin listens on all addresses; it serves no secrets.
        "--admin-listen-addr=0.0.0.0".to_string(),
        format!("--admin-port={}", p.admin),
        format!("--drain-timeout={}s", shutdown.drain_secs),
        format!("--audit-flush-timeout={}s", shutdown.audit_flush_secs),
    ];
    if let Some(max) = pod
        .upstream_max_connections
        .or(config.upstream_max_connections)
    {
        args.push(format!("--upstream-max-connections={max}"));
    }
    args
}

/// Pod identity from the downward API (`POD_NAME` is what the sidecar's `--pod-name` reads): the
/// sidecar stamps it on audit rows and presents it to the controller.
pub fn sidecar_env() -> Vec<EnvVar> {
    [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_UID", "metadata.uid"),
        ("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ]
    .into_iter()
    .map(|(name, field)| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
    .collect()
}

fn http_probe(path: &str, port: u16, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port.into()),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

pub fn sidecar_container(config: &InjectionConfig, pod: PodSettings) -> Container {
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    };
    Container {
        name: names::SIDECAR_CONTAINER.into(),
        image: Some(config.sidecar_image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        restart_policy: Some("Always".into()),
        args: Some(sidecar_args(config, pod)),
        env: Some(sidecar_env()),
        ports: Some(vec![ContainerPort {
            name: Some(names::ADMIN_PORT_NAME.into()),
            container_port: config.ports.admin.into(),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        // Up to two minutes to receive the first snapshot before the kubelet restarts it; the
        // agent does not start until then (fail closed).
        startup_probe: Some(http_probe("/ready", config.ports.admin, 1, 120)),
        liveness_probe: Some(http_probe("/live", config.ports.admin, 10, 3)),
        resources: Some(config.resources.clone()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(config.run_as_user),
            run_as_group: Some(config.run_as_user),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount(names::TOKEN_VOLUME, names::TOKEN_DIR, true),
            mount(names::CA_VOLUME, names::CA_DIR, true),
            mount(names::SPOOL_VOLUME, names::SPOOL_DIR, false),
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

pub fn sidecar_volumes(config: &InjectionConfig) -> Vec<Volume> {
    vec![
        Volume {
            name: names::TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(config.token_audience.clone()),
                        expiration_seconds: Some(config.token_expiration_seconds),
                        path: names::TOKEN_FILE.into(),
                    }),
                    ..Default::default()
                }]),
                default_mode: Some(0o440),
            }),
            ..Default::default()
        },
        Volume {
            name: names::CA_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config.ca_bundle_configmap.clone(),
                items: Some(vec![KeyToPath {
                    key: config.ca_bundle_key.clone(),
                    path: config.ca_bundle_key.clone(),
                    mode: None,
                }]),
                // Not optional: without the CA the sidecar cannot verify the controller.
                optional: Some(false),
                default_mode: Some(0o444),
            }),
            ..Default::default()
        },
        Volume {
            name: names::SPOOL_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(config.spool_size_limit.clone()),
                medium: None,
            }),
            ..Default::default()
        },
    ]
}

/// Annotations and labels the injector adds to the pod.
pub fn pod_marks() -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    (
        BTreeMap::from([(names::INJECTED_ANNOTATION.into(), "true".into())]),
        BTreeMap::from([(names::SIDECAR_LABEL.into(), "true".into())]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> InjectionConfig {
        InjectionConfig::new(
            "ghcr.io/keybrake/sidecar:0.1.0",
            "https://keybrake-controller-streams.keybrake-system.svc:8443",
        )
    }

    #[test]
    fn is_a_native_sidecar_gated_on_ready() {
        let c = sidecar_container(&config(), PodSettings::default());
        assert_eq!(c.restart_policy.as_deref(), Some("Always"));
        let probe = c.startup_probe.unwrap().http_get.unwrap();
        assert_eq!(probe.path.as_deref(), Some("/ready"));
        assert_eq!(probe.port, IntOrString::Int(15020));
    }

    #[test]
    fn runs_locked_down() {
        let sc = sidecar_container(&config(), PodSettings::default())
            .security_context
            .unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
    }

    #[test]
    fn args_carry_controller_paths_and_ports() {
        let args = sidecar_args(&config(), PodSettings::default());
        for expected in [
            "--controller-url=https://keybrake-controller-streams.keybrake-system.svc:8443",
            "--token-file=/var/run/secrets/keybrake/token/token",
            "--ca-file=/var/run/secrets/keybrake/ca/ca.crt",
            "--staleness-bound=30s",
            "--proxy-port=15001",
            "--stripe-port=15002",
            "--admin-port=15020",
        ] {
            assert!(args.iter().any(|a| a == expected), "missing {expected}");
        }
    }

    #[test]
    fn the_pods_connection_cap_wins_over_the_clusters() {
        let cap = |cluster: Option<u32>, pod: Option<u32>| {
            let mut config = config();
            config.upstream_max_connections = cluster;
            let pod = PodSettings {
                upstream_max_connections: pod,
                ..PodSettings::default()
            };
            sidecar_args(&config, pod)
                .into_iter()
                .filter(|a| a.starts_with("--upstream-max-connections"))
                .collect::<Vec<_>>()
        };
        assert!(cap(None, None).is_empty(), "the sidecar's own default");
        assert_eq!(cap(Some(128), None), ["--upstream-max-connections=128"]);
        assert_eq!(cap(Some(128), Some(0)), ["--upstream-max-connections=0"]);
        assert_eq!(cap(None, Some(16)), ["--upstream-max-connections=16"]);
    }

    #[test]
    fn shutdown_fits_the_pods_grace_period() {
        // Default grace (30 s): drain 20 s, leases 2 s, flush 5 s, 3 s to spare.
        let default = ShutdownBudget::for_grace(None);
        assert_eq!((default.drain_secs, default.audit_flush_secs), (20, 5));
        let args = sidecar_args(&config(), PodSettings::default());
        assert!(
            args.contains(&"--drain-timeout=20s".to_string()),
            "{args:?}"
        );
        assert!(
            args.contains(&"--audit-flush-timeout=5s".to_string()),
            "{args:?}"
        );
        for grace in [8, 10, 15, 20, 30, 60, 300] {
            let budget = ShutdownBudget::for_grace(Some(grace));
            assert!(
                budget.total_secs() + SHUTDOWN_MARGIN_SECS <= grace,
                "grace {grace}: {budget:?}"
            );
            assert!(budget.drain_secs >= 1 && budget.audit_flush_secs >= 1);
        }
        // A longer grace goes to draining calls.
        assert_eq!(ShutdownBudget::for_grace(Some(120)).drain_secs, 110);
        let args = sidecar_args(
            &config(),
            PodSettings {
                grace_secs: Some(120),
                ..PodSettings::default()
            },
        );
        assert!(args.contains(&"--drain-timeout=110s".to_string()));
    }

    #[test]
    fn token_volume_is_audience_bound_and_short_lived() {
        let volumes = sidecar_volumes(&config());
        let token = volumes[0]
            .projected
            .as_ref()
            .unwrap()
            .sources
            .as_ref()
            .unwrap()[0]
            .service_account_token
            .clone()
            .unwrap();
        assert_eq!(token.audience.as_deref(), Some("keybrake"));
        assert_eq!(token.expiration_seconds, Some(3600));
        let ca = volumes[1].config_map.as_ref().unwrap();
        assert_eq!(ca.name, "keybrake-ca");
        assert_eq!(ca.optional, Some(false));
    }

    #[test]
    fn every_mount_has_a_volume() {
        let config = config();
        let volumes: Vec<String> = sidecar_volumes(&config)
            .into_iter()
            .map(|v| v.name)
            .collect();
        for m in sidecar_container(&config, PodSettings::default())
            .volume_mounts
            .unwrap()
        {
            assert!(volumes.contains(&m.name), "{} has no volume", m.name);
        }
    }
}
