//! The glue bench/run.sh calls: turns wrk and /usr/bin/time output into JSON records, renders
//! the data-plane tables, and splices a section into docs/BENCHMARKS.md.
#![forbid(unsafe_code)]

use std::{fs, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use keybrake_bench::{
    cpu::CpuTicks,
    dataplane,
    doc::splice_section,
    record::{Record, Via},
    rss, wrk,
};

#[derive(Parser)]
#[command(about = "Benchmark record and report helper for bench/run.sh")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read wrk's output on stdin, print a `throughput` record.
    Wrk {
        #[arg(long, value_enum)]
        via: Via,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        round: u32,
        /// The proxy process, read again now: with --cpu-before, the record carries its CPU
        /// per request.
        #[arg(long, requires = "cpu_before")]
        pid: Option<u32>,
        /// The proxy's `cpu-ticks` reading taken just before the run.
        #[arg(long, requires = "pid")]
        cpu_before: Option<String>,
    },
    /// Print a process's CPU ticks so far ("USER SYSTEM"), for `wrk --cpu-before`.
    CpuTicks {
        #[arg(long)]
        pid: u32,
    },
    /// Print a `peak_rss` record from `/usr/bin/time -v` output or /proc/PID/status, or with
    /// --at-rest an `rss_at_rest` record (the process's RSS right now, from /proc/PID/status).
    Rss {
        #[arg(long, value_enum)]
        via: Via,
        #[arg(long, default_value_t = 0)]
        keys: usize,
        #[arg(long, conflicts_with = "pid")]
        time_output: Option<PathBuf>,
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, requires = "pid")]
        at_rest: bool,
    },
    /// Render the data-plane Markdown from a results file of JSON records.
    Dataplane {
        #[arg(long)]
        results: PathBuf,
    },
    /// Replace one section of a Markdown document (between its markers) with a fragment.
    Splice {
        #[arg(long)]
        doc: PathBuf,
        #[arg(long)]
        section: String,
        #[arg(long)]
        fragment: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Wrk {
            via,
            connections,
            round,
            pid,
            cpu_before,
        } => {
            let output = std::io::read_to_string(std::io::stdin())?;
            let summary = wrk::parse(&output).with_context(|| format!("wrk said:\n{output}"))?;
            let cpu = match (pid, cpu_before) {
                (Some(pid), Some(before)) => {
                    let before = CpuTicks::parse_pair(&before)?;
                    cpu_ticks(pid)?.per_request_since(before, summary.requests)
                }
                _ => None,
            };
            let record = Record::Throughput {
                via,
                connections,
                round,
                requests_per_sec: summary.requests_per_sec,
                requests: summary.requests,
                errors: summary.non_2xx + summary.socket_errors,
                cpu,
            };
            println!("{}", serde_json::to_string(&record)?);
        }
        Command::CpuTicks { pid } => println!("{}", cpu_ticks(pid)?),
        Command::Rss {
            via,
            keys,
            time_output,
            pid,
            at_rest,
        } => {
            if at_rest {
                let pid = pid.context("--at-rest needs --pid")?;
                let path = format!("/proc/{pid}/status");
                let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
                let record = Record::RssAtRest {
                    via,
                    keys,
                    rss_kb: rss::current_from_proc_status(&text)?,
                    source: "VmRSS in /proc/PID/status".to_owned(),
                };
                println!("{}", serde_json::to_string(&record)?);
                return Ok(());
            }
            let (max_rss_kb, source) = match (time_output, pid) {
                (Some(path), _) => {
                    let text = fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    (
                        rss::from_time_verbose(&text)?,
                        "/usr/bin/time -v".to_owned(),
                    )
                }
                (None, Some(pid)) => {
                    let path = format!("/proc/{pid}/status");
                    let text =
                        fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
                    (
                        rss::from_proc_status(&text)?,
                        "VmHWM in /proc/PID/status".to_owned(),
                    )
                }
                (None, None) => anyhow::bail!("give --time-output FILE or --pid PID"),
            };
            let record = Record::PeakRss {
                via,
                keys,
                max_rss_kb,
                source,
            };
            println!("{}", serde_json::to_string(&record)?);
        }
        Command::Dataplane { results } => {
            let text = fs::read_to_string(&results)
                .with_context(|| format!("reading {}", results.display()))?;
            let records = Record::parse_lines(&text).context("parsing results")?;
            print!("{}", dataplane::render(&records).markdown);
        }
        Command::Splice {
            doc,
            section,
            fragment,
        } => {
            let current = fs::read_to_string(&doc).unwrap_or_default();
            let fragment = fs::read_to_string(&fragment)
                .with_context(|| format!("reading {}", fragment.display()))?;
            let updated = splice_section(&current, &section, &fragment)?;
            fs::write(&doc, updated).with_context(|| format!("writing {}", doc.display()))?;
        }
    }
    Ok(())
}

fn cpu_ticks(pid: u32) -> anyhow::Result<CpuTicks> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    CpuTicks::from_proc_stat(&text).with_context(|| format!("parsing {path}"))
}
