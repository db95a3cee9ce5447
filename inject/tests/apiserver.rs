//! The injector behind a real kube-apiserver (the e2e harness: etcd + kube-apiserver on
//! loopback). A small HTTPS server in this test answers AdmissionReviews with `review_json`, the
//! MutatingWebhookConfiguration rendered by this crate registers it by URL + caBundle, and the
//! test reads back what the apiserver stored. The controller's route adds HTTP plumbing only.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, Namespace, Pod, PodSpec, SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
use keybrake_e2e::{CertifiedKey, TestCa, TestNamespace};
use keybrake_inject::webhook_config::{WEBHOOK_PATH, ca_bundle_patch};
use keybrake_inject::{
    InjectionConfig, InjectionResult, WebhookEndpoint, WebhookSettings,
    mutating_webhook_configuration, review_json,
};
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

type Counts = Arc<Mutex<Vec<InjectionResult>>>;

fn config() -> InjectionConfig {
    InjectionConfig::new(
        "ghcr.io/keybrake/sidecar:0.1.0",
        "https://keybrake-controller.keybrake-system.svc:8443",
    )
}

fn tls_acceptor(identity: &CertifiedKey) -> TlsAcceptor {
    let certs = rustls_pemfile::certs(&mut identity.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut identity.key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    TlsAcceptor::from(Arc::new(server))
}

/// Serves `POST /inject` until the test's runtime shuts down.
async fn serve_webhook(identity: &CertifiedKey, counts: Counts) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls_acceptor(identity);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let counts = counts.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let counts = counts.clone();
                    async move {
                        assert_eq!(req.uri().path(), WEBHOOK_PATH);
                        let body = req.into_body().collect().await?.to_bytes();
                        let record = |r: InjectionResult| counts.lock().unwrap().push(r);
                        let (answer, _) = review_json(&body, &config(), &record);
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(answer)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

fn agent_pod(name: &str, annotations: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some("refund-agent".into()),
            containers: vec![Container {
                name: "agent".into(),
                image: Some("python:3.13-slim".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn sidecars(pod: &Pod) -> usize {
    let spec = pod.spec.as_ref().unwrap();
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter(|c| c.name == "keybrake-sidecar")
        .count()
}

const OPTED_IN: &[(&str, &str)] = &[
    ("keybrake.dev/inject", "true"),
    ("keybrake.dev/vault-key", "refund-agent-run-42"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_stores_injected_pods_and_leaves_others_alone() {
    let ns = TestNamespace::new("inject").await;
    // A second namespace enforcing Pod Security "restricted" (checked after mutation).
    let restricted = TestNamespace::new("inject-restricted").await;
    Api::<Namespace>::all(ns.client())
        .patch(
            restricted.name(),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted"
            }}})),
        )
        .await
        .unwrap();
    let ca = TestCa::new("keybrake-inject-test").unwrap();
    let counts: Counts = Arc::default();
    let addr = serve_webhook(&ca.issue_server(&["127.0.0.1"]).unwrap(), counts.clone()).await;

    let settings = WebhookSettings::new(
        WebhookEndpoint::Url(format!("https://{addr}{WEBHOOK_PATH}")),
        "keybrake-system",
    );
    // Registered without a caBundle, as the chart does; then the bundle is patched in, as the
    // controller does after generating its CA.
    let mut registration = mutating_webhook_configuration(&settings);
    registration.metadata.name = Some(format!("keybrake-inject-{}", ns.name()));
    // The plane may be shared with other tests: only this test's namespace goes to this webhook.
    let hook = &mut registration.webhooks.as_mut().unwrap()[0];
    let selector = hook.namespace_selector.as_mut().unwrap();
    selector
        .match_expressions
        .as_mut()
        .unwrap()
        .push(LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: "In".into(),
            values: Some(vec![ns.name().to_string(), restricted.name().to_string()]),
        });
    let registrations = Api::<MutatingWebhookConfiguration>::all(ns.client());
    registrations
        .create(&PostParams::default(), &registration)
        .await
        .expect("the apiserver accepts the rendered MutatingWebhookConfiguration");
    registrations
        .patch(
            registration.metadata.name.as_ref().unwrap(),
            &PatchParams::default(),
            &Patch::<()>::Json(ca_bundle_patch(ca.cert_pem().as_bytes())),
        )
        .await
        .expect("the apiserver accepts the caBundle patch");

    let pods = ns.api::<Pod>();
    // The apiserver picks up a new webhook configuration asynchronously: dry-run an opted-in pod
    // until it comes back mutated.
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = pods
            .create(&dry_run, &agent_pod("probe", OPTED_IN))
            .await
            .unwrap();
        if sidecars(&probe) == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "webhook not called within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Opted in: stored with the sidecar, the token volume and the agent env.
    pods.create(&PostParams::default(), &agent_pod("refund-agent", OPTED_IN))
        .await
        .unwrap();
    let stored = pods.get("refund-agent").await.unwrap();
    let spec = stored.spec.as_ref().unwrap();
    let sidecar = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(sidecar.name, "keybrake-sidecar");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let token = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "keybrake-token")
        .expect("token volume stored");
    let projection = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
        .service_account_token
        .as_ref()
        .unwrap();
    assert_eq!(projection.audience.as_deref(), Some("keybrake"));
    let env = spec.containers[0].env.as_ref().unwrap();
    let vault_key = env.iter().find(|e| e.name == "VAULT_KEY").unwrap();
    let secret = vault_key
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(secret.name, "refund-agent-run-42-token");
    assert!(env.iter().any(|e| e.name == "OPENAI_BASE_URL"
        && e.value.as_deref() == Some("http://127.0.0.1:15001/openai/v1")));
    assert_eq!(
        stored.metadata.labels.as_ref().unwrap()["keybrake.dev/sidecar"],
        "true"
    );

    // No annotation: stored exactly as sent (no sidecar, no env, no marks).
    pods.create(&PostParams::default(), &agent_pod("plain", &[]))
        .await
        .unwrap();
    let plain = pods.get("plain").await.unwrap();
    assert_eq!(sidecars(&plain), 0);
    assert!(plain.spec.as_ref().unwrap().containers[0].env.is_none());
    assert!(plain.metadata.labels.is_none());

    // Opted in but cannot be injected: admitted anyway, without the sidecar.
    let mut host_net = agent_pod("host-net", OPTED_IN);
    host_net.spec.as_mut().unwrap().host_network = Some(true);
    pods.create(&PostParams::default(), &host_net)
        .await
        .unwrap();
    assert_eq!(sidecars(&pods.get("host-net").await.unwrap()), 0);

    // A stored injected pod's spec created again: still exactly one sidecar.
    let mut again = stored.clone();
    again.metadata = ObjectMeta {
        name: Some("refund-agent-again".into()),
        annotations: stored.metadata.annotations.clone(),
        labels: stored.metadata.labels.clone(),
        ..Default::default()
    };
    again.status = None;
    pods.create(&PostParams::default(), &again).await.unwrap();
    assert_eq!(sidecars(&pods.get("refund-agent-again").await.unwrap()), 1);

    // In a "restricted" namespace a compliant agent pod stays admissible once injected: the
    // sidecar itself meets the restricted profile.
    let mut compliant = agent_pod("restricted-agent", OPTED_IN);
    compliant.spec.as_mut().unwrap().containers[0].security_context = Some(SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(1000),
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
    });
    let restricted_pods = restricted.api::<Pod>();
    restricted_pods
        .create(&PostParams::default(), &compliant)
        .await
        .expect("the injected pod passes Pod Security 'restricted'");
    assert_eq!(
        sidecars(&restricted_pods.get("restricted-agent").await.unwrap()),
        1
    );

    let seen = counts.lock().unwrap().clone();
    for expected in [
        InjectionResult::Injected,
        InjectionResult::NotOptedIn,
        InjectionResult::Failed,
    ] {
        assert!(
            seen.contains(&expected),
            "{expected:?} never counted: {seen:?}"
        );
    }

    registrations
        .delete(
            registration.metadata.name.as_ref().unwrap(),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
}
