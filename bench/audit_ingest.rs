//! Audit sink throughput: rows/s written by the SQLite sink (WAL, one transaction per batch) and
//! the PostgreSQL sink (binary COPY into a staging table + INSERT ... ON CONFLICT DO NOTHING),
//! plus the controller's ingest path (NDJSON parse + SQLite write). Not part of `make test`.
//!
//!   scripts/with-postgres.sh cargo bench -p keybrake-audit --bench audit_ingest
//!
//! Env: AUDIT_BENCH_ROWS (default 200000), AUDIT_BENCH_BATCH (default 5000),
//! AUDIT_BENCH_RUNS (default 3). PostgreSQL comes from KEYBRAKE_TEST_POSTGRES_URL (required).
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

/// Realistic rows: ~60% allowed with a cost, the rest spread over denials.
fn rows(run: &str, n: usize) -> Vec<AuditRow> {
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
                id: format!("{run}-{i:010}-4f1c-9a7e-2b3c4d5e6f70"),
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

fn report(name: &str, n: usize, batch: usize, runs: &mut [Duration]) {
    runs.sort();
    let rate = |d: &Duration| n as f64 / d.as_secs_f64();
    let median = rate(&runs[runs.len() / 2]);
    let all: Vec<String> = runs.iter().map(|d| format!("{:.0}", rate(d))).collect();
    println!(
        "| {name} | {n} | {batch} | {median:.0} | {} |",
        all.join(", ")
    );
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

    println!("| sink | rows | batch | median rows/s | each run rows/s |");
    println!("| --- | ---: | ---: | ---: | --- |");

    let mut times = Vec::new();
    for run in 0..runs {
        let sink = SqliteSink::open(dir.path().join(format!("bench-{run}.db"))).await?;
        times.push(write_all(&sink, &rows(&format!("s{run}"), n), batch).await?);
    }
    report("SQLite (WAL, synchronous=NORMAL)", n, batch, &mut times);

    let mut times = Vec::new();
    for run in 0..runs {
        let sink = SqliteSink::open(dir.path().join(format!("ingest-{run}.db"))).await?;
        let mut body = Vec::new();
        for row in rows(&format!("i{run}"), n) {
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
    report("ingest NDJSON -> SQLite", n, batch, &mut times);

    let pg_db = fresh_database(&pg_url, "kb_audit_bench").await?;
    let sink = PostgresSink::connect(&pg_db).await?;
    let mut times = Vec::new();
    for run in 0..runs {
        times.push(write_all(&sink, &rows(&format!("p{run}"), n), batch).await?);
    }
    report("PostgreSQL (binary COPY, 5 indexes)", n, batch, &mut times);

    // Baseline in the same run: the same sink and table with only the primary key, to show
    // what the playbook's four secondary indexes cost.
    let bare_db = fresh_database(&pg_url, "kb_audit_bench_bare").await?;
    let bare = PostgresSink::connect(&bare_db).await?;
    let (client, connection) = tokio_postgres::connect(&bare_db, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(
            "DROP INDEX agent_call_audit_key_time, agent_call_audit_run_time, \
             agent_call_audit_customer, agent_call_audit_denials",
        )
        .await?;
    let mut times = Vec::new();
    for run in 0..runs {
        times.push(write_all(&bare, &rows(&format!("b{run}"), n), batch).await?);
    }
    report(
        "baseline: PostgreSQL COPY, primary key only",
        n,
        batch,
        &mut times,
    );
    Ok(())
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
    let (prefix, _) = admin_url
        .rsplit_once('/')
        .context("postgres URL without a database path")?;
    Ok(format!("{prefix}/{db}"))
}
