//! Decides what to do with one pod: leave it, or inject exactly these things. Works on the typed
//! Pod; turning the plan into a JSON patch is `patch.rs`'s job.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, Volume};

use crate::agent_env::agent_env;
use crate::config::InjectionConfig;
use crate::names;
use crate::outcome::{InjectionFailure, InjectionResult};
use crate::sidecar::{PodSettings, pod_marks, sidecar_container, sidecar_volumes};

/// What to add to one pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub sidecar: Container,
    pub volumes: Vec<Volume>,
    /// Index into `spec.containers` → env entries to append (already filtered against what the
    /// container sets itself).
    pub agent_env: Vec<(usize, Vec<EnvVar>)>,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Leave the pod as it is; the result says why.
    Leave(InjectionResult),
    Inject(Box<Plan>),
    /// Opted in, cannot inject.
    Fail(InjectionFailure),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decided {
    pub decision: Decision,
    pub warnings: Vec<String>,
}

fn opt_in_value(pod: &Pod) -> Option<&str> {
    let meta = &pod.metadata;
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(names::INJECT))
        .or_else(|| meta.labels.as_ref().and_then(|l| l.get(names::INJECT)))
        .map(String::as_str)
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(|v| v.trim())
}

pub fn is_already_injected(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else { return false };
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .any(|c| c.name == names::SIDECAR_CONTAINER)
}

/// The pure decision. `namespace` is the request's namespace (a pod being created may not carry
/// one in its metadata yet).
pub fn decide(pod: &Pod, namespace: &str, config: &InjectionConfig) -> Decided {
    let mut warnings = Vec::new();
    let leave = |result, warnings| Decided {
        decision: Decision::Leave(result),
        warnings,
    };

    if config.excluded_namespaces.contains(namespace) {
        return leave(InjectionResult::ExcludedNamespace, warnings);
    }
    match opt_in_value(pod) {
        Some(v) if v.trim().eq_ignore_ascii_case("true") => {}
        Some(v) if matches!(v.trim(), "false" | "disabled" | "") => {
            return leave(InjectionResult::NotOptedIn, warnings);
        }
        Some(v) => {
            warnings.push(format!(
                "keybrake: {}={v:?} is not \"true\"; the pod was not injected",
                names::INJECT
            ));
            return leave(InjectionResult::NotOptedIn, warnings);
        }
        None => return leave(InjectionResult::NotOptedIn, warnings),
    }
    if is_already_injected(pod) {
        return leave(InjectionResult::AlreadyInjected, warnings);
    }
    match plan(pod, config, &mut warnings) {
        Ok(plan) => Decided {
            decision: Decision::Inject(Box::new(plan)),
            warnings,
        },
        Err(failure) => Decided {
            decision: Decision::Fail(failure),
            warnings,
        },
    }
}

fn plan(
    pod: &Pod,
    config: &InjectionConfig,
    warnings: &mut Vec<String>,
) -> Result<Plan, InjectionFailure> {
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.host_network == Some(true) {
        return Err(InjectionFailure::HostNetwork);
    }

    let vault_key = annotation(pod, names::VAULT_KEY_ANNOTATION).filter(|v| !v.is_empty());
    if let Some(name) = vault_key {
        // The Secret name `<name>-token` must itself be a valid object name.
        if !names::is_dns_subdomain(&names::token_secret_name(name)) {
            return Err(InjectionFailure::InvalidVaultKeyName(name.to_string()));
        }
    } else {
        warnings.push(format!(
            "keybrake: no {} annotation, so VAULT_KEY is not set; the agent must get its vault key another way",
            names::VAULT_KEY_ANNOTATION
        ));
    }

    let upstream_max_connections = upstream_max_connections(pod)?;
    let agent_indices = agent_container_indices(pod, &spec.containers)?;

    let sidecar_ports = config.ports.all();
    let all_containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    for container in all_containers {
        for port in container.ports.iter().flatten() {
            if let Ok(port) = u16::try_from(port.container_port)
                && sidecar_ports.contains(&port)
            {
                return Err(InjectionFailure::PortConflict {
                    container: container.name.clone(),
                    port,
                });
            }
        }
    }

    let volumes = sidecar_volumes(config);
    for volume in &volumes {
        if spec.volumes.iter().flatten().any(|v| v.name == volume.name) {
            return Err(InjectionFailure::NameConflict {
                kind: "volume",
                name: volume.name.clone(),
            });
        }
    }

    let wanted = agent_env(vault_key, &config.ports);
    let mut agent_env_plan = Vec::new();
    for index in agent_indices {
        let container = &spec.containers[index];
        let existing: Vec<&str> = container
            .env
            .iter()
            .flatten()
            .map(|e| e.name.as_str())
            .collect();
        let (kept, clobbering): (Vec<EnvVar>, Vec<EnvVar>) = wanted
            .iter()
            .cloned()
            .partition(|e| !existing.contains(&e.name.as_str()));
        if !clobbering.is_empty() {
            let skipped: Vec<&str> = clobbering.iter().map(|e| e.name.as_str()).collect();
            warnings.push(format!(
                "keybrake: container {:?} already sets {}; left as is",
                container.name,
                skipped.join(", ")
            ));
        }
        if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
            warnings.push(format!(
                "keybrake: container {:?} uses envFrom; keybrake's env entries override same-named keys from it",
                container.name
            ));
        }
        if !kept.is_empty() {
            agent_env_plan.push((index, kept));
        }
    }

    if spec.share_process_namespace == Some(true) {
        warnings.push(
            "keybrake: shareProcessNamespace lets agent containers read the sidecar's token through /proc"
                .to_string(),
        );
    }

    let (annotations, labels) = pod_marks();
    Ok(Plan {
        sidecar: sidecar_container(
            config,
            PodSettings {
                grace_secs: spec.termination_grace_period_seconds,
                upstream_max_connections,
            },
        ),
        volumes,
        agent_env: agent_env_plan,
        annotations,
        labels,
    })
}

/// The pod's connection cap, if it sets one. A value that is not a whole number in range
/// refuses the pod: a sidecar started with a flag it rejects would never become ready.
fn upstream_max_connections(pod: &Pod) -> Result<Option<u32>, InjectionFailure> {
    let Some(value) = annotation(pod, names::UPSTREAM_MAX_CONNECTIONS) else {
        return Ok(None);
    };
    value
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| *n <= crate::config::MAX_UPSTREAM_CONNECTIONS)
        .map(Some)
        .ok_or_else(|| InjectionFailure::InvalidUpstreamMaxConnections(value.to_string()))
}

fn agent_container_indices(
    pod: &Pod,
    containers: &[Container],
) -> Result<Vec<usize>, InjectionFailure> {
    if containers.is_empty() {
        return Err(InjectionFailure::NoAgentContainers);
    }
    let Some(list) = annotation(pod, names::AGENT_CONTAINERS) else {
        return Ok((0..containers.len()).collect());
    };
    let mut indices = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let index = containers
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| InjectionFailure::UnknownAgentContainer(name.to_string()))?;
        if !indices.contains(&index) {
            indices.push(index);
        }
    }
    if indices.is_empty() {
        return Err(InjectionFailure::NoAgentContainers);
    }
    indices.sort_unstable();
    Ok(indices)
}
