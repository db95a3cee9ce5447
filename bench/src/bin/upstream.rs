//! The benchmark upstream: answers every request with the same 1 KB body over keep-alive
//! HTTP/1.1. One current-thread runtime, so `taskset -c 0` confines it to one core.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use keybrake_bench::upstream::{Upstream, serve};

#[derive(Parser)]
#[command(about = "Fixed 1 KB body HTTP/1.1 upstream for the data-plane benchmark")]
struct Args {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:18080")]
    listen: SocketAddr,
    /// If set, requests whose Authorization header differs get 401, so a proxy that fails to
    /// swap the header shows up as errors instead of as fast responses.
    #[arg(long)]
    expect_authorization: Option<String>,
    /// Response body size in bytes.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "listen address must be loopback"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    let upstream = Upstream::new(args.body_bytes, args.expect_authorization);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        eprintln!("bench-upstream listening on {}", args.listen);
        serve(listener, upstream).await
    })
}
