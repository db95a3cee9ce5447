//! `keybrake-cluster serve`: start a control plane and keep it running until SIGTERM/SIGINT
//! (what `make cluster` runs in the background). `keybrake-cluster time-start`: measure warm
//! start times.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use keybrake_e2e::{ControlPlane, PlaneOptions};

#[derive(Parser)]
#[command(about = "A local kube-apiserver + etcd for Keybrake development")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a plane in DIR and serve until SIGTERM/SIGINT, then stop it and remove DIR.
    Serve {
        /// Plane directory (certificates, etcd data, logs, kubeconfig).
        #[arg(long)]
        dir: PathBuf,
        /// Shell file to write once ready: exports KUBECONFIG and puts kubectl and helm first on PATH.
        #[arg(long)]
        env_file: PathBuf,
        /// Where to write this process's pid.
        #[arg(long)]
        pid_file: PathBuf,
    },
    /// Start and stop RUNS planes one after another; print spawn → /readyz times.
    TimeStart {
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Serve {
            dir,
            env_file,
            pid_file,
        } => serve(dir, &env_file, &pid_file),
        Cmd::TimeStart { runs } => time_start(runs),
    }
}

fn serve(dir: PathBuf, env_file: &Path, pid_file: &Path) -> Result<()> {
    std::fs::write(pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("write {}", pid_file.display()))?;
    let plane = ControlPlane::start_with(PlaneOptions { dir: Some(dir) })?;
    let startup = plane.startup().expect("a started plane has timings");
    let bins = plane.binaries();
    let helm_dir = bins.helm.parent().expect("helm has a parent dir");
    let env = format!(
        "# Written by `make cluster` (keybrake-cluster serve, pid {pid}). Usage: source target/e2e/env\n\
         export KUBECONFIG={kubeconfig}\n\
         export PATH={kubectl_dir}:{helm_dir}:\"$PATH\"\n",
        pid = std::process::id(),
        kubeconfig = shell_quote(plane.kubeconfig()),
        kubectl_dir = shell_quote(bins.kubectl_dir()),
        helm_dir = shell_quote(helm_dir),
    );
    std::fs::write(env_file, env).with_context(|| format!("write {}", env_file.display()))?;
    println!(
        "control plane ready at {} in {} ms (etcd {} ms, kube-apiserver {} ms); kubeconfig {}",
        plane.server_url(),
        startup.total.as_millis(),
        startup.etcd.as_millis(),
        startup.apiserver.as_millis(),
        plane.kubeconfig().display()
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        anyhow::Ok(())
    })?;
    println!("stopping control plane");
    let _ = std::fs::remove_file(env_file);
    plane.stop();
    let _ = std::fs::remove_file(pid_file);
    Ok(())
}

fn time_start(runs: usize) -> Result<()> {
    let mut totals = Vec::new();
    for run in 1..=runs {
        let plane = ControlPlane::start()?;
        let t = plane.startup().expect("a started plane has timings");
        println!(
            "run {run}: total {} ms (etcd {} ms, kube-apiserver {} ms)",
            t.total.as_millis(),
            t.etcd.as_millis(),
            t.apiserver.as_millis()
        );
        totals.push(t.total.as_millis());
        plane.stop();
    }
    totals.sort_unstable();
    if let (Some(min), Some(max)) = (totals.first(), totals.last()) {
        println!(
            "warm start over {runs} runs: median {} ms, min {min} ms, max {max} ms",
            totals[totals.len() / 2]
        );
    }
    Ok(())
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}
