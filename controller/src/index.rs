//! The policy index: VaultKeys + the Secrets they reference → one [`KeyGrant`] per key, grouped
//! by subscriber scope (namespace, service account). Each scope has a `tokio::sync::watch`
//! channel holding its complete current state; stream tasks diff consecutive states into
//! upserts and deletes. No I/O: the Kubernetes watchers feed it, the tests call it directly.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use jiff::Timestamp;
use keybrake_api::{KeyGrant, KeyId, SecretString, TokenHash, VaultKeySpec, stream::WatchEvent};
use tokio::sync::{Notify, watch};

use crate::{
    lifecycle::effective_expiry,
    token::{TOKEN_SECRET_KEY, token_secret_name, vault_key_of_token_secret},
};

/// Who may receive a key: sidecars running as this service account in this namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    pub namespace: String,
    pub service_account: String,
}

impl Scope {
    pub fn new(namespace: impl Into<String>, service_account: impl Into<String>) -> Self {
        Scope {
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// One published grant and the revision at which it last changed.
#[derive(Debug)]
pub struct ScopedGrant {
    pub revision: u64,
    /// When this process saw the change that produced this revision (the start of the
    /// propagation-latency measurement).
    pub observed_at: Instant,
    pub grant: KeyGrant,
}

/// Everything one scope's sidecars should hold, at `revision`.
#[derive(Debug, Default, Clone)]
pub struct ScopeState {
    pub revision: u64,
    pub keys: BTreeMap<KeyId, Arc<ScopedGrant>>,
}

impl ScopeState {
    pub fn snapshot_event(&self, at_least: u64) -> WatchEvent {
        WatchEvent::Snapshot {
            revision: self.revision.max(at_least),
            keys: self.keys.values().map(|g| g.grant.clone()).collect(),
        }
    }
}

/// The events that move a sidecar from `prev` to `next`: upserts in revision order, then
/// deletes (stamped with `next.revision`). Revisions never decrease along a stream.
pub fn diff(prev: &ScopeState, next: &ScopeState) -> Vec<WatchEvent> {
    let mut upserts: Vec<&Arc<ScopedGrant>> = next
        .keys
        .iter()
        .filter(|(id, g)| prev.keys.get(*id).is_none_or(|p| !Arc::ptr_eq(p, g)))
        .map(|(_, g)| g)
        .collect();
    upserts.sort_by_key(|g| g.revision);
    let mut events: Vec<WatchEvent> = upserts
        .into_iter()
        .map(|g| WatchEvent::Upsert {
            revision: g.revision.max(prev.revision),
            key: g.grant.clone(),
        })
        .collect();
    events.extend(
        prev.keys
            .keys()
            .filter(|id| !next.keys.contains_key(*id))
            .map(|id| WatchEvent::Delete {
                revision: next.revision.max(prev.revision),
                id: id.clone(),
            }),
    );
    events
}

/// Why a VaultKey has no grant (sidecars then deny it as `key_unknown`). Never holds a secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantProblem {
    #[error("upstream Secret {name} does not exist")]
    UpstreamSecretMissing { name: String },
    #[error("upstream Secret {name} has no key {key} (or it is empty or not UTF-8)")]
    UpstreamSecretKeyMissing { name: String, key: String },
    #[error("token Secret {name} is missing or malformed")]
    TokenMissing { name: String },
    #[error("{0}")]
    InvalidSpec(String),
}

impl GrantProblem {
    /// CamelCase reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            GrantProblem::UpstreamSecretMissing { .. } => "UpstreamSecretMissing",
            GrantProblem::UpstreamSecretKeyMissing { .. } => "UpstreamSecretKeyMissing",
            GrantProblem::TokenMissing { .. } => "TokenNotIssued",
            GrantProblem::InvalidSpec(_) => "InvalidSpec",
        }
    }
}

/// What the index needs from a VaultKey object.
#[derive(Clone, Debug, PartialEq)]
pub struct KeySource {
    pub spec: VaultKeySpec,
    pub created: Option<Timestamp>,
    pub generation: i64,
}

/// Secret data by key. Not `Debug`: values are secrets.
pub type SecretData = BTreeMap<String, Vec<u8>>;

#[derive(Default)]
struct Inner {
    revision: u64,
    keys: HashMap<KeyId, KeySource>,
    secrets: HashMap<(String, String), SecretData>,
    published: HashMap<KeyId, (Scope, Arc<ScopedGrant>)>,
    problems: HashMap<KeyId, GrantProblem>,
    scopes: HashMap<Scope, watch::Sender<Arc<ScopeState>>>,
    /// Keys whose grant or problem changed since the reconciler last looked.
    dirty: HashSet<KeyId>,
}

pub struct PolicyIndex {
    inner: Mutex<Inner>,
    changed: Notify,
}

impl PolicyIndex {
    /// `first_revision` should grow across restarts (e.g. wall-clock microseconds at start), so
    /// a sidecar resuming against a restarted or different replica never sees revisions go back.
    pub fn new(first_revision: u64) -> Self {
        PolicyIndex {
            inner: Mutex::new(Inner {
                revision: first_revision,
                ..Inner::default()
            }),
            changed: Notify::new(),
        }
    }

    /// Revision seed for a new process: microseconds since the Unix epoch.
    pub fn revision_seed() -> u64 {
        u64::try_from(Timestamp::now().as_microsecond()).unwrap_or(1)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves maps that are still internally consistent
        // per entry; keep serving rather than wedge every stream.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// Makes every later revision exceed `seen` (a resuming sidecar's last revision).
    pub fn ensure_revision_above(&self, seen: u64) {
        let mut inner = self.lock();
        inner.revision = inner.revision.max(seen);
    }

    pub fn subscribe(&self, scope: &Scope) -> watch::Receiver<Arc<ScopeState>> {
        let mut inner = self.lock();
        inner.sender(scope).subscribe()
    }

    pub fn upsert_vault_key(&self, id: KeyId, source: KeySource) {
        let mut inner = self.lock();
        if inner.keys.get(&id) == Some(&source) {
            return;
        }
        inner.keys.insert(id.clone(), source);
        inner.recompute(&id);
        drop(inner);
        self.changed.notify_one();
    }

    pub fn remove_vault_key(&self, id: &KeyId) {
        let mut inner = self.lock();
        inner.keys.remove(id);
        inner.problems.remove(id);
        inner.unpublish(id);
        inner.dirty.insert(id.clone());
        drop(inner);
        self.changed.notify_one();
    }

    /// Keeps only `live` keys (after a watch re-list, which reports no deletions).
    pub fn retain_vault_keys(&self, live: &HashSet<KeyId>) {
        let gone: Vec<KeyId> = {
            let inner = self.lock();
            inner
                .keys
                .keys()
                .filter(|k| !live.contains(k))
                .cloned()
                .collect()
        };
        for id in gone {
            self.remove_vault_key(&id);
        }
    }

    pub fn upsert_secret(&self, namespace: &str, name: &str, data: SecretData) {
        let mut inner = self.lock();
        let slot = (namespace.to_owned(), name.to_owned());
        if inner.secrets.get(&slot) == Some(&data) {
            return;
        }
        inner.secrets.insert(slot, data);
        inner.recompute_for_secret(namespace, name);
        drop(inner);
        self.changed.notify_one();
    }

    pub fn remove_secret(&self, namespace: &str, name: &str) {
        let mut inner = self.lock();
        if inner
            .secrets
            .remove(&(namespace.to_owned(), name.to_owned()))
            .is_some()
        {
            inner.recompute_for_secret(namespace, name);
        }
        drop(inner);
        self.changed.notify_one();
    }

    pub fn retain_secrets(&self, live: &HashSet<(String, String)>) {
        let gone: Vec<(String, String)> = {
            let inner = self.lock();
            inner
                .secrets
                .keys()
                .filter(|k| !live.contains(*k))
                .cloned()
                .collect()
        };
        for (ns, name) in gone {
            self.remove_secret(&ns, &name);
        }
    }

    /// Waits until some key's grant or problem changed; returns (and clears) those keys.
    pub async fn changed_keys(&self) -> Vec<KeyId> {
        loop {
            let notified = self.changed.notified();
            let batch: Vec<KeyId> = self.lock().dirty.drain().collect();
            if !batch.is_empty() {
                return batch;
            }
            notified.await;
        }
    }

    /// Namespaces that hold at least one VaultKey (where the CA ConfigMap is published).
    pub fn namespaces(&self) -> std::collections::BTreeSet<String> {
        self.lock()
            .keys
            .keys()
            .map(|id| id.namespace().to_owned())
            .collect()
    }

    /// Why `id` has no grant, if it has none.
    pub fn problem(&self, id: &KeyId) -> Option<GrantProblem> {
        self.lock().problems.get(id).cloned()
    }

    /// The scope and revision of `id`'s published grant.
    pub fn published(&self, id: &KeyId) -> Option<(Scope, u64)> {
        self.lock()
            .published
            .get(id)
            .map(|(s, g)| (s.clone(), g.revision))
    }

    /// The scope's current revision (0 when the scope is unknown).
    pub fn scope_revision(&self, scope: &Scope) -> u64 {
        self.lock()
            .scopes
            .get(scope)
            .map_or(0, |tx| tx.borrow().revision)
    }

    /// The service account whose sidecars `id` is bound to (`spec.workload`), if the key is
    /// known to this replica. Used to check which keys a sidecar may report audit rows for.
    pub fn bound_service_account(&self, id: &KeyId) -> Option<String> {
        self.lock()
            .keys
            .get(id)
            .map(|k| k.spec.workload.service_account_name.clone())
    }

    /// Whether the token Secret of `id` exists (the key was minted).
    pub fn has_token_secret(&self, id: &KeyId) -> bool {
        let inner = self.lock();
        inner
            .secrets
            .contains_key(&(id.namespace().to_owned(), token_secret_name(id.name())))
    }
}

impl Inner {
    fn sender(&mut self, scope: &Scope) -> &watch::Sender<Arc<ScopeState>> {
        self.scopes
            .entry(scope.clone())
            .or_insert_with(|| watch::Sender::new(Arc::new(ScopeState::default())))
    }

    fn recompute_for_secret(&mut self, namespace: &str, name: &str) {
        let token_owner = vault_key_of_token_secret(name);
        let affected: Vec<KeyId> = self
            .keys
            .iter()
            .filter(|(id, src)| {
                id.namespace() == namespace
                    && (src.spec.upstream.secret_ref.name == name || token_owner == Some(id.name()))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in affected {
            self.recompute(&id);
        }
    }

    fn build(&self, id: &KeyId, src: &KeySource) -> Result<KeyGrant, GrantProblem> {
        let ns = id.namespace().to_owned();
        let token_name = token_secret_name(id.name());
        let token = self
            .secrets
            .get(&(ns.clone(), token_name.clone()))
            .and_then(|d| d.get(TOKEN_SECRET_KEY))
            .and_then(|v| std::str::from_utf8(v).ok())
            .filter(|t| !t.is_empty())
            .ok_or(GrantProblem::TokenMissing { name: token_name })?;
        let secret_ref = &src.spec.upstream.secret_ref;
        let upstream = self
            .secrets
            .get(&(ns, secret_ref.name.clone()))
            .ok_or_else(|| GrantProblem::UpstreamSecretMissing {
                name: secret_ref.name.clone(),
            })?;
        let upstream_secret = upstream
            .get(&secret_ref.key)
            .and_then(|v| std::str::from_utf8(v).ok())
            // A trailing newline from `echo … | kubectl create secret` is never part of a key.
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| GrantProblem::UpstreamSecretKeyMissing {
                name: secret_ref.name.clone(),
                key: secret_ref.key.clone(),
            })?;
        let expiry = effective_expiry(&src.spec, src.created)
            .map_err(|e| GrantProblem::InvalidSpec(e.to_string()))?;
        KeyGrant::from_spec(
            id.clone(),
            &src.spec,
            TokenHash::of(token),
            SecretString::new(upstream_secret),
            expiry,
            src.generation,
        )
        .map_err(|e| GrantProblem::InvalidSpec(e.to_string()))
    }

    fn recompute(&mut self, id: &KeyId) {
        let Some(src) = self.keys.get(id) else {
            self.unpublish(id);
            return;
        };
        let scope = Scope::new(id.namespace(), &src.spec.workload.service_account_name);
        match self.build(id, src) {
            Err(problem) => {
                if self.problems.get(id) != Some(&problem) {
                    self.dirty.insert(id.clone());
                }
                self.problems.insert(id.clone(), problem);
                self.unpublish(id);
            }
            Ok(grant) => {
                if self.problems.remove(id).is_some() {
                    self.dirty.insert(id.clone());
                }
                if let Some((old_scope, old)) = self.published.get(id) {
                    if *old_scope == scope && old.grant == grant {
                        return;
                    }
                    if *old_scope != scope {
                        self.unpublish(id);
                    }
                }
                self.revision += 1;
                self.dirty.insert(id.clone());
                let entry = Arc::new(ScopedGrant {
                    revision: self.revision,
                    observed_at: Instant::now(),
                    grant,
                });
                self.published
                    .insert(id.clone(), (scope.clone(), entry.clone()));
                let revision = self.revision;
                self.sender(&scope).send_modify(|state| {
                    let state = Arc::make_mut(state);
                    state.revision = revision;
                    state.keys.insert(id.clone(), entry);
                });
            }
        }
    }

    fn unpublish(&mut self, id: &KeyId) {
        let Some((scope, _)) = self.published.remove(id) else {
            return;
        };
        self.dirty.insert(id.clone());
        self.revision += 1;
        let revision = self.revision;
        let now_empty = {
            let tx = self.sender(&scope);
            tx.send_modify(|state| {
                let state = Arc::make_mut(state);
                state.revision = revision;
                state.keys.remove(id);
            });
            tx.borrow().keys.is_empty() && tx.receiver_count() == 0
        };
        if now_empty {
            self.scopes.remove(&scope);
        }
    }
}

#[cfg(test)]
mod tests {
    use keybrake_api::{
        AgentRef, KeyState, Limits, OnStale, SecretKeyRef, Upstream, Vendor, WorkloadRef,
    };

    use super::*;

    fn source(sa: &str, secret: &str, state: KeyState) -> KeySource {
        KeySource {
            spec: VaultKeySpec {
                vendor: Vendor::Stripe,
                upstream: Upstream {
                    secret_ref: SecretKeyRef {
                        name: secret.into(),
                        key: "api-key".into(),
                    },
                    base_url: Some("http://127.0.0.1:9".into()),
                },
                state,
                expires_at: None,
                ttl: None,
                agent: AgentRef {
                    name: "agent".into(),
                    run_id: None,
                },
                workload: WorkloadRef {
                    service_account_name: sa.into(),
                },
                allow: vec![],
                customers: vec![],
                limits: Limits::default(),
                on_stale: OnStale::Deny,
            },
            created: Some("2026-01-01T00:00:00Z".parse().unwrap()),
            generation: 1,
        }
    }

    fn data(key: &str, value: &str) -> SecretData {
        BTreeMap::from([(key.to_owned(), value.as_bytes().to_vec())])
    }

    /// An index holding agents/k1 (sa "refund", upstream secret "stripe-live").
    fn seeded() -> (PolicyIndex, KeyId) {
        let index = PolicyIndex::new(100);
        let id = KeyId::new("agents", "k1");
        index.upsert_secret("agents", "stripe-live", data("api-key", "sk_live_1\n"));
        index.upsert_secret(
            "agents",
            "k1-token",
            data(TOKEN_SECRET_KEY, "vault_key_abc"),
        );
        index.upsert_vault_key(
            id.clone(),
            source("refund", "stripe-live", KeyState::Active),
        );
        (index, id)
    }

    #[test]
    fn grant_lands_in_its_scope_only() {
        let (index, id) = seeded();
        let rx = index.subscribe(&Scope::new("agents", "refund"));
        let state = rx.borrow().clone();
        let g = &state.keys[&id].grant;
        assert_eq!(g.upstream_secret.expose(), "sk_live_1");
        assert_eq!(g.token_sha256, TokenHash::of("vault_key_abc"));
        assert_eq!(state.revision, 101);
        for other in [Scope::new("agents", "other"), Scope::new("other", "refund")] {
            assert!(index.subscribe(&other).borrow().keys.is_empty(), "{other}");
        }
    }

    #[test]
    fn revocation_publishes_a_new_revision_immediately() {
        let (index, id) = seeded();
        let mut rx = index.subscribe(&Scope::new("agents", "refund"));
        let before = rx.borrow_and_update().clone();
        index.upsert_vault_key(
            id.clone(),
            source("refund", "stripe-live", KeyState::Revoked),
        );
        assert!(rx.has_changed().unwrap());
        let after = rx.borrow_and_update().clone();
        assert!(after.revision > before.revision);
        let events = diff(&before, &after);
        assert_eq!(events.len(), 1);
        match &events[0] {
            WatchEvent::Upsert { revision, key } => {
                assert_eq!(*revision, after.revision);
                assert_eq!(key.state, KeyState::Revoked);
            }
            e => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn unchanged_objects_do_not_bump_the_revision() {
        let (index, id) = seeded();
        let r = index.revision();
        index.upsert_vault_key(
            id.clone(),
            source("refund", "stripe-live", KeyState::Active),
        );
        index.upsert_secret("agents", "stripe-live", data("api-key", "sk_live_1\n"));
        assert_eq!(index.revision(), r);
    }

    #[test]
    fn upstream_rotation_updates_every_key_that_references_the_secret() {
        let (index, id) = seeded();
        let id2 = KeyId::new("agents", "k2");
        index.upsert_secret(
            "agents",
            "k2-token",
            data(TOKEN_SECRET_KEY, "vault_key_def"),
        );
        index.upsert_vault_key(
            id2.clone(),
            source("other-sa", "stripe-live", KeyState::Active),
        );
        index.upsert_secret("agents", "stripe-live", data("api-key", "sk_live_2"));
        let a = index
            .subscribe(&Scope::new("agents", "refund"))
            .borrow()
            .clone();
        let b = index
            .subscribe(&Scope::new("agents", "other-sa"))
            .borrow()
            .clone();
        assert_eq!(a.keys[&id].grant.upstream_secret.expose(), "sk_live_2");
        assert_eq!(b.keys[&id2].grant.upstream_secret.expose(), "sk_live_2");
    }

    #[test]
    fn missing_upstream_secret_withdraws_the_grant_and_says_why() {
        let (index, id) = seeded();
        let scope = Scope::new("agents", "refund");
        let mut rx = index.subscribe(&scope);
        let before = rx.borrow_and_update().clone();
        index.remove_secret("agents", "stripe-live");
        let after = rx.borrow_and_update().clone();
        assert!(after.keys.is_empty());
        assert_eq!(
            diff(&before, &after),
            vec![WatchEvent::Delete {
                revision: after.revision,
                id: id.clone()
            }]
        );
        assert_eq!(
            index.problem(&id),
            Some(GrantProblem::UpstreamSecretMissing {
                name: "stripe-live".into()
            })
        );
        index.upsert_secret("agents", "stripe-live", data("wrong", "x"));
        assert_eq!(
            index.problem(&id).unwrap().reason(),
            "UpstreamSecretKeyMissing"
        );
        index.upsert_secret("agents", "stripe-live", data("api-key", "sk_live_3"));
        assert_eq!(index.problem(&id), None);
        assert_eq!(rx.borrow().keys.len(), 1);
    }

    #[tokio::test]
    async fn reports_keys_whose_grant_or_problem_changed() {
        let (index, id) = seeded();
        assert_eq!(index.changed_keys().await, vec![id.clone()]);
        index.remove_secret("agents", "stripe-live");
        assert_eq!(index.changed_keys().await, vec![id.clone()]);
    }

    #[test]
    fn unminted_key_has_no_grant() {
        let index = PolicyIndex::new(1);
        let id = KeyId::new("agents", "k9");
        index.upsert_secret("agents", "stripe-live", data("api-key", "sk"));
        index.upsert_vault_key(
            id.clone(),
            source("refund", "stripe-live", KeyState::Active),
        );
        assert_eq!(index.problem(&id).unwrap().reason(), "TokenNotIssued");
        assert!(!index.has_token_secret(&id));
        index.upsert_secret("agents", "k9-token", data(TOKEN_SECRET_KEY, "vault_key_x"));
        assert!(index.has_token_secret(&id));
        assert!(index.published(&id).is_some());
    }

    #[test]
    fn moving_a_key_to_another_service_account_moves_its_grant() {
        let (index, id) = seeded();
        let old = index.subscribe(&Scope::new("agents", "refund"));
        index.upsert_vault_key(
            id.clone(),
            source("billing", "stripe-live", KeyState::Active),
        );
        assert!(old.borrow().keys.is_empty());
        let new = index.subscribe(&Scope::new("agents", "billing"));
        assert!(new.borrow().keys.contains_key(&id));
    }

    #[test]
    fn relist_removes_what_disappeared() {
        let (index, id) = seeded();
        index.retain_vault_keys(&HashSet::new());
        assert!(index.published(&id).is_none());
        let (index, id) = seeded();
        index.retain_secrets(&HashSet::from([(
            "agents".to_owned(),
            "k1-token".to_owned(),
        )]));
        assert_eq!(
            index.problem(&id).unwrap().reason(),
            "UpstreamSecretMissing"
        );
    }

    #[test]
    fn resumed_streams_never_see_revisions_go_back() {
        let (index, _) = seeded();
        index.ensure_revision_above(5_000);
        let scope = Scope::new("agents", "refund");
        let state = index.subscribe(&scope).borrow().clone();
        assert_eq!(state.snapshot_event(5_000).revision(), 5_000);
        index.upsert_vault_key(
            KeyId::new("agents", "k1"),
            source("refund", "stripe-live", KeyState::Suspended),
        );
        assert!(index.scope_revision(&scope) > 5_000);
    }
}
