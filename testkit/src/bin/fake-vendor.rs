//! `fake-vendor --vendor openai --secret sk-test [--listen 127.0.0.1:0] [--addr-file F]`:
//! serves one fake vendor until SIGINT/SIGTERM, printing its base URL on stdout.
#![forbid(unsafe_code)]
use std::{io::Write, net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::Parser;
use keybrake_testkit::{FakeKind, FakeVendor};

#[derive(Parser)]
#[command(about = "A fake vendor API on loopback (stripe | openai | twilio | resend)")]
struct Args {
    #[arg(long)]
    vendor: String,
    /// The upstream secret the fake accepts (Twilio: ACCOUNT_SID:AUTH_TOKEN).
    #[arg(long, env = "FAKE_VENDOR_SECRET")]
    secret: String,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Also write the base URL to this file (written atomically).
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "fake vendors listen on loopback only"
    );
    let kind = FakeKind::parse(&args.vendor)
        .context("--vendor must be stripe, openai, twilio or resend")?;
    let fake = FakeVendor::start_on(kind, &args.secret, args.listen).await?;
    println!("{}", fake.url());
    std::io::stdout().flush()?;
    if let Some(path) = &args.addr_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, fake.url())?;
        std::fs::rename(&tmp, path)?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
