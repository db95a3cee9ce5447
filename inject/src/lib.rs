//! Sidecar injection for agent pods, as pure functions the controller mounts behind its webhook
//! route: an `AdmissionReview` for a Pod CREATE goes in, an `AdmissionResponse` with a JSON patch
//! (or none) and an [`InjectionOutcome`] come out. No I/O: the caller counts the outcome through
//! the [`InjectionMetrics`] hook it supplies and turns failures into Events.
//!
//! The pod opts in with `keybrake.dev/inject: "true"` (annotation or label) and names its key with
//! `keybrake.dev/vault-key: <VaultKey name>`. See README.md for what is injected and why.
#![forbid(unsafe_code)]

pub mod agent_env;
pub mod config;
pub mod names;
pub mod outcome;
pub mod patch;
pub mod plan;
pub mod review;
pub mod sidecar;
pub mod webhook_config;

pub use config::{ConfigError, InjectionConfig, SidecarPorts};
pub use outcome::{InjectionFailure, InjectionMetrics, InjectionOutcome, InjectionResult, PodRef};
pub use review::{Reviewed, review, review_json};
pub use webhook_config::{WebhookEndpoint, WebhookSettings, mutating_webhook_configuration};
