//! The repository's monitoring artifacts against docs/metrics.md: rules, dashboard, runbook.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use keybrake_monitoring::check::{check_expr, check_label_values};
use keybrake_monitoring::dashboard;
use keybrake_monitoring::metrics_doc::{Component, MetricKind, MetricsDoc};
use keybrake_monitoring::promql;
use keybrake_monitoring::rules::RuleFile;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn doc() -> MetricsDoc {
    MetricsDoc::parse(&read("docs/metrics.md")).expect("docs/metrics.md parses")
}

fn rules() -> RuleFile {
    RuleFile::parse(&read("monitoring/rules/keybrake.rules.yaml")).expect("rules parse")
}

fn dashboard_json() -> serde_json::Value {
    serde_json::from_str(&read("monitoring/dashboards/keybrake.json")).expect("dashboard is JSON")
}

/// GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn runbook_anchors() -> BTreeSet<String> {
    read("docs/runbook.md")
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

/// The agreed metric list (the team preamble): docs/metrics.md must carry exactly these.
#[test]
fn metrics_table_is_the_agreed_list() {
    use Component::{Controller, Sidecar};
    use MetricKind::{Counter, Gauge, Histogram};
    let expected: &[(&str, MetricKind, &[&str], Component)] = &[
        (
            "keybrake_calls_total",
            Counter,
            &["namespace", "agent", "vault_key", "vendor", "verdict"],
            Sidecar,
        ),
        (
            "keybrake_cost_usd_total",
            Counter,
            &["namespace", "agent", "vault_key", "vendor"],
            Sidecar,
        ),
        (
            "keybrake_upstream_duration_seconds",
            Histogram,
            &["vendor"],
            Sidecar,
        ),
        ("keybrake_policy_revision", Gauge, &[], Sidecar),
        ("keybrake_policy_staleness_seconds", Gauge, &[], Sidecar),
        (
            "keybrake_stale_allowed_calls_total",
            Counter,
            &["namespace", "vault_key"],
            Sidecar,
        ),
        (
            "keybrake_upstream_busy_calls_total",
            Counter,
            &["vendor"],
            Sidecar,
        ),
        ("keybrake_audit_queue_depth", Gauge, &[], Sidecar),
        ("keybrake_audit_spool_bytes", Gauge, &[], Sidecar),
        ("keybrake_audit_dropped_rows_total", Counter, &[], Sidecar),
        ("keybrake_audit_delivery_idle_priority", Gauge, &[], Sidecar),
        (
            "keybrake_controller_reconciles_total",
            Counter,
            &["result"],
            Controller,
        ),
        (
            "keybrake_controller_reconcile_errors_total",
            Counter,
            &["kind"],
            Controller,
        ),
        (
            "keybrake_controller_reconcile_duration_seconds",
            Histogram,
            &[],
            Controller,
        ),
        (
            "keybrake_controller_streams_connected",
            Gauge,
            &[],
            Controller,
        ),
        (
            "keybrake_controller_propagation_seconds",
            Histogram,
            &[],
            Controller,
        ),
        (
            "keybrake_controller_audit_ingested_rows_total",
            Counter,
            &[],
            Controller,
        ),
        (
            "keybrake_controller_audit_sink_errors_total",
            Counter,
            &[],
            Controller,
        ),
        ("keybrake_controller_leader", Gauge, &[], Controller),
        (
            "keybrake_controller_budget_grants_total",
            Counter,
            &["result"],
            Controller,
        ),
        (
            "keybrake_webhook_injections_total",
            Counter,
            &["result"],
            Controller,
        ),
    ];
    let doc = doc();
    let documented: Vec<_> = doc
        .exported
        .iter()
        .map(|m| (m.name.as_str(), m.kind, m.labels.clone(), m.emitted_by))
        .collect();
    let agreed: Vec<_> = expected
        .iter()
        .map(|(n, k, l, c)| {
            (
                *n,
                *k,
                l.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>(),
                *c,
            )
        })
        .collect();
    assert_eq!(documented, agreed);
}

#[test]
fn every_verdict_is_documented() {
    let text = read("docs/metrics.md");
    for verdict in keybrake_api::Verdict::ALL {
        assert!(
            text.contains(&format!("`{}`", verdict.as_str())),
            "docs/metrics.md lacks verdict {verdict}"
        );
    }
}

#[test]
fn rules_use_only_documented_series_and_labels() {
    let doc = doc();
    let rules = rules();
    let mut problems = Vec::new();
    for rule in rules.rules() {
        let name = rule
            .record
            .as_deref()
            .or(rule.alert.as_deref())
            .unwrap_or("?");
        problems.extend(check_expr(&doc, &format!("rule {name}"), &rule.expr));
    }
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert!(text.is_empty(), "{}", text.join("\n"));
}

#[test]
fn recording_rules_and_their_table_agree() {
    let rules = rules();
    let in_rules: BTreeSet<&str> = rules.recorded_names().into_iter().collect();
    let doc = doc();
    let in_doc: BTreeSet<&str> = doc.recorded.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        in_rules, in_doc,
        "recording rules vs docs/metrics.md's recording-rule table"
    );
    let required = [
        "keybrake:calls_per_minute:by_key",
        "keybrake:calls_per_minute:by_agent",
        "keybrake:allowed_calls_per_minute:baseline_by_key",
    ];
    for name in required {
        assert!(in_rules.contains(name), "missing recording rule {name}");
    }
}

/// Alerts that concern the whole installation, not one key: their summary need not name one.
const GLOBAL_ALERTS: [&str; 3] = [
    "KeybrakeRevokePropagationSlow",
    "KeybrakeControllerNoLeader",
    "KeybrakeControllerAbsent",
];

#[test]
fn alerts_carry_severity_summary_and_an_existing_runbook_section() {
    let anchors = runbook_anchors();
    let rules = rules();
    let names: Vec<&str> = rules.alerts().map(|(n, _)| n).collect();
    for required in [
        "KeybrakeCallRateSpike",
        "KeybrakeDenialsSpike",
        "KeybrakePolicyStale",
        "KeybrakeAuditBacklog",
    ] {
        assert!(names.contains(&required), "missing alert {required}");
    }
    for (name, alert) in rules.alerts() {
        let severity = alert.labels.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                alert.annotations.contains_key(key),
                "{name}: no {key} annotation"
            );
        }
        let url = &alert.annotations["runbook_url"];
        let (page, anchor) = url.split_once('#').unwrap_or((url, ""));
        assert!(
            page.ends_with("docs/runbook.md"),
            "{name}: runbook_url {url} is not docs/runbook.md"
        );
        assert_eq!(
            anchor,
            name.to_lowercase(),
            "{name}: anchor should be the alert's name"
        );
        assert!(
            anchors.contains(anchor),
            "{name}: docs/runbook.md has no section #{anchor}"
        );
        if !GLOBAL_ALERTS.contains(&name) {
            let summary = &alert.annotations["summary"];
            for label in ["$labels.vault_key", "$labels.agent", "$labels.namespace"] {
                assert!(
                    summary.contains(label),
                    "{name}: summary does not name {label}"
                );
            }
        }
    }
}

#[test]
fn runbook_has_a_section_for_every_alert_and_no_stale_ones() {
    let alerts: BTreeSet<String> = rules().alerts().map(|(n, _)| n.to_lowercase()).collect();
    let sections: BTreeSet<String> = runbook_anchors()
        .into_iter()
        .filter(|a| a.starts_with("keybrake") && !a.contains('-'))
        .collect();
    assert_eq!(
        sections, alerts,
        "alert sections in docs/runbook.md vs alerts in the rules"
    );
}

#[test]
fn dashboard_queries_use_only_documented_series_and_labels() {
    let doc = doc();
    let dash = dashboard_json();
    let mut problems = Vec::new();
    for q in dashboard::panel_queries(&dash) {
        problems.extend(check_expr(&doc, &q.location, &q.expr));
    }
    for q in dashboard::variable_queries(&dash) {
        problems.extend(check_label_values(&doc, &q.location, &q.expr));
    }
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert!(text.is_empty(), "{}", text.join("\n"));
    assert_eq!(dashboard::datasource_problems(&dash), Vec::<String>::new());
}

#[test]
fn dashboard_shows_what_the_issue_asks_for() {
    let used: BTreeSet<String> = dashboard::panel_queries(&dashboard_json())
        .iter()
        .flat_map(|q| promql::series_names(&q.expr).unwrap())
        .collect();
    for series in [
        "keybrake:calls_per_minute:by_key",
        "keybrake_cost_usd_total",
        "keybrake:calls_per_minute:by_key_verdict",
        "keybrake_controller_propagation_seconds_bucket",
        "keybrake_policy_staleness_seconds",
    ] {
        assert!(
            used.contains(series),
            "the dashboard has no panel on {series}"
        );
    }
}

/// promtool's own parser on every dashboard query (as recording rules), Grafana's interval
/// variables replaced by durations. Uses the promtool of scripts/install-promtool.sh.
#[test]
fn dashboard_queries_parse_with_promtool() {
    let install = Command::new(repo().join("scripts/install-promtool.sh"))
        .output()
        .expect("running scripts/install-promtool.sh");
    assert!(
        install.status.success(),
        "promtool is needed: run scripts/install-promtool.sh (Debian's prometheus package) or set PROMTOOL\n{}",
        String::from_utf8_lossy(&install.stderr)
    );
    let promtool = String::from_utf8(install.stdout).unwrap().trim().to_owned();
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let queries = dashboard::panel_queries(&dashboard_json());
    assert!(
        queries.len() >= 10,
        "only {} queries found in the dashboard",
        queries.len()
    );
    for (i, q) in queries.iter().enumerate() {
        let expr = q
            .expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h");
        file.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dashboard-queries-{}.yaml", std::process::id()));
    std::fs::write(&path, file).unwrap();
    let out = Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(&path)
        .output()
        .expect("running promtool");
    assert!(
        out.status.success(),
        "promtool rejects a dashboard query:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&path).ok();
}

#[test]
fn runbook_links_to_its_own_sections_resolve() {
    let text = read("docs/runbook.md");
    let anchors = runbook_anchors();
    let mut links = 0;
    for piece in text.split("](#").skip(1) {
        let anchor = piece.split(')').next().unwrap_or_default();
        assert!(
            anchors.contains(anchor),
            "docs/runbook.md links to #{anchor}, which is no heading"
        );
        links += 1;
    }
    assert!(links > 5, "expected the runbook to cross-link its sections");
}
