//! Enforcement counts across controller replicas, as pure bookkeeping.
//!
//! Sidecars stream from whichever replica their connection landed on, but only the leader writes
//! `status.enforcement`. Every replica therefore publishes a compact [`ReplicaReport`] of its own
//! streams (see `peer_reports` for where it is stored), and the leader adds the reports of the
//! other live replicas to its own counts.
//!
//! A report is per scope (namespace, service account), not per key: "N streams, and every key
//! acknowledged by all N except these few". Revisions are local to each replica, so a report
//! carries a fingerprint of the key generations its counts refer to; when the leader's
//! fingerprint of the same scope differs (one of the two has not seen the latest spec yet), the
//! replica's streams count as sidecars that have acknowledged nothing — never a premature
//! "Propagated".
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use keybrake_api::KeyId;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::{index::Scope, lifecycle::EnforcementView};

/// Keys listed individually per scope at most; beyond it the scope reports `behind`.
pub const MAX_LAGGING_PER_SCOPE: usize = 64;

/// FNV-1a, 64 bit: stable across builds and platforms, so replicas of different versions agree.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        // Separator, so ("ab","c") and ("a","bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn key_hash(name: &str, generation: i64) -> u64 {
    fnv1a(&[name.as_bytes(), &generation.to_le_bytes()])
}

#[derive(Default)]
struct ScopeKeysEntry {
    /// Key name → metadata.generation.
    keys: BTreeMap<String, i64>,
    /// XOR of `key_hash` over `keys`: order-free and updated in O(1).
    fingerprint: u64,
}

/// Which VaultKeys (and generations) each scope holds, as this replica's watch sees them.
#[derive(Default)]
pub struct ScopeKeys {
    inner: Mutex<HashMap<Scope, ScopeKeysEntry>>,
}

impl ScopeKeys {
    fn lock(&self) -> MutexGuard<'_, HashMap<Scope, ScopeKeysEntry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn upsert(&self, id: &KeyId, service_account: &str, generation: i64) {
        let scope = Scope::new(id.namespace(), service_account);
        let mut map = self.lock();
        // A key whose workload changed leaves its old scope (same namespace, few scopes).
        let moved: Vec<Scope> = map
            .iter()
            .filter(|(s, e)| {
                s.namespace == scope.namespace && **s != scope && e.keys.contains_key(id.name())
            })
            .map(|(s, _)| s.clone())
            .collect();
        for old in moved {
            remove_from(&mut map, &old, id.name());
        }
        let entry = map.entry(scope).or_default();
        if let Some(previous) = entry.keys.insert(id.name().to_owned(), generation) {
            entry.fingerprint ^= key_hash(id.name(), previous);
        }
        entry.fingerprint ^= key_hash(id.name(), generation);
    }

    pub fn remove(&self, id: &KeyId) {
        let mut map = self.lock();
        let scopes: Vec<Scope> = map
            .iter()
            .filter(|(s, e)| s.namespace == id.namespace() && e.keys.contains_key(id.name()))
            .map(|(s, _)| s.clone())
            .collect();
        for scope in scopes {
            remove_from(&mut map, &scope, id.name());
        }
    }

    /// Keeps only `live` keys (after a watch re-list).
    pub fn retain(&self, live: &HashSet<KeyId>) {
        let mut map = self.lock();
        for (scope, entry) in map.iter_mut() {
            let gone: Vec<String> = entry
                .keys
                .keys()
                .filter(|name| !live.contains(&KeyId::new(&scope.namespace, name)))
                .cloned()
                .collect();
            for name in gone {
                if let Some(generation) = entry.keys.remove(&name) {
                    entry.fingerprint ^= key_hash(&name, generation);
                }
            }
        }
        map.retain(|_, e| !e.keys.is_empty());
    }

    pub fn fingerprint(&self, scope: &Scope) -> u64 {
        self.lock().get(scope).map_or(0, |e| e.fingerprint)
    }

    pub fn scopes(&self) -> Vec<Scope> {
        self.lock().keys().cloned().collect()
    }

    pub fn keys_of(&self, scope: &Scope) -> Vec<KeyId> {
        self.lock().get(scope).map_or_else(Vec::new, |e| {
            e.keys
                .keys()
                .map(|name| KeyId::new(&scope.namespace, name))
                .collect()
        })
    }
}

fn remove_from(map: &mut HashMap<Scope, ScopeKeysEntry>, scope: &Scope, name: &str) {
    if let Some(entry) = map.get_mut(scope) {
        if let Some(generation) = entry.keys.remove(name) {
            entry.fingerprint ^= key_hash(name, generation);
        }
        if entry.keys.is_empty() {
            map.remove(scope);
        }
    }
}

/// One scope's streams on one replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeReport {
    pub ns: String,
    pub sa: String,
    /// Connected sidecar streams of this scope on the reporting replica.
    pub streams: u32,
    /// [`ScopeKeys::fingerprint`] of the scope when the counts were taken, in hex.
    pub fingerprint: String,
    /// Keys that not all `streams` acknowledged yet: name → how many did.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lagging: BTreeMap<String, u32>,
    /// More than [`MAX_LAGGING_PER_SCOPE`] keys lag: count none of this scope as acknowledged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub behind: bool,
}

/// What one replica publishes: its streams, per scope. Holds no secret, token or grant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub scopes: Vec<ScopeReport>,
}

impl ReplicaReport {
    /// Builds the report from this replica's local view. `fingerprint` is read before `view`
    /// per scope: a key changing in between makes the counts newer than the fingerprint, which
    /// can only under-count (the leader then sees a mismatch or a lower count), never over-count.
    pub fn build(
        scope_keys: &ScopeKeys,
        mut view: impl FnMut(&KeyId, &Scope) -> EnforcementView,
    ) -> ReplicaReport {
        let mut scopes = Vec::new();
        let mut all = scope_keys.scopes();
        all.sort();
        for scope in all {
            let fingerprint = scope_keys.fingerprint(&scope);
            let keys = scope_keys.keys_of(&scope);
            let mut streams = None;
            let mut lagging = BTreeMap::new();
            let mut behind = false;
            for id in &keys {
                let v = view(id, &scope);
                if v.sidecars == 0 {
                    // No stream of this scope on this replica: nothing to report.
                    break;
                }
                streams = Some(v.sidecars);
                if v.acknowledged < v.sidecars {
                    if lagging.len() < MAX_LAGGING_PER_SCOPE {
                        lagging.insert(id.name().to_owned(), v.acknowledged);
                    } else {
                        behind = true;
                    }
                }
            }
            if let Some(streams) = streams {
                if behind {
                    lagging.clear();
                }
                scopes.push(ScopeReport {
                    ns: scope.namespace.clone(),
                    sa: scope.service_account.clone(),
                    streams,
                    fingerprint: format!("{fingerprint:016x}"),
                    lagging,
                    behind,
                });
            }
        }
        ReplicaReport { scopes }
    }

    fn scope(&self, scope: &Scope) -> Option<&ScopeReport> {
        self.scopes
            .iter()
            .find(|s| s.ns == scope.namespace && s.sa == scope.service_account)
    }

    /// (sidecars, acknowledged) this report contributes to `key`, given the leader's own
    /// fingerprint of the key's scope.
    pub fn counts(&self, key: &KeyId, scope: &Scope, leader_fingerprint: u64) -> (u32, u32) {
        let Some(s) = self.scope(scope) else {
            return (0, 0);
        };
        let agrees = u64::from_str_radix(&s.fingerprint, 16).ok() == Some(leader_fingerprint);
        let acked = if !agrees || s.behind {
            0
        } else {
            s.lagging
                .get(key.name())
                .copied()
                .unwrap_or(s.streams)
                .min(s.streams)
        };
        (s.streams, acked)
    }

    fn scope_set(&self) -> HashSet<Scope> {
        self.scopes
            .iter()
            .map(|s| Scope::new(&s.ns, &s.sa))
            .collect()
    }
}

struct Peer {
    report: ReplicaReport,
    /// When this replica last saw the report written (its own clock: no skew between replicas).
    seen_at: Instant,
}

#[derive(Default)]
struct PeersInner {
    peers: HashMap<String, Peer>,
    /// Scopes whose counts changed since the reconciler last looked.
    dirty: HashSet<Scope>,
}

/// The other replicas' latest reports, as this replica's watch sees them.
pub struct PeerReports {
    own_identity: String,
    /// A report not rewritten for this long belongs to a dead replica and no longer counts.
    ttl: Duration,
    inner: Mutex<PeersInner>,
    changed: Notify,
}

impl PeerReports {
    pub fn new(own_identity: impl Into<String>, ttl: Duration) -> Self {
        PeerReports {
            own_identity: own_identity.into(),
            ttl,
            inner: Mutex::default(),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PeersInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark(&self, inner: &mut PeersInner, scopes: HashSet<Scope>) {
        if !scopes.is_empty() {
            inner.dirty.extend(scopes);
            self.changed.notify_one();
        }
    }

    /// A replica (re)wrote its report. Our own report is ignored: the leader counts its own
    /// streams from its tracker directly.
    pub fn update(&self, replica: &str, report: ReplicaReport, now: Instant) {
        if replica == self.own_identity {
            return;
        }
        let mut inner = self.lock();
        let changed = match inner.peers.get(replica) {
            Some(old) if old.report == report => HashSet::new(),
            Some(old) => changed_scopes(&old.report, &report),
            None => report.scope_set(),
        };
        inner.peers.insert(
            replica.to_owned(),
            Peer {
                report,
                seen_at: now,
            },
        );
        self.mark(&mut inner, changed);
    }

    pub fn remove(&self, replica: &str) {
        let mut inner = self.lock();
        if let Some(old) = inner.peers.remove(replica) {
            let scopes = old.report.scope_set();
            self.mark(&mut inner, scopes);
        }
    }

    /// Forgets reports not rewritten within the TTL; their scopes need a new status.
    pub fn expire(&self, now: Instant) -> Vec<String> {
        let mut inner = self.lock();
        let dead: Vec<String> = inner
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.seen_at) > self.ttl)
            .map(|(id, _)| id.clone())
            .collect();
        let mut scopes = HashSet::new();
        for id in &dead {
            if let Some(p) = inner.peers.remove(id) {
                scopes.extend(p.report.scope_set());
            }
        }
        self.mark(&mut inner, scopes);
        dead
    }

    /// Sums what every live peer contributes to `key`.
    pub fn counts(&self, key: &KeyId, scope: &Scope, leader_fingerprint: u64) -> (u32, u32) {
        let inner = self.lock();
        inner.peers.values().fold((0u32, 0u32), |(s, a), p| {
            let (ps, pa) = p.report.counts(key, scope, leader_fingerprint);
            (s.saturating_add(ps), a.saturating_add(pa))
        })
    }

    /// Waits until some scope's peer counts changed, then returns (and clears) those scopes.
    pub async fn changed_scopes(&self) -> Vec<Scope> {
        loop {
            let notified = self.changed.notified();
            let batch: Vec<Scope> = self.lock().dirty.drain().collect();
            if !batch.is_empty() {
                return batch;
            }
            notified.await;
        }
    }
}

fn changed_scopes(old: &ReplicaReport, new: &ReplicaReport) -> HashSet<Scope> {
    let mut out = HashSet::new();
    for s in &new.scopes {
        let scope = Scope::new(&s.ns, &s.sa);
        if old.scope(&scope) != Some(s) {
            out.insert(scope);
        }
    }
    for s in &old.scopes {
        let scope = Scope::new(&s.ns, &s.sa);
        if new.scope(&scope).is_none() {
            out.insert(scope);
        }
    }
    out
}

/// The leader's status view: its own streams plus every live peer's. The propagation time is
/// the leader's own (peers' streams are counted, not timed), shown like the local one only once
/// every sidecar, the peers' included, holds the revision.
pub fn combine(local: EnforcementView, peers: (u32, u32)) -> EnforcementView {
    let mut combined = EnforcementView {
        sidecars: local.sidecars.saturating_add(peers.0),
        acknowledged: local.acknowledged.saturating_add(peers.1),
        last_propagation_ms: local.last_propagation_ms,
    };
    if !combined.is_complete() {
        combined.last_propagation_ms = None;
    }
    combined
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(sidecars: u32, acknowledged: u32) -> EnforcementView {
        EnforcementView {
            sidecars,
            acknowledged,
            last_propagation_ms: None,
        }
    }

    #[test]
    fn fingerprint_follows_generations_not_order() {
        let a = ScopeKeys::default();
        let b = ScopeKeys::default();
        let scope = Scope::new("ns", "sa");
        a.upsert(&KeyId::new("ns", "k1"), "sa", 1);
        a.upsert(&KeyId::new("ns", "k2"), "sa", 1);
        b.upsert(&KeyId::new("ns", "k2"), "sa", 1);
        b.upsert(&KeyId::new("ns", "k1"), "sa", 1);
        assert_eq!(a.fingerprint(&scope), b.fingerprint(&scope));
        assert_ne!(a.fingerprint(&scope), 0);
        b.upsert(&KeyId::new("ns", "k1"), "sa", 2);
        assert_ne!(a.fingerprint(&scope), b.fingerprint(&scope));
        a.upsert(&KeyId::new("ns", "k1"), "sa", 2);
        assert_eq!(a.fingerprint(&scope), b.fingerprint(&scope));
        // Moving a key to another service account takes it out of the old scope.
        a.upsert(&KeyId::new("ns", "k1"), "other", 3);
        assert_eq!(a.keys_of(&scope), vec![KeyId::new("ns", "k2")]);
        assert_eq!(a.keys_of(&Scope::new("ns", "other")).len(), 1);
        a.remove(&KeyId::new("ns", "k2"));
        assert_eq!(a.fingerprint(&scope), 0);
        a.retain(&HashSet::new());
        assert!(a.scopes().is_empty());
    }

    fn two_key_scope() -> (ScopeKeys, Scope, KeyId, KeyId) {
        let keys = ScopeKeys::default();
        let k1 = KeyId::new("ns", "k1");
        let k2 = KeyId::new("ns", "k2");
        keys.upsert(&k1, "sa", 1);
        keys.upsert(&k2, "sa", 4);
        (keys, Scope::new("ns", "sa"), k1, k2)
    }

    #[test]
    fn report_lists_only_lagging_keys_of_scopes_with_streams() {
        let (keys, scope, k1, k2) = two_key_scope();
        keys.upsert(&KeyId::new("ns", "lonely"), "nobody", 1);
        let report = ReplicaReport::build(&keys, |id, s| {
            if s.service_account == "nobody" {
                view(0, 0)
            } else if id == &k2 {
                view(3, 1)
            } else {
                view(3, 3)
            }
        });
        assert_eq!(report.scopes.len(), 1, "{report:?}");
        let s = &report.scopes[0];
        assert_eq!((s.streams, s.behind), (3, false));
        assert_eq!(s.lagging, BTreeMap::from([("k2".to_owned(), 1)]));
        let fp = keys.fingerprint(&scope);
        assert_eq!(report.counts(&k1, &scope, fp), (3, 3));
        assert_eq!(report.counts(&k2, &scope, fp), (3, 1));
        // A leader that has seen another generation counts the streams but no acks.
        assert_eq!(report.counts(&k1, &scope, fp ^ 1), (3, 0));
        assert_eq!(report.counts(&k1, &Scope::new("ns", "x"), fp), (0, 0));
        // The wire form is compact and round-trips.
        let text = serde_json::to_string(&report).unwrap();
        assert!(!text.contains("behind"), "{text}");
        assert_eq!(
            serde_json::from_str::<ReplicaReport>(&text).unwrap(),
            report
        );
    }

    #[test]
    fn too_many_lagging_keys_count_the_scope_as_unacknowledged() {
        let keys = ScopeKeys::default();
        for i in 0..(MAX_LAGGING_PER_SCOPE + 5) {
            keys.upsert(&KeyId::new("ns", &format!("k{i}")), "sa", 1);
        }
        let report = ReplicaReport::build(&keys, |_, _| view(2, 1));
        let s = &report.scopes[0];
        assert!(s.behind && s.lagging.is_empty(), "{s:?}");
        let scope = Scope::new("ns", "sa");
        let fp = keys.fingerprint(&scope);
        assert_eq!(report.counts(&KeyId::new("ns", "k0"), &scope, fp), (2, 0));
    }

    #[tokio::test]
    async fn peers_sum_ignore_self_and_expire() {
        let (keys, scope, k1, _) = two_key_scope();
        let fp = keys.fingerprint(&scope);
        let report = ReplicaReport::build(&keys, |_, _| view(2, 2));
        let peers = PeerReports::new("me", Duration::from_secs(10));
        let t0 = Instant::now();
        peers.update("me", report.clone(), t0);
        assert_eq!(peers.counts(&k1, &scope, fp), (0, 0), "own report ignored");
        peers.update("b", report.clone(), t0);
        peers.update("c", report.clone(), t0 + Duration::from_secs(8));
        assert_eq!(peers.counts(&k1, &scope, fp), (4, 4));
        assert_eq!(peers.changed_scopes().await, vec![scope.clone()]);
        // Rewriting the same report is no change (the heartbeat), but keeps it alive.
        peers.update("b", report.clone(), t0 + Duration::from_secs(5));
        assert!(peers.lock().dirty.is_empty());
        assert_eq!(
            peers.expire(t0 + Duration::from_secs(14)),
            Vec::<String>::new()
        );
        assert_eq!(peers.expire(t0 + Duration::from_secs(16)), vec!["b"]);
        assert_eq!(peers.counts(&k1, &scope, fp), (2, 2));
        assert_eq!(peers.changed_scopes().await, vec![scope.clone()]);
        peers.remove("c");
        assert_eq!(peers.counts(&k1, &scope, fp), (0, 0));
        let local = view(1, 0);
        assert_eq!(combine(local, (2, 2)), view(3, 2));
    }

    #[test]
    fn propagation_time_waits_for_the_peers_sidecars_too() {
        let timed = |sidecars, acknowledged| EnforcementView {
            last_propagation_ms: Some(9),
            ..view(sidecars, acknowledged)
        };
        // The leader's own sidecars all acked; one of a peer's has not.
        assert_eq!(combine(timed(2, 2), (3, 2)), view(5, 4));
        assert_eq!(combine(timed(2, 2), (3, 3)), timed(5, 5));
        assert_eq!(combine(timed(0, 0), (0, 0)), timed(0, 0));
    }
}
