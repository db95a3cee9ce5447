//! Writes the standalone policy file for the benchmarked sidecar and prints the benchmark key
//! (a synthetic token, not a secret) on stdout.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use keybrake_bench::keys::{PolicyFile, bench_token, default_bench_index};

#[derive(Parser)]
#[command(about = "Generate the benchmark sidecar's policy file (JSON)")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Which key the load generator presents (default: 4242, or the middle key when there are
    /// no more than 4242).
    #[arg(long)]
    bench_index: Option<usize>,
    #[arg(long, default_value = "http://127.0.0.1:18080")]
    upstream_url: String,
    #[arg(long, default_value = "customers.retrieve")]
    operation: String,
    #[arg(long)]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bench_index = match args.bench_index {
        Some(index) => index,
        None => default_bench_index(args.keys).context("--keys must be at least 1")?,
    };
    anyhow::ensure!(
        bench_index < args.keys,
        "--bench-index must be below --keys"
    );
    let file = PolicyFile {
        keys: args.keys,
        upstream_url: &args.upstream_url,
        operation: &args.operation,
    };
    std::fs::write(&args.out, file.render())
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("{}", bench_token(bench_index));
    Ok(())
}
