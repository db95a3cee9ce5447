//! Where audit rows end up: SQLite, PostgreSQL or JSON lines on stdout, behind [`AuditSink`],
//! chosen by a URL-like configuration string ([`SinkConfig`]).
use std::{future::Future, path::PathBuf};

use keybrake_api::audit::AuditRow;

use crate::{
    queries::{Param, Query},
    row::Value,
};

mod pg_numeric;
pub mod pg_tls;
pub mod postgres;
pub mod sqlite;
pub mod stdout;

pub use postgres::PostgresSink;
pub use sqlite::SqliteSink;
pub use stdout::JsonLinesSink;

/// What one batch write did. Rows whose id is already stored count as duplicates, not errors:
/// that is what makes spool replays idempotent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    pub inserted: u64,
    pub duplicates: u64,
}

impl WriteOutcome {
    pub fn add(&mut self, other: WriteOutcome) {
        self.inserted += other.inserted;
        self.duplicates += other.duplicates;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("audit sink configuration {0:?} is not sqlite:///path, postgres://... or stdout")]
    BadConfig(String),
    #[error("sqlite audit sink: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Not a `#[source]`: tokio-postgres's own `Display` is often just "db error", so the text
    /// carries the causes (the server's message) for `%e` log fields too.
    #[error("postgres audit sink: {}", postgres::with_causes(.0))]
    Postgres(tokio_postgres::Error),
    /// Not a `#[source]`: the text is complete, so `{}` and `{:#}` print it once.
    #[error("postgres audit sink: {0}")]
    PostgresTls(pg_tls::PgTlsError),
    /// `server` is `host:port (sslmode=...)`, never the URL (it may carry a password).
    /// `cause` is the driver error with all its causes (tokio-postgres's own `Display` stops
    /// at "error performing TLS handshake", which would hide the reason from a log line).
    #[error("postgres audit sink: connecting to {server}: {cause}")]
    PostgresConnect { server: String, cause: String },
    #[error("stdout audit sink: {0}")]
    Io(#[from] std::io::Error),
    #[error("audit sink worker thread failed: {0}")]
    Worker(String),
    #[error("the {0} sink cannot run queries")]
    NotQueryable(&'static str),
    #[error("unexpected column type {type_name} in column {column}")]
    ColumnType { column: String, type_name: String },
}

impl From<tokio_postgres::Error> for SinkError {
    fn from(e: tokio_postgres::Error) -> Self {
        SinkError::Postgres(e)
    }
}

impl From<pg_tls::PgTlsError> for SinkError {
    fn from(e: pg_tls::PgTlsError) -> Self {
        SinkError::PostgresTls(e)
    }
}

/// A destination for audit rows. Writes are batched and idempotent on [`AuditRow::id`].
pub trait AuditSink: Send + Sync + 'static {
    fn write_batch(
        &self,
        rows: &[AuditRow],
    ) -> impl Future<Output = Result<WriteOutcome, SinkError>> + Send;
}

/// Which sink to open, parsed from `sqlite:///var/lib/keybrake/audit.db`, `postgres://...`
/// (or `postgresql://...`) or `stdout`.
#[derive(Clone, PartialEq, Eq)]
pub enum SinkConfig {
    Sqlite(PathBuf),
    Postgres(String),
    Stdout,
}

impl std::fmt::Debug for SinkConfig {
    /// Never prints a PostgreSQL URL: it may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkConfig::Sqlite(path) => write!(f, "Sqlite({path:?})"),
            SinkConfig::Postgres(_) => f.write_str("Postgres(<url redacted>)"),
            SinkConfig::Stdout => f.write_str("Stdout"),
        }
    }
}

impl std::str::FromStr for SinkConfig {
    type Err = SinkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "stdout" {
            return Ok(SinkConfig::Stdout);
        }
        if let Some(path) = s.strip_prefix("sqlite://") {
            // sqlite:///abs/path → "/abs/path"; sqlite://relative/path → "relative/path".
            if path.is_empty() {
                return Err(SinkError::BadConfig(s.to_owned()));
            }
            return Ok(SinkConfig::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(SinkConfig::Postgres(s.to_owned()));
        }
        let shown = if s.contains('@') { "<redacted>" } else { s };
        Err(SinkError::BadConfig(shown.to_owned()))
    }
}

/// The sink chosen by configuration.
pub enum AnySink {
    Sqlite(SqliteSink),
    Postgres(Box<PostgresSink>),
    Stdout(JsonLinesSink),
}

impl AnySink {
    /// Opens the sink and applies pending schema migrations (not for stdout).
    pub async fn open(config: &SinkConfig) -> Result<AnySink, SinkError> {
        Ok(match config {
            SinkConfig::Sqlite(path) => AnySink::Sqlite(SqliteSink::open(path.clone()).await?),
            SinkConfig::Postgres(url) => {
                AnySink::Postgres(Box::new(PostgresSink::connect(url).await?))
            }
            SinkConfig::Stdout => AnySink::Stdout(JsonLinesSink::stdout()),
        })
    }

    /// Runs a documented query (SQL sinks only).
    pub async fn query(
        &self,
        query: &Query,
        params: &[Param],
    ) -> Result<Vec<Vec<Value>>, SinkError> {
        match self {
            AnySink::Sqlite(s) => s.query(query.sql, params).await,
            AnySink::Postgres(s) => s.query(query.sql, params).await,
            AnySink::Stdout(_) => Err(SinkError::NotQueryable("stdout")),
        }
    }
}

impl AuditSink for AnySink {
    async fn write_batch(&self, rows: &[AuditRow]) -> Result<WriteOutcome, SinkError> {
        match self {
            AnySink::Sqlite(s) => s.write_batch(rows).await,
            AnySink::Postgres(s) => s.write_batch(rows).await,
            AnySink::Stdout(s) => s.write_batch(rows).await,
        }
    }
}

impl<S: AuditSink> AuditSink for std::sync::Arc<S> {
    fn write_batch(
        &self,
        rows: &[AuditRow],
    ) -> impl Future<Output = Result<WriteOutcome, SinkError>> + Send {
        (**self).write_batch(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_configuration_strings() {
        assert_eq!(
            "sqlite:///var/lib/keybrake/audit.db"
                .parse::<SinkConfig>()
                .unwrap(),
            SinkConfig::Sqlite("/var/lib/keybrake/audit.db".into())
        );
        assert_eq!("stdout".parse::<SinkConfig>().unwrap(), SinkConfig::Stdout);
        assert!(matches!(
            "postgresql://u@h/db".parse::<SinkConfig>().unwrap(),
            SinkConfig::Postgres(_)
        ));
        assert!("sqlite://".parse::<SinkConfig>().is_err());
        assert!("mysql://x".parse::<SinkConfig>().is_err());
    }

    #[test]
    fn never_prints_a_postgres_password() {
        let cfg: SinkConfig = "postgres://u:hunter2@h/db".parse().unwrap();
        assert!(!format!("{cfg:?}").contains("hunter2"));
        let err = "pg://u:hunter2@h/db".parse::<SinkConfig>().unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }
}
