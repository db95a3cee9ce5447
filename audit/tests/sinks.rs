//! Both SQL sinks for real: SQLite in a temp dir, PostgreSQL from scripts/with-postgres.sh.
//! Every documented query runs against known data on both and must give the same answer.
mod common;

use common::*;
use keybrake_audit::{
    AnySink, AuditSink, SinkConfig, WriteOutcome,
    queries::{self, Param},
    row::Value,
    schema,
};

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn column(rows: &[Vec<Value>], index: usize) -> Vec<Value> {
    rows.iter().map(|r| r[index].clone()).collect()
}

async fn open_sqlite(dir: &tempfile::TempDir) -> AnySink {
    let config: SinkConfig = format!("sqlite://{}", dir.path().join("audit.db").display())
        .parse()
        .unwrap();
    AnySink::open(&config).await.unwrap()
}

async fn open_postgres(name: &str) -> AnySink {
    let url = fresh_postgres_database(name).await;
    AnySink::open(&url.parse().unwrap()).await.unwrap()
}

async fn count(sink: &AnySink, sql: &str) -> i64 {
    let rows = match sink {
        AnySink::Sqlite(s) => s.query(sql, &[]).await.unwrap(),
        AnySink::Postgres(s) => s.query(sql, &[]).await.unwrap(),
        AnySink::Stdout(_) => unreachable!(),
    };
    rows[0][0].as_i64().unwrap()
}

async fn check_playbook(sink: &AnySink) {
    let outcome = sink.write_batch(&playbook_rows()).await.unwrap();
    assert_eq!(
        outcome,
        WriteOutcome {
            inserted: 11,
            duplicates: 0
        }
    );
    let since_60: Param = minutes_before_t0(60).into();
    let until: Param = t0().into();

    let rows = sink
        .query(
            &queries::KEY_RECENT_CALLS,
            &["shop/stripe".into(), minutes_before_t0(30).into()],
        )
        .await
        .unwrap();
    assert_eq!(
        column(&rows, 1),
        ["r02", "r09", "r03", "r07", "r05", "r11"].map(text)
    );
    assert_eq!(rows[0][0], text("2026-11-30T01:40:00.000000Z"));
    assert_eq!(rows[0][3], text("run-A"));
    assert_eq!(rows[2][5], text("daily_cap"));
    assert_eq!(
        rows[2][7],
        Value::Int(0),
        "a denied call was never forwarded"
    );
    assert_eq!(
        column(&rows, 8),
        [
            text("12.345678"),
            text("0.500000"),
            Value::Null,
            Value::Null,
            text("250.000000"),
            text("0.000007")
        ]
    );

    let rows = sink
        .query(
            &queries::COST_BY_CUSTOMER,
            &[since_60.clone(), until.clone()],
        )
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            vec![text("cus_3"), Value::Int(3), text("250.000000")],
            vec![text("cus_1"), Value::Int(3), text("13.845678")],
            vec![Value::Null, Value::Int(1), text("0.002000")],
            vec![text("cus_2"), Value::Int(2), text("0.000150")],
            vec![text("cus_4"), Value::Int(1), text("-5.250000")],
        ]
    );

    let rows = sink
        .query(&queries::ALLOWED_CALLS, &[since_60.clone(), until.clone()])
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            vec![text("shop/openai"), Value::Int(1)],
            vec![text("shop/resend"), Value::Int(1)],
            vec![text("shop/stripe"), Value::Int(5)],
        ]
    );

    let rows = sink
        .query(&queries::RUN_TIMELINE, &["run-A".into()])
        .await
        .unwrap();
    assert_eq!(
        column(&rows, 1),
        ["r01", "r02", "r09", "r03", "r04", "r11"].map(text)
    );
    assert_eq!(rows[4][3], text("openai"));
    assert_eq!(
        column(&rows, 12),
        [
            text("1.000000"),
            text("12.345678"),
            text("0.500000"),
            Value::Null,
            text("0.000150"),
            text("0.000007")
        ]
    );
    assert_eq!(rows[3][13], text("none"));
    assert_eq!(rows[0][14], text("1.000000"));

    let rows = sink
        .query(&queries::DENIALS_BY_VERDICT, &[since_60, until])
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            vec![text("daily_cap"), Value::Int(2)],
            vec![text("rate_limited"), Value::Int(1)],
        ]
    );
}

async fn check_duplicates_ignored(sink: &AnySink) {
    let rows = playbook_rows();
    sink.write_batch(&rows).await.unwrap();
    let again = sink.write_batch(&rows).await.unwrap();
    assert_eq!(
        again,
        WriteOutcome {
            inserted: 0,
            duplicates: 11
        }
    );
    let fresh = row("dup-1", t0());
    let mixed = vec![fresh.clone(), rows[0].clone(), fresh];
    let outcome = sink.write_batch(&mixed).await.unwrap();
    assert_eq!(
        outcome,
        WriteOutcome {
            inserted: 1,
            duplicates: 2
        }
    );
    assert_eq!(
        count(sink, "SELECT COUNT(*) FROM agent_call_audit").await,
        12
    );
}

/// Exact dollars text, as both engines must return DESIGN.md's dollar columns.
fn dollars(micros: i64) -> Value {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    text(&format!("{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000))
}

/// DESIGN.md's `cost_usd_parsed` / `cap_usage_after_usd`, read with the plain SELECT a user
/// following DESIGN.md would type, equal the micro-dollar columns exactly (NULL stays NULL).
async fn check_design_dollar_columns(sink: &AnySink) {
    let mut rows = playbook_rows();
    let mut big = row("r99-big", t0());
    big.cost_usd_parsed = Some(keybrake_api::Usd::from_micros(i64::MAX));
    big.cap_usage_after_usd = None;
    rows.push(big);
    sink.write_batch(&rows).await.unwrap();
    // A replayed batch takes the staging path, which must leave the generated columns alone.
    sink.write_batch(&rows[..2]).await.unwrap();
    let sql = "SELECT id, cost_usd_parsed, cap_usage_after_usd FROM agent_call_audit ORDER BY id";
    assert!(
        include_str!("../../docs/audit.md").contains(sql),
        "docs/audit.md shows this query"
    );
    let stored = match sink {
        AnySink::Sqlite(s) => s.query(sql, &[]).await.unwrap(),
        AnySink::Postgres(s) => s.query(sql, &[]).await.unwrap(),
        AnySink::Stdout(_) => unreachable!(),
    };
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    let expected: Vec<Vec<Value>> = rows
        .iter()
        .map(|r| {
            let usd = |u: Option<keybrake_api::Usd>| u.map_or(Value::Null, |u| dollars(u.micros()));
            vec![
                text(&r.id),
                usd(r.cost_usd_parsed),
                usd(r.cap_usage_after_usd),
            ]
        })
        .collect();
    assert_eq!(stored, expected);
    assert!(
        expected.iter().any(|r| r[1] == text("-5.250000")),
        "the data covers a negative amount"
    );
    assert!(expected.iter().any(|r| r[1] == text("0.000007")));
    assert!(expected.iter().any(|r| r[1] == Value::Null));
}

const COUNT_INDEXES_SQLITE: &str =
    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name LIKE 'agent_call_audit_%'";
const COUNT_INDEXES_PG: &str = "SELECT COUNT(*) FROM pg_indexes WHERE indexname LIKE 'agent_call_audit_%' AND indexname <> 'agent_call_audit_pkey'";

#[tokio::test]
async fn sqlite_playbook_queries() {
    let dir = tempfile::tempdir().unwrap();
    check_playbook(&open_sqlite(&dir).await).await;
}

#[tokio::test]
async fn postgres_playbook_queries() {
    check_playbook(&open_postgres("playbook").await).await;
}

#[tokio::test]
async fn sqlite_ignores_duplicate_ids() {
    let dir = tempfile::tempdir().unwrap();
    check_duplicates_ignored(&open_sqlite(&dir).await).await;
}

#[tokio::test]
async fn postgres_ignores_duplicate_ids() {
    check_duplicates_ignored(&open_postgres("duplicates").await).await;
}

#[tokio::test]
async fn sqlite_has_design_dollar_columns() {
    let dir = tempfile::tempdir().unwrap();
    check_design_dollar_columns(&open_sqlite(&dir).await).await;
}

#[tokio::test]
async fn postgres_has_design_dollar_columns() {
    let sink = open_postgres("dollars").await;
    check_design_dollar_columns(&sink).await;
    let AnySink::Postgres(s) = &sink else {
        unreachable!()
    };
    // NUMERIC on PostgreSQL: sums stay exact.
    let sum = s
        .query(
            "SELECT SUM(cost_usd_parsed), CAST(SUM(cost_usd_micros) AS TEXT) FROM agent_call_audit WHERE id <> 'r99-big'",
            &[],
        )
        .await
        .unwrap();
    let micros: i64 = sum[0][1].as_str().unwrap().parse().unwrap();
    assert_eq!(sum[0][0], dollars(micros));
}

#[tokio::test]
async fn sqlite_migrations_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let first = open_sqlite(&dir).await;
    first.write_batch(&playbook_rows()).await.unwrap();
    drop(first);
    let sink = open_sqlite(&dir).await; // applies migrations at start again
    let AnySink::Sqlite(s) = &sink else {
        unreachable!()
    };
    assert_eq!(s.migrate().await.unwrap(), 0);
    assert_eq!(
        count(&sink, "SELECT COUNT(*) FROM schema_migrations").await,
        schema::MIGRATIONS.len() as i64
    );
    assert_eq!(count(&sink, COUNT_INDEXES_SQLITE).await, 5);
    assert_eq!(
        count(&sink, "SELECT COUNT(*) FROM agent_call_audit").await,
        11
    );
    let mode = s.query("PRAGMA journal_mode", &[]).await.unwrap();
    assert_eq!(mode[0][0], text("wal"));
}

#[tokio::test]
async fn postgres_migrations_are_idempotent() {
    let url = fresh_postgres_database("migrations").await;
    let config: SinkConfig = url.parse().unwrap();
    let first = AnySink::open(&config).await.unwrap();
    first.write_batch(&playbook_rows()).await.unwrap();
    // Two more processes starting at once: the advisory lock serialises them.
    let (a, b) = tokio::join!(AnySink::open(&config), AnySink::open(&config));
    let (a, _b) = (a.unwrap(), b.unwrap());
    let AnySink::Postgres(s) = &a else {
        unreachable!()
    };
    assert_eq!(s.migrate().await.unwrap(), 0);
    assert_eq!(
        count(&a, "SELECT COUNT(*) FROM schema_migrations").await,
        schema::MIGRATIONS.len() as i64
    );
    assert_eq!(count(&a, COUNT_INDEXES_PG).await, 5);
    assert_eq!(count(&a, "SELECT COUNT(*) FROM agent_call_audit").await, 11);
    let partial = s
        .query(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'agent_call_audit_denials'",
            &[],
        )
        .await
        .unwrap();
    assert!(
        partial[0][0]
            .as_str()
            .unwrap()
            .contains("WHERE (policy_verdict <> 'allow'::text)"),
        "{partial:?}"
    );
}

#[tokio::test]
async fn a_postgres_server_error_shows_the_servers_message() {
    let url = fresh_postgres_database("server_error").await;
    let sink = AnySink::open(&url.parse().unwrap()).await.unwrap();
    let AnySink::Postgres(s) = &sink else {
        unreachable!()
    };
    let error = s
        .query("SELECT no_such_column FROM agent_call_audit", &[])
        .await
        .unwrap_err();
    // tokio-postgres alone prints "db error"; a log line needs the server's reason.
    let shown = error.to_string();
    assert!(
        shown.contains("no_such_column") && shown.contains("does not exist"),
        "{shown}"
    );
}

#[tokio::test]
async fn postgres_survives_a_dropped_connection() {
    let url = fresh_postgres_database("reconnect").await;
    let sink = AnySink::open(&url.parse().unwrap()).await.unwrap();
    let AnySink::Postgres(s) = &sink else {
        unreachable!()
    };
    sink.write_batch(&numbered_rows(0..10)).await.unwrap();
    // Kill our own backend: the next write fails, the one after reconnects.
    let killed = s
        .query("SELECT pg_terminate_backend(pg_backend_pid())::text", &[])
        .await;
    assert!(
        killed.is_err(),
        "terminating our own backend ends the query"
    );
    let mut outcome = None;
    for _ in 0..2 {
        if let Ok(o) = sink.write_batch(&numbered_rows(5..20)).await {
            outcome = Some(o);
            break;
        }
    }
    assert_eq!(
        outcome,
        Some(WriteOutcome {
            inserted: 10,
            duplicates: 5
        })
    );
}

/// A large batch is split across the sink's connections, one transaction each; a replay that
/// overlaps both parts still stores every row exactly once.
#[tokio::test]
async fn postgres_splits_large_batches_and_stays_exactly_once() {
    use keybrake_audit::sink::postgres::{PostgresSink, SPLIT_MIN_ROWS};
    let url = fresh_postgres_database("split").await;
    let sink = PostgresSink::connect_with(&url, 2).await.unwrap();
    let first = numbered_rows(0..SPLIT_MIN_ROWS * 2);
    assert_eq!(
        sink.write_batch(&first).await.unwrap(),
        WriteOutcome {
            inserted: first.len() as u64,
            duplicates: 0
        }
    );
    // Overlaps the tail of the first batch: its first half is all duplicates, its second half
    // all new.
    let replay = numbered_rows(SPLIT_MIN_ROWS..SPLIT_MIN_ROWS * 3);
    assert_eq!(
        sink.write_batch(&replay).await.unwrap(),
        WriteOutcome {
            inserted: SPLIT_MIN_ROWS as u64,
            duplicates: SPLIT_MIN_ROWS as u64
        }
    );
    let stored = sink
        .query(
            "SELECT CAST(COUNT(*) AS BIGINT), CAST(COUNT(DISTINCT id) AS BIGINT) FROM agent_call_audit",
            &[],
        )
        .await
        .unwrap();
    let expected = Value::Int(SPLIT_MIN_ROWS as i64 * 3);
    assert_eq!(stored[0], vec![expected.clone(), expected]);
    let connections = sink
        .query(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        connections[0][0],
        Value::Int(2),
        "two connections to write with"
    );
}

#[tokio::test]
async fn json_lines_sink_writes_one_row_per_line() {
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let sink = keybrake_audit::sink::JsonLinesSink::new(Box::new(buffer.clone()));
    // Negative amounts (r10) are left out: `Usd` refuses to parse them back.
    let rows: Vec<_> = playbook_rows()
        .into_iter()
        .filter(|r| r.cost_usd_parsed.is_none_or(|c| c.micros() >= 0))
        .collect();
    sink.write_batch(&rows).await.unwrap();
    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let parsed: Vec<keybrake_api::audit::AuditRow> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(parsed, rows);
}
