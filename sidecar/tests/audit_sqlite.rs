//! The `keybrake-sidecar` binary in standalone mode with `--audit sqlite:///…`: every call,
//! allowed or denied, becomes exactly one row in the SQLite sink, written while the sidecar runs
//! (not only at shutdown), and neither the rows, the database files nor the logs ever hold the
//! vault key or the upstream secret.
mod common;

use std::{
    collections::HashSet,
    io::Read,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use keybrake_api::TokenHash;
use keybrake_audit::{row::Value, sink::SqliteSink};

const BIN: &str = env!("CARGO_BIN_EXE_keybrake-sidecar");
const TOKEN: &str = "vault_key_auditSqliteAbcdefghijklmnopqrstuvwxyz012345";
const UNKNOWN_TOKEN: &str = "vault_key_unknownAbcdefghijklmnopqrstuvwxyz0123456789";
const DEADLINE: Duration = Duration::from_secs(20);

fn config(openai_url: &str) -> String {
    format!(
        r#"
upstreams:
  openai-test:
    vendor: openai
    baseUrl: {openai_url}
    secretFile: openai.secret
keys:
  - name: summariser
    tokenSha256: {hash}
    upstream: openai-test
    agent: {{name: summariser, runId: run-42}}
    allow: [{{operation: models.list}}]
"#,
        hash = TokenHash::of(TOKEN).to_hex()
    )
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a bounded wait
    }
}

const ROWS_SQL: &str = "SELECT id, policy_verdict, vault_key_id, agent_name, agent_run_id, \
     namespace, vendor_status, operation FROM agent_call_audit ORDER BY started_at, id";

async fn rows(db: &Path) -> Vec<Vec<Value>> {
    let sink = SqliteSink::open(db.to_owned())
        .await
        .expect("open audit db");
    sink.query(ROWS_SQL, &[]).await.expect("query audit rows")
}

fn text(v: &Value) -> Option<&str> {
    v.as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_sqlite_audit_has_one_row_per_call_and_no_secrets() {
    let fakes = Fakes::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("openai.secret"),
        format!("{OPENAI_SECRET}\n"),
    )
    .unwrap();
    let config_path = dir.path().join("keybrake.yaml");
    std::fs::write(&config_path, config(&fakes.openai.url())).unwrap();
    let db = dir.path().join("audit.db");
    let addr_file = dir.path().join("addrs.json");
    let mut child = Command::new(BIN)
        .args(["--config", config_path.to_str().unwrap()])
        .args(["--audit", &format!("sqlite://{}", db.display())])
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
        .args(["--log-format", "json", "--worker-threads", "1"])
        .args(["--addr-file", addr_file.to_str().unwrap()])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logs = Arc::new(Mutex::new(String::new()));
    let mut readers = Vec::new();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let logs = logs.clone();
        readers.push(std::thread::spawn(move || {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                logs.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }));
    }
    let mut running = Running(child);
    let addrs: serde_json::Value = wait_for("the address file", async || {
        serde_json::from_str(&std::fs::read_to_string(&addr_file).ok()?).ok()
    })
    .await;
    let proxy: SocketAddr = addrs["proxy"].as_str().unwrap().parse().unwrap();

    let call = async |method: &str, path: &str, token: &str| {
        let auth = bearer(token);
        let r = raw(
            proxy,
            &request(method, path, &[("Authorization", &auth)], b""),
        )
        .await
        .unwrap();
        (r.status, r.verdict().to_owned())
    };
    // Two allowed, three denied (operation not allowed, unknown key, unknown key on a path
    // with no operation).
    assert_eq!(call("GET", "/openai/v1/models", TOKEN).await.0, 200);
    assert_eq!(call("GET", "/openai/v1/models", TOKEN).await.0, 200);
    let (status, verdict) = call("DELETE", "/openai/v1/models/gpt-x", TOKEN).await;
    assert_eq!((status, verdict.as_str()), (403, "operation_denied"));
    let (status, verdict) = call("GET", "/openai/v1/models", UNKNOWN_TOKEN).await;
    assert_eq!((status, verdict.as_str()), (401, "key_unknown"));
    let (_, verdict) = call("POST", "/openai/v1/chat/completions", UNKNOWN_TOKEN).await;
    assert_eq!(verdict, "key_unknown");
    assert_eq!(fakes.openai.request_count(), 2, "denied calls never leave");

    // Written while the sidecar runs, off the request path.
    let written = wait_for("five audit rows in SQLite", async || {
        let r = rows(&db).await;
        (r.len() >= 5).then_some(r)
    })
    .await;
    assert_eq!(written.len(), 5, "one row per call: {written:?}");
    let ids: HashSet<&str> = written.iter().filter_map(|r| text(&r[0])).collect();
    assert_eq!(ids.len(), 5, "distinct row ids");
    // (verdict, vault_key_id, agent, namespace, vendor_status)
    type Summary<'a> = (
        String,
        Option<&'a str>,
        Option<&'a str>,
        Option<&'a str>,
        i64,
    );
    let summary: Vec<Summary> = written
        .iter()
        .map(|r| {
            (
                text(&r[1]).unwrap().to_owned(),
                text(&r[2]),
                text(&r[3]),
                text(&r[5]),
                r[6].as_i64().unwrap(),
            )
        })
        .collect();
    let key = Some("standalone/summariser");
    let agent = Some("summariser");
    let ns = Some("standalone");
    assert_eq!(
        summary,
        vec![
            ("allow".to_owned(), key, agent, ns, 200),
            ("allow".to_owned(), key, agent, ns, 200),
            ("operation_denied".to_owned(), key, agent, ns, 0),
            ("key_unknown".to_owned(), None, None, None, 0),
            ("key_unknown".to_owned(), None, None, None, 0),
        ]
    );
    assert_eq!(text(&written[0][4]), Some("run-42"), "agent run id");
    assert_eq!(text(&written[0][7]), Some("models.list"));

    // SIGTERM: drains, flushes the queue, exits 0.
    let pid = running.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut child = std::mem::replace(&mut running.0, Command::new("true").spawn().unwrap());
    let status = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        for r in readers {
            r.join().unwrap();
        }
        status
    });
    let status = tokio::time::timeout(DEADLINE, status)
        .await
        .expect("sidecar exits after SIGTERM")
        .unwrap();
    let logs = logs.lock().unwrap().clone();
    assert!(status.success(), "exit {status:?}: {logs}");
    assert!(logs.contains("audit queue flushed"), "{logs}");
    assert_eq!(rows(&db).await.len(), 5, "nothing written twice");

    // No secret anywhere: logs, and every byte of the database files (WAL included).
    for secret in [TOKEN, UNKNOWN_TOKEN, OPENAI_SECRET] {
        assert!(!logs.contains(secret), "{secret} reached the logs:\n{logs}");
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if !path.to_string_lossy().contains("audit.db") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} found in {}",
                path.display()
            );
        }
    }
    assert!(
        !logs.contains("audit rows dropped"),
        "no row was dropped: {logs}"
    );
}
