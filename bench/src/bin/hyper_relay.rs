//! The hyper floor of the data-plane benchmark: a minimal hyper reverse proxy for
//! `GET /stripe/<rest>` (bench/src/relay.rs). One current-thread runtime, so `taskset -c 1`
//! confines it to one core like the sidecar.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use keybrake_bench::relay::{Relay, serve};

#[derive(Parser)]
#[command(
    about = "Minimal hyper HTTP/1.1 relay: /stripe/<rest> -> upstream /<rest>, Authorization swapped"
)]
struct Args {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:18085")]
    listen: SocketAddr,
    /// The upstream (loopback only).
    #[arg(long, default_value = "127.0.0.1:18080")]
    upstream: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.listen.ip().is_loopback() && args.upstream.ip().is_loopback(),
        "listen and upstream addresses must be loopback"
    );
    let secret = std::env::var("KEYBRAKE_BENCH_UPSTREAM_SECRET")
        .context("KEYBRAKE_BENCH_UPSTREAM_SECRET (the credential sent upstream) is not set")?;
    let relay = Relay::new(args.upstream, &secret)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        eprintln!("bench-hyper-relay listening on {}", args.listen);
        serve(listener, relay).await.context("accepting")
    })
}
