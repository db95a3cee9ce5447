//! Command line: `keybrake-sidecar --config FILE [flags]` and `keybrake-sidecar hash-key`.
use std::{io::Read, net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use keybrake_api::{TokenHash, Vendor};
use keybrake_audit::{SinkConfig, spool::SpoolConfig};

use crate::{
    audit::{AuditConfig, AuditPipeline, AuditTarget},
    ledger::InMemoryLedger,
    metrics::Metrics,
    proxy::ProxyLimits,
    server::{Deps, Settings, Sidecar},
    standalone::{ConfigWatcher, ProcessEnv},
    store::{Freshness, PolicyStore},
    stream_client::{StreamClient, StreamClientConfig},
};

#[derive(Debug, Parser)]
#[command(
    name = "keybrake-sidecar",
    version,
    about = "Enforces vault-key policy on vendor API calls"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read a vault key from stdin and print its SHA-256 (for `tokenSha256` in the config).
    HashKey,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--audit`: where audit rows go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditFlag {
    /// Discard rows (metrics still count every call).
    None,
    /// Ship rows to the controller (`--controller-url`).
    Controller,
    /// Write rows to this sink directly.
    Sink(SinkConfig),
}

fn parse_audit(text: &str) -> Result<AuditFlag, String> {
    match text {
        "none" => Ok(AuditFlag::None),
        "controller" => Ok(AuditFlag::Controller),
        // SinkError's text never repeats a PostgreSQL URL with a password.
        sink => sink
            .parse()
            .map(AuditFlag::Sink)
            .map_err(|e: keybrake_audit::SinkError| format!("{e}, controller or none")),
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Standalone mode: the policy file (YAML or JSON). Reloaded when it changes.
    #[arg(long, env = "KEYBRAKE_CONFIG", conflicts_with = "controller_url")]
    pub config: Option<PathBuf>,
    /// Controller mode: the controller's stream endpoint, e.g.
    /// https://keybrake-controller.keybrake-system.svc:8443.
    #[arg(long, env = "KEYBRAKE_CONTROLLER_URL")]
    pub controller_url: Option<String>,
    /// Controller mode: the projected ServiceAccount token (audience keybrake), re-read per connect.
    #[arg(long, default_value = "/var/run/secrets/keybrake/token/token")]
    pub token_file: PathBuf,
    /// Controller mode: PEM CA bundle of the controller's certificate (platform roots if unset).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Controller mode: with no event (heartbeats included) for this long the policy is stale,
    /// and keys with onStale: Deny fail closed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub staleness_bound: Duration,
    /// Controller mode: longest a call waits for a budget slice (dailyUsdCap) before `daily_cap`.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub budget_max_wait: Duration,
    /// Audit spool directory: rows the audit destination cannot take are kept here (bounded by
    /// --spool-max-bytes) and replayed in order once it answers. Without it, undeliverable rows
    /// wait in the memory queue only.
    #[arg(long)]
    pub spool_dir: Option<PathBuf>,
    /// Upper bound on the audit spool's files together; past it new rows are dropped (counted
    /// in keybrake_audit_dropped_rows_total, logged). Keep it below the spool volume's size
    /// (the injected emptyDir is 256Mi, and exceeding a sizeLimit evicts the pod).
    #[arg(long, default_value_t = 200 << 20)]
    pub spool_max_bytes: u64,
    /// How often the policy file is checked for changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    #[arg(long, default_value = "127.0.0.1")]
    pub listen_addr: IpAddr,
    /// Prefix-routed listener (`/stripe/…`, `/openai/…`, …). Any port flag set to 0 binds an
    /// ephemeral port (see --addr-file); it does not disable the listener.
    #[arg(long, default_value_t = 15001)]
    pub proxy_port: u16,
    #[arg(long, default_value_t = 15002)]
    pub stripe_port: u16,
    #[arg(long, default_value_t = 15003)]
    pub openai_port: u16,
    #[arg(long, default_value_t = 15004)]
    pub twilio_port: u16,
    #[arg(long, default_value_t = 15005)]
    pub resend_port: u16,
    /// Do not open the per-vendor listener of these vendors (repeatable or comma-separated:
    /// `--no-vendor-port stripe,twilio`); the prefix-routed proxy port still serves them.
    #[arg(long, value_delimiter = ',', value_parser = parse_listener_vendor)]
    pub no_vendor_port: Vec<Vendor>,
    #[arg(long, default_value_t = 15020)]
    pub admin_port: u16,
    /// The admin port's address (0.0.0.0 in a pod so the kubelet can probe it; it serves no
    /// secrets). The proxy ports always use --listen-addr.
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_listen_addr: IpAddr,
    /// Write the bound addresses as JSON to this file once listening (useful with port 0).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Tokio worker threads (1 = a one-core sidecar).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Where audit rows go: `none`, `stdout` (JSON lines), `sqlite:///path/audit.db`,
    /// `postgres://…` (written directly, for standalone mode; TLS unless `sslmode=disable`, CA via
    /// `sslrootcert=/path/ca.pem`, client certificate via
    /// `sslcert=/path/tls.crt&sslkey=/path/tls.key`, see docs/audit.md) or `controller` (shipped to
    /// --controller-url's /v1/audit). Default: `controller` in controller mode, else `none`.
    #[arg(long, env = "KEYBRAKE_AUDIT", value_parser = parse_audit)]
    pub audit: Option<AuditFlag>,
    /// Audit rows held in memory; when full, new rows are dropped (and counted), never waited on.
    #[arg(long, default_value_t = 10_000)]
    pub audit_queue_capacity: usize,
    /// Longest pause between retries of an unreachable audit destination.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub audit_retry_max: Duration,
    /// At shutdown, how long queued audit rows get to be delivered (or spooled).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub audit_flush_timeout: Duration,
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// A request head must arrive within this after the connection is accepted or its last
    /// response ended; otherwise the connection is closed (slow clients, idle keep-alive).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub upstream_header_timeout: Duration,
    /// Connections open at once to one upstream (0 = no cap). Calls beyond it queue in arrival
    /// order for up to --upstream-connect-timeout, then fail with 502 upstream_busy.
    #[arg(long, default_value_t = crate::upstream_pool::DEFAULT_MAX_CONNECTIONS_PER_UPSTREAM)]
    pub upstream_max_connections: usize,
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    pub upstream_total_timeout: Duration,
    /// At SIGTERM, how long in-flight calls get to finish. With the lease release (2 s) and
    /// --audit-flush-timeout it must end before the pod's terminationGracePeriodSeconds
    /// (default 30 s; the injector derives both from the pod's value, docs/runbook.md).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Extra PEM CA bundle trusted for upstreams, on top of the platform roots.
    #[arg(long)]
    pub extra_ca_file: Option<PathBuf>,
    /// Pod name for audit rows.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Price and rate tables (YAML or JSON): OpenAI model prices, Stripe currency rates,
    /// Twilio per-segment and Resend per-email rates. Omitted sections keep the built-in
    /// defaults (docs/verdicts.md, "Cost and caps").
    #[arg(long, value_parser = load_prices)]
    pub prices: Option<crate::pricing::Prices>,
}

fn load_prices(path: &str) -> Result<crate::pricing::Prices, String> {
    crate::pricing::Prices::load(std::path::Path::new(path)).map_err(|e| e.to_string())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms
            .parse()
            .map(Duration::from_millis)
            .map_err(|e| e.to_string());
    }
    keybrake_api::duration::parse_ttl(text).map_err(|e| e.to_string())
}

/// A vendor with its own listener (not `custom`, which is reached through the proxy port only).
fn parse_listener_vendor(text: &str) -> Result<Vendor, String> {
    Vendor::ALL
        .into_iter()
        .filter(|v| *v != Vendor::Custom)
        .find(|v| v.as_str() == text.trim())
        .ok_or_else(|| format!("{text:?} is not one of stripe, openai, twilio, resend"))
}

impl RunArgs {
    pub fn settings(&self) -> Settings {
        Settings {
            bind: self.listen_addr,
            proxy_port: self.proxy_port,
            vendor_ports: [
                (Vendor::Stripe, self.stripe_port),
                (Vendor::Openai, self.openai_port),
                (Vendor::Twilio, self.twilio_port),
                (Vendor::Resend, self.resend_port),
            ]
            .into_iter()
            .filter(|(vendor, _)| !self.no_vendor_port.contains(vendor))
            .collect(),
            admin_port: self.admin_port,
            admin_bind: self.admin_listen_addr,
            limits: ProxyLimits {
                max_body_bytes: self.max_body_bytes,
                body_read_timeout: self.body_read_timeout,
                upstream_header_timeout: self.upstream_header_timeout,
                upstream_idle_timeout: self.upstream_idle_timeout,
                upstream_total_timeout: self.upstream_total_timeout,
            },
            header_read_timeout: self.header_read_timeout,
            upstream_connect_timeout: self.upstream_connect_timeout,
            upstream_pool_idle_timeout: Duration::from_secs(90),
            upstream_max_connections: self.upstream_max_connections,
            extra_ca_file: self.extra_ca_file.clone(),
            pod_name: self.pod_name.clone(),
            drain_timeout: self.drain_timeout,
            prices: Arc::new(self.prices.clone().unwrap_or_default()),
        }
    }
}

impl RunArgs {
    /// The audit pipeline's configuration from `--audit` and the mode.
    pub fn audit_config(&self) -> anyhow::Result<AuditConfig> {
        let flag = self
            .audit
            .clone()
            .unwrap_or(if self.controller_url.is_some() {
                AuditFlag::Controller
            } else {
                AuditFlag::None
            });
        let target = match flag {
            AuditFlag::None => AuditTarget::None,
            AuditFlag::Sink(sink) => AuditTarget::Sink(sink),
            AuditFlag::Controller => {
                let base_url = self
                    .controller_url
                    .clone()
                    .context("--audit controller needs --controller-url")?;
                let ca_file = self.ca_file.clone().context(
                    "shipping audit rows to the controller needs --ca-file (or pass --audit none)",
                )?;
                AuditTarget::Controller {
                    base_url,
                    ca_file,
                    token_file: self.token_file.clone(),
                }
            }
        };
        let mut config = AuditConfig::new(target);
        config.queue_capacity = self.audit_queue_capacity;
        config.spool = self
            .spool_dir
            .as_ref()
            .map(|dir| SpoolConfig::new(dir, self.spool_max_bytes));
        config.shipper.retry_max = self.audit_retry_max.max(config.shipper.retry_min);
        config.flush_timeout = self.audit_flush_timeout;
        Ok(config)
    }
}

/// `hash-key`: the SHA-256 hex of the key on stdin (surrounding whitespace ignored).
pub fn hash_key(mut input: impl Read) -> anyhow::Result<String> {
    let mut key = String::new();
    input
        .read_to_string(&mut key)
        .context("reading the key from stdin")?;
    let key = key.trim();
    anyhow::ensure!(!key.is_empty(), "no key on stdin");
    Ok(TokenHash::of(key).to_hex())
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Runs the sidecar until SIGINT/SIGTERM, then drains. The policy comes from a file
/// (`--config`, standalone mode) or from the controller's watch stream (`--controller-url`);
/// either way it lands in the same store.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (store, source) = if let Some(config) = args.config.clone() {
        let store = Arc::new(PolicyStore::new(Freshness::AlwaysFresh));
        let watcher = ConfigWatcher::start(config.clone(), store.clone(), Box::new(ProcessEnv))
            .with_context(|| format!("loading {}", config.display()))?;
        (
            store,
            tokio::spawn(watcher.run(args.reload_interval, stop_rx)),
        )
    } else if let Some(url) = args.controller_url.clone() {
        let store = Arc::new(PolicyStore::new(Freshness::StaleAfter(
            args.staleness_bound,
        )));
        let mut config = StreamClientConfig::new(url, args.token_file.clone());
        config.ca_file = args.ca_file.clone();
        let client = StreamClient::new(config, store.clone())
            .context("setting up the policy stream client")?;
        let mut stop = stop_rx;
        (
            store,
            tokio::spawn(client.run(async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            })),
        )
    } else {
        anyhow::bail!(
            "no policy source: pass --config FILE (standalone mode) or --controller-url URL"
        );
    };
    let served = serve(&args, store, metrics).await;
    let _ = stop_tx.send(true);
    let _ = source.await;
    served
}

/// At shutdown, how long returning budget leases to the controller may take.
pub const LEASE_RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves the proxy in front of `store` (fed by any policy source) until SIGINT/SIGTERM, then
/// stops accepting and drains in-flight calls.
pub async fn serve(
    args: &RunArgs,
    store: Arc<PolicyStore>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let audit = AuditPipeline::start(args.audit_config()?, metrics.audit.clone())
        .await
        .context("starting the audit pipeline")?;
    let ledger = ledger_for(args)?;
    let deps = Deps {
        store,
        metrics,
        audit: audit.sink(),
        ledger: ledger.clone(),
    };
    let sidecar = Sidecar::start(&args.settings(), deps).await?;
    if let Some(path) = &args.addr_file {
        let json = serde_json::to_string(sidecar.addrs())?;
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)?;
    }
    wait_for_signal().await;
    tracing::info!("shutting down: draining in-flight calls");
    sidecar.shutdown().await;
    ledger.release_all(LEASE_RELEASE_TIMEOUT).await;
    audit.shutdown().await;
    Ok(())
}

/// Controller mode shares each key's cap through leases from the controller; standalone mode
/// enforces the whole cap locally (there is nobody to share it with).
fn ledger_for(args: &RunArgs) -> anyhow::Result<Arc<dyn crate::ledger::SpendLedger>> {
    let Some(url) = &args.controller_url else {
        return Ok(Arc::new(InMemoryLedger::new()));
    };
    let mut config = StreamClientConfig::new(url.clone(), args.token_file.clone());
    config.ca_file = args.ca_file.clone();
    let settings = crate::ledger::LeaseSettings {
        max_wait: args.budget_max_wait,
        ..Default::default()
    };
    let ledger =
        crate::budget_client::start(&config, settings).context("setting up the budget client")?;
    Ok(ledger)
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_key_trims_and_hashes() {
        assert_eq!(
            hash_key("vault_key_abc\n".as_bytes()).unwrap(),
            TokenHash::of("vault_key_abc").to_hex()
        );
        assert!(hash_key("  \n".as_bytes()).is_err());
    }

    #[test]
    fn the_injected_controller_mode_flags_parse() {
        // The flags inject/src/sidecar.rs puts on the sidecar container.
        let cli = Cli::try_parse_from([
            "keybrake-sidecar",
            "--controller-url=https://keybrake-controller.keybrake-system.svc:8443",
            "--token-file=/var/run/secrets/keybrake/token/token",
            "--ca-file=/var/run/secrets/keybrake/ca/ca.crt",
            "--staleness-bound=30s",
            "--spool-dir=/var/lib/keybrake/spool",
            "--listen-addr=127.0.0.1",
            "--proxy-port=15001",
            "--stripe-port=15002",
            "--openai-port=15003",
            "--twilio-port=15004",
            "--resend-port=15005",
            "--admin-listen-addr=0.0.0.0",
            "--admin-port=15020",
            "--drain-timeout=20s",
            "--audit-flush-timeout=5s",
        ])
        .unwrap();
        assert_eq!(cli.run.staleness_bound, Duration::from_secs(30));
        assert_eq!(cli.run.drain_timeout, Duration::from_secs(20));
        let settings = cli.run.settings();
        assert_eq!(settings.admin_bind.to_string(), "0.0.0.0");
        assert_eq!(settings.bind.to_string(), "127.0.0.1");
        assert!(
            Cli::try_parse_from([
                "keybrake-sidecar",
                "--config=a.yaml",
                "--controller-url=https://x"
            ])
            .is_err(),
            "one policy source at a time"
        );
    }

    #[test]
    fn default_shutdown_fits_the_default_grace_period() {
        let run = Cli::try_parse_from(["keybrake-sidecar", "--config=a.yaml"])
            .unwrap()
            .run;
        let shutdown = run.drain_timeout + LEASE_RELEASE_TIMEOUT + run.audit_flush_timeout;
        // Kubernetes' default terminationGracePeriodSeconds, with a few seconds to spare.
        assert!(shutdown <= Duration::from_secs(27), "{shutdown:?}");
    }

    #[test]
    fn the_upstream_connection_cap_reaches_the_settings() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["keybrake-sidecar", "--config=a.yaml"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| c.run.settings().upstream_max_connections)
        };
        assert_eq!(parse(&[]).unwrap(), 64);
        assert_eq!(parse(&["--upstream-max-connections=0"]).unwrap(), 0);
        assert_eq!(parse(&["--upstream-max-connections", "128"]).unwrap(), 128);
        assert!(parse(&["--upstream-max-connections=-1"]).is_err());
    }

    #[test]
    fn no_vendor_port_drops_only_those_listeners() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["keybrake-sidecar", "--config=a.yaml"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| c.run.settings().vendor_ports)
        };
        assert_eq!(parse(&[]).unwrap().len(), 4);
        // Port 0 is an ephemeral port, not "off".
        assert!(
            parse(&["--stripe-port=0"])
                .unwrap()
                .contains(&(Vendor::Stripe, 0))
        );
        let ports = parse(&[
            "--no-vendor-port=stripe,twilio",
            "--no-vendor-port",
            "resend",
        ]);
        assert_eq!(ports.unwrap(), vec![(Vendor::Openai, 15003)]);
        assert!(parse(&["--no-vendor-port=custom"]).is_err());
        assert!(parse(&["--no-vendor-port=paypal"]).is_err());
    }

    #[test]
    fn audit_follows_the_mode_and_the_flag() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["keybrake-sidecar"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| c.run)
        };
        let standalone = parse(&["--config=a.yaml"]).unwrap();
        assert_eq!(standalone.audit_config().unwrap().target, AuditTarget::None);
        let sqlite = parse(&["--config=a.yaml", "--audit=sqlite:///tmp/a.db"]).unwrap();
        assert_eq!(
            sqlite.audit_config().unwrap().target,
            AuditTarget::Sink(SinkConfig::Sqlite("/tmp/a.db".into()))
        );
        let stdout = parse(&["--config=a.yaml", "--audit=stdout"]).unwrap();
        assert_eq!(
            stdout.audit_config().unwrap().target,
            AuditTarget::Sink(SinkConfig::Stdout)
        );
        assert!(parse(&["--config=a.yaml", "--audit=syslog"]).is_err());
        assert!(
            parse(&["--config=a.yaml", "--audit=controller"])
                .unwrap()
                .audit_config()
                .is_err(),
            "controller needs --controller-url"
        );
        let controller = parse(&[
            "--controller-url=https://c:8443",
            "--ca-file=/ca.pem",
            "--token-file=/t",
            "--spool-dir=/spool",
            "--spool-max-bytes=1000000",
        ])
        .unwrap()
        .audit_config()
        .unwrap();
        assert_eq!(
            controller.target,
            AuditTarget::Controller {
                base_url: "https://c:8443".into(),
                ca_file: "/ca.pem".into(),
                token_file: "/t".into()
            }
        );
        let spool = controller.spool.expect("spool configured");
        assert_eq!((spool.dir, spool.max_bytes), ("/spool".into(), 1_000_000));
        assert!(
            parse(&["--controller-url=https://c:8443"])
                .unwrap()
                .audit_config()
                .is_err(),
            "shipping needs the controller's CA"
        );
        let default_spool = parse(&[
            "--controller-url=https://c:8443",
            "--ca-file=/ca.pem",
            "--spool-dir=/spool",
        ])
        .unwrap()
        .audit_config()
        .unwrap()
        .spool
        .unwrap();
        assert!(
            default_spool.max_bytes < 256 << 20,
            "the spool stays below the injected 256Mi emptyDir"
        );
        let off = parse(&["--controller-url=https://c:8443", "--audit=none"]).unwrap();
        assert_eq!(off.audit_config().unwrap().target, AuditTarget::None);
    }

    #[test]
    fn a_postgres_url_is_never_debug_printed() {
        let cli = Cli::try_parse_from([
            "keybrake-sidecar",
            "--config=a.yaml",
            "--audit=postgres://u:hunter2@db/audit",
        ])
        .unwrap();
        assert!(!format!("{cli:?}").contains("hunter2"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("soon").is_err());
    }
}
