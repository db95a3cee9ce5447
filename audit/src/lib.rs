//! `agent_call_audit`: one row per call through a sidecar, allowed or denied.
//!
//! - [`schema`]: the one DDL for SQLite and PostgreSQL, as versioned migrations.
//! - [`sink`]: SQLite, PostgreSQL (COPY) and JSON-lines sinks behind [`sink::AuditSink`].
//! - [`queue`], [`shipper`], [`spool`], [`transport`]: lossless delivery from the sidecar.
//! - [`ingest`]: the controller's `POST /v1/audit` body handler.
//! - [`queries`]: the playbook's SQL, quoted verbatim by docs/audit.md.
#![forbid(unsafe_code)]

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
