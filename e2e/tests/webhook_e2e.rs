//! The injection webhook served by the real keybrake-controller binary against the harness's
//! real kube-apiserver: the MutatingWebhookConfiguration registers the controller by URL with no
//! caBundle; the controller generates its serving identity into a Secret (`--tls-secret`), writes
//! the caBundle itself, publishes the CA ConfigMap where VaultKeys live, and the apiserver stores
//! annotated Pods with the sidecar. A second replica presents the same CA.
use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use clap::Parser;
use http_body_util::BodyExt;
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        core::v1::{ConfigMap, Pod, Secret},
        events::v1::Event,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
};
use keybrake_api::VaultKey;
use keybrake_e2e::{
    TestNamespace, install_crds,
    processes::{ListeningLine, controller_binary, free_port, plain_client, poll},
};
use keybrake_inject::{
    WebhookEndpoint, WebhookSettings, mutating_webhook_configuration,
    webhook_config::{FailurePolicy, WEBHOOK_PATH},
};
use keybrake_sidecar::cli::Cli;
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);
const TLS_SECRET: &str = "keybrake-tls";

struct Controller {
    child: Child,
    admin: SocketAddr,
    webhook: SocketAddr,
    log: std::path::PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Controller {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn metrics(&self) -> String {
        let uri: hyper::Uri = format!("http://{}/metrics", self.admin).parse().unwrap();
        let res = plain_client().get(uri).await.expect("GET /metrics");
        let body = res.into_body().collect().await.expect("metrics body");
        String::from_utf8_lossy(&body.to_bytes()).into_owned()
    }
}

/// The controller binary with its home (Lease, TLS Secret) in `home`, watching `agents`.
fn spawn_controller(
    home: &TestNamespace<'_>,
    agents: &TestNamespace<'_>,
    identity: &str,
    webhook_port: u16,
    dir: &std::path::Path,
    extra: &[&str],
) -> Controller {
    let log = dir.join(format!("{identity}.log"));
    let mut child = Command::new(controller_binary())
        .env("KUBECONFIG", home.plane().kubeconfig())
        .args([
            "--log-level=info,kube=warn,keybrake_controller=debug",
            "--stream-addr=127.0.0.1:0",
            "--admin-addr=127.0.0.1:0",
            &format!("--webhook-addr=127.0.0.1:{webhook_port}"),
            &format!("--tls-secret={TLS_SECRET}"),
            "--tls-san=127.0.0.1",
            "--tls-san=localhost",
            "--ca-refresh-secs=1",
            "--sidecar-image=ghcr.io/keybrake/sidecar:e2e",
            "--sidecar-pull-policy=IfNotPresent",
            r#"--sidecar-resources={"requests":{"cpu":"10m","memory":"16Mi"},"limits":{"memory":"64Mi"}}"#,
            &format!(
                "--controller-url=https://keybrake-controller.{}.svc:8443",
                home.name()
            ),
            "--staleness-bound=45s",
            &format!("--watch-namespace={}", agents.name()),
            &format!("--lease-namespace={}", home.name()),
            "--lease-duration-secs=3",
            &format!("--identity={identity}"),
            "--exit-on-stdin-close",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log).expect("log file")))
        .spawn()
        .expect("spawning keybrake-controller");
    let listening = ListeningLine::wait(&mut child, &log);
    Controller {
        admin: listening.addr("admin"),
        webhook: listening.addr("webhook"),
        child,
        log,
    }
}

/// The chart's configuration, registered by URL, without caBundle, limited to `agents` (the
/// plane is shared with other tests) and failing closed so a TLS problem is an error, not a
/// silently uninjected pod.
fn configuration(name: &str, port: u16, home: &str, agents: &str) -> MutatingWebhookConfiguration {
    let mut settings = WebhookSettings::new(
        WebhookEndpoint::Url(format!("https://127.0.0.1:{port}{WEBHOOK_PATH}")),
        home,
    );
    settings.failure_policy = FailurePolicy::Fail;
    let mut configuration = mutating_webhook_configuration(&settings);
    configuration.metadata.name = Some(name.to_owned());
    let hook = &mut configuration.webhooks.as_mut().unwrap()[0];
    assert!(hook.client_config.ca_bundle.is_none());
    hook.namespace_selector = Some(LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: "In".into(),
            values: Some(vec![agents.to_owned()]),
        }]),
        match_labels: None,
    });
    configuration
}

fn pod(name: &str, annotations: serde_json::Value, host_network: bool) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            // The harness runs without the ServiceAccount admission plugin, which would set it.
            "serviceAccountName": "default",
            "hostNetwork": host_network,
            "containers": [{"name": "agent", "image": "python:3.13-slim", "command": ["python", "agent.py"]}],
        },
    }))
    .unwrap()
}

fn vault_key(name: &str) -> VaultKey {
    serde_json::from_value(json!({
        "apiVersion": "keybrake.dev/v1alpha1", "kind": "VaultKey",
        "metadata": {"name": name},
        "spec": {
            "vendor": "stripe",
            "upstream": {"secretRef": {"name": "stripe-upstream", "key": "api-key"}},
            "agent": {"name": "refund-agent", "runId": name},
            "workload": {"serviceAccountName": "default"},
            "allow": [{"method": "GET", "path": "/v1/customers/{id}"}],
        },
    }))
    .expect("VaultKey")
}

fn counter(metrics: &str, result: &str) -> u64 {
    let prefix = format!("keybrake_webhook_injections_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Completes a TLS handshake with `addr` trusting only `ca_pem` (name 127.0.0.1).
async fn handshake(addr: SocketAddr, ca_pem: &[u8]) -> Result<(), String> {
    served_certificate(addr, ca_pem).await.map(|_| ())
}

/// The certificate (DER) `addr` presents, verified against `ca_pem` only.
async fn served_certificate(addr: SocketAddr, ca_pem: &[u8]) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())
        .map(|tls| tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_serves_the_injection_webhook_with_its_own_ca() {
    let home = TestNamespace::new("kb-home").await;
    let agents = TestNamespace::new("kb-agents").await;
    install_crds(&agents.client()).await.expect("CRDs");
    let dir = tempfile::tempdir().unwrap();
    let client = agents.client();
    let config_name = format!("keybrake-injector-{}", agents.name());
    let port = free_port();
    let configurations = Api::<MutatingWebhookConfiguration>::all(client.clone());
    configurations
        .create(
            &PostParams::default(),
            &configuration(&config_name, port, home.name(), agents.name()),
        )
        .await
        .expect("create MutatingWebhookConfiguration");

    let set_bundle = format!("--webhook-configuration={config_name}");
    let first = spawn_controller(
        &home,
        &agents,
        "replica-a",
        port,
        dir.path(),
        &[&set_bundle],
    );
    assert_eq!(first.webhook.port(), port);

    // The serving identity lands in the Secret, and the leader writes its CA as the caBundle.
    let secrets: Api<Secret> = home.api();
    let secret = poll("the TLS Secret", DEADLINE, || {
        let secrets = secrets.clone();
        async move { secrets.get_opt(TLS_SECRET).await.ok().flatten() }
    })
    .await;
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.clone().unwrap();
    let ca = data["ca.crt"].0.clone();
    for key in ["tls.crt", "tls.key", "ca.key"] {
        assert!(data.contains_key(key), "Secret lacks {key}");
    }
    let bundle = poll("the caBundle written by the controller", DEADLINE, || {
        let configurations = configurations.clone();
        let name = config_name.clone();
        async move {
            let c = configurations.get(&name).await.ok()?;
            c.webhooks?[0].client_config.ca_bundle.clone()
        }
    })
    .await;
    assert_eq!(
        bundle,
        ByteString(ca.clone()),
        "caBundle is the Secret's CA; log:\n{}",
        first.log_text()
    );

    // A second replica loads the same identity: the webhook and stream CA is one for all.
    let second_port = free_port();
    let second = spawn_controller(
        &home,
        &agents,
        "replica-b",
        second_port,
        dir.path(),
        &[&set_bundle],
    );
    handshake(first.webhook, &ca)
        .await
        .expect("replica-a trusted");
    handshake(second.webhook, &ca)
        .await
        .unwrap_or_else(|e| panic!("replica-b not trusted with the shared CA: {e}"));
    let stranger = keybrake_e2e::TestCa::new("stranger").unwrap();
    assert!(
        handshake(second.webhook, stranger.cert_pem().as_bytes())
            .await
            .is_err()
    );
    drop(second);

    // The CA ConfigMap appears in the namespace that has a VaultKey.
    agents
        .api::<VaultKey>()
        .create(&PostParams::default(), &vault_key("agent-key"))
        .await
        .expect("create VaultKey");
    let configmaps: Api<ConfigMap> = agents.api();
    let published = poll("the keybrake-ca ConfigMap", DEADLINE, || {
        let configmaps = configmaps.clone();
        async move { configmaps.get_opt("keybrake-ca").await.ok().flatten() }
    })
    .await;
    assert_eq!(
        published.data.unwrap()["ca.crt"].as_bytes(),
        &ca[..],
        "published CA is the Secret's"
    );

    // An annotated Pod is stored with the sidecar, the token volume and the env.
    let pods: Api<Pod> = agents.api();
    let stored = pods
        .create(
            &PostParams::default(),
            &pod(
                "agent",
                json!({
                    "keybrake.dev/inject": "true",
                    "keybrake.dev/vault-key": "agent-key",
                    "keybrake.dev/upstream-max-connections": "128",
                }),
                false,
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("create annotated pod: {e}; log:\n{}", first.log_text()));
    let spec = stored.spec.clone().unwrap();
    let init = spec.init_containers.clone().unwrap_or_default();
    let sidecar = init
        .iter()
        .find(|c| c.name == "keybrake-sidecar")
        .unwrap_or_else(|| panic!("no sidecar in {:?}", stored.spec));
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        sidecar.image.as_deref(),
        Some("ghcr.io/keybrake/sidecar:e2e")
    );
    assert_eq!(sidecar.image_pull_policy.as_deref(), Some("IfNotPresent"));
    let startup = sidecar.startup_probe.as_ref().expect("startupProbe");
    assert_eq!(
        startup.http_get.as_ref().unwrap().path.as_deref(),
        Some("/ready")
    );
    let limits = sidecar.resources.as_ref().unwrap().limits.clone().unwrap();
    assert_eq!(limits["memory"].0, "64Mi");
    // The args the injector wrote are what the sidecar binary parses.
    let args = sidecar.args.clone().unwrap();
    let cli = Cli::try_parse_from(std::iter::once("keybrake-sidecar".to_string()).chain(args))
        .unwrap_or_else(|e| panic!("sidecar args do not parse: {e}"));
    assert!(cli.command.is_none());
    assert_eq!(
        cli.run.controller_url.as_deref(),
        Some(format!("https://keybrake-controller.{}.svc:8443", home.name()).as_str())
    );
    assert_eq!(cli.run.staleness_bound, Duration::from_secs(45));
    assert_eq!(
        cli.run.ca_file.as_deref(),
        Some(std::path::Path::new("/var/run/secrets/keybrake/ca/ca.crt"))
    );
    let settings = cli.run.settings();
    assert_eq!(settings.admin_port, 15020);
    assert_eq!(
        settings.upstream_max_connections, 128,
        "the pod's keybrake.dev/upstream-max-connections"
    );
    assert!(
        settings.admin_bind.is_unspecified(),
        "kubelet probes the pod IP"
    );
    cli.run
        .audit_config()
        .expect("audit goes to the controller in controller mode");
    let sidecar_env: Vec<String> = sidecar
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .collect();
    assert!(sidecar_env.contains(&"POD_NAME".to_string()));

    let volumes = spec.volumes.clone().unwrap();
    let token = volumes
        .iter()
        .find(|v| v.name == "keybrake-token")
        .expect("token volume");
    let projection = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
        .service_account_token
        .clone()
        .expect("projected SA token");
    assert_eq!(projection.audience.as_deref(), Some("keybrake"));
    let ca_volume = volumes
        .iter()
        .find(|v| v.name == "keybrake-ca")
        .expect("CA volume");
    assert_eq!(
        ca_volume.config_map.as_ref().unwrap().name,
        "keybrake-ca",
        "the CA volume mounts the ConfigMap the controller publishes"
    );

    let agent = &spec.containers[0];
    let env = agent.env.clone().unwrap_or_default();
    let vault_key_env = env
        .iter()
        .find(|e| e.name == "VAULT_KEY")
        .expect("VAULT_KEY");
    let secret_ref = vault_key_env
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(secret_ref.name, "agent-key-token");
    assert_eq!(secret_ref.key, "VAULT_KEY");
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| panic!("agent env lacks {name}"))
    };
    assert_eq!(value("STRIPE_API_BASE"), "http://127.0.0.1:15002");
    assert_eq!(value("OPENAI_BASE_URL"), "http://127.0.0.1:15001/openai/v1");
    // The agent never mounts the stream token.
    assert!(
        agent
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != "keybrake-token")
    );

    // A Pod without the annotation is stored as sent.
    let plain = pods
        .create(&PostParams::default(), &pod("plain", json!({}), false))
        .await
        .expect("create plain pod");
    let plain_spec = plain.spec.unwrap();
    assert!(plain_spec.init_containers.unwrap_or_default().is_empty());
    assert!(plain_spec.containers[0].env.is_none());
    assert!(
        !plain
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("keybrake.dev/injected")
    );

    // An opted-in pod that cannot be injected is admitted without the sidecar, counted, and
    // explained by a Warning Event on it.
    let host = pods
        .create(
            &PostParams::default(),
            &pod(
                "host-network",
                json!({"keybrake.dev/inject": "true", "keybrake.dev/vault-key": "agent-key"}),
                true,
            ),
        )
        .await
        .expect("create hostNetwork pod");
    assert!(
        host.spec
            .unwrap()
            .init_containers
            .unwrap_or_default()
            .is_empty()
    );
    let events: Api<Event> = agents.api();
    let event = poll("the KeybrakeHostNetworkUnsupported Event", DEADLINE, || {
        let events = events.clone();
        async move {
            events
                .list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("KeybrakeHostNetworkUnsupported"))
        }
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.regarding.as_ref().unwrap().name.as_deref(),
        Some("host-network")
    );

    let metrics = first.metrics().await;
    assert!(counter(&metrics, "injected") >= 1, "{metrics}");
    assert!(counter(&metrics, "not_opted_in") >= 1, "{metrics}");
    assert!(counter(&metrics, "failed") >= 1, "{metrics}");

    configurations
        .delete(&config_name, &DeleteParams::default())
        .await
        .expect("delete the test's webhook configuration");
}

fn secret_field(secret: &Secret, key: &str) -> Vec<u8> {
    secret.data.as_ref().unwrap()[key].0.clone()
}

fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    rustls_pemfile::certs(&mut &pem[..])
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// The leader re-issues the serving certificate (same CA) with a third of its validity left,
/// and its listeners present the new one without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_renews_the_serving_certificate_in_place() {
    let home = TestNamespace::new("kb-renew-home").await;
    let agents = TestNamespace::new("kb-renew-agents").await;
    install_crds(&agents.client()).await.expect("CRDs");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // 9 s certificates: renewal is due 6 s after issuance.
    let controller = spawn_controller(
        &home,
        &agents,
        "renewer",
        port,
        dir.path(),
        &["--tls-secret-validity=9s"],
    );
    let secrets: Api<Secret> = home.api();
    let first = poll("the TLS Secret", DEADLINE, || {
        let secrets = secrets.clone();
        async move { secrets.get_opt(TLS_SECRET).await.ok().flatten() }
    })
    .await;
    let ca = secret_field(&first, "ca.crt");
    let first_cert = secret_field(&first, "tls.crt");
    let renewed = poll("a renewed serving certificate", DEADLINE, || {
        let secrets = secrets.clone();
        let first_cert = first_cert.clone();
        async move {
            let s = secrets.get_opt(TLS_SECRET).await.ok().flatten()?;
            (secret_field(&s, "tls.crt") != first_cert).then_some(s)
        }
    })
    .await;
    assert_eq!(secret_field(&renewed, "ca.crt"), ca, "the CA is kept");
    // RFC 3339 in UTC, whole seconds: ordered as strings.
    let not_after = |s: &Secret| -> String {
        s.metadata.annotations.as_ref().unwrap()["keybrake.dev/not-after"].clone()
    };
    assert!(not_after(&renewed) > not_after(&first));
    // The listener presents a certificate from the Secret, never an expired one: poll until it
    // serves the renewed one (or a later renewal), verified with the original CA.
    let addr = controller.webhook;
    poll(
        "the listener to present a renewed certificate",
        DEADLINE,
        || {
            let ca = ca.clone();
            let first_der = pem_to_der(&first_cert);
            async move {
                let served = served_certificate(addr, &ca).await.ok()?;
                (served != first_der).then_some(())
            }
        },
    )
    .await;
    assert!(
        controller
            .log_text()
            .contains("renewed the serving certificate"),
        "{}",
        controller.log_text()
    );
}
