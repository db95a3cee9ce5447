//! The sidecar-injection webhook: `POST /inject` over TLS (the serving certificate streams use),
//! answered by `keybrake_inject::review_json`. Every answer allows the pod; outcomes are counted
//! in `keybrake_webhook_injections_total{result}`, and an opted-in pod that was not injected gets
//! a Warning Event on its controlling owner (or on the pod itself when it has a name and no
//! owner). No Events for dry-run requests.
use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use k8s_openapi::api::core::v1::ObjectReference;
use keybrake_inject::{
    InjectionConfig, InjectionOutcome, InjectionResult, PodRef, webhook_config::WEBHOOK_PATH,
};
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The apiserver caps admission request bodies near 3 MiB; a pod is far smaller.
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

pub struct WebhookServer {
    pub config: InjectionConfig,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub shutdown: CancellationToken,
}

/// What to hang a failure Event on: the pod's controlling owner, else the named pod.
pub fn event_target(pod: &PodRef) -> Option<ObjectReference> {
    if let Some(owner) = &pod.controller {
        return Some(ObjectReference {
            api_version: Some(owner.api_version.clone()),
            kind: Some(owner.kind.clone()),
            name: Some(owner.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(owner.uid.clone()),
            ..ObjectReference::default()
        });
    }
    pod.name.as_ref().map(|name| ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.clone()),
        namespace: Some(pod.namespace.clone()),
        uid: pod.uid.clone(),
        ..ObjectReference::default()
    })
}

/// The Event for an outcome, when one is due: failed injections only, never for dry runs.
pub fn failure_event(outcome: &InjectionOutcome) -> Option<(ObjectReference, Event)> {
    if outcome.result != InjectionResult::Failed || outcome.dry_run {
        return None;
    }
    let failure = outcome.failure.as_ref()?;
    let target = event_target(&outcome.pod)?;
    let pod = outcome
        .pod
        .name
        .clone()
        .or_else(|| outcome.pod.generate_name.clone().map(|g| format!("{g}*")))
        .unwrap_or_default();
    Some((
        target,
        Event {
            type_: EventType::Warning,
            reason: failure.event_reason().to_owned(),
            note: Some(format!(
                "pod {pod}: keybrake sidecar not injected: {failure}"
            )),
            action: "Inject".into(),
            secondary: None,
        },
    ))
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    res
}

impl WebhookServer {
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<()> {
        let acceptor = TlsAcceptor::from(tls);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => accepted?,
                () = self.shutdown.cancelled() => return Ok(()),
            };
            let acceptor = acceptor.clone();
            let server = self.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let service = hyper::service::service_fn(move |req| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.route(req).await) }
                });
                if let Err(e) = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "webhook connection ended");
                }
            });
        }
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() != WEBHOOK_PATH {
            return respond(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec());
        }
        if req.method() != Method::POST {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                b"method not allowed\n".to_vec(),
            );
        }
        let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return respond(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "text/plain",
                    b"AdmissionReview too large or unreadable\n".to_vec(),
                );
            }
        };
        let counter = &self.metrics.webhook_injections;
        let hook = |result: InjectionResult| counter.with_label_values(&[result.as_label()]).inc();
        let (answer, outcome) = keybrake_inject::review_json(&body, &self.config, &hook);
        if outcome.result == InjectionResult::Failed {
            tracing::warn!(namespace = %outcome.pod.namespace, reason = outcome.failure.as_ref().map(|f| f.event_reason()), dry_run = outcome.dry_run, "opted-in pod not injected");
        }
        if let Some((target, event)) = failure_event(&outcome) {
            // Never delay admission on the Event.
            let recorder = self.recorder.clone();
            tokio::spawn(async move {
                if let Err(e) = recorder.publish(&event, &target).await {
                    tracing::warn!(error = %e, "could not publish the injection Event");
                }
            });
        }
        respond(StatusCode::OK, "application/json", answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use keybrake_inject::InjectionFailure;

    fn failed(pod: PodRef, dry_run: bool) -> InjectionOutcome {
        InjectionOutcome {
            result: InjectionResult::Failed,
            failure: Some(InjectionFailure::HostNetwork),
            warnings: Vec::new(),
            pod,
            dry_run,
        }
    }

    fn owned_pod() -> PodRef {
        PodRef {
            namespace: "agents".into(),
            name: None,
            generate_name: Some("agent-7d9f-".into()),
            uid: None,
            controller: Some(OwnerReference {
                api_version: "apps/v1".into(),
                kind: "ReplicaSet".into(),
                name: "agent-7d9f".into(),
                uid: "rs-uid".into(),
                controller: Some(true),
                ..OwnerReference::default()
            }),
        }
    }

    #[test]
    fn failures_become_warning_events_on_the_owner() {
        let (target, event) = failure_event(&failed(owned_pod(), false)).unwrap();
        assert_eq!(target.kind.as_deref(), Some("ReplicaSet"));
        assert_eq!(target.name.as_deref(), Some("agent-7d9f"));
        assert_eq!(target.namespace.as_deref(), Some("agents"));
        assert_eq!(event.type_, EventType::Warning);
        assert_eq!(event.reason, "KeybrakeHostNetworkUnsupported");
        assert!(event.note.unwrap().contains("agent-7d9f-*"));
    }

    #[test]
    fn no_event_for_dry_runs_successes_or_anonymous_pods() {
        assert!(failure_event(&failed(owned_pod(), true)).is_none());
        let mut injected = failed(owned_pod(), false);
        injected.result = InjectionResult::Injected;
        injected.failure = None;
        assert!(failure_event(&injected).is_none());
        // Neither owner nor name: nothing to attach the Event to.
        let anonymous = PodRef {
            namespace: "agents".into(),
            generate_name: Some("x-".into()),
            ..PodRef::default()
        };
        assert!(failure_event(&failed(anonymous, false)).is_none());
        // A bare named pod: the Event goes on the pod.
        let bare = PodRef {
            namespace: "agents".into(),
            name: Some("agent".into()),
            ..PodRef::default()
        };
        let (target, _) = failure_event(&failed(bare, false)).unwrap();
        assert_eq!(target.kind.as_deref(), Some("Pod"));
        assert_eq!(target.name.as_deref(), Some("agent"));
    }
}
