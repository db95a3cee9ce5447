//! Audit delivery end to end: the real `keybrake-sidecar` binary in controller mode (policy from
//! the watch stream, rows shipped to `POST /v1/audit` over HTTP/2 + TLS with its ServiceAccount
//! token), the real controller writing them to its SQLite sink, on the shared kube-apiserver.
//!
//! The controller is killed mid-run while the agent keeps calling: rows go to the sidecar's disk
//! spool, and once a new controller answers on the same address they are replayed. Every call
//! ends up as exactly one row, and the spool drains back to 0 bytes.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::Secret;
use keybrake_api::{SecretString, VaultKey, audit::AuditRow};
use keybrake_audit::{
    row::Value,
    sink::SqliteSink,
    transport::{HttpTransport, StaticToken, Transport, TransportError},
};
use keybrake_e2e::{
    TestNamespace, install_crds,
    processes::{
        ControllerProcess, ControllerTls, free_port, plain_client, poll, workspace_binary,
    },
};
use keybrake_testkit::{FakeKind, FakeVendor};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);
const STRIPE_SECRET: &str = "sk_test_upstream_audit_e2e";
const KEY: &str = "audit-key";
const SA: &str = "agent";

/// The sidecar binary in controller mode, killed on drop.
struct SidecarProcess {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl SidecarProcess {
    async fn spawn(dir: &Path, controller_url: &str, ca: &Path, token_file: &Path) -> Self {
        let addr_file = dir.join("sidecar-addrs.json");
        let log = dir.join("sidecar.log");
        let child = Command::new(workspace_binary("keybrake-sidecar", "keybrake-sidecar"))
            .args(["--controller-url", controller_url])
            .args(["--ca-file", ca.to_str().unwrap()])
            .args(["--token-file", token_file.to_str().unwrap()])
            .args(["--spool-dir", dir.join("spool").to_str().unwrap()])
            .args(["--spool-max-bytes", "10000000"])
            .args(["--audit-retry-max", "200ms"])
            // The outage below must not make the policy stale: calls keep being allowed.
            .args(["--staleness-bound", "5m"])
            .args([
                "--proxy-port",
                "0",
                "--stripe-port",
                "0",
                "--openai-port",
                "0",
            ])
            .args([
                "--twilio-port",
                "0",
                "--resend-port",
                "0",
                "--admin-port",
                "0",
            ])
            .args(["--addr-file", addr_file.to_str().unwrap()])
            .args(["--log-format", "json"])
            .env(
                "RUST_LOG",
                "info,keybrake_sidecar=debug,keybrake_audit=debug",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                std::fs::File::create(dir.join("sidecar.out")).unwrap(),
            ))
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("spawning keybrake-sidecar");
        let addrs: serde_json::Value = poll("the sidecar's address file", DEADLINE, || {
            let text = std::fs::read_to_string(&addr_file).ok();
            async move { serde_json::from_str(&text?).ok() }
        })
        .await;
        let addr = |name: &str| addrs[name].as_str().unwrap().parse().unwrap();
        SidecarProcess {
            child,
            proxy: addr("proxy"),
            admin: addr("admin"),
            log,
        }
    }

    async fn admin_get(&self, path: &str) -> (u16, String) {
        let uri: hyper::Uri = format!("http://{}{path}", self.admin).parse().unwrap();
        let Ok(res) = plain_client().get(uri).await else {
            return (0, String::new());
        };
        let status = res.status().as_u16();
        let body = res.into_body().collect().await.map(|b| b.to_bytes());
        (
            status,
            String::from_utf8_lossy(&body.unwrap_or_default()).into_owned(),
        )
    }

    /// A sample value of the sidecar's `/metrics` (no labels).
    async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }

    /// One agent call with the vault key; returns (status, verdict).
    async fn call(&self, method: &str, path: &str, vault_key: &str) -> (u16, String) {
        let http: hyper_util::client::legacy::Client<_, Empty<Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}/stripe{path}", self.proxy))
            .header("authorization", format!("Bearer {vault_key}"))
            .body(Empty::new())
            .unwrap();
        let res = http
            .request(request)
            .await
            .expect("call through the sidecar");
        let status = res.status().as_u16();
        let verdict = res
            .headers()
            .get("keybrake-verdict")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let _ = res.into_body().collect().await;
        (status, verdict)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the agent did, to compare with what the controller stored.
#[derive(Default)]
struct Tally {
    allowed: i64,
    denied: i64,
}

impl Tally {
    fn total(&self) -> i64 {
        self.allowed + self.denied
    }

    /// `n` allowed reads and one call outside the allowlist.
    async fn calls(&mut self, sidecar: &SidecarProcess, vault_key: &str, n: usize) {
        for _ in 0..n {
            let (status, verdict) = sidecar.call("GET", "/v1/customers/cus_1", vault_key).await;
            assert_eq!((status, verdict.as_str()), (200, "allow"));
            self.allowed += 1;
        }
        let (status, verdict) = sidecar.call("POST", "/v1/refunds", vault_key).await;
        assert_eq!((status, verdict.as_str()), (403, "operation_denied"));
        self.denied += 1;
    }
}

async fn stored(db: &Path, sql: &str) -> Vec<Vec<Value>> {
    let sink = SqliteSink::open(db.to_owned())
        .await
        .expect("open the controller's audit db");
    sink.query(sql, &[]).await.expect("audit query")
}

async fn stored_count(db: &Path) -> i64 {
    stored(db, "SELECT count(*) FROM agent_call_audit").await[0][0]
        .as_i64()
        .unwrap()
}

async fn setup_key(ns: &TestNamespace<'_>, stripe_url: &str) -> String {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "stripe-upstream"},
        "stringData": {"api-key": STRIPE_SECRET},
    }))
    .unwrap();
    ns.api::<Secret>()
        .patch(
            "stripe-upstream",
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&secret),
        )
        .await
        .expect("upstream Secret");
    let key: VaultKey = serde_json::from_value(json!({
        "apiVersion": "keybrake.dev/v1alpha1", "kind": "VaultKey",
        "metadata": {"name": KEY},
        "spec": {
            "vendor": "stripe",
            "upstream": {"secretRef": {"name": "stripe-upstream", "key": "api-key"}, "baseUrl": stripe_url},
            "agent": {"name": "refund-agent", "runId": "run-audit"},
            "workload": {"serviceAccountName": SA},
            "allow": [{"method": "GET", "path": "/v1/customers/{id}"}],
        },
    }))
    .unwrap();
    ns.api::<VaultKey>()
        .create(&PostParams::default(), &key)
        .await
        .expect("create VaultKey");
    let secrets: Api<Secret> = ns.api();
    poll("the minted token Secret", DEADLINE, || {
        let secrets = secrets.clone();
        async move {
            let data = secrets.get_opt(&format!("{KEY}-token")).await.ok()??.data?;
            String::from_utf8(data.get("VAULT_KEY")?.0.clone()).ok()
        }
    })
    .await
}

fn row(id: &str, namespace: &str, vault_key_id: &str) -> AuditRow {
    serde_json::from_value(json!({
        "id": id, "started_at": "2026-11-30T23:00:00Z", "duration_ms": 1,
        "vault_key_id": vault_key_id, "agent_name": "refund-agent", "agent_run_id": null,
        "namespace": namespace, "pod": null, "vendor": "stripe", "operation": null,
        "method": "GET", "path_template": null, "policy_verdict": "allow", "verdict_reason": null,
        "customer_scope_id": null, "vendor_status": 200, "vendor_request_id": null,
        "cost_usd_parsed": null, "cost_source": "none", "cap_usage_after_usd": null,
        "policy_revision": 1,
    }))
    .expect("AuditRow")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_rows_survive_a_controller_outage_exactly_once() {
    let ns = TestNamespace::new("audit-dlv").await;
    install_crds(&ns.client()).await.expect("install CRDs");
    let tls = ControllerTls::new();
    let db_path = tls.dir.path().join("audit.db");
    let db = db_path.as_path();
    let sink = format!("sqlite://{}", db.display());
    let port = free_port();
    let mut controller =
        ControllerProcess::spawn_with(&ns, &tls, "audit-a", port, &["--audit-sink", &sink]);
    controller.wait_ready().await;
    let stripe = FakeVendor::start(FakeKind::Stripe, STRIPE_SECRET)
        .await
        .unwrap();
    let vault_key = setup_key(&ns, &stripe.url()).await;
    let sa_token = ns
        .service_account_token(SA, "keybrake")
        .await
        .expect("TokenRequest");
    let token_file = tls.dir.path().join("sa-token");
    std::fs::write(&token_file, &sa_token).unwrap();

    let sidecar_process = SidecarProcess::spawn(
        tls.dir.path(),
        &controller.stream_url,
        &tls.ca(),
        &token_file,
    )
    .await;
    let sidecar = &sidecar_process;
    poll(
        "sidecar /ready (policy from the stream)",
        DEADLINE,
        || async move { (sidecar.admin_get("/ready").await.0 == 200).then_some(()) },
    )
    .await;

    // 1. Controller up: rows arrive as calls happen.
    let mut tally = Tally::default();
    tally.calls(sidecar, &vault_key, 10).await;
    let expected = tally.total();
    poll(
        "rows of the first calls in SQLite",
        DEADLINE,
        || async move { (stored_count(db).await == expected).then_some(()) },
    )
    .await;

    // 2. Controller gone: calls keep working, their rows go to the spool.
    controller.kill();
    tally.calls(sidecar, &vault_key, 20).await;
    poll(
        "rows spooled while the controller is down",
        DEADLINE,
        || async move { (sidecar.metric("keybrake_audit_spool_bytes").await > 0.0).then_some(()) },
    )
    .await;
    assert_eq!(
        stored_count(db).await,
        expected,
        "nothing stored while down"
    );
    let spooled_bytes = sidecar.metric("keybrake_audit_spool_bytes").await;

    // 3. A new controller on the same address: the spool replays, then new rows follow.
    let controller =
        ControllerProcess::spawn_with(&ns, &tls, "audit-b", port, &["--audit-sink", &sink]);
    controller.wait_ready().await;
    let back = std::time::Instant::now();
    tally.calls(sidecar, &vault_key, 5).await;
    let expected = tally.total();
    poll(
        "every row stored once the controller is back",
        DEADLINE,
        || async move {
            let n = stored_count(db).await;
            assert!(n <= expected, "{n} rows for {expected} calls");
            (n == expected).then_some(())
        },
    )
    .await;
    poll("the spool drained", DEADLINE, || async move {
        (sidecar.metric("keybrake_audit_spool_bytes").await == 0.0).then_some(())
    })
    .await;
    eprintln!(
        "audit_delivery: {} rows ({spooled_bytes} bytes were spooled) stored, spool drained, \
         {} ms after the controller was ready again",
        tally.total(),
        back.elapsed().as_millis()
    );
    assert_eq!(
        sidecar.metric("keybrake_audit_dropped_rows_total").await,
        0.0
    );

    // Exactly once, and the right rows.
    let counts = stored(
        db,
        "SELECT count(*), count(DISTINCT id), \
         sum(CASE WHEN policy_verdict = 'allow' AND vendor_status = 200 THEN 1 ELSE 0 END), \
         sum(CASE WHEN policy_verdict = 'operation_denied' AND vendor_status = 0 THEN 1 ELSE 0 END) \
         FROM agent_call_audit",
    )
    .await;
    let counts: Vec<i64> = counts[0].iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(
        counts,
        vec![expected, expected, tally.allowed, tally.denied],
        "[rows, distinct ids, allowed, denied]"
    );
    let keys = stored(
        db,
        "SELECT DISTINCT namespace, vault_key_id, agent_name FROM agent_call_audit",
    )
    .await;
    let key_id = format!("{}/{KEY}", ns.name());
    assert_eq!(
        keys,
        vec![vec![
            Value::Text(ns.name().to_owned()),
            Value::Text(key_id),
            Value::Text("refund-agent".into()),
        ]]
    );
    assert_eq!(stripe.request_count() as i64, tally.allowed);

    // The ingest endpoint only takes rows of the caller's own namespace.
    let transport = HttpTransport::new(
        &controller.stream_url,
        &std::fs::read(tls.ca()).unwrap(),
        Arc::new(StaticToken(SecretString::new(sa_token.clone()))),
        Duration::from_secs(10),
    )
    .unwrap();
    match transport
        .send(&[row("forged-ns", "someone-else", "someone-else/k")])
        .await
    {
        Err(TransportError::Status { status: 403, .. }) => {}
        other => panic!("a row of another namespace must be refused, got {other:?}"),
    }
    assert_eq!(stored_count(db).await, expected);

    // SIGTERM: the sidecar flushes and exits 0; no secret in its logs or the stored rows.
    let mut sidecar = sidecar_process;
    let pid = sidecar.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = poll("the sidecar to exit", DEADLINE, || {
        let exited = sidecar.child.try_wait().ok().flatten();
        async move { exited }
    })
    .await;
    let logs = sidecar.log_text();
    assert!(status.success(), "exit {status:?}:\n{logs}");
    let dump = stored(db, "SELECT * FROM agent_call_audit").await;
    let dump = format!("{dump:?}");
    for secret in [vault_key.as_str(), STRIPE_SECRET, sa_token.as_str()] {
        assert!(!logs.contains(secret), "a secret reached the sidecar log");
        assert!(!dump.contains(secret), "a secret reached the audit rows");
    }
}
