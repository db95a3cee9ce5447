//! `keybrake-demo-audit`: the audit half of `make demo`. Rows the sidecar wrote as JSON lines
//! go through the same `ingest_ndjson` the controller mounts on `POST /v1/audit` into the
//! embedded SQLite sink; the playbook queries from `keybrake_audit::queries` then run against it
//! unchanged and print as aligned tables.
#![forbid(unsafe_code)]

pub mod cli;
pub mod playbook;
pub mod table;
