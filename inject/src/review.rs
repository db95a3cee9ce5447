//! The webhook's request handler, minus the HTTP: AdmissionReview in, AdmissionReview out.
//!
//! Every answer allows the pod. An opted-in pod that cannot be injected is admitted without the
//! sidecar, as `failurePolicy: Ignore` would do if the webhook were down, and the outcome carries
//! the reason so the caller can count it and emit a Warning Event. The agent in such a pod holds
//! no vendor secret and no base URL to the sidecar, so its calls fail at the vendor: the failure
//! is loud, not silent.
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};

use crate::config::InjectionConfig;
use crate::outcome::{
    InjectionFailure, InjectionMetrics, InjectionOutcome, InjectionResult, PodRef,
};
use crate::patch::build_patch;
use crate::plan::{Decision, decide};

/// The answer to send back (serialize `review` as the HTTP response body) and what happened.
#[derive(Debug)]
pub struct Reviewed {
    pub review: AdmissionReview<DynamicObject>,
    pub outcome: InjectionOutcome,
}

fn is_pod_create(request: &AdmissionRequest<DynamicObject>) -> bool {
    request.kind.group.is_empty()
        && request.kind.kind == "Pod"
        && request.operation == Operation::Create
        && request.sub_resource.as_deref().unwrap_or("").is_empty()
}

fn pod_ref(pod: Option<&Pod>, namespace: &str) -> PodRef {
    let Some(pod) = pod else {
        return PodRef {
            namespace: namespace.to_string(),
            ..Default::default()
        };
    };
    let meta = &pod.metadata;
    PodRef {
        namespace: namespace.to_string(),
        name: meta.name.clone().filter(|n| !n.is_empty()),
        generate_name: meta.generate_name.clone().filter(|n| !n.is_empty()),
        uid: meta.uid.clone().filter(|n| !n.is_empty()),
        controller: meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .cloned(),
    }
}

/// Reviews one AdmissionReview. Calls `metrics.record` exactly once.
pub fn review(
    review: AdmissionReview<DynamicObject>,
    config: &InjectionConfig,
    metrics: &dyn InjectionMetrics,
) -> Reviewed {
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(_) => {
            metrics.record(InjectionResult::Failed);
            return Reviewed {
                review: AdmissionResponse::invalid("AdmissionReview without a request")
                    .into_review(),
                outcome: InjectionOutcome {
                    result: InjectionResult::Failed,
                    failure: Some(InjectionFailure::MissingRequest),
                    warnings: Vec::new(),
                    pod: PodRef::default(),
                    dry_run: false,
                },
            };
        }
    };
    let (response, outcome) = answer(&request, config);
    metrics.record(outcome.result);
    Reviewed {
        review: response.into_review(),
        outcome,
    }
}

fn answer(
    request: &AdmissionRequest<DynamicObject>,
    config: &InjectionConfig,
) -> (AdmissionResponse, InjectionOutcome) {
    let mut response = AdmissionResponse::from(request);
    let namespace = request
        .namespace
        .clone()
        .or_else(|| {
            request
                .object
                .as_ref()
                .and_then(|o| o.metadata.namespace.clone())
        })
        .unwrap_or_default();
    let mut outcome = InjectionOutcome {
        result: InjectionResult::Ignored,
        failure: None,
        warnings: Vec::new(),
        pod: pod_ref(None, &namespace),
        dry_run: request.dry_run,
    };
    if !is_pod_create(request) {
        return (response, outcome);
    }

    let pod: Result<Pod, String> = request
        .object
        .as_ref()
        .ok_or_else(|| "no object".to_string())
        .and_then(|o| serde_json::to_value(o).map_err(|e| e.to_string()))
        .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()));
    let pod = match pod {
        Ok(pod) => pod,
        Err(error) => {
            return fail(response, outcome, InjectionFailure::UnreadablePod(error));
        }
    };
    outcome.pod = pod_ref(Some(&pod), &namespace);

    let decided = decide(&pod, &namespace, config);
    outcome.warnings = decided.warnings;
    match decided.decision {
        Decision::Leave(result) => outcome.result = result,
        Decision::Fail(failure) => return fail(response, outcome, failure),
        Decision::Inject(plan) => {
            let patched = build_patch(&pod, &plan).and_then(|patch| {
                response
                    .clone()
                    .with_patch(patch)
                    .map_err(|e| InjectionFailure::PatchEncoding(e.to_string()))
            });
            match patched {
                Ok(with_patch) => {
                    response = with_patch;
                    outcome.result = InjectionResult::Injected;
                }
                Err(failure) => return fail(response, outcome, failure),
            }
        }
    }
    finish(response, outcome)
}

fn fail(
    response: AdmissionResponse,
    mut outcome: InjectionOutcome,
    failure: InjectionFailure,
) -> (AdmissionResponse, InjectionOutcome) {
    outcome.result = InjectionResult::Failed;
    outcome
        .warnings
        .push(format!("keybrake: sidecar not injected: {failure}"));
    outcome.failure = Some(failure);
    finish(response, outcome)
}

fn finish(
    mut response: AdmissionResponse,
    outcome: InjectionOutcome,
) -> (AdmissionResponse, InjectionOutcome) {
    if !outcome.warnings.is_empty() {
        response.warnings = Some(outcome.warnings.clone());
    }
    // Audit annotations are prefixed with the webhook's name by the apiserver.
    response
        .audit_annotations
        .insert("result".into(), outcome.result.as_label().into());
    if let Some(failure) = &outcome.failure {
        response
            .audit_annotations
            .insert("reason".into(), failure.event_reason().into());
    }
    (response, outcome)
}

/// Byte-level convenience for an HTTP handler: never fails; an undecodable body gets an
/// "invalid request" review (the apiserver then applies the webhook's failurePolicy).
pub fn review_json(
    body: &[u8],
    config: &InjectionConfig,
    metrics: &dyn InjectionMetrics,
) -> (Vec<u8>, InjectionOutcome) {
    let reviewed = match serde_json::from_slice::<AdmissionReview<DynamicObject>>(body) {
        Ok(parsed) => review(parsed, config, metrics),
        Err(error) => {
            metrics.record(InjectionResult::Failed);
            Reviewed {
                review: AdmissionResponse::invalid(format!("undecodable AdmissionReview: {error}"))
                    .into_review(),
                outcome: InjectionOutcome {
                    result: InjectionResult::Failed,
                    failure: Some(InjectionFailure::UnreadablePod(error.to_string())),
                    warnings: Vec::new(),
                    pod: PodRef::default(),
                    dry_run: false,
                },
            }
        }
    };
    // Serializing our own response types cannot fail (string keys, no non-finite floats).
    let bytes = serde_json::to_vec(&reviewed.review).unwrap_or_default();
    (bytes, reviewed.outcome)
}
