//! Acknowledgement tracking: which revision each connected sidecar stream has applied, turned
//! into per-key [`EnforcementView`]s and propagation latencies. Pure bookkeeping; the stream
//! server feeds it and the reconciler reads it.
//!
//! A stream is one number (the highest revision it acknowledged); a key is enforced by a stream
//! when that number reaches the revision at which the key last changed. Per scope, a count of
//! streams per acknowledged revision answers "how many sidecars hold revision R" without
//! looking at keys, and an ack touches only the changes between its old and new revision
//! (normally one), never every key × every stream.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use keybrake_api::KeyId;
use tokio::sync::Notify;

use crate::{
    index::{Scope, ScopeFeed},
    lifecycle::EnforcementView,
};

/// Identifies one sidecar's watch stream inside this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

/// Keys whose counts merely moved (a partial ack, a sidecar came or went) are handed to the
/// reconciler at most this often, so status is not rewritten per ack. A revision that every
/// sidecar acknowledged is handed over at once.
pub const PROGRESS_PERIOD: Duration = Duration::from_secs(1);

struct StreamEntry {
    scope: Scope,
    feed: Arc<ScopeFeed>,
    /// Highest revision acknowledged; 0 until the snapshot is.
    acked: u64,
    /// Highest revision written to the stream: what its acks may refer to.
    sent: u64,
    /// The snapshot's revision; later changes reached this stream live and count for latency.
    live_after: u64,
}

#[derive(Default)]
struct ScopeAcks {
    streams: HashSet<StreamId>,
    /// Acknowledged revision → number of this scope's streams at it.
    acked: BTreeMap<u64, u32>,
}

impl ScopeAcks {
    fn add(&mut self, revision: u64) {
        *self.acked.entry(revision).or_default() += 1;
    }

    fn remove(&mut self, revision: u64) {
        if let Some(n) = self.acked.get_mut(&revision) {
            *n -= 1;
            if *n == 0 {
                self.acked.remove(&revision);
            }
        }
    }

    /// The revision every stream of the scope has acknowledged (`None` without streams).
    fn floor(&self) -> Option<u64> {
        self.acked.keys().next().copied()
    }

    fn at_least(&self, revision: u64) -> usize {
        self.acked.range(revision..).map(|(_, n)| *n as usize).sum()
    }
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    streams: HashMap<StreamId, StreamEntry>,
    scopes: HashMap<Scope, ScopeAcks>,
    /// Per key: its latest revision that reached a stream live, and the slowest live ack of it
    /// so far (change seen → ack). Snapshot acks never enter it: see [`EnforcementTracker::view`].
    live_latency: HashMap<KeyId, (u64, Duration)>,
    /// Keys to hand to the reconciler now: a revision of theirs became fully acknowledged.
    dirty: HashSet<KeyId>,
    /// Keys whose counts moved, handed over at most once per [`PROGRESS_PERIOD`].
    progress: HashSet<KeyId>,
    /// Scopes whose sidecar count changed: all their keys count as `progress`.
    progress_scopes: HashMap<Scope, Arc<ScopeFeed>>,
    last_progress: Option<tokio::time::Instant>,
}

impl Inner {
    /// The scope's floor moved from `before` to `after`: the keys that changed in between are
    /// now enforced by every sidecar. Whatever moved it (a live ack, a snapshot ack, the
    /// slowest stream leaving), their latency is already in `live_latency`.
    fn completed_between(&mut self, feed: &ScopeFeed, before: Option<u64>, after: Option<u64>) {
        let (Some(before), Some(after)) = (before, after) else {
            return;
        };
        if after <= before {
            return;
        }
        self.dirty.extend(feed.keys_changed_between(before, after));
    }

    /// `key` left its scope at `revision`: drop its latency unless a newer revision (the key
    /// republished elsewhere) already replaced it.
    fn forget_live_ack(&mut self, key: &KeyId, revision: u64) {
        if self
            .live_latency
            .get(key)
            .is_some_and(|(seen, _)| *seen <= revision)
        {
            self.live_latency.remove(key);
        }
    }

    /// A stream acknowledged `revision` of `key`, which reached it live, `latency` after the
    /// change was seen: keep the slowest ack of the key's newest such revision.
    fn record_live_ack(&mut self, key: &KeyId, revision: u64, latency: Duration) {
        match self.live_latency.get_mut(key) {
            Some((seen, slowest)) if *seen == revision => *slowest = (*slowest).max(latency),
            Some((seen, _)) if *seen > revision => {}
            _ => {
                self.live_latency.insert(key.clone(), (revision, latency));
            }
        }
    }
}

/// Why an ack was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("no such stream on this replica")]
    UnknownStream,
    #[error("the stream belongs to another service account")]
    WrongScope,
    #[error("revision {0} was never sent on this stream")]
    FutureRevision(u64),
}

/// One sidecar's acknowledgement of one key revision: the propagation latency to record.
#[derive(Debug, Clone, PartialEq)]
pub struct Acknowledged {
    pub key: KeyId,
    pub latency: Duration,
}

pub struct EnforcementTracker {
    inner: Mutex<Inner>,
    changed: Notify,
    progress_period: Duration,
}

impl Default for EnforcementTracker {
    fn default() -> Self {
        EnforcementTracker {
            inner: Mutex::default(),
            changed: Notify::new(),
            progress_period: PROGRESS_PERIOD,
        }
    }
}

impl EnforcementTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hands mere progress to the reconciler at most once per `period` (default
    /// [`PROGRESS_PERIOD`]).
    pub fn with_progress_period(mut self, period: Duration) -> Self {
        self.progress_period = period;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new stream of `scope`, fed from `feed`, that was sent a snapshot at `snapshot_revision`:
    /// its scope's keys gain a sidecar.
    pub fn register(&self, scope: Scope, feed: Arc<ScopeFeed>, snapshot_revision: u64) -> StreamId {
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = StreamId(inner.next_id);
        let acks = inner.scopes.entry(scope.clone()).or_default();
        acks.streams.insert(id);
        acks.add(0);
        inner.progress_scopes.insert(scope.clone(), feed.clone());
        inner.streams.insert(
            id,
            StreamEntry {
                scope,
                feed,
                acked: 0,
                sent: snapshot_revision,
                live_after: snapshot_revision,
            },
        );
        drop(inner);
        self.changed.notify_one();
        id
    }

    pub fn unregister(&self, id: StreamId) {
        let mut inner = self.lock();
        let Some(entry) = inner.streams.remove(&id) else {
            return;
        };
        let (before, after) = match inner.scopes.get_mut(&entry.scope) {
            Some(acks) => {
                let before = acks.floor();
                acks.streams.remove(&id);
                acks.remove(entry.acked);
                let after = acks.floor();
                if acks.streams.is_empty() {
                    inner.scopes.remove(&entry.scope);
                }
                (before, after)
            }
            None => (None, None),
        };
        // The slowest sidecar leaving can complete what the others already acknowledged.
        inner.completed_between(&entry.feed, before, after);
        inner
            .progress_scopes
            .insert(entry.scope.clone(), entry.feed.clone());
        drop(inner);
        self.changed.notify_one();
    }

    /// Records that everything up to `revision` was written to stream `id`.
    pub fn sent(&self, id: StreamId, revision: u64) {
        if let Some(entry) = self.lock().streams.get_mut(&id) {
            entry.sent = entry.sent.max(revision);
        }
    }

    /// Stream `id` (authenticated as `scope`) applied everything up to `revision`. Returns one
    /// entry per key revision this ack newly covers that reached the stream live (not in its
    /// snapshot), for the latency histogram.
    pub fn ack(
        &self,
        id: StreamId,
        scope: &Scope,
        revision: u64,
        now: Instant,
    ) -> Result<Vec<Acknowledged>, AckError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let entry = inner.streams.get_mut(&id).ok_or(AckError::UnknownStream)?;
        if entry.scope != *scope {
            return Err(AckError::WrongScope);
        }
        if revision > entry.sent.max(entry.acked) {
            return Err(AckError::FutureRevision(revision));
        }
        let previous = entry.acked;
        if revision <= previous {
            return Ok(Vec::new());
        }
        entry.acked = revision;
        let feed = entry.feed.clone();
        let live_after = entry.live_after;
        let (before, after) = match inner.scopes.get_mut(scope) {
            Some(acks) => {
                let before = acks.floor();
                acks.remove(previous);
                acks.add(revision);
                (before, acks.floor())
            }
            None => (None, None),
        };
        let mut out = Vec::new();
        for change in feed.logged_between(previous.max(live_after), revision) {
            let latency = now.saturating_duration_since(change.observed_at);
            if change.removal {
                // Nothing left to report on; keys are short-lived, so keeping them would grow
                // without bound.
                inner.forget_live_ack(&change.key, change.revision);
            } else {
                inner.record_live_ack(&change.key, change.revision, latency);
            }
            out.push(Acknowledged {
                key: change.key.clone(),
                latency,
            });
        }
        let completed = matches!((before, after), (Some(b), Some(a)) if a > b);
        if completed {
            inner.completed_between(&feed, before, after);
        } else if previous < live_after {
            // A snapshot ack moves every key of the scope: expanded once, at the next flush.
            inner.progress_scopes.insert(scope.clone(), feed);
        } else {
            inner
                .progress
                .extend(feed.keys_changed_between(previous, revision));
        }
        drop(guard);
        self.changed.notify_one();
        Ok(out)
    }

    /// Enforcement of key `key` whose latest revision in `scope` is `revision`.
    ///
    /// `last_propagation_ms` (status `lastPropagationMs`): change seen → the slowest ack of
    /// `revision` by a stream that received it live, reported once every stream holds it,
    /// however that came about (the last live ack, a new sidecar's snapshot ack, the slowest
    /// stream leaving). A snapshot ack is not timed: the change may predate the sidecar by
    /// days. `None` while `revision` propagates, and when no stream received it live (every
    /// sidecar got it in its first snapshot): there was no propagation to time.
    pub fn view(&self, key: &KeyId, scope: &Scope, revision: u64) -> EnforcementView {
        let inner = self.lock();
        let (sidecars, acknowledged) = inner
            .scopes
            .get(scope)
            .map_or((0, 0), |a| (a.streams.len(), a.at_least(revision)));
        let complete = acknowledged >= sidecars;
        EnforcementView {
            sidecars: u32::try_from(sidecars).unwrap_or(u32::MAX),
            acknowledged: u32::try_from(acknowledged).unwrap_or(u32::MAX),
            last_propagation_ms: inner
                .live_latency
                .get(key)
                .filter(|(seen, _)| complete && *seen == revision)
                .map(|(_, d)| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// Number of connected streams.
    pub fn streams(&self) -> usize {
        self.lock().streams.len()
    }

    /// Waits until some key's enforcement changed, then returns (and clears) those keys. Fully
    /// acknowledged revisions come back at once; mere progress at most once per
    /// [`PROGRESS_PERIOD`]. Callers coalesce naturally: everything that changed while they were
    /// busy comes back in one batch.
    pub async fn changed_keys(&self) -> Vec<KeyId> {
        loop {
            let notified = self.changed.notified();
            let progress_due = {
                let mut inner = self.lock();
                let now = tokio::time::Instant::now();
                let mut batch: Vec<KeyId> = inner.dirty.drain().collect();
                let pending = !inner.progress.is_empty() || !inner.progress_scopes.is_empty();
                let due = inner
                    .last_progress
                    .map_or(now, |last| last + self.progress_period);
                if pending && due <= now {
                    inner.last_progress = Some(now);
                    let progress = std::mem::take(&mut inner.progress);
                    batch.extend(progress);
                    for (_, feed) in std::mem::take(&mut inner.progress_scopes) {
                        batch.extend(feed.keys_changed_between(0, u64::MAX));
                    }
                }
                if !batch.is_empty() {
                    let unique: HashSet<KeyId> = batch.into_iter().collect();
                    return unique.into_iter().collect();
                }
                pending.then_some(due)
            };
            match progress_due {
                Some(due) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(due) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use keybrake_api::{
        AgentRef, KeyState, Limits, OnStale, SecretKeyRef, Upstream, VaultKeySpec, Vendor,
        WorkloadRef,
    };

    use super::*;
    use crate::index::{KeySource, PolicyIndex};

    fn source(state: KeyState) -> KeySource {
        KeySource {
            spec: VaultKeySpec {
                vendor: Vendor::Openai,
                upstream: Upstream {
                    secret_ref: SecretKeyRef {
                        name: "s".into(),
                        key: "k".into(),
                    },
                    base_url: None,
                },
                state,
                expires_at: None,
                ttl: None,
                agent: AgentRef {
                    name: "a".into(),
                    run_id: None,
                },
                workload: WorkloadRef {
                    service_account_name: "sa".into(),
                },
                allow: vec![],
                customers: vec![],
                limits: Limits::default(),
                on_stale: OnStale::Deny,
            },
            created: None,
            generation: 1,
        }
    }

    /// An index holding `n` keys ns/k0.. of scope ns/sa.
    fn index_with(n: usize) -> (PolicyIndex, Scope, Vec<KeyId>) {
        let index = PolicyIndex::new(1);
        let data = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.as_bytes().to_vec())]);
        index.upsert_secret("ns", "s", data("k", "sk"));
        let keys: Vec<KeyId> = (0..n).map(|i| KeyId::new("ns", &format!("k{i}"))).collect();
        for key in &keys {
            let token = crate::token::token_secret_name(key.name());
            index.upsert_secret("ns", &token, data("VAULT_KEY", "vault_key_x"));
            index.upsert_vault_key(key.clone(), source(KeyState::Active));
        }
        (index, Scope::new("ns", "sa"), keys)
    }

    fn connect(t: &EnforcementTracker, index: &PolicyIndex, scope: &Scope) -> (StreamId, u64) {
        let (feed, _rx) = index.subscribe(scope);
        let revision = feed.snapshot(0).revision;
        (t.register(scope.clone(), feed, revision), revision)
    }

    async fn changed(t: &EnforcementTracker) -> Vec<KeyId> {
        let mut keys = tokio::time::timeout(Duration::from_secs(5), t.changed_keys())
            .await
            .expect("changed keys within 5 s");
        keys.sort();
        keys
    }

    #[tokio::test]
    async fn propagated_only_when_every_sidecar_acked() {
        let t = EnforcementTracker::new().with_progress_period(Duration::from_millis(200));
        let (index, scope, keys) = index_with(1);
        let key = keys[0].clone();
        let (s1, rev) = connect(&t, &index, &scope);
        let (s2, _) = connect(&t, &index, &scope);
        // Sidecars arrived: progress, handed over at once after a quiet period.
        assert_eq!(changed(&t).await, vec![key.clone()]);
        // Snapshot acks carry no propagation latency (the change predates the stream).
        assert!(t.ack(s1, &scope, rev, Instant::now()).unwrap().is_empty());
        t.ack(s2, &scope, rev, Instant::now()).unwrap();
        let v = t.view(&key, &scope, rev);
        assert_eq!((v.sidecars, v.acknowledged), (2, 2));
        // Every sidecar holds it: handed over at once, inside the progress period.
        assert_eq!(changed(&t).await, vec![key.clone()]);

        // Revocation: one ack is not enough.
        index.upsert_vault_key(key.clone(), source(KeyState::Revoked));
        let (feed, _rx) = index.subscribe(&scope);
        let revoked = feed.grant(&key).unwrap();
        let r2 = revoked.revision;
        t.sent(s1, r2);
        t.sent(s2, r2);
        let acked = t
            .ack(
                s1,
                &scope,
                r2,
                revoked.observed_at + Duration::from_millis(7),
            )
            .unwrap();
        assert_eq!(
            acked,
            vec![Acknowledged {
                key: key.clone(),
                latency: Duration::from_millis(7)
            }]
        );
        let v = t.view(&key, &scope, r2);
        assert_eq!((v.sidecars, v.acknowledged), (2, 1));
        assert!(!v.is_complete());
        t.ack(
            s2,
            &scope,
            r2,
            revoked.observed_at + Duration::from_millis(30),
        )
        .unwrap();
        let v = t.view(&key, &scope, r2);
        assert!(v.is_complete());
        assert_eq!(v.last_propagation_ms, Some(30));
        let started = Instant::now();
        assert_eq!(changed(&t).await, vec![key.clone()]);
        assert!(
            started.elapsed() < Duration::from_millis(150),
            "completion is not throttled"
        );
        // The partial ack's progress comes later, coalesced.
        assert_eq!(changed(&t).await, vec![key.clone()]);

        // A disconnect shrinks the denominator.
        t.unregister(s2);
        assert_eq!(t.view(&key, &scope, r2).sidecars, 1);
        assert_eq!(t.streams(), 1);
    }

    #[tokio::test]
    async fn the_slowest_sidecar_leaving_completes_the_revision() {
        let t = EnforcementTracker::new().with_progress_period(Duration::from_secs(3600));
        let (index, scope, keys) = index_with(3);
        let streams: Vec<(StreamId, u64)> = (0..3).map(|_| connect(&t, &index, &scope)).collect();
        for (s, rev) in &streams {
            t.ack(*s, &scope, *rev, Instant::now()).unwrap();
        }
        let _ = changed(&t).await;
        index.upsert_vault_key(keys[1].clone(), source(KeyState::Revoked));
        let r2 = index.published(&keys[1]).unwrap().1;
        for (s, _) in &streams {
            t.sent(*s, r2);
        }
        t.ack(streams[0].0, &scope, r2, Instant::now()).unwrap();
        t.ack(streams[1].0, &scope, r2, Instant::now()).unwrap();
        assert_eq!(t.view(&keys[1], &scope, r2).acknowledged, 2);
        // Other keys are at older revisions: every sidecar still holds them.
        let old = index.published(&keys[0]).unwrap().1;
        assert_eq!(t.view(&keys[0], &scope, old).acknowledged, 3);
        t.unregister(streams[2].0);
        let v = t.view(&keys[1], &scope, r2);
        assert!(v.is_complete() && v.sidecars == 2);
        assert!(changed(&t).await.contains(&keys[1]));
    }

    /// Revokes `key` and writes the new revision to `streams`; returns it and when it was seen.
    fn revoke(
        t: &EnforcementTracker,
        index: &PolicyIndex,
        scope: &Scope,
        key: &KeyId,
        state: KeyState,
        streams: &[StreamId],
    ) -> (u64, Instant) {
        index.upsert_vault_key(key.clone(), source(state));
        let (feed, _rx) = index.subscribe(scope);
        let change = feed.grant(key).unwrap();
        for s in streams {
            t.sent(*s, change.revision);
        }
        (change.revision, change.observed_at)
    }

    #[test]
    fn a_snapshot_ack_completing_a_revision_reports_the_live_acks_latency() {
        let t = EnforcementTracker::new();
        let (index, scope, keys) = index_with(1);
        let key = &keys[0];
        let (s1, rev) = connect(&t, &index, &scope);
        t.ack(s1, &scope, rev, Instant::now()).unwrap();
        // A first change, fully acknowledged live in 30 ms.
        let (r2, seen2) = revoke(&t, &index, &scope, key, KeyState::Suspended, &[s1]);
        t.ack(s1, &scope, r2, seen2 + Duration::from_millis(30))
            .unwrap();
        assert_eq!(t.view(key, &scope, r2).last_propagation_ms, Some(30));

        // The revoke: s1 acks it live in 7 ms, while s2 connects with a snapshot that already
        // holds it. Until s2 acks that snapshot the revision is not everywhere: nothing reported
        // (not r2's 30 ms either: that was another revision).
        let (r3, seen3) = revoke(&t, &index, &scope, key, KeyState::Revoked, &[s1]);
        let (s2, snapshot) = connect(&t, &index, &scope);
        assert!(snapshot >= r3, "s2's snapshot holds the revoke");
        t.ack(s1, &scope, r3, seen3 + Duration::from_millis(7))
            .unwrap();
        let v = t.view(key, &scope, r3);
        assert_eq!(
            (v.sidecars, v.acknowledged, v.last_propagation_ms),
            (2, 1, None)
        );
        // s2's snapshot ack completes the revision; a new sidecar's start-up time is not
        // propagation latency, so the revoke took what its live ack took.
        let late = t
            .ack(s2, &scope, snapshot, seen3 + Duration::from_secs(5))
            .unwrap();
        assert!(late.is_empty(), "a snapshot ack times nothing");
        let v = t.view(key, &scope, r3);
        assert!(v.is_complete());
        assert_eq!(v.last_propagation_ms, Some(7));
    }

    #[test]
    fn a_revision_no_sidecar_received_live_has_no_propagation_time() {
        let t = EnforcementTracker::new();
        let (index, scope, keys) = index_with(1);
        let key = &keys[0];
        // Changed while no sidecar was connected: the first one gets it in its snapshot.
        let (r2, seen) = revoke(&t, &index, &scope, key, KeyState::Revoked, &[]);
        let (s1, snapshot) = connect(&t, &index, &scope);
        t.ack(s1, &scope, snapshot, seen + Duration::from_secs(60))
            .unwrap();
        let v = t.view(key, &scope, r2);
        assert!(v.is_complete() && v.sidecars == 1);
        assert_eq!(v.last_propagation_ms, None);
    }

    #[test]
    fn the_slowest_sidecar_leaving_reports_the_last_live_ack_not_the_departure() {
        let t = EnforcementTracker::new();
        let (index, scope, keys) = index_with(1);
        let key = &keys[0];
        let (s1, rev) = connect(&t, &index, &scope);
        let (s2, _) = connect(&t, &index, &scope);
        t.ack(s1, &scope, rev, Instant::now()).unwrap();
        t.ack(s2, &scope, rev, Instant::now()).unwrap();
        let (r2, seen) = revoke(&t, &index, &scope, key, KeyState::Revoked, &[s1, s2]);
        t.ack(s1, &scope, r2, seen + Duration::from_millis(12))
            .unwrap();
        assert_eq!(t.view(key, &scope, r2).last_propagation_ms, None);
        t.unregister(s2);
        let v = t.view(key, &scope, r2);
        assert!(v.is_complete());
        assert_eq!(v.last_propagation_ms, Some(12));
    }

    #[test]
    fn a_deleted_keys_propagation_time_is_forgotten_once_acked() {
        let t = EnforcementTracker::new();
        let (index, scope, keys) = index_with(2);
        let (s, rev) = connect(&t, &index, &scope);
        t.ack(s, &scope, rev, Instant::now()).unwrap();
        let (r2, seen) = revoke(&t, &index, &scope, &keys[0], KeyState::Revoked, &[s]);
        t.ack(s, &scope, r2, seen + Duration::from_millis(5))
            .unwrap();
        assert_eq!(t.view(&keys[0], &scope, r2).last_propagation_ms, Some(5));
        index.remove_vault_key(&keys[0]);
        let deleted_at = index.revision();
        t.sent(s, deleted_at);
        t.ack(s, &scope, deleted_at, Instant::now()).unwrap();
        assert_eq!(t.view(&keys[0], &scope, r2).last_propagation_ms, None);
        assert!(t.lock().live_latency.is_empty());
    }

    #[tokio::test]
    async fn many_streams_and_keys_track_one_revocation() {
        let t = EnforcementTracker::new();
        let (index, scope, keys) = index_with(500);
        let streams: Vec<(StreamId, u64)> =
            (0..1000).map(|_| connect(&t, &index, &scope)).collect();
        for (s, rev) in &streams {
            t.ack(*s, &scope, *rev, Instant::now()).unwrap();
        }
        let _ = changed(&t).await;
        index.upsert_vault_key(keys[7].clone(), source(KeyState::Revoked));
        let r2 = index.published(&keys[7]).unwrap().1;
        let mut latencies = 0;
        for (i, (s, _)) in streams.iter().enumerate() {
            t.sent(*s, r2);
            let acked = t.ack(*s, &scope, r2, Instant::now()).unwrap();
            assert!(acked.iter().all(|a| a.key == keys[7]));
            latencies += acked.len();
            let v = t.view(&keys[7], &scope, r2);
            assert_eq!(v.acknowledged as usize, i + 1);
        }
        assert_eq!(latencies, 1000, "one latency per sidecar");
        assert!(t.view(&keys[7], &scope, r2).is_complete());
        assert_eq!(changed(&t).await, vec![keys[7].clone()]);
    }

    #[test]
    fn acks_are_checked_against_stream_and_scope() {
        let t = EnforcementTracker::new();
        let (index, scope, _) = index_with(1);
        let (s, rev) = connect(&t, &index, &scope);
        assert_eq!(
            t.ack(s, &Scope::new("ns", "other"), rev, Instant::now()),
            Err(AckError::WrongScope)
        );
        assert_eq!(
            t.ack(StreamId(999), &scope, rev, Instant::now()),
            Err(AckError::UnknownStream)
        );
        assert_eq!(
            t.ack(s, &scope, rev + 1, Instant::now()),
            Err(AckError::FutureRevision(rev + 1))
        );
        assert!(t.ack(s, &scope, rev, Instant::now()).is_ok());
        assert!(t.ack(s, &scope, rev, Instant::now()).unwrap().is_empty());
        assert_eq!(t.view(&KeyId::new("ns", "k0"), &scope, rev).acknowledged, 1);
    }
}
