//! The watch stream end to end without an apiserver: the real TLS/HTTP/2 server fed by the real
//! index, the sidecar's real stream client applying into a recorder, TokenReview faked.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use keybrake_api::{
    AgentRef, KeyGrant, KeyId, KeyState, Limits, OnStale, SecretKeyRef, Upstream, VaultKeySpec,
    Vendor, WorkloadRef,
    stream::{PolicyApply, WatchEvent},
};
use keybrake_controller::{
    auth::{AuthError, Authenticator, TokenReviewer},
    enforcement::EnforcementTracker,
    index::{KeySource, PolicyIndex, Scope},
    metrics::Metrics,
    server::StreamServer,
    tls::ServingIdentity,
};
use keybrake_sidecar::stream_client::{StreamClient, StreamClientConfig, StreamClientError};
use tokio_util::sync::CancellationToken;

struct FakeReviewer;

impl TokenReviewer for FakeReviewer {
    fn review(&self, token: String) -> BoxFuture<'static, Result<Scope, AuthError>> {
        Box::pin(async move {
            match token.as_str() {
                "tok-refund" => Ok(Scope::new("agents", "refund")),
                "tok-other" => Ok(Scope::new("agents", "other")),
                _ => Err(AuthError::Rejected),
            }
        })
    }
}

/// Records every applied event (serialized, as it came off the wire) and the current keys.
#[derive(Default)]
struct Recorder {
    wire: Mutex<Vec<String>>,
    keys: Mutex<BTreeMap<KeyId, KeyGrant>>,
}

impl Recorder {
    fn log(&self, event: &WatchEvent) {
        self.wire
            .lock()
            .unwrap()
            .push(serde_json::to_string(event).unwrap());
    }
    fn key(&self, id: &KeyId) -> Option<KeyGrant> {
        self.keys.lock().unwrap().get(id).cloned()
    }
    fn wire_text(&self) -> String {
        self.wire.lock().unwrap().join("\n")
    }
}

impl PolicyApply for Recorder {
    fn replace_all(&self, keys: Vec<KeyGrant>, revision: u64) {
        self.log(&WatchEvent::Snapshot {
            revision,
            keys: keys.clone(),
        });
        *self.keys.lock().unwrap() = keys.into_iter().map(|k| (k.id.clone(), k)).collect();
    }
    fn upsert(&self, key: KeyGrant, revision: u64) {
        self.log(&WatchEvent::Upsert {
            revision,
            key: key.clone(),
        });
        self.keys.lock().unwrap().insert(key.id.clone(), key);
    }
    fn remove(&self, id: &KeyId, revision: u64) {
        self.log(&WatchEvent::Delete {
            revision,
            id: id.clone(),
        });
        self.keys.lock().unwrap().remove(id);
    }
    fn mark_fresh(&self, _revision: u64) {}
}

fn source(sa: &str, state: KeyState) -> KeySource {
    KeySource {
        spec: VaultKeySpec {
            vendor: Vendor::Stripe,
            upstream: Upstream {
                secret_ref: SecretKeyRef {
                    name: "stripe-live".into(),
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
        created: None,
        generation: 1,
    }
}

async fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Harness {
    index: Arc<PolicyIndex>,
    tracker: Arc<EnforcementTracker>,
    url: String,
    dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(Duration::from_secs(3600)).await
    }

    async fn start_with(max_stream: Duration) -> Harness {
        let index = Arc::new(PolicyIndex::new(1_000));
        let bytes = |s: &str| BTreeMap::from([("api-key".to_owned(), s.as_bytes().to_vec())]);
        index.upsert_secret("agents", "stripe-live", bytes("sk_live_SECRET_ONE"));
        index.upsert_secret(
            "agents",
            "k1-token",
            BTreeMap::from([("VAULT_KEY".to_owned(), b"vault_key_one".to_vec())]),
        );
        index.upsert_vault_key(
            KeyId::new("agents", "k1"),
            source("refund", KeyState::Active),
        );
        let tracker = Arc::new(EnforcementTracker::new());
        let identity = ServingIdentity::generate(&["127.0.0.1".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ca.pem"),
            identity.generated_ca_pem.as_ref().unwrap(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let server = Arc::new(StreamServer {
            index: index.clone(),
            tracker: tracker.clone(),
            auth: Arc::new(Authenticator::new(Arc::new(FakeReviewer))),
            metrics: Metrics::new(),
            heartbeat: Duration::from_millis(200),
            max_stream,
            synced: tokio::sync::watch::channel(true).1,
            audit: None,
            stream_tokens: Default::default(),
            shutdown: shutdown.clone(),
        });
        tokio::spawn(server.serve(listener, identity.server_config().unwrap()));
        Harness {
            index,
            tracker,
            url,
            dir,
            shutdown,
        }
    }

    fn client(&self, token: &str, store: Arc<dyn PolicyApply>) -> StreamClient {
        let token_file = self.dir.path().join(format!("{token}.jwt"));
        std::fs::write(&token_file, token).unwrap();
        let mut config = StreamClientConfig::new(&self.url, token_file);
        config.ca_file = Some(self.dir.path().join("ca.pem"));
        config.backoff_initial = Duration::from_millis(20);
        config.idle_timeout = Duration::from_secs(2);
        StreamClient::new(config, store).unwrap()
    }
}

#[tokio::test]
async fn revocation_reaches_the_sidecar_and_its_ack_reaches_the_tracker() {
    let h = Harness::start().await;
    let id = KeyId::new("agents", "k1");
    let scope = Scope::new("agents", "refund");
    let recorder = Arc::new(Recorder::default());
    let client = h.client("tok-refund", recorder.clone());
    let state = client.state();
    let stop = h.shutdown.clone();
    tokio::spawn(client.run(async move { stop.cancelled().await }));

    let grant = poll("snapshot", || recorder.key(&id)).await;
    assert_eq!(grant.upstream_secret.expose(), "sk_live_SECRET_ONE");
    let rev = h.index.published(&id).unwrap().1;
    poll("ack of the snapshot", || {
        (h.tracker.view(&id, &scope, rev).acknowledged == 1).then_some(())
    })
    .await;

    let mut latencies = Vec::new();
    for round in 0..20 {
        let state_now = if round % 2 == 0 {
            KeyState::Suspended
        } else {
            KeyState::Active
        };
        let t0 = Instant::now();
        h.index
            .upsert_vault_key(id.clone(), source("refund", state_now));
        poll("the state change", || {
            (recorder.key(&id).map(|g| g.state) == Some(state_now)).then_some(())
        })
        .await;
        latencies.push(t0.elapsed());
    }
    h.index
        .upsert_vault_key(id.clone(), source("refund", KeyState::Revoked));
    let rev = h.index.published(&id).unwrap().1;
    poll("revoked upsert", || {
        (recorder.key(&id).map(|g| g.state) == Some(KeyState::Revoked)).then_some(())
    })
    .await;
    let view = poll("every sidecar acked the revocation", || {
        let v = h.tracker.view(&id, &scope, rev);
        (v.acknowledged == 1 && v.sidecars == 1).then_some(v)
    })
    .await;
    assert!(view.last_propagation_ms.is_some());
    assert_eq!(state.borrow().revision, rev);
    latencies.sort();
    let max = latencies.last().unwrap();
    println!(
        "in-process propagation: p50={:?} max={max:?}",
        latencies[latencies.len() / 2]
    );
    assert!(
        *max < Duration::from_millis(500),
        "slow propagation {max:?}"
    );

    // Revisions on the wire never go backwards.
    let wire = recorder.wire.lock().unwrap().clone();
    let revisions: Vec<u64> = wire
        .iter()
        .map(|l| serde_json::from_str::<WatchEvent>(l).unwrap().revision())
        .collect();
    assert!(revisions.windows(2).all(|w| w[0] <= w[1]), "{revisions:?}");
    h.shutdown.cancel();
}

#[tokio::test]
async fn other_scopes_never_receive_the_key_and_bad_tokens_are_refused() {
    let h = Harness::start().await;
    let other = Arc::new(Recorder::default());
    let client = h.client("tok-other", other.clone());
    let stop = h.shutdown.clone();
    tokio::spawn(client.run(async move { stop.cancelled().await }));
    poll("the other scope's snapshot", || {
        (!other.wire.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    // Changes to k1 (including a secret rotation) must not leak into the other scope either.
    h.index.upsert_secret(
        "agents",
        "stripe-live",
        BTreeMap::from([("api-key".to_owned(), b"sk_live_SECRET_TWO".to_vec())]),
    );
    h.index.upsert_vault_key(
        KeyId::new("agents", "k1"),
        source("refund", KeyState::Revoked),
    );
    // A later key in the other scope proves the stream kept flowing past those changes.
    h.index.upsert_secret(
        "agents",
        "k2-token",
        BTreeMap::from([("VAULT_KEY".to_owned(), b"vault_key_two".to_vec())]),
    );
    h.index.upsert_vault_key(
        KeyId::new("agents", "k2"),
        source("other", KeyState::Active),
    );
    poll("k2 upsert", || other.key(&KeyId::new("agents", "k2"))).await;
    let text = other.wire_text();
    assert!(!text.contains("agents/k1"), "{text}");
    assert!(!text.contains("sk_live_SECRET_ONE"), "{text}");
    let k2 = other.key(&KeyId::new("agents", "k2")).unwrap();
    assert_eq!(k2.upstream_secret.expose(), "sk_live_SECRET_TWO");

    let refused = h.client("tok-bogus", Arc::new(Recorder::default()));
    match refused.session().await {
        (false, StreamClientError::Status { status, .. }) => assert_eq!(status.as_u16(), 401),
        (applied, e) => panic!("expected 401, got {e} (applied={applied})"),
    }
    h.shutdown.cancel();
}

#[tokio::test]
async fn streams_end_at_their_lifetime_and_the_client_resumes_monotonically() {
    let h = Harness::start_with(Duration::from_millis(300)).await;
    let id = KeyId::new("agents", "k1");
    let recorder = Arc::new(Recorder::default());
    let client = h.client("tok-refund", recorder.clone());
    let stop = h.shutdown.clone();
    tokio::spawn(client.run(async move { stop.cancelled().await }));
    let snapshots = || {
        recorder
            .wire
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("{\"type\":\"snapshot\""))
            .count()
    };
    poll("three stream lifetimes", || {
        (snapshots() >= 3).then_some(())
    })
    .await;
    h.index
        .upsert_vault_key(id.clone(), source("refund", KeyState::Revoked));
    poll("the revocation after reconnects", || {
        (recorder.key(&id).map(|g| g.state) == Some(KeyState::Revoked)).then_some(())
    })
    .await;
    let revisions: Vec<u64> = recorder
        .wire
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str::<WatchEvent>(l).unwrap().revision())
        .collect();
    assert!(revisions.windows(2).all(|w| w[0] <= w[1]), "{revisions:?}");
    h.shutdown.cancel();
}
