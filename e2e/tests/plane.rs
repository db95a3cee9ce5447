//! The harness itself: the plane offers what the controller, sidecar and chart tests rely on —
//! TokenRequest + TokenReview, mutating webhooks called by URL, RBAC (checked by impersonation),
//! the pinned kubectl and helm — and a private plane stops cleanly.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use keybrake_api::VaultKey;
use keybrake_e2e::{ControlPlane, K8S_VERSION, TestCa, TestNamespace, install_crds, run};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};

#[tokio::test]
async fn token_request_and_token_review_work() {
    let ns = TestNamespace::new("plane-tokens").await;
    let token = ns
        .service_account_token("agent", "keybrake")
        .await
        .expect("TokenRequest");
    let review = |audience: &str| TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.clone()),
            audiences: Some(vec![audience.to_string()]),
        },
        ..TokenReview::default()
    };
    let reviews: Api<TokenReview> = Api::all(ns.client());
    let status = reviews
        .create(&PostParams::default(), &review("keybrake"))
        .await
        .expect("TokenReview")
        .status
        .expect("review status");
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    assert_eq!(
        status.user.and_then(|u| u.username),
        Some(format!("system:serviceaccount:{}:agent", ns.name()))
    );
    // A token for another audience is not accepted as a keybrake token.
    let other = reviews
        .create(&PostParams::default(), &review("not-keybrake"))
        .await
        .expect("TokenReview")
        .status
        .expect("review status");
    assert_ne!(other.authenticated, Some(true), "{other:?}");
}

#[tokio::test]
async fn rbac_is_enforced_for_impersonated_users() {
    let ns = TestNamespace::new("plane-rbac").await;
    install_crds(&ns.client()).await.expect("crds");
    let nobody = ns.plane().client_as("keybrake-e2e-nobody", &[]);
    let err = Api::<VaultKey>::namespaced(nobody, ns.name())
        .list(&ListParams::default())
        .await
        .expect_err("a user without RBAC must not list VaultKeys");
    assert!(err.to_string().contains("forbidden"), "{err}");
    // The admin can.
    ns.api::<VaultKey>()
        .list(&ListParams::default())
        .await
        .expect("admin lists VaultKeys");
}

#[tokio::test]
async fn pinned_kubectl_and_helm_talk_to_the_plane() {
    let ns = TestNamespace::new("plane-tools").await;
    let plane = ns.plane();
    let version = run(plane.kubectl().args(["version", "-o", "json"])).expect_success();
    let version: Value = serde_json::from_str(&version.stdout).expect("kubectl version json");
    assert_eq!(
        version["clientVersion"]["gitVersion"],
        format!("v{K8S_VERSION}")
    );
    assert_eq!(
        version["serverVersion"]["gitVersion"],
        format!("v{K8S_VERSION}")
    );

    let listed = run(plane
        .helm()
        .args(["list", "--namespace", ns.name(), "-o", "json"]))
    .expect_success();
    assert_eq!(listed.stdout.trim(), "[]", "{listed}");
}

/// The sidecar injector's path: the apiserver calls a webhook on 127.0.0.1 over TLS (by URL,
/// trusted through `caBundle`) and stores the mutated Pod, although no kubelet ever runs it.
#[tokio::test]
async fn mutating_webhook_by_url_mutates_stored_pods() {
    let ns = TestNamespace::new("plane-webhook").await;
    let ca = TestCa::new("webhook-ca").expect("ca");
    let serving = ca.issue_server(&["127.0.0.1"]).expect("cert");
    let addr = serve_label_webhook(&serving.cert_pem, &serving.key_pem).await;

    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": ns.name()},
        "webhooks": [{
            "name": "label.e2e.keybrake.dev",
            "clientConfig": {
                "url": format!("https://{addr}/mutate"),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca.cert_pem()),
            },
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"]}],
            // Only this test's namespace: other tests share the plane.
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name()}},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 10
        }]
    }))
    .expect("webhook config");
    Api::<MutatingWebhookConfiguration>::all(ns.client())
        .create(&PostParams::default(), &config)
        .await
        .expect("register webhook");

    // The apiserver picks up new webhook configurations asynchronously: create Pods until one
    // comes back mutated (bounded).
    let pods: Api<Pod> = ns.api();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut attempt = 0;
    let stored = loop {
        attempt += 1;
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("agent-{attempt}")},
            "spec": {"containers": [{"name": "agent", "image": "example.invalid/agent:1"}]}
        }))
        .expect("pod");
        let created = pods
            .create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
        let labels = created.metadata.labels.clone().unwrap_or_default();
        if labels.get("keybrake.dev/injected").map(String::as_str) == Some("true") {
            break pods
                .get(&format!("agent-{attempt}"))
                .await
                .expect("read back");
        }
        assert!(
            Instant::now() < deadline,
            "webhook at {addr} never mutated a Pod ({attempt} tries)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let labels: BTreeMap<String, String> = stored.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get("keybrake.dev/injected").map(String::as_str),
        Some("true")
    );
    // Pods never run here: no kubelet.
    assert_eq!(
        stored.status.and_then(|s| s.phase).as_deref(),
        Some("Pending")
    );
}

/// A ValidatingAdmissionPolicy is enforced on the test plane, but not at once: the apiserver
/// picks policies up asynchronously (about a second here), so a test that relies on one must
/// first wait until a server-side dry run is denied, as this one does (e2e/README.md).
#[tokio::test]
async fn validating_admission_policy_is_enforced_after_a_short_delay() {
    let ns = TestNamespace::new("plane-vap").await;
    let name = format!("deny-token-secrets-{}", ns.name());
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE"], "resources": ["secrets"],
            }]},
            "validations": [{
                "expression": "!object.metadata.name.endsWith('-token')",
                "message": "no token Secrets here",
            }],
        },
    }))
    .expect("policy");
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": ns.name()},
            }},
        },
    }))
    .expect("binding");
    let client = ns.client();
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    let created = Instant::now();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("create policy");
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .expect("create binding");

    let secrets = ns.api::<Secret>();
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let secret = |name: &str| -> Secret {
        serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"k": "v"}}))
            .expect("Secret")
    };
    let denial = keybrake_e2e::processes::poll(
        "the policy to deny a token Secret",
        Duration::from_secs(20),
        || {
            let (secrets, dry_run, token) = (&secrets, &dry_run, secret("k-token"));
            async move { secrets.create(dry_run, &token).await.err() }
        },
    )
    .await;
    let waited = created.elapsed();
    let message = denial.to_string();
    assert!(
        message.contains(&name) && message.contains("no token Secrets here"),
        "denied by something else: {message}"
    );
    // Only what the policy matches is denied.
    secrets
        .create(&dry_run, &secret("plain"))
        .await
        .expect("a Secret the policy does not match");
    eprintln!("VAP enforced {} ms after its creation", waited.as_millis());

    bindings
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete binding");
    policies
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete policy");
}

#[tokio::test]
async fn a_private_plane_stops_cleanly_on_drop() {
    let plane = tokio::task::spawn_blocking(ControlPlane::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(plane.startup().is_some());
    let dir = plane.dir().to_path_buf();
    let client = plane.client();
    Api::<Namespace>::all(client.clone())
        .get("default")
        .await
        .expect("the private plane serves");
    drop(plane);
    assert!(
        !dir.exists(),
        "plane dir {} survived the drop",
        dir.display()
    );
    assert!(
        Api::<Namespace>::all(client).get("default").await.is_err(),
        "apiserver still answers after drop"
    );
}

/// Serves an admission webhook on a free loopback port that labels every object it sees.
async fn serve_label_webhook(cert_pem: &str, key_pem: &str) -> SocketAddr {
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("cert pem");
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .expect("key pem")
        .expect("a key");
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service_fn(admit))
                    .await;
            });
        }
    });
    addr
}

async fn admit(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let body = request.into_body().collect().await?.to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap_or_default();
    let patch = json!([{"op": "add", "path": "/metadata/labels",
                        "value": {"keybrake.dev/injected": "true"}}]);
    let answer = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": review["request"]["uid"],
            "allowed": true,
            "patchType": "JSONPatch",
            "patch": base64::engine::general_purpose::STANDARD.encode(patch.to_string()),
        }
    });
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(answer.to_string())))
        .expect("response"))
}

/// What `KEYBRAKE_E2E_REUSE_CLUSTER=1` does with a `make cluster` plane: attach through the
/// harness-written kubeconfig, without owning (or stopping) the processes.
#[tokio::test]
async fn attach_reuses_a_running_plane_without_owning_it() {
    let ns = TestNamespace::new("plane-attach").await;
    let owner = ns.plane();
    let kubeconfig = owner.kubeconfig().to_path_buf();
    let attached = tokio::task::spawn_blocking(move || ControlPlane::attach(&kubeconfig))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(attached.server_url(), owner.server_url());
    assert_eq!(attached.ca_pem(), owner.ca_pem());
    assert!(
        attached.startup().is_none(),
        "attached planes report no startup"
    );
    Api::<Namespace>::all(attached.client())
        .get(ns.name())
        .await
        .expect("the attached client sees the owner's namespace");
    drop(attached);
    // Dropping an attachment leaves the owner's plane running.
    Api::<Namespace>::all(ns.client())
        .get(ns.name())
        .await
        .expect("owner plane still serves");
}
