//! The audit-overhead table (bench section `auditoverhead`): reads the stretches file the
//! section wrote and prints the Markdown table, the A/A noise floor first (see
//! `keybrake_bench::overhead`).
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use keybrake_bench::overhead::{self, PairSummary};

#[derive(Parser)]
#[command(about = "Audit overhead: paired p99 ratios with block-bootstrap intervals")]
struct Args {
    /// Tab-separated, one line per arm and stretch (see `overhead::read_stretches`).
    #[arg(long)]
    stretches: PathBuf,
    /// Audited pairs to report, in order (the A/A pair is `aa`).
    #[arg(long = "pair", required = true)]
    pairs: Vec<String>,
    /// Block length for the bootstrap, ms of schedule time.
    #[arg(long, default_value_t = 1000.0)]
    block_ms: f64,
    #[arg(long, default_value_t = 2000)]
    resamples: usize,
    /// The target: test p99 ÷ base p99 ≤ this.
    #[arg(long, default_value_t = 1.10)]
    limit: f64,
}

fn label(pair: &str) -> String {
    match pair {
        "aa" => "`--audit none` (A/A: noise floor)".to_owned(),
        "sqlite" => "SQLite file (`--audit sqlite:///…`)".to_owned(),
        "postgres" => "PostgreSQL (`--audit postgres://…`, same machine)".to_owned(),
        other => other.to_owned(),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stretches = overhead::read_stretches(&args.stretches)?;
    let summarize = |pair: &str, seed: u64| -> anyhow::Result<PairSummary> {
        overhead::summarize(&stretches, pair, args.block_ms, args.resamples, seed).with_context(
            || {
                format!(
                    "no paired samples for {pair} in {}",
                    args.stretches.display()
                )
            },
        )
    };
    let aa = summarize("aa", 1)?;
    let audited = args
        .pairs
        .iter()
        .enumerate()
        .map(|(index, pair)| summarize(pair, 2 + index as u64))
        .collect::<anyhow::Result<Vec<_>>>()?;
    print!("{}", overhead::render(&aa, &audited, args.limit, &label));
    Ok(())
}
