//! Time one review of a recorded AdmissionReview, to size the webhook's `timeoutSeconds`:
//! `cargo run --release -p keybrake-inject --example bench_review [ITERATIONS]`.
use std::time::{Duration, Instant};

use keybrake_inject::{InjectionConfig, InjectionResult, review_json};

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let config = InjectionConfig::new(
        "ghcr.io/keybrake/sidecar:0.1.0",
        "https://keybrake-controller.keybrake-system.svc:8443",
    );
    for fixture in [
        "pod-create-opted-in",
        "pod-create-replicaset",
        "pod-create-plain",
    ] {
        let path = format!("{}/tests/data/{fixture}.json", env!("CARGO_MANIFEST_DIR"));
        let body = std::fs::read(&path).expect("recorded fixture");
        let mut samples: Vec<Duration> = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let start = Instant::now();
            let (answer, outcome) = review_json(&body, &config, &|_: InjectionResult| {});
            samples.push(start.elapsed());
            assert!(!answer.is_empty() && outcome.result != InjectionResult::Failed);
        }
        samples.sort();
        let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
        println!(
            "{fixture:<24} n={iterations} p50={:?} p99={:?} max={:?}",
            pct(0.50),
            pct(0.99),
            samples[samples.len() - 1]
        );
    }
}
