//! Kubernetes watches → the policy index. Every replica runs these (leader or not), so every
//! replica can serve streams. `synced` turns true once both initial lists are in the index.
use std::{collections::HashSet, sync::Arc};

use tokio::sync::mpsc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use keybrake_api::{KeyId, VaultKey};
use kube::{
    Api, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;

use crate::{
    index::{KeySource, PolicyIndex},
    peer_enforcement::ScopeKeys,
    secret_interest::{Filtered, Follow, SecretInterest, SecretSlot},
};

/// What the VaultKey feed tells the Secret feed (which applies it in order with its events).
pub type Follows = mpsc::UnboundedSender<Vec<Follow>>;

/// Tracks the two initial syncs; flips `synced` when both are done.
#[derive(Clone)]
pub struct SyncGate {
    parts: Arc<watch::Sender<[bool; 2]>>,
    synced: watch::Sender<bool>,
}

const VAULT_KEYS: usize = 0;
const SECRETS: usize = 1;

impl SyncGate {
    pub fn new(synced: watch::Sender<bool>) -> Self {
        SyncGate {
            parts: Arc::new(watch::Sender::new([false; 2])),
            synced,
        }
    }

    fn done(&self, part: usize) {
        self.parts.send_modify(|parts| parts[part] = true);
        if self.parts.borrow().iter().all(|p| *p) {
            self.synced.send_replace(true);
        }
    }

    async fn wait(&self, part: usize) {
        let _ = self.parts.subscribe().wait_for(|parts| parts[part]).await;
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

fn secret_data(s: &Secret) -> std::collections::BTreeMap<String, Vec<u8>> {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

/// Records what `vk` reads and tells the Secret feed what that changes.
fn reference(interest: &SecretInterest, follows: &Follows, id: &KeyId, vk: &VaultKey) {
    let secret_ref = &vk.spec.upstream.secret_ref;
    send(
        follows,
        interest.reference(id, &secret_ref.name, &secret_ref.key),
    );
}

fn send(follows: &Follows, batch: Vec<Follow>) {
    if !batch.is_empty() {
        // The Secret feed lives as long as this one; a closed channel means shutdown.
        let _ = follows.send(batch);
    }
}

/// Index first, generation second: a peer report (which reads the fingerprint before the
/// acknowledgements) built in between pairs the old fingerprint with acknowledgements against
/// the new revision, which can only under-count, never claim acks for a generation unseen.
fn upsert(index: &PolicyIndex, scope_keys: &ScopeKeys, vk: &VaultKey) -> KeyId {
    let id = key_id(vk);
    index.upsert_vault_key(id.clone(), key_source(vk));
    scope_keys.upsert(
        &id,
        &vk.spec.workload.service_account_name,
        vk.metadata.generation.unwrap_or(0),
    );
    id
}

pub struct VaultKeyFeed {
    pub api: Api<VaultKey>,
    pub index: Arc<PolicyIndex>,
    pub scope_keys: Arc<ScopeKeys>,
    pub interest: Arc<SecretInterest>,
    pub follows: Follows,
    pub gate: SyncGate,
}

pub async fn feed_vault_keys(feed: VaultKeyFeed) {
    let VaultKeyFeed {
        api,
        index,
        scope_keys,
        interest,
        follows,
        gate,
    } = feed;
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relisted: HashSet<KeyId> = HashSet::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => relisted.clear(),
            Ok(watcher::Event::InitApply(vk)) => {
                let id = upsert(&index, &scope_keys, &vk);
                reference(&interest, &follows, &id, &vk);
                relisted.insert(id);
            }
            Ok(watcher::Event::InitDone) => {
                index.retain_vault_keys(&relisted);
                scope_keys.retain(&relisted);
                send(&follows, interest.retain(&relisted));
                relisted.clear();
                gate.done(VAULT_KEYS);
            }
            Ok(watcher::Event::Apply(vk)) => {
                let id = upsert(&index, &scope_keys, &vk);
                reference(&interest, &follows, &id, &vk);
            }
            Ok(watcher::Event::Delete(vk)) => {
                let id = key_id(&vk);
                index.remove_vault_key(&id);
                scope_keys.remove(&id);
                send(&follows, interest.unreference(&id));
            }
            Err(e) => tracing::warn!(error = %e, "VaultKey watch error; retrying"),
        }
    }
}

/// Keeps the index's Secrets current: only the data VaultKeys reference ([`SecretInterest`]).
/// Starts listing once the VaultKeys are in, so the initial list already knows what to keep and
/// needs no re-reads.
pub async fn feed_secrets(
    api: Api<Secret>,
    index: Arc<PolicyIndex>,
    interest: Arc<SecretInterest>,
    mut follows: mpsc::UnboundedReceiver<Vec<Follow>>,
    gate: SyncGate,
) {
    gate.wait(VAULT_KEYS).await;
    let client = kube::Client::from(api.clone());
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relisted: HashSet<SecretSlot> = HashSet::new();
    let slot = |s: &Secret| (s.namespace().unwrap_or_default(), s.name_any());
    let apply = |s: &Secret| {
        let slot = slot(s);
        match interest.filter(&slot, &secret_data(s)) {
            Filtered::Keep(data) => index.upsert_secret(&slot.0, &slot.1, data),
            Filtered::Drop { was_kept: true } => index.remove_secret(&slot.0, &slot.1),
            Filtered::Drop { was_kept: false } => {}
        }
        slot
    };
    loop {
        let event = tokio::select! {
            event = events.next() => match event {
                Some(event) => event,
                None => return,
            },
            batch = follows.recv() => {
                for follow in batch.into_iter().flatten() {
                    match follow {
                        // Read here, between two watch events, so a later event for the same
                        // Secret is applied after it.
                        Follow::Fetch((ns, name)) => {
                            let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
                            match secrets.get_opt(&name).await {
                                Ok(Some(s)) => {
                                    apply(&s);
                                }
                                Ok(None) => {}
                                Err(e) => tracing::warn!(
                                    namespace = %ns, secret = %name, error = %e,
                                    "could not read a newly referenced Secret; the next change of it applies"
                                ),
                            }
                        }
                        Follow::Forget((ns, name)) => index.remove_secret(&ns, &name),
                    }
                }
                continue;
            }
        };
        match event {
            Ok(watcher::Event::Init) => relisted.clear(),
            Ok(watcher::Event::InitApply(s)) => {
                relisted.insert(apply(&s));
            }
            Ok(watcher::Event::InitDone) => {
                interest.retain_seen(&relisted);
                index.retain_secrets(&relisted);
                relisted.clear();
                gate.done(SECRETS);
            }
            Ok(watcher::Event::Apply(s)) => {
                apply(&s);
            }
            Ok(watcher::Event::Delete(s)) => {
                let slot = slot(&s);
                interest.deleted(&slot);
                index.remove_secret(&slot.0, &slot.1);
            }
            Err(e) => tracing::warn!(error = %e, "Secret watch error; retrying"),
        }
    }
}
