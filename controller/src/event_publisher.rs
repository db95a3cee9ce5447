//! Kubernetes Events (`events.k8s.io/v1`) about VaultKeys, without a cache.
//!
//! kube-runtime's `Recorder` keeps every Event it published for six minutes to turn repeats into
//! series; with 10,000 keys minted at once that cache held ~27 MB at the benchmark's peak. Our
//! Events mark one-off transitions (issued, revoked, expired, collected, not enforceable), so
//! series add nothing: each is created once and forgotten.
use jiff::Timestamp;
use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

/// One transition worth an Event. Never carries a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice<'a> {
    pub warning: bool,
    pub reason: &'a str,
    pub note: String,
}

#[derive(Clone)]
pub struct EventPublisher {
    client: Client,
    controller: String,
    instance: String,
}

impl EventPublisher {
    pub fn new(client: Client, controller: impl Into<String>, instance: impl Into<String>) -> Self {
        EventPublisher {
            client,
            controller: controller.into(),
            instance: instance.into(),
        }
    }

    /// The Event as it will be created (pure: tested without an apiserver).
    pub fn event(&self, notice: &Notice<'_>, regarding: &ObjectReference, now: Timestamp) -> Event {
        let subject = regarding.name.as_deref().unwrap_or(&self.controller);
        Event {
            metadata: ObjectMeta {
                // Unique per instant, as kubectl and kube-runtime name them.
                name: Some(format!("{subject}.{:x}", now.as_nanosecond())),
                namespace: regarding.namespace.clone(),
                ..ObjectMeta::default()
            },
            action: Some("Reconcile".to_owned()),
            reason: Some(notice.reason.to_owned()),
            note: Some(notice.note.clone()),
            type_: Some(if notice.warning { "Warning" } else { "Normal" }.to_owned()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        }
    }

    pub async fn publish(
        &self,
        notice: &Notice<'_>,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let event = self.event(notice, regarding, Timestamp::now());
        api.create(&PostParams::default(), &event).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_name_the_key_controller_and_instance() {
        // A client is needed to build the publisher; `event` never uses it.
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let publisher = EventPublisher::new(client, "keybrake-controller", "replica-a");
        let regarding = ObjectReference {
            name: Some("k1".into()),
            namespace: Some("agents".into()),
            kind: Some("VaultKey".into()),
            ..ObjectReference::default()
        };
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let notice = Notice {
            warning: true,
            reason: "NotEnforceable",
            note: "upstream Secret s does not exist".into(),
        };
        let e = publisher.event(&notice, &regarding, now);
        assert_eq!(e.metadata.namespace.as_deref(), Some("agents"));
        assert!(e.metadata.name.as_deref().unwrap().starts_with("k1."));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some("NotEnforceable"));
        assert_eq!(
            e.reporting_controller.as_deref(),
            Some("keybrake-controller")
        );
        assert_eq!(e.reporting_instance.as_deref(), Some("replica-a"));
        assert_eq!(e.regarding.as_ref(), Some(&regarding));
        let later = publisher.event(
            &notice,
            &regarding,
            now + jiff::SignedDuration::from_nanos(1),
        );
        assert_ne!(e.metadata.name, later.metadata.name);
    }
}
