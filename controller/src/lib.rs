//! keybrake-controller: reconciles VaultKeys, indexes their grants per subscriber scope, serves
//! the sidecars' policy watch streams and turns their acknowledgements into status.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit_ingest;
pub mod auth;
pub mod budget;
pub mod enforcement;
pub mod event_publisher;
pub mod feed;
pub mod index;
pub mod injection_flags;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod peer_enforcement;
pub mod peer_reports;
pub mod reconcile;
pub mod secret_interest;
pub mod server;
pub mod serving_cert;
pub mod spend;
pub mod tls;
pub mod tls_secret;
pub mod token;
pub mod webhook;
