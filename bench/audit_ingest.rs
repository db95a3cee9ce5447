//! Audit sink throughput: rows/s written by the SQLite sink (WAL, one transaction per batch) and
//! the PostgreSQL sink (binary COPY, each batch split over its connections), plus the
//! controller's ingest path (NDJSON parse + SQLite write). Row ids are what the sidecar
//! generates (UUIDv7, `keybrake_audit::row::new_row_id`); one line shows UUIDv4 ids for
//! comparison. Not part of `make test`.
//!
//!   scripts/with-postgres.sh cargo bench -p keybrake-audit --bench audit_ingest
//!
//! Env: AUDIT_BENCH_ROWS (default 200000), AUDIT_BENCH_BATCH (default 5000),
//! AUDIT_BENCH_RUNS (default 3), AUDIT_BENCH_PG_CONNECTIONS (default: the sink's default, 2).
//! PostgreSQL comes from KEYBRAKE_TEST_POSTGRES_URL (required).
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jiff::{SignedDuration, Timestamp};
use keybrake_api::{
    Usd, Vendor, Verdict,
    audit::{AuditRow, CostSource},
};
use keybrake_audit::{
    AuditSink,
    ingest::{IngestLimits, ingest_ndjson},
    sink::{PostgresSink, SqliteSink},
};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy)]
enum Ids {
    /// What the sidecar generates: time-ordered.
    UuidV7,
    /// Random, as the sidecar generated before: every insert lands at a random leaf of the
    /// primary-key index.
    UuidV4,
}

fn uuid_v4() -> String {
    let b: u128 =
        (rand::random::<u128>() & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let hex = format!("{b:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Realistic rows: ~60% allowed with a cost, the rest spread over denials.
fn rows(n: usize) -> Vec<AuditRow> {
    rows_with(n, Ids::UuidV7)
}

/// Fresh rows (fresh ids) for each run.
fn rows_with(n: usize, ids: Ids) -> Vec<AuditRow> {
    let t0: Timestamp = "2026-11-30T02:00:00Z".parse().unwrap();
    (0..n)
        .map(|i| {
            let verdict = if i % 5 < 3 {
                Verdict::Allow
            } else {
                Verdict::ALL[1 + i % (Verdict::ALL.len() - 1)]
            };
            let allowed = verdict.is_allow();
            AuditRow {
                id: match ids {
                    Ids::UuidV7 => keybrake_audit::row::new_row_id(),
                    Ids::UuidV4 => uuid_v4(),
                },
                started_at: t0 + SignedDuration::from_micros(i as i64 * 937),
                duration_ms: (i % 700) as i64,
                vault_key_id: Some(format!("shop-{}/stripe-refunds", i % 50)),
                agent_name: Some("refund-agent".into()),
                agent_run_id: Some(format!("run-{}", i / 200)),
                namespace: Some(format!("shop-{}", i % 50)),
                pod: Some(format!("refund-agent-7d9f8c6b5-{:05}", i % 97)),
                vendor: Vendor::ALL[i % 4],
                operation: Some("refunds.create".into()),
                method: "POST".into(),
                path_template: Some("/v1/refunds".into()),
                policy_verdict: verdict,
                verdict_reason: (!allowed).then(|| format!("{verdict}: limit reached")),
                customer_scope_id: Some(format!("cus_{:014}", i % 5000)),
                vendor_status: if allowed { 200 } else { 0 },
                vendor_request_id: allowed.then(|| format!("req_{i:016}")),
                cost_usd_parsed: allowed.then(|| Usd::from_micros((i as i64 % 100_000) * 137)),
                cost_source: if allowed {
                    CostSource::Parsed
                } else {
                    CostSource::None
                },
                cap_usage_after_usd: Some(Usd::from_micros(i as i64 * 1000)),
                policy_revision: 42,
            }
        })
        .collect()
}

async fn write_all<S: AuditSink>(
    sink: &S,
    rows: &[AuditRow],
    batch: usize,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut inserted = 0;
    for chunk in rows.chunks(batch) {
        inserted += sink.write_batch(chunk).await?.inserted;
    }
    let elapsed = start.elapsed();
    if inserted != rows.len() as u64 {
        bail!("inserted {inserted} of {} rows", rows.len());
    }
    Ok(elapsed)
}

/// One table line: its median rows/s, and the line with `{ratio}` left to fill in.
struct Line {
    median: f64,
    text: String,
}

fn report(name: &str, n: usize, batch: usize, runs: &mut [Duration]) -> Line {
    runs.sort();
    let rate = |d: &Duration| n as f64 / d.as_secs_f64();
    let median = rate(&runs[runs.len() / 2]);
    let all: Vec<String> = runs.iter().map(|d| format!("{:.0}", rate(d))).collect();
    Line {
        median,
        text: format!(
            "| {name} | {n} | {batch} | {median:.0} | {{ratio}} | {} |",
            all.join(", ")
        ),
    }
}

fn print_line(line: &Line, baseline: Option<f64>) {
    let ratio = baseline.map_or("—".to_owned(), |b| format!("{:.2}", line.median / b));
    println!("{}", line.text.replace("{ratio}", &ratio));
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = env_usize("AUDIT_BENCH_ROWS", 200_000);
    let batch = env_usize("AUDIT_BENCH_BATCH", 5_000);
    let runs = env_usize("AUDIT_BENCH_RUNS", 3).max(1);
    let pg_url = std::env::var("KEYBRAKE_TEST_POSTGRES_URL").context(
        "KEYBRAKE_TEST_POSTGRES_URL is not set: run \
         `scripts/with-postgres.sh cargo bench -p keybrake-audit --bench audit_ingest`",
    )?;
    let dir = tempfile::tempdir()?;

    println!("| sink | rows | batch | median rows/s | ÷ PK-only baseline | each run rows/s |");
    println!("| --- | ---: | ---: | ---: | ---: | --- |");

    let mut times = Vec::new();
    for run in 0..runs {
        let sink = SqliteSink::open(dir.path().join(format!("bench-{run}.db"))).await?;
        times.push(write_all(&sink, &rows(n), batch).await?);
    }
    print_line(
        &report("SQLite (WAL, synchronous=NORMAL)", n, batch, &mut times),
        None,
    );

    let mut times = Vec::new();
    for run in 0..runs {
        let sink = SqliteSink::open(dir.path().join(format!("ingest-{run}.db"))).await?;
        let mut body = Vec::new();
        for row in rows(n) {
            serde_json::to_writer(&mut body, &row)?;
            body.push(b'\n');
        }
        let limits = IngestLimits {
            max_body_bytes: usize::MAX,
            batch_rows: batch,
            ..IngestLimits::default()
        };
        let start = Instant::now();
        let report = ingest_ndjson(&sink, &body, &limits).await?;
        times.push(start.elapsed());
        if report.inserted != n as u64 {
            bail!("ingest inserted {} of {n}", report.inserted);
        }
    }
    print_line(
        &report("ingest NDJSON -> SQLite", n, batch, &mut times),
        None,
    );

    let connections = env_usize("AUDIT_BENCH_PG_CONNECTIONS", PG_DEFAULT_CONNECTIONS).max(1);
    let all_indexes = format!(
        "PostgreSQL (binary COPY, {connections} connections, 6 indexes: PK, 4 B-tree, 1 BRIN)"
    );
    let two = pg_line(
        &pg_url,
        "kb_audit_bench",
        &all_indexes,
        connections,
        Ids::UuidV7,
        false,
        n,
        batch,
        runs,
    )
    .await?;
    let one = pg_line(
        &pg_url,
        "kb_audit_bench_one",
        "PostgreSQL (binary COPY, 1 connection, 6 indexes: PK, 4 B-tree, 1 BRIN)",
        1,
        Ids::UuidV7,
        false,
        n,
        batch,
        runs,
    )
    .await?;
    let v4 = pg_line(
        &pg_url,
        "kb_audit_bench_v4",
        &format!("PostgreSQL (binary COPY, {connections} connections, 6 indexes: PK, 4 B-tree, 1 BRIN), UUIDv4 ids"),
        connections,
        Ids::UuidV4,
        false,
        n,
        batch,
        runs,
    )
    .await?;
    // Baseline in the same run: the same sink and table with only the primary key, to show
    // what the playbook's five secondary indexes cost.
    let bare = pg_line(
        &pg_url,
        "kb_audit_bench_bare",
        &format!("baseline: PostgreSQL COPY, {connections} connections, primary key only"),
        connections,
        Ids::UuidV7,
        true,
        n,
        batch,
        runs,
    )
    .await?;
    for line in [&two, &one, &v4] {
        print_line(line, Some(bare.median));
    }
    print_line(&bare, Some(bare.median));
    Ok(())
}

const PG_DEFAULT_CONNECTIONS: usize = keybrake_audit::sink::postgres::DEFAULT_CONNECTIONS;

/// One table line: `runs` runs of `n` fresh rows into one fresh database.
#[allow(clippy::too_many_arguments)]
async fn pg_line(
    admin_url: &str,
    db: &str,
    name: &str,
    connections: usize,
    ids: Ids,
    primary_key_only: bool,
    n: usize,
    batch: usize,
    runs: usize,
) -> anyhow::Result<Line> {
    let url = fresh_database(admin_url, db).await?;
    let sink = PostgresSink::connect_with(&url, connections).await?;
    if primary_key_only {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client
            .batch_execute(
                "DROP INDEX agent_call_audit_key_time, agent_call_audit_run_time, \
                 agent_call_audit_customer, agent_call_audit_denials, agent_call_audit_time",
            )
            .await?;
    }
    let mut times = Vec::new();
    for _ in 0..runs {
        times.push(write_all(&sink, &rows_with(n, ids), batch).await?);
    }
    Ok(report(name, n, batch, &mut times))
}

async fn fresh_database(admin_url: &str, db: &str) -> anyhow::Result<String> {
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await?;
    client
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    // Keep the parameters (sslmode=disable from scripts/with-postgres.sh).
    let (path, query) = admin_url.split_once('?').unwrap_or((admin_url, ""));
    let (prefix, _) = path
        .rsplit_once('/')
        .context("postgres URL without a database path")?;
    Ok(match query {
        "" => format!("{prefix}/{db}"),
        query => format!("{prefix}/{db}?{query}"),
    })
}
