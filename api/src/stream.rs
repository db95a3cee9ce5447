//! Controller → sidecar watch stream over HTTP/2 + TLS, response body `application/x-ndjson`,
//! one [`WatchEvent`] per line. The sidecar acknowledges applied revisions with [`Ack`]s:
//!
//! - `POST /v1/watch` (what the sidecar uses): full duplex on one HTTP/2 stream. The request
//!   body carries the acks as NDJSON lines (`{"revision":N}`), each a small DATA frame: no
//!   request, headers or authentication per ack.
//! - `GET /v1/watch`: the same events; acks, if any, as separate `POST /v1/ack` requests naming
//!   the stream (header `keybrake-stream-id` of the watch response). For simple clients.
use serde::{Deserialize, Serialize};

use crate::policy::{KeyGrant, KeyId};

pub const WATCH_PATH: &str = "/v1/watch";
pub const ACK_PATH: &str = "/v1/ack";
pub const AUDIT_INGEST_PATH: &str = "/v1/audit";
pub const NDJSON: &str = "application/x-ndjson";
/// The audience a sidecar's projected ServiceAccount token must carry.
pub const TOKEN_AUDIENCE: &str = "keybrake";
/// Longest line either side accepts; longer lines are a protocol error, not a buffer to grow.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// A snapshot line is cut into [`WatchEvent::SnapshotPart`]s once it would pass this many
/// bytes, so a scope of any size fits the line bound.
pub const SNAPSHOT_PART_BYTES: usize = 256 << 10;
/// Longest ack line the controller reads from a duplex watch's request body.
pub const MAX_ACK_LINE_BYTES: usize = 256;
/// Query parameter a reconnecting sidecar uses to resume.
pub const RESUME_PARAM: &str = "sinceRevision";

// Events are serialized or applied as soon as they are built, so the unboxed grant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum WatchEvent {
    /// A leading slice of a snapshot too large for one line. Zero or more parts (same
    /// revision) precede the closing [`WatchEvent::Snapshot`]; the receiver applies the union
    /// of all of them as one replacement when the closing line arrives, and acknowledges only
    /// then. Never applied alone.
    SnapshotPart {
        revision: u64,
        keys: Vec<KeyGrant>,
    },
    /// First message of every stream (after its parts, if any): the complete set of keys for
    /// this subscriber, or the last slice of it.
    Snapshot {
        revision: u64,
        keys: Vec<KeyGrant>,
    },
    Upsert {
        revision: u64,
        key: KeyGrant,
    },
    Delete {
        revision: u64,
        id: KeyId,
    },
    /// Proves liveness; the sidecar's staleness clock restarts on any event.
    Heartbeat {
        revision: u64,
    },
}

impl WatchEvent {
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Snapshot { revision, .. }
            | WatchEvent::SnapshotPart { revision, .. }
            | WatchEvent::Upsert { revision, .. }
            | WatchEvent::Delete { revision, .. }
            | WatchEvent::Heartbeat { revision } => *revision,
        }
    }
}

/// Where a decoded stream (or a reloaded standalone config) lands: the sidecar's policy store.
/// One trait, so the controller stream and standalone mode feed the same store.
pub trait PolicyApply: Send + Sync {
    /// Replace every key with `keys` (a snapshot, or a freshly loaded config file).
    fn replace_all(&self, keys: Vec<KeyGrant>, revision: u64);
    fn upsert(&self, key: KeyGrant, revision: u64);
    fn remove(&self, id: &KeyId, revision: u64);
    /// The source proved it is alive (any event, heartbeats included): restart the staleness clock.
    fn mark_fresh(&self, revision: u64);

    /// Applies one event; returns the revision now held, which the caller acknowledges.
    fn apply(&self, event: WatchEvent) -> u64 {
        let revision = event.revision();
        match event {
            WatchEvent::Snapshot { keys, .. } => self.replace_all(keys, revision),
            // Assembled by the stream reader into the closing Snapshot; alone it changes nothing.
            WatchEvent::SnapshotPart { .. } => {}
            WatchEvent::Upsert { key, .. } => self.upsert(key, revision),
            WatchEvent::Delete { id, .. } => self.remove(&id, revision),
            WatchEvent::Heartbeat { .. } => {}
        }
        self.mark_fresh(revision);
        revision
    }
}

/// "I have applied everything up to `revision`."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    pub revision: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged_single_lines() {
        let line = serde_json::to_string(&WatchEvent::Heartbeat { revision: 7 }).unwrap();
        assert_eq!(line, r#"{"type":"heartbeat","revision":7}"#);
        let back: WatchEvent = serde_json::from_str(&line).unwrap();
        assert_eq!(back.revision(), 7);
    }
}
