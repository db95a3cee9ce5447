//! Open-loop load generator: a fixed request rate over N keep-alive connections, latency from
//! each request's intended send time. Prints one `latency` JSON record on stdout per `--url`.
//! Several `--url`s share one schedule, interleaved call by call (see `openloop`): each gets
//! `--rate` calls/s over its own `--connections`.
#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use keybrake_bench::{
    client::Target,
    openloop::{self, Arm, Plan, Samples},
    record::{Layout, Record, Via},
    stats::percentile,
};

#[derive(Parser)]
#[command(about = "Fixed-rate load with coordinated-omission correction")]
struct Args {
    /// http://127.0.0.1:PORT/PATH; repeatable (arms on one interleaved schedule).
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// Requests per second per URL, all its connections together.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Extra request header, "Name: value"; repeatable.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Count a response whose body is not this many bytes as an error.
    #[arg(long)]
    expect_body: Option<usize>,
    /// Labels copied into the record.
    #[arg(long, value_enum)]
    via: Via,
    #[arg(long, value_enum, default_value_t = Layout::Isolated)]
    layout: Layout,
    #[arg(long, default_value_t = 0)]
    round: u32,
    /// Also write every measured latency (µs, one per line, ascending) to this file, so
    /// percentiles can be taken over several runs pooled. One per `--url`, in order.
    #[arg(long)]
    latencies_out: Vec<std::path::PathBuf>,
    /// Also write every measured call as "intended-send-ms latency-µs" (schedule order, time
    /// counted from the end of the warm-up), for resampling by blocks of time. One per `--url`.
    #[arg(long)]
    timed_out: Vec<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rate > 0.0 && args.connections > 0,
        "rate and connections must be > 0"
    );
    anyhow::ensure!(
        args.duration > 0.0 && args.warmup >= 0.0,
        "durations must be positive"
    );
    for (flag, files) in [
        ("--latencies-out", &args.latencies_out),
        ("--timed-out", &args.timed_out),
    ] {
        anyhow::ensure!(
            files.is_empty() || files.len() == args.urls.len(),
            "{flag} must be given once per --url ({} URLs, {} files)",
            args.urls.len(),
            files.len()
        );
    }
    let targets = args
        .urls
        .iter()
        .map(|url| Target::parse(url).with_context(|| format!("--url {url}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let requests: Vec<Vec<u8>> = targets
        .iter()
        .map(|target| target.get_request(&args.headers))
        .collect();
    let plan = Plan {
        rate: args.rate,
        connections: args.connections,
        arms: targets.len(),
        warmup: Duration::from_secs_f64(args.warmup),
        measure: Duration::from_secs_f64(args.duration),
        timeout: Duration::from_secs(5),
    };
    let arms: Vec<Arm<'_>> = targets
        .iter()
        .zip(&requests)
        .map(|(target, request)| Arm { target, request })
        .collect();
    let per_arm = openloop::run_arms(&plan, &arms, args.expect_body);
    let expected = (args.rate * args.duration).round() as u64;
    for (index, samples) in per_arm.iter().enumerate() {
        let got = samples.latency.len() as u64 + samples.errors;
        anyhow::ensure!(
            got + got / 100 + 2 >= expected,
            "{}: only {got} of {expected} scheduled requests completed: the generator could not keep up",
            args.urls[index]
        );
        if let Some(path) = args.latencies_out.get(index) {
            let mut text = String::with_capacity(samples.latency.len() * 8);
            for latency in &samples.latency {
                text.push_str(&format!("{:.1}\n", latency.as_secs_f64() * 1e6));
            }
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = args.timed_out.get(index) {
            let mut text = String::with_capacity(samples.timed.len() * 16);
            for (intended, latency) in &samples.timed {
                text.push_str(&format!(
                    "{:.3} {:.1}\n",
                    intended.as_secs_f64() * 1e3,
                    latency.as_secs_f64() * 1e6
                ));
            }
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        println!("{}", serde_json::to_string(&record(&args, samples))?);
    }
    Ok(())
}

fn record(args: &Args, samples: &Samples) -> Record {
    let us = |sorted: &[Duration], q: f64| {
        // Tenths of a microsecond are plenty; more digits are clock noise.
        percentile(sorted, q).map_or(f64::NAN, |d| (d.as_secs_f64() * 1e7).round() / 10.0)
    };
    Record::Latency {
        via: args.via,
        layout: args.layout,
        round: args.round,
        rate: args.rate,
        connections: args.connections,
        ok: samples.latency.len() as u64,
        errors: samples.errors,
        p50_us: us(&samples.latency, 50.0),
        p90_us: us(&samples.latency, 90.0),
        p99_us: us(&samples.latency, 99.0),
        p999_us: us(&samples.latency, 99.9),
        max_us: us(&samples.latency, 100.0),
        service_p50_us: us(&samples.service, 50.0),
        service_p99_us: us(&samples.service, 99.0),
    }
}
