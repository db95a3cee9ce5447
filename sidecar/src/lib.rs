//! keybrake-sidecar: the data plane. A reverse proxy in the agent's pod that maps a vault key to
//! the real vendor secret, enforces the key's policy on every call, streams responses back and
//! reports every call to metrics and the audit sink.
//!
//! Seams for other components:
//! - policy: [`store::PolicyStore`] implements `keybrake_api::stream::PolicyApply`; the
//!   standalone loader ([`standalone`]) and the controller stream client feed it.
//! - audit: [`audit::AuditSink`] receives one `AuditRow` per call.
//! - caps: [`ledger::SpendLedger`] holds and settles pre-flight reservations.
//! - cost: [`vendors::VendorModule::preflight`] / `response_cost`, prices in [`pricing`], and
//!   [`body::StreamObserver`].
#![forbid(unsafe_code)]

pub mod audit;
pub mod audit_thread;
pub mod body;
pub mod budget_client;
pub mod cli;
pub mod decide;
pub mod drain;
pub mod forward;
pub mod ledger;
pub mod metrics;
pub mod path;
pub mod pricing;
pub mod proxy;
pub mod ratelimit;
pub mod server;
pub mod standalone;
pub mod store;
pub mod stream_client;
pub mod upstream_pool;
pub mod vendors;

pub use server::{BoundAddrs, Deps, Settings, Sidecar};
pub use store::{Freshness, PolicyStore};
