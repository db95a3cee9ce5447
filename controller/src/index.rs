//! The policy index: VaultKeys + the Secrets they reference → one [`KeyGrant`] per key, grouped
//! by subscriber scope (namespace, service account). Each scope has a [`ScopeFeed`]: its current
//! keys (for snapshots) and a bounded log of recent changes, each encoded as its NDJSON line
//! once, when it is published. Streams hold only a cursor (the last revision they sent) and
//! share those lines; a stream that fell behind the log gets a fresh snapshot instead. No I/O:
//! the Kubernetes watchers feed it, the tests call it directly.
use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use bytes::Bytes;
use jiff::Timestamp;
use keybrake_api::{
    KeyGrant, KeyId, SecretString, TokenHash, VaultKeySpec,
    stream::{MAX_LINE_BYTES, SNAPSHOT_PART_BYTES},
};
use serde::Serialize;
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

/// How many recent changes a scope keeps for its streams. A stream further behind than this
/// (a burst such as an upstream Secret rotation touching many keys) is sent a snapshot.
pub const CHANGE_LOG_LEN: usize = 256;

/// One change of one scope, as every stream of the scope sends it.
#[derive(Debug)]
pub struct Change {
    pub revision: u64,
    pub key: KeyId,
    pub observed_at: Instant,
    /// The key left the scope (deleted, moved to another service account, or unpublishable).
    pub removal: bool,
    /// The NDJSON line, newline included, encoded once and shared by every stream.
    pub line: Bytes,
}

/// A scope's snapshot as NDJSON lines: zero or more `snapshotPart` lines and one `snapshot`.
#[derive(Debug)]
pub struct EncodedSnapshot {
    /// The revision written on the lines (at least the stream's resume point).
    pub revision: u64,
    /// The scope revision the snapshot reflects: the stream continues from there.
    pub cursor: u64,
    pub keys: usize,
    pub lines: Vec<Bytes>,
}

/// What a stream at some cursor sends next.
#[derive(Debug)]
pub enum Catchup {
    /// Every change after the cursor, in revision order; `cursor` is the last one's revision.
    Changes { lines: Vec<Bytes>, cursor: u64 },
    /// Some change after the cursor has left the log: send a snapshot.
    Lagged,
}

/// The wire form of the events the index encodes, borrowing instead of cloning grants. Must
/// decode as [`keybrake_api::stream::WatchEvent`] (tested).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum WireEvent<'a> {
    Upsert { revision: u64, key: &'a KeyGrant },
    Delete { revision: u64, id: &'a KeyId },
}

fn encode_line(event: &WireEvent<'_>) -> Bytes {
    let mut line = serde_json::to_vec(event).expect("grants serialize");
    line.push(b'\n');
    Bytes::from(line)
}

/// Room kept on every line for the envelope around one grant (type, revision, brackets).
const ENVELOPE_BYTES: usize = 128;

/// Encodes `grants` as snapshot lines at `revision`, each below the line bound: grants are
/// packed up to [`SNAPSHOT_PART_BYTES`] per line (a grant is never split; the index refuses
/// grants that do not fit a line on their own).
pub fn encode_snapshot<'a>(
    revision: u64,
    grants: impl IntoIterator<Item = &'a KeyGrant>,
) -> Vec<Bytes> {
    fn finish(lines: &mut Vec<Bytes>, revision: u64, body: &[u8], last: bool) {
        let kind = if last { "snapshot" } else { "snapshotPart" };
        let mut line = Vec::with_capacity(body.len() + ENVELOPE_BYTES);
        line.extend_from_slice(
            format!(r#"{{"type":"{kind}","revision":{revision},"keys":["#).as_bytes(),
        );
        line.extend_from_slice(body);
        line.extend_from_slice(b"]}\n");
        lines.push(Bytes::from(line));
    }
    let mut lines = Vec::new();
    let mut body: Vec<u8> = Vec::new();
    let mut one = Vec::new();
    for grant in grants {
        one.clear();
        serde_json::to_writer(&mut one, grant).expect("grants serialize");
        if !body.is_empty() && body.len() + one.len() + 1 > SNAPSHOT_PART_BYTES {
            finish(&mut lines, revision, &body, false);
            body.clear();
        }
        if !body.is_empty() {
            body.push(b',');
        }
        body.extend_from_slice(&one);
    }
    finish(&mut lines, revision, &body, true);
    lines
}

#[derive(Debug)]
struct FeedState {
    revision: u64,
    keys: BTreeMap<KeyId, Arc<ScopedGrant>>,
    log: VecDeque<Arc<Change>>,
    /// Every change with a revision above this one is in `log`.
    complete_after: u64,
    /// The snapshot encoded at `revision`, shared by every stream that starts there.
    snapshot: Option<Arc<EncodedSnapshot>>,
}

/// Everything one scope's sidecars should hold, and how they get there from any cursor.
#[derive(Debug)]
pub struct ScopeFeed {
    state: Mutex<FeedState>,
    /// The scope's revision; streams wait on it.
    notify: watch::Sender<u64>,
}

impl ScopeFeed {
    fn new(revision: u64) -> Self {
        ScopeFeed {
            state: Mutex::new(FeedState {
                revision,
                keys: BTreeMap::new(),
                log: VecDeque::new(),
                complete_after: revision,
                snapshot: None,
            }),
            notify: watch::Sender::new(revision),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// Wakes on every revision change of the scope.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    pub fn len(&self) -> usize {
        self.lock().keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The current grant of `key`, if the scope holds it.
    pub fn grant(&self, key: &KeyId) -> Option<Arc<ScopedGrant>> {
        self.lock().keys.get(key).cloned()
    }

    fn record(&self, change: Change, grant: Option<Arc<ScopedGrant>>) {
        let revision = change.revision;
        {
            let mut state = self.lock();
            match grant {
                Some(g) => state.keys.insert(change.key.clone(), g),
                None => state.keys.remove(&change.key),
            };
            state.revision = revision;
            state.snapshot = None;
            state.log.push_back(Arc::new(change));
            while state.log.len() > CHANGE_LOG_LEN {
                if let Some(gone) = state.log.pop_front() {
                    state.complete_after = gone.revision;
                }
            }
        }
        self.notify.send_replace(revision);
    }

    /// Lines of every change after `cursor`, or [`Catchup::Lagged`].
    pub fn changes_after(&self, cursor: u64) -> Catchup {
        let state = self.lock();
        if cursor < state.complete_after {
            return Catchup::Lagged;
        }
        let lines: Vec<Bytes> = state
            .log
            .iter()
            .rev()
            .take_while(|c| c.revision > cursor)
            .map(|c| c.line.clone())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Catchup::Changes {
            lines,
            cursor: state.revision.max(cursor),
        }
    }

    /// Logged changes with revision in `(after, upto]`, oldest first (older ones may be gone).
    pub fn logged_between(&self, after: u64, upto: u64) -> Vec<Arc<Change>> {
        let state = self.lock();
        let mut out: Vec<Arc<Change>> = state
            .log
            .iter()
            .rev()
            .skip_while(|c| c.revision > upto)
            .take_while(|c| c.revision > after)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Keys whose latest change has a revision in `(after, upto]`: from the log, plus from the
    /// current keys when the log no longer reaches back to `after`.
    pub fn keys_changed_between(&self, after: u64, upto: u64) -> HashSet<KeyId> {
        let state = self.lock();
        let mut keys: HashSet<KeyId> = state
            .log
            .iter()
            .filter(|c| c.revision > after && c.revision <= upto)
            .map(|c| c.key.clone())
            .collect();
        if after < state.complete_after {
            keys.extend(
                state
                    .keys
                    .iter()
                    .filter(|(_, g)| g.revision > after && g.revision <= upto)
                    .map(|(k, _)| k.clone()),
            );
        }
        keys
    }

    /// The snapshot for a stream resuming at `at_least` (0 for a new one). Encoded once per
    /// scope revision and shared; encoding happens outside the lock.
    pub fn snapshot(&self, at_least: u64) -> Arc<EncodedSnapshot> {
        let (cursor, grants) = {
            let state = self.lock();
            if let Some(cached) = &state.snapshot
                && cached.revision >= at_least
            {
                return cached.clone();
            }
            let grants: Vec<Arc<ScopedGrant>> = state.keys.values().cloned().collect();
            (state.revision, grants)
        };
        let revision = cursor.max(at_least);
        let snapshot = Arc::new(EncodedSnapshot {
            revision,
            cursor,
            keys: grants.len(),
            lines: encode_snapshot(revision, grants.iter().map(|g| &g.grant)),
        });
        if revision == cursor {
            let mut state = self.lock();
            if state.revision == cursor {
                state.snapshot = Some(snapshot.clone());
            }
        }
        snapshot
    }
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
    scopes: HashMap<Scope, Arc<ScopeFeed>>,
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

    /// The scope's feed and a subscription to it (taken under the index lock, so the feed
    /// stays the scope's for as long as the subscription lives).
    pub fn subscribe(&self, scope: &Scope) -> (Arc<ScopeFeed>, watch::Receiver<u64>) {
        let mut inner = self.lock();
        let feed = inner.feed(scope).clone();
        let rx = feed.subscribe();
        (feed, rx)
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
        let feed = self.lock().scopes.get(scope).cloned();
        feed.map_or(0, |f| f.revision())
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

/// Refuses a grant whose line would pass the stream's line bound: sidecars would drop the
/// stream rather than apply it, so the key is withheld (denied) and its status says why.
fn fits_a_line(grant: KeyGrant) -> Result<KeyGrant, GrantProblem> {
    let size = serde_json::to_vec(&grant).map_or(usize::MAX, |v| v.len());
    if size.saturating_add(ENVELOPE_BYTES) >= MAX_LINE_BYTES {
        return Err(GrantProblem::InvalidSpec(format!(
            "the key's policy is {size} bytes, more than a policy stream line carries ({MAX_LINE_BYTES})"
        )));
    }
    Ok(grant)
}

impl Inner {
    fn feed(&mut self, scope: &Scope) -> &Arc<ScopeFeed> {
        let revision = self.revision;
        self.scopes
            .entry(scope.clone())
            .or_insert_with(|| Arc::new(ScopeFeed::new(revision)))
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
        match self.build(id, src).and_then(fits_a_line) {
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
                let revision = self.revision;
                let observed_at = Instant::now();
                let line = encode_line(&WireEvent::Upsert {
                    revision,
                    key: &grant,
                });
                let entry = Arc::new(ScopedGrant {
                    revision,
                    observed_at,
                    grant,
                });
                self.published
                    .insert(id.clone(), (scope.clone(), entry.clone()));
                let change = Change {
                    revision,
                    key: id.clone(),
                    observed_at,
                    removal: false,
                    line,
                };
                self.feed(&scope).record(change, Some(entry));
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
            let feed = self.feed(&scope);
            feed.record(
                Change {
                    revision,
                    key: id.clone(),
                    observed_at: Instant::now(),
                    removal: true,
                    line: encode_line(&WireEvent::Delete { revision, id }),
                },
                None,
            );
            feed.is_empty() && feed.notify.receiver_count() == 0
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

    use keybrake_api::stream::WatchEvent;

    use super::*;

    /// Decodes NDJSON lines as the sidecar does.
    fn events(lines: &[Bytes]) -> Vec<WatchEvent> {
        lines
            .iter()
            .flat_map(|chunk| chunk.split(|b| *b == b'\n').filter(|l| !l.is_empty()))
            .map(|l| serde_json::from_slice(l).expect("decodes as a WatchEvent"))
            .collect()
    }

    fn changes(feed: &ScopeFeed, cursor: u64) -> (Vec<WatchEvent>, u64) {
        match feed.changes_after(cursor) {
            Catchup::Changes { lines, cursor } => (events(&lines), cursor),
            Catchup::Lagged => panic!("lagged at {cursor}"),
        }
    }

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
        let (feed, _rx) = index.subscribe(&Scope::new("agents", "refund"));
        let g = feed.grant(&id).unwrap();
        assert_eq!(g.grant.upstream_secret.expose(), "sk_live_1");
        assert_eq!(g.grant.token_sha256, TokenHash::of("vault_key_abc"));
        assert_eq!(feed.revision(), 101);
        let snapshot = events(&feed.snapshot(0).lines);
        assert!(
            matches!(&snapshot[..], [WatchEvent::Snapshot { revision: 101, keys }] if keys.len() == 1)
        );
        for other in [Scope::new("agents", "other"), Scope::new("other", "refund")] {
            assert!(index.subscribe(&other).0.is_empty(), "{other}");
        }
    }

    #[test]
    fn revocation_publishes_a_new_revision_immediately() {
        let (index, id) = seeded();
        let (feed, mut rx) = index.subscribe(&Scope::new("agents", "refund"));
        let before = *rx.borrow_and_update();
        index.upsert_vault_key(
            id.clone(),
            source("refund", "stripe-live", KeyState::Revoked),
        );
        assert!(rx.has_changed().unwrap());
        let after = *rx.borrow_and_update();
        assert!(after > before);
        let (events, cursor) = changes(&feed, before);
        assert_eq!(cursor, after);
        assert_eq!(events.len(), 1);
        match &events[0] {
            WatchEvent::Upsert { revision, key } => {
                assert_eq!(*revision, after);
                assert_eq!(key.state, KeyState::Revoked);
            }
            e => panic!("unexpected {e:?}"),
        }
        // Every stream of the scope shares the one encoded line.
        let (Catchup::Changes { lines: a, .. }, Catchup::Changes { lines: b, .. }) =
            (feed.changes_after(before), feed.changes_after(before))
        else {
            panic!("lagged")
        };
        assert_eq!(a[0].as_ptr(), b[0].as_ptr());
        assert!(changes(&feed, after).0.is_empty());
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
        let a = index.subscribe(&Scope::new("agents", "refund")).0;
        let b = index.subscribe(&Scope::new("agents", "other-sa")).0;
        assert_eq!(
            a.grant(&id).unwrap().grant.upstream_secret.expose(),
            "sk_live_2"
        );
        assert_eq!(
            b.grant(&id2).unwrap().grant.upstream_secret.expose(),
            "sk_live_2"
        );
    }

    #[test]
    fn missing_upstream_secret_withdraws_the_grant_and_says_why() {
        let (index, id) = seeded();
        let scope = Scope::new("agents", "refund");
        let (feed, mut rx) = index.subscribe(&scope);
        let before = *rx.borrow_and_update();
        index.remove_secret("agents", "stripe-live");
        let after = *rx.borrow_and_update();
        assert!(feed.is_empty());
        assert_eq!(
            changes(&feed, before).0,
            vec![WatchEvent::Delete {
                revision: after,
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
        assert_eq!(feed.len(), 1);
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
        let (old, _rx) = index.subscribe(&Scope::new("agents", "refund"));
        index.upsert_vault_key(
            id.clone(),
            source("billing", "stripe-live", KeyState::Active),
        );
        assert!(old.is_empty());
        let (new, _rx) = index.subscribe(&Scope::new("agents", "billing"));
        assert!(new.grant(&id).is_some());
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
        let (feed, _rx) = index.subscribe(&scope);
        let snapshot = feed.snapshot(5_000);
        assert_eq!((snapshot.revision, snapshot.cursor), (5_000, 101));
        assert_eq!(events(&snapshot.lines)[0].revision(), 5_000);
        index.upsert_vault_key(
            KeyId::new("agents", "k1"),
            source("refund", "stripe-live", KeyState::Suspended),
        );
        assert!(index.scope_revision(&scope) > 5_000);
    }

    /// Adds `n` keys k0.. to scope agents/refund of a seeded index.
    fn with_many_keys(index: &PolicyIndex, n: usize) -> Vec<KeyId> {
        (0..n)
            .map(|i| {
                let id = KeyId::new("agents", &format!("many-{i:05}"));
                index.upsert_secret(
                    "agents",
                    &token_secret_name(id.name()),
                    data(TOKEN_SECRET_KEY, &format!("vault_key_{i}")),
                );
                index.upsert_vault_key(
                    id.clone(),
                    source("refund", "stripe-live", KeyState::Active),
                );
                id
            })
            .collect()
    }

    #[test]
    fn large_scopes_snapshot_in_parts_below_the_line_bound() {
        let (index, _) = seeded();
        with_many_keys(&index, 4_000);
        let (feed, _rx) = index.subscribe(&Scope::new("agents", "refund"));
        let snapshot = feed.snapshot(0);
        assert_eq!(snapshot.keys, 4_001);
        let total: usize = snapshot.lines.iter().map(Bytes::len).sum();
        assert!(
            total > MAX_LINE_BYTES,
            "the scope needs more than one line ({total} bytes)"
        );
        assert!(snapshot.lines.len() > 1);
        assert!(
            snapshot
                .lines
                .iter()
                .all(|l| l.len() < MAX_LINE_BYTES && l.ends_with(b"\n"))
        );
        let decoded = events(&snapshot.lines);
        let (last, parts) = decoded.split_last().unwrap();
        assert!(
            parts
                .iter()
                .all(|e| matches!(e, WatchEvent::SnapshotPart { .. }))
        );
        assert!(matches!(last, WatchEvent::Snapshot { .. }));
        assert!(decoded.iter().all(|e| e.revision() == snapshot.revision));
        let mut ids: Vec<KeyId> = decoded
            .into_iter()
            .flat_map(|e| match e {
                WatchEvent::Snapshot { keys, .. } | WatchEvent::SnapshotPart { keys, .. } => keys,
                _ => vec![],
            })
            .map(|g| g.id)
            .collect();
        ids.dedup();
        assert_eq!(ids.len(), 4_001);
        // Encoded once per revision, shared by every stream that starts there.
        assert!(Arc::ptr_eq(&snapshot, &feed.snapshot(0)));
    }

    #[test]
    fn a_stream_behind_the_change_log_is_told_to_resnapshot() {
        let (index, id) = seeded();
        let (feed, _rx) = index.subscribe(&Scope::new("agents", "refund"));
        let start = feed.revision();
        let keys = with_many_keys(&index, CHANGE_LOG_LEN - 1);
        let (events_seen, cursor) = changes(&feed, start);
        assert_eq!(events_seen.len(), CHANGE_LOG_LEN - 1);
        assert_eq!(cursor, feed.revision());
        with_many_keys(&index, CHANGE_LOG_LEN + 1);
        assert!(matches!(feed.changes_after(start), Catchup::Lagged));
        assert!(matches!(
            feed.changes_after(cursor),
            Catchup::Changes { .. }
        ));
        // What changed since `start` is still known per key, from the current keys.
        let changed = feed.keys_changed_between(start, feed.revision());
        assert!(changed.contains(&keys[0]) && !changed.contains(&id));
    }

    #[test]
    fn a_grant_too_large_for_a_line_is_withheld_with_a_reason() {
        let (index, id) = seeded();
        let mut big = source("refund", "stripe-live", KeyState::Active);
        big.spec.customers = (0..40_000).map(|i| format!("cus_{i:020}")).collect();
        index.upsert_vault_key(id.clone(), big);
        assert!(index.published(&id).is_none());
        let problem = index.problem(&id).unwrap();
        assert_eq!(problem.reason(), "InvalidSpec");
        assert!(
            problem.to_string().contains("policy stream line"),
            "{problem}"
        );
    }
}
