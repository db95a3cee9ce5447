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

/// A fresh row id: UUID version 7 text (RFC 9562). Ids from one clock sort in time order, so
/// PostgreSQL's primary-key index grows at its right edge (cached rightmost leaf, no random page
/// splits) instead of taking random B-tree inserts as UUIDv4 ids do; unique enough across
/// sidecars (74 random bits per id) to keep spool replays idempotent.
pub fn new_row_id() -> String {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    uuid_v7_text(since_epoch, rand::random())
}

/// RFC 9562 UUIDv7 with sub-millisecond precision in `rand_a` (its method 3): 48 bits of Unix
/// milliseconds, version 7, 12 bits of the millisecond's fraction, variant, 62 random bits.
fn uuid_v7_text(since_epoch: std::time::Duration, random: u64) -> String {
    let millis = (since_epoch.as_millis() as u64) & 0xffff_ffff_ffff;
    let fraction = (u64::from(since_epoch.subsec_nanos() % 1_000_000) << 12) / 1_000_000;
    let high = (millis << 16) | 0x7000 | fraction;
    let low = (random & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&high.to_be_bytes());
    bytes[8..].copy_from_slice(&low.to_be_bytes());
    uuid_text(&bytes)
}

/// `8-4-4-4-12` lowercase hex, written into one buffer.
fn uuid_text(b: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
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
    use std::time::Duration;

    use super::*;

    #[test]
    fn row_ids_are_uuid_v7() {
        // 1_795_831_200_000 ms after the epoch plus half a millisecond (fraction 0x800 of 0x1000).
        let at = Duration::from_millis(1_795_831_200_000) + Duration::from_micros(500);
        let id = uuid_v7_text(at, u64::MAX);
        assert_eq!(
            id,
            format!(
                "{:08x}-{:04x}-7800-bfff-ffffffffffff",
                1_795_831_200_000u64 >> 16,
                1_795_831_200_000u64 & 0xffff
            )
        );
        let fresh = new_row_id();
        assert_eq!(fresh.len(), 36);
        assert_eq!(&fresh[14..15], "7", "version");
        assert!(matches!(&fresh[19..20], "8" | "9" | "a" | "b"), "variant");
        assert_ne!(fresh, new_row_id());
    }

    #[test]
    fn row_ids_sort_in_time_order() {
        let base = Duration::from_millis(1_795_831_200_000);
        let mut previous = uuid_v7_text(base, u64::MAX);
        // Later ids sort after earlier ones whatever their random bits, down to ~250 ns.
        for step_ns in [300, 1_000, 999_000, 1_000_000, 3_600_000_000_000] {
            let next = uuid_v7_text(base + Duration::from_nanos(step_ns), 0);
            assert!(next > previous, "{next} after {previous}");
            previous = next;
        }
    }

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
