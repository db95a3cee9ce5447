//! The chart and the controller agree: the controller container's args (and env-backed flags)
//! in the chart's golden renders parse as `keybrake-controller` flags, and build an injection
//! config. Regenerate the goldens with `UPDATE_GOLDEN=1 scripts/test-chart.sh`.
use clap::Parser;
use keybrake_controller::app::Config;

fn controller_container(golden: &str) -> serde_yaml::Value {
    let path = format!(
        "{}/../charts/keybrake/tests/golden/{golden}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc = serde_yaml::Value::deserialize(doc).unwrap();
        let kind = doc["kind"].as_str().unwrap_or_default();
        if kind != "StatefulSet" && kind != "Deployment" {
            continue;
        }
        for container in doc["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap()
        {
            if container["name"] == "controller" {
                return container.clone();
            }
        }
    }
    panic!("no controller container in {path}");
}

use serde::Deserialize as _;

fn parse(golden: &str) -> Config {
    let container = controller_container(golden);
    let mut args = vec!["keybrake-controller".to_string()];
    for arg in container["args"].as_sequence().unwrap() {
        args.push(arg.as_str().unwrap().to_owned());
    }
    // Env-backed flags the chart sets from Secrets: pass them as the flag they feed.
    for env in container["env"].as_sequence().unwrap() {
        if env["name"] == "KEYBRAKE_AUDIT_SINK" {
            args.push("--audit-sink=postgres://user@db/keybrake".into());
        }
    }
    Config::try_parse_from(&args).unwrap_or_else(|e| panic!("{golden}: {args:?}: {e}"))
}

#[test]
fn default_render_parses() {
    let config = parse("default.yaml");
    assert_eq!(config.tls_secret.as_deref(), Some("keybrake-tls"));
    assert_eq!(
        config.webhook_configuration.as_deref(),
        Some("keybrake-sidecar-injector")
    );
    assert!(
        config
            .audit_sink
            .as_deref()
            .unwrap()
            .starts_with("sqlite:///")
    );
    let injection = config
        .injection
        .injection_config("keybrake-system", &config.ca_configmap)
        .unwrap()
        .expect("injection on");
    assert!(injection.excluded_namespaces.contains("keybrake-system"));
    assert_eq!(injection.staleness_bound.as_secs(), 30);
}

#[test]
fn production_render_parses() {
    let config = parse("production.yaml");
    assert!(config.tls_cert.is_some() && config.tls_ca.is_some());
    assert!(config.tls_secret.is_none());
    assert!(config.webhook_configuration.is_none());
    let injection = config
        .injection
        .injection_config("keybrake-system", &config.ca_configmap)
        .unwrap()
        .expect("injection on");
    assert_eq!(injection.image_pull_policy.as_deref(), Some("Always"));
    assert!(injection.excluded_namespaces.contains("istio-system"));
}
