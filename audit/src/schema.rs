//! The `agent_call_audit` DDL, one text for SQLite and PostgreSQL, applied as numbered migrations
//! recorded in `schema_migrations`.
//!
//! Portability choices (see docs/audit.md):
//! - money is `BIGINT` micro-dollars (`*_usd_micros`): SQLite has no exact decimal type (its
//!   `NUMERIC` affinity stores fractions as 8-byte floats), so `NUMERIC(18,6)` would be exact on
//!   PostgreSQL only. Integer micro-dollars are exact on both and match [`keybrake_api::Usd`].
//! - `started_at` is declared `TIMESTAMPTZ`: a real timestamp on PostgreSQL; on SQLite it holds the
//!   fixed-width UTC text `YYYY-MM-DDTHH:MM:SS.ffffffZ` (see [`crate::row::timestamp_text`]), whose
//!   byte order is time order, so the same comparisons and `ORDER BY` work on both.

/// The SQL engine a migration runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// One schema change. Versions only grow; a released migration is never edited.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    /// Statements separated by `;` (none of them contains a `;` of its own).
    pub sql: MigrationSql,
}

/// Most migrations are one text for both engines; a few need each engine's own syntax.
#[derive(Debug, Clone, Copy)]
pub enum MigrationSql {
    Portable(&'static str),
    PerDialect {
        sqlite: &'static str,
        postgres: &'static str,
    },
}

impl MigrationSql {
    pub fn text(self, dialect: Dialect) -> &'static str {
        match (self, dialect) {
            (MigrationSql::Portable(sql), _) => sql,
            (MigrationSql::PerDialect { sqlite, .. }, Dialect::Sqlite) => sqlite,
            (MigrationSql::PerDialect { postgres, .. }, Dialect::Postgres) => postgres,
        }
    }
}

/// Bookkeeping table, created before any migration runs.
pub const CREATE_SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL
)";

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "create agent_call_audit",
        sql: MigrationSql::Portable(CREATE_AGENT_CALL_AUDIT),
    },
    Migration {
        version: 2,
        name: "dollar columns cost_usd_parsed and cap_usage_after_usd",
        sql: MigrationSql::PerDialect {
            sqlite: DOLLAR_COLUMNS_SQLITE,
            postgres: DOLLAR_COLUMNS_POSTGRES,
        },
    },
    Migration {
        version: 3,
        name: "started_at index for the playbook's time-window queries",
        sql: MigrationSql::PerDialect {
            sqlite: TIME_INDEX_SQLITE,
            postgres: TIME_INDEX_POSTGRES,
        },
    },
];

/// Migration 1, as released.
const CREATE_AGENT_CALL_AUDIT: &str = "CREATE TABLE IF NOT EXISTS agent_call_audit (
    id TEXT PRIMARY KEY,
    started_at TIMESTAMPTZ NOT NULL,
    duration_ms BIGINT NOT NULL,
    vault_key_id TEXT,
    agent_name TEXT,
    agent_run_id TEXT,
    namespace TEXT,
    pod TEXT,
    vendor TEXT NOT NULL,
    operation TEXT,
    method TEXT NOT NULL,
    path_template TEXT,
    policy_verdict TEXT NOT NULL,
    verdict_reason TEXT,
    customer_scope_id TEXT,
    vendor_status INTEGER NOT NULL,
    vendor_request_id TEXT,
    cost_usd_micros BIGINT,
    cost_source TEXT NOT NULL,
    cap_usage_after_usd_micros BIGINT,
    policy_revision BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS agent_call_audit_key_time ON agent_call_audit (vault_key_id, started_at);
CREATE INDEX IF NOT EXISTS agent_call_audit_run_time ON agent_call_audit (agent_run_id, started_at);
CREATE INDEX IF NOT EXISTS agent_call_audit_customer ON agent_call_audit (customer_scope_id);
CREATE INDEX IF NOT EXISTS agent_call_audit_denials ON agent_call_audit (policy_verdict, started_at) WHERE policy_verdict <> 'allow'";

/// Migration 2: DESIGN.md's dollar columns, derived from the micro-dollar columns (which stay
/// the source of truth), so `SELECT cost_usd_parsed, cap_usage_after_usd FROM agent_call_audit`
/// gives exact dollars on both engines. Writers never set them.
/// - SQLite: `ALTER TABLE ... ADD COLUMN` accepts only `VIRTUAL` generated columns (computed on
///   read, no storage, no rewrite). SQLite has no exact decimal type, so the value is exact
///   decimal text (`12.345678`); `SUM` it through `cost_usd_micros`.
/// - PostgreSQL 15 has only `STORED` generated columns: adding them rewrites the table once
///   (under an exclusive lock; seconds per million rows). `NUMERIC(19,6)` holds any `BIGINT`
///   micro-dollar amount exactly; the cast to scale 6 before dividing keeps the division exact.
const DOLLAR_COLUMNS_SQLITE: &str = concat!(
    "ALTER TABLE agent_call_audit ADD COLUMN cost_usd_parsed TEXT GENERATED ALWAYS AS (",
    usd_text!("cost_usd_micros"),
    ") VIRTUAL;\nALTER TABLE agent_call_audit ADD COLUMN cap_usage_after_usd TEXT GENERATED ALWAYS AS (",
    usd_text!("cap_usage_after_usd_micros"),
    ") VIRTUAL"
);
const DOLLAR_COLUMNS_POSTGRES: &str = "ALTER TABLE agent_call_audit
    ADD COLUMN cost_usd_parsed NUMERIC(19,6) GENERATED ALWAYS AS (CAST(cost_usd_micros AS NUMERIC(25,6)) / 1000000) STORED,
    ADD COLUMN cap_usage_after_usd NUMERIC(19,6) GENERATED ALWAYS AS (CAST(cap_usage_after_usd_micros AS NUMERIC(25,6)) / 1000000) STORED";

/// Migration 3: the playbook's window queries without a key (cost by customer, allowed calls)
/// filter on `started_at` alone; without this index they read the whole table.
/// - PostgreSQL: BRIN, not B-tree. Rows arrive in roughly `started_at` order (append-mostly),
///   so each 128-page block range covers a narrow time span and a min/max summary per range
///   finds a window's pages. It is a few pages for millions of rows and costs COPY next to
///   nothing (a B-tree would be one more tree to update per row). `autosummarize` asks
///   autovacuum to summarize each range as it fills; rows replayed late from a spool only widen
///   their range's summary (more pages rechecked, never a wrong answer).
/// - SQLite has no BRIN: a B-tree, appended at its right edge since times grow.
const TIME_INDEX_SQLITE: &str =
    "CREATE INDEX IF NOT EXISTS agent_call_audit_time ON agent_call_audit (started_at)";
const TIME_INDEX_POSTGRES: &str = "CREATE INDEX IF NOT EXISTS agent_call_audit_time ON agent_call_audit USING brin (started_at) WITH (autosummarize = on)";

/// Generated columns: readable by queries, never written.
pub const GENERATED_COLUMNS: [&str; 2] = ["cost_usd_parsed", "cap_usage_after_usd"];

/// Column order used by every writer (SQLite INSERT, PostgreSQL COPY) and by [`crate::row`].
pub const COLUMNS: [&str; 21] = [
    "id",
    "started_at",
    "duration_ms",
    "vault_key_id",
    "agent_name",
    "agent_run_id",
    "namespace",
    "pod",
    "vendor",
    "operation",
    "method",
    "path_template",
    "policy_verdict",
    "verdict_reason",
    "customer_scope_id",
    "vendor_status",
    "vendor_request_id",
    "cost_usd_micros",
    "cost_source",
    "cap_usage_after_usd_micros",
    "policy_revision",
];

/// The statements of one migration for one engine, in order.
pub fn statements(migration: &Migration, dialect: Dialect) -> impl Iterator<Item = &'static str> {
    migration
        .sql
        .text(dialect)
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Migrations not yet applied, given the versions already recorded.
pub fn pending(applied: &[i64]) -> impl Iterator<Item = &'static Migration> + '_ {
    MIGRATIONS.iter().filter(|m| !applied.contains(&m.version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_strictly_increase() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
        assert_eq!(MIGRATIONS[0].version, 1);
    }

    #[test]
    fn ddl_declares_every_column_once() {
        let ddl = CREATE_AGENT_CALL_AUDIT;
        for column in COLUMNS {
            let needle = format!("\n    {column} ");
            assert_eq!(ddl.matches(&needle).count(), 1, "{column}");
        }
        for dialect in [Dialect::Sqlite, Dialect::Postgres] {
            assert_eq!(statements(&MIGRATIONS[0], dialect).count(), 5);
        }
    }

    #[test]
    fn dollar_columns_are_generated_on_both_engines() {
        for (dialect, per_column) in [(Dialect::Sqlite, 2), (Dialect::Postgres, 1)] {
            let sql = MIGRATIONS[1].sql.text(dialect);
            assert_eq!(statements(&MIGRATIONS[1], dialect).count(), per_column);
            for column in GENERATED_COLUMNS {
                assert_eq!(sql.matches(&format!("ADD COLUMN {column} ")).count(), 1);
                assert!(!COLUMNS.contains(&column), "writers never set {column}");
            }
            assert_eq!(sql.matches("GENERATED ALWAYS AS").count(), 2);
        }
    }

    #[test]
    fn pending_skips_applied() {
        assert_eq!(pending(&[]).count(), MIGRATIONS.len());
        assert_eq!(pending(&[1]).count(), MIGRATIONS.len() - 1);
        assert_eq!(pending(&[1, 2]).count(), 1);
        assert_eq!(pending(&[1, 2, 3]).count(), 0);
    }
}
