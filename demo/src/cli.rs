//! `keybrake-demo-audit load --db FILE ROWS.ndjson` and
//! `keybrake-demo-audit playbook --db FILE --key NAMESPACE/NAME`.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use jiff::Timestamp;

use crate::playbook;

#[derive(Debug, Parser)]
#[command(name = "keybrake-demo-audit", about = "The audit half of `make demo`")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write audit rows (JSON lines, as `keybrake-sidecar --audit stdout` prints them) into the
    /// SQLite store through the controller's ingest code path.
    Load {
        #[arg(long)]
        db: PathBuf,
        rows: PathBuf,
    },
    /// Print the morning-after queries of docs/audit.md for one key, last 30 minutes.
    Playbook {
        #[arg(long)]
        db: PathBuf,
        /// `namespace/name` of the VaultKey.
        #[arg(long)]
        key: String,
        /// Rows shown of the key's timeline (first half, …, last half).
        #[arg(long, default_value_t = 10)]
        max_rows: usize,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Load { db, rows } => {
            let body =
                std::fs::read(&rows).with_context(|| format!("reading {}", rows.display()))?;
            let sink = playbook::open(&db).await?;
            let report = playbook::load(&sink, &body).await?;
            println!(
                "audit store {}: {} rows read, {} inserted, {} duplicates",
                db.display(),
                report.rows,
                report.inserted,
                report.duplicates
            );
        }
        Command::Playbook { db, key, max_rows } => {
            anyhow::ensure!(db.exists(), "no audit store at {}", db.display());
            let sink = playbook::open(&db).await?;
            for answer in playbook::morning_after(&sink, &key, Timestamp::now()).await? {
                let n = answer.rows.len();
                println!(
                    "-- {} ({n} row{})",
                    answer.query.title,
                    if n == 1 { "" } else { "s" }
                );
                println!("{}\n", answer.render(Some(max_rows)));
            }
        }
    }
    Ok(())
}
