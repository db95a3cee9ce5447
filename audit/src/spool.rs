//! Disk spool for rows the collector could not take: append-only NDJSON segments
//! (`audit-<seq>.ndjson`) in one directory, read back oldest first.
//!
//! - Bound: `max_bytes` over all segment files. A batch that does not fit is dropped (newest rows
//!   go, the oldest are kept), counted in `keybrake_audit_dropped_rows_total`, and logged once per
//!   fill episode; `keybrake_audit_spool_bytes` shows the size.
//! - Durability: every append ends with `fdatasync`, and a new segment's directory entry is synced,
//!   so rows acknowledged as spooled survive a crash or power loss. A torn last line from a crash
//!   mid-write is skipped on replay (and counted as dropped).
//! - Replay: [`Spool::peek`] reads the next rows without consuming them; [`Spool::commit`]
//!   consumes them once delivered. A crash between the two re-sends them: row ids make that
//!   harmless. A fully delivered segment is deleted.
use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use keybrake_api::audit::AuditRow;

use crate::metrics::AuditMetrics;

#[derive(Clone, Debug)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Upper bound on the bytes of all segments together.
    pub max_bytes: u64,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
}

impl SpoolConfig {
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> SpoolConfig {
        SpoolConfig {
            dir: dir.into(),
            max_bytes,
            segment_bytes: (max_bytes / 16).clamp(64 * 1024, 16 * 1024 * 1024),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("audit spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    len: u64,
}

/// Rows read by [`Spool::peek`], to hand back to [`Spool::commit`] once delivered.
#[derive(Debug)]
pub struct Peeked {
    pub rows: Vec<AuditRow>,
    seq: u64,
    next_offset: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    pub spooled: usize,
    pub dropped: usize,
}

pub struct Spool {
    config: SpoolConfig,
    segments: VecDeque<Segment>,
    /// Open append handle on the last segment, if it is still being written.
    writer: Option<File>,
    /// Bytes of the front segment already delivered.
    read_offset: u64,
    next_seq: u64,
    total_bytes: u64,
    full: bool,
    metrics: AuditMetrics,
}

impl Spool {
    /// Opens the spool directory (creating it), picking up segments a previous process left.
    pub fn open(config: SpoolConfig, metrics: AuditMetrics) -> Result<Spool, SpoolError> {
        fs::create_dir_all(&config.dir).map_err(io(&config.dir))?;
        let mut segments = Vec::new();
        for entry in fs::read_dir(&config.dir).map_err(io(&config.dir))? {
            let entry = entry.map_err(io(&config.dir))?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_prefix("audit-"))
                .and_then(|n| n.strip_suffix(".ndjson"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let len = entry.metadata().map_err(io(&entry.path()))?.len();
            segments.push(Segment {
                seq,
                path: entry.path(),
                len,
            });
        }
        segments.sort_by_key(|s| s.seq);
        let next_seq = segments.last().map_or(0, |s| s.seq + 1);
        let total_bytes = segments.iter().map(|s| s.len).sum();
        if !segments.is_empty() {
            tracing::info!(
                segments = segments.len(),
                bytes = total_bytes,
                "audit spool holds rows from an earlier run; replaying them first"
            );
        }
        let spool = Spool {
            config,
            segments: segments.into(),
            writer: None,
            read_offset: 0,
            next_seq,
            total_bytes,
            full: false,
            metrics,
        };
        spool.metrics.spool_bytes.set(spool.total_bytes as i64);
        Ok(spool)
    }

    /// True when every spooled row has been delivered.
    pub fn is_empty(&self) -> bool {
        match self.segments.len() {
            0 => true,
            1 => self.read_offset >= self.segments[0].len,
            _ => false,
        }
    }

    pub fn metrics(&self) -> &AuditMetrics {
        &self.metrics
    }

    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Appends rows in order. Rows that would push the spool past its bound are dropped.
    pub fn append(&mut self, rows: &[AuditRow]) -> Result<AppendOutcome, SpoolError> {
        let mut text = Vec::with_capacity(rows.len() * 512);
        let mut spooled = 0;
        for row in rows {
            let start = text.len();
            serde_json::to_writer(&mut text, row).expect("an AuditRow always serializes");
            text.push(b'\n');
            if self.total_bytes + text.len() as u64 > self.config.max_bytes {
                text.truncate(start);
                break;
            }
            spooled += 1;
        }
        let dropped = rows.len() - spooled;
        if dropped > 0 {
            self.metrics.dropped_rows.inc_by(dropped as u64);
            if !self.full {
                self.full = true;
                tracing::error!(
                    max_bytes = self.config.max_bytes,
                    dir = %self.config.dir.display(),
                    "audit spool is full: new audit rows are being dropped until the collector is back"
                );
            }
        }
        if !text.is_empty() {
            self.write(&text)?;
        }
        Ok(AppendOutcome { spooled, dropped })
    }

    fn write(&mut self, text: &[u8]) -> Result<(), SpoolError> {
        let rolling = self
            .segments
            .back()
            .is_none_or(|s| s.len >= self.config.segment_bytes);
        if self.writer.is_none() || rolling {
            let seq = self.next_seq;
            self.next_seq += 1;
            let path = self.config.dir.join(format!("audit-{seq:020}.ndjson"));
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(io(&path))?;
            // Make the new file's directory entry durable too.
            File::open(&self.config.dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&self.config.dir))?;
            self.segments.push_back(Segment { seq, path, len: 0 });
            self.writer = Some(file);
        }
        let segment = self.segments.back_mut().expect("segment just ensured");
        let file = self.writer.as_mut().expect("writer just ensured");
        file.write_all(text).map_err(io(&segment.path))?;
        file.sync_data().map_err(io(&segment.path))?;
        segment.len += text.len() as u64;
        self.total_bytes += text.len() as u64;
        self.metrics.spool_bytes.set(self.total_bytes as i64);
        Ok(())
    }

    /// The next (up to) `max_rows` undelivered rows, oldest first, without consuming them.
    pub fn peek(&mut self, max_rows: usize) -> Result<Option<Peeked>, SpoolError> {
        loop {
            let Some(front) = self.segments.front() else {
                return Ok(None);
            };
            if self.read_offset >= front.len {
                self.retire_front()?;
                continue;
            }
            let (path, seq, len) = (front.path.clone(), front.seq, front.len);
            let mut file = File::open(&path).map_err(io(&path))?;
            file.seek(SeekFrom::Start(self.read_offset))
                .map_err(io(&path))?;
            // Only read what was appended through this spool: never a line being written.
            let mut reader = BufReader::new(file.take(len - self.read_offset));
            let mut offset = self.read_offset;
            let mut rows = Vec::new();
            let mut line = Vec::new();
            while rows.len() < max_rows {
                line.clear();
                let n = reader.read_until(b'\n', &mut line).map_err(io(&path))?;
                if n == 0 {
                    break;
                }
                offset += n as u64;
                match serde_json::from_slice::<AuditRow>(&line) {
                    Ok(row) => rows.push(row),
                    Err(e) => {
                        self.metrics.dropped_rows.inc();
                        tracing::error!(
                            segment = %path.display(),
                            error = %e,
                            "unreadable audit spool line skipped (torn write?)"
                        );
                    }
                }
            }
            if rows.is_empty() {
                // Only unreadable lines: consume them and look further.
                self.read_offset = offset;
                continue;
            }
            return Ok(Some(Peeked {
                rows,
                seq,
                next_offset: offset,
            }));
        }
    }

    /// Marks peeked rows delivered; deletes segments once fully delivered.
    pub fn commit(&mut self, peeked: Peeked) -> Result<(), SpoolError> {
        if self.segments.front().map(|s| s.seq) != Some(peeked.seq) {
            return Ok(()); // already retired
        }
        self.read_offset = peeked.next_offset;
        if self.read_offset >= self.segments[0].len {
            self.retire_front()?;
        }
        Ok(())
    }

    fn retire_front(&mut self) -> Result<(), SpoolError> {
        let Some(front) = self.segments.pop_front() else {
            return Ok(());
        };
        if self.segments.is_empty() {
            self.writer = None; // the active segment is done: the next append starts a new one
        }
        fs::remove_file(&front.path).map_err(io(&front.path))?;
        self.read_offset = 0;
        self.total_bytes -= front.len;
        self.metrics.spool_bytes.set(self.total_bytes as i64);
        if self.full && self.total_bytes < self.config.max_bytes / 2 {
            self.full = false;
            tracing::info!("audit spool drained below half; no longer dropping rows");
        }
        Ok(())
    }
}
