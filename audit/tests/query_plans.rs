//! Every playbook query is served by an index, on both engines, checked with the engines' own
//! EXPLAIN on a table big enough for the planner to care (see docs/audit.md, "Indexes").
mod common;

use common::*;
use keybrake_audit::{
    AnySink, SinkConfig,
    queries::{self, Param, Query},
    row::Value,
};

const TABLE_ROWS: i64 = 200_000;

/// One row per second ending at t0 (about 2.3 days): 50 keys, 2,000 customers, runs of 200
/// calls, 10% denials. Server-side SQL, so filling the table takes a second, not a minute.
/// `$series` is the engine's row generator, `$time` its "t0 minus g seconds" expression.
fn fill_sql(series: &str, time: &str) -> String {
    format!(
        "{series} INSERT INTO agent_call_audit (id, started_at, duration_ms, vault_key_id, agent_name, agent_run_id, namespace, pod, vendor, operation, method, path_template, policy_verdict, verdict_reason, customer_scope_id, vendor_status, vendor_request_id, cost_usd_micros, cost_source, cap_usage_after_usd_micros, policy_revision) \
         SELECT 'row-' || g, {time}, 40, 'shop/key-' || (g % 50), 'agent-' || (g % 20), 'run-' || (g / 200), 'shop', 'pod-' || (g % 30), 'stripe', 'charges.create', 'POST', '/v1/charges', \
         CASE WHEN g % 10 = 0 THEN 'daily_cap' WHEN g % 25 = 1 THEN 'rate_limited' ELSE 'allow' END, NULL, 'cus_' || (g % 2000), 200, NULL, g % 1000, 'parsed', NULL, 3 FROM series"
    )
}

/// Realistic parameters: a 30-minute or one-hour window at the end of the data, one run.
fn params(query: &Query) -> Vec<Param> {
    let hour_ago: Param = minutes_before_t0(60).into();
    let now: Param = t0().into();
    match query.params.len() {
        1 => vec!["run-900".into()],
        2 if query.params[0].starts_with("$1 vault_key_id") => {
            vec!["shop/key-7".into(), minutes_before_t0(30).into()]
        }
        2 => vec![hour_ago, now],
        n => panic!("{}: no parameters for {n} placeholders", query.title),
    }
}

async fn rows(sink: &AnySink, sql: &str, params: &[Param]) -> Vec<Vec<Value>> {
    match sink {
        AnySink::Sqlite(s) => s.query(sql, params).await.unwrap(),
        AnySink::Postgres(s) => s.query(sql, params).await.unwrap(),
        AnySink::Stdout(_) => unreachable!(),
    }
}

#[tokio::test]
async fn sqlite_serves_every_playbook_query_from_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let config: SinkConfig = format!("sqlite://{}", dir.path().join("audit.db").display())
        .parse()
        .unwrap();
    let sink = AnySink::open(&config).await.unwrap();
    let series = format!(
        "WITH RECURSIVE series(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM series WHERE g < {TABLE_ROWS})"
    );
    let time = format!(
        "strftime('%Y-%m-%dT%H:%M:%S', '{}', '-' || ({TABLE_ROWS} - g) || ' seconds') || '.000000Z'",
        t0().strftime("%Y-%m-%d %H:%M:%S")
    );
    rows(&sink, &fill_sql(&series, &time), &[]).await;
    // What `PRAGMA optimize` (or an operator's ANALYZE) leaves for the planner.
    rows(&sink, "ANALYZE", &[]).await;
    assert_eq!(
        rows(&sink, "SELECT COUNT(*) FROM agent_call_audit", &[]).await[0][0],
        Value::Int(TABLE_ROWS)
    );

    for query in queries::ALL {
        let plan: Vec<String> = rows(
            &sink,
            &format!("EXPLAIN QUERY PLAN {}", query.sql),
            &params(&query),
        )
        .await
        .into_iter()
        .map(|r| r[3].as_str().unwrap().to_owned())
        .collect();
        eprintln!("SQLite, {}:\n  {}", query.title, plan.join("\n  "));
        let table_steps: Vec<&String> = plan
            .iter()
            .filter(|step| step.contains("agent_call_audit"))
            .collect();
        assert!(!table_steps.is_empty(), "{}: {plan:?}", query.title);
        for step in table_steps {
            assert!(
                step.contains(" USING INDEX agent_call_audit_")
                    || step.contains(" USING COVERING INDEX agent_call_audit_"),
                "{}: reads the table without an index: {step:?}",
                query.title
            );
        }
    }
}

#[tokio::test]
async fn postgres_serves_every_playbook_query_from_an_index() {
    let url = fresh_postgres_database("plans").await;
    let sink = AnySink::open(&url.parse().unwrap()).await.unwrap();
    let series = format!("WITH series(g) AS (SELECT generate_series(1, {TABLE_ROWS}))");
    let time = format!(
        "TIMESTAMPTZ '{}' - ({TABLE_ROWS} - g) * INTERVAL '1 second'",
        t0()
    );
    rows(&sink, &fill_sql(&series, &time), &[]).await;
    // What autovacuum does to an append-mostly table: statistics, and BRIN ranges summarized.
    rows(&sink, "VACUUM ANALYZE agent_call_audit", &[]).await;

    for query in queries::ALL {
        // enable_seqscan stays on: the planner is free to pick a scan if it is cheaper.
        let plan: Vec<String> = rows(&sink, &format!("EXPLAIN {}", query.sql), &params(&query))
            .await
            .into_iter()
            .map(|r| r[0].as_str().unwrap().to_owned())
            .collect();
        eprintln!("PostgreSQL, {}:\n  {}", query.title, plan.join("\n  "));
        let text = plan.join("\n");
        assert!(
            !text.contains("Seq Scan on agent_call_audit"),
            "{}: scans the table:\n{text}",
            query.title
        );
        assert!(
            text.contains("Index") && text.contains("agent_call_audit_"),
            "{}: no agent_call_audit index in the plan:\n{text}",
            query.title
        );
    }
}
