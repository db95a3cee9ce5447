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
    let mut runtime = match args.run.worker_threads {
        // One core: everything runs on this thread, with no cross-thread wake-ups or work
        // stealing between a worker and the thread that blocks on the runtime.
        Some(n) if n <= 1 => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all().build()?.block_on(cli::run(args.run))
}
