//! The queries people run at 2am, as constant SQL that runs unchanged on SQLite and PostgreSQL.
//! docs/audit.md quotes each one verbatim and a test checks it still does, so the playbook and
//! the tested SQL cannot drift.
//!
//! Parameters are `$1`, `$2`, ... (PostgreSQL numbering; SQLite reads `$1` as a named parameter
//! and numbers them in order of first appearance, which is the same order here). Time parameters
//! are bound as timestamps on PostgreSQL and as [`crate::row::timestamp_text`] on SQLite.
//!
//! Dollars are printed exactly from integer micro-dollars with text arithmetic both engines share
//! (`CAST`, `/`, `%`, `||`, `substr`, `abs`), e.g. `12.340000`; never through a float.
use jiff::Timestamp;

/// A bound query parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    Text(String),
    Time(Timestamp),
}

impl From<&str> for Param {
    fn from(s: &str) -> Self {
        Param::Text(s.to_owned())
    }
}

impl From<Timestamp> for Param {
    fn from(t: Timestamp) -> Self {
        Param::Time(t)
    }
}

/// A documented query: its heading in docs/audit.md, what each `$n` means, and the SQL.
#[derive(Clone, Copy, Debug)]
pub struct Query {
    pub title: &'static str,
    pub params: &'static [&'static str],
    pub sql: &'static str,
}

/// Every call of one key in a window (the playbook uses now − 30 minutes), oldest first.
pub const KEY_RECENT_CALLS: Query = Query {
    title: "A key's last 30 minutes, ordered by started_at",
    params: &[
        "$1 vault_key_id (namespace/name)",
        "$2 since (now - 30 minutes)",
    ],
    sql: concat!(
        "SELECT started_at, id, agent_name, agent_run_id, operation, policy_verdict, customer_scope_id, vendor_status, ",
        usd_text!("cost_usd_micros"),
        " AS cost_usd\nFROM agent_call_audit\nWHERE vault_key_id = $1 AND started_at >= $2\nORDER BY started_at, id"
    ),
};

/// Money per customer in a window, largest first.
pub const COST_BY_CUSTOMER: Query = Query {
    title: "Cost summed by customer_scope_id",
    params: &["$1 from (inclusive)", "$2 to (exclusive)"],
    sql: concat!(
        "SELECT customer_scope_id, COUNT(*) AS calls, ",
        usd_text!("CAST(COALESCE(SUM(cost_usd_micros), 0) AS BIGINT)"),
        " AS cost_usd\nFROM agent_call_audit\nWHERE started_at >= $1 AND started_at < $2\nGROUP BY customer_scope_id\nORDER BY COALESCE(SUM(cost_usd_micros), 0) DESC, customer_scope_id"
    ),
};

/// Calls that were let through, per key, in a window.
pub const ALLOWED_CALLS: Query = Query {
    title: "Allowed-call counts per key",
    params: &["$1 from (inclusive)", "$2 to (exclusive)"],
    sql: "SELECT vault_key_id, COUNT(*) AS allowed_calls\nFROM agent_call_audit\nWHERE policy_verdict = 'allow' AND started_at >= $1 AND started_at < $2\nGROUP BY vault_key_id\nORDER BY vault_key_id",
};

/// Everything one agent run did, in order, across keys and vendors.
pub const RUN_TIMELINE: Query = Query {
    title: "One agent run's full timeline",
    params: &["$1 agent_run_id"],
    sql: concat!(
        "SELECT started_at, id, vault_key_id, vendor, operation, method, path_template, policy_verdict, verdict_reason, customer_scope_id, vendor_status, vendor_request_id, ",
        usd_text!("cost_usd_micros"),
        " AS cost_usd, cost_source, ",
        usd_text!("cap_usage_after_usd_micros"),
        " AS cap_usage_after_usd\nFROM agent_call_audit\nWHERE agent_run_id = $1\nORDER BY started_at, id"
    ),
};

/// Denials grouped by verdict in a window (served by the partial index on non-allow rows).
pub const DENIALS_BY_VERDICT: Query = Query {
    title: "Denials by verdict",
    params: &["$1 from (inclusive)", "$2 to (exclusive)"],
    sql: "SELECT policy_verdict, COUNT(*) AS calls\nFROM agent_call_audit\nWHERE policy_verdict <> 'allow' AND started_at >= $1 AND started_at < $2\nGROUP BY policy_verdict\nORDER BY calls DESC, policy_verdict",
};

pub const ALL: [Query; 5] = [
    KEY_RECENT_CALLS,
    COST_BY_CUSTOMER,
    ALLOWED_CALLS,
    RUN_TIMELINE,
    DENIALS_BY_VERDICT,
];

/// Number of distinct `$n` placeholders in a query.
pub fn placeholder_count(sql: &str) -> usize {
    (1..=9).filter(|n| sql.contains(&format!("${n}"))).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_params_match_placeholders() {
        for q in ALL {
            assert_eq!(placeholder_count(q.sql), q.params.len(), "{}", q.title);
        }
    }

    #[test]
    fn docs_quote_every_query_verbatim() {
        let docs = include_str!("../../docs/audit.md");
        for q in ALL {
            assert!(
                docs.contains(q.sql),
                "docs/audit.md no longer quotes the SQL of {:?}; paste it from audit/src/queries.rs:\n{}",
                q.title,
                q.sql
            );
            assert!(
                docs.contains(q.title),
                "docs/audit.md lacks heading {:?}",
                q.title
            );
        }
    }
}
