//! Which series a PromQL expression selects, and with which label matchers.
//!
//! Not a full parser (promtool checks syntax): a tokenizer that knows enough of PromQL to tell a
//! series name from a function, an aggregation, a keyword, a grouping label list, a duration, a
//! string or a Grafana variable. Grafana variables (`$__rate_interval`, `${datasource}`) are skipped.

/// One vector selector: `name{label="…", …}` (name absent for a bare `{…}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    pub metric: Option<String>,
    pub labels: Vec<String>,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PromqlError {
    #[error("unterminated {what} starting at character {at}")]
    Unterminated { what: &'static str, at: usize },
}

/// Keywords that take a parenthesised label list, e.g. `sum by (le)`, `on (job) group_left ()`.
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Aggregation operators: reserved words, never series names, and may be followed by `by (…)`.
const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const KEYWORDS: [&str; 8] = [
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
];

pub fn selectors(expr: &str) -> Result<Vec<Selector>, PromqlError> {
    let chars: Vec<char> = expr.chars().collect();
    let mut found: Vec<Selector> = Vec::new();
    // Index in `found` of a series name just read: a `{` right after it holds its matchers.
    let mut open_name: Option<usize> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let name_before = open_name.take();
        match c {
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '"' | '\'' | '`' => i = skip_string(&chars, i)?,
            '[' => i = skip_to(&chars, i, ']', "range")?,
            '{' => {
                let (labels, end) = matchers(&chars, i)?;
                match name_before {
                    Some(index) => found[index].labels = labels,
                    None => found.push(Selector {
                        metric: None,
                        labels,
                    }),
                }
                i = end;
            }
            '$' => i = skip_variable(&chars, i)?,
            c if c.is_ascii_digit() || (c == '.' && next_is_digit(&chars, i)) => {
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '.' | '_'))
                {
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < chars.len() && is_ident_char(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = next_non_space(&chars, i);
                if GROUPING.contains(&word.as_str()) {
                    if next.map(|(_, ch)| ch) == Some('(') {
                        let (open, _) = next.expect("checked");
                        i = skip_to(&chars, open, ')', "label list")?;
                    }
                } else if AGGREGATIONS.contains(&word.as_str()) || KEYWORDS.contains(&word.as_str())
                {
                    // not a series
                } else if next.map(|(_, ch)| ch) == Some('(') {
                    // a function call
                } else {
                    found.push(Selector {
                        metric: Some(word),
                        labels: Vec::new(),
                    });
                    open_name = Some(found.len() - 1);
                }
            }
            _ => i += 1,
        }
    }
    Ok(found)
}

/// The distinct series names an expression selects.
pub fn series_names(expr: &str) -> Result<Vec<String>, PromqlError> {
    let mut names: Vec<String> = selectors(expr)?
        .into_iter()
        .filter_map(|s| s.metric)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn next_is_digit(chars: &[char], i: usize) -> bool {
    chars.get(i + 1).is_some_and(|c| c.is_ascii_digit())
}

fn next_non_space(chars: &[char], mut i: usize) -> Option<(usize, char)> {
    while i < chars.len() {
        if !chars[i].is_whitespace() {
            return Some((i, chars[i]));
        }
        i += 1;
    }
    None
}

/// Returns the index just past the closing quote.
fn skip_string(chars: &[char], start: usize) -> Result<usize, PromqlError> {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(PromqlError::Unterminated {
        what: "string",
        at: start,
    })
}

/// Returns the index just past `close`, skipping strings on the way.
fn skip_to(
    chars: &[char],
    start: usize,
    close: char,
    what: &'static str,
) -> Result<usize, PromqlError> {
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = skip_string(chars, i)?,
            c if c == close => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(PromqlError::Unterminated { what, at: start })
}

fn skip_variable(chars: &[char], start: usize) -> Result<usize, PromqlError> {
    if chars.get(start + 1) == Some(&'{') {
        return skip_to(chars, start + 1, '}', "variable");
    }
    let mut i = start + 1;
    while i < chars.len() && is_ident_char(chars[i]) {
        i += 1;
    }
    Ok(i)
}

/// Label names of the matchers in `{…}` starting at `start`; returns them and the index past `}`.
fn matchers(chars: &[char], start: usize) -> Result<(Vec<String>, usize), PromqlError> {
    let mut labels = Vec::new();
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '}' => return Ok((labels, i + 1)),
            '"' | '\'' | '`' => i = skip_string(chars, i)?,
            c if is_ident_start(c) => {
                let begin = i;
                while i < chars.len() && is_ident_char(chars[i]) {
                    i += 1;
                }
                labels.push(chars[begin..i].iter().collect());
            }
            _ => i += 1,
        }
    }
    Err(PromqlError::Unterminated {
        what: "label matchers",
        at: start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(metric: &str, labels: &[&str]) -> Selector {
        Selector {
            metric: Some(metric.to_owned()),
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
        }
    }

    #[test]
    fn aggregation_with_grouping_and_matchers() {
        let got = selectors(
            r#"sum by (namespace, agent, vault_key, verdict) (increase(keybrake_calls_total{verdict!="allow", vendor=~"stripe|openai"}[2m])) / 2"#,
        )
        .unwrap();
        assert_eq!(
            got,
            vec![sel("keybrake_calls_total", &["verdict", "vendor"])]
        );
    }

    #[test]
    fn histogram_quantile_with_grafana_interval() {
        let got = series_names(
            "histogram_quantile(0.99, sum by (le) (rate(keybrake_controller_propagation_seconds_bucket[$__rate_interval])))",
        )
        .unwrap();
        assert_eq!(got, ["keybrake_controller_propagation_seconds_bucket"]);
    }

    #[test]
    fn binary_operators_offsets_and_vector_matching() {
        let got = series_names(
            "(avg_over_time(a:b[1d] offset 10m) and count_over_time(a:b[1d] offset 10m) > 23 * count_over_time(a:b[1h] offset 10m)) \
             or (c > 30) * on (job, instance) group_right () d unless ignoring(x) e >= bool 1e3",
        )
        .unwrap();
        assert_eq!(got, ["a:b", "c", "d", "e"]);
    }

    #[test]
    fn aggregation_before_without_is_not_a_series() {
        assert_eq!(
            series_names("sum without (verdict) (x:y)").unwrap(),
            ["x:y"]
        );
        assert_eq!(series_names("topk(10, x)").unwrap(), ["x"]);
        assert_eq!(series_names("sum(x) by (le)").unwrap(), ["x"]);
    }

    #[test]
    fn strings_variables_and_comments_hide_nothing_real() {
        let got = selectors(
            "x{namespace=~\"$namespace\", note=\"not_a_metric{y}\"} # comment_metric\n + ${var} * $other",
        )
        .unwrap();
        assert_eq!(got, vec![sel("x", &["namespace", "note"])]);
    }

    #[test]
    fn bare_matchers_have_no_name() {
        assert_eq!(
            selectors(r#"{__name__="x"}"#).unwrap(),
            vec![Selector {
                metric: None,
                labels: vec!["__name__".to_owned()]
            }]
        );
    }

    #[test]
    fn unterminated_input_is_an_error() {
        assert_eq!(
            selectors(r#"x{a="b}"#),
            Err(PromqlError::Unterminated {
                what: "string",
                at: 4
            })
        );
        assert!(selectors("rate(x[5m)").is_err());
    }
}
