//! Checks a query against docs/metrics.md: every series it selects must be documented (or recorded
//! by the rules), and every label it matches on must be one that series carries.
use std::fmt;

use crate::metrics_doc::MetricsDoc;
use crate::promql::{self, PromqlError};

/// Labels Prometheus attaches to every scraped series (target labels), beyond the documented ones.
pub const TARGET_LABELS: [&str; 2] = ["job", "instance"];

#[derive(Clone, Debug, PartialEq)]
pub enum Problem {
    Unparsable {
        location: String,
        error: PromqlError,
    },
    UnknownSeries {
        location: String,
        series: String,
    },
    UnknownLabel {
        location: String,
        series: String,
        label: String,
    },
    NoSeriesName {
        location: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unparsable { location, error } => write!(f, "{location}: {error}"),
            Problem::UnknownSeries { location, series } => write!(
                f,
                "{location}: `{series}` is neither in docs/metrics.md's metrics table nor a recording rule there"
            ),
            Problem::UnknownLabel {
                location,
                series,
                label,
            } => write!(
                f,
                "{location}: `{series}` has no label `{label}` according to docs/metrics.md"
            ),
            Problem::NoSeriesName { location } => {
                write!(
                    f,
                    "{location}: a selector without a series name cannot be checked; name the series"
                )
            }
        }
    }
}

pub fn check_expr(doc: &MetricsDoc, location: &str, expr: &str) -> Vec<Problem> {
    let selectors = match promql::selectors(expr) {
        Ok(s) => s,
        Err(error) => {
            return vec![Problem::Unparsable {
                location: location.to_owned(),
                error,
            }];
        }
    };
    let mut problems = Vec::new();
    for selector in selectors {
        let Some(series) = selector.metric else {
            problems.push(Problem::NoSeriesName {
                location: location.to_owned(),
            });
            continue;
        };
        let Some(known) = doc.resolve(&series) else {
            problems.push(Problem::UnknownSeries {
                location: location.to_owned(),
                series,
            });
            continue;
        };
        for label in selector.labels {
            if !known.labels().contains(&label) && !TARGET_LABELS.contains(&label.as_str()) {
                problems.push(Problem::UnknownLabel {
                    location: location.to_owned(),
                    series: series.clone(),
                    label,
                });
            }
        }
    }
    problems
}

/// A Grafana `label_values(selector, label)` variable query: the selector must check out and the
/// label must be one the series carries.
pub fn check_label_values(doc: &MetricsDoc, location: &str, query: &str) -> Vec<Problem> {
    let Some((selector, label)) = crate::dashboard::split_label_values(query) else {
        return check_expr(doc, location, query);
    };
    let Some(selector) = selector else {
        return Vec::new(); // label_values(label) over all series: nothing Keybrake-specific
    };
    let mut problems = check_expr(doc, location, selector);
    if problems.is_empty() {
        for name in promql::series_names(selector).unwrap_or_default() {
            let carries = doc
                .resolve(&name)
                .is_some_and(|k| k.labels().contains(label));
            if !carries && !TARGET_LABELS.contains(&label) {
                problems.push(Problem::UnknownLabel {
                    location: location.to_owned(),
                    series: name,
                    label: label.to_owned(),
                });
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> MetricsDoc {
        MetricsDoc::parse(
            "| Name | Type | Labels | Meaning | Emitted by |\n|-|-|-|-|-|\n\
             | `calls_total` | counter | `vault_key`, `verdict` | c | sidecar |\n\
             | `lat_seconds` | histogram | — | l | controller |\n\n\
             | Name | Labels | Meaning |\n|-|-|-|\n| `k:calls:by_key` | `vault_key` | r |\n",
        )
        .unwrap()
    }

    #[test]
    fn accepts_documented_series_labels_and_recordings() {
        let expr = r#"sum by (vault_key) (rate(calls_total{verdict="allow", job="s"}[2m])) > 5 * k:calls:by_key{vault_key="a"}
                      and histogram_quantile(0.9, rate(lat_seconds_bucket{le="1"}[5m]))"#;
        assert_eq!(check_expr(&doc(), "t", expr), vec![]);
    }

    #[test]
    fn reports_typos_and_foreign_labels() {
        let problems = check_expr(
            &doc(),
            "t",
            r#"call_total + calls_total{agent="x"} + k:calls:by_key{verdict="allow"}"#,
        );
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(text[0].contains("`call_total` is neither"));
        assert!(text[1].contains("`calls_total` has no label `agent`"));
        assert!(text[2].contains("`k:calls:by_key` has no label `verdict`"));
    }

    #[test]
    fn label_values_label_must_exist() {
        assert_eq!(
            check_label_values(&doc(), "v", "label_values(calls_total, vault_key)"),
            vec![]
        );
        assert_eq!(
            check_label_values(&doc(), "v", "label_values(calls_total, agent)").len(),
            1
        );
        assert_eq!(
            check_label_values(&doc(), "v", "label_values(cals_total, vault_key)").len(),
            1
        );
    }
}
