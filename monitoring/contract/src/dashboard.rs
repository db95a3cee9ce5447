//! The PromQL inside a Grafana dashboard JSON: panel targets and templating variable queries.
use serde_json::Value;

/// One query and where it sits, for error messages ("panel 'Spend' target B").
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub location: String,
    pub expr: String,
}

/// Every `targets[].expr` of every panel, rows' nested panels included.
pub fn panel_queries(dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for panel in all_panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let ref_id = target["refId"].as_str().unwrap_or("?");
                out.push(Query {
                    location: format!("panel '{title}' target {ref_id}"),
                    expr: expr.to_owned(),
                });
            }
        }
    }
    out
}

/// The query of every `type: query` templating variable (a string, or `{query: …}`).
pub fn variable_queries(dashboard: &Value) -> Vec<Query> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .filter_map(|v| {
            let query = v["query"]
                .as_str()
                .or_else(|| v["query"]["query"].as_str())?;
            let name = v["name"].as_str().unwrap_or("?");
            Some(Query {
                location: format!("variable ${name}"),
                expr: query.to_owned(),
            })
        })
        .collect()
}

/// Titles of panels (and their targets) whose datasource is not the `${datasource}` variable, and
/// whether the dashboard defines that variable at all.
pub fn datasource_problems(dashboard: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let has_variable = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| {
            v["type"] == "datasource" && v["name"] == "datasource" && v["query"] == "prometheus"
        });
    if !has_variable {
        problems
            .push("no templating variable `datasource` of type datasource (prometheus)".to_owned());
    }
    let is_variable = |ds: &Value| ds["uid"] == "${datasource}";
    for panel in all_panels(dashboard).filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        if !is_variable(&panel["datasource"]) {
            problems.push(format!("panel '{title}' does not use ${{datasource}}"));
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            if !target["datasource"].is_null() && !is_variable(&target["datasource"]) {
                problems.push(format!(
                    "a target of panel '{title}' does not use ${{datasource}}"
                ));
            }
        }
    }
    problems
}

fn all_panels(dashboard: &Value) -> impl Iterator<Item = &Value> {
    let top = dashboard["panels"].as_array().into_iter().flatten();
    top.flat_map(|p| std::iter::once(p).chain(p["panels"].as_array().into_iter().flatten()))
}

/// `label_values(selector, label)` → (`selector`, `label`); `label_values(label)` → (None, label).
pub fn split_label_values(query: &str) -> Option<(Option<&str>, &str)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    match inner.rsplit_once(',') {
        Some((selector, label)) => Some((Some(selector.trim()), label.trim())),
        None => Some((None, inner.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "templating": {"list": [
                {"type": "datasource", "name": "datasource", "query": "prometheus"},
                {"type": "query", "name": "ns", "query": {"query": "label_values(m_total, namespace)"}}
            ]},
            "panels": [
                {"type": "row", "title": "r", "panels": [
                    {"type": "timeseries", "title": "inner", "datasource": {"uid": "${datasource}"},
                     "targets": [{"refId": "A", "expr": "rate(a_total[5m])"}]}
                ]},
                {"type": "stat", "title": "fixed", "datasource": {"uid": "prom-prod"},
                 "targets": [{"refId": "B", "expr": "b", "datasource": {"uid": "prom-prod"}}]}
            ]
        })
    }

    #[test]
    fn finds_nested_targets_and_variables() {
        let d = sample();
        let exprs: Vec<_> = panel_queries(&d).into_iter().map(|q| q.expr).collect();
        assert_eq!(exprs, ["rate(a_total[5m])", "b"]);
        assert_eq!(
            variable_queries(&d)[0].expr,
            "label_values(m_total, namespace)"
        );
    }

    #[test]
    fn flags_hard_coded_datasources() {
        let problems = datasource_problems(&sample());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().all(|p| p.contains("fixed")));
    }

    #[test]
    fn splits_label_values() {
        assert_eq!(
            split_label_values(r#"label_values(m{a=~"$a"}, agent)"#),
            Some((Some(r#"m{a=~"$a"}"#), "agent"))
        );
        assert_eq!(split_label_values("label_values(job)"), Some((None, "job")));
        assert_eq!(split_label_values("up"), None);
    }
}
