//! Parses the two tables of docs/metrics.md: exported metrics and recording rules.
use std::collections::BTreeSet;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DocError {
    #[error("line {line}: {message}")]
    Malformed { line: usize, message: String },
    #[error("no table with a header row `| Name | Type | Labels | ... | Emitted by |`")]
    NoExportedTable,
    #[error("metric `{0}` is listed twice")]
    Duplicate(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    pub fn parse(text: &str) -> Option<MetricKind> {
        match text {
            "counter" => Some(MetricKind::Counter),
            "gauge" => Some(MetricKind::Gauge),
            "histogram" => Some(MetricKind::Histogram),
            _ => None,
        }
    }

    /// The word Prometheus' text format uses on `# TYPE` lines.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Sidecar,
    Controller,
}

impl Component {
    pub fn parse(text: &str) -> Option<Component> {
        match text {
            "sidecar" => Some(Component::Sidecar),
            "controller" => Some(Component::Controller),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ExportedMetric {
    pub name: String,
    pub kind: MetricKind,
    pub labels: BTreeSet<String>,
    pub emitted_by: Component,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RecordedSeries {
    pub name: String,
    pub labels: BTreeSet<String>,
}

/// What a series name found in a query or a scrape refers to.
#[derive(Clone, Debug, PartialEq)]
pub enum Known<'a> {
    Exported {
        metric: &'a ExportedMetric,
        /// The labels this particular series carries (a histogram's `_bucket` adds `le`).
        labels: BTreeSet<String>,
    },
    Recorded(&'a RecordedSeries),
}

impl Known<'_> {
    pub fn labels(&self) -> &BTreeSet<String> {
        match self {
            Known::Exported { labels, .. } => labels,
            Known::Recorded(r) => &r.labels,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsDoc {
    pub exported: Vec<ExportedMetric>,
    pub recorded: Vec<RecordedSeries>,
}

impl MetricsDoc {
    pub fn parse(markdown: &str) -> Result<MetricsDoc, DocError> {
        let mut doc = MetricsDoc::default();
        let mut seen = BTreeSet::new();
        let mut header: Option<Vec<String>> = None;
        let mut found_exported = false;
        for (index, raw) in markdown.lines().enumerate() {
            let line = index + 1;
            let trimmed = raw.trim();
            if !trimmed.starts_with('|') {
                header = None;
                continue;
            }
            let cells = split_row(trimmed);
            let Some(columns) = &header else {
                header = Some(cells.iter().map(|c| c.to_lowercase()).collect());
                continue;
            };
            if cells
                .iter()
                .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
            {
                continue; // the |---|---| separator
            }
            if cells.len() != columns.len() {
                return Err(malformed(
                    line,
                    "row has a different number of cells than its header",
                ));
            }
            let cell = |name: &str| {
                columns
                    .iter()
                    .position(|c| c == name)
                    .map(|i| cells[i].as_str())
            };
            let (Some(name), Some(labels)) = (cell("name"), cell("labels")) else {
                continue; // some other table
            };
            let name = code(name).ok_or_else(|| malformed(line, "name must be in backticks"))?;
            let labels = parse_labels(labels).ok_or_else(|| {
                malformed(
                    line,
                    "labels must be backticked names separated by commas, or —",
                )
            })?;
            if !seen.insert(name.clone()) {
                return Err(DocError::Duplicate(name));
            }
            match (cell("type"), cell("emitted by")) {
                (Some(kind), Some(emitter)) => {
                    found_exported = true;
                    let kind = MetricKind::parse(kind).ok_or_else(|| {
                        malformed(line, "type must be counter, gauge or histogram")
                    })?;
                    let emitted_by = Component::parse(emitter).ok_or_else(|| {
                        malformed(line, "emitted by must be sidecar or controller")
                    })?;
                    doc.exported.push(ExportedMetric {
                        name,
                        kind,
                        labels,
                        emitted_by,
                    });
                }
                _ => doc.recorded.push(RecordedSeries { name, labels }),
            }
        }
        if !found_exported {
            return Err(DocError::NoExportedTable);
        }
        Ok(doc)
    }

    pub fn exported(&self, name: &str) -> Option<&ExportedMetric> {
        self.exported.iter().find(|m| m.name == name)
    }

    /// Resolves a series name as it appears in PromQL or a scrape: an exported metric, a
    /// histogram's `_bucket`/`_sum`/`_count` series, or a recording rule.
    pub fn resolve(&self, series: &str) -> Option<Known<'_>> {
        if let Some(metric) = self.exported(series)
            && metric.kind != MetricKind::Histogram
        {
            return Some(Known::Exported {
                metric,
                labels: metric.labels.clone(),
            });
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            let histogram = series
                .strip_suffix(suffix)
                .and_then(|base| self.exported(base))
                .filter(|m| m.kind == MetricKind::Histogram);
            if let Some(metric) = histogram {
                let mut labels = metric.labels.clone();
                if suffix == "_bucket" {
                    labels.insert("le".to_owned());
                }
                return Some(Known::Exported { metric, labels });
            }
        }
        self.recorded
            .iter()
            .find(|r| r.name == series)
            .map(Known::Recorded)
    }
}

fn malformed(line: usize, message: &str) -> DocError {
    DocError::Malformed {
        line,
        message: message.to_owned(),
    }
}

fn split_row(row: &str) -> Vec<String> {
    let inner = row.trim_matches('|');
    inner.split('|').map(|c| c.trim().to_owned()).collect()
}

/// `` `name` `` → `name`; anything else is not a code span.
fn code(cell: &str) -> Option<String> {
    let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
    (!inner.is_empty() && !inner.contains('`')).then(|| inner.to_owned())
}

fn parse_labels(cell: &str) -> Option<BTreeSet<String>> {
    if cell == "—" || cell == "-" || cell.is_empty() {
        return Some(BTreeSet::new());
    }
    cell.split(',').map(|part| code(part.trim())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
# Metrics

| Name | Type | Labels | Meaning | Emitted by |
|------|------|--------|---------|------------|
| `a_total` | counter | `namespace`, `vault_key` | Calls. | sidecar |
| `lat_seconds` | histogram | `vendor` | Latency. | sidecar |
| `leader` | gauge | — | Leader. | controller |

| Name | Labels | Meaning |
|------|--------|---------|
| `x:rate:by_key` | `vault_key` | Recorded. |
";

    #[test]
    fn parses_both_tables() {
        let doc = MetricsDoc::parse(DOC).unwrap();
        assert_eq!(doc.exported.len(), 3);
        assert_eq!(doc.exported[1].kind, MetricKind::Histogram);
        assert_eq!(doc.exported[2].emitted_by, Component::Controller);
        assert!(doc.exported[2].labels.is_empty());
        assert_eq!(doc.recorded[0].name, "x:rate:by_key");
    }

    #[test]
    fn resolves_histogram_series_and_recordings() {
        let doc = MetricsDoc::parse(DOC).unwrap();
        let bucket = doc.resolve("lat_seconds_bucket").unwrap();
        assert!(bucket.labels().contains("le") && bucket.labels().contains("vendor"));
        assert!(
            !doc.resolve("lat_seconds_count")
                .unwrap()
                .labels()
                .contains("le")
        );
        assert!(
            doc.resolve("lat_seconds").is_none(),
            "a histogram has no bare series"
        );
        assert!(
            doc.resolve("a_total_bucket").is_none(),
            "a counter has no buckets"
        );
        assert!(doc.resolve("x:rate:by_key").is_some());
        assert!(doc.resolve("a_totl").is_none());
    }

    #[test]
    fn rejects_duplicates_bad_types_and_missing_table() {
        let dup = DOC.replace("`leader`", "`a_total`");
        assert_eq!(
            MetricsDoc::parse(&dup),
            Err(DocError::Duplicate("a_total".into()))
        );
        let bad = DOC.replace("| gauge |", "| gauges |");
        assert!(matches!(
            MetricsDoc::parse(&bad),
            Err(DocError::Malformed { line: 7, .. })
        ));
        assert_eq!(
            MetricsDoc::parse("no tables"),
            Err(DocError::NoExportedTable)
        );
    }
}
