//! How an [`AuditRow`] maps onto `agent_call_audit` columns, and the values queries return.
use jiff::Timestamp;
use keybrake_api::audit::AuditRow;

/// Fixed-width UTC text (`2026-11-30T23:07:03.000000Z`), microsecond precision like PostgreSQL's
/// `timestamptz`. Fixed width makes byte order equal time order, which SQLite relies on.
pub fn timestamp_text(ts: Timestamp) -> String {
    ts.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// A row's money columns in micro-dollars (`cost_usd_micros`, `cap_usage_after_usd_micros`).
pub fn cost_micros(row: &AuditRow) -> Option<i64> {
    row.cost_usd_parsed.map(|usd| usd.micros())
}

pub fn cap_usage_micros(row: &AuditRow) -> Option<i64> {
    row.cap_usage_after_usd.map(|usd| usd.micros())
}

/// One cell of a query result, the same on both engines (timestamps as [`timestamp_text`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_text_is_fixed_width_and_ordered() {
        let a: Timestamp = "2026-11-30T23:00:00Z".parse().unwrap();
        let b: Timestamp = "2026-11-30T23:00:00.000001Z".parse().unwrap();
        let c: Timestamp = "2026-11-30T23:00:00.1234567Z".parse().unwrap();
        assert_eq!(timestamp_text(a), "2026-11-30T23:00:00.000000Z");
        assert_eq!(timestamp_text(c), "2026-11-30T23:00:00.123456Z");
        assert!(timestamp_text(a) < timestamp_text(b));
        assert_eq!(timestamp_text(a).len(), timestamp_text(c).len());
    }
}
