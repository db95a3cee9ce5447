//! Loading rows into the SQLite sink and running the documented playbook queries against it.
use std::path::Path;

use jiff::{SignedDuration, Timestamp};
use keybrake_audit::{
    AnySink, SinkConfig, SinkError,
    ingest::{IngestError, IngestLimits, IngestReport, ingest_ndjson},
    queries::{self, Param, Query},
    row::Value,
};

use crate::table;

/// Opens (and migrates) the SQLite audit store at `db`.
pub async fn open(db: &Path) -> Result<AnySink, SinkError> {
    AnySink::open(&SinkConfig::Sqlite(db.to_path_buf())).await
}

/// Writes the JSON-lines rows in `ndjson` to the store with the controller's ingest code path
/// (validation, batching, idempotence on row id).
pub async fn load(sink: &AnySink, ndjson: &[u8]) -> Result<IngestReport, IngestError> {
    ingest_ndjson(sink, ndjson, &IngestLimits::default()).await
}

/// Column names of a query's SELECT list: the top-level `AS alias`, else the bare column.
pub fn column_names(sql: &str) -> Vec<String> {
    let upper = sql.to_ascii_uppercase();
    let start = upper.find("SELECT").map_or(0, |i| i + "SELECT".len());
    let end = top_level_find(&upper, "\nFROM ", start).unwrap_or(sql.len());
    split_top_level(&sql[start..end])
        .into_iter()
        .map(|item| {
            let item = item.trim();
            match top_level_rfind(&item.to_ascii_uppercase(), " AS ") {
                Some(i) => item[i + 4..].trim().to_owned(),
                None => item.rsplit('.').next().unwrap_or(item).to_owned(),
            }
        })
        .collect()
}

/// Each character's byte offset and its parenthesis depth (a `)` counts as outside its group).
fn depths(text: &str) -> Vec<(usize, i32)> {
    let mut depth = 0;
    text.char_indices()
        .map(|(i, c)| {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            (i, if c == '(' { depth - 1 } else { depth })
        })
        .collect()
}

fn top_level_find(text: &str, needle: &str, from: usize) -> Option<usize> {
    depths(text)
        .into_iter()
        .find(|(i, d)| *i >= from && *d == 0 && text[*i..].starts_with(needle))
        .map(|(i, _)| i)
}

fn top_level_rfind(text: &str, needle: &str) -> Option<usize> {
    depths(text)
        .into_iter()
        .rev()
        .find(|(i, d)| *d == 0 && text[*i..].starts_with(needle))
        .map(|(i, _)| i)
}

fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut last = 0;
    for (i, d) in depths(text) {
        if d == 0 && text[i..].starts_with(',') {
            parts.push(&text[last..i]);
            last = i + 1;
        }
    }
    parts.push(&text[last..]);
    parts
}

/// One playbook query's result.
pub struct Answer {
    pub query: Query,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Answer {
    pub fn render(&self, max_rows: Option<usize>) -> String {
        let headers: Vec<&str> = self.columns.iter().map(String::as_str).collect();
        table::render(&headers, &self.rows, max_rows)
    }
}

/// The three morning-after questions (plus denials by verdict) for `vault_key_id` over the
/// 30 minutes before `now`.
pub async fn morning_after(
    sink: &AnySink,
    vault_key_id: &str,
    now: Timestamp,
) -> Result<Vec<Answer>, SinkError> {
    let since = now - SignedDuration::from_mins(30);
    // The window's end is exclusive: one second past `now` keeps the last call in.
    let until = now + SignedDuration::from_secs(1);
    let plan: [(Query, Vec<Param>); 4] = [
        (
            queries::KEY_RECENT_CALLS,
            vec![vault_key_id.into(), since.into()],
        ),
        (queries::COST_BY_CUSTOMER, vec![since.into(), until.into()]),
        (queries::ALLOWED_CALLS, vec![since.into(), until.into()]),
        (
            queries::DENIALS_BY_VERDICT,
            vec![since.into(), until.into()],
        ),
    ];
    let mut answers = Vec::new();
    for (query, params) in plan {
        let rows = sink.query(&query, &params).await?;
        answers.push(Answer {
            query,
            columns: column_names(query.sql),
            rows: rows
                .into_iter()
                .map(|r| r.iter().map(cell).collect())
                .collect(),
        });
    }
    Ok(answers)
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_names_of_the_playbook_queries() {
        assert_eq!(
            column_names(queries::KEY_RECENT_CALLS.sql),
            [
                "started_at",
                "id",
                "agent_name",
                "agent_run_id",
                "operation",
                "policy_verdict",
                "customer_scope_id",
                "vendor_status",
                "cost_usd"
            ]
        );
        assert_eq!(
            column_names(queries::COST_BY_CUSTOMER.sql),
            ["customer_scope_id", "calls", "cost_usd"]
        );
        assert_eq!(
            column_names(queries::ALLOWED_CALLS.sql),
            ["vault_key_id", "allowed_calls"]
        );
    }
}
