//! SQLite sink: the embedded default. WAL journal, one transaction per batch, all work on tokio's
//! blocking pool so the async runtime never waits on disk.
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use keybrake_api::audit::AuditRow;
use rusqlite::{Connection, OptionalExtension, params_from_iter, types::ValueRef};

use super::{AuditSink, SinkError, WriteOutcome};
use crate::{
    queries::Param,
    row::{Value, cap_usage_micros, cost_micros, timestamp_text},
    schema,
};

const INSERT: &str = "INSERT INTO agent_call_audit (id, started_at, duration_ms, vault_key_id, agent_name, agent_run_id, namespace, pod, vendor, operation, method, path_template, policy_verdict, verdict_reason, customer_scope_id, vendor_status, vendor_request_id, cost_usd_micros, cost_source, cap_usage_after_usd_micros, policy_revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21) ON CONFLICT (id) DO NOTHING";

#[derive(Clone)]
pub struct SqliteSink {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteSink {
    /// Opens (creating if needed) the database file, switches it to WAL and applies migrations.
    pub async fn open(path: PathBuf) -> Result<SqliteSink, SinkError> {
        let conn = run_blocking(move || {
            let mut conn = Connection::open(&path)?;
            configure(&conn)?;
            migrate(&mut conn)?;
            Ok(conn)
        })
        .await?;
        Ok(SqliteSink {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Applies pending migrations again (a no-op when up to date); returns how many ran.
    pub async fn migrate(&self) -> Result<usize, SinkError> {
        let conn = self.conn.clone();
        run_blocking(move || migrate(&mut *lock(&conn)?)).await
    }

    /// Runs one SQL query with `$n` parameters; timestamps come back as stored text.
    pub async fn query(&self, sql: &str, params: &[Param]) -> Result<Vec<Vec<Value>>, SinkError> {
        let conn = self.conn.clone();
        let sql = sql.to_owned();
        let bound: Vec<String> = params
            .iter()
            .map(|p| match p {
                Param::Text(s) => s.clone(),
                Param::Time(t) => timestamp_text(*t),
            })
            .collect();
        run_blocking(move || {
            let conn = lock(&conn)?;
            let mut stmt = conn.prepare(&sql)?;
            let width = stmt.column_count();
            let mut rows = stmt.query(params_from_iter(bound.iter()))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let mut cells = Vec::with_capacity(width);
                for i in 0..width {
                    cells.push(match row.get_ref(i)? {
                        ValueRef::Null => Value::Null,
                        ValueRef::Integer(n) => Value::Int(n),
                        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                        other => {
                            return Err(SinkError::ColumnType {
                                column: row.as_ref().column_name(i)?.to_owned(),
                                type_name: format!("{:?}", other.data_type()),
                            });
                        }
                    });
                }
                out.push(cells);
            }
            Ok(out)
        })
        .await
    }
}

impl AuditSink for SqliteSink {
    async fn write_batch(&self, rows: &[AuditRow]) -> Result<WriteOutcome, SinkError> {
        if rows.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let conn = self.conn.clone();
        let rows = rows.to_vec();
        run_blocking(move || {
            let mut conn = lock(&conn)?;
            let tx = conn.transaction()?;
            let mut outcome = WriteOutcome::default();
            {
                let mut insert = tx.prepare_cached(INSERT)?;
                for row in &rows {
                    let changed = insert.execute(rusqlite::params![
                        row.id,
                        timestamp_text(row.started_at),
                        row.duration_ms,
                        row.vault_key_id,
                        row.agent_name,
                        row.agent_run_id,
                        row.namespace,
                        row.pod,
                        row.vendor.as_str(),
                        row.operation,
                        row.method,
                        row.path_template,
                        row.policy_verdict.as_str(),
                        row.verdict_reason,
                        row.customer_scope_id,
                        row.vendor_status,
                        row.vendor_request_id,
                        cost_micros(row),
                        row.cost_source.as_str(),
                        cap_usage_micros(row),
                        row.policy_revision,
                    ])?;
                    if changed == 1 {
                        outcome.inserted += 1;
                    } else {
                        outcome.duplicates += 1;
                    }
                }
            }
            tx.commit()?;
            Ok(outcome)
        })
        .await
    }
}

fn configure(conn: &Connection) -> Result<(), SinkError> {
    // WAL: readers (the 2am queries) never block the writer. synchronous=NORMAL in WAL mode keeps
    // committed batches across a process crash; only a power loss can drop the last commits.
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "sqlite audit sink could not switch to WAL");
    }
    conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;")?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<usize, SinkError> {
    // BEGIN IMMEDIATE takes the write lock first, so two processes starting together apply each
    // migration once.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute(schema::CREATE_SCHEMA_MIGRATIONS, [])?;
    let applied: Vec<i64> = {
        let mut stmt = tx.prepare("SELECT version FROM schema_migrations")?;
        stmt.query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?
    };
    let mut ran = 0;
    for migration in schema::pending(&applied) {
        for statement in schema::statements(migration, schema::Dialect::Sqlite) {
            tx.execute(statement, [])?;
        }
        let already: Option<i64> = tx
            .query_row(
                "SELECT version FROM schema_migrations WHERE version = ?1",
                [migration.version],
                |r| r.get(0),
            )
            .optional()?;
        if already.is_none() {
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![
                    migration.version,
                    migration.name,
                    timestamp_text(jiff::Timestamp::now())
                ],
            )?;
        }
        ran += 1;
    }
    tx.commit()?;
    Ok(ran)
}

fn lock(conn: &Mutex<Connection>) -> Result<std::sync::MutexGuard<'_, Connection>, SinkError> {
    conn.lock()
        .map_err(|_| SinkError::Worker("sqlite connection mutex poisoned".into()))
}

async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SinkError> + Send + 'static,
) -> Result<T, SinkError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| SinkError::Worker(e.to_string()))?
}
