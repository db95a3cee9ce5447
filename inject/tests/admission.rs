//! The injector against AdmissionReview bodies recorded from a real kube-apiserver v1.35.4
//! (see tests/data/README.md). Each test applies the returned patch to the recorded Pod the way
//! the apiserver does and inspects the result.
use std::cell::RefCell;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};
use keybrake_inject::{
    InjectionConfig, InjectionFailure, InjectionOutcome, InjectionResult, review_json,
};
use serde_json::Value;

fn config() -> InjectionConfig {
    InjectionConfig::new(
        "ghcr.io/keybrake/sidecar:0.1.0",
        "https://keybrake-controller-streams.keybrake-system.svc:8443",
    )
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/data/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

struct Answer {
    response: Value,
    outcome: InjectionOutcome,
    recorded: Vec<InjectionResult>,
    /// The request's Pod with the patch applied (unchanged when there is no patch).
    pod: Value,
}

impl Answer {
    fn typed_pod(&self) -> Pod {
        serde_json::from_value(self.pod.clone()).unwrap()
    }

    fn has_patch(&self) -> bool {
        self.response.get("patch").is_some()
    }

    fn warnings(&self) -> Vec<String> {
        self.response["warnings"]
            .as_array()
            .map(|w| w.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }
}

fn send(review: &Value) -> Answer {
    let recorded = RefCell::new(Vec::new());
    let hook = |r: InjectionResult| recorded.borrow_mut().push(r);
    let (bytes, outcome) = review_json(&serde_json::to_vec(review).unwrap(), &config(), &hook);
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(body["kind"], "AdmissionReview");
    let response = body["response"].clone();
    let mut pod = review["request"]["object"].clone();
    if let Some(patch) = response.get("patch") {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes: Vec<u8> = serde_json::from_value(patch.clone()).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut pod, &patch).expect("patch applies to the recorded pod");
    }
    Answer {
        response,
        outcome,
        recorded: recorded.into_inner(),
        pod,
    }
}

fn env_of<'a>(container: &'a Container, name: &str) -> Option<&'a EnvVar> {
    container.env.iter().flatten().find(|e| e.name == name)
}

fn container<'a>(pod: &'a Pod, name: &str) -> &'a Container {
    let spec = pod.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn opted_in_pod_gets_the_native_sidecar_volumes_and_env() {
    let review = fixture("pod-create-opted-in");
    let answer = send(&review);

    assert_eq!(answer.response["uid"], review["request"]["uid"]);
    assert_eq!(answer.response["allowed"], true);
    assert_eq!(answer.outcome.result, InjectionResult::Injected);
    assert_eq!(answer.recorded, vec![InjectionResult::Injected]);
    assert_eq!(answer.response["auditAnnotations"]["result"], "injected");

    let pod = answer.typed_pod();
    let spec = pod.spec.as_ref().unwrap();
    let sidecar = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(sidecar.name, "keybrake-sidecar");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        sidecar
            .startup_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/ready")
    );

    let volumes = spec.volumes.as_ref().unwrap();
    let token = volumes.iter().find(|v| v.name == "keybrake-token").unwrap();
    let projection = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
        .service_account_token
        .as_ref()
        .unwrap();
    assert_eq!(projection.audience.as_deref(), Some("keybrake"));
    assert_eq!(projection.expiration_seconds, Some(3600));
    let ca = volumes.iter().find(|v| v.name == "keybrake-ca").unwrap();
    assert_eq!(ca.config_map.as_ref().unwrap().name, "keybrake-ca");

    let agent = container(&pod, "agent");
    let key = env_of(agent, "VAULT_KEY").unwrap();
    let secret = key
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(secret.name, "refund-agent-run-42-token");
    assert_eq!(secret.key, "VAULT_KEY");
    assert_eq!(
        env_of(agent, "STRIPE_API_BASE").unwrap().value.as_deref(),
        Some("http://127.0.0.1:15002")
    );
    // The user's own OPENAI_BASE_URL wins, once, and the user is told.
    let openai: Vec<_> = agent
        .env
        .iter()
        .flatten()
        .filter(|e| e.name == "OPENAI_BASE_URL")
        .collect();
    assert_eq!(openai.len(), 1);
    assert_eq!(
        openai[0].value.as_deref(),
        Some("https://proxy.internal.example/v1")
    );
    assert!(
        answer
            .warnings()
            .iter()
            .any(|w| w.contains("OPENAI_BASE_URL"))
    );
    // Existing env stays, in place.
    assert_eq!(agent.env.as_ref().unwrap()[1].name, "LOG_LEVEL");
    // The token is the sidecar's alone.
    assert!(
        agent
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != "keybrake-token")
    );

    let meta = &pod.metadata;
    assert_eq!(
        meta.annotations.as_ref().unwrap()["keybrake.dev/injected"],
        "true"
    );
    assert_eq!(
        meta.labels.as_ref().unwrap()["keybrake.dev/sidecar"],
        "true"
    );
    assert_eq!(meta.labels.as_ref().unwrap()["app"], "refund-agent");
}

#[test]
fn injecting_twice_changes_nothing() {
    let mut review = fixture("pod-create-opted-in");
    let first = send(&review);
    review["request"]["object"] = first.pod.clone();
    let second = send(&review);
    assert_eq!(second.outcome.result, InjectionResult::AlreadyInjected);
    assert!(!second.has_patch());
    assert_eq!(second.pod, first.pod);
}

#[test]
fn recorded_already_injected_pod_is_left_alone() {
    let answer = send(&fixture("pod-create-already-injected"));
    assert_eq!(answer.outcome.result, InjectionResult::AlreadyInjected);
    assert_eq!(answer.response["allowed"], true);
    assert!(!answer.has_patch());
}

#[test]
fn pod_without_the_annotation_is_untouched() {
    let answer = send(&fixture("pod-create-plain"));
    assert_eq!(answer.outcome.result, InjectionResult::NotOptedIn);
    assert_eq!(answer.recorded, vec![InjectionResult::NotOptedIn]);
    assert_eq!(answer.response["allowed"], true);
    assert!(!answer.has_patch());
    assert!(answer.warnings().is_empty());
}

#[test]
fn other_annotation_values_do_not_opt_in_and_say_so() {
    let mut review = fixture("pod-create-opted-in");
    review["request"]["object"]["metadata"]["annotations"]["keybrake.dev/inject"] = "yes".into();
    let answer = send(&review);
    assert_eq!(answer.outcome.result, InjectionResult::NotOptedIn);
    assert!(!answer.has_patch());
    assert!(answer.warnings()[0].contains("not \"true\""));
}

#[test]
fn label_opts_in_too() {
    let mut review = fixture("pod-create-plain");
    review["request"]["object"]["metadata"]["labels"] =
        serde_json::json!({"keybrake.dev/inject": "true"});
    let answer = send(&review);
    assert_eq!(answer.outcome.result, InjectionResult::Injected);
    // The plain pod had no annotations, env or volumes: whole fields are added.
    let pod = answer.typed_pod();
    assert_eq!(
        pod.metadata.annotations.as_ref().unwrap()["keybrake.dev/injected"],
        "true"
    );
    assert!(env_of(container(&pod, "app"), "OPENAI_BASE_URL").is_some());
}

#[test]
fn kube_system_is_never_injected() {
    let answer = send(&fixture("pod-create-kube-system"));
    assert_eq!(answer.outcome.result, InjectionResult::ExcludedNamespace);
    assert!(!answer.has_patch());
}

#[test]
fn replicaset_pod_injects_only_the_named_agent_container() {
    let answer = send(&fixture("pod-create-replicaset"));
    assert_eq!(answer.outcome.result, InjectionResult::Injected);
    let pod = answer.typed_pod();
    let spec = pod.spec.as_ref().unwrap();

    let init: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init, ["keybrake-sidecar", "fetch-prompts"]);
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        volumes,
        ["prompts", "keybrake-token", "keybrake-ca", "keybrake-spool"]
    );

    let agent = container(&pod, "agent");
    assert!(env_of(agent, "OPENAI_BASE_URL").is_some());
    // No keybrake.dev/vault-key annotation: no VAULT_KEY, and a warning.
    assert!(env_of(agent, "VAULT_KEY").is_none());
    let warnings = answer.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("keybrake.dev/vault-key"))
    );
    assert!(warnings.iter().any(|w| w.contains("envFrom")));
    assert!(container(&pod, "log-shipper").env.is_none());

    let pod_ref = &answer.outcome.pod;
    assert_eq!(pod_ref.name, None);
    assert_eq!(
        pod_ref.generate_name.as_deref(),
        Some("support-agent-7d9f8c6b5-")
    );
    assert_eq!(pod_ref.namespace, "agents");
    assert_eq!(pod_ref.controller.as_ref().unwrap().kind, "ReplicaSet");
}

fn assert_failed_but_allowed(answer: &Answer, reason: &str) {
    assert_eq!(answer.outcome.result, InjectionResult::Failed);
    assert_eq!(answer.recorded, vec![InjectionResult::Failed]);
    assert_eq!(
        answer.response["allowed"], true,
        "failurePolicy Ignore semantics"
    );
    assert!(!answer.has_patch());
    assert_eq!(
        answer.outcome.failure.as_ref().unwrap().event_reason(),
        reason
    );
    assert_eq!(answer.response["auditAnnotations"]["reason"], reason);
    assert!(
        answer
            .warnings()
            .iter()
            .any(|w| w.contains("sidecar not injected"))
    );
}

#[test]
fn host_network_pod_is_admitted_uninjected_with_a_reason() {
    let answer = send(&fixture("pod-create-host-network"));
    assert_failed_but_allowed(&answer, "KeybrakeHostNetworkUnsupported");
    assert_eq!(answer.outcome.pod.name.as_deref(), Some("host-net-agent"));
}

#[test]
fn invalid_vault_key_name_is_admitted_uninjected_with_a_reason() {
    let answer = send(&fixture("pod-create-bad-vault-key"));
    assert_failed_but_allowed(&answer, "KeybrakeInvalidVaultKeyAnnotation");
    assert_eq!(
        answer.outcome.failure,
        Some(InjectionFailure::InvalidVaultKeyName("Refund_Agent".into()))
    );
}

#[test]
fn unknown_agent_container_is_a_failure() {
    let mut review = fixture("pod-create-replicaset");
    review["request"]["object"]["metadata"]["annotations"]["keybrake.dev/agent-containers"] =
        "agent,ghost".into();
    let answer = send(&review);
    assert_failed_but_allowed(&answer, "KeybrakeInvalidAgentContainers");
}

#[test]
fn the_pod_can_set_the_sidecars_upstream_connection_cap() {
    let args_with = |value: Option<&str>| {
        let mut review = fixture("pod-create-opted-in");
        if let Some(value) = value {
            review["request"]["object"]["metadata"]["annotations"]["keybrake.dev/upstream-max-connections"] =
                value.into();
        }
        let answer = send(&review);
        assert_eq!(
            answer.outcome.result,
            InjectionResult::Injected,
            "{value:?}"
        );
        let pod = answer.typed_pod();
        let sidecar = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        sidecar.args.clone().unwrap()
    };
    let flag = |args: &[String]| {
        args.iter()
            .filter(|a| a.starts_with("--upstream-max-connections"))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        flag(&args_with(None)).is_empty(),
        "no annotation: the sidecar's default"
    );
    assert_eq!(
        flag(&args_with(Some("256"))),
        ["--upstream-max-connections=256"]
    );
    assert_eq!(
        flag(&args_with(Some("0"))),
        ["--upstream-max-connections=0"]
    );
}

#[test]
fn an_invalid_upstream_connection_cap_is_a_failure() {
    for bad in ["-1", "many", "1.5", "", "1000001"] {
        let mut review = fixture("pod-create-opted-in");
        review["request"]["object"]["metadata"]["annotations"]["keybrake.dev/upstream-max-connections"] =
            bad.into();
        let answer = send(&review);
        assert_failed_but_allowed(&answer, "KeybrakeInvalidUpstreamMaxConnections");
        assert_eq!(
            answer.outcome.failure,
            Some(InjectionFailure::InvalidUpstreamMaxConnections(bad.into()))
        );
    }
}

#[test]
fn a_container_on_a_sidecar_port_is_a_failure() {
    let mut review = fixture("pod-create-opted-in");
    review["request"]["object"]["spec"]["containers"][0]["ports"] =
        serde_json::json!([{"containerPort": 15020, "protocol": "TCP"}]);
    let answer = send(&review);
    assert_failed_but_allowed(&answer, "KeybrakePortConflict");
}

#[test]
fn dry_run_is_answered_and_flagged() {
    let answer = send(&fixture("pod-create-dry-run"));
    assert_eq!(answer.outcome.result, InjectionResult::Injected);
    assert!(answer.outcome.dry_run);
}

#[test]
fn only_pod_create_is_handled() {
    let mut review = fixture("pod-create-opted-in");
    review["request"]["operation"] = "UPDATE".into();
    review["request"]["oldObject"] = review["request"]["object"].clone();
    let answer = send(&review);
    assert_eq!(answer.outcome.result, InjectionResult::Ignored);
    assert!(!answer.has_patch());

    let mut review = fixture("pod-create-opted-in");
    review["request"]["kind"]["kind"] = "Service".into();
    let answer = send(&review);
    assert_eq!(answer.outcome.result, InjectionResult::Ignored);
}

#[test]
fn undecodable_body_is_counted_as_a_failure() {
    let recorded = RefCell::new(Vec::new());
    let hook = |r: InjectionResult| recorded.borrow_mut().push(r);
    let (bytes, outcome) = review_json(b"{not json", &config(), &hook);
    assert_eq!(outcome.result, InjectionResult::Failed);
    assert_eq!(*recorded.borrow(), vec![InjectionResult::Failed]);
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["response"]["allowed"], false);
}
