//! The metric-name contract between Keybrake's code and its monitoring.
//!
//! `docs/metrics.md` lists every exported metric (name, type, labels, emitter) and every recording
//! rule. This crate parses that page ([`MetricsDoc`]), extracts the series a PromQL expression
//! selects ([`promql::selectors`]), and checks rules, dashboard queries and live `/metrics`
//! scrapes against the page ([`check`]). No I/O: callers read the files.
#![forbid(unsafe_code)]

pub mod check;
pub mod dashboard;
pub mod exposition;
pub mod metrics_doc;
pub mod promql;
pub mod rules;

pub use check::{Problem, check_expr};
pub use metrics_doc::{
    Component, DocError, ExportedMetric, MetricKind, MetricsDoc, RecordedSeries,
};
