//! JSON lines sink: one serialized [`AuditRow`] per line, for log pipelines that already ship
//! stdout. It cannot detect duplicate ids, so a spool replay may print a row twice; consumers
//! deduplicate on `id`.
use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use keybrake_api::audit::AuditRow;

use super::{AuditSink, SinkError, WriteOutcome};

#[derive(Clone)]
pub struct JsonLinesSink {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
}

impl JsonLinesSink {
    pub fn stdout() -> JsonLinesSink {
        JsonLinesSink::new(Box::new(std::io::stdout()))
    }

    pub fn new(out: Box<dyn Write + Send>) -> JsonLinesSink {
        JsonLinesSink {
            out: Arc::new(Mutex::new(out)),
        }
    }
}

impl AuditSink for JsonLinesSink {
    async fn write_batch(&self, rows: &[AuditRow]) -> Result<WriteOutcome, SinkError> {
        let mut text = Vec::with_capacity(rows.len() * 512);
        for row in rows {
            serde_json::to_writer(&mut text, row).map_err(std::io::Error::from)?;
            text.push(b'\n');
        }
        let mut out = self
            .out
            .lock()
            .map_err(|_| SinkError::Worker("stdout sink mutex poisoned".into()))?;
        out.write_all(&text)?;
        out.flush()?;
        Ok(WriteOutcome {
            inserted: rows.len() as u64,
            duplicates: 0,
        })
    }
}
