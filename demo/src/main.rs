#![forbid(unsafe_code)]
use clap::Parser;
use keybrake_demo::cli::{Cli, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    run(Cli::parse()).await
}
