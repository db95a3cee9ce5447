//! The MutatingWebhookConfiguration that sends Pod CREATEs to the injector. The chart renders
//! the same object (see charts/keybrake/templates/webhook.yaml); the controller uses this to write
//! the caBundle, and tests use it to register a local webhook by URL.
use std::collections::BTreeSet;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};

use crate::names;

/// Path the controller serves the webhook on (port 9443).
pub const WEBHOOK_PATH: &str = "/inject";
/// `metadata.name` of the MutatingWebhookConfiguration.
pub const CONFIGURATION_NAME: &str = "keybrake-sidecar-injector";
/// `webhooks[].name`.
pub const WEBHOOK_NAME: &str = "inject.keybrake.dev";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookEndpoint {
    /// In-cluster: the controller's webhook Service.
    Service {
        namespace: String,
        name: String,
        port: i32,
    },
    /// Out-of-cluster (tests): a full `https://` URL including the path.
    Url(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Default: a down webhook never blocks pod creation anywhere in the cluster.
    Ignore,
    /// Opted-in pods are refused while the webhook is down (use with `label_opt_in_only`).
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookSettings {
    pub endpoint: WebhookEndpoint,
    /// PEM of the CA that signed the webhook's serving certificate. `None` leaves it for the
    /// controller (or cert-manager's CA injector) to fill in.
    pub ca_bundle: Option<Vec<u8>>,
    /// The controller's namespace: never injected.
    pub controller_namespace: String,
    /// More namespaces to keep out, besides kube-system and the controller's.
    pub excluded_namespaces: BTreeSet<String>,
    pub failure_policy: FailurePolicy,
    pub timeout_seconds: i32,
    /// Only pods *labelled* `keybrake.dev/inject: "true"` reach the webhook. Cheaper on big
    /// clusters (other pods never wait on it); without it the annotation alone opts in.
    pub label_opt_in_only: bool,
}

impl WebhookSettings {
    pub fn new(endpoint: WebhookEndpoint, controller_namespace: impl Into<String>) -> Self {
        WebhookSettings {
            endpoint,
            ca_bundle: None,
            controller_namespace: controller_namespace.into(),
            excluded_namespaces: BTreeSet::new(),
            failure_policy: FailurePolicy::Ignore,
            timeout_seconds: 3,
            label_opt_in_only: false,
        }
    }
}

fn requirement(key: &str, operator: &str, values: Option<Vec<String>>) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.into(),
        operator: operator.into(),
        values,
    }
}

pub fn mutating_webhook_configuration(settings: &WebhookSettings) -> MutatingWebhookConfiguration {
    let client_config = WebhookClientConfig {
        ca_bundle: settings.ca_bundle.clone().map(ByteString),
        service: match &settings.endpoint {
            WebhookEndpoint::Service {
                namespace,
                name,
                port,
            } => Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some(WEBHOOK_PATH.into()),
                port: Some(*port),
            }),
            WebhookEndpoint::Url(_) => None,
        },
        url: match &settings.endpoint {
            WebhookEndpoint::Url(url) => Some(url.clone()),
            WebhookEndpoint::Service { .. } => None,
        },
    };

    let mut excluded: BTreeSet<String> = settings.excluded_namespaces.clone();
    excluded.insert("kube-system".into());
    excluded.insert(settings.controller_namespace.clone());
    let namespace_selector = LabelSelector {
        match_expressions: Some(vec![
            requirement(
                "kubernetes.io/metadata.name",
                "NotIn",
                Some(excluded.into_iter().collect()),
            ),
            requirement(
                names::NAMESPACE_OPT_OUT_LABEL,
                "NotIn",
                Some(vec![names::NAMESPACE_OPT_OUT_VALUE.into()]),
            ),
        ]),
        match_labels: None,
    };
    // A pod carrying the injector's own label has been injected already (a re-applied manifest
    // of a live pod): keep it away from the webhook.
    let mut object_expressions = vec![requirement(names::SIDECAR_LABEL, "DoesNotExist", None)];
    if settings.label_opt_in_only {
        object_expressions.push(requirement(names::INJECT, "In", Some(vec!["true".into()])));
    }

    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(CONFIGURATION_NAME.into()),
            labels: Some([("app.kubernetes.io/name".to_string(), "keybrake".to_string())].into()),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: WEBHOOK_NAME.into(),
            admission_review_versions: vec!["v1".into()],
            client_config,
            failure_policy: Some(
                match settings.failure_policy {
                    FailurePolicy::Ignore => "Ignore",
                    FailurePolicy::Fail => "Fail",
                }
                .into(),
            ),
            match_policy: Some("Equivalent".into()),
            namespace_selector: Some(namespace_selector),
            object_selector: Some(LabelSelector {
                match_expressions: Some(object_expressions),
                match_labels: None,
            }),
            reinvocation_policy: Some("Never".into()),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            side_effects: "None".into(),
            timeout_seconds: Some(settings.timeout_seconds),
            match_conditions: None,
        }]),
    }
}

/// The JSON patch that sets (or replaces) the caBundle of the configuration rendered above, for
/// the controller to apply after generating or rotating its serving CA:
/// `Api::<MutatingWebhookConfiguration>::all(c).patch(CONFIGURATION_NAME, &pp, &Patch::Json(..))`.
/// A `test` op first makes the patch fail rather than touch a different webhook at index 0.
pub fn ca_bundle_patch(ca_pem: &[u8]) -> json_patch::Patch {
    use json_patch::jsonptr::PointerBuf;
    use json_patch::{AddOperation, PatchOperation, TestOperation};
    let webhook = |field: &str| PointerBuf::from_tokens(["webhooks", "0", field]);
    json_patch::Patch(vec![
        PatchOperation::Test(TestOperation {
            path: webhook("name"),
            value: serde_json::Value::String(WEBHOOK_NAME.into()),
        }),
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["webhooks", "0", "clientConfig", "caBundle"]),
            value: serde_json::to_value(ByteString(ca_pem.to_vec()))
                .unwrap_or(serde_json::Value::Null),
        }),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_bundle_patch_sets_the_bundle_and_guards_the_webhook_name() {
        let settings = WebhookSettings::new(
            WebhookEndpoint::Url("https://127.0.0.1:9443/inject".into()),
            "keybrake-system",
        );
        let mut doc = serde_json::to_value(mutating_webhook_configuration(&settings)).unwrap();
        json_patch::patch(&mut doc, &ca_bundle_patch(b"PEM")).unwrap();
        let patched: MutatingWebhookConfiguration = serde_json::from_value(doc.clone()).unwrap();
        assert_eq!(
            patched.webhooks.unwrap()[0].client_config.ca_bundle,
            Some(ByteString(b"PEM".to_vec()))
        );
        // Rotation: applying again replaces the bundle.
        json_patch::patch(&mut doc, &ca_bundle_patch(b"NEW")).unwrap();
        assert_eq!(doc["webhooks"][0]["clientConfig"]["caBundle"], "TkVX");
        // A different webhook at index 0: refused.
        doc["webhooks"][0]["name"] = "other.example.com".into();
        assert!(json_patch::patch(&mut doc, &ca_bundle_patch(b"PEM")).is_err());
    }

    fn by_service() -> WebhookSettings {
        WebhookSettings::new(
            WebhookEndpoint::Service {
                namespace: "keybrake-system".into(),
                name: "keybrake-webhook".into(),
                port: 443,
            },
            "keybrake-system",
        )
    }

    #[test]
    fn pods_create_only_side_effect_free_and_ignored_on_failure() {
        let config = mutating_webhook_configuration(&by_service());
        let hook = &config.webhooks.unwrap()[0];
        let rule = &hook.rules.as_ref().unwrap()[0];
        assert_eq!(rule.operations, Some(vec!["CREATE".to_string()]));
        assert_eq!(rule.resources, Some(vec!["pods".to_string()]));
        assert_eq!(rule.api_groups, Some(vec![String::new()]));
        assert_eq!(hook.side_effects, "None");
        assert_eq!(hook.failure_policy.as_deref(), Some("Ignore"));
        assert!(hook.timeout_seconds.unwrap() <= 5);
        let service = hook.client_config.service.as_ref().unwrap();
        assert_eq!(service.path.as_deref(), Some(WEBHOOK_PATH));
        assert!(hook.client_config.url.is_none());
    }

    #[test]
    fn excludes_kube_system_and_own_namespace() {
        let mut settings = by_service();
        settings.excluded_namespaces.insert("istio-system".into());
        let config = mutating_webhook_configuration(&settings);
        let hook = &config.webhooks.unwrap()[0];
        let expressions = hook
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_expressions
            .clone()
            .unwrap();
        let names = &expressions[0];
        assert_eq!(names.key, "kubernetes.io/metadata.name");
        assert_eq!(names.operator, "NotIn");
        assert_eq!(
            names.values.clone().unwrap(),
            vec!["istio-system", "keybrake-system", "kube-system"]
        );
    }

    #[test]
    fn url_endpoint_carries_the_ca_bundle() {
        let mut settings = WebhookSettings::new(
            WebhookEndpoint::Url("https://127.0.0.1:9443/inject".into()),
            "keybrake-system",
        );
        settings.ca_bundle = Some(b"-----BEGIN CERTIFICATE-----\n".to_vec());
        let config = mutating_webhook_configuration(&settings);
        let client = &config.webhooks.unwrap()[0].client_config;
        assert_eq!(client.url.as_deref(), Some("https://127.0.0.1:9443/inject"));
        assert!(client.service.is_none());
        assert!(
            client
                .ca_bundle
                .as_ref()
                .unwrap()
                .0
                .starts_with(b"-----BEGIN")
        );
    }

    #[test]
    fn label_opt_in_narrows_the_object_selector() {
        let mut settings = by_service();
        let default = mutating_webhook_configuration(&settings).webhooks.unwrap()[0]
            .object_selector
            .clone()
            .unwrap()
            .match_expressions
            .unwrap();
        assert_eq!(default.len(), 1);
        settings.label_opt_in_only = true;
        let narrowed = mutating_webhook_configuration(&settings).webhooks.unwrap()[0]
            .object_selector
            .clone()
            .unwrap()
            .match_expressions
            .unwrap();
        assert!(
            narrowed
                .iter()
                .any(|r| r.key == "keybrake.dev/inject" && r.operator == "In")
        );
    }
}
