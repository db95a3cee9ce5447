#![forbid(unsafe_code)]
use clap::Parser;
use keybrake_controller::app::{Config, run};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(config.log_filter())?)
        .with_writer(std::io::stderr)
        .init();
    let shutdown = CancellationToken::new();
    if config.exit_on_stdin_close {
        if stdin_is_a_pipe() {
            let stop = shutdown.clone();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                stop.cancel();
            });
        } else {
            // /dev/null, a file or a terminal reads as closed (or never closes): exiting on it
            // would stop a controller started without a parent holding a pipe.
            tracing::warn!("--exit-on-stdin-close ignored: standard input is not a pipe");
        }
    }
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        signal.cancel();
    });
    run(config, shutdown).await
}

/// Whether standard input is a pipe or a socket, the only kinds whose end means "the parent
/// is gone".
fn stdin_is_a_pipe() -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata("/proc/self/fd/0")
        .map(|m| m.file_type().is_fifo() || m.file_type().is_socket())
        .unwrap_or(false)
}
