//! Kubernetes watches → the policy index. Every replica runs these (leader or not), so every
//! replica can serve streams. `synced` turns true once both initial lists are in the index.
use std::{collections::HashSet, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use keybrake_api::{KeyId, VaultKey};
use kube::{
    Api, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;

use crate::index::{KeySource, PolicyIndex, SecretData};

/// Tracks the two initial syncs; flips `synced` when both are done.
#[derive(Clone)]
pub struct SyncGate {
    parts: Arc<std::sync::Mutex<[bool; 2]>>,
    synced: watch::Sender<bool>,
}

impl SyncGate {
    pub fn new(synced: watch::Sender<bool>) -> Self {
        SyncGate {
            parts: Arc::default(),
            synced,
        }
    }

    fn done(&self, part: usize) {
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        parts[part] = true;
        if parts.iter().all(|p| *p) {
            self.synced.send_replace(true);
        }
    }
}

fn key_id(vk: &VaultKey) -> KeyId {
    KeyId::new(&vk.namespace().unwrap_or_default(), &vk.name_any())
}

fn key_source(vk: &VaultKey) -> KeySource {
    KeySource {
        spec: vk.spec.clone(),
        created: vk.metadata.creation_timestamp.as_ref().map(|t| t.0),
        generation: vk.metadata.generation.unwrap_or(0),
    }
}

fn secret_data(s: &Secret) -> SecretData {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

pub async fn feed_vault_keys(api: Api<VaultKey>, index: Arc<PolicyIndex>, gate: SyncGate) {
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relisted: HashSet<KeyId> = HashSet::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => relisted.clear(),
            Ok(watcher::Event::InitApply(vk)) => {
                let id = key_id(&vk);
                index.upsert_vault_key(id.clone(), key_source(&vk));
                relisted.insert(id);
            }
            Ok(watcher::Event::InitDone) => {
                index.retain_vault_keys(&relisted);
                relisted.clear();
                gate.done(0);
            }
            Ok(watcher::Event::Apply(vk)) => index.upsert_vault_key(key_id(&vk), key_source(&vk)),
            Ok(watcher::Event::Delete(vk)) => index.remove_vault_key(&key_id(&vk)),
            Err(e) => tracing::warn!(error = %e, "VaultKey watch error; retrying"),
        }
    }
}

pub async fn feed_secrets(api: Api<Secret>, index: Arc<PolicyIndex>, gate: SyncGate) {
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relisted: HashSet<(String, String)> = HashSet::new();
    while let Some(event) = events.next().await {
        let slot = |s: &Secret| (s.namespace().unwrap_or_default(), s.name_any());
        match event {
            Ok(watcher::Event::Init) => relisted.clear(),
            Ok(watcher::Event::InitApply(s)) => {
                let (ns, name) = slot(&s);
                index.upsert_secret(&ns, &name, secret_data(&s));
                relisted.insert((ns, name));
            }
            Ok(watcher::Event::InitDone) => {
                index.retain_secrets(&relisted);
                relisted.clear();
                gate.done(1);
            }
            Ok(watcher::Event::Apply(s)) => {
                let (ns, name) = slot(&s);
                index.upsert_secret(&ns, &name, secret_data(&s));
            }
            Ok(watcher::Event::Delete(s)) => {
                let (ns, name) = slot(&s);
                index.remove_secret(&ns, &name);
            }
            Err(e) => tracing::warn!(error = %e, "Secret watch error; retrying"),
        }
    }
}
