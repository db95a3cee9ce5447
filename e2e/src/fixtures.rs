//! The setup most end-to-end tests repeat: a namespace with the CRDs, an upstream Secret, a
//! Stripe VaultKey and its minted token, status waits, a controller that is ready, the
//! `keybrake-sidecar` binary in controller mode, and one agent call through a sidecar.
//!
//! ```no_run
//! use keybrake_e2e::fixtures::{self, SidecarProcess};
//! use keybrake_e2e::processes::{ControllerTls, free_port};
//! use serde_json::json;
//!
//! # async fn example() {
//! let ns = fixtures::namespace_with_crds("my-test").await;
//! fixtures::put_upstream_secret(&ns, fixtures::UPSTREAM_SECRET, "sk_test_x").await;
//! let tls = ControllerTls::new();
//! let controller = fixtures::ready_controller(&ns, &tls, "a", free_port(), &[]).await;
//! let key = fixtures::stripe_vault_key("k", "agent", "http://127.0.0.1:9", json!({}));
//! fixtures::create_key(&ns, &key).await;
//! let vault_key = fixtures::minted_token(&ns, "k").await;
//! let token_file = tls.dir.path().join("sa-token");
//! std::fs::write(&token_file, fixtures::sa_token(&ns, "agent").await).unwrap();
//! let sidecar = SidecarProcess::controller_mode(
//!     tls.dir.path(), &controller.stream_url, &tls.ca(), &token_file, &[],
//! ).await;
//! sidecar.wait_ready().await;
//! let (status, verdict) = sidecar.call("GET", "/stripe/v1/customers/cus_1", &vault_key).await;
//! # let _ = (status, verdict);
//! # }
//! ```
use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Secret};
use keybrake_api::VaultKey;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::{
    TestNamespace, install_crds,
    processes::{
        ControllerProcess, ControllerTls, DEADLINE, free_port, plain_client, poll, workspace_binary,
    },
};

/// How long a fixture waits for the controller or the sidecar (token minted, status written,
/// sidecar listening/ready) before failing the test.
pub const FIXTURE_DEADLINE: Duration = Duration::from_secs(60);

/// Name of the upstream Secret [`stripe_vault_key`] refers to.
pub const UPSTREAM_SECRET: &str = "stripe-upstream";

/// Data key of the vendor secret inside the upstream Secret.
pub const UPSTREAM_SECRET_KEY: &str = "api-key";

/// A fresh namespace `<prefix>-xxxxxx` on the shared plane, with the CRDs installed.
pub async fn namespace_with_crds(prefix: &str) -> TestNamespace<'static> {
    let ns = TestNamespace::new(prefix).await;
    install_crds(&ns.client()).await.expect("install CRDs");
    ns
}

/// Creates or replaces (server-side apply) Secret `name` holding `value` under
/// [`UPSTREAM_SECRET_KEY`]; writing it again is a rotation.
pub async fn put_upstream_secret(ns: &TestNamespace<'_>, name: &str, value: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {UPSTREAM_SECRET_KEY: value},
    }))
    .expect("Secret");
    ns.api::<Secret>()
        .patch(
            name,
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&secret),
        )
        .await
        .expect("apply upstream Secret");
}

/// A Stripe VaultKey `name` bound to service account `sa`, upstream [`UPSTREAM_SECRET`] at
/// `base_url`, agent `refund-agent` (run id = `name`), allowing `GET /v1/customers/{id}`.
/// Top-level fields of `extra_spec` replace or add spec fields (`{"onStale": "Allow"}`).
pub fn stripe_vault_key(
    name: &str,
    sa: &str,
    base_url: &str,
    extra_spec: serde_json::Value,
) -> VaultKey {
    let mut spec = json!({
        "vendor": "stripe",
        "upstream": {
            "secretRef": {"name": UPSTREAM_SECRET, "key": UPSTREAM_SECRET_KEY},
            "baseUrl": base_url,
        },
        "agent": {"name": "refund-agent", "runId": name},
        "workload": {"serviceAccountName": sa},
        "allow": [{"method": "GET", "path": "/v1/customers/{id}"}],
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(json!({
        "apiVersion": "keybrake.dev/v1alpha1", "kind": "VaultKey",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("VaultKey")
}

pub async fn create_key(ns: &TestNamespace<'_>, key: &VaultKey) {
    ns.api::<VaultKey>()
        .create(&PostParams::default(), key)
        .await
        .expect("create VaultKey");
}

/// The vault key the controller minted for VaultKey `name`, once its `<name>-token` Secret
/// exists (a controller must be running).
pub async fn minted_token(ns: &TestNamespace<'_>, name: &str) -> String {
    let secrets = ns.api::<Secret>();
    let secret_name = keybrake_api::policy::token_secret_name(name);
    poll("the minted token Secret", FIXTURE_DEADLINE, || {
        let secrets = secrets.clone();
        let secret_name = secret_name.clone();
        async move {
            let data = secrets.get_opt(&secret_name).await.ok()??.data?;
            String::from_utf8(data.get(keybrake_api::policy::TOKEN_SECRET_KEY)?.0.clone()).ok()
        }
    })
    .await
}

/// Merge-patches `spec.state` (`Active`, `Suspended`, `Revoked`); the error is returned because
/// some transitions are meant to be refused.
pub async fn set_state(ns: &TestNamespace<'_>, name: &str, state: &str) -> Result<(), kube::Error> {
    ns.api::<VaultKey>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"state": state}})),
        )
        .await
        .map(|_| ())
}

/// Polls VaultKey `name` until `check` returns `Some` (`what` names the wait in the failure).
pub async fn wait_status<T>(
    ns: &TestNamespace<'_>,
    name: &str,
    what: &str,
    check: impl Fn(&VaultKey) -> Option<T>,
) -> T {
    let api = ns.api::<VaultKey>();
    let check = &check;
    poll(what, FIXTURE_DEADLINE, || {
        let api = api.clone();
        async move { check(&api.get(name).await.ok()?) }
    })
    .await
}

/// `(status, reason, message)` of the VaultKey's condition `type_`.
pub fn condition(vk: &VaultKey, type_: &str) -> Option<(String, String, String)> {
    vk.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// A service-account token with the `keybrake` audience (what a sidecar presents).
pub async fn sa_token(ns: &TestNamespace<'_>, sa: &str) -> String {
    ns.service_account_token(sa, "keybrake")
        .await
        .expect("TokenRequest")
}

/// [`ControllerProcess::spawn_with`], then waits for its `/ready`.
pub async fn ready_controller(
    ns: &TestNamespace<'_>,
    tls: &ControllerTls,
    identity: &str,
    stream_port: u16,
    extra_args: &[&str],
) -> ControllerProcess {
    let controller = ControllerProcess::spawn_with(ns, tls, identity, stream_port, extra_args);
    controller.wait_ready().await;
    controller
}

/// Two ready controller replicas (identities `ids`) on their own stream ports; returns them as
/// (leader, follower) once the election Lease names a holder.
pub async fn two_ready_replicas(
    ns: &TestNamespace<'_>,
    tls: &ControllerTls,
    ids: [&str; 2],
) -> (ControllerProcess, ControllerProcess) {
    let a = ControllerProcess::spawn(ns, tls, ids[0], free_port());
    let b = ControllerProcess::spawn(ns, tls, ids[1], free_port());
    a.wait_ready().await;
    b.wait_ready().await;
    let leases: Api<Lease> = ns.api();
    let holder = poll("a lease holder", DEADLINE, || {
        let leases = leases.clone();
        async move {
            leases
                .get_opt("keybrake-controller")
                .await
                .ok()??
                .spec?
                .holder_identity
        }
    })
    .await;
    if holder == a.identity { (a, b) } else { (b, a) }
}

/// One agent call to `http://{proxy}{path}` (path includes the vendor prefix on the proxy
/// port, e.g. `/stripe/v1/customers/cus_1`) with the vault key as a Bearer token; returns the
/// status and the `keybrake-verdict` header ("" when absent).
pub async fn agent_call(
    proxy: SocketAddr,
    method: &str,
    path: &str,
    vault_key: &str,
) -> (u16, String) {
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{proxy}{path}"))
        .header("authorization", format!("Bearer {vault_key}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    status_and_verdict(request).await
}

/// Like [`agent_call`], a POST with a form-encoded body (Stripe, Twilio).
pub async fn agent_form_call(
    proxy: SocketAddr,
    path: &str,
    vault_key: &str,
    form: &str,
) -> (u16, String) {
    let request = hyper::Request::post(format!("http://{proxy}{path}"))
        .header("authorization", format!("Bearer {vault_key}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(form.to_owned())))
        .expect("request");
    status_and_verdict(request).await
}

async fn status_and_verdict(request: hyper::Request<Full<Bytes>>) -> (u16, String) {
    let http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
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

/// The `keybrake-sidecar` binary (built on first use) on ephemeral loopback ports, killed on
/// drop, and by its [`OrphanGuard`] if this test process dies without dropping it. Its stderr
/// (JSON logs) is `dir/sidecar.log`.
pub struct SidecarProcess {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    _guard: OrphanGuard,
}

impl SidecarProcess {
    /// Controller mode: policy from `controller_url`'s watch stream (trusting `ca`,
    /// authenticating with the service-account token in `token_file`), audit rows spooled under
    /// `dir/spool` and shipped to the controller. `extra_args` come after these flags.
    pub async fn controller_mode(
        dir: &Path,
        controller_url: &str,
        ca: &Path,
        token_file: &Path,
        extra_args: &[&str],
    ) -> Self {
        let spool = dir.join("spool");
        let mut args = vec![
            "--controller-url",
            controller_url,
            "--ca-file",
            ca.to_str().expect("utf-8 path"),
            "--token-file",
            token_file.to_str().expect("utf-8 path"),
            "--spool-dir",
            spool.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra_args);
        Self::spawn(dir, &args).await
    }

    /// The sidecar with `args`, every listener on an ephemeral port, JSON logs; returns once it
    /// wrote its `--addr-file`.
    pub async fn spawn(dir: &Path, args: &[&str]) -> Self {
        Self::spawn_with_env(dir, args, &[]).await
    }

    /// [`Self::spawn`] with extra environment variables (a standalone config's `secretEnv`).
    pub async fn spawn_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let binary = tokio::task::spawn_blocking(|| {
            workspace_binary("keybrake-sidecar", "keybrake-sidecar")
        })
        .await
        .expect("building keybrake-sidecar");
        let addr_file = dir.join("sidecar-addrs.json");
        let log = dir.join("sidecar.log");
        let child = Command::new(binary)
            .args(args)
            .args([
                "--proxy-port",
                "0",
                "--stripe-port",
                "0",
                "--openai-port",
                "0",
                "--twilio-port",
                "0",
                "--resend-port",
                "0",
                "--admin-port",
                "0",
            ])
            .args(["--addr-file", addr_file.to_str().expect("utf-8 path")])
            .args(["--log-format", "json"])
            .env(
                "RUST_LOG",
                "info,keybrake_sidecar=debug,keybrake_audit=debug",
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                std::fs::File::create(dir.join("sidecar.out")).expect("sidecar.out"),
            ))
            .stderr(Stdio::from(
                std::fs::File::create(&log).expect("sidecar.log"),
            ))
            .spawn()
            .expect("spawning keybrake-sidecar");
        // Owned before the wait, so a sidecar that never listens is killed when the test fails.
        let unset = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut sidecar = SidecarProcess {
            _guard: OrphanGuard::watch(child.id()),
            child,
            proxy: unset,
            admin: unset,
            log,
        };
        let addrs: serde_json::Value = poll("the sidecar's address file", FIXTURE_DEADLINE, || {
            let text = std::fs::read_to_string(&addr_file).ok();
            if let Some(status) = sidecar.child.try_wait().ok().flatten() {
                panic!(
                    "keybrake-sidecar exited ({status}) before listening; log:\n{}",
                    sidecar.log_text()
                );
            }
            async move { serde_json::from_str(&text?).ok() }
        })
        .await;
        let addr = |name: &str| -> SocketAddr {
            addrs[name]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no `{name}` address in {addrs}"))
        };
        sidecar.proxy = addr("proxy");
        sidecar.admin = addr("admin");
        sidecar
    }

    /// GET on the admin port: (status, body); (0, "") when the sidecar does not answer.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let uri: hyper::Uri = format!("http://{}{path}", self.admin)
            .parse()
            .expect("admin URI");
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

    /// Waits until `/ready` answers 200 (in controller mode: the policy snapshot arrived).
    pub async fn wait_ready(&self) {
        poll("sidecar /ready", FIXTURE_DEADLINE, || async move {
            (self.admin_get("/ready").await.0 == 200).then_some(())
        })
        .await;
    }

    /// The `/metrics` text (fails the test unless the admin port answers 200).
    pub async fn metrics(&self) -> String {
        let (status, text) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "sidecar GET /metrics: {text}");
        text
    }

    /// The value of the unlabelled sample `name` on `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }

    /// [`agent_call`] on this sidecar's prefix-routed proxy port.
    pub async fn call(&self, method: &str, path: &str, vault_key: &str) -> (u16, String) {
        agent_call(self.proxy, method, path, vault_key).await
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills a process this test spawned if the test process dies without cleaning up (SIGKILL, a
/// timeout, a panic while statics hold it): a `sh` reading a pipe whose write end only this
/// process holds. Dropping the guard writes `exit` (the owner stopped the process itself); when
/// the pipe closes without it, the process dies with SIGKILL. (The sidecar has no
/// `--exit-on-stdin-close` like the controller, and its own pid must stay `child` so tests can
/// signal it.)
struct OrphanGuard {
    sh: Child,
}

impl OrphanGuard {
    fn watch(pid: u32) -> OrphanGuard {
        let sh = Command::new("/bin/sh")
            .args([
                "-c",
                r#"read -r word; [ "$word" = exit ] || kill -KILL "$1" 2>/dev/null"#,
                "orphan-guard",
                &pid.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning the orphan guard (/bin/sh)");
        OrphanGuard { sh }
    }
}

impl Drop for OrphanGuard {
    fn drop(&mut self) {
        if let Some(mut pipe) = self.sh.stdin.take() {
            let _ = pipe.write_all(b"exit\n");
        }
        let _ = self.sh.wait();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn sleeper() -> Child {
        Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawning sleep")
    }

    /// Polls `child` until it exits; fails after 10 s.
    fn exit_status(child: &mut Child) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    #[test]
    fn orphan_guard_kills_when_its_owner_vanishes() {
        let mut victim = sleeper();
        let mut guard = OrphanGuard::watch(victim.id());
        // What the kernel does when the test process dies: the write end closes, no `exit`.
        drop(guard.sh.stdin.take());
        let status = exit_status(&mut victim).expect("the guard killed the process");
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }

    #[test]
    fn orphan_guard_dropped_leaves_the_process_to_its_owner() {
        let mut survivor = sleeper();
        drop(OrphanGuard::watch(survivor.id()));
        assert!(
            survivor.try_wait().expect("try_wait").is_none(),
            "a dropped guard (the guard's sh has exited) must not kill"
        );
        survivor.kill().expect("kill sleep");
        survivor.wait().expect("reap sleep");
    }
}
