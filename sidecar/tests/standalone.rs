//! The `keybrake-sidecar` binary in standalone mode: `hash-key`, start from a config file,
//! reload on change (a revoke in the file stops the next call), a broken file keeps the last
//! good policy, SIGTERM drains and exits.
mod common;

use std::{
    io::Write,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use keybrake_api::TokenHash;

const BIN: &str = env!("CARGO_BIN_EXE_keybrake-sidecar");
const TOKEN: &str = "vault_key_standaloneAbcdefghijklmnopqrstuvwxyz0123456";

fn hash_key(token: &str) -> String {
    let mut child = Command::new(BIN)
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{token}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn config(openai_url: &str, hash: &str, state: &str) -> String {
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
    state: {state}
    agent: {{name: summariser}}
    allow: [{{operation: models.list}}]
"#
    )
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20)); // poll interval of a bounded wait
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_binary_reloads_its_policy_file() {
    let hash = hash_key(TOKEN);
    assert_eq!(hash, TokenHash::of(TOKEN).to_hex());

    let fakes = Fakes::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("openai.secret"),
        format!("{OPENAI_SECRET}\n"),
    )
    .unwrap();
    let config_path = dir.path().join("keybrake.yaml");
    write_atomically(&config_path, &config(&fakes.openai.url(), &hash, "Active"));
    let addr_file = dir.path().join("addrs.json");
    let child = Command::new(BIN)
        .args([
            "--config",
            config_path.to_str().unwrap(),
            "--reload-interval",
            "100ms",
        ])
        .args([
            "--proxy-port",
            "0",
            "--stripe-port",
            "0",
            "--openai-port",
            "0",
            "--twilio-port",
            "0",
        ])
        .args([
            "--resend-port",
            "0",
            "--admin-port",
            "0",
            "--worker-threads",
            "1",
            "--log-format",
            "json",
        ])
        .args(["--addr-file", addr_file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    // Collect the logs as they come, so the test can wait on what the sidecar says.
    let logs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let logs = logs.clone();
        let mut stderr = running.0.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
                if n == 0 {
                    break;
                }
                logs.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let logged = |needle: &str| logs.lock().unwrap().contains(needle);
    wait_until("the address file", || addr_file.exists());
    let addrs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&addr_file).unwrap()).unwrap();
    let proxy: std::net::SocketAddr = addrs["proxy"].as_str().unwrap().parse().unwrap();
    let admin: std::net::SocketAddr = addrs["admin"].as_str().unwrap().parse().unwrap();

    let models = || {
        request(
            "GET",
            "/openai/v1/models",
            &[("Authorization", &bearer(TOKEN))],
            b"",
        )
    };
    let r = raw(proxy, &models()).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        fakes.openai.requests()[0].headers["authorization"],
        format!("Bearer {OPENAI_SECRET}").as_str()
    );
    assert_eq!(
        raw(admin, &request("GET", "/ready", &[], b""))
            .await
            .unwrap()
            .status,
        200
    );

    // A broken file keeps the last good policy.
    write_atomically(&config_path, "upstreams: [this is not");
    let metrics = || async {
        String::from_utf8(
            raw(admin, &request("GET", "/metrics", &[], b""))
                .await
                .unwrap()
                .body,
        )
        .unwrap()
    };
    wait_until("the broken file to be reported", || {
        logged("keeping the last good policy")
    });
    assert!(metrics().await.contains("keybrake_policy_revision 1"));
    let r = raw(proxy, &models()).await.unwrap();
    assert_eq!(r.status, 200, "the last good policy still serves");

    // Revoke in the file: the next call after the reload is refused.
    write_atomically(&config_path, &config(&fakes.openai.url(), &hash, "Revoked"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if metrics().await.contains("keybrake_policy_revision 2") {
            break;
        }
        assert!(Instant::now() < deadline, "policy file change not applied");
        tokio::task::yield_now().await;
    }
    let before = fakes.openai.request_count();
    let r = raw(proxy, &models()).await.unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.verdict(), "key_revoked");
    assert_eq!(fakes.openai.request_count(), before);

    // SIGTERM: drains and exits 0; the logs never carry the key or the secret.
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
        reader.join().unwrap();
        status
    });
    let status = tokio::time::timeout(Duration::from_secs(20), status)
        .await
        .unwrap()
        .unwrap();
    let logs = logs.lock().unwrap().clone();
    assert!(status.success(), "exit {status:?}: {logs}");
    assert!(logs.contains("keeping the last good policy"), "{logs}");
    assert!(logs.contains("policy file applied"));
    assert!(
        !logs.contains(TOKEN) && !logs.contains(OPENAI_SECRET),
        "a secret reached the logs:\n{logs}"
    );
}

#[test]
fn refuses_to_start_on_a_broken_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "upstreams:\n  x:\n    vendor: stripe\n    secret: sk_live_inline\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "--config",
            path.to_str().unwrap(),
            "--proxy-port",
            "0",
            "--admin-port",
            "0",
        ])
        .args([
            "--stripe-port",
            "0",
            "--openai-port",
            "0",
            "--twilio-port",
            "0",
            "--resend-port",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `secret`"), "{stderr}");
    assert!(!stderr.contains("sk_live_inline"));
}
