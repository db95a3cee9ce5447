//! keybrake-controller end to end: a real kube-apiserver + etcd (the shared plane), the
//! controller as a separate process (built from this workspace), and sidecars running the real
//! proxy and policy store fed by the real stream client, in this test process. Agents call
//! through the sidecar to a fake Stripe on loopback.
//!
//! Each test gets its own namespace and its own controller(s) restricted to that namespace
//! (`--watch-namespace`), so tests running in parallel never reconcile each other's keys.
use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::{coordination::v1::Lease, events::v1::Event};
use keybrake_api::{Phase, VaultKey};
use keybrake_e2e::{
    TestNamespace,
    fixtures::{
        self, agent_call, condition, create_key, minted_token, put_upstream_secret, sa_token,
        set_state, wait_status,
    },
    processes::{ControllerProcess, ControllerTls as Tls, free_port, poll},
};
use keybrake_sidecar::{
    PolicyStore, Sidecar,
    audit::NoopAudit,
    ledger::InMemoryLedger,
    metrics::Metrics,
    server::{Deps, Settings},
    store::Freshness,
    stream_client::{StreamClient, StreamClientConfig},
};
use keybrake_testkit::{FakeKind, FakeVendor};
use kube::Api;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Sidecars and agents

struct TestSidecar {
    sidecar: Option<Sidecar>,
    proxy: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestSidecar {
    async fn start(controller_url: &str, ca: &Path, token: &str, stale_after: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap().keep();
        let token_file = dir.join("token");
        std::fs::write(&token_file, token).unwrap();
        let store = Arc::new(PolicyStore::new(Freshness::StaleAfter(stale_after)));
        let mut config = StreamClientConfig::new(controller_url, token_file);
        config.ca_file = Some(ca.to_owned());
        config.backoff_initial = Duration::from_millis(50);
        config.backoff_max = Duration::from_millis(500);
        config.idle_timeout = Duration::from_secs(2);
        let client = StreamClient::new(config, store.clone()).expect("stream client");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(client.run(async move {
            let _ = stopped.await;
        }));
        let deps = Deps {
            store,
            metrics: Arc::new(Metrics::new()),
            audit: Arc::new(NoopAudit),
            ledger: Arc::new(InMemoryLedger::new()),
        };
        let sidecar = Sidecar::start(&Settings::ephemeral(), deps)
            .await
            .expect("sidecar start");
        let proxy = sidecar.addrs().proxy;
        TestSidecar {
            sidecar: Some(sidecar),
            proxy,
            stop: Some(stop),
        }
    }

    /// One agent call: `GET /stripe/v1/customers/cus_1` with the vault key.
    async fn call(&self, vault_key: &str) -> Call {
        let started = Instant::now();
        let (status, verdict) =
            agent_call(self.proxy, "GET", "/stripe/v1/customers/cus_1", vault_key).await;
        Call {
            started,
            finished: Instant::now(),
            status,
            verdict,
        }
    }

    async fn wait_verdict(&self, vault_key: &str, verdict: &str, limit: Duration) -> Call {
        let deadline = Instant::now() + limit;
        loop {
            let call = self.call(vault_key).await;
            if call.verdict == verdict {
                return call;
            }
            assert!(
                Instant::now() < deadline,
                "no {verdict} within {limit:?}; last call: {} {}",
                call.status,
                call.verdict
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(s) = self.sidecar.take() {
            s.shutdown().await;
        }
    }
}

#[derive(Debug, Clone)]
struct Call {
    started: Instant,
    finished: Instant,
    status: u16,
    verdict: String,
}

// ---------------------------------------------------------------------------------------------
// Kubernetes objects

async fn setup(prefix: &str) -> TestNamespace<'static> {
    fixtures::namespace_with_crds(prefix).await
}

/// A sidecar streaming from `controller` as service account `agent` of `ns`.
async fn agent_sidecar(
    ns: &TestNamespace<'_>,
    controller: &ControllerProcess,
    tls: &Tls,
    stale_after: Duration,
) -> TestSidecar {
    let token = sa_token(ns, "agent").await;
    TestSidecar::start(&controller.stream_url, &tls.ca(), &token, stale_after).await
}

/// A fake Stripe accepting `secret`, and the upstream Secret holding it.
async fn stripe_upstream(ns: &TestNamespace<'_>, secret: &str) -> FakeVendor {
    let upstream = FakeVendor::start(FakeKind::Stripe, secret).await.unwrap();
    put_upstream_secret(ns, fixtures::UPSTREAM_SECRET, secret).await;
    upstream
}

fn vault_key(name: &str, sa: &str, base_url: &str, extra_spec: serde_json::Value) -> VaultKey {
    fixtures::stripe_vault_key(name, sa, base_url, extra_spec)
}

fn percentile(sorted: &[u128], p: f64) -> u128 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_revoke_latency_over_50_trials() {
    const TRIALS: usize = 50;
    let ns = setup("ctl-revoke").await;
    let upstream = stripe_upstream(&ns, "sk_test_upstream").await;
    let tls = Tls::new();
    let controller = fixtures::ready_controller(&ns, &tls, "revoke-a", free_port(), &[]).await;
    let token = sa_token(&ns, "agent").await;
    let sidecar = TestSidecar::start(
        &controller.stream_url,
        &tls.ca(),
        &token,
        Duration::from_secs(30),
    )
    .await;

    let mut keys = Vec::new();
    for i in 0..TRIALS {
        let name = format!("run-{i}");
        create_key(&ns, &vault_key(&name, "agent", &upstream.url(), json!({}))).await;
        keys.push(name);
    }
    let mut tokens = Vec::new();
    for name in &keys {
        let token = minted_token(&ns, name).await;
        assert!(
            token.starts_with("vault_key_") && token.len() == 53,
            "token shape"
        );
        sidecar.wait_verdict(&token, "allow", DEADLINE).await;
        tokens.push(token);
    }

    let mut latencies_ms = Vec::new();
    let mut leaked = 0usize;
    for (trial, (name, token)) in keys.iter().zip(&tokens).enumerate() {
        let calls = Arc::new(Mutex::new(Vec::<Call>::new()));
        let agent = {
            let calls = calls.clone();
            let token = token.clone();
            let proxy = sidecar.proxy;
            tokio::spawn(async move {
                let sidecar = TestSidecar {
                    sidecar: None,
                    proxy,
                    stop: None,
                };
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    tick.tick().await;
                    let call = sidecar.call(&token).await;
                    let denied = call.verdict == "key_revoked";
                    calls.lock().unwrap().push(call);
                    if denied {
                        return;
                    }
                }
            })
        };
        poll("the agent's first calls", DEADLINE, || {
            let calls = calls.clone();
            async move { (calls.lock().unwrap().len() >= 2).then_some(()) }
        })
        .await;
        // Spread the patch over the agent's 100 ms cadence (a deterministic phase per trial),
        // so the measured latency is not biased by always patching right after a call.
        let phase = Duration::from_millis((trial as u64 * 37) % 100);
        tokio::time::sleep(phase).await;
        set_state(&ns, name, "Revoked").await.expect("revoke");
        let patched = Instant::now();
        agent.await.unwrap();
        let calls = calls.lock().unwrap().clone();
        let denied = calls
            .iter()
            .find(|c| c.verdict == "key_revoked")
            .unwrap_or_else(|| panic!("{name}: never denied; calls {calls:?}"));
        assert_eq!(denied.status, 401, "revoked keys answer 401");
        latencies_ms.push(
            denied
                .finished
                .saturating_duration_since(patched)
                .as_millis(),
        );
        leaked += calls
            .iter()
            .filter(|c| c.started >= patched && c.verdict == "allow")
            .count();
        assert!(
            calls
                .iter()
                .all(|c| c.verdict == "allow" || c.verdict == "key_revoked"),
            "{calls:?}"
        );
    }
    latencies_ms.sort_unstable();
    let (p50, p99, max) = (
        percentile(&latencies_ms, 50.0),
        percentile(&latencies_ms, 99.0),
        *latencies_ms.last().unwrap(),
    );
    println!(
        "REVOKE_LATENCY_MS p50={p50} p99={p99} max={max} trials={} leaked={leaked}",
        latencies_ms.len()
    );
    assert!(p99 <= 1000, "p99 revoke latency {p99} ms > 1000 ms");

    // The last revoked key: status says revoked, enforced by 1/1 sidecars, with an Event.
    let last = keys.last().unwrap();
    let (summary, message) = wait_status(&ns, last, "Propagated=True on the revoked key", |vk| {
        let st = vk.status.as_ref()?;
        let (status, _, message) = condition(vk, "Propagated")?;
        let summary = st.enforcement.clone()?.summary;
        (st.phase == Some(Phase::Revoked) && status == "True" && st.revoked_at.is_some())
            .then_some((summary, message))
    })
    .await;
    assert_eq!(summary, "1/1");
    assert!(message.contains("enforced by 1/1 sidecars"), "{message}");
    let events: Api<Event> = ns.api();
    poll("a Revoked Event", DEADLINE, || {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("Revoked")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some(last.as_str())
                })
                .then_some(())
        }
    })
    .await;
    let metrics = controller.metrics().await;
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in metrics"))
    };
    let (sum, count) = (
        sample("keybrake_controller_propagation_seconds_sum"),
        sample("keybrake_controller_propagation_seconds_count"),
    );
    assert!(count >= TRIALS as f64, "{count} acknowledged revisions");
    println!(
        "CONTROLLER_PROPAGATION mean_ms={:.1} acks={count}",
        sum / count * 1000.0
    );
    for needle in [
        "keybrake_controller_propagation_seconds_count",
        "keybrake_controller_streams_connected 1",
        "keybrake_controller_leader 1",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }
    // No token ever reaches the controller's log.
    let log = controller.log_text();
    assert!(
        tokens.iter().all(|t| !log.contains(t.as_str())),
        "vault key in the log"
    );
    assert!(
        !log.contains("sk_test_upstream"),
        "upstream secret in the log"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_suspend_resume_unrevoke_refused_and_expiry() {
    let ns = setup("ctl-life").await;
    let upstream = stripe_upstream(&ns, "sk_test_upstream").await;
    let tls = Tls::new();
    let controller =
        fixtures::ready_controller(&ns, &tls, "life-a", free_port(), &["--gc-grace-secs", "2"])
            .await;
    let sidecar = agent_sidecar(&ns, &controller, &tls, Duration::from_secs(30)).await;

    create_key(&ns, &vault_key("life", "agent", &upstream.url(), json!({}))).await;
    let token = minted_token(&ns, "life").await;
    let ok = sidecar.wait_verdict(&token, "allow", DEADLINE).await;
    assert_eq!(ok.status, 200);
    wait_status(&ns, "life", "Active, Ready, 1/1", |vk| {
        let st = vk.status.as_ref()?;
        let ready = condition(vk, "Ready")?;
        (st.phase == Some(Phase::Active)
            && ready.0 == "True"
            && st.token_secret_ref.as_ref()?.name == "life-token"
            && st.observed_generation == vk.metadata.generation
            && st.enforcement.as_ref()?.summary == "1/1")
            .then_some(())
    })
    .await;
    // Minted exactly once: a status write or a resync never re-mints.
    set_state(&ns, "life", "Suspended").await.unwrap();
    let denied = sidecar
        .wait_verdict(&token, "key_suspended", Duration::from_secs(5))
        .await;
    assert_ne!(denied.status, 200);
    set_state(&ns, "life", "Active").await.unwrap();
    sidecar
        .wait_verdict(&token, "allow", Duration::from_secs(5))
        .await;
    assert_eq!(minted_token(&ns, "life").await, token, "token re-minted");

    set_state(&ns, "life", "Revoked").await.unwrap();
    sidecar
        .wait_verdict(&token, "key_revoked", Duration::from_secs(5))
        .await;
    let refused = set_state(&ns, "life", "Active")
        .await
        .expect_err("un-revoking must be refused");
    match refused {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(s.message.contains("Revoked"), "{}", s.message);
        }
        other => panic!("unexpected error {other}"),
    }
    assert_eq!(sidecar.call(&token).await.verdict, "key_revoked");

    // Expiry: denied with key_expired from expiresAt on, then Expired, then collected.
    let expires_at = k8s_openapi::jiff::Timestamp::now()
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(4))
        .unwrap()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap();
    create_key(
        &ns,
        &vault_key(
            "short",
            "agent",
            &upstream.url(),
            json!({"expiresAt": expires_at.to_string()}),
        ),
    )
    .await;
    let short = minted_token(&ns, "short").await;
    sidecar.wait_verdict(&short, "allow", DEADLINE).await;
    let expired = sidecar
        .wait_verdict(&short, "key_expired", Duration::from_secs(10))
        .await;
    let now = k8s_openapi::jiff::Timestamp::now();
    let late = now.duration_since(expires_at);
    assert!(
        late >= k8s_openapi::jiff::SignedDuration::ZERO
            && late < k8s_openapi::jiff::SignedDuration::from_millis(1500),
        "denied {late:?} after expiresAt"
    );
    assert_eq!(expired.status, 401);
    wait_status(&ns, "short", "phase Expired", |vk| {
        (vk.status.as_ref()?.phase == Some(Phase::Expired)).then_some(())
    })
    .await;
    let keys = ns.api::<VaultKey>();
    poll(
        "garbage collection of the expired key",
        Duration::from_secs(15),
        || {
            let keys = keys.clone();
            async move { keys.get_opt("short").await.ok()?.is_none().then_some(()) }
        },
    )
    .await;
    sidecar
        .wait_verdict(&short, "key_unknown", Duration::from_secs(5))
        .await;
    sidecar.shutdown().await;
}

/// An HTTP/2-over-TLS connection to a controller, trusting `ca`.
async fn h2_connect(url: &str, ca: &Path) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::fs::read(ca).unwrap().as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let addr = url.trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// Reads a raw watch stream (HTTP/2 over TLS) into a shared buffer.
async fn raw_watch(url: &str, ca: &Path, token: &str) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let mut send = h2_connect(url, ca).await;
    let request = hyper::Request::get(format!("{url}/v1/watch"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = send.send_request(request).await.unwrap();
    let status = res.status().as_u16();
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    let mut body = res.into_body();
    tokio::spawn(async move {
        let _keep_connection = send;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                sink.lock().unwrap().extend_from_slice(&data);
            }
        }
    });
    (status, buf)
}

async fn post_audit(url: &str, ca: &Path, token: &str, body: String) -> (u16, String) {
    let mut send = h2_connect(url, ca).await;
    let request = hyper::Request::post(format!("{url}/v1/audit"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/x-ndjson")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let res = send.send_request(request).await.unwrap();
    let status = res.status().as_u16();
    let text = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

fn audit_row(id: &str, namespace: &str) -> String {
    format!(
        r#"{{"id":"{id}","started_at":"2026-11-30T23:00:00Z","duration_ms":12,"vault_key_id":"{namespace}/k","agent_name":"refund-agent","agent_run_id":"run-1","namespace":"{namespace}","pod":"agent-0","vendor":"stripe","operation":"customers.retrieve","method":"GET","path_template":"/v1/customers/{{id}}","policy_verdict":"allow","verdict_reason":null,"customer_scope_id":"cus_1","vendor_status":200,"vendor_request_id":"req_1","cost_usd_parsed":null,"cost_source":"none","cap_usage_after_usd":null,"policy_revision":1}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_audit_ingest_writes_own_namespace_rows_to_sqlite() {
    let ns = setup("ctl-audit").await;
    let tls = Tls::new();
    let db = tls.dir.path().join("audit.db");
    let sink = format!("sqlite://{}", db.display());
    let controller =
        fixtures::ready_controller(&ns, &tls, "audit-a", free_port(), &["--audit-sink", &sink])
            .await;
    let token = sa_token(&ns, "agent").await;
    let rows = format!(
        "{}\n{}\n",
        audit_row("row-1", ns.name()),
        audit_row("row-2", ns.name())
    );
    let (status, text) = post_audit(&controller.stream_url, &tls.ca(), &token, rows.clone()).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"inserted\":2"), "{text}");
    // Replayed from a sidecar's spool: idempotent, so the rows are really stored.
    let (status, text) = post_audit(&controller.stream_url, &tls.ca(), &token, rows).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"duplicates\":2"), "{text}");
    let (status, _) = post_audit(
        &controller.stream_url,
        &tls.ca(),
        &token,
        audit_row("row-3", "someone-else"),
    )
    .await;
    assert_eq!(status, 403, "rows of another namespace are refused");
    let (status, _) = post_audit(
        &controller.stream_url,
        &tls.ca(),
        "bogus",
        audit_row("row-4", ns.name()),
    )
    .await;
    assert_eq!(status, 401);
    assert!(db.exists());
    let metrics = controller.metrics().await;
    assert!(
        metrics.contains("keybrake_controller_audit_ingested_rows_total 2"),
        "{metrics}"
    );

    // status.spentTodayUsd: the leader sums today's allowed, priced rows of a key bound to the
    // caller. No upstream Secret: the UpstreamSecretMissing reason proves the index holds "k"
    // (rows naming a key the index does not bind to the caller are stored unattributed).
    create_key(
        &ns,
        &vault_key("k", "agent", "http://127.0.0.1:9", json!({})),
    )
    .await;
    wait_status(&ns, "k", "key k in the controller's index", |vk| {
        condition(vk, "Ready").filter(|(_, reason, _)| reason == "UpstreamSecretMissing")
    })
    .await;
    let today = k8s_openapi::jiff::Timestamp::now().to_string();
    let priced = |id: &str, cost: &str| {
        audit_row(id, ns.name())
            .replace("2026-11-30T23:00:00Z", &today)
            .replace(
                "\"cost_usd_parsed\":null",
                &format!("\"cost_usd_parsed\":\"{cost}\""),
            )
    };
    let body = format!(
        "{}\n{}\n",
        priced("row-5", "1.250000"),
        priced("row-6", "0.010000")
    );
    let (status, text) = post_audit(&controller.stream_url, &tls.ca(), &token, body).await;
    assert_eq!(status, 200, "{text}");
    let expected: keybrake_api::Usd = "1.26".parse().unwrap();
    wait_status(&ns, "k", "status.spentTodayUsd = 1.26", |vk| {
        (vk.status.as_ref()?.spent_today_usd? == expected).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_streams_are_isolated_per_namespace_and_service_account() {
    let ns = setup("ctl-iso").await;
    let other_ns = TestNamespace::new("ctl-iso-other").await;
    let upstream = stripe_upstream(&ns, "sk_test_isolated_secret").await;
    let tls = Tls::new();
    let controller = fixtures::ready_controller(&ns, &tls, "iso-a", free_port(), &[]).await;
    create_key(&ns, &vault_key("iso", "agent", &upstream.url(), json!({}))).await;
    let token = minted_token(&ns, "iso").await;

    let (owner_status, owner) = raw_watch(
        &controller.stream_url,
        &tls.ca(),
        &sa_token(&ns, "agent").await,
    )
    .await;
    let (intruder_status, intruder) = raw_watch(
        &controller.stream_url,
        &tls.ca(),
        &sa_token(&ns, "intruder").await,
    )
    .await;
    // Same service account name, other namespace (this controller does not even watch it).
    let (foreign_status, foreign) = raw_watch(
        &controller.stream_url,
        &tls.ca(),
        &sa_token(&other_ns, "agent").await,
    )
    .await;
    assert_eq!(
        (owner_status, intruder_status, foreign_status),
        (200, 200, 200)
    );
    let text = |b: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&b.lock().unwrap()).into_owned();
    poll("the owner's snapshot with the key", DEADLINE, || {
        let t = text(&owner);
        async move { t.contains("sk_test_isolated_secret").then_some(()) }
    })
    .await;
    // Traffic for the key: a rotation and a revocation, both seen by the owner.
    put_upstream_secret(&ns, fixtures::UPSTREAM_SECRET, "sk_test_rotated_secret").await;
    set_state(&ns, "iso", "Revoked").await.unwrap();
    poll("the owner's revocation", DEADLINE, || {
        let t = text(&owner);
        async move { t.contains("\"state\":\"Revoked\"").then_some(()) }
    })
    .await;
    // Heartbeats prove the other streams were live the whole time.
    poll("heartbeats on the other streams", DEADLINE, || {
        let (a, b) = (text(&intruder), text(&foreign));
        async move {
            (a.contains("\"type\":\"heartbeat\"") && b.contains("\"type\":\"heartbeat\""))
                .then_some(())
        }
    })
    .await;
    let token_hash = keybrake_api::TokenHash::of(&token).to_hex();
    for (who, stream) in [("intruder", &intruder), ("foreign", &foreign)] {
        let t = text(stream);
        assert!(t.starts_with("{\"type\":\"snapshot\""), "{who}: {t}");
        for secret in [
            "sk_test_isolated_secret",
            "sk_test_rotated_secret",
            "/iso\"",
            token_hash.as_str(),
            token.as_str(),
        ] {
            assert!(!t.contains(secret), "{who} stream leaked {secret}: {t}");
        }
    }
    let owner_text = text(&owner);
    assert!(owner_text.contains(&token_hash) && !owner_text.contains(&token));

    // Tokens that are not keybrake service-account tokens are refused.
    let (bogus, _) = raw_watch(&controller.stream_url, &tls.ca(), "not-a-token").await;
    assert_eq!(bogus, 401);
    let wrong_audience = ns
        .service_account_token("agent", "some-other-audience")
        .await
        .unwrap();
    let (wrong, _) = raw_watch(&controller.stream_url, &tls.ca(), &wrong_audience).await;
    assert_eq!(wrong, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_sidecar_keeps_policy_until_stale_then_resyncs() {
    const STALE: Duration = Duration::from_secs(3);
    let ns = setup("ctl-fault").await;
    let upstream = stripe_upstream(&ns, "sk_test_upstream").await;
    let tls = Tls::new();
    let port = free_port();
    let mut controller = fixtures::ready_controller(&ns, &tls, "fault-a", port, &[]).await;
    let sidecar = agent_sidecar(&ns, &controller, &tls, STALE).await;
    create_key(
        &ns,
        &vault_key("deny", "agent", &upstream.url(), json!({"onStale": "Deny"})),
    )
    .await;
    create_key(
        &ns,
        &vault_key(
            "allow",
            "agent",
            &upstream.url(),
            json!({"onStale": "Allow"}),
        ),
    )
    .await;
    let deny = minted_token(&ns, "deny").await;
    let allow = minted_token(&ns, "allow").await;
    sidecar.wait_verdict(&deny, "allow", DEADLINE).await;
    sidecar.wait_verdict(&allow, "allow", DEADLINE).await;

    controller.kill();
    let killed = Instant::now();
    assert_eq!(
        sidecar.call(&deny).await.verdict,
        "allow",
        "last policy kept"
    );
    let stale = sidecar
        .wait_verdict(&deny, "policy_stale", STALE + Duration::from_secs(3))
        .await;
    let after = stale.finished.duration_since(killed);
    // The last heartbeat came at most 0.5 s before the kill.
    assert!(
        after >= STALE - Duration::from_millis(600),
        "stale after only {after:?}"
    );
    let kept = sidecar.call(&allow).await;
    assert_eq!(
        (kept.status, kept.verdict.as_str()),
        (200, "allow"),
        "onStale: Allow"
    );

    let controller = fixtures::ready_controller(&ns, &tls, "fault-b", port, &[]).await;
    let resynced = Instant::now();
    sidecar.wait_verdict(&deny, "allow", DEADLINE).await;
    println!(
        "controller restart: stale after {after:?}, resynced {:?} after /ready",
        resynced.elapsed()
    );
    // A revocation made while the controller was down is delivered by the resync too.
    drop(controller);
    set_state(&ns, "deny", "Revoked").await.unwrap();
    let _controller = fixtures::ready_controller(&ns, &tls, "fault-c", port, &[]).await;
    sidecar.wait_verdict(&deny, "key_revoked", DEADLINE).await;
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_two_replicas_revocation_propagates_when_the_leader_dies() {
    let ns = setup("ctl-ha").await;
    let upstream = stripe_upstream(&ns, "sk_test_upstream").await;
    let tls = Tls::new();
    let (mut leader, follower) = fixtures::two_ready_replicas(&ns, &tls, ["ha-a", "ha-b"]).await;
    assert!(
        leader
            .metrics()
            .await
            .contains("keybrake_controller_leader 1")
    );
    assert!(
        follower
            .metrics()
            .await
            .contains("keybrake_controller_leader 0")
    );

    // The sidecar streams from the follower; the leader mints and writes status.
    let sidecar = agent_sidecar(&ns, &follower, &tls, Duration::from_secs(30)).await;
    create_key(&ns, &vault_key("ha", "agent", &upstream.url(), json!({}))).await;
    let token = minted_token(&ns, "ha").await;
    sidecar.wait_verdict(&token, "allow", DEADLINE).await;

    leader.kill();
    set_state(&ns, "ha", "Revoked").await.unwrap();
    let patched = Instant::now();
    let denied = sidecar
        .wait_verdict(&token, "key_revoked", Duration::from_secs(5))
        .await;
    println!(
        "revocation with the leader dead: denied {:?} after the patch",
        denied.finished.duration_since(patched)
    );
    // The follower takes the lease over (3 s lease) and writes the status.
    wait_status(&ns, "ha", "Revoked status from the new leader", |vk| {
        let st = vk.status.as_ref()?;
        (st.phase == Some(Phase::Revoked)
            && condition(vk, "Propagated")?.0 == "True"
            && st.enforcement.as_ref()?.summary == "1/1")
            .then_some(())
    })
    .await;
    let lease = ns.api::<Lease>().get("keybrake-controller").await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(follower.identity.as_str())
    );
    assert!(
        follower
            .metrics()
            .await
            .contains("keybrake_controller_leader 1")
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_upstream_secret_rotation_applies_to_the_next_call() {
    let ns = setup("ctl-rotate").await;
    // The vendor already accepts only the new secret: the old one gets the vendor's own 401.
    let upstream = FakeVendor::start(FakeKind::Stripe, "sk_test_new")
        .await
        .unwrap();
    put_upstream_secret(&ns, fixtures::UPSTREAM_SECRET, "sk_test_old").await;
    let tls = Tls::new();
    let controller = fixtures::ready_controller(&ns, &tls, "rotate-a", free_port(), &[]).await;
    let sidecar = agent_sidecar(&ns, &controller, &tls, Duration::from_secs(30)).await;
    create_key(&ns, &vault_key("rot", "agent", &upstream.url(), json!({}))).await;
    let token = minted_token(&ns, "rot").await;
    let before = sidecar.wait_verdict(&token, "allow", DEADLINE).await;
    assert_eq!(before.status, 401, "the vendor refuses the old secret");
    let last_auth = || {
        upstream
            .requests()
            .last()
            .and_then(|r| r.headers.get("authorization").cloned())
            .map(|v| v.to_str().unwrap_or("").to_owned())
    };
    assert_eq!(last_auth().as_deref(), Some("Bearer sk_test_old"));

    put_upstream_secret(&ns, fixtures::UPSTREAM_SECRET, "sk_test_new").await;
    let rotated = Instant::now();
    let after = poll(
        "a call with the rotated secret",
        Duration::from_secs(5),
        || {
            let sidecar = &sidecar;
            let token = token.clone();
            async move {
                let call = sidecar.call(&token).await;
                (call.status == 200).then_some(call)
            }
        },
    )
    .await;
    assert_eq!(last_auth().as_deref(), Some("Bearer sk_test_new"));
    println!(
        "upstream rotation effective {:?} after the Secret write",
        after.finished.duration_since(rotated)
    );
    // The vault key never reached the vendor.
    assert!(
        upstream
            .requests()
            .iter()
            .all(|r| !r.everything().contains(&token))
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_exit_on_stdin_close_acts_only_on_a_pipe() {
    let ns = setup("ctl-stdin").await;
    let tls = Tls::new();
    // stdin = /dev/null reads as closed at once: the flag must not stop the controller.
    let mut detached = ControllerProcess::spawn_with_stdin(
        &ns,
        &tls,
        "stdin-null",
        free_port(),
        &[],
        std::process::Stdio::null(),
    );
    detached.wait_ready().await;
    assert!(
        detached
            .metrics()
            .await
            .contains("keybrake_controller_leader"),
        "serves /metrics"
    );
    assert!(
        detached.child.try_wait().unwrap().is_none(),
        "exited with stdin on /dev/null:\n{}",
        detached.log_text()
    );
    assert!(
        detached
            .log_text()
            .contains("--exit-on-stdin-close ignored"),
        "{}",
        detached.log_text()
    );
    detached.kill();

    // A pipe: closing this end stops it, cleanly.
    let mut piped = ControllerProcess::spawn(&ns, &tls, "stdin-pipe", free_port());
    piped.wait_ready().await;
    drop(piped.child.stdin.take());
    let status = poll(
        "the controller to exit after stdin closed",
        DEADLINE,
        || {
            let exited = piped.child.try_wait().ok().flatten();
            async move { exited }
        },
    )
    .await;
    assert!(status.success(), "{status:?}:\n{}", piped.log_text());
}
