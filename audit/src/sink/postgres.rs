//! PostgreSQL sink. Each batch is one transaction:
//! - fast path: `COPY agent_call_audit ... FROM STDIN (FORMAT binary)` straight into the table;
//! - if that hits a duplicate id (a replay), the transaction is rolled back and the batch is
//!   copied into a per-connection temporary staging table, then merged with
//!   `INSERT ... SELECT ... ON CONFLICT (id) DO NOTHING`. Replays are rare, so the common case
//!   pays for COPY only; the rare one is still idempotent.
use std::time::SystemTime;

use futures::pin_mut;
use keybrake_api::audit::AuditRow;
use tokio::sync::Mutex;
use tokio_postgres::{
    Client, Config, NoTls,
    binary_copy::BinaryCopyInWriter,
    config::{Host, SslMode},
    error::SqlState,
    types::{ToSql, Type},
};

use super::{
    AuditSink, SinkError, WriteOutcome,
    pg_numeric::NumericText,
    pg_tls::{ClientCert, PgUrl, RootCerts, RustlsConnector},
};
use crate::{
    queries::Param,
    row::{Value, cap_usage_micros, cost_micros, timestamp_text},
    schema,
};

const STAGE: &str = "CREATE TEMP TABLE IF NOT EXISTS agent_call_audit_stage (LIKE agent_call_audit) ON COMMIT DELETE ROWS";
const COPY_DIRECT: &str = "COPY agent_call_audit (id, started_at, duration_ms, vault_key_id, agent_name, agent_run_id, namespace, pod, vendor, operation, method, path_template, policy_verdict, verdict_reason, customer_scope_id, vendor_status, vendor_request_id, cost_usd_micros, cost_source, cap_usage_after_usd_micros, policy_revision) FROM STDIN (FORMAT binary)";
const COPY_STAGE: &str = "COPY agent_call_audit_stage (id, started_at, duration_ms, vault_key_id, agent_name, agent_run_id, namespace, pod, vendor, operation, method, path_template, policy_verdict, verdict_reason, customer_scope_id, vendor_status, vendor_request_id, cost_usd_micros, cost_source, cap_usage_after_usd_micros, policy_revision) FROM STDIN (FORMAT binary)";
/// Explicit columns: the staging table copies the generated dollar columns as plain ones, and
/// PostgreSQL refuses values for generated columns.
const MERGE: &str = "INSERT INTO agent_call_audit (id, started_at, duration_ms, vault_key_id, agent_name, agent_run_id, namespace, pod, vendor, operation, method, path_template, policy_verdict, verdict_reason, customer_scope_id, vendor_status, vendor_request_id, cost_usd_micros, cost_source, cap_usage_after_usd_micros, policy_revision) SELECT id, started_at, duration_ms, vault_key_id, agent_name, agent_run_id, namespace, pod, vendor, operation, method, path_template, policy_verdict, verdict_reason, customer_scope_id, vendor_status, vendor_request_id, cost_usd_micros, cost_source, cap_usage_after_usd_micros, policy_revision FROM agent_call_audit_stage ON CONFLICT (id) DO NOTHING";
/// Serialises migrations when several controller replicas start at once.
const MIGRATION_LOCK_KEY: i64 = 0x6b62_6175_6469_7431; // "kbaudit1"

const COPY_TYPES: [Type; 21] = [
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT4,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
];

/// Connections a sink keeps by default. A PostgreSQL backend runs on one core and its B-tree
/// inserts are CPU-bound, so two connections let a batch use two cores.
pub const DEFAULT_CONNECTIONS: usize = 2;

/// Batches smaller than this go down one connection: splitting them costs more round trips
/// than the second core wins back.
pub const SPLIT_MIN_ROWS: usize = 1_000;

pub struct PostgresSink {
    target: Target,
    /// One slot per connection; `None` after a connection broke (the next use reconnects).
    clients: Vec<Mutex<Option<Client>>>,
}

impl PostgresSink {
    /// Connects [`DEFAULT_CONNECTIONS`] times, applies pending migrations and prepares the
    /// staging table.
    pub async fn connect(url: &str) -> Result<PostgresSink, SinkError> {
        PostgresSink::connect_with(url, DEFAULT_CONNECTIONS).await
    }

    /// Like [`PostgresSink::connect`] with `connections` connections (at least one). A batch
    /// of at least [`SPLIT_MIN_ROWS`] rows is split across them, one transaction per part;
    /// concurrent batches take different connections.
    pub async fn connect_with(url: &str, connections: usize) -> Result<PostgresSink, SinkError> {
        let target = Target::parse(url)?;
        let mut clients = Vec::with_capacity(connections.max(1));
        clients.push(Mutex::new(Some(open_client(&target, true).await?)));
        for _ in 1..connections.max(1) {
            clients.push(Mutex::new(Some(open_client(&target, false).await?)));
        }
        Ok(PostgresSink { target, clients })
    }

    /// Applies pending migrations again (a no-op when up to date); returns how many ran.
    pub async fn migrate(&self) -> Result<usize, SinkError> {
        let mut guard = self.clients[0].lock().await;
        let client = ensure(&mut guard, &self.target).await?;
        let result = migrate(client).await;
        forget_if_broken(&mut guard);
        result
    }

    /// Runs one SQL query with `$n` parameters; timestamps come back as
    /// [`crate::row::timestamp_text`].
    pub async fn query(&self, sql: &str, params: &[Param]) -> Result<Vec<Vec<Value>>, SinkError> {
        let bound: Vec<Box<dyn ToSql + Sync + Send>> = params
            .iter()
            .map(|p| -> Box<dyn ToSql + Sync + Send> {
                match p {
                    Param::Text(s) => Box::new(s.clone()),
                    Param::Time(t) => Box::new(SystemTime::from(*t)),
                }
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> = bound
            .iter()
            .map(|b| b.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let mut guard = self.clients[0].lock().await;
        let client = ensure(&mut guard, &self.target).await?;
        let result = client.query(sql, &refs).await;
        forget_if_broken(&mut guard);
        let rows = result?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut cells = Vec::with_capacity(row.len());
            for (i, column) in row.columns().iter().enumerate() {
                let ty = column.type_();
                let cell = if *ty == Type::TEXT || *ty == Type::VARCHAR || *ty == Type::NAME {
                    row.get::<_, Option<String>>(i).map(Value::Text)
                } else if *ty == Type::INT8 {
                    row.get::<_, Option<i64>>(i).map(Value::Int)
                } else if *ty == Type::INT4 {
                    row.get::<_, Option<i32>>(i).map(|n| Value::Int(n.into()))
                } else if *ty == Type::NUMERIC {
                    row.get::<_, Option<NumericText>>(i)
                        .map(|n| Value::Text(n.0))
                } else if *ty == Type::TIMESTAMPTZ {
                    row.get::<_, Option<SystemTime>>(i)
                        .map(|t| match jiff::Timestamp::try_from(t) {
                            Ok(ts) => Ok(Value::Text(timestamp_text(ts))),
                            Err(e) => Err(SinkError::Worker(e.to_string())),
                        })
                        .transpose()?
                } else {
                    return Err(SinkError::ColumnType {
                        column: column.name().to_owned(),
                        type_name: ty.name().to_owned(),
                    });
                };
                cells.push(cell.unwrap_or(Value::Null));
            }
            out.push(cells);
        }
        Ok(out)
    }
}

impl AuditSink for PostgresSink {
    async fn write_batch(&self, rows: &[AuditRow]) -> Result<WriteOutcome, SinkError> {
        if rows.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let parts = if rows.len() >= SPLIT_MIN_ROWS {
            self.clients.len()
        } else {
            1
        };
        let part_rows = rows.len().div_ceil(parts);
        // Each part commits on its own. If one fails the caller retries the whole batch, and
        // the parts that did commit come back as duplicates: still exactly once in the table.
        let outcomes = futures::future::join_all(rows.chunks(part_rows).enumerate().map(
            |(preferred, part)| async move {
                let mut guard = self.take_connection(preferred).await;
                let client = ensure(&mut guard, &self.target).await?;
                let result = copy_batch(client, part).await;
                forget_if_broken(&mut guard);
                result
            },
        ))
        .await;
        let mut total = WriteOutcome::default();
        for outcome in outcomes {
            total.add(outcome?);
        }
        Ok(total)
    }
}

impl PostgresSink {
    /// An idle connection if there is one (starting at `preferred`), else waits for `preferred`.
    async fn take_connection(
        &self,
        preferred: usize,
    ) -> tokio::sync::MutexGuard<'_, Option<Client>> {
        let n = self.clients.len();
        for offset in 0..n {
            if let Ok(guard) = self.clients[(preferred + offset) % n].try_lock() {
                return guard;
            }
        }
        self.clients[preferred % n].lock().await
    }
}

async fn copy_batch(client: &mut Client, rows: &[AuditRow]) -> Result<WriteOutcome, SinkError> {
    let tx = client.transaction().await?;
    match copy_rows(&tx, COPY_DIRECT, rows).await {
        Ok(()) => {
            tx.commit().await?;
            return Ok(WriteOutcome {
                inserted: rows.len() as u64,
                duplicates: 0,
            });
        }
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => tx.rollback().await?,
        Err(e) => return Err(e.into()),
    }
    let tx = client.transaction().await?;
    copy_rows(&tx, COPY_STAGE, rows).await?;
    let inserted = tx.execute(MERGE, &[]).await?;
    tx.commit().await?;
    Ok(WriteOutcome {
        inserted,
        duplicates: rows.len() as u64 - inserted,
    })
}

async fn copy_rows(
    tx: &tokio_postgres::Transaction<'_>,
    copy: &str,
    rows: &[AuditRow],
) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in(copy).await?;
    let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
    pin_mut!(writer);
    for row in rows {
        let started_at = SystemTime::from(row.started_at);
        let cost = cost_micros(row);
        let cap = cap_usage_micros(row);
        writer
            .as_mut()
            .write(&[
                &row.id,
                &started_at,
                &row.duration_ms,
                &row.vault_key_id,
                &row.agent_name,
                &row.agent_run_id,
                &row.namespace,
                &row.pod,
                &row.vendor.as_str(),
                &row.operation,
                &row.method,
                &row.path_template,
                &row.policy_verdict.as_str(),
                &row.verdict_reason,
                &row.customer_scope_id,
                &row.vendor_status,
                &row.vendor_request_id,
                &cost,
                &row.cost_source.as_str(),
                &cap,
                &row.policy_revision,
            ])
            .await?;
    }
    writer.finish().await?;
    Ok(())
}

/// Where and how to connect, parsed once from the URL (see [`super::pg_tls`]). Not `Debug`:
/// the configuration holds the password.
struct Target {
    config: Config,
    roots: RootCerts,
    client_cert: Option<ClientCert>,
    /// `host:port (sslmode=...)` for error messages; no user, no password.
    server: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, SinkError> {
        let url = PgUrl::parse(url)?;
        let config: Config = url.driver_url.parse()?;
        let server = format!(
            "{} (sslmode={}{})",
            servers(&config),
            url.ssl_mode,
            if url.ssl_mode_given {
                ""
            } else {
                ", the default: add sslmode=disable to the URL for a server without TLS"
            }
        );
        Ok(Target {
            config,
            roots: url.roots,
            client_cert: url.client_cert,
            server,
        })
    }
}

/// `host:port` of every server the configuration names, comma-separated.
fn servers(config: &Config) -> String {
    let ports = config.get_ports();
    config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Opens one connection; `migrate` applies pending migrations first (once per sink is enough,
/// but a reconnect checks again: the database may have been replaced).
async fn open_client(target: &Target, migrate_schema: bool) -> Result<Client, SinkError> {
    let connected = if target.config.get_ssl_mode() == SslMode::Disable {
        connect_with(&target.config, NoTls).await
    } else {
        // Re-read on every (re)connect: a rotated CA file or client certificate takes effect
        // without a restart.
        let tls = RustlsConnector::new(&target.roots, target.client_cert.as_ref())?;
        connect_with(&target.config, tls).await
    };
    let mut client = connected.map_err(|error| SinkError::PostgresConnect {
        server: target.server.clone(),
        cause: with_causes(&error),
    })?;
    if migrate_schema {
        migrate(&mut client).await?;
    }
    client.batch_execute(STAGE).await?;
    Ok(client)
}

/// Connects and hands the connection to its own task, whichever TLS the target asked for.
async fn connect_with<T>(
    config: &tokio_postgres::Config,
    tls: T,
) -> Result<Client, tokio_postgres::Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(watch_connection(connection));
    Ok(client)
}

/// `error: cause: cause...` on one line.
pub(crate) fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let shown = cause.to_string();
        if !text.ends_with(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        next = cause.source();
    }
    text
}

async fn watch_connection<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(
    connection: F,
) {
    if let Err(e) = connection.await {
        tracing::warn!(error = %with_causes(&e), "postgres audit sink connection closed");
    }
}

async fn ensure<'a>(
    slot: &'a mut Option<Client>,
    target: &Target,
) -> Result<&'a mut Client, SinkError> {
    if slot.as_ref().is_none_or(Client::is_closed) {
        *slot = Some(open_client(target, true).await?);
    }
    Ok(slot.as_mut().expect("just connected"))
}

fn forget_if_broken(slot: &mut Option<Client>) {
    if slot.as_ref().is_some_and(Client::is_closed) {
        *slot = None;
    }
}

async fn migrate(client: &mut Client) -> Result<usize, SinkError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    tx.batch_execute(schema::CREATE_SCHEMA_MIGRATIONS).await?;
    let applied: Vec<i64> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut ran = 0;
    for migration in schema::pending(&applied) {
        for statement in schema::statements(migration, schema::Dialect::Postgres) {
            tx.batch_execute(statement).await?;
        }
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3) ON CONFLICT (version) DO NOTHING",
            &[
                &migration.version,
                &migration.name,
                &timestamp_text(jiff::Timestamp::now()),
            ],
        )
        .await?;
        ran += 1;
    }
    tx.commit().await?;
    Ok(ran)
}
