//! Control-plane scale benchmark (run by bench/sections/controlplane.sh): ONE process holding
//! many authenticated sidecar streams to a real keybrake-controller, against a real
//! kube-apiserver. It creates the namespaces, service accounts and VaultKeys (through the
//! apiserver, in bounded-concurrency batches), waits for the controller to reconcile them,
//! mints one TokenRequest token (audience `keybrake`) per simulated sidecar, opens one HTTP/2 +
//! TLS connection and watch per sidecar, acks every revision each one applies, then revokes keys
//! one at a time and records, per stream, when the revocation arrived and when its ack
//! returned. A plain kube watch on the same VaultKeys is the baseline: the apiserver's own
//! delivery of the same change, measured in the same run.
#![forbid(unsafe_code)]

use std::{
    convert::Infallible,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use futures::{SinkExt as _, StreamExt as _, TryStreamExt as _};
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::{
    Request,
    body::Frame,
    client::conn::http2::SendRequest,
    header::{AUTHORIZATION, CONTENT_TYPE},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Secret, ServiceAccount},
};
use keybrake_api::{
    KeyState, Phase, VaultKey,
    stream::{MAX_LINE_BYTES, NDJSON, WATCH_PATH, WatchEvent},
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::watcher,
};
use serde_json::json;
use tokio::sync::mpsc;

/// A duplex watch's request body: the stream's acks.
type AckBody = BoxBody<Bytes, Infallible>;

#[derive(Parser, Debug)]
#[command(about = "Many simulated sidecar streams against one keybrake-controller")]
struct Args {
    /// Controller stream endpoint, e.g. https://127.0.0.1:18443.
    #[arg(long)]
    controller_url: String,
    /// CA the controller's serving certificate chains to (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// Controller admin address (host:port) for /metrics.
    #[arg(long)]
    controller_admin: String,
    /// Controller pid, for VmHWM and CPU seconds from /proc.
    #[arg(long)]
    controller_pid: u32,
    /// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    #[arg(long, default_value_t = 2)]
    service_accounts_per_namespace: usize,
    /// Simulated sidecars; all on the first namespace's first service account.
    #[arg(long, default_value_t = 1_000)]
    streams: usize,
    #[arg(long, default_value_t = 40)]
    revocations: usize,
    /// Pause between revocations (pacing, so trials do not overlap).
    #[arg(long, default_value_t = 1_000)]
    trial_gap_ms: u64,
    /// VaultKeys per creation batch, and concurrent creates within a batch.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    #[arg(long, default_value_t = 24)]
    concurrency: usize,
    /// Bound on each waiting phase (reconcile, connect), in seconds.
    #[arg(long, default_value_t = 240)]
    phase_timeout_secs: u64,
    /// Bound on one revocation reaching every stream, in seconds.
    #[arg(long, default_value_t = 30)]
    trial_timeout_secs: u64,
    #[arg(long, default_value = "cp-bench")]
    namespace_prefix: String,
    /// Markdown fragment (tables) for docs/BENCHMARKS.md.
    #[arg(long)]
    fragment: PathBuf,
    /// Raw results (JSON).
    #[arg(long)]
    results: PathBuf,
}

impl Args {
    fn scopes(&self) -> usize {
        self.namespaces * self.service_accounts_per_namespace
    }
    fn keys_per_scope(&self) -> usize {
        self.keys / self.scopes()
    }
    fn namespace(&self, i: usize) -> String {
        format!("{}-{i}", self.namespace_prefix)
    }
    /// Key number `k` lives in scope `k / keys_per_scope` (namespace-major).
    fn key_home(&self, k: usize) -> (String, String) {
        let scope = k / self.keys_per_scope();
        (
            self.namespace(scope / self.service_accounts_per_namespace),
            format!("agent-{}", scope % self.service_accounts_per_namespace),
        )
    }
}

fn key_name(k: usize) -> String {
    format!("k-{k:05}")
}

// ---------------------------------------------------------------------------------------------
// Measurement (pure)

/// One stream's view of one revocation: when the line arrived and when the ack returned 204.
#[derive(Clone, Copy, Debug)]
struct Seen {
    received: Instant,
    acked: Instant,
}

/// Milliseconds from `t0` to the earliest and latest of `seen`'s receipts and acks.
#[derive(Clone, Copy, Debug, serde::Serialize, PartialEq)]
struct Trial {
    first_ack_ms: f64,
    last_receipt_ms: f64,
    last_ack_ms: f64,
    streams: usize,
}

fn ms_since(t0: Instant, t: Instant) -> f64 {
    // A watch can deliver the change before the PATCH's own response arrives: that counts as 0.
    t.saturating_duration_since(t0).as_secs_f64() * 1000.0
}

fn summarize(t0: Instant, seen: &[Seen]) -> Option<Trial> {
    let last_ack = seen.iter().map(|s| s.acked).max()?;
    let first_ack = seen.iter().map(|s| s.acked).min()?;
    let last_receipt = seen.iter().map(|s| s.received).max()?;
    Some(Trial {
        first_ack_ms: ms_since(t0, first_ack),
        last_receipt_ms: ms_since(t0, last_receipt),
        last_ack_ms: ms_since(t0, last_ack),
        streams: seen.len(),
    })
}

/// Nearest-rank percentile of `values` (sorted here), `q` in 0..=100.
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Clone, Copy, Debug, serde::Serialize)]
struct Spread {
    p50: f64,
    p99: f64,
    max: f64,
}

fn spread(values: &[f64]) -> Spread {
    Spread {
        p50: percentile(values, 50.0),
        p99: percentile(values, 99.0),
        max: percentile(values, 100.0),
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct ProcSample {
    cpu_seconds: f64,
    rss_mb: f64,
    hwm_mb: f64,
}

fn proc_status_kb(status: &str, field: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// utime + stime (fields 14 and 15; the command name in field 2 may contain spaces).
fn proc_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // after_comm starts at field 3 (state): utime is field 14 → index 11.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn sample(pid: &str, clk_tck: u64) -> anyhow::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status (did the process exit?)"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = proc_stat_cpu_ticks(&stat).context("unparsable /proc/PID/stat")?;
    Ok(ProcSample {
        cpu_seconds: ticks as f64 / clk_tck as f64,
        rss_mb: proc_status_kb(&status, "VmRSS").unwrap_or(f64::NAN) / 1024.0,
        hwm_mb: proc_status_kb(&status, "VmHWM").unwrap_or(f64::NAN) / 1024.0,
    })
}

// ---------------------------------------------------------------------------------------------
// Kubernetes setup

async fn ignore_conflict<T>(result: Result<T, kube::Error>) -> anyhow::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn create_scopes(client: &Client, args: &Args) -> anyhow::Result<()> {
    let pp = PostParams::default();
    for n in 0..args.namespaces {
        let ns = args.namespace(n);
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
        ignore_conflict(
            Api::<Namespace>::all(client.clone())
                .create(&pp, &namespace)
                .await,
        )
        .await?;
        for s in 0..args.service_accounts_per_namespace {
            let sa: ServiceAccount =
                serde_json::from_value(json!({"metadata": {"name": format!("agent-{s}")}}))?;
            ignore_conflict(
                Api::<ServiceAccount>::namespaced(client.clone(), &ns)
                    .create(&pp, &sa)
                    .await,
            )
            .await?;
        }
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "stripe-upstream"},
            "stringData": {"api-key": "sk_test_bench_upstream"},
        }))?;
        ignore_conflict(
            Api::<Secret>::namespaced(client.clone(), &ns)
                .create(&pp, &secret)
                .await,
        )
        .await?;
    }
    Ok(())
}

fn vault_key(name: &str, sa: &str) -> anyhow::Result<VaultKey> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "keybrake.dev/v1alpha1", "kind": "VaultKey",
        "metadata": {"name": name},
        "spec": {
            "vendor": "stripe",
            "upstream": {"secretRef": {"name": "stripe-upstream", "key": "api-key"},
                         "baseUrl": "http://127.0.0.1:9"},
            "agent": {"name": "refund-agent", "runId": name},
            "workload": {"serviceAccountName": sa},
            "allow": [{"method": "GET", "path": "/v1/customers/{id}"},
                      {"method": "POST", "path": "/v1/refunds"}],
            "limits": {"dailyUsdCap": "250.00", "perCallUsdMax": "50.00", "callsPerMinute": 120},
        },
    }))?)
}

/// Creates every VaultKey through the apiserver: batches of `batch`, `concurrency` at a time.
async fn create_keys(client: &Client, args: &Args) -> anyhow::Result<()> {
    let pp = PostParams::default();
    let keys: Vec<usize> = (0..args.keys).collect();
    for (b, chunk) in keys.chunks(args.batch).enumerate() {
        futures::stream::iter(chunk.iter().copied())
            .map(|k| {
                let (ns, sa) = args.key_home(k);
                let api = Api::<VaultKey>::namespaced(client.clone(), &ns);
                let pp = pp.clone();
                async move {
                    let key = vault_key(&key_name(k), &sa)?;
                    ignore_conflict(api.create(&pp, &key).await).await
                }
            })
            .buffer_unordered(args.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        if (b + 1) % 4 == 0 {
            eprintln!("swarm: {} VaultKeys created", (b + 1) * args.batch);
        }
    }
    Ok(())
}

/// Polls until every VaultKey is Active (its token minted and status written) or the deadline.
async fn wait_all_active(client: &Client, args: &Args, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let mut active = 0usize;
        for n in 0..args.namespaces {
            let api = Api::<VaultKey>::namespaced(client.clone(), &args.namespace(n));
            let mut lp = ListParams::default().limit(1000);
            loop {
                let page = api.list(&lp).await?;
                active += page
                    .items
                    .iter()
                    .filter(|vk| vk.status.as_ref().and_then(|s| s.phase) == Some(Phase::Active))
                    .count();
                match page.metadata.continue_.filter(|c| !c.is_empty()) {
                    Some(c) => lp = lp.continue_token(&c),
                    None => break,
                }
            }
        }
        if active >= args.keys {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "only {active}/{} VaultKeys Active after {limit:?}",
                args.keys
            );
        }
        eprintln!("swarm: {active}/{} VaultKeys Active", args.keys);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn mint_tokens(client: &Client, ns: &str, sa: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let api = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    futures::stream::iter(0..n)
        .map(|_| {
            let api = api.clone();
            async move {
                let request = TokenRequest {
                    spec: TokenRequestSpec {
                        audiences: vec!["keybrake".into()],
                        expiration_seconds: Some(3600),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let issued = api
                    .create_token_request(sa, &PostParams::default(), &request)
                    .await?;
                issued
                    .status
                    .map(|s| s.token)
                    .context("TokenRequest answered without a token")
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await
}

/// Polls until every key of the streamed scope reports `enforcement.summary` N/N: the
/// controller has finished writing the status that 1,000 new streams' snapshot acks caused,
/// so the trials do not run into that write burst.
async fn wait_enforced(
    api: &Api<VaultKey>,
    sa: &str,
    streams: usize,
    keys: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let want = format!("{streams}/{streams}");
    let deadline = Instant::now() + limit;
    loop {
        let list = api.list(&ListParams::default()).await?;
        let done = list
            .items
            .iter()
            .filter(|vk| vk.spec.workload.service_account_name == sa)
            .filter(|vk| {
                vk.status
                    .as_ref()
                    .and_then(|s| s.enforcement.as_ref())
                    .is_some_and(|e| e.summary == want)
            })
            .count();
        if done >= keys {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {done}/{keys} keys report enforcement {want} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Simulated sidecars

/// What a stream tells the coordinator.
#[derive(Debug)]
enum Report {
    Snapshot { keys: usize },
    Revoked { id: String, seen: Seen },
    Failed(String),
}

/// Splits NDJSON into lines without rescanning bytes already searched.
struct Lines {
    buf: Vec<u8>,
    scanned: usize,
}

impl Lines {
    fn new() -> Self {
        Lines {
            buf: Vec::new(),
            scanned: 0,
        }
    }

    fn push(&mut self, data: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(pos) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
            let end = self.scanned + pos;
            out.push(self.buf[..end].to_vec());
            self.buf.drain(..=end);
            self.scanned = 0;
        }
        self.scanned = self.buf.len();
        if self.buf.len() > MAX_LINE_BYTES {
            bail!("line longer than {MAX_LINE_BYTES} bytes");
        }
        Ok(out)
    }
}

struct Controller {
    base: String,
    authority: String,
    tls: Arc<rustls::ClientConfig>,
}

impl Controller {
    fn new(base: &str, ca: &std::path::Path) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(ca).with_context(|| format!("read {}", ca.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert?)?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let authority = base
            .strip_prefix("https://")
            .context("--controller-url must be https://HOST:PORT")?
            .trim_end_matches('/')
            .to_owned();
        Ok(Controller {
            base: base.trim_end_matches('/').to_owned(),
            authority,
            tls: Arc::new(tls),
        })
    }

    /// One sidecar's own connection: TCP, TLS, HTTP/2.
    async fn connect(&self) -> anyhow::Result<SendRequest<AckBody>> {
        let tcp = tokio::net::TcpStream::connect(&self.authority).await?;
        tcp.set_nodelay(true)?;
        let host = self
            .authority
            .rsplit_once(':')
            .map_or(&*self.authority, |(h, _)| h);
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(send)
    }
}

/// Holds one watch until it ends: applies (parses) every event, acks every revision it applies
/// on the same connection, and reports revocations with their receipt and ack times.
async fn run_stream(controller: Arc<Controller>, token: String, tx: mpsc::UnboundedSender<Report>) {
    if let Err(e) = stream_session(&controller, &token, &tx).await {
        let _ = tx.send(Report::Failed(format!("{e:#}")));
    }
}

async fn stream_session(
    controller: &Controller,
    token: &str,
    tx: &mpsc::UnboundedSender<Report>,
) -> anyhow::Result<()> {
    let mut send = controller.connect().await?;
    // Full duplex, as the sidecar does it: the request body carries the acks.
    let (mut acks, ack_lines) = futures::channel::mpsc::channel::<Bytes>(8);
    let body = StreamBody::new(ack_lines.map(|line| Ok::<_, Infallible>(Frame::data(line))));
    let watch = Request::post(format!("{}{WATCH_PATH}", controller.base))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(CONTENT_TYPE, NDJSON)
        .body(BodyExt::boxed(body))?;
    let response = send.send_request(watch).await?;
    if response.status() != 200 {
        bail!("watch answered {}", response.status());
    }
    let mut body = response.into_body();
    let mut lines = Lines::new();
    let mut acked = 0u64;
    // Keys of `snapshotPart` lines before the closing `snapshot` line (applied as one).
    let mut snapshot_parts = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        let received = Instant::now();
        for line in lines.push(&data)? {
            let event: WatchEvent = serde_json::from_slice(&line).context("undecodable event")?;
            let revision = event.revision();
            let (snapshot_keys, revoked) = match &event {
                WatchEvent::SnapshotPart { keys, .. } => {
                    snapshot_parts += keys.len();
                    continue;
                }
                WatchEvent::Snapshot { keys, .. } => {
                    (Some(std::mem::take(&mut snapshot_parts) + keys.len()), None)
                }
                WatchEvent::Upsert { key, .. } if key.state == KeyState::Revoked => {
                    (None, Some(key.id.as_str().to_owned()))
                }
                WatchEvent::Heartbeat { .. } if revision <= acked => continue,
                _ => (None, None),
            };
            drop(event);
            acks.send(Bytes::from(format!("{{\"revision\":{revision}}}\n")))
                .await
                .context("the controller stopped reading acks")?;
            acked = acked.max(revision);
            let report = match (snapshot_keys, revoked) {
                (Some(keys), _) => Report::Snapshot { keys },
                (_, Some(id)) => Report::Revoked {
                    id,
                    seen: Seen {
                        received,
                        acked: Instant::now(),
                    },
                },
                _ => continue,
            };
            if tx.send(report).is_err() {
                return Ok(());
            }
        }
    }
    bail!("the controller ended the stream")
}

// ---------------------------------------------------------------------------------------------
// Controller metrics

/// Polls the revoked key until the controller reports every sidecar enforcing it, and returns
/// its `status.enforcement.lastPropagationMs`: from the controller seeing the change to it
/// counting the last acknowledgement (a revision's latency is recorded only for changes made
/// while the streams were connected, so a value means this revocation).
async fn controller_propagation_ms(
    api: &Api<VaultKey>,
    name: &str,
    streams: usize,
    deadline: tokio::time::Instant,
) -> anyhow::Result<f64> {
    let want = format!("{streams}/{streams}");
    loop {
        let vk = api.get(name).await?;
        let status = vk.status.as_ref();
        let enforcement = status.and_then(|s| s.enforcement.as_ref());
        if status.and_then(|s| s.phase) == Some(Phase::Revoked)
            && let Some(e) = enforcement
            && e.summary == want
            && let Some(ms) = e.last_propagation_ms
        {
            return Ok(ms as f64);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no enforcement {want} with a propagation time (status: {enforcement:?})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn controller_metric(admin: &str, name: &str) -> anyhow::Result<f64> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let res = client
        .get(format!("http://{admin}/metrics").parse()?)
        .await?;
    let text = String::from_utf8(res.into_body().collect().await?.to_bytes().to_vec())?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no {name} in the controller's /metrics"))
}

// ---------------------------------------------------------------------------------------------
// The run

#[derive(serde::Serialize)]
struct Results {
    keys: usize,
    namespaces: usize,
    service_accounts: usize,
    keys_in_streamed_scope: usize,
    streams: usize,
    trials: Vec<Trial>,
    baseline_watch_ms: Vec<f64>,
    /// Per trial: apiserver watch delivery + the controller's own change-seen → last-ack-counted.
    counted_ms: Vec<f64>,
    counted: Spread,
    last_ack: Spread,
    last_receipt: Spread,
    first_ack: Spread,
    baseline: Spread,
    create_keys_secs: f64,
    reconcile_secs: f64,
    connect_secs: f64,
    quiesce_secs: f64,
    controller: Phases,
    swarm_end: ProcSample,
    streams_connected_metric: f64,
}

#[derive(serde::Serialize, Default)]
struct Phases {
    start: ProcSample,
    keys_reconciled: ProcSample,
    streams_connected: ProcSample,
    end: ProcSample,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.keys_per_scope() > args.revocations,
        "need more keys per scope than revocations"
    );
    let pid = args.controller_pid.to_string();
    let mut phases = Phases {
        start: sample(&pid, args.clk_tck)?,
        ..Default::default()
    };
    let client = Client::try_default()
        .await
        .context("kube client (KUBECONFIG)")?;

    create_scopes(&client, &args).await?;
    let t = Instant::now();
    create_keys(&client, &args).await?;
    let create_keys_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "swarm: {} VaultKeys created in {create_keys_secs:.1} s",
        args.keys
    );
    let limit = Duration::from_secs(args.phase_timeout_secs);
    wait_all_active(&client, &args, limit).await?;
    let reconcile_secs = t.elapsed().as_secs_f64();
    phases.keys_reconciled = sample(&pid, args.clk_tck)?;
    eprintln!("swarm: all Active {reconcile_secs:.1} s after the first create");

    // Every stream is on the scope of the revoked keys: each revocation reaches all of them.
    let (stream_ns, stream_sa) = args.key_home(0);
    let tokens = mint_tokens(&client, &stream_ns, &stream_sa, args.streams).await?;
    // Baseline: the apiserver's own watch delivery of the same change to a plain client,
    // started (and its initial list done) before anything is measured.
    let (base_tx, mut base_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let (listed_tx, listed_rx) = tokio::sync::oneshot::channel::<()>();
    let watched = Api::<VaultKey>::namespaced(client.clone(), &stream_ns);
    tokio::spawn(async move {
        let mut events = watcher(watched, watcher::Config::default()).boxed();
        let mut listed = Some(listed_tx);
        while let Some(Ok(event)) = events.next().await {
            match event {
                watcher::Event::InitDone => {
                    if let Some(tx) = listed.take() {
                        let _ = tx.send(());
                    }
                }
                watcher::Event::Apply(vk) if vk.spec.state == KeyState::Revoked => {
                    let _ = base_tx.send((vk.metadata.name.unwrap_or_default(), Instant::now()));
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(limit, listed_rx)
        .await
        .context("the baseline watch's initial list timed out")?
        .context("the baseline watch ended")?;
    let controller = Arc::new(Controller::new(&args.controller_url, &args.ca)?);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t = Instant::now();
    for token in tokens {
        tokio::spawn(run_stream(controller.clone(), token, tx.clone()));
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + limit;
    let mut snapshots = 0usize;
    while snapshots < args.streams {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Report::Snapshot { keys })) => {
                anyhow::ensure!(
                    keys == args.keys_per_scope(),
                    "a snapshot held {keys} keys, expected {}",
                    args.keys_per_scope()
                );
                snapshots += 1;
            }
            Ok(Some(Report::Failed(e))) => bail!("a stream failed while connecting: {e}"),
            Ok(Some(Report::Revoked { .. })) => {}
            Ok(None) => bail!("every stream ended"),
            Err(_) => bail!("{snapshots}/{} snapshots after {limit:?}", args.streams),
        }
    }
    let connect_secs = t.elapsed().as_secs_f64();
    phases.streams_connected = sample(&pid, args.clk_tck)?;
    let streams_connected_metric = controller_metric(
        &args.controller_admin,
        "keybrake_controller_streams_connected",
    )
    .await?;
    eprintln!(
        "swarm: {} streams hold a snapshot after {connect_secs:.1} s (controller reports {streams_connected_metric})",
        args.streams
    );

    let keys_api = Api::<VaultKey>::namespaced(client.clone(), &stream_ns);
    let t = Instant::now();
    wait_enforced(
        &keys_api,
        &stream_sa,
        args.streams,
        args.keys_per_scope(),
        limit,
    )
    .await?;
    let quiesce_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "swarm: every key of the scope enforced by {} streams after {quiesce_secs:.1} s",
        args.streams
    );
    let trial_limit = Duration::from_secs(args.trial_timeout_secs);
    let mut trials = Vec::new();
    let mut baseline_watch_ms = Vec::new();
    let mut counted_ms = Vec::new();
    for trial in 0..args.revocations {
        tokio::time::sleep(Duration::from_millis(args.trial_gap_ms)).await;
        let name = key_name(trial);
        let id = format!("{stream_ns}/{name}");
        keys_api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"state": "Revoked"}})),
            )
            .await?;
        let patched = Instant::now();
        let deadline = tokio::time::Instant::now() + trial_limit;
        let mut seen = Vec::with_capacity(args.streams);
        while seen.len() < args.streams {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Report::Revoked { id: got, seen: s })) if got == id => seen.push(s),
                Ok(Some(Report::Revoked { .. } | Report::Snapshot { .. })) => {}
                Ok(Some(Report::Failed(e))) => bail!("trial {trial}: a stream failed: {e}"),
                Ok(None) => bail!("every stream ended"),
                Err(_) => bail!(
                    "trial {trial}: {}/{} streams acked the revocation of {id} within {trial_limit:?}",
                    seen.len(),
                    args.streams
                ),
            }
        }
        let t = summarize(patched, &seen).context("no acks")?;
        let counted = controller_propagation_ms(&keys_api, &name, args.streams, deadline)
            .await
            .with_context(|| format!("trial {trial}: the controller's status for {name}"))?;
        // The baseline watcher may lag behind; take its event for this key (bounded).
        let base = loop {
            match tokio::time::timeout_at(deadline, base_rx.recv()).await {
                Ok(Some((got, at))) if got == name => break ms_since(patched, at),
                Ok(Some(_)) => {}
                _ => bail!("trial {trial}: the baseline watch never saw {name} revoked"),
            }
        };
        eprintln!(
            "swarm: trial {trial}: counted by the controller {:.1} ms (+ apiserver watch {base:.1} ms), last ack sent {:.1} ms, last receipt {:.1} ms, first ack {:.1} ms",
            counted, t.last_ack_ms, t.last_receipt_ms, t.first_ack_ms
        );
        trials.push(t);
        counted_ms.push(base + counted);
        baseline_watch_ms.push(base);
    }
    phases.end = sample(&pid, args.clk_tck)?;
    let swarm_end = sample("self", args.clk_tck)?;

    let pick = |f: fn(&Trial) -> f64| trials.iter().map(f).collect::<Vec<_>>();
    let results = Results {
        keys: args.keys,
        namespaces: args.namespaces,
        service_accounts: args.scopes(),
        keys_in_streamed_scope: args.keys_per_scope(),
        streams: args.streams,
        counted: spread(&counted_ms),
        counted_ms,
        last_ack: spread(&pick(|t| t.last_ack_ms)),
        last_receipt: spread(&pick(|t| t.last_receipt_ms)),
        first_ack: spread(&pick(|t| t.first_ack_ms)),
        baseline: spread(&baseline_watch_ms),
        trials,
        baseline_watch_ms,
        create_keys_secs,
        reconcile_secs,
        connect_secs,
        quiesce_secs,
        controller: phases,
        swarm_end,
        streams_connected_metric,
    };
    std::fs::write(&args.results, serde_json::to_vec_pretty(&results)?)?;
    std::fs::write(&args.fragment, fragment(&args, &results))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

fn fragment(args: &Args, r: &Results) -> String {
    let c = &r.controller;
    let row = |what: &str, s: &Spread, target: &str| {
        format!(
            "| {what} | {:.1} | {:.1} | {:.1} | {target} |\n",
            s.p50, s.p99, s.max
        )
    };
    let mut md = String::new();
    md.push_str(&format!(
        "Setup: one keybrake-controller (release build, defaults: token-review cache 10 s, \
         heartbeat 5 s) against the e2e harness's kube-apiserver + etcd on loopback. \
         {keys} VaultKeys in {ns} namespaces × {sa_per} service accounts ({per} keys per \
         service account), created through the apiserver in batches of {batch} ({conc} concurrent). \
         {streams} simulated sidecars in one process (bench-stream-swarm), each with its own \
         TokenRequest token (audience `keybrake`) and its own HTTP/2 + TLS connection, **all on \
         the service account of the revoked keys** ({sns}/agent-0, {per} keys per snapshot), so \
         every revocation must reach all {streams}; each acks every revision it applies on its \
         connection. Trials: {trials} revocations, one at a time, {gap} ms apart. Each stream is \
         one full-duplex `POST /v1/watch` (events down, `{{\"revision\":N}}` ack lines up, as the \
         sidecar does it). Latency runs from the moment the PATCH returned: to the last stream's \
         ack leaving the swarm (sidecar clock), and to the controller counting it (the apiserver \
         watch delivery measured by the baseline in the same trial, plus the controller's own \
         change-seen → last-ack-counted time from the key's `status.enforcement.lastPropagationMs`, \
         millisecond resolution). \
         Baseline: a plain kube watch on the same namespace in the same process, i.e. the \
         apiserver's own delivery of the change, which any controller pays before it can act.\n\n",
        keys = r.keys,
        ns = r.namespaces,
        sa_per = args.service_accounts_per_namespace,
        per = r.keys_in_streamed_scope,
        batch = args.batch,
        conc = args.concurrency,
        streams = r.streams,
        sns = args.namespace(0),
        trials = r.trials.len(),
        gap = args.trial_gap_ms,
    ));
    md.push_str(&format!(
        "| revocation, ms ({} trials × {} streams) | p50 | p99 | max | target |\n| --- | ---: | ---: | ---: | --- |\n",
        r.trials.len(),
        r.streams
    ));
    md.push_str(&row(
        &format!(
            "PATCH returned → controller counted the last of {} acks (apiserver watch + status `lastPropagationMs`)",
            r.streams
        ),
        &r.counted,
        &format!("p99 ≤ 250 ms: {}", verdict(r.counted.p99 <= 250.0)),
    ));
    md.push_str(&row(
        &format!(
            "PATCH returned → last of {} acks sent (sidecar clock)",
            r.streams
        ),
        &r.last_ack,
        "",
    ));
    md.push_str(&row(
        &format!("PATCH returned → last of {} receipts", r.streams),
        &r.last_receipt,
        "",
    ));
    md.push_str(&row("PATCH returned → first ack", &r.first_ack, ""));
    md.push_str(&row(
        "baseline: PATCH returned → apiserver watch event (plain kube watch)",
        &r.baseline,
        "",
    ));
    // The apiserver often delivers the watch event before the PATCH's own response (0 ms), so
    // a ratio would divide by ~0: the difference is what the controller and the streams add.
    md.push_str(&format!(
        "\nAdded over the baseline (last ack sent − apiserver watch): p50 {:.1} ms, p99 {:.1} ms.\n\n",
        r.last_ack.p50 - r.baseline.p50,
        r.last_ack.p99 - r.baseline.p99
    ));
    md.push_str("| controller resources | value | target |\n| --- | ---: | --- |\n");
    md.push_str(&format!(
        "| peak RSS (VmHWM) over the run | {:.1} MB | ≤ 200 MB: {} |\n",
        c.end.hwm_mb,
        verdict(c.end.hwm_mb <= 200.0)
    ));
    md.push_str(&format!(
        "| RSS with {} keys reconciled, no stream yet | {:.1} MB | |\n",
        r.keys, c.keys_reconciled.rss_mb
    ));
    md.push_str(&format!(
        "| RSS once {} streams hold their snapshot | {:.1} MB | |\n",
        r.streams, c.streams_connected.rss_mb
    ));
    md.push_str(&format!(
        "| RSS at the end (after the revocations) | {:.1} MB | |\n",
        c.end.rss_mb
    ));
    md.push_str(&format!(
        "| CPU s (utime+stime): {} keys created and reconciled ({:.1} s wall) | {:.1} s | |\n",
        r.keys,
        r.reconcile_secs,
        c.keys_reconciled.cpu_seconds - c.start.cpu_seconds
    ));
    md.push_str(&format!(
        "| CPU s: {} streams connected and snapshotted ({:.1} s wall) | {:.1} s | |\n",
        r.streams,
        r.connect_secs,
        c.streams_connected.cpu_seconds - c.keys_reconciled.cpu_seconds
    ));
    md.push_str(&format!(
        "| CPU s: {} revocations × {} acks | {:.1} s | |\n",
        r.trials.len(),
        r.streams,
        c.end.cpu_seconds - c.streams_connected.cpu_seconds
    ));
    md.push_str(&format!(
        "| `keybrake_controller_streams_connected` after connecting | {} | |\n",
        r.streams_connected_metric
    ));
    md.push_str(&format!(
        "\nThe swarm itself (same 2 cores): {:.1} s CPU, peak RSS {:.1} MB. Creating the {} \
         VaultKeys took {:.1} s; all were Active (token Secret minted, status written) {:.1} s \
         after the first create. After the streams connected, the trials waited {:.1} s until every \
         key of the scope reported enforcement {}/{} (the controller's status writes for the \
         snapshot acks), so no trial runs into that burst.\n",
        r.swarm_end.cpu_seconds,
        r.swarm_end.hwm_mb,
        r.keys,
        r.create_keys_secs,
        r.reconcile_secs,
        r.quiesce_secs,
        r.streams,
        r.streams
    ));
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trial_takes_the_last_ack_and_clamps_early_receipts() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let seen = [
            Seen {
                received: at(5),
                acked: at(9),
            },
            Seen {
                received: at(40),
                acked: at(42),
            },
            Seen {
                received: t0,
                acked: at(3),
            },
        ];
        let t = summarize(at(2), &seen).unwrap();
        assert_eq!(
            (t.first_ack_ms, t.last_receipt_ms, t.last_ack_ms),
            (1.0, 38.0, 40.0)
        );
        assert_eq!(t.streams, 3);
        assert!(summarize(t0, &[]).is_none());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=40).map(f64::from).collect();
        let s = spread(&v);
        assert_eq!((s.p50, s.p99, s.max), (20.0, 40.0, 40.0));
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn lines_split_across_frames_and_bounded() {
        let mut l = Lines::new();
        assert!(l.push(b"{\"a\"").unwrap().is_empty());
        assert_eq!(
            l.push(b":1}\n{\"b\":2}\n{").unwrap(),
            vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]
        );
        assert_eq!(l.push(b"}\n").unwrap(), vec![b"{}".to_vec()]);
        assert!(l.push(&vec![b'x'; MAX_LINE_BYTES + 1]).is_err());
    }

    #[test]
    fn proc_parsers() {
        let stat = "42 (tokio (rt) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0";
        assert_eq!(proc_stat_cpu_ticks(stat), Some(300));
        let status = "Name:\tx\nVmHWM:\t  20480 kB\nVmRSS:\t  10240 kB\n";
        assert_eq!(proc_status_kb(status, "VmHWM"), Some(20480.0));
        assert_eq!(proc_status_kb(status, "VmRSS"), Some(10240.0));
    }

    #[test]
    fn keys_are_spread_namespace_major() {
        let args = Args::parse_from([
            "x",
            "--controller-url",
            "https://127.0.0.1:1",
            "--ca",
            "c",
            "--controller-admin",
            "a",
            "--controller-pid",
            "1",
            "--fragment",
            "f",
            "--results",
            "r",
        ]);
        assert_eq!(args.keys_per_scope(), 500);
        assert_eq!(args.key_home(0), ("cp-bench-0".into(), "agent-0".into()));
        assert_eq!(args.key_home(500), ("cp-bench-0".into(), "agent-1".into()));
        assert_eq!(
            args.key_home(9_999),
            ("cp-bench-9".into(), "agent-1".into())
        );
    }
}
