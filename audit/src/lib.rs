//! `agent_call_audit`: one row per call through a sidecar, allowed or denied.
//!
//! - [`schema`]: the one DDL for SQLite and PostgreSQL, as versioned migrations.
//! - [`sink`]: SQLite, PostgreSQL (COPY) and JSON-lines sinks behind [`sink::AuditSink`].
//! - [`queue`], [`shipper`], [`spool`], [`transport`]: lossless delivery from the sidecar.
//! - [`ingest`]: the controller's `POST /v1/audit` body handler.
//! - [`queries`]: the playbook's SQL, quoted verbatim by docs/audit.md.
//!
//! Sidecar wiring (standalone mode: `SinkTransport(AnySink::open(&config).await?)` instead of
//! the HTTP transport):
//!
//! ```no_run
//! # async fn wire(registry: &prometheus::Registry, ca_pem: &[u8], row: keybrake_api::audit::AuditRow) -> anyhow::Result<()> {
//! use std::{sync::Arc, time::Duration};
//! use keybrake_audit::{metrics::AuditMetrics, queue, shipper::{Shipper, ShipperConfig},
//!     spool::{Spool, SpoolConfig}, transport::{HttpTransport, TokenFile}};
//!
//! let metrics = AuditMetrics::register(registry)?;
//! let (audit, receiver) = queue::channel(10_000, metrics.clone());
//! let spool = Spool::open(SpoolConfig::new("/var/spool/keybrake", 256 << 20), metrics)?;
//! let transport = HttpTransport::new(
//!     "https://keybrake-controller.keybrake.svc:8443",
//!     ca_pem,
//!     Arc::new(TokenFile("/var/run/secrets/tokens/keybrake".into())),
//!     Duration::from_secs(10),
//! )?;
//! tokio::spawn(Shipper::new(transport, receiver, spool, ShipperConfig::default()).run());
//! // On the request path (never blocks):
//! let _ = audit.record(row);
//! # Ok(()) }
//! ```
//!
//! Controller, `POST /v1/audit` after authenticating the caller:
//!
//! ```no_run
//! # async fn handle(req: http::Request<hyper::body::Incoming>, sink: &keybrake_audit::AnySink) -> (u16, String) {
//! use keybrake_audit::ingest::{IngestLimits, ingest_ndjson, read_body_limited};
//!
//! let limits = IngestLimits::default();
//! let result = match read_body_limited(req.into_body(), limits.max_body_bytes).await {
//!     Ok(body) => ingest_ndjson(sink, &body, &limits).await,
//!     Err(e) => Err(e),
//! };
//! match result {
//!     Ok(report) => (200, serde_json::to_string(&report).unwrap()),
//!     Err(e) => (e.http_status(), e.to_string()),
//! }
//! # }
//! ```
#![forbid(unsafe_code)]

/// Exact dollars text for an integer micro-dollar SQL expression (NULL stays NULL), with
/// arithmetic both engines share (`CAST`, `/`, `%`, `||`, `substr`, `abs`), e.g. `12.340000`;
/// never through a float. Used by the playbook queries and SQLite's dollar columns.
macro_rules! usd_text {
    ($micros:literal) => {
        concat!(
            "CASE WHEN ",
            $micros,
            " < 0 THEN '-' ELSE '' END || CAST(abs(",
            $micros,
            ") / 1000000 AS TEXT) || '.' || substr(CAST(1000000 + abs(",
            $micros,
            ") % 1000000 AS TEXT), 2)"
        )
    };
}

pub mod ingest;
pub mod metrics;
pub mod queries;
pub mod queue;
pub mod row;
pub mod schema;
pub mod shipper;
pub mod sink;
pub mod spool;
pub mod transport;

pub use sink::{AnySink, AuditSink, SinkConfig, SinkError, WriteOutcome};
