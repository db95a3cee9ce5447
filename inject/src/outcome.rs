//! What happened to one admission request, for the metric, the Event and the log line.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

/// Label values of `keybrake_webhook_injections_total{result}`. A fixed, small set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InjectionResult {
    /// Opted in and patched.
    Injected,
    /// Opted in, but the sidecar is already there (re-invocation, re-created pod manifest).
    AlreadyInjected,
    /// No opt-in on the pod.
    NotOptedIn,
    /// The pod is in a namespace the injector never touches.
    ExcludedNamespace,
    /// Not a Pod CREATE (the webhook is misregistered or the request is a dry-run of something else).
    Ignored,
    /// Opted in but not injected: the pod is admitted without the sidecar (failurePolicy Ignore
    /// semantics) and the caller should emit a Warning Event.
    Failed,
}

impl InjectionResult {
    pub const ALL: [InjectionResult; 6] = [
        InjectionResult::Injected,
        InjectionResult::AlreadyInjected,
        InjectionResult::NotOptedIn,
        InjectionResult::ExcludedNamespace,
        InjectionResult::Ignored,
        InjectionResult::Failed,
    ];

    pub const fn as_label(self) -> &'static str {
        match self {
            InjectionResult::Injected => "injected",
            InjectionResult::AlreadyInjected => "already_injected",
            InjectionResult::NotOptedIn => "not_opted_in",
            InjectionResult::ExcludedNamespace => "excluded_namespace",
            InjectionResult::Ignored => "ignored",
            InjectionResult::Failed => "failed",
        }
    }
}

/// Name of the counter the caller registers; labels: `result` = [`InjectionResult::as_label`].
pub const INJECTIONS_METRIC: &str = "keybrake_webhook_injections_total";

/// The caller's counter. Called exactly once per reviewed request.
pub trait InjectionMetrics {
    fn record(&self, result: InjectionResult);
}

impl<F: Fn(InjectionResult)> InjectionMetrics for F {
    fn record(&self, result: InjectionResult) {
        self(result)
    }
}

/// Why an opted-in pod was not injected. Messages name pod fields, never secret values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InjectionFailure {
    #[error("the AdmissionReview has no request")]
    MissingRequest,
    #[error("the Pod in the AdmissionReview could not be read: {0}")]
    UnreadablePod(String),
    #[error("annotation keybrake.dev/vault-key={0:?} is not a valid VaultKey name")]
    InvalidVaultKeyName(String),
    #[error(
        "annotation keybrake.dev/agent-containers names {0:?}, which is not a container of this pod"
    )]
    UnknownAgentContainer(String),
    #[error(
        "annotation keybrake.dev/upstream-max-connections={0:?} is not a whole number from 0 (no cap) to 1000000"
    )]
    InvalidUpstreamMaxConnections(String),
    #[error("the pod has no containers to give the vault key to")]
    NoAgentContainers,
    #[error(
        "the pod uses hostNetwork: the sidecar's ports would be shared with the node and its other pods"
    )]
    HostNetwork,
    #[error("container {container:?} already uses port {port}, which the sidecar needs")]
    PortConflict { container: String, port: u16 },
    #[error("the pod already has a {kind} named {name:?}")]
    NameConflict { kind: &'static str, name: String },
    #[error("the patch could not be encoded: {0}")]
    PatchEncoding(String),
}

impl InjectionFailure {
    /// Event `reason` (CamelCase, stable).
    pub const fn event_reason(&self) -> &'static str {
        match self {
            InjectionFailure::MissingRequest | InjectionFailure::UnreadablePod(_) => {
                "KeybrakeInjectionUnreadablePod"
            }
            InjectionFailure::InvalidVaultKeyName(_) => "KeybrakeInvalidVaultKeyAnnotation",
            InjectionFailure::UnknownAgentContainer(_) | InjectionFailure::NoAgentContainers => {
                "KeybrakeInvalidAgentContainers"
            }
            InjectionFailure::InvalidUpstreamMaxConnections(_) => {
                "KeybrakeInvalidUpstreamMaxConnections"
            }
            InjectionFailure::HostNetwork => "KeybrakeHostNetworkUnsupported",
            InjectionFailure::PortConflict { .. } => "KeybrakePortConflict",
            InjectionFailure::NameConflict { .. } => "KeybrakeNameConflict",
            InjectionFailure::PatchEncoding(_) => "KeybrakeInjectionInternalError",
        }
    }
}

/// Enough to name the pod in an Event. On CREATE a pod made by a controller often has only
/// `generateName`, so the controlling owner is included: emit the Event on it instead.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodRef {
    pub namespace: String,
    pub name: Option<String>,
    pub generate_name: Option<String>,
    pub uid: Option<String>,
    pub controller: Option<OwnerReference>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct InjectionOutcome {
    pub result: InjectionResult,
    /// Set exactly when `result` is [`InjectionResult::Failed`].
    pub failure: Option<InjectionFailure>,
    /// Also returned to the client as admission warnings.
    pub warnings: Vec<String>,
    pub pod: PodRef,
    /// Dry-run requests are answered the same way; callers should not emit Events for them.
    pub dry_run: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn labels_are_distinct_snake_case() {
        let labels: HashSet<_> = InjectionResult::ALL.iter().map(|r| r.as_label()).collect();
        assert_eq!(labels.len(), InjectionResult::ALL.len());
        assert!(
            labels
                .iter()
                .all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        );
    }

    #[test]
    fn closures_are_metrics_hooks() {
        let seen = std::cell::RefCell::new(Vec::new());
        let hook = |r: InjectionResult| seen.borrow_mut().push(r);
        hook.record(InjectionResult::Failed);
        assert_eq!(*seen.borrow(), vec![InjectionResult::Failed]);
    }
}
