//! The policy store: every [`KeyGrant`] this sidecar enforces, indexed by the vault key's hash.
//! Fed through [`PolicyApply`] by the standalone config loader or the controller stream.
//!
//! Reads take a `RwLock` read guard just long enough to clone one `Arc`; writers build what they
//! can outside the lock. Per-key runtime state (the rate bucket) survives policy updates.
use std::{
    borrow::Borrow,
    collections::{HashMap, HashSet},
    hash::BuildHasherDefault,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::HeaderValue;
use keybrake_api::{KeyGrant, KeyId, TokenHash, Vendor, stream::PolicyApply};

use crate::{
    forward::UpstreamBase,
    metrics::KeyCounters,
    ratelimit::TokenBucket,
    vendors::{AuthSlot, Credential, module_for, upstream_authorization},
};

/// State a key keeps across policy updates. Only `callsPerMinute` needs any: keys without it
/// share one (they never touch its bucket), which saves an allocation per key.
#[derive(Debug, Default)]
pub struct KeyRuntime {
    pub rate: Mutex<TokenBucket>,
}

/// One enforced key: its grant plus its runtime state.
#[derive(Debug)]
pub struct KeyEntry {
    pub grant: KeyGrant,
    pub runtime: Arc<KeyRuntime>,
    /// Its metric series, resolved for this grant's labels (rebuilt with the entry).
    pub counters: KeyCounters,
    /// `grant.base_url`, parsed; `None` if it is not an absolute URL (calls then fail with
    /// `bad_upstream_url`). Shared by every key of a snapshot with the same base URL.
    pub upstream: Option<Arc<UpstreamBase>>,
    /// The upstream credential header, built once when it does not depend on what the agent
    /// presents (everything but a Twilio secret without its account SID). Marked sensitive.
    pub upstream_authorization: Option<HeaderValue>,
}

impl KeyEntry {
    pub fn new(grant: KeyGrant, runtime: Arc<KeyRuntime>) -> Self {
        Self::sharing(grant, runtime, &mut SharedDerivations::default())
    }

    fn sharing(
        mut grant: KeyGrant,
        runtime: Arc<KeyRuntime>,
        shared: &mut SharedDerivations,
    ) -> Self {
        compact(&mut grant);
        let upstream = shared
            .upstreams
            .entry(grant.base_url.clone())
            .or_insert_with(|| UpstreamBase::parse(&grant.base_url).map(Arc::new))
            .clone();
        let upstream_authorization = shared
            .authorizations
            .entry((grant.vendor, grant.upstream_secret.expose().to_owned()))
            .or_insert_with(|| fixed_upstream_authorization(&grant))
            .clone();
        KeyEntry {
            upstream,
            upstream_authorization,
            grant,
            runtime,
            counters: KeyCounters::default(),
        }
    }
}

/// Gives back the spare capacity deserializing left in a grant's heap parts (a one-rule `allow`
/// list holds room for four; a formatted id for twice its length): with 10,000 keys loaded,
/// about 2 MB. Shrinking reallocates in place, so nothing moves.
fn compact(grant: &mut KeyGrant) {
    grant.id.0.shrink_to_fit();
    grant.base_url.shrink_to_fit();
    grant.agent.name.shrink_to_fit();
    grant.allow.shrink_to_fit();
    grant.customers.shrink_to_fit();
}

/// Values derived from a key's upstream, computed once per snapshot: thousands of keys usually
/// share a few upstreams and secrets, and a clone shares the parsed bytes where a fresh parse
/// would hold a copy per key. Dropped when the snapshot is applied.
#[derive(Default)]
struct SharedDerivations {
    upstreams: HashMap<String, Option<Arc<UpstreamBase>>>,
    authorizations: HashMap<(Vendor, String), Option<HeaderValue>>,
}

fn fixed_upstream_authorization(grant: &KeyGrant) -> Option<HeaderValue> {
    let slot = module_for(grant.vendor).auth_slot();
    let fixed = match slot {
        AuthSlot::Bearer | AuthSlot::BearerOrBasicUser => true,
        AuthSlot::BasicPassword => grant.upstream_secret.expose().contains(':'),
    };
    let nobody = Credential {
        token: "".into(),
        basic_username: None,
    };
    fixed
        .then(|| upstream_authorization(slot, &grant.upstream_secret, &nobody).ok())
        .flatten()
}

/// Hashes a [`TokenHash`] by its first eight bytes. They are SHA-256 output, already uniform,
/// so SipHash on every lookup buys nothing. Flooding is not a concern: the map holds only keys
/// the policy source loaded, and an agent choosing which token to present cannot lengthen the
/// probe sequences those keys formed.
#[derive(Default)]
struct TokenHashHasher(u64);

impl std::hash::Hasher for TokenHashHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }

    /// The slice length `[u8; 32]` hashes first: the same for every key.
    fn write_usize(&mut self, _: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

/// An entry in the token-hash index. The index holds only the pointer: the hash it is found by
/// is the entry's own (a map would keep a second 32-byte copy per key).
struct ByTokenHash(Arc<KeyEntry>);

impl Borrow<TokenHash> for ByTokenHash {
    fn borrow(&self) -> &TokenHash {
        &self.0.grant.token_sha256
    }
}

impl std::hash::Hash for ByTokenHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.grant.token_sha256.hash(state);
    }
}

impl PartialEq for ByTokenHash {
    /// `TokenHash`'s constant-time equality.
    fn eq(&self, other: &Self) -> bool {
        self.0.grant.token_sha256 == other.0.grant.token_sha256
    }
}

impl Eq for ByTokenHash {}

/// An entry in the id index, found by its `namespace/name` without a second copy of the id.
struct ById(Arc<KeyEntry>);

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        self.0.grant.id.as_str()
    }
}

impl std::hash::Hash for ById {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.grant.id.as_str().hash(state);
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.grant.id == other.0.grant.id
    }
}

impl Eq for ById {}

/// Both indexes hold the same entries.
#[derive(Default)]
struct Index {
    by_hash: HashSet<ByTokenHash, BuildHasherDefault<TokenHashHasher>>,
    by_id: HashSet<ById>,
}

impl Index {
    /// Sized up front: growing rehashes into a new table while the old one is still held.
    fn with_capacity(keys: usize) -> Self {
        Index {
            by_hash: HashSet::with_capacity_and_hasher(keys, Default::default()),
            by_id: HashSet::with_capacity(keys),
        }
    }

    fn get_by_hash(&self, hash: &TokenHash) -> Option<&Arc<KeyEntry>> {
        self.by_hash.get(hash).map(|e| &e.0)
    }

    fn get_by_id(&self, id: &KeyId) -> Option<&Arc<KeyEntry>> {
        self.by_id.get(id.as_str()).map(|e| &e.0)
    }

    fn insert(&mut self, entry: KeyEntry) {
        let entry = Arc::new(entry);
        self.remove(&entry.grant.id);
        if let Some(clash) = self.by_hash.take(&entry.grant.token_sha256) {
            // Two keys with one token cannot both be enforced; the newer wins, loudly.
            tracing::warn!(key = %entry.grant.id, other = %clash.0.grant.id, "two vault keys share a token hash");
            self.by_id.remove(clash.0.grant.id.as_str());
        }
        self.by_id.insert(ById(entry.clone()));
        self.by_hash.insert(ByTokenHash(entry));
    }

    fn remove(&mut self, id: &KeyId) {
        if let Some(old) = self.by_id.take(id.as_str()) {
            self.by_hash.remove(&old.0.grant.token_sha256);
        }
    }

    fn len(&self) -> usize {
        self.by_hash.len()
    }
}

/// Where freshness comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// A local file is its own source of truth: never stale.
    AlwaysFresh,
    /// A stream: stale once nothing arrived for this long.
    StaleAfter(Duration),
}

pub struct PolicyStore {
    index: RwLock<Index>,
    revision: AtomicU64,
    loaded: AtomicBool,
    freshness: Freshness,
    origin: Instant,
    /// Nanoseconds after `origin` of the last `mark_fresh`.
    fresh_at_ns: AtomicU64,
    /// The runtime of every key without `callsPerMinute`.
    unlimited: Arc<KeyRuntime>,
}

impl PolicyStore {
    pub fn new(freshness: Freshness) -> Self {
        PolicyStore {
            index: RwLock::new(Index::default()),
            revision: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
            freshness,
            origin: Instant::now(),
            fresh_at_ns: AtomicU64::new(0),
            unlimited: Arc::default(),
        }
    }

    /// The key whose token hashes to `hash`. The map compares hashes with `TokenHash`'s
    /// constant-time equality.
    pub fn lookup(&self, hash: &TokenHash) -> Option<Arc<KeyEntry>> {
        self.read().get_by_hash(hash).cloned()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Ready once a first policy (possibly with zero keys) was applied.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Time since the source last proved alive (zero for an always-fresh source).
    pub fn staleness(&self) -> Duration {
        match self.freshness {
            Freshness::AlwaysFresh => Duration::ZERO,
            Freshness::StaleAfter(_) => {
                let fresh_at = Duration::from_nanos(self.fresh_at_ns.load(Ordering::Acquire));
                self.origin.elapsed().saturating_sub(fresh_at)
            }
        }
    }

    pub fn is_stale(&self) -> bool {
        match self.freshness {
            Freshness::AlwaysFresh => false,
            Freshness::StaleAfter(bound) => !self.is_loaded() || self.staleness() > bound,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        // A panic while holding the lock cannot leave the index half-written (every write is a
        // single insert/remove or a whole swap), so a poisoned lock is still consistent.
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The runtime `grant` gets in `index`: its previous bucket if it had one of its own, the
    /// shared one if it has no rate limit, else a fresh (full) bucket.
    fn runtime_for(&self, index: &Index, grant: &KeyGrant) -> Arc<KeyRuntime> {
        if grant.limits.calls_per_minute.is_none() {
            return self.unlimited.clone();
        }
        index
            .get_by_id(&grant.id)
            .map(|e| &e.runtime)
            .filter(|runtime| !Arc::ptr_eq(runtime, &self.unlimited))
            .cloned()
            .unwrap_or_default()
    }

    fn set_revision(&self, revision: u64) {
        self.revision.store(revision, Ordering::Release);
    }
}

impl PolicyApply for PolicyStore {
    fn replace_all(&self, keys: Vec<KeyGrant>, revision: u64) {
        // The policy in force stays until the next one is complete: no window without one.
        let mut next = Index::with_capacity(keys.len());
        let mut shared = SharedDerivations::default();
        {
            let current = self.read();
            for grant in keys {
                let runtime = self.runtime_for(&current, &grant);
                next.insert(KeyEntry::sharing(grant, runtime, &mut shared));
            }
        }
        let previous = std::mem::replace(&mut *self.write(), next);
        // Freed after the swap, so readers do not wait on it.
        drop(previous);
        self.set_revision(revision);
        self.loaded.store(true, Ordering::Release);
    }

    fn upsert(&self, key: KeyGrant, revision: u64) {
        let runtime = self.runtime_for(&self.read(), &key);
        self.write().insert(KeyEntry::new(key, runtime));
        self.set_revision(revision);
    }

    fn remove(&self, id: &KeyId, revision: u64) {
        self.write().remove(id);
        self.set_revision(revision);
    }

    fn mark_fresh(&self, revision: u64) {
        let now = self.origin.elapsed().as_nanos() as u64;
        self.fresh_at_ns.store(now, Ordering::Release);
        self.set_revision(revision);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use keybrake_api::{AgentRef, KeyState, Limits, OnStale, SecretString, Vendor};

    use super::*;

    pub(crate) fn grant(name: &str, token: &str) -> KeyGrant {
        KeyGrant {
            id: KeyId::new("ns", name),
            token_sha256: TokenHash::of(token),
            vendor: Vendor::Stripe,
            base_url: "http://127.0.0.1:9".into(),
            upstream_secret: SecretString::new("sk_test"),
            state: KeyState::Active,
            expires_at: None,
            agent: AgentRef {
                name: "a".into(),
                run_id: None,
            },
            allow: vec![],
            customers: vec![],
            limits: Limits::default(),
            on_stale: OnStale::Deny,
            policy_revision: 1,
        }
    }

    #[test]
    fn lookup_by_hash_and_updates() {
        let store = PolicyStore::new(Freshness::AlwaysFresh);
        assert!(!store.is_loaded());
        store.replace_all(vec![grant("a", "t1"), grant("b", "t2")], 5);
        assert!(store.is_loaded());
        assert_eq!(store.revision(), 5);
        assert_eq!(
            store.lookup(&TokenHash::of("t1")).unwrap().grant.id,
            KeyId::new("ns", "a")
        );
        assert!(store.lookup(&TokenHash::of("t3")).is_none());

        let mut revoked = grant("a", "t1");
        revoked.state = KeyState::Revoked;
        store.upsert(revoked, 6);
        assert_eq!(
            store.lookup(&TokenHash::of("t1")).unwrap().grant.state,
            KeyState::Revoked
        );

        // A re-minted token replaces the old hash.
        store.upsert(grant("a", "t9"), 7);
        assert!(store.lookup(&TokenHash::of("t1")).is_none());
        assert!(store.lookup(&TokenHash::of("t9")).is_some());

        store.remove(&KeyId::new("ns", "b"), 8);
        assert!(store.lookup(&TokenHash::of("t2")).is_none());
        assert_eq!(store.len(), 1);
        assert_eq!(store.revision(), 8);
    }

    #[test]
    fn token_hasher_spreads_keys_by_their_leading_bytes() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<TokenHashHasher>::default();
        let a = build.hash_one(TokenHash::of("t1"));
        let b = build.hash_one(TokenHash::of("t2"));
        assert_ne!(a, b);
        assert_eq!(
            a,
            u64::from_le_bytes(TokenHash::of("t1").as_bytes()[..8].try_into().unwrap())
        );
    }

    #[test]
    fn a_snapshot_shares_derived_upstream_values_between_keys() {
        let store = PolicyStore::new(Freshness::AlwaysFresh);
        store.replace_all(vec![grant("a", "t1"), grant("b", "t2")], 1);
        let a = store.lookup(&TokenHash::of("t1")).unwrap();
        let b = store.lookup(&TokenHash::of("t2")).unwrap();
        let (auth_a, auth_b) = (
            a.upstream_authorization.as_ref().unwrap(),
            b.upstream_authorization.as_ref().unwrap(),
        );
        assert_eq!(auth_a, "Bearer sk_test");
        assert!(auth_a.is_sensitive());
        // One parse, shared: both point at the same bytes.
        assert_eq!(auth_a.as_bytes().as_ptr(), auth_b.as_bytes().as_ptr());
        let (host_a, host_b) = (
            a.upstream.as_ref().unwrap().host(),
            b.upstream.as_ref().unwrap().host(),
        );
        assert_eq!(host_a, "127.0.0.1:9");
        assert_eq!(host_a.as_bytes().as_ptr(), host_b.as_bytes().as_ptr());
        // Another secret gets its own header.
        let mut other = grant("c", "t3");
        other.upstream_secret = keybrake_api::SecretString::new("sk_test_other");
        store.upsert(other, 2);
        let c = store.lookup(&TokenHash::of("t3")).unwrap();
        assert_eq!(
            c.upstream_authorization.as_ref().unwrap(),
            "Bearer sk_test_other"
        );
    }

    #[test]
    fn runtime_state_survives_updates() {
        let store = PolicyStore::new(Freshness::AlwaysFresh);
        store.replace_all(vec![grant("a", "t1")], 1);
        let before = store.lookup(&TokenHash::of("t1")).unwrap().runtime.clone();
        store.replace_all(vec![grant("a", "t1")], 2);
        store.upsert(grant("a", "t1"), 3);
        let after = store.lookup(&TokenHash::of("t1")).unwrap().runtime.clone();
        assert!(Arc::ptr_eq(&before, &after));
    }

    #[test]
    fn only_rate_limited_keys_hold_a_bucket_of_their_own() {
        let store = PolicyStore::new(Freshness::AlwaysFresh);
        let limited = |name: &str, token: &str| {
            let mut g = grant(name, token);
            g.limits.calls_per_minute = Some(1);
            g
        };
        store.replace_all(
            vec![grant("a", "t1"), grant("b", "t2"), limited("c", "t3")],
            1,
        );
        let runtime = |token: &str| store.lookup(&TokenHash::of(token)).unwrap().runtime.clone();
        assert!(Arc::ptr_eq(&runtime("t1"), &runtime("t2")));
        assert!(!Arc::ptr_eq(&runtime("t1"), &runtime("t3")));

        // A drained bucket stays drained across updates of its key.
        let c = runtime("t3");
        assert!(c.rate.lock().unwrap().try_take(1, Instant::now()));
        store.replace_all(
            vec![grant("a", "t1"), limited("b", "t2"), limited("c", "t3")],
            2,
        );
        assert!(Arc::ptr_eq(&c, &runtime("t3")));
        assert!(!c.rate.lock().unwrap().try_take(1, Instant::now()));
        // A key that gains a limit gets a full bucket of its own, not the shared one.
        let b = runtime("t2");
        assert!(!Arc::ptr_eq(&b, &runtime("t1")) && !Arc::ptr_eq(&b, &c));
        assert!(b.rate.lock().unwrap().try_take(1, Instant::now()));
        store.upsert(limited("a", "t1"), 3);
        let a = runtime("t1");
        assert!(!Arc::ptr_eq(&a, &b) && !Arc::ptr_eq(&a, &store.unlimited));
    }

    #[test]
    fn entries_give_back_spare_capacity() {
        let store = PolicyStore::new(Freshness::AlwaysFresh);
        let mut g = grant("a", "t1");
        g.allow = Vec::with_capacity(4);
        g.allow.push(keybrake_api::AllowRule {
            operation: Some("customers.retrieve".into()),
            method: None,
            path: None,
        });
        g.id.0.reserve(64);
        store.upsert(g, 1);
        let entry = store.lookup(&TokenHash::of("t1")).unwrap();
        assert_eq!(entry.grant.allow.capacity(), 1);
        assert_eq!(entry.grant.id.0.capacity(), entry.grant.id.0.len());
    }

    #[test]
    fn a_shared_token_hash_goes_to_the_newer_key_and_indexes_stay_in_step() {
        let store = PolicyStore::new(Freshness::AlwaysFresh);
        store.replace_all(vec![grant("a", "t1"), grant("b", "t1")], 1);
        assert_eq!(store.len(), 1);
        let found = store.lookup(&TokenHash::of("t1")).unwrap();
        assert_eq!(found.grant.id, KeyId::new("ns", "b"));
        // Removing the loser removes nothing; removing the winner empties both indexes.
        store.remove(&KeyId::new("ns", "a"), 2);
        assert!(store.lookup(&TokenHash::of("t1")).is_some());
        store.remove(&KeyId::new("ns", "b"), 3);
        assert!(store.lookup(&TokenHash::of("t1")).is_none());
        assert!(store.is_empty());
        let index = store.read();
        assert!(index.by_id.is_empty() && index.by_hash.is_empty());
    }

    #[test]
    fn staleness_follows_mark_fresh() {
        let store = PolicyStore::new(Freshness::StaleAfter(Duration::from_secs(3600)));
        // Nothing received yet: stale (fail closed until the first snapshot).
        assert!(store.is_stale());
        store.apply(keybrake_api::stream::WatchEvent::Snapshot {
            revision: 1,
            keys: vec![],
        });
        assert!(!store.is_stale());
        assert!(store.staleness() < Duration::from_secs(60));

        let quick = PolicyStore::new(Freshness::StaleAfter(Duration::ZERO));
        quick.replace_all(vec![], 1);
        quick.mark_fresh(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !quick.is_stale() && Instant::now() < deadline {
            std::hint::spin_loop();
        }
        assert!(quick.is_stale());
        assert!(!PolicyStore::new(Freshness::AlwaysFresh).is_stale());
    }
}
