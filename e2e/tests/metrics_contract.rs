//! The metric contract, checked on real processes (issue 6, point 4): a keybrake-sidecar and a
//! keybrake-controller are started from this workspace, driven until their labelled series exist,
//! scraped on their admin `/metrics`, and each scrape is compared with docs/metrics.md by
//! `keybrake_monitoring::exposition::check_scrape`. `make test-rules` already checks that the
//! rules and the dashboard use only what docs/metrics.md lists; this closes the loop to the code,
//! so a renamed metric or label fails here, naming both sides.
//!
//! A labelled counter is exported only once a label combination has been incremented, so every
//! documented metric is driven. The ones a test cannot reach are listed explicitly
//! ([`Unreachable`]) with the reason, and the test fails once they do appear, so the list
//! cannot go stale.
use std::{path::Path, time::Instant};

use base64::Engine as _;
use k8s_openapi::api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Pod};
use keybrake_api::TokenHash;
use keybrake_e2e::{
    fixtures::{self, SidecarProcess},
    processes::{ControllerTls, DEADLINE, free_port, poll},
};
use keybrake_monitoring::{
    Component, MetricsDoc,
    exposition::{self, ScrapeProblem, check_scrape},
};
use keybrake_testkit::{FakeKind, FakeVendor};
use kube::{Api, api::PostParams};
use serde_json::json;

/// The vendor secret the fake Stripe expects (held in the upstream Secret or the env).
const UPSTREAM_SECRET: &str = "sk_test_metrics_contract";
/// $12.50 in cents: a charge the sidecar prices before forwarding it.
const CHARGE_CENTS: u32 = 1250;

/// A documented metric the scenario cannot make the process export, and why.
struct Unreachable {
    name: &'static str,
    why: &'static str,
}

fn contract() -> MetricsDoc {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    MetricsDoc::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Fails, listing every difference, unless `scrape` is exactly what docs/metrics.md documents
/// for `component` (names, types, label names), apart from the `unreachable` metrics.
fn assert_matches_contract(
    component: Component,
    what: &str,
    scrape: &str,
    unreachable: &[Unreachable],
) {
    let problems = check_scrape(&contract(), component, scrape)
        .unwrap_or_else(|e| panic!("{what}: /metrics is not Prometheus text format: {e}"));
    let excused = |p: &ScrapeProblem| matches!(p, ScrapeProblem::Missing { name } if unreachable.iter().any(|u| u.name == name));
    let mut failures: Vec<String> = problems
        .iter()
        .filter(|p| !excused(p))
        .map(|p| format!("- {p}"))
        .collect();
    for u in unreachable {
        let still_missing = problems
            .iter()
            .any(|p| matches!(p, ScrapeProblem::Missing { name } if name == u.name));
        if !still_missing {
            failures.push(format!(
                "- `{}` is exported now: remove it from this test's unreachable list \
                 (it was excused because: {})",
                u.name, u.why
            ));
        }
    }
    let ours: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with(exposition::PREFIX) || l.starts_with("# TYPE keybrake_"))
        .collect();
    assert!(
        failures.is_empty(),
        "the {what}'s /metrics drifted from docs/metrics.md (the contract the rules and the \
         dashboard are checked against). Fix the code or, for a deliberate change, the page and \
         the rules together:\n{}\n\nits keybrake_ series:\n{}",
        failures.join("\n"),
        ours.join("\n")
    );
}

/// The value of the one sample `name{labels…}` (labels given must match; others are ignored).
fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let parsed = exposition::parse(scrape).expect("Prometheus text format");
    parsed
        .samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// An allowed, priced call (`charges.create`, USD): counts calls, cost and upstream latency.
async fn charge(sidecar: &SidecarProcess, vault_key: &str) -> (u16, String) {
    let form = format!("amount={CHARGE_CENTS}&currency=usd&customer=cus_1");
    fixtures::agent_form_call(sidecar.proxy, "/stripe/v1/charges", vault_key, &form).await
}

/// The three verdict paths every scenario drives: allowed (priced), denied by policy, unknown key.
async fn drive_calls(sidecar: &SidecarProcess, vault_key: &str) {
    let unknown = format!("vault_key_{}", "U".repeat(43));
    let outcomes = [
        (charge(sidecar, vault_key).await, (200, "allow")),
        (
            sidecar
                .call("GET", "/stripe/v1/customers/cus_1", vault_key)
                .await,
            (403, "operation_denied"),
        ),
        (charge(sidecar, &unknown).await, (401, "key_unknown")),
    ];
    for ((status, verdict), (want_status, want_verdict)) in outcomes {
        assert_eq!(
            (status, verdict.as_str()),
            (want_status, want_verdict),
            "sidecar log:\n{}",
            sidecar.log_text()
        );
    }
}

/// Scrapes until the allowed charge's cost is counted (it is, when the response body ends).
async fn scrape_after_cost(sidecar: &SidecarProcess, namespace: &str) -> String {
    poll("the charge's cost in /metrics", DEADLINE, || async move {
        let text = sidecar.metrics().await;
        sample(
            &text,
            "keybrake_cost_usd_total",
            &[("namespace", namespace), ("vault_key", "refunds")],
        )
        .is_some()
        .then_some(text)
    })
    .await
}

/// The labelled series carry the values the rules group by, not only the right names.
fn assert_key_series(scrape: &str, namespace: &str) {
    let key = [
        ("namespace", namespace),
        ("agent", "refunder"),
        ("vault_key", "refunds"),
        ("vendor", "stripe"),
    ];
    let with = |extra: (&'static str, &'static str)| {
        let mut labels = key.to_vec();
        labels.push(extra);
        labels
    };
    assert!(
        sample(scrape, "keybrake_calls_total", &with(("verdict", "allow")))
            .is_some_and(|v| v >= 1.0),
        "no allowed call counted for {namespace}/refunds:\n{scrape}"
    );
    assert_eq!(
        sample(
            scrape,
            "keybrake_calls_total",
            &with(("verdict", "operation_denied"))
        ),
        Some(1.0),
        "the denied call, counted once:\n{scrape}"
    );
    assert!(
        sample(
            scrape,
            "keybrake_calls_total",
            &[("verdict", "key_unknown")]
        )
        .is_some_and(|n| n >= 1.0),
        "the unknown key's call:\n{scrape}"
    );
    // The amount is the pricing code's business; here only that the charge was priced.
    let cost = sample(scrape, "keybrake_cost_usd_total", &key).expect("cost series");
    assert!(cost > 0.0, "the charge was priced at {cost}:\n{scrape}");
    assert!(
        sample(
            scrape,
            "keybrake_upstream_duration_seconds_count",
            &[("vendor", "stripe")]
        )
        .is_some_and(|n| n >= 1.0),
        "upstream latency observed for stripe:\n{scrape}"
    );
}

fn token_for(seed: char) -> String {
    format!("vault_key_{}", seed.to_string().repeat(43))
}

// ---------------------------------------------------------------------------------------------
// Tests

/// The failure this test exists for reads well: a renamed label and a renamed metric are named,
/// and an excuse that no longer applies is called out.
#[test]
fn drift_fails_naming_both_sides() {
    let message = |scrape: &'static str, unreachable: &'static [Unreachable]| {
        let panic = std::panic::catch_unwind(|| {
            assert_matches_contract(Component::Sidecar, "sidecar", scrape, unreachable)
        })
        .expect_err("a drifted scrape must fail");
        panic.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    let drifted = message(
        "# TYPE keybrake_calls_total counter\n\
         keybrake_calls_total{namespace=\"n\",agent=\"a\",key=\"k\",vendor=\"stripe\",verdict=\"allow\"} 1\n\
         # TYPE keybrake_calls_count counter\nkeybrake_calls_count 1\n",
        &[],
    );
    for expected in [
        "drifted from docs/metrics.md",
        "`keybrake_calls_total` has labels",
        "`keybrake_calls_count` is exported but not in docs/metrics.md",
        "`keybrake_cost_usd_total` is documented but not exported",
    ] {
        assert!(
            drifted.contains(expected),
            "{expected:?} not in:\n{drifted}"
        );
    }
    static STALE: [Unreachable; 1] = [Unreachable {
        name: "keybrake_audit_dropped_rows_total",
        why: "example",
    }];
    let stale = message(
        "# TYPE keybrake_audit_dropped_rows_total counter\nkeybrake_audit_dropped_rows_total 0\n",
        &STALE,
    );
    assert!(
        stale.contains("`keybrake_audit_dropped_rows_total` is exported now: remove it"),
        "{stale}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_sidecar_metrics_match_the_contract() {
    let started = Instant::now();
    let upstream = FakeVendor::start(FakeKind::Stripe, UPSTREAM_SECRET)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = token_for('S');
    let config = dir.path().join("keybrake.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:\n  stripe: {{vendor: stripe, baseUrl: \"{}\", secretEnv: CONTRACT_STRIPE_SECRET}}\n\
             keys:\n  - name: refunds\n    tokenSha256: {}\n    upstream: stripe\n    \
             agent: {{name: refunder}}\n    allow: [{{operation: charges.create}}]\n",
            upstream.url(),
            TokenHash::of(&token).to_hex()
        ),
    )
    .unwrap();
    let config_arg = format!("--config={}", config.display());
    let sidecar = SidecarProcess::spawn_with_env(
        dir.path(),
        &[&config_arg],
        &[("CONTRACT_STRIPE_SECRET", UPSTREAM_SECRET)],
    )
    .await;

    drive_calls(&sidecar, &token).await;
    let scrape = scrape_after_cost(&sidecar, "standalone").await;
    assert_key_series(&scrape, "standalone");
    assert_matches_contract(
        Component::Sidecar,
        "standalone sidecar",
        &scrape,
        &[Unreachable {
            name: "keybrake_stale_allowed_calls_total",
            why: "a standalone policy is a local file and never stale, so onStale: Allow never \
                  applies; the controller-mode test below exports it",
        }],
    );
    assert_eq!(
        upstream.request_count(),
        1,
        "only the allowed call reached Stripe"
    );
    eprintln!(
        "METRICS_CONTRACT standalone sidecar: ok in {} ms",
        started.elapsed().as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_and_controller_mode_sidecar_metrics_match_the_contract() {
    let started = Instant::now();
    let ns = fixtures::namespace_with_crds("metrics-contract").await;
    let upstream = FakeVendor::start(FakeKind::Stripe, UPSTREAM_SECRET)
        .await
        .unwrap();
    fixtures::put_upstream_secret(&ns, fixtures::UPSTREAM_SECRET, UPSTREAM_SECRET).await;
    let tls = ControllerTls::new();
    let webhook_port = free_port();
    let webhook_addr = format!("--webhook-addr=127.0.0.1:{webhook_port}");
    let mut controller = fixtures::ready_controller(
        &ns,
        &tls,
        "contract-a",
        free_port(),
        &[
            "--sidecar-image=ghcr.io/keybrake/sidecar:e2e",
            "--controller-url=https://keybrake-controller.keybrake-system.svc:8443",
            &webhook_addr,
        ],
    )
    .await;
    // The injection webhook, registered by URL for this namespace only (the plane is shared);
    // one Pod admitted through it makes `keybrake_webhook_injections_total{result}` exist.
    let configurations = Api::<MutatingWebhookConfiguration>::all(ns.client());
    let configuration: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": format!("keybrake-metrics-contract-{}", ns.name())},
        "webhooks": [{
            "name": "inject.keybrake.dev",
            "clientConfig": {
                "url": format!("https://127.0.0.1:{webhook_port}/inject"),
                "caBundle": base64::engine::general_purpose::STANDARD
                    .encode(std::fs::read(tls.ca()).expect("CA")),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name()}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
        }],
    }))
    .expect("MutatingWebhookConfiguration");
    configurations
        .create(&PostParams::default(), &configuration)
        .await
        .expect("register the injection webhook");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "not-opted-in"},
        "spec": {"serviceAccountName": "default",
                 "containers": [{"name": "agent", "image": "python:3.13-slim"}]},
    }))
    .unwrap();
    // failurePolicy Fail: admitted only if the controller's webhook answered.
    ns.api::<Pod>()
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "pod not admitted through the webhook: {e}; controller log:\n{}",
                controller.log_text()
            )
        });
    configurations
        .delete(
            configuration.metadata.name.as_deref().unwrap(),
            &Default::default(),
        )
        .await
        .expect("unregister the webhook");

    let key = fixtures::stripe_vault_key(
        "refunds",
        "agent",
        &upstream.url(),
        json!({
            "agent": {"name": "refunder"},
            "allow": [{"operation": "charges.create"}],
            "onStale": "Allow",
        }),
    );
    fixtures::create_key(&ns, &key).await;
    let minted = fixtures::minted_token(&ns, "refunds").await;

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, fixtures::sa_token(&ns, "agent").await).unwrap();
    let sidecar = SidecarProcess::controller_mode(
        dir.path(),
        &controller.stream_url,
        &tls.ca(),
        &token_file,
        &["--staleness-bound=1s"],
    )
    .await;
    // Until the first snapshot arrives the sidecar refuses; then the key is enforced.
    poll(
        "the key allowed through the controller-mode sidecar",
        DEADLINE,
        || {
            let sidecar = &sidecar;
            let minted = &minted;
            async move { (charge(sidecar, minted).await.1 == "allow").then_some(()) }
        },
    )
    .await;
    drive_calls(&sidecar, &minted).await;

    let controller_scrape = poll(
        "a connected stream in the controller's /metrics",
        DEADLINE,
        || {
            let controller = &controller;
            async move {
                let text = controller.metrics().await;
                // Exported at 0 for every kind from start-up. (A VaultKey name too long for
                // its token Secret used to force a real failure here; the CRD refuses those now.)
                let failed =
                    sample(&text, "keybrake_controller_reconcile_errors_total", &[]).is_some();
                let streams = sample(&text, "keybrake_controller_streams_connected", &[]);
                (failed && streams == Some(1.0)).then_some(text)
            }
        },
    )
    .await;
    assert!(
        sample(
            &controller_scrape,
            "keybrake_controller_reconciles_total",
            &[("result", "ok")]
        )
        .is_some_and(|n| n >= 1.0),
        "refunds reconciled ok:\n{controller_scrape}"
    );
    assert_eq!(
        sample(&controller_scrape, "keybrake_controller_leader", &[]),
        Some(1.0),
        "the only replica leads"
    );
    // Which result (`excluded_namespace` here: the Pod is in the controller's own namespace)
    // is the injector's business; that the one review was counted is the contract's.
    let reviews: f64 = exposition::parse(&controller_scrape)
        .expect("Prometheus text format")
        .samples
        .iter()
        .filter(|s| s.name == "keybrake_webhook_injections_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(
        reviews, 1.0,
        "the one Pod, reviewed once:\n{controller_scrape}"
    );
    assert_matches_contract(Component::Controller, "controller", &controller_scrape, &[]);

    // The controller goes away: after --staleness-bound the policy is stale and the key's
    // onStale: Allow lets calls through, metered by keybrake_stale_allowed_calls_total.
    controller.kill();
    let ns_name = ns.name();
    poll("a call allowed on a stale policy", DEADLINE, || {
        let sidecar = &sidecar;
        let minted = &minted;
        async move {
            let (status, verdict) = charge(sidecar, minted).await;
            assert_eq!((status, verdict.as_str()), (200, "allow"), "onStale: Allow");
            let text = sidecar.metrics().await;
            sample(
                &text,
                "keybrake_stale_allowed_calls_total",
                &[("namespace", ns_name), ("vault_key", "refunds")],
            )
            .is_some_and(|n| n >= 1.0)
            .then_some(())
        }
    })
    .await;
    let sidecar_scrape = scrape_after_cost(&sidecar, ns_name).await;
    assert_key_series(&sidecar_scrape, ns_name);
    assert!(
        sample(&sidecar_scrape, "keybrake_policy_staleness_seconds", &[]).is_some_and(|s| s >= 1.0),
        "staleness shows the lost stream:\n{sidecar_scrape}"
    );
    assert_matches_contract(
        Component::Sidecar,
        "controller-mode sidecar",
        &sidecar_scrape,
        &[],
    );
    eprintln!(
        "METRICS_CONTRACT controller + controller-mode sidecar: ok in {} ms",
        started.elapsed().as_millis()
    );
}
