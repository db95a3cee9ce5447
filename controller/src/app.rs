//! Process wiring: flags, the Kubernetes client, and the tasks every replica runs.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Secret};
use keybrake_api::VaultKey;
use kube::{
    Api, Client,
    runtime::events::{Recorder, Reporter},
};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use keybrake_audit::{AnySink, SinkConfig, ingest::IngestLimits};

use crate::{
    admin::serve_admin,
    audit_ingest::AuditIngest,
    auth::{Authenticator, KubeTokenReviewer},
    budget,
    enforcement::EnforcementTracker,
    event_publisher::EventPublisher,
    feed::{SyncGate, VaultKeyFeed, feed_secrets, feed_vault_keys},
    index::PolicyIndex,
    injection_flags::{InjectionFlags, parse_duration},
    leader::{LeaderElector, LeaseConfig},
    metrics::Metrics,
    peer_enforcement::{PeerReports, ScopeKeys},
    peer_reports::{ReportConfig, publish_reports, watch_reports},
    reconcile::{Context, run_controller},
    secret_interest::SecretInterest,
    server::{IngestHandler, StreamServer},
    serving_cert::certified_key_from_pem,
    spend::{self, SpendLedger},
    tls::{ServingIdentity, SwappableCert},
    tls_secret::{CaDistributor, IdentitySource, PemFiles, SecretBacked, load_or_create},
    webhook::WebhookServer,
};

/// TokenReviews in flight at once. Every review borrows a pooled HTTP/1 connection to the
/// apiserver and each stays in the pool with its buffers afterwards (~40 KB); 1,000 sidecars
/// connecting at once otherwise open ~1,000 of them (≈45 MB at the benchmark's peak).
const TOKEN_REVIEW_CONCURRENCY: usize = 32;

/// How often the leader writes changed `status.spentTodayUsd` totals (coalescing per key).
const SPEND_FLUSH_PERIOD: Duration = Duration::from_secs(5);

#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "keybrake-controller",
    about = "Keybrake controller: VaultKeys → sidecar policy streams"
)]
#[command(group(clap::ArgGroup::new("shared_ca").args(["tls_secret", "tls_ca"]).multiple(false)))]
pub struct Config {
    /// Sidecar streams, acks and audit ingest (HTTP/2 over TLS).
    #[arg(long, env = "KEYBRAKE_STREAM_ADDR", default_value = "0.0.0.0:8443")]
    pub stream_addr: SocketAddr,
    /// `/live`, `/ready`, `/metrics` (plain HTTP).
    #[arg(long, env = "KEYBRAKE_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// Serving certificate (PEM), e.g. from cert-manager. Without it or `--tls-secret` a CA and
    /// certificate are generated at start (one per process: tests and quick starts).
    #[arg(
        long,
        env = "KEYBRAKE_TLS_CERT",
        requires = "tls_key",
        conflicts_with = "tls_secret"
    )]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "KEYBRAKE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that signed `--tls-cert`, to publish to sidecars (and the webhook's caBundle).
    #[arg(long, env = "KEYBRAKE_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Secret in this controller's namespace holding a generated CA and serving certificate that
    /// every replica shares; created if absent, renewed by the leader.
    #[arg(long, env = "KEYBRAKE_TLS_SECRET")]
    pub tls_secret: Option<String>,
    /// Validity of serving certificates issued into `--tls-secret` (renewed with a third left).
    #[arg(long, default_value = "2160h", value_parser = parse_duration, requires = "tls_secret")]
    pub tls_secret_validity: Duration,
    /// How often replicas re-read `--tls-secret` and the leader re-checks the caBundle and the
    /// CA ConfigMaps, in seconds.
    #[arg(long, default_value_t = 10)]
    pub ca_refresh_secs: u64,
    /// MutatingWebhookConfiguration whose caBundle the leader writes (needs a shared CA:
    /// `--tls-secret` or `--tls-ca`).
    #[arg(long, requires = "shared_ca")]
    pub webhook_configuration: Option<String>,
    /// ConfigMap (key `ca.crt`) the leader publishes into every namespace with VaultKeys, and
    /// that injected sidecars mount. Published when the CA is shared (`--tls-secret`/`--tls-ca`).
    #[arg(long, default_value = "keybrake-ca")]
    pub ca_configmap: String,
    #[command(flatten)]
    pub injection: InjectionFlags,
    /// Log filter: a level (`info`, `debug`) or a tracing directive list.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
    /// Names for the generated certificate (repeatable).
    #[arg(long = "tls-san", default_values = ["127.0.0.1", "localhost"])]
    pub tls_sans: Vec<String>,
    /// Where to write the generated CA (PEM), for sidecars and tests to trust.
    #[arg(long, env = "KEYBRAKE_TLS_CA_OUT")]
    pub tls_ca_out: Option<PathBuf>,
    /// Heartbeat interval on quiet streams, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub heartbeat_ms: u64,
    /// Lease used for leader election.
    #[arg(long, default_value = "keybrake-controller")]
    pub lease_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "keybrake-system")]
    pub lease_namespace: String,
    /// How long a silent leader keeps the lease before another replica takes over.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_secs: u64,
    /// Shortest interval between two writes of this replica's enforcement report (a Lease
    /// `<lease-name>-<identity>` the leader sums into `status.enforcement`), in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub enforcement_report_ms: u64,
    /// This replica's identity in the Lease (default: hostname-pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Delete Expired VaultKeys this many seconds after expiry; 0 keeps them.
    #[arg(long, default_value_t = 86_400)]
    pub gc_grace_secs: u64,
    /// Watch and reconcile only this namespace (default: all namespaces).
    #[arg(long, env = "KEYBRAKE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Exit when standard input closes, pipe or socket only (test harnesses: the controller dies
    /// with its parent); on /dev/null, a file or a terminal it warns and is ignored.
    #[arg(long)]
    pub exit_on_stdin_close: bool,
    /// Audit sink for `POST /v1/audit`: `sqlite:///path/audit.db`, `postgres://…` (TLS unless
    /// `sslmode=disable`, CA via `sslrootcert=/path/ca.pem`, client certificate via
    /// `sslcert=/path/tls.crt&sslkey=/path/tls.key`, see docs/audit.md) or `stdout`.
    /// Without it the endpoint answers 501.
    #[arg(long, env = "KEYBRAKE_AUDIT_SINK")]
    pub audit_sink: Option<String>,
    /// Longest life of one sidecar stream before it must reconnect and re-authenticate (also
    /// capped by the token's own expiry).
    #[arg(long, default_value_t = 3600)]
    pub max_stream_secs: u64,
    /// How long a sidecar may book on a budget-slice lease (dailyUsdCap) without renewing it.
    #[arg(long, default_value_t = 60)]
    pub budget_lease_secs: u64,
    /// How long an accepted TokenReview is reused.
    #[arg(long, default_value_t = 10)]
    pub token_cache_secs: u64,
}

impl Config {
    /// The tracing filter: a bare level keeps kube's own chatter at warn.
    pub fn log_filter(&self) -> String {
        let level = self.log_level.trim();
        if level.contains('=') || level.contains(',') {
            level.to_owned()
        } else {
            format!("{level},kube=warn")
        }
    }

    fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "keybrake-controller".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// Runs every task until `shutdown` fires (or one of the servers fails).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("building the Kubernetes client (KUBECONFIG or in-cluster config)")?;
    let identity = config.identity();
    let metrics = Metrics::new();
    let index = Arc::new(PolicyIndex::new(PolicyIndex::revision_seed()));
    let spend_ledger = Arc::new(SpendLedger::default());
    let mut spend_sink: Option<Arc<AnySink>> = None;
    let audit: Option<Arc<dyn IngestHandler>> = match &config.audit_sink {
        None => None,
        Some(text) => {
            let sink_config: SinkConfig = text.parse().context("--audit-sink")?;
            let sink = Arc::new(
                AnySink::open(&sink_config)
                    .await
                    .with_context(|| format!("opening the audit sink {sink_config:?}"))?,
            );
            spend_sink = Some(sink.clone());
            Some(Arc::new(
                AuditIngest::new(
                    sink,
                    index.clone(),
                    IngestLimits::default(),
                    metrics.clone(),
                )
                .with_spend(spend_ledger.clone()),
            ))
        }
    };
    // `POST /v1/budget` (budget-slice leases) rides on the same handler slot as the audit ingest.
    let audit: Option<Arc<dyn IngestHandler>> = Some(Arc::new(budget::SidecarPosts {
        audit,
        budget: Arc::new(budget::BudgetService::new(
            client.clone(),
            index.clone(),
            budget::LeasePolicy {
                ttl: Duration::from_secs(config.budget_lease_secs.max(1)),
                ..Default::default()
            },
            metrics.clone(),
        )),
    }));
    let tracker = Arc::new(EnforcementTracker::new());
    let (synced_tx, synced_rx) = watch::channel(false);
    let (leader_tx, leader_rx) = watch::channel(false);

    let injection = config
        .injection
        .injection_config(&config.lease_namespace, &config.ca_configmap)?;
    let (cert, identity_source) = serving_identity(&config, &client).await?;
    let tls = cert.server_config()?;

    let stream_listener = TcpListener::bind(config.stream_addr)
        .await
        .with_context(|| format!("binding {}", config.stream_addr))?;
    let admin_listener = TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("binding {}", config.admin_addr))?;
    let webhook_listener = match &injection {
        Some(_) => {
            let addr = config.injection.webhook_addr;
            Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?,
            )
        }
        None => None,
    };
    let webhook_shown = match &webhook_listener {
        Some(l) => format!(" webhook={}", l.local_addr()?),
        None => String::new(),
    };
    // Tests and scripts read this line to find ports chosen with :0.
    println!(
        "keybrake-controller listening stream={} admin={}{webhook_shown} identity={identity}",
        stream_listener.local_addr()?,
        admin_listener.local_addr()?
    );

    let gate = SyncGate::new(synced_tx);
    let mut tasks = tokio::task::JoinSet::new();
    let scoped = |c: &Client| match &config.watch_namespace {
        Some(ns) => (
            Api::<VaultKey>::namespaced(c.clone(), ns),
            Api::<Secret>::namespaced(c.clone(), ns),
        ),
        None => (
            Api::<VaultKey>::all(c.clone()),
            Api::<Secret>::all(c.clone()),
        ),
    };
    let (vault_keys_api, secrets_api) = scoped(&client);
    let scope_keys = Arc::new(ScopeKeys::default());
    let interest = Arc::new(SecretInterest::default());
    let (follows, followed) = tokio::sync::mpsc::unbounded_channel();
    tasks.spawn(feed_vault_keys(VaultKeyFeed {
        api: vault_keys_api,
        index: index.clone(),
        scope_keys: scope_keys.clone(),
        interest: interest.clone(),
        follows,
        gate: gate.clone(),
    }));
    tasks.spawn(feed_secrets(
        secrets_api,
        index.clone(),
        interest,
        followed,
        gate,
    ));

    let lease_duration = Duration::from_secs(config.lease_duration_secs.max(1));
    let peers = Arc::new(PeerReports::new(identity.clone(), lease_duration));
    let leases = Api::<Lease>::namespaced(client.clone(), &config.lease_namespace);
    tasks.spawn(watch_reports(
        leases.clone(),
        config.lease_name.clone(),
        peers.clone(),
        lease_duration,
        shutdown.clone(),
    ));
    // Not in `tasks`: it deletes its report on shutdown, so it is awaited like the elector.
    let report_task = tokio::spawn(publish_reports(
        leases,
        ReportConfig {
            lease_name: config.lease_name.clone(),
            identity: identity.clone(),
            duration: lease_duration,
            period: Duration::from_millis(config.enforcement_report_ms),
        },
        scope_keys.clone(),
        index.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));

    let elector = LeaderElector::new(
        Api::<Lease>::namespaced(client.clone(), &config.lease_namespace),
        LeaseConfig {
            name: config.lease_name.clone(),
            identity: identity.clone(),
            duration: Duration::from_secs(config.lease_duration_secs.max(1)),
            renew_every: Duration::from_millis(config.lease_duration_secs.max(1) * 1000 / 3),
        },
    );
    let leader_task = tokio::spawn(elector.run(leader_tx, metrics.clone(), shutdown.clone()));

    if let Some(source) = identity_source {
        let distributor = CaDistributor {
            client: client.clone(),
            source,
            cert: cert.clone(),
            webhook_configuration: config.webhook_configuration.clone(),
            ca_configmap: config.ca_configmap.clone(),
            index: index.clone(),
            refresh: Duration::from_secs(config.ca_refresh_secs.max(1)),
        };
        tasks.spawn(distributor.run(leader_rx.clone(), shutdown.clone()));
    }

    if audit.is_some() {
        tasks.spawn(spend::run_writer(
            client.clone(),
            spend_ledger,
            spend_sink,
            leader_rx.clone(),
            SPEND_FLUSH_PERIOD,
            shutdown.clone(),
        ));
    }

    let ctx = Arc::new(Context {
        client: client.clone(),
        index: index.clone(),
        tracker: tracker.clone(),
        events: EventPublisher::new(client.clone(), "keybrake-controller", identity.clone()),
        metrics: metrics.clone(),
        leader: leader_rx,
        synced: synced_rx.clone(),
        gc_grace: (config.gc_grace_secs > 0).then(|| Duration::from_secs(config.gc_grace_secs)),
        peers,
        scope_keys,
    });
    let (controller_keys, _) = scoped(&client);
    tasks.spawn(run_controller(ctx, controller_keys, shutdown.clone()));

    let review_client = kube::client::ClientBuilder::try_from(
        kube::Config::infer()
            .await
            .context("Kubernetes client config for TokenReviews")?,
    )?
    .with_layer(&tower::limit::ConcurrencyLimitLayer::new(
        TOKEN_REVIEW_CONCURRENCY,
    ))
    .build();
    let server = Arc::new(StreamServer {
        index,
        tracker,
        auth: Arc::new(
            Authenticator::new(Arc::new(KubeTokenReviewer::new(review_client))).with_limits(
                Duration::from_secs(config.token_cache_secs),
                Duration::from_secs(2),
                10_000,
            ),
        ),
        metrics: metrics.clone(),
        heartbeat: Duration::from_millis(config.heartbeat_ms.max(100)),
        max_stream: Duration::from_secs(config.max_stream_secs.max(1)),
        synced: synced_rx.clone(),
        audit,
        stream_tokens: Default::default(),
        shutdown: shutdown.clone(),
    });
    let mut servers = tokio::task::JoinSet::new();
    if let (Some(listener), Some(injection)) = (webhook_listener, injection) {
        let webhook = Arc::new(WebhookServer {
            config: injection,
            metrics: metrics.clone(),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "keybrake-controller".into(),
                    instance: Some(identity.clone()),
                },
            ),
            shutdown: shutdown.clone(),
        });
        servers.spawn(webhook.serve(listener, tls.clone()));
    }
    servers.spawn(server.serve(stream_listener, tls));
    servers.spawn(serve_admin(
        admin_listener,
        metrics,
        synced_rx,
        shutdown.clone(),
    ));

    let result = tokio::select! {
        () = shutdown.cancelled() => Ok(()),
        Some(done) = servers.join_next() => match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::from(e).context("server failed")),
            Err(e) => Err(anyhow::Error::from(e).context("server task panicked")),
        },
    };
    shutdown.cancel();
    // Give the lease back so a standby takes over at once rather than after expiry.
    let _ = tokio::time::timeout(Duration::from_secs(5), leader_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), report_task).await;
    tasks.abort_all();
    result
}

/// The serving certificate every TLS listener presents, and where a shared CA comes from (for
/// the caBundle and the CA ConfigMaps): `--tls-secret`, PEM files (+ `--tls-ca`), or generated.
async fn serving_identity(
    config: &Config,
    client: &Client,
) -> anyhow::Result<(Arc<SwappableCert>, Option<IdentitySource>)> {
    if let Some(name) = &config.tls_secret {
        let api = Api::<Secret>::namespaced(client.clone(), &config.lease_namespace);
        let sans: std::collections::BTreeSet<String> = config.tls_sans.iter().cloned().collect();
        let current = load_or_create(&api, name, &sans, config.tls_secret_validity)
            .await
            .with_context(|| format!("loading the serving identity from Secret {name}"))?;
        let cert = SwappableCert::new(current.certified_key()?);
        return Ok((
            cert,
            Some(IdentitySource::Secret(Box::new(SecretBacked {
                api,
                name: name.clone(),
                sans,
                validity: config.tls_secret_validity,
                current,
            }))),
        ));
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        let files = PemFiles::read(cert.clone(), key.clone(), config.tls_ca.clone())
            .context("reading --tls-cert/--tls-key/--tls-ca")?;
        let cert = SwappableCert::new(certified_key_from_pem(&files.loaded.0, &files.loaded.1)?);
        return Ok((cert, Some(IdentitySource::Files(Box::new(files)))));
    }
    let identity = ServingIdentity::generate(&config.tls_sans)?;
    if let (Some(path), Some(ca)) = (&config.tls_ca_out, &identity.generated_ca_pem) {
        std::fs::write(path, ca)
            .with_context(|| format!("writing the CA to {}", path.display()))?;
    }
    let cert = SwappableCert::new(identity.certified_key()?);
    let source = None;
    Ok((cert, source))
}
