//! Acknowledgement tracking: which connected sidecar streams hold which revision, turned into
//! per-key [`EnforcementView`]s and propagation latencies. Pure bookkeeping; the stream server
//! feeds it and the reconciler reads it.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use keybrake_api::KeyId;
use tokio::sync::Notify;

use crate::{
    index::{Scope, ScopeState},
    lifecycle::EnforcementView,
};

/// Identifies one sidecar's watch stream inside this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

struct StreamEntry {
    scope: Scope,
    acked: u64,
    /// The state last written to this stream: what its acks refer to.
    sent: Arc<ScopeState>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    streams: HashMap<StreamId, StreamEntry>,
    by_scope: HashMap<Scope, HashSet<StreamId>>,
    /// Per key: (revision, API-write-to-last-ack) of the latest fully acknowledged revision.
    completed: HashMap<KeyId, (u64, Duration)>,
    dirty: HashSet<KeyId>,
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

#[derive(Default)]
pub struct EnforcementTracker {
    inner: Mutex<Inner>,
    changed: Notify,
}

impl EnforcementTracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new stream: its scope's keys gain a sidecar.
    pub fn register(&self, scope: Scope, initial: Arc<ScopeState>) -> StreamId {
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = StreamId(inner.next_id);
        let keys: Vec<KeyId> = initial.keys.keys().cloned().collect();
        inner.by_scope.entry(scope.clone()).or_default().insert(id);
        inner.streams.insert(
            id,
            StreamEntry {
                scope,
                acked: 0,
                sent: initial,
            },
        );
        inner.dirty.extend(keys);
        drop(inner);
        self.changed.notify_one();
        id
    }

    pub fn unregister(&self, id: StreamId) {
        let mut inner = self.lock();
        let Some(entry) = inner.streams.remove(&id) else {
            return;
        };
        if let Some(set) = inner.by_scope.get_mut(&entry.scope) {
            set.remove(&id);
            if set.is_empty() {
                inner.by_scope.remove(&entry.scope);
            }
        }
        inner.dirty.extend(entry.sent.keys.keys().cloned());
        drop(inner);
        self.changed.notify_one();
    }

    /// Records the state just written to stream `id`; keys that changed await acks again.
    pub fn sent(&self, id: StreamId, state: Arc<ScopeState>) {
        let mut inner = self.lock();
        let Some(entry) = inner.streams.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut entry.sent, state.clone());
        let changed: Vec<KeyId> = state
            .keys
            .iter()
            .filter(|(k, g)| old.keys.get(*k).is_none_or(|o| o.revision != g.revision))
            .map(|(k, _)| k.clone())
            .chain(
                old.keys
                    .keys()
                    .filter(|k| !state.keys.contains_key(*k))
                    .cloned(),
            )
            .collect();
        inner.dirty.extend(changed);
        drop(inner);
        self.changed.notify_one();
    }

    /// Stream `id` (authenticated as `scope`) applied everything up to `revision`. Returns one
    /// entry per key revision this ack newly covers, for the latency histogram.
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
        if revision > entry.sent.revision.max(entry.acked) {
            return Err(AckError::FutureRevision(revision));
        }
        let previous = entry.acked;
        if revision <= previous {
            return Ok(Vec::new());
        }
        entry.acked = revision;
        let sent = entry.sent.clone();
        let peers: Vec<u64> = inner
            .by_scope
            .get(scope)
            .into_iter()
            .flatten()
            .filter_map(|s| inner.streams.get(s).map(|e| e.acked))
            .collect();
        let mut out = Vec::new();
        for (key, grant) in &sent.keys {
            if grant.revision <= previous || grant.revision > revision {
                continue;
            }
            let latency = now.saturating_duration_since(grant.observed_at);
            out.push(Acknowledged {
                key: key.clone(),
                latency,
            });
            if peers.iter().all(|acked| *acked >= grant.revision) {
                inner
                    .completed
                    .insert(key.clone(), (grant.revision, latency));
            }
            inner.dirty.insert(key.clone());
        }
        drop(guard);
        if !out.is_empty() {
            self.changed.notify_one();
        }
        Ok(out)
    }

    /// Enforcement of key `key` whose latest revision in `scope` is `revision`.
    pub fn view(&self, key: &KeyId, scope: &Scope, revision: u64) -> EnforcementView {
        let inner = self.lock();
        let streams = inner.by_scope.get(scope);
        let sidecars = streams.map_or(0, HashSet::len);
        let acknowledged = streams
            .into_iter()
            .flatten()
            .filter(|s| inner.streams.get(s).is_some_and(|e| e.acked >= revision))
            .count();
        EnforcementView {
            sidecars: u32::try_from(sidecars).unwrap_or(u32::MAX),
            acknowledged: u32::try_from(acknowledged).unwrap_or(u32::MAX),
            last_propagation_ms: inner
                .completed
                .get(key)
                .map(|(_, d)| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// Number of connected streams.
    pub fn streams(&self) -> usize {
        self.lock().streams.len()
    }

    /// Waits until some key's enforcement changed, then returns (and clears) those keys. Callers
    /// coalesce naturally: everything that changed while they were busy comes back in one batch.
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
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use keybrake_api::{
        AgentRef, KeyGrant, KeyState, Limits, OnStale, SecretKeyRef, SecretString, TokenHash,
        Upstream, VaultKeySpec, Vendor, WorkloadRef,
    };

    use super::*;
    use crate::index::ScopedGrant;

    fn grant(id: &KeyId) -> KeyGrant {
        let spec = VaultKeySpec {
            vendor: Vendor::Openai,
            upstream: Upstream {
                secret_ref: SecretKeyRef {
                    name: "s".into(),
                    key: "k".into(),
                },
                base_url: None,
            },
            state: KeyState::Active,
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
        };
        KeyGrant::from_spec(
            id.clone(),
            &spec,
            TokenHash::of("t"),
            SecretString::new("s"),
            None,
            1,
        )
        .unwrap()
    }

    fn state(revision: u64, key: &KeyId, key_revision: u64, at: Instant) -> Arc<ScopeState> {
        Arc::new(ScopeState {
            revision,
            keys: BTreeMap::from([(
                key.clone(),
                Arc::new(ScopedGrant {
                    revision: key_revision,
                    observed_at: at,
                    grant: grant(key),
                }),
            )]),
        })
    }

    #[tokio::test]
    async fn propagated_only_when_every_sidecar_acked() {
        let t = EnforcementTracker::new();
        let scope = Scope::new("ns", "sa");
        let key = KeyId::new("ns", "k");
        let t0 = Instant::now();
        let s1 = t.register(scope.clone(), state(10, &key, 10, t0));
        let s2 = t.register(scope.clone(), state(10, &key, 10, t0));
        assert_eq!(t.changed_keys().await, vec![key.clone()]);
        t.ack(s1, &scope, 10, t0).unwrap();
        t.ack(s2, &scope, 10, t0).unwrap();
        let v = t.view(&key, &scope, 10);
        assert_eq!((v.sidecars, v.acknowledged), (2, 2));

        // Revocation at revision 11: one ack is not enough.
        let revoked = state(11, &key, 11, t0);
        t.sent(s1, revoked.clone());
        t.sent(s2, revoked);
        let acked = t
            .ack(s1, &scope, 11, t0 + Duration::from_millis(7))
            .unwrap();
        assert_eq!(acked[0].latency, Duration::from_millis(7));
        let v = t.view(&key, &scope, 11);
        assert_eq!((v.sidecars, v.acknowledged), (2, 1));
        assert!(!v.is_complete());
        t.ack(s2, &scope, 11, t0 + Duration::from_millis(30))
            .unwrap();
        let v = t.view(&key, &scope, 11);
        assert!(v.is_complete());
        assert_eq!(v.last_propagation_ms, Some(30));
        assert_eq!(t.changed_keys().await, vec![key.clone()]);

        // A disconnect shrinks the denominator.
        t.unregister(s2);
        assert_eq!(t.view(&key, &scope, 11).sidecars, 1);
        assert_eq!(t.streams(), 1);
    }

    #[test]
    fn acks_are_checked_against_stream_and_scope() {
        let t = EnforcementTracker::new();
        let scope = Scope::new("ns", "sa");
        let key = KeyId::new("ns", "k");
        let s = t.register(scope.clone(), state(5, &key, 5, Instant::now()));
        assert_eq!(
            t.ack(s, &Scope::new("ns", "other"), 5, Instant::now()),
            Err(AckError::WrongScope)
        );
        assert_eq!(
            t.ack(StreamId(999), &scope, 5, Instant::now()),
            Err(AckError::UnknownStream)
        );
        assert_eq!(
            t.ack(s, &scope, 6, Instant::now()),
            Err(AckError::FutureRevision(6))
        );
        assert_eq!(t.ack(s, &scope, 5, Instant::now()).unwrap().len(), 1);
        assert!(t.ack(s, &scope, 5, Instant::now()).unwrap().is_empty());
    }
}
