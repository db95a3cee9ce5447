//! The controller and sidecar processes for end-to-end tests: keybrake-controller (and any other
//! workspace binary) built on first use and spawned against a plane, its TLS material, and the
//! polling helper every wait uses. Moved here from `tests/controller_e2e.rs` so every e2e test
//! binary starts the controller the same way.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use crate::{TestCa, TestNamespace};

/// How long a controller gets to print its listening line and to become ready.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `f` every 10 ms until it returns `Some`, failing after `limit`.
pub async fn poll<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Builds `bin` of workspace package `package` (once per test binary) and returns its path
/// next to this test binary's profile directory (`target/<profile>/`).
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(bin) {
        return path.clone();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = Instant::now();
    let status = Command::new(cargo)
        .args(["build", "-q", "-p", package, "--bin", bin])
        .status()
        .unwrap_or_else(|e| panic!("running cargo build -p {package}: {e}"));
    assert!(
        status.success(),
        "cargo build -p {package} --bin {bin} failed"
    );
    // This test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .join(bin);
    assert!(
        path.exists(),
        "{} missing after cargo build",
        path.display()
    );
    // Reported because it dominates a test's wall time when the package changed.
    eprintln!(
        "keybrake-e2e: cargo build {bin}: {} ms",
        started.elapsed().as_millis()
    );
    built.insert(bin.to_owned(), path.clone());
    path
}

/// The keybrake-controller binary, built on first use.
pub fn controller_binary() -> PathBuf {
    workspace_binary("keybrake-controller", "keybrake-controller")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// TLS material for controllers: one CA, one serving certificate for 127.0.0.1, so sidecars
/// keep trusting a controller across restarts and replicas.
pub struct ControllerTls {
    pub dir: tempfile::TempDir,
}

impl ControllerTls {
    pub fn new() -> ControllerTls {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new("keybrake-e2e-controller-ca").expect("CA");
        let serving = ca.issue_server(&["127.0.0.1", "localhost"]).expect("cert");
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("tls.crt"), &serving.cert_pem).unwrap();
        std::fs::write(dir.path().join("tls.key"), &serving.key_pem).unwrap();
        ControllerTls { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Default for ControllerTls {
    fn default() -> Self {
        Self::new()
    }
}

/// The `keybrake-controller listening stream=… admin=… [webhook=…]` line a controller prints on
/// stdout once its listeners are bound (with port 0, the only way to learn the ports).
pub struct ListeningLine(String);

impl ListeningLine {
    /// Reads `child`'s stdout (piped) on a thread until the line appears; fails the test after
    /// [`DEADLINE`] with the controller's log (`log`, its stderr).
    pub fn wait(child: &mut Child, log: &Path) -> ListeningLine {
        let stdout = child.stdout.take().expect("controller stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("keybrake-controller listening") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx.recv_timeout(DEADLINE).unwrap_or_else(|_| {
            panic!(
                "controller did not start; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
        ListeningLine(line)
    }

    /// The value of `name=…` (`stream`, `admin`, `webhook`).
    pub fn field(&self, name: &str) -> &str {
        self.0
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.0))
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        let value = self.field(name);
        value
            .parse()
            .unwrap_or_else(|e| panic!("{name}={value}: {e}"))
    }
}

/// A keybrake-controller process restricted to one test namespace (`--watch-namespace`, its
/// Lease there too), killed on drop and when this process's end of its stdin closes.
pub struct ControllerProcess {
    pub child: Child,
    pub identity: String,
    pub stream_url: String,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl ControllerProcess {
    pub fn spawn(
        ns: &TestNamespace<'_>,
        tls: &ControllerTls,
        identity: &str,
        stream_port: u16,
    ) -> Self {
        Self::spawn_with(ns, tls, identity, stream_port, &[])
    }

    pub fn spawn_with(
        ns: &TestNamespace<'_>,
        tls: &ControllerTls,
        identity: &str,
        stream_port: u16,
        extra: &[&str],
    ) -> Self {
        Self::spawn_with_stdin(ns, tls, identity, stream_port, extra, Stdio::piped())
    }

    /// [`Self::spawn_with`] with the given stdin (piped by default: the controller exits when
    /// this process's end closes, `--exit-on-stdin-close`).
    pub fn spawn_with_stdin(
        ns: &TestNamespace<'_>,
        tls: &ControllerTls,
        identity: &str,
        stream_port: u16,
        extra: &[&str],
        stdin: Stdio,
    ) -> Self {
        let log = tls.dir.path().join(format!("{identity}.log"));
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(controller_binary())
            .env("KUBECONFIG", ns.plane().kubeconfig())
            .env("RUST_LOG", "info,kube=warn,keybrake_controller=debug")
            .args([
                "--stream-addr",
                &format!("127.0.0.1:{stream_port}"),
                "--admin-addr",
                "127.0.0.1:0",
                "--tls-cert",
                tls.dir.path().join("tls.crt").to_str().unwrap(),
                "--tls-key",
                tls.dir.path().join("tls.key").to_str().unwrap(),
                "--heartbeat-ms",
                "500",
                "--watch-namespace",
                ns.name(),
                "--lease-namespace",
                ns.name(),
                "--lease-duration-secs",
                "3",
                "--identity",
                identity,
                "--exit-on-stdin-close",
            ])
            .args(extra)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawning keybrake-controller");
        let listening = ListeningLine::wait(&mut child, &log);
        ControllerProcess {
            identity: identity.to_owned(),
            stream_url: format!("https://{}", listening.field("stream")),
            admin: listening.addr("admin"),
            child,
            log,
        }
    }

    pub async fn wait_ready(&self) {
        let http = plain_client();
        let uri: hyper::Uri = format!("http://{}/ready", self.admin).parse().unwrap();
        poll("controller /ready", DEADLINE, || {
            let http = http.clone();
            let uri = uri.clone();
            async move {
                let res = http.get(uri).await.ok()?;
                (res.status() == 200).then_some(())
            }
        })
        .await;
    }

    /// The admin port's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let uri: hyper::Uri = format!("http://{}/metrics", self.admin).parse().unwrap();
        let res = plain_client().get(uri).await.expect("GET /metrics");
        let body = res.into_body().collect().await.expect("metrics body");
        String::from_utf8_lossy(&body.to_bytes()).into_owned()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain-HTTP client (admin ports).
pub fn plain_client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}
