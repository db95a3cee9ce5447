//! One control plane: etcd + kube-apiserver on free loopback ports, certificates, a token-auth
//! admin, service-account signing keys, a kubeconfig — or an attachment to a plane that
//! `make cluster` left running.
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};

use crate::binaries::K8sBinaries;
use crate::error::HarnessError;
use crate::pki::{self, TestCa};
use crate::process::GuardedProcess;

/// Deadline for etcd to answer `/health`.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for kube-apiserver's `/readyz` (all post-start hooks, RBAC bootstrap included).
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// A free port can be taken by someone else between our probe and the component's bind.
const START_ATTEMPTS: usize = 3;
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Set to `1` to keep a plane's directory (logs, certificates) after it stops, for debugging.
pub const KEEP_DIR_ENV: &str = "KEYBRAKE_E2E_KEEP";

/// Where a new plane keeps its files and whether they outlive it.
#[derive(Clone, Debug, Default)]
pub struct PlaneOptions {
    /// Directory for certificates, etcd data, logs and the kubeconfig. Default: a fresh
    /// directory under the system temp dir. It must not exist or be empty.
    pub dir: Option<PathBuf>,
}

/// How long startup took, spawn to ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartupTimings {
    /// etcd spawn → `/health` answers true.
    pub etcd: Duration,
    /// kube-apiserver spawn → `/readyz` answers ok.
    pub apiserver: Duration,
    /// First spawn → `/readyz` ok (the warm start time of the whole plane).
    pub total: Duration,
}

/// What `plane.json` (next to the kubeconfig) records, so another process can attach.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct PlaneRecord {
    kind: String,
    server_url: String,
    service_account_issuer: String,
    kubeconfig: PathBuf,
    owner_pid: u32,
}

const PLANE_RECORD_KIND: &str = "keybrake-e2e-plane";

/// A running kube-apiserver + etcd. Dropping a plane this process started stops it (and so does
/// this process exiting, however it exits). See the crate docs for the API tour.
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    server_url: String,
    ca_pem: String,
    admin_token: String,
    service_account_issuer: String,
    binaries: K8sBinaries,
    kube_config: kube::Config,
    startup: Option<StartupTimings>,
    /// Stop order: kube-apiserver first, then etcd. Empty when attached to another's plane.
    processes: Mutex<Vec<GuardedProcess>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server_url", &self.server_url)
            .field("kubeconfig", &self.kubeconfig)
            .field("startup", &self.startup)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts a new plane in a fresh temp directory. Blocks until `/readyz` is ok. Callable from
    /// sync or async code (readiness is polled on a private runtime thread).
    pub fn start() -> Result<Self, HarnessError> {
        Self::start_with(PlaneOptions::default())
    }

    pub fn start_with(options: PlaneOptions) -> Result<Self, HarnessError> {
        let binaries = K8sBinaries::locate()?;
        let dir = match options.dir {
            Some(dir) => dir,
            None => fresh_temp_dir(),
        };
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(&binaries, &dir) {
                Ok(plane) => return Ok(plane),
                Err(err) if is_port_race(&err) => last_error = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    fn start_once(binaries: &K8sBinaries, dir: &Path) -> Result<Self, HarnessError> {
        let keep = std::env::var(KEEP_DIR_ENV).is_ok_and(|v| v == "1");
        let cleanup = (!keep).then_some(dir);
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(HarnessError::io(format!(
                "clear plane dir {}",
                dir.display()
            )))?;
        }
        let pki_dir = dir.join("pki");
        let logs = dir.join("logs");
        for sub in [
            &pki_dir,
            &logs,
            &dir.join("etcd"),
            &dir.join("apiserver-certs"),
        ] {
            std::fs::create_dir_all(sub)
                .map_err(HarnessError::io(format!("create {}", sub.display())))?;
        }
        let dir = dir
            .canonicalize()
            .map_err(HarnessError::io("canonicalize plane dir"))?;
        let pki_dir = dir.join("pki");
        let logs = dir.join("logs");

        // Certificates, service-account signing key and the admin token.
        let ca = TestCa::new("keybrake-e2e-ca")?;
        let serving = ca.issue_server(&["127.0.0.1", "localhost"])?;
        let admin_token = random_token(40);
        let service_account = pki::signing_key_pair_pem()?;
        let files = [
            ("ca.crt", ca.cert_pem()),
            ("apiserver.crt", serving.cert_pem.clone()),
            ("apiserver.key", serving.key_pem.clone()),
            ("service-account.key", service_account.private_pem),
            ("service-account.pub", service_account.public_pem),
            (
                "tokens.csv",
                format!("{admin_token},keybrake-admin,keybrake-admin,\"system:masters\"\n"),
            ),
        ];
        for (name, content) in &files {
            write_private(&pki_dir.join(name), content)?;
        }

        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        let apiserver_port = free_port()?;
        let server_url = format!("https://127.0.0.1:{apiserver_port}");
        let service_account_issuer = server_url.clone();

        let started = Instant::now();
        let mut etcd = GuardedProcess::spawn(
            "etcd",
            &binaries.etcd,
            &etcd_args(&dir, etcd_client, etcd_peer),
            &logs.join("etcd.log"),
            cleanup,
        )?;
        wait_for_etcd(&mut etcd, etcd_client)?;
        let etcd_ready = started.elapsed();

        let apiserver_started = Instant::now();
        let pki_path = |name: &str| pki_dir.join(name).into_os_string();
        let mut apiserver = GuardedProcess::spawn(
            "kube-apiserver",
            &binaries.kube_apiserver,
            &apiserver_args(ApiserverArgs {
                etcd_client,
                port: apiserver_port,
                issuer: &service_account_issuer,
                cert_dir: dir.join("apiserver-certs").into_os_string(),
                ca: pki_path("ca.crt"),
                cert: pki_path("apiserver.crt"),
                key: pki_path("apiserver.key"),
                sa_signing_key: pki_path("service-account.key"),
                sa_public_key: pki_path("service-account.pub"),
                tokens: pki_path("tokens.csv"),
            }),
            &logs.join("kube-apiserver.log"),
            cleanup,
        )?;

        let kubeconfig = dir.join("kubeconfig");
        let ca_pem = ca.cert_pem();
        let kubeconfig_text = kubeconfig_yaml(&server_url, &ca_pem, &admin_token);
        write_private(&kubeconfig, &kubeconfig_text)?;
        let kube_config = block_on(kube_config_from_yaml(&kubeconfig_text))?;
        wait_for_readyz(&mut apiserver, &mut etcd, &kube_config)?;
        let startup = StartupTimings {
            etcd: etcd_ready,
            apiserver: apiserver_started.elapsed(),
            total: started.elapsed(),
        };

        let record = PlaneRecord {
            kind: PLANE_RECORD_KIND.to_string(),
            server_url: server_url.clone(),
            service_account_issuer: service_account_issuer.clone(),
            kubeconfig: kubeconfig.clone(),
            owner_pid: std::process::id(),
        };
        write_private(
            &dir.join("plane.json"),
            &serde_json::to_string_pretty(&record).expect("plane record serializes"),
        )?;

        Ok(ControlPlane {
            dir,
            kubeconfig,
            server_url,
            ca_pem,
            admin_token,
            service_account_issuer,
            binaries: binaries.clone(),
            kube_config,
            startup: Some(startup),
            processes: Mutex::new(vec![apiserver, etcd]),
        })
    }

    /// Attaches to a plane another process started (`make cluster`), given the kubeconfig it
    /// wrote. Refuses kubeconfigs the harness did not write: tests must never touch a real cluster.
    pub fn attach(kubeconfig: &Path) -> Result<Self, HarnessError> {
        let binaries = K8sBinaries::locate()?;
        let dir = kubeconfig
            .parent()
            .ok_or_else(|| HarnessError::Reuse(format!("{} has no parent", kubeconfig.display())))?
            .to_path_buf();
        let record_path = dir.join("plane.json");
        let record: PlaneRecord = std::fs::read_to_string(&record_path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .filter(|r: &PlaneRecord| r.kind == PLANE_RECORD_KIND)
            .ok_or_else(|| {
                HarnessError::Reuse(format!(
                    "{} was not written by the keybrake e2e harness (no {}); run `make cluster` \
                     and `source target/e2e/env`, or unset {}",
                    kubeconfig.display(),
                    record_path.display(),
                    crate::REUSE_CLUSTER_ENV
                ))
            })?;
        let text = std::fs::read_to_string(kubeconfig)
            .map_err(HarnessError::io(format!("read {}", kubeconfig.display())))?;
        let parsed = KubeconfigParts::parse(&text)?;
        if parsed.server != record.server_url {
            return Err(HarnessError::Reuse(format!(
                "{} points at {}, but plane.json says {}",
                kubeconfig.display(),
                parsed.server,
                record.server_url
            )));
        }
        let kube_config = block_on(kube_config_from_yaml(&text))?;
        let client_config = kube_config.clone();
        block_on(async move {
            let client = kube::Client::try_from(client_config).map_err(|e| e.to_string())?;
            readyz(&client).await
        })
        .map_err(|err| {
            HarnessError::Reuse(format!(
                "the plane at {} is not ready ({err}); is `make cluster` still running?",
                record.server_url
            ))
        })?;
        Ok(ControlPlane {
            dir,
            kubeconfig: kubeconfig.to_path_buf(),
            server_url: record.server_url,
            ca_pem: parsed.ca_pem,
            admin_token: parsed.token,
            service_account_issuer: record.service_account_issuer,
            binaries,
            kube_config,
            startup: None,
            processes: Mutex::new(Vec::new()),
        })
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The kubeconfig (admin token, embedded CA) for this plane.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory with `pki/`, `logs/`, etcd data and the kubeconfig.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// PEM of the CA that signed the apiserver's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Bearer token of a `system:masters` user (`keybrake-admin`).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// `--service-account-issuer` (the `iss` of TokenRequest tokens).
    pub fn service_account_issuer(&self) -> &str {
        &self.service_account_issuer
    }

    /// The cached kubectl/etcd/kube-apiserver/helm binaries of the pinned versions.
    pub fn binaries(&self) -> &K8sBinaries {
        &self.binaries
    }

    /// Spawn → ready timings, when this process started the plane.
    pub fn startup(&self) -> Option<StartupTimings> {
        self.startup
    }

    /// A kube client configuration (admin). Runtime-independent; clone it freely.
    pub fn kube_config(&self) -> &kube::Config {
        &self.kube_config
    }

    /// A new admin client. Call it inside a tokio runtime: a `kube::Client` belongs to the runtime
    /// it was made in, so make one per test rather than sharing one across tests.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.kube_config.clone()).expect("kube client from harness config")
    }

    /// A client that impersonates `user` in `groups` (the admin may impersonate anyone), for
    /// testing RBAC as the controller or a sidecar would see it.
    pub fn client_as(&self, user: &str, groups: &[&str]) -> kube::Client {
        let mut config = self.kube_config.clone();
        config.auth_info.impersonate = Some(user.to_string());
        config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
        kube::Client::try_from(config).expect("kube client from harness config")
    }

    /// `kubectl --kubeconfig=<this plane>` with a bounded request timeout and a discovery cache
    /// private to this plane. Add arguments and run it.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.binaries.kubectl);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!(
                "--cache-dir={}",
                self.dir.join("kubectl-cache").display()
            ))
            .arg("--request-timeout=30s")
            .env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// `helm --kubeconfig=<this plane>`, its caches kept inside the plane directory.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(&self.binaries.helm);
        let helm_home = self.dir.join("helm");
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", helm_home.join("cache"))
            .env("HELM_CONFIG_HOME", helm_home.join("config"))
            .env("HELM_DATA_HOME", helm_home.join("data"));
        cmd
    }

    /// The last lines of a component's log (`etcd` or `kube-apiserver`), for failure messages.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        crate::process::tail(
            &self.dir.join("logs").join(format!("{component}.log")),
            lines,
        )
    }

    /// Stops the plane now (kube-apiserver, then etcd) and removes its directory. A no-op for an
    /// attached plane. Dropping does the same.
    pub fn stop(&self) {
        let mut processes = self.processes.lock().unwrap_or_else(|p| p.into_inner());
        for process in processes.iter_mut() {
            process.stop();
        }
        processes.clear();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

struct ApiserverArgs<'a> {
    etcd_client: u16,
    port: u16,
    issuer: &'a str,
    cert_dir: OsString,
    ca: OsString,
    cert: OsString,
    key: OsString,
    sa_signing_key: OsString,
    sa_public_key: OsString,
    tokens: OsString,
}

fn etcd_args(dir: &Path, client: u16, peer: u16) -> Vec<OsString> {
    let peer_url = format!("http://127.0.0.1:{peer}");
    let client_url = format!("http://127.0.0.1:{client}");
    let mut data_dir = OsString::from("--data-dir=");
    data_dir.push(dir.join("etcd"));
    vec![
        "--name=keybrake-e2e".into(),
        data_dir,
        format!("--listen-client-urls={client_url}").into(),
        format!("--advertise-client-urls={client_url}").into(),
        format!("--listen-peer-urls={peer_url}").into(),
        format!("--initial-advertise-peer-urls={peer_url}").into(),
        format!("--initial-cluster=keybrake-e2e={peer_url}").into(),
        // Test data: durability buys nothing and fsync dominates latency on shared disks.
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
    ]
}

fn apiserver_args(a: ApiserverArgs<'_>) -> Vec<OsString> {
    let flag = |name: &str, value: &OsString| {
        let mut f = OsString::from(format!("--{name}="));
        f.push(value);
        f
    };
    vec![
        format!("--etcd-servers=http://127.0.0.1:{}", a.etcd_client).into(),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={}", a.port).into(),
        flag("cert-dir", &a.cert_dir),
        flag("tls-cert-file", &a.cert),
        flag("tls-private-key-file", &a.key),
        // Client certificates signed by the test CA authenticate too (CN = user, O = groups).
        flag("client-ca-file", &a.ca),
        flag("token-auth-file", &a.tokens),
        "--authorization-mode=RBAC".into(),
        // TokenRequest / TokenReview (projected service-account tokens, audience `keybrake`).
        format!("--service-account-issuer={}", a.issuer).into(),
        flag("service-account-key-file", &a.sa_public_key),
        flag("service-account-signing-key-file", &a.sa_signing_key),
        "--service-cluster-ip-range=10.0.0.0/24".into(),
        // No kube-controller-manager mints SA token secrets; pods must be creatable without one.
        // Mutating/validating webhooks (by URL) stay enabled, as in the default plugin set.
        "--disable-admission-plugins=ServiceAccount".into(),
        "--allow-privileged=true".into(),
        "--enable-priority-and-fairness=false".into(),
        "--profiling=false".into(),
        "--endpoint-reconciler-type=none".into(),
    ]
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, token: &str) -> String {
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "keybrake-e2e", "cluster": {
            "server": server, "certificate-authority-data": ca_data}}],
        "users": [{"name": "keybrake-admin", "user": {"token": token}}],
        "contexts": [{"name": "keybrake-e2e", "context": {
            "cluster": "keybrake-e2e", "user": "keybrake-admin", "namespace": "default"}}],
        "current-context": "keybrake-e2e",
    });
    let mut text =
        String::from("# Written by the keybrake e2e harness (keybrake_e2e::ControlPlane).\n");
    text.push_str(&serde_yaml::to_string(&doc).expect("kubeconfig serializes"));
    text
}

/// The pieces of a harness-written kubeconfig.
struct KubeconfigParts {
    server: String,
    ca_pem: String,
    token: String,
}

impl KubeconfigParts {
    fn parse(text: &str) -> Result<Self, HarnessError> {
        let doc: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
        let field = |path: &[&str]| -> Result<String, HarnessError> {
            let mut node = &doc;
            for key in path {
                node = match key.parse::<usize>() {
                    Ok(index) => node.get(index),
                    Err(_) => node.get(*key),
                }
                .ok_or_else(|| HarnessError::Kubeconfig(format!("missing {}", path.join("."))))?;
            }
            node.as_str()
                .map(str::to_string)
                .ok_or_else(|| HarnessError::Kubeconfig(format!("{} is not text", path.join("."))))
        };
        let ca_data = field(&["clusters", "0", "cluster", "certificate-authority-data"])?;
        let ca_pem = base64::engine::general_purpose::STANDARD
            .decode(ca_data)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| HarnessError::Kubeconfig("certificate-authority-data".into()))?;
        Ok(KubeconfigParts {
            server: field(&["clusters", "0", "cluster", "server"])?,
            ca_pem,
            token: field(&["users", "0", "user", "token"])?,
        })
    }
}

async fn kube_config_from_yaml(text: &str) -> Result<kube::Config, HarnessError> {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(text)
        .map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| HarnessError::Kubeconfig(e.to_string()))
}

/// `GET /readyz`: the apiserver answers 200 "ok" once every post-start hook has finished.
async fn readyz(client: &kube::Client) -> Result<(), String> {
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .expect("static request");
    match client.request_text(request).await {
        Ok(body) if body.trim() == "ok" => Ok(()),
        Ok(body) => Err(format!("/readyz answered {body:?}")),
        Err(err) => Err(err.to_string()),
    }
}

fn wait_for_etcd(etcd: &mut GuardedProcess, port: u16) -> Result<(), HarnessError> {
    let deadline = Instant::now() + ETCD_READY_TIMEOUT;
    loop {
        etcd.ensure_running()?;
        if etcd_healthy(port) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(HarnessError::NotReady {
                component: "etcd",
                seconds: ETCD_READY_TIMEOUT.as_secs(),
                log_tail: etcd.log_tail(),
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// `GET /health` over plain HTTP/1.0: etcd answers `{"health":"true",...}` once it has a leader.
fn etcd_healthy(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.take(64 * 1024).read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}

fn wait_for_readyz(
    apiserver: &mut GuardedProcess,
    etcd: &mut GuardedProcess,
    config: &kube::Config,
) -> Result<(), HarnessError> {
    let config = config.clone();
    let deadline = Instant::now() + APISERVER_READY_TIMEOUT;
    block_on(async move {
        let client = kube::Client::try_from(config)?;
        loop {
            apiserver.ensure_running()?;
            etcd.ensure_running()?;
            if readyz(&client).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::NotReady {
                    component: "kube-apiserver",
                    seconds: APISERVER_READY_TIMEOUT.as_secs(),
                    log_tail: apiserver.log_tail(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
}

/// Runs `future` to completion on a private current-thread runtime in a scoped thread, so the
/// harness works from sync code and from inside any caller's runtime alike.
pub(crate) fn block_on<F>(future: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime for the harness")
                    .block_on(future)
            })
            .join()
            .expect("harness thread panicked")
    })
}

fn is_port_race(err: &HarnessError) -> bool {
    matches!(err, HarnessError::ExitedEarly { log_tail, .. } if log_tail.contains("address already in use"))
}

fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(HarnessError::io("bind a free loopback port"))?;
    Ok(listener
        .local_addr()
        .map_err(HarnessError::io("read bound port"))?
        .port())
}

fn fresh_temp_dir() -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "keybrake-plane-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        random_token(6).to_lowercase()
    ))
}

pub(crate) fn random_token(len: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn write_private(path: &Path, content: &str) -> Result<(), HarnessError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(HarnessError::io(format!("write {}", path.display())))?;
    file.write_all(content.as_bytes())
        .map_err(HarnessError::io(format!("write {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_round_trips_through_the_attach_parser() {
        let yaml = kubeconfig_yaml("https://127.0.0.1:6443", "PEM-TEXT", "tok123");
        let parts = KubeconfigParts::parse(&yaml).unwrap();
        assert_eq!(parts.server, "https://127.0.0.1:6443");
        assert_eq!(parts.ca_pem, "PEM-TEXT");
        assert_eq!(parts.token, "tok123");
    }

    #[test]
    fn attach_refuses_a_kubeconfig_the_harness_did_not_write() {
        let dir = fresh_temp_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml("https://10.1.2.3:6443", "x", "y"),
        )
        .unwrap();
        let result = ControlPlane::attach(&kubeconfig);
        std::fs::remove_dir_all(&dir).unwrap();
        match result {
            Err(HarnessError::Reuse(msg)) => assert!(msg.contains("make cluster"), "{msg}"),
            Err(HarnessError::MissingBinary(path)) => {
                panic!("{} missing: run `make e2e-deps`", path.display())
            }
            other => panic!("attach accepted a foreign kubeconfig: {other:?}"),
        }
    }

    #[test]
    fn port_race_is_recognised_from_the_log() {
        let err = HarnessError::ExitedEarly {
            component: "etcd",
            status: "exit status: 1".into(),
            log_tail: "listen tcp 127.0.0.1:2379: bind: address already in use".into(),
        };
        assert!(is_port_race(&err));
        let other = HarnessError::ExitedEarly {
            component: "etcd",
            status: "exit status: 1".into(),
            log_tail: "corrupt wal".into(),
        };
        assert!(!is_port_race(&other));
    }
}
