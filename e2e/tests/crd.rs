//! The VaultKey CRD against a real kube-apiserver: it installs, valid keys are accepted and shown
//! with their printer columns, and the apiserver itself (structural schema + CEL) refuses every
//! malformed or forbidden key with a message a person understands.
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use keybrake_api::{KeyState, Phase, VaultKey};
use keybrake_e2e::{CommandOutput, TestNamespace, install_crds, run, run_with_stdin};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject};
use serde_json::{Value, json};

const CRD_NAME: &str = "vaultkeys.keybrake.dev";

/// A fresh namespace with the CRDs installed.
async fn namespace(prefix: &str) -> TestNamespace<'static> {
    let ns = TestNamespace::new(prefix).await;
    install_crds(&ns.client())
        .await
        .unwrap_or_else(|e| panic!("installing crds/: {e}"));
    ns
}

/// The VaultKey from DESIGN.md.
fn design_example(name: &str) -> Value {
    json!({
        "apiVersion": "keybrake.dev/v1alpha1",
        "kind": "VaultKey",
        "metadata": {"name": name},
        "spec": {
            "vendor": "stripe",
            "upstream": {
                "secretRef": {"name": "stripe-live", "key": "api-key"},
                "baseUrl": "https://api.stripe.com"
            },
            "state": "Active",
            "expiresAt": "2026-11-30T03:00:00Z",
            "agent": {"name": "refund-agent", "runId": "run-42"},
            "workload": {"serviceAccountName": "refund-agent"},
            "allow": [
                {"operation": "refunds.create"},
                {"method": "GET", "path": "/v1/customers/{id}"}
            ],
            "customers": ["cus_123"],
            "limits": {"dailyUsdCap": "250.00", "perCallUsdMax": "50.00", "callsPerMinute": 120},
            "onStale": "Deny"
        }
    })
}

fn with(mut key: Value, pointer: &str, value: Value) -> Value {
    *key.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("no {pointer} in the example")) = value;
    key
}

fn without(mut key: Value, parent: &str, field: &str) -> Value {
    key.pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("no {parent} in the example"))
        .remove(field);
    key
}

fn kubectl_create(ns: &TestNamespace<'_>, key: &Value) -> CommandOutput {
    run_with_stdin(ns.kubectl().args(["create", "-f", "-"]), &key.to_string())
}

/// Creating `key` must fail, the apiserver's answer must carry `message`, and nothing is stored.
#[track_caller]
fn assert_refused(ns: &TestNamespace<'_>, key: &Value, message: &str) {
    let out = kubectl_create(ns, key).expect_failure();
    assert!(
        out.stderr.contains(message),
        "refusal of {key} lacks {message:?}: {out}"
    );
    assert!(
        out.stderr.contains("is invalid"),
        "not a validation refusal: {out}"
    );
    let name = key["metadata"]["name"].as_str().expect("name");
    let get = run(ns.kubectl().args(["get", "vk", name])).expect_failure();
    assert!(get.stderr.contains("NotFound"), "{get}");
}

#[tokio::test]
async fn crd_installs_and_becomes_established() {
    let ns = TestNamespace::new("crd-established").await;
    let names = install_crds(&ns.client()).await.expect("install crds/");
    assert_eq!(names, vec![CRD_NAME.to_string()]);

    let crd = Api::<CustomResourceDefinition>::all(ns.client())
        .get(CRD_NAME)
        .await
        .expect("CRD stored");
    let established = crd
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .any(|c| c.type_ == "Established" && c.status == "True");
    assert!(established, "CRD not Established");
    assert_eq!(crd.spec.names.short_names, Some(vec!["vk".to_string()]));
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(
        version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some(),
        "status is not a subresource"
    );

    // Discovery serves it: the short name resolves and the namespace starts empty.
    let out = run(ns.kubectl().args(["get", "vk", "-o", "name"])).expect_success();
    assert_eq!(out.stdout.trim(), "", "{out}");
}

#[tokio::test]
async fn design_example_is_accepted_and_shown_with_printer_columns() {
    let ns = namespace("crd-valid").await;
    let key = design_example("refund-agent-run-42");
    run_with_stdin(ns.kubectl().args(["apply", "-f", "-"]), &key.to_string()).expect_success();

    let keys: Api<VaultKey> = ns.api();
    let stored = keys.get("refund-agent-run-42").await.expect("typed read");
    assert_eq!(stored.spec.state, KeyState::Active);
    assert_eq!(
        stored.spec.limits.daily_usd_cap,
        Some("250".parse().unwrap())
    );
    assert_eq!(stored.spec.allow.len(), 2);

    // What the controller will write, through the status subresource.
    let status = json!({"status": {
        "phase": "Active",
        "spentTodayUsd": "37.50",
        "enforcement": {"sidecars": 12, "acknowledged": 12, "lastPropagationMs": 41, "summary": "12/12"}
    }});
    let patched = keys
        .patch_status(
            "refund-agent-run-42",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .expect("status patch");
    assert_eq!(patched.status.and_then(|s| s.phase), Some(Phase::Active));

    let out = run(ns.kubectl().args(["get", "vk"])).expect_success();
    let lines: Vec<Vec<&str>> = out.stdout.lines().map(columns).collect();
    assert_eq!(
        lines[0],
        [
            "NAME",
            "PHASE",
            "VENDOR",
            "AGENT",
            "SPENT TODAY",
            "ENFORCED",
            "AGE"
        ],
        "{out}"
    );
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(
        lines[1][..6],
        [
            "refund-agent-run-42",
            "Active",
            "stripe",
            "refund-agent",
            "37.50",
            "12/12"
        ],
        "{out}"
    );

    // The long name and -A work as a user would type them.
    let all = run(ns
        .plane()
        .kubectl()
        .args(["get", "vaultkeys.keybrake.dev", "-A"]))
    .expect_success();
    assert!(
        all.stdout
            .lines()
            .any(|l| l.starts_with(ns.name()) && l.contains("refund-agent-run-42")),
        "{all}"
    );
}

#[tokio::test]
async fn status_money_is_validated_too() {
    let ns = namespace("crd-status").await;
    let keys: Api<VaultKey> = ns.api();
    let key: VaultKey = serde_json::from_value(design_example("status-check")).unwrap();
    keys.create(&PostParams::default(), &key)
        .await
        .expect("create");
    let bad = json!({"status": {"spentTodayUsd": "-1.00"}});
    let err = keys
        .patch_status("status-check", &PatchParams::default(), &Patch::Merge(&bad))
        .await
        .expect_err("negative spend refused");
    assert!(
        err.to_string()
            .contains("must be a non-negative decimal amount"),
        "{err}"
    );
}

#[tokio::test]
async fn revoked_key_cannot_be_reactivated() {
    let ns = namespace("crd-revoked").await;
    run_with_stdin(
        ns.kubectl().args(["apply", "-f", "-"]),
        &design_example("run-7").to_string(),
    )
    .expect_success();
    let patch = |state: &str| {
        run(ns.kubectl().args([
            "patch",
            "vaultkey",
            "run-7",
            "--type",
            "merge",
            "-p",
            &json!({"spec": {"state": state}}).to_string(),
        ]))
    };
    // Suspending and resuming is fine; revoking is the 2am move.
    patch("Suspended").expect_success();
    patch("Active").expect_success();
    patch("Revoked").expect_success();

    for state in ["Active", "Suspended"] {
        let out = patch(state).expect_failure();
        assert!(
            out.stderr.contains(
                "a Revoked VaultKey stays Revoked: revocation is final, issue a new VaultKey instead"
            ),
            "{out}"
        );
    }
    let keys: Api<VaultKey> = ns.api();
    assert_eq!(
        keys.get("run-7").await.unwrap().spec.state,
        KeyState::Revoked
    );
    // Re-applying Revoked (no transition) stays allowed, so GitOps re-syncs do not break.
    patch("Revoked").expect_success();
}

#[tokio::test]
async fn expires_at_and_ttl_together_are_refused() {
    let ns = namespace("crd-expiry").await;
    let both = with(
        design_example("both"),
        "/spec/expiresAt",
        json!("2026-12-01T00:00:00Z"),
    );
    let both = {
        let mut k = both;
        k["spec"]["ttl"] = json!("30m");
        k
    };
    assert_refused(&ns, &both, "set either expiresAt or ttl, not both");

    // Either one alone is fine; a malformed ttl is refused with its own message.
    let ttl_only = {
        let mut k = without(design_example("ttl-only"), "/spec", "expiresAt");
        k["spec"]["ttl"] = json!("1h30m");
        k
    };
    kubectl_create(&ns, &ttl_only).expect_success();
    let bad_ttl = with(ttl_only.clone(), "/metadata/name", json!("bad-ttl"));
    let bad_ttl = with(bad_ttl, "/spec/ttl", json!("30 minutes"));
    assert_refused(&ns, &bad_ttl, "ttl must be a duration such as");
}

#[tokio::test]
async fn negative_or_malformed_money_is_refused() {
    let ns = namespace("crd-money").await;
    let cases = [
        ("neg-cap", "/spec/limits/dailyUsdCap", json!("-5.00")),
        ("neg-per-call", "/spec/limits/perCallUsdMax", json!("-0.01")),
        ("words", "/spec/limits/dailyUsdCap", json!("ten dollars")),
        ("two-dots", "/spec/limits/dailyUsdCap", json!("12.3.4")),
        ("exponent", "/spec/limits/perCallUsdMax", json!("1e3")),
        (
            "too-precise",
            "/spec/limits/dailyUsdCap",
            json!("1.1234567"),
        ),
    ];
    for (name, pointer, value) in cases {
        let key = with(design_example(name), pointer, value);
        assert_refused(
            &ns,
            &key,
            "must be a non-negative decimal amount in US dollars such as \"250.00\"",
        );
    }
    // Money is a string, never a float.
    let float = with(
        design_example("float"),
        "/spec/limits/dailyUsdCap",
        json!(250.5),
    );
    assert_refused(&ns, &float, "must be of type string");

    // A Rust client gets the same message (typed `Usd` cannot even hold -1, so send raw JSON).
    let api = Api::<DynamicObject>::namespaced_with(
        ns.client(),
        ns.name(),
        &ApiResource::erase::<VaultKey>(&()),
    );
    let raw = with(
        design_example("typed"),
        "/spec/limits/dailyUsdCap",
        json!("-1"),
    );
    let err = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(raw).unwrap(),
        )
        .await
        .expect_err("negative cap refused for a Rust client too");
    assert!(
        err.to_string()
            .contains("must be a non-negative decimal amount"),
        "{err}"
    );
}

#[tokio::test]
async fn custom_vendor_needs_base_url() {
    let ns = namespace("crd-custom").await;
    let custom = with(
        design_example("custom-no-url"),
        "/spec/vendor",
        json!("custom"),
    );
    let custom = without(custom, "/spec/upstream", "baseUrl");
    assert_refused(
        &ns,
        &custom,
        "vendor custom has no default upstream: set upstream.baseUrl",
    );
    let empty = with(custom.clone(), "/metadata/name", json!("custom-empty-url"));
    let empty = {
        let mut k = empty;
        k["spec"]["upstream"]["baseUrl"] = json!("");
        k
    };
    assert_refused(&ns, &empty, "baseUrl must be an http(s) URL");

    // With a base URL it is accepted; known vendors need none (they have defaults).
    let with_url = with(custom, "/metadata/name", json!("custom-with-url"));
    let with_url = {
        let mut k = with_url;
        k["spec"]["upstream"]["baseUrl"] = json!("https://api.postmarkapp.com");
        k
    };
    kubectl_create(&ns, &with_url).expect_success();
    let stripe_default = without(
        design_example("stripe-default"),
        "/spec/upstream",
        "baseUrl",
    );
    kubectl_create(&ns, &stripe_default).expect_success();
    let bad_url = with(
        design_example("bad-url"),
        "/spec/upstream/baseUrl",
        json!("https://user:pw@api.stripe.com"),
    );
    assert_refused(&ns, &bad_url, "baseUrl must be an http(s) URL");
}

#[tokio::test]
async fn a_name_without_room_for_its_token_secret_is_refused() {
    let ns = namespace("crd-name").await;
    let longest = "k".repeat(keybrake_api::crd::MAX_NAME_LEN);
    assert_eq!(keybrake_api::policy::token_secret_name(&longest).len(), 253);
    let too_long = format!("{longest}k");
    assert_refused(
        &ns,
        &design_example(&too_long),
        "a VaultKey name is at most 247 characters: its token Secret is named <name>-token",
    );
    // The longest allowed name is accepted (its `<name>-token` is exactly 253).
    kubectl_create(&ns, &design_example(&longest)).expect_success();
}

#[tokio::test]
async fn unknown_vendor_is_refused() {
    let ns = namespace("crd-vendor").await;
    let key = with(design_example("shopify"), "/spec/vendor", json!("shopify"));
    assert_refused(&ns, &key, "Unsupported value: \"shopify\"");
    let out = kubectl_create(&ns, &key);
    assert!(
        out.stderr.contains("\"custom\""),
        "the refusal should list the supported vendors: {out}"
    );
}

#[tokio::test]
async fn allow_entry_must_be_an_operation_or_method_and_path() {
    let ns = namespace("crd-allow").await;
    let message = "an allow entry is either {operation: NAME} or {method: METHOD, path: /TEMPLATE}, not a mix and not empty";
    let cases = [
        ("empty", json!({})),
        (
            "mixed",
            json!({"operation": "refunds.create", "method": "POST", "path": "/v1/refunds"}),
        ),
        ("method-only", json!({"method": "GET"})),
        ("path-only", json!({"path": "/v1/charges"})),
    ];
    for (name, entry) in cases {
        let key = with(design_example(name), "/spec/allow", json!([entry]));
        assert_refused(&ns, &key, message);
    }
    let bad_operation = with(
        design_example("bad-op"),
        "/spec/allow",
        json!([{"operation": "Refunds Create"}]),
    );
    assert_refused(
        &ns,
        &bad_operation,
        "operation must be a catalogue name such as refunds.create",
    );
    let bad_path = with(
        design_example("bad-path"),
        "/spec/allow",
        json!([{"method": "GET", "path": "v1/customers/*"}]),
    );
    assert_refused(
        &ns,
        &bad_path,
        "path must be an absolute template such as /v1/customers/{id}",
    );
    let bad_method = with(
        design_example("bad-method"),
        "/spec/allow",
        json!([{"method": "TRACE", "path": "/v1/x"}]),
    );
    assert_refused(&ns, &bad_method, "Unsupported value: \"TRACE\"");
    // An empty allowlist is valid (it denies every call).
    let deny_all = with(design_example("deny-all"), "/spec/allow", json!([]));
    kubectl_create(&ns, &deny_all).expect_success();
}

/// Splits a `kubectl get` table line on runs of two or more spaces ("SPENT TODAY" is one column).
fn columns(line: &str) -> Vec<&str> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}
