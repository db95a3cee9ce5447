//! Policy lookup micro-benchmark: loads the benchmark policy file through the sidecar's own
//! standalone loader into its `PolicyStore`, then times `lookup` over every key (hits), over
//! hashes of unknown tokens (misses), and SHA-256 + lookup (what a request pays). Prints one
//! `lookup` JSON record.
#![forbid(unsafe_code)]

use std::{hint::black_box, path::PathBuf, time::Instant};

use anyhow::Context as _;
use clap::Parser;
use keybrake_api::{TokenHash, stream::PolicyApply as _};
use keybrake_bench::{keys::bench_token, record::Record};
use keybrake_sidecar::{
    Freshness, PolicyStore,
    standalone::{self, ProcessEnv},
};

#[derive(Parser)]
#[command(about = "Time the sidecar's policy-store lookup")]
struct Args {
    /// Policy file from bench-sidecar-config (its secret variable must be set).
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value_t = 2_000_000)]
    iterations: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let grants = standalone::load(&args.config, &ProcessEnv)
        .with_context(|| format!("loading {}", args.config.display()))?;
    let keys = grants.len();
    anyhow::ensure!(keys > 0, "the policy file has no keys");
    let store = PolicyStore::new(Freshness::AlwaysFresh);
    store.replace_all(grants, 1);

    let tokens: Vec<String> = (0..keys).map(bench_token).collect();
    let known: Vec<TokenHash> = tokens.iter().map(|t| TokenHash::of(t)).collect();
    let unknown: Vec<TokenHash> = (keys..2 * keys)
        .map(|i| TokenHash::of(&bench_token(i)))
        .collect();
    anyhow::ensure!(
        store.lookup(&known[keys / 2]).is_some(),
        "a generated key is not in the store"
    );
    anyhow::ensure!(
        store.lookup(&unknown[0]).is_none(),
        "an unknown key was found"
    );

    let per_call = |work: &dyn Fn(usize) -> bool| {
        // Warm up caches and branch predictors on the same access pattern first.
        for i in 0..keys {
            black_box(work(i));
        }
        let started = Instant::now();
        let mut found = 0u64;
        for i in 0..args.iterations {
            found += u64::from(work(i as usize % keys));
        }
        black_box(found);
        started.elapsed().as_secs_f64() * 1e9 / args.iterations as f64
    };
    let hit_ns = per_call(&|i| store.lookup(black_box(&known[i])).is_some());
    let miss_ns = per_call(&|i| store.lookup(black_box(&unknown[i])).is_some());
    let hash_and_hit_ns = per_call(&|i| {
        store
            .lookup(&TokenHash::of(black_box(&tokens[i])))
            .is_some()
    });
    let record = Record::Lookup {
        keys,
        iterations: args.iterations,
        hit_ns,
        miss_ns,
        hash_and_hit_ns,
    };
    println!("{}", serde_json::to_string(&record)?);
    Ok(())
}
