#![forbid(unsafe_code)]
use clap::Parser;
use keybrake_sidecar::cli::{self, Cli, Command};

fn main() -> anyhow::Result<()> {
    let args = Cli::parse();
    if let Some(Command::HashKey) = args.command {
        println!("{}", cli::hash_key(std::io::stdin().lock())?);
        return Ok(());
    }
    cli::init_logging(args.run.log_format);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.run.worker_threads {
        runtime.worker_threads(n.max(1));
    }
    runtime.enable_all().build()?.block_on(cli::run(args.run))
}
