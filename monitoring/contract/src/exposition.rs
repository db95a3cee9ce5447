//! Checks a live `/metrics` scrape (Prometheus text format 0.0.4) against docs/metrics.md: the
//! other half of the contract, used by the tests that start a real sidecar and controller.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::metrics_doc::{Component, Known, MetricsDoc};

/// Only series with this prefix are Keybrake's; process and runtime metrics are not checked.
pub const PREFIX: &str = "keybrake_";

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exposition {
    /// `# TYPE` lines: family name → type word.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("line {line}: {message}")]
pub struct ExpositionError {
    pub line: usize,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ScrapeProblem {
    /// Documented for this component, but no `# TYPE` line. Labelled metrics appear only once a
    /// label combination has been observed: exercise the process before scraping.
    Missing {
        name: String,
    },
    Undocumented {
        name: String,
    },
    WrongType {
        name: String,
        documented: &'static str,
        exported: String,
    },
    WrongComponent {
        name: String,
        documented: Component,
    },
    WrongLabels {
        series: String,
        documented: BTreeSet<String>,
        exported: BTreeSet<String>,
    },
}

impl fmt::Display for ScrapeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScrapeProblem::Missing { name } => write!(f, "`{name}` is documented but not exported"),
            ScrapeProblem::Undocumented { name } => {
                write!(f, "`{name}` is exported but not in docs/metrics.md")
            }
            ScrapeProblem::WrongType {
                name,
                documented,
                exported,
            } => {
                write!(
                    f,
                    "`{name}` is a {exported}, docs/metrics.md says {documented}"
                )
            }
            ScrapeProblem::WrongComponent { name, documented } => {
                write!(
                    f,
                    "`{name}` is documented as emitted by the {documented:?}, not this process"
                )
            }
            ScrapeProblem::WrongLabels {
                series,
                documented,
                exported,
            } => write!(
                f,
                "`{series}` has labels {exported:?}, docs/metrics.md says {documented:?}"
            ),
        }
    }
}

pub fn parse(text: &str) -> Result<Exposition, ExpositionError> {
    let mut out = Exposition::default();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let err = |message: &str| ExpositionError {
            line,
            message: message.to_owned(),
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            continue;
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            if words.next() == Some("TYPE") {
                let name = words.next().ok_or_else(|| err("TYPE without a name"))?;
                let kind = words.next().ok_or_else(|| err("TYPE without a type"))?;
                out.types.insert(name.to_owned(), kind.to_owned());
            }
            continue;
        }
        let name_end = trimmed
            .find(|c: char| c == '{' || c.is_whitespace())
            .ok_or_else(|| err("sample without a value"))?;
        let name = &trimmed[..name_end];
        let mut rest = &trimmed[name_end..];
        let mut labels = BTreeMap::new();
        if rest.starts_with('{') {
            let (parsed, after) = parse_labels(&rest[1..]).map_err(|m| err(&m))?;
            labels = parsed;
            rest = after;
        }
        let value_text = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| err("sample without a value"))?;
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| err("value is not a number"))?,
        };
        out.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// Parses `a="x",b="y"}` (after the `{`); returns the labels and the text after `}`.
fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without `=`")?;
        let name = rest[..eq].trim().to_owned();
        let after_eq = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = after_eq.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        labels.insert(name, value);
        rest = &after_eq[end + 1..];
    }
}

/// Every problem between one process's scrape and the documented contract for `component`.
pub fn check_scrape(
    doc: &MetricsDoc,
    component: Component,
    text: &str,
) -> Result<Vec<ScrapeProblem>, ExpositionError> {
    let exposition = parse(text)?;
    let mut problems = Vec::new();
    for metric in doc.exported.iter().filter(|m| m.emitted_by == component) {
        if !exposition.types.contains_key(&metric.name) {
            problems.push(ScrapeProblem::Missing {
                name: metric.name.clone(),
            });
        }
    }
    for (name, kind) in exposition
        .types
        .iter()
        .filter(|(n, _)| n.starts_with(PREFIX))
    {
        match doc.exported(name) {
            None => problems.push(ScrapeProblem::Undocumented { name: name.clone() }),
            Some(metric) => {
                if metric.kind.as_str() != kind {
                    problems.push(ScrapeProblem::WrongType {
                        name: name.clone(),
                        documented: metric.kind.as_str(),
                        exported: kind.clone(),
                    });
                }
                if metric.emitted_by != component {
                    problems.push(ScrapeProblem::WrongComponent {
                        name: name.clone(),
                        documented: metric.emitted_by,
                    });
                }
            }
        }
    }
    let mut reported = BTreeSet::new();
    for sample in exposition
        .samples
        .iter()
        .filter(|s| s.name.starts_with(PREFIX))
    {
        let exported: BTreeSet<String> = sample.labels.keys().cloned().collect();
        match doc.resolve(&sample.name) {
            Some(Known::Exported { labels, .. }) if labels != exported => {
                if reported.insert(sample.name.clone()) {
                    problems.push(ScrapeProblem::WrongLabels {
                        series: sample.name.clone(),
                        documented: labels,
                        exported,
                    });
                }
            }
            Some(Known::Exported { .. }) => {}
            Some(Known::Recorded(_)) | None => {
                if !exposition.types.contains_key(&sample.name)
                    && reported.insert(sample.name.clone())
                {
                    problems.push(ScrapeProblem::Undocumented {
                        name: sample.name.clone(),
                    });
                }
            }
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> MetricsDoc {
        MetricsDoc::parse(
            "| Name | Type | Labels | Meaning | Emitted by |\n|-|-|-|-|-|\n\
             | `keybrake_calls_total` | counter | `vault_key`, `verdict` | c | sidecar |\n\
             | `keybrake_up_seconds` | histogram | `vendor` | l | sidecar |\n\
             | `keybrake_controller_leader` | gauge | — | l | controller |\n",
        )
        .unwrap()
    }

    const GOOD: &str = r#"# HELP keybrake_calls_total Calls.
# TYPE keybrake_calls_total counter
keybrake_calls_total{vault_key="a \"q\"",verdict="allow"} 3
# TYPE keybrake_up_seconds histogram
keybrake_up_seconds_bucket{vendor="stripe",le="0.1"} 1
keybrake_up_seconds_bucket{vendor="stripe",le="+Inf"} 2
keybrake_up_seconds_sum{vendor="stripe"} 0.3
keybrake_up_seconds_count{vendor="stripe"} 2
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 1.5
"#;

    #[test]
    fn parses_escaped_labels_and_special_values() {
        let e = parse(GOOD).unwrap();
        assert_eq!(e.samples[0].labels["vault_key"], "a \"q\"");
        assert_eq!(
            (e.samples[2].labels["le"].as_str(), e.samples[2].value),
            ("+Inf", 2.0)
        );
        assert_eq!(
            parse("x_seconds NaN\ny +Inf 1700000000\n").map(|e| e.samples[1].value),
            Ok(f64::INFINITY)
        );
        assert!(parse("x{a=\"b} 1").is_err());
    }

    #[test]
    fn a_conforming_scrape_has_no_problems() {
        assert_eq!(
            check_scrape(&doc(), Component::Sidecar, GOOD).unwrap(),
            vec![]
        );
    }

    #[test]
    fn reports_missing_undocumented_mistyped_and_mislabelled() {
        let bad = "# TYPE keybrake_calls_total gauge\nkeybrake_calls_total{vault_key=\"a\"} 1\n\
                   # TYPE keybrake_extra counter\nkeybrake_extra 1\n\
                   # TYPE keybrake_controller_leader gauge\nkeybrake_controller_leader 1\n";
        let problems: Vec<String> = check_scrape(&doc(), Component::Sidecar, bad)
            .unwrap()
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(problems[0].contains("`keybrake_up_seconds` is documented but not exported"));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("`keybrake_calls_total` is a gauge"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("`keybrake_extra` is exported but not"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("emitted by the Controller"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("`keybrake_calls_total` has labels"))
        );
    }
}
