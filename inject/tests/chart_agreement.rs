//! The chart renders the MutatingWebhookConfiguration in YAML; this crate renders it in Rust
//! (controller, tests). The two must agree: compare this crate's output with the chart's golden
//! `helm template` output (charts/keybrake/tests/golden, kept current by scripts/test-chart.sh).
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use keybrake_inject::mutating_webhook_configuration;
use keybrake_inject::webhook_config::{FailurePolicy, WebhookEndpoint, WebhookSettings};
use serde::Deserialize;

fn chart_webhook_configuration(golden: &str) -> MutatingWebhookConfiguration {
    let path = format!(
        "{}/../charts/keybrake/tests/golden/{golden}.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
        .find(|doc| doc["kind"] == "MutatingWebhookConfiguration")
        .map(|doc| serde_yaml::from_value(doc).unwrap())
        .unwrap_or_else(|| panic!("{path} has no MutatingWebhookConfiguration"))
}

fn settings(release: &str) -> WebhookSettings {
    WebhookSettings::new(
        WebhookEndpoint::Service {
            namespace: "keybrake-system".into(),
            name: format!("{release}-webhook"),
            port: 443,
        },
        "keybrake-system",
    )
}

#[test]
fn default_values_render_the_same_webhook() {
    let chart = chart_webhook_configuration("default");
    let ours = mutating_webhook_configuration(&settings("keybrake"));
    assert_eq!(chart.webhooks, ours.webhooks);
    assert_eq!(chart.metadata.name, ours.metadata.name);
}

#[test]
fn production_values_render_the_same_webhook() {
    let chart = chart_webhook_configuration("production");
    let mut settings = settings("keybrake");
    settings.label_opt_in_only = true;
    settings.failure_policy = FailurePolicy::Ignore;
    settings.excluded_namespaces = ["istio-system".into(), "monitoring".into()].into();
    let ours = mutating_webhook_configuration(&settings);
    assert_eq!(chart.webhooks, ours.webhooks);
}
