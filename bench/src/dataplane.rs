//! Turns the data-plane records of one run into the Markdown tables of docs/BENCHMARKS.md,
//! each beside its baseline, with the ratio and the target of issue 3.

use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    cpu::CpuPerRequest,
    record::{Layout, Record, Via},
    stats::median,
};

/// Issue 3's targets.
pub const ADDED_P50_MAX_MS: f64 = 0.1;
pub const ADDED_P99_MAX_MS: f64 = 0.5;
pub const RSS_MAX_BYTES: f64 = 30e6;
pub const LOOKUP_MAX_NS: f64 = 1000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Met,
    NotMet,
    /// Measured, but the run had errors, so the number proves nothing.
    Errors,
    NotMeasured,
}

impl Outcome {
    fn judge(value: Option<f64>, ok: impl FnOnce(f64) -> bool) -> Self {
        match value {
            None => Outcome::NotMeasured,
            Some(v) if ok(v) => Outcome::Met,
            Some(_) => Outcome::NotMet,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Met => "met",
            Outcome::NotMet => "**not met**",
            Outcome::Errors => "**not met (errors)**",
            Outcome::NotMeasured => "not measured",
        }
    }
}

/// The rendered section plus every target's outcome, so callers can summarise.
pub struct Report {
    pub markdown: String,
    pub outcomes: Vec<(String, Outcome)>,
}

pub fn render(records: &[Record]) -> Report {
    let mut out = String::new();
    let mut outcomes = Vec::new();
    throughput_table(records, &mut out, &mut outcomes);
    cpu_table(records, &mut out);
    latency_table(records, &mut out, &mut outcomes);
    memory_table(records, &mut out, &mut outcomes);
    lookup_table(records, &mut out, &mut outcomes);
    let met = outcomes.iter().filter(|(_, o)| *o == Outcome::Met).count();
    let mut markdown = format!("**Issue 3 targets met: {met} of {}.**", outcomes.len());
    let missed: Vec<&str> = outcomes
        .iter()
        .filter(|(_, o)| *o != Outcome::Met)
        .map(|(n, _)| n.as_str())
        .collect();
    if !missed.is_empty() {
        let _ = write!(markdown, " Not met or not measured: {}.", missed.join("; "));
    }
    markdown.push_str("\n\n");
    markdown.push_str(&out);
    Report { markdown, outcomes }
}

fn throughput_table(records: &[Record], out: &mut String, outcomes: &mut Vec<(String, Outcome)>) {
    // (connections, via) -> (rates per round, errors)
    let mut runs: BTreeMap<(usize, Via), (Vec<f64>, u64)> = BTreeMap::new();
    // (connections, round, via) -> rate, for ratios paired within a round.
    let mut by_round: BTreeMap<(usize, u32, Via), f64> = BTreeMap::new();
    for record in records {
        if let Record::Throughput {
            via,
            connections,
            round,
            requests_per_sec,
            errors,
            ..
        } = record
        {
            let entry = runs.entry((*connections, *via)).or_default();
            entry.0.push(*requests_per_sec);
            entry.1 += errors;
            by_round.insert((*connections, *round, *via), *requests_per_sec);
        }
    }
    let rounds = runs
        .values()
        .map(|(rates, _)| rates.len())
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "### Throughput at saturation\n\n\
         Requests/s, median of {rounds} interleaved rounds (min–max in brackets); wrk, one \
         thread, pinned to core 0 with the upstream; each proxy pinned to core 1. \
         `hyper (floor)` is bench-hyper-relay (see Targets): hyper + Tokio doing only nginx's \
         job, so hyper ÷ nginx is what the stack costs and sidecar ÷ hyper is the sidecar's own \
         work. The floor is shown, not judged: the target is against nginx. \
         \"Per round\" pairs sidecar and nginx within each round (the rounds are interleaved, so \
         slow drift of the machine cancels): median of the rounds' ratios (min–max). The target \
         is met only when both readings, the ratio of the medians and the per-round median, are \
         ≥ 1.00.\n"
    );
    out.push_str(
        "| connections | direct | nginx (baseline) | hyper (floor) | sidecar | sidecar ÷ nginx | \
         sidecar ÷ nginx per round | hyper ÷ nginx | sidecar ÷ hyper | target | met? |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    let mut connection_counts: Vec<usize> = runs.keys().map(|(c, _)| *c).collect();
    connection_counts.dedup();
    for connections in connection_counts {
        let cell = |via: Via| runs.get(&(connections, via));
        let med = |via: Via| cell(via).and_then(|(rates, _)| median(rates.iter().copied()));
        let ratio_of = |over: Via, under: Via| match (med(over), med(under)) {
            (Some(o), Some(u)) if u > 0.0 => Some(o / u),
            _ => None,
        };
        let ratio = ratio_of(Via::Sidecar, Via::Nginx);
        let paired: Vec<f64> = by_round
            .iter()
            .filter(|((c, _, via), _)| *c == connections && *via == Via::Sidecar)
            .filter_map(|((_, round, _), sidecar)| {
                let nginx = by_round.get(&(connections, *round, Via::Nginx))?;
                (*nginx > 0.0).then(|| sidecar / nginx)
            })
            .collect();
        let errors = cell(Via::Sidecar).is_some_and(|(_, e)| *e > 0);
        // Met only when both readings agree: the ratio of the medians and the median of the
        // per-round ratios (either alone can flatter a noisy run).
        let paired_median = median(paired.iter().copied());
        let judged = match (ratio, paired_median) {
            (Some(r), Some(p)) => Some(r.min(p)),
            (r, p) => r.or(p),
        };
        let outcome = if errors {
            Outcome::Errors
        } else {
            Outcome::judge(judged, |r| r >= 1.0)
        };
        outcomes.push((
            format!("throughput ≥ nginx at {connections} connections"),
            outcome,
        ));
        let _ = writeln!(
            out,
            "| {connections} | {} | {} | {} | {} | {} | {} | {} | {} | ≥ 1.00 | {} |",
            rate_cell(cell(Via::Direct)),
            rate_cell(cell(Via::Nginx)),
            rate_cell(cell(Via::Hyper)),
            rate_cell(cell(Via::Sidecar)),
            ratio_cell(ratio),
            spread_cell(&paired),
            ratio_cell(ratio_of(Via::Hyper, Via::Nginx)),
            ratio_cell(ratio_of(Via::Sidecar, Via::Hyper)),
            outcome.label()
        );
    }
    error_note(
        out,
        runs.iter()
            .map(|((connections, via), (_, errors))| (*via, *connections, *errors)),
    );
    out.push('\n');
}

/// CPU per request of each proxy in the throughput rounds: shown, not judged. It says whether a
/// gap is the proxy's own work (user) or the socket calls every proxy makes (system).
fn cpu_table(records: &[Record], out: &mut String) {
    // (connections, via) -> (user µs, system µs) per round
    let mut runs: BTreeMap<(usize, Via), Vec<CpuPerRequest>> = BTreeMap::new();
    for record in records {
        if let Record::Throughput {
            via,
            connections,
            cpu: Some(cpu),
            ..
        } = record
        {
            runs.entry((*connections, *via)).or_default().push(*cpu);
        }
    }
    if runs.is_empty() {
        return;
    }
    out.push_str(
        "#### CPU per request in those rounds (shown, not judged)\n\n\
         Microseconds of CPU the proxy process spent per request, user + system (all its \
         threads; /proc/PID/stat before and after each wrk run, 10 ms ticks), median over the \
         rounds. Where the proxy's core is saturated its requests/s is about 10⁶ ÷ the total; at \
         1 connection it idles between requests and each request pays for waking it up.\n\n\
         | connections | nginx | hyper (floor) | sidecar | sidecar ÷ nginx, user | \
         sidecar ÷ nginx, total |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut connection_counts: Vec<usize> = runs.keys().map(|(c, _)| *c).collect();
    connection_counts.dedup();
    for connections in connection_counts {
        let med = |via: Via| {
            let rounds = runs.get(&(connections, via))?;
            Some((
                median(rounds.iter().map(|cpu| cpu.user_us))?,
                median(rounds.iter().map(|cpu| cpu.system_us))?,
            ))
        };
        let cell = |via: Via| {
            med(via).map_or("—".into(), |(user, system)| {
                format!("{user:.1} + {system:.1}")
            })
        };
        let ratio = |of: fn((f64, f64)) -> f64| match (med(Via::Sidecar), med(Via::Nginx)) {
            (Some(sidecar), Some(nginx)) if of(nginx) > 0.0 => Some(of(sidecar) / of(nginx)),
            _ => None,
        };
        let _ = writeln!(
            out,
            "| {connections} | {} | {} | {} | {} | {} |",
            cell(Via::Nginx),
            cell(Via::Hyper),
            cell(Via::Sidecar),
            ratio_cell(ratio(|(user, _)| user)),
            ratio_cell(ratio(|(user, system)| user + system)),
        );
    }
    out.push('\n');
}

fn ratio_cell(ratio: Option<f64>) -> String {
    ratio.map_or("—".into(), |r| format!("{r:.2}"))
}

/// Median of ratios with their min–max; a single ratio alone.
fn spread_cell(ratios: &[f64]) -> String {
    let Some(mid) = median(ratios.iter().copied()) else {
        return "—".into();
    };
    if ratios.len() == 1 {
        return format!("{mid:.2}");
    }
    let low = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let high = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{mid:.2} ({low:.2}–{high:.2})")
}

fn rate_cell(runs: Option<&(Vec<f64>, u64)>) -> String {
    let Some((rates, _)) = runs else {
        return "not run".into();
    };
    let Some(mid) = median(rates.iter().copied()) else {
        return "not run".into();
    };
    if rates.len() == 1 {
        return format!("{mid:.0}");
    }
    let low = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let high = rates.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{mid:.0} ({low:.0}–{high:.0})")
}

fn error_note(out: &mut String, cells: impl Iterator<Item = (Via, usize, u64)>) {
    let bad: Vec<String> = cells
        .filter(|(_, _, errors)| *errors > 0)
        .map(|(via, connections, errors)| format!("{} at {connections}: {errors}", via.label()))
        .collect();
    if !bad.is_empty() {
        let _ = writeln!(
            out,
            "\nErrors (non-2xx or socket errors): {}.",
            bad.join(", ")
        );
    }
}

struct LatencyRound {
    round: u32,
    via: Via,
    layout: Layout,
    percentiles: [f64; 4],
    service: [f64; 2],
    errors: u64,
    rate: f64,
    connections: usize,
}

const PERCENTILES: [&str; 4] = ["p50", "p90", "p99", "p99.9"];

/// The layout whose added latency is judged against the targets: the pod layout when the run
/// measured it (there the direct path crosses cores exactly as often as a proxied call, as
/// between an agent's pod and a remote vendor), else the isolated one (older runs).
fn judged_layout(rounds: &[LatencyRound]) -> Layout {
    if rounds.iter().any(|r| r.layout == Layout::Pod) {
        Layout::Pod
    } else {
        Layout::Isolated
    }
}

fn latency_table(records: &[Record], out: &mut String, outcomes: &mut Vec<(String, Outcome)>) {
    let rounds: Vec<LatencyRound> = records
        .iter()
        .filter_map(|record| match record {
            Record::Latency {
                via,
                layout,
                round,
                rate,
                connections,
                errors,
                p50_us,
                p90_us,
                p99_us,
                p999_us,
                service_p50_us,
                service_p99_us,
                ..
            } => Some(LatencyRound {
                round: *round,
                via: *via,
                layout: *layout,
                percentiles: [*p50_us, *p90_us, *p99_us, *p999_us].map(|us| us / 1000.0),
                service: [*service_p50_us, *service_p99_us].map(|us| us / 1000.0),
                errors: *errors,
                rate: *rate,
                connections: *connections,
            }),
            _ => None,
        })
        .collect();
    let (rate, connections) = rounds
        .first()
        .map_or((1000.0, 16), |r| (r.rate, r.connections));
    let judged = judged_layout(&rounds);
    let _ = writeln!(
        out,
        "### Added latency at {rate:.0} requests/s, {connections} connections\n\n\
         Milliseconds, corrected for coordinated omission (measured from each request's \
         intended send time; bench-loadgen, open loop). \"Added\" is (through the proxy) minus \
         (direct) for the same percentile in the same round; every value is the median of the \
         interleaved rounds. `splice` is a byte-splicing TCP relay (socat, no HTTP parsing): \
         what it adds is the floor any proxy pays for the extra hop in that layout. `hyper` is \
         bench-hyper-relay (see Targets): the floor of a proxy on the sidecar's stack, shown, \
         not judged. Targets are judged in the {} layout: there a direct call crosses cores as often as a proxied one, as \
         between an agent's pod and a remote vendor. The isolated table shows what the same \
         proxies, and the relay, add when the proxy has a core to itself.\n",
        judged.label()
    );
    for layout in [Layout::Pod, Layout::Isolated] {
        let of_layout: Vec<&LatencyRound> = rounds.iter().filter(|r| r.layout == layout).collect();
        if of_layout.is_empty() && layout != judged {
            continue;
        }
        layout_latency_table(&of_layout, layout, layout == judged, out, outcomes);
    }
}

fn layout_latency_table(
    rounds: &[&LatencyRound],
    layout: Layout,
    judged: bool,
    out: &mut String,
    outcomes: &mut Vec<(String, Outcome)>,
) {
    let round_count = rounds.iter().map(|r| r.round).max().map_or(0, |m| m + 1);
    let placement = match layout {
        Layout::Pod => {
            "load generator and proxy share core 0 (an agent and its sidecar in one pod), \
             upstream on core 1 (the remote vendor)"
        }
        Layout::Isolated => {
            "load generator and upstream on core 0, proxy alone on core 1: a direct call never \
             leaves core 0 while a proxied one crosses cores four times"
        }
    };
    let _ = writeln!(
        out,
        "#### {} layout ({round_count} rounds){}\n\n{placement}.\n",
        layout.label(),
        if judged { ", judged" } else { ", not judged" }
    );
    out.push_str(
        "| percentile | direct | splice | nginx | hyper | sidecar | splice added (floor) | nginx added \
         (baseline) | hyper added (floor) | sidecar added | sidecar added ÷ nginx added | target \
         (sidecar added) | met? |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    let find = |round: u32, via: Via| rounds.iter().find(|r| r.round == round && r.via == via);
    let level = |via: Via, index: usize| {
        median(
            rounds
                .iter()
                .filter(|r| r.via == via)
                .map(|r| r.percentiles[index]),
        )
    };
    let added = |via: Via, index: usize| {
        median((0..round_count).filter_map(|round| {
            Some(
                find(round, via)?.percentiles[index] - find(round, Via::Direct)?.percentiles[index],
            )
        }))
    };
    let sidecar_errors: u64 = rounds
        .iter()
        .filter(|r| r.via == Via::Sidecar)
        .map(|r| r.errors)
        .sum();
    for (index, name) in PERCENTILES.iter().enumerate() {
        let sidecar_added = added(Via::Sidecar, index);
        let nginx_added = added(Via::Nginx, index);
        let ratio = match (sidecar_added, nginx_added) {
            (Some(s), Some(n)) if n > 0.0 => format!("{:.2}", s / n),
            _ => "—".into(),
        };
        let limit = match *name {
            "p50" => Some(ADDED_P50_MAX_MS),
            "p99" => Some(ADDED_P99_MAX_MS),
            _ => None,
        };
        let (target, verdict) = match limit {
            Some(limit) if judged => {
                let outcome = if sidecar_errors > 0 {
                    Outcome::Errors
                } else {
                    Outcome::judge(sidecar_added, |v| v <= limit)
                };
                outcomes.push((
                    format!("added {name} ≤ {limit} ms ({} layout)", layout.label()),
                    outcome,
                ));
                (format!("≤ {limit:.3}"), outcome.label())
            }
            Some(limit) => (format!("(≤ {limit:.3})"), "not judged"),
            None => ("—".into(), "—"),
        };
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {ratio} | {target} | {verdict} |",
            ms(level(Via::Direct, index)),
            ms(level(Via::Splice, index)),
            ms(level(Via::Nginx, index)),
            ms(level(Via::Hyper, index)),
            ms(level(Via::Sidecar, index)),
            ms(added(Via::Splice, index)),
            ms(nginx_added),
            ms(added(Via::Hyper, index)),
            ms(sidecar_added),
        );
    }
    let service = |via: Via, index: usize| {
        median(
            rounds
                .iter()
                .filter(|r| r.via == via)
                .map(|r| r.service[index]),
        )
    };
    let uncorrected: Vec<String> = [
        Via::Direct,
        Via::Splice,
        Via::Nginx,
        Via::Hyper,
        Via::Sidecar,
    ]
    .into_iter()
    .map(|via| {
        format!(
            "{} {} / {}",
            via.label(),
            ms(service(via, 0)),
            ms(service(via, 1))
        )
    })
    .collect();
    let _ = writeln!(
        out,
        "\nUncorrected (from actual send) p50 / p99, for comparison: {} ms.",
        uncorrected.join(", ")
    );
    error_note(out, rounds.iter().map(|r| (r.via, r.connections, r.errors)));
    out.push('\n');
}

fn ms(value: Option<f64>) -> String {
    value.map_or("—".into(), |v| format!("{v:.3}"))
}

/// One RSS reading of a process: keys loaded, bytes, where the number came from.
type RssReading<'a> = (usize, f64, &'a str);

fn memory_table(records: &[Record], out: &mut String, outcomes: &mut Vec<(String, Outcome)>) {
    let peak = |wanted: Via| {
        records.iter().find_map(|record| match record {
            Record::PeakRss {
                via,
                keys,
                max_rss_kb,
                source,
            } if *via == wanted => Some((*keys, *max_rss_kb as f64 * 1024.0, source.as_str())),
            _ => None,
        })
    };
    let at_rest = |wanted: Via| {
        records.iter().find_map(|record| match record {
            Record::RssAtRest {
                via,
                keys,
                rss_kb,
                source,
            } if *via == wanted => Some((*keys, *rss_kb as f64 * 1024.0, source.as_str())),
            _ => None,
        })
    };
    let (sidecar_peak, nginx_peak) = (peak(Via::Sidecar), peak(Via::Nginx));
    let (sidecar_rest, nginx_rest) = (at_rest(Via::Sidecar), at_rest(Via::Nginx));
    // The target line is judged on the peak: the stricter of the two readings.
    let outcome = Outcome::judge(sidecar_peak.map(|s| s.1), |bytes| bytes <= RSS_MAX_BYTES);
    let rest_outcome = Outcome::judge(sidecar_rest.map(|s| s.1), |bytes| bytes <= RSS_MAX_BYTES);
    let keys = sidecar_peak.or(sidecar_rest).map_or(10_000, |s| s.0);
    outcomes.push((format!("peak RSS ≤ 30 MB with {keys} keys"), outcome));
    let ratio = |sidecar: Option<RssReading>, nginx: Option<RssReading>| match (sidecar, nginx) {
        (Some(s), Some(n)) if n.1 > 0.0 => format!("{:.2}", s.1 / n.1),
        _ => "—".into(),
    };
    let mb =
        |entry: Option<RssReading>| entry.map_or("not run".into(), |e| format!("{:.1}", e.1 / 1e6));
    fn source<'a>(entry: Option<RssReading<'a>>) -> &'a str {
        entry.map_or("not run", |e| e.2)
    }
    let _ = writeln!(
        out,
        "### Memory\n\n\
         Resident set size, MB = 10⁶ bytes. At rest: once started (the sidecar ready, its keys \
         loaded), before any load. Peak: over the whole run (all throughput and latency rounds, \
         256 connections included). The target line (RSS ≤ 30 MB with {keys} keys) is judged on \
         the peak, the stricter reading; at rest is held to the same bound for reference.\n\n\
         | process | keys loaded | when | RSS (MB) | sidecar ÷ nginx | target | met? |\n\
         |---|---:|---|---:|---:|---|---|\n\
         | nginx worker (baseline) | — | at rest (after start, before load) | {} | | | |\n\
         | nginx worker (baseline) | — | peak over the run | {} | | | |\n\
         | sidecar | {keys} | at rest (after ready, before load) | {} | {} | ≤ 30 | {} |\n\
         | sidecar | {keys} | **peak over the run** (target line) | {} | {} | ≤ 30 | {} |\n\n\
         Sources: nginx at rest {}, peak {}; sidecar at rest {}, peak {}.\n",
        mb(nginx_rest),
        mb(nginx_peak),
        mb(sidecar_rest),
        ratio(sidecar_rest, nginx_rest),
        rest_outcome.label(),
        mb(sidecar_peak),
        ratio(sidecar_peak, nginx_peak),
        outcome.label(),
        source(nginx_rest),
        source(nginx_peak),
        source(sidecar_rest),
        source(sidecar_peak),
    );
}

fn lookup_table(records: &[Record], out: &mut String, outcomes: &mut Vec<(String, Outcome)>) {
    let lookup = records.iter().find_map(|record| match record {
        Record::Lookup {
            keys,
            iterations,
            hit_ns,
            miss_ns,
            hash_and_hit_ns,
        } => Some((*keys, *iterations, *hit_ns, *miss_ns, *hash_and_hit_ns)),
        _ => None,
    });
    let (keys, iterations) = lookup.map_or((10_000, 0), |l| (l.0, l.1));
    let method = if lookup.is_some() {
        format!("averaged over {iterations} calls each (release build, bench-lookup)")
    } else {
        "not run".to_owned()
    };
    let _ = writeln!(
        out,
        "### Policy lookup\n\n\
         Nanoseconds per call of the sidecar's `PolicyStore::lookup` with {keys} keys loaded, \
         {method}.\n\n\
         | lookup | ns per call | target | met? |\n|---|---:|---|---|"
    );
    let rows = [
        ("known key (hit)", lookup.map(|l| l.2), true),
        ("unknown key (miss)", lookup.map(|l| l.3), true),
        (
            "SHA-256 of the token + hit (what a request pays)",
            lookup.map(|l| l.4),
            false,
        ),
    ];
    for (name, value, judged) in rows {
        let (target, verdict) = if judged {
            let outcome = Outcome::judge(value, |ns| ns <= LOOKUP_MAX_NS);
            outcomes.push((format!("lookup ({name}) ≤ 1 µs"), outcome));
            ("≤ 1000", outcome.label())
        } else {
            ("—", "—")
        };
        let _ = writeln!(
            out,
            "| {name} | {} | {target} | {verdict} |",
            value.map_or("not run".into(), |v| format!("{v:.0}"))
        );
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throughput(via: Via, connections: usize, round: u32, rps: f64, errors: u64) -> Record {
        Record::Throughput {
            via,
            connections,
            round,
            requests_per_sec: rps,
            requests: rps as u64 * 5,
            errors,
            cpu: None,
        }
    }

    fn latency(via: Via, round: u32, p50_us: f64, p99_us: f64) -> Record {
        latency_in(Layout::Isolated, via, round, p50_us, p99_us)
    }

    fn latency_in(layout: Layout, via: Via, round: u32, p50_us: f64, p99_us: f64) -> Record {
        Record::Latency {
            via,
            layout,
            round,
            rate: 1000.0,
            connections: 16,
            ok: 10_000,
            errors: 0,
            p50_us,
            p90_us: p50_us,
            p99_us,
            p999_us: p99_us,
            max_us: p99_us,
            service_p50_us: p50_us,
            service_p99_us: p99_us,
        }
    }

    fn outcome(report: &Report, prefix: &str) -> Outcome {
        report
            .outcomes
            .iter()
            .find(|(name, _)| name.starts_with(prefix))
            .unwrap_or_else(|| panic!("no outcome {prefix}: {:?}", report.outcomes.len()))
            .1
    }

    #[test]
    fn throughput_uses_medians_and_compares_with_nginx() {
        let records = vec![
            throughput(Via::Nginx, 16, 0, 40_000.0, 0),
            throughput(Via::Nginx, 16, 1, 44_000.0, 0),
            throughput(Via::Nginx, 16, 2, 90_000.0, 0),
            throughput(Via::Sidecar, 16, 0, 45_000.0, 0),
            throughput(Via::Sidecar, 16, 1, 46_000.0, 0),
            throughput(Via::Sidecar, 16, 2, 10_000.0, 0),
            throughput(Via::Nginx, 256, 0, 40_000.0, 0),
            throughput(Via::Sidecar, 256, 0, 30_000.0, 0),
            throughput(Via::Nginx, 1, 0, 10_000.0, 0),
            throughput(Via::Sidecar, 1, 0, 20_000.0, 3),
        ];
        let report = render(&records);
        assert_eq!(outcome(&report, "throughput ≥ nginx at 16 "), Outcome::Met);
        assert!(
            report
                .markdown
                .contains("| 16 | not run | 44000 (40000–90000) | not run | 45000 (10000–46000) | 1.02 | 1.05 (0.11–1.12) | — | — |"),
            "{}",
            report.markdown
        );
        assert_eq!(
            outcome(&report, "throughput ≥ nginx at 256 "),
            Outcome::NotMet
        );
        assert_eq!(
            outcome(&report, "throughput ≥ nginx at 1 "),
            Outcome::Errors
        );
        assert!(report.markdown.contains("sidecar at 1: 3"));
    }

    #[test]
    fn throughput_is_met_only_when_both_readings_agree() {
        let run = |sidecar: [f64; 3]| {
            let mut records = Vec::new();
            for (round, (nginx, sidecar)) in [40_000.0, 30_000.0, 20_000.0]
                .into_iter()
                .zip(sidecar)
                .enumerate()
            {
                records.push(throughput(Via::Nginx, 16, round as u32, nginx, 0));
                records.push(throughput(Via::Sidecar, 16, round as u32, sidecar, 0));
            }
            outcome(&render(&records), "throughput ≥ nginx at 16 ")
        };
        // Medians 31000 / 30000 = 1.03, but paired 0.95, 1.03, 0.975 -> 0.975.
        assert_eq!(run([38_000.0, 31_000.0, 19_500.0]), Outcome::NotMet);
        // Medians 1.03, paired 1.05, 1.03, 1.05 -> 1.05.
        assert_eq!(run([42_000.0, 31_000.0, 21_000.0]), Outcome::Met);
    }

    #[test]
    fn throughput_shows_the_hyper_floor_and_ratios_paired_per_round() {
        // Round 1 ran slow for everyone: the paired ratios stay put where medians would not.
        let records = vec![
            throughput(Via::Nginx, 16, 0, 40_000.0, 0),
            throughput(Via::Hyper, 16, 0, 50_000.0, 0),
            throughput(Via::Sidecar, 16, 0, 36_000.0, 0),
            throughput(Via::Nginx, 16, 1, 20_000.0, 0),
            throughput(Via::Hyper, 16, 1, 25_000.0, 0),
            throughput(Via::Sidecar, 16, 1, 19_000.0, 0),
            throughput(Via::Nginx, 16, 2, 40_000.0, 0),
            throughput(Via::Hyper, 16, 2, 50_000.0, 0),
            throughput(Via::Sidecar, 16, 2, 38_000.0, 0),
        ];
        let report = render(&records);
        // Paired: 0.90, 0.95, 0.95. Medians: 40000, 50000, 36000.
        assert!(
            report.markdown.contains(
                "| 16 | not run | 40000 (20000–40000) | 50000 (25000–50000) | 36000 (19000–38000) \
                 | 0.90 | 0.95 (0.90–0.95) | 1.25 | 0.72 | ≥ 1.00 | **not met** |"
            ),
            "{}",
            report.markdown
        );
        // The floor is shown, never judged.
        assert_eq!(report.outcomes.len(), render(&records[..3]).outcomes.len());
        assert!(
            !report
                .outcomes
                .iter()
                .any(|(name, _)| name.contains("hyper"))
        );
    }

    /// `record` (a throughput record) with its CPU reading replaced.
    fn measured_cpu(mut record: Record, value: Option<CpuPerRequest>) -> Record {
        if let Record::Throughput { cpu, .. } = &mut record {
            *cpu = value;
        }
        record
    }

    #[test]
    fn cpu_per_request_is_shown_per_proxy_and_never_judged() {
        let with_cpu = |via, round, user_us, system_us| {
            measured_cpu(
                throughput(via, 256, round, 40_000.0, 0),
                Some(CpuPerRequest { user_us, system_us }),
            )
        };
        let records = vec![
            with_cpu(Via::Nginx, 0, 5.0, 15.0),
            with_cpu(Via::Nginx, 1, 6.0, 14.0),
            with_cpu(Via::Nginx, 2, 7.0, 20.0),
            with_cpu(Via::Sidecar, 0, 10.0, 15.0),
            with_cpu(Via::Sidecar, 1, 12.0, 16.0),
            with_cpu(Via::Sidecar, 2, 30.0, 17.0),
            throughput(Via::Direct, 256, 0, 60_000.0, 0),
        ];
        let report = render(&records);
        // Medians: nginx 6 + 15, sidecar 12 + 16; the hyper floor did not run.
        assert!(
            report
                .markdown
                .contains("| 256 | 6.0 + 15.0 | — | 12.0 + 16.0 | 2.00 | 1.33 |"),
            "{}",
            report.markdown
        );
        let without_cpu: Vec<Record> = records
            .iter()
            .cloned()
            .map(|record| measured_cpu(record, None))
            .collect();
        let plain = render(&without_cpu);
        assert!(!plain.markdown.contains("CPU per request"));
        assert_eq!(report.outcomes, plain.outcomes);
    }

    #[test]
    fn added_latency_is_paired_per_round() {
        // Round 1 is noisy for everyone; pairing within the round cancels it.
        let records = vec![
            latency(Via::Direct, 0, 100.0, 300.0),
            latency(Via::Sidecar, 0, 150.0, 900.0),
            latency(Via::Direct, 1, 900.0, 2000.0),
            latency(Via::Sidecar, 1, 960.0, 2300.0),
            latency(Via::Direct, 2, 100.0, 300.0),
            latency(Via::Sidecar, 2, 170.0, 600.0),
        ];
        let report = render(&records);
        // p50 added per round: 0.05, 0.06, 0.07 -> 0.06; p99: 0.6, 0.3, 0.3 -> 0.3.
        assert_eq!(outcome(&report, "added p50"), Outcome::Met);
        assert_eq!(outcome(&report, "added p99"), Outcome::Met);
        assert!(
            report
                .markdown
                .contains("| p50 | 0.100 | — | — | — | 0.170 | — | — | — | 0.060 |"),
            "{}",
            report.markdown
        );

        let slow = vec![
            latency(Via::Direct, 0, 100.0, 300.0),
            latency(Via::Sidecar, 0, 250.0, 900.0),
        ];
        let report = render(&slow);
        assert_eq!(outcome(&report, "added p50"), Outcome::NotMet);
        assert_eq!(outcome(&report, "added p99"), Outcome::NotMet);
    }

    #[test]
    fn the_pod_layout_is_judged_and_the_isolated_one_shown_with_its_floor() {
        let records = vec![
            latency_in(Layout::Isolated, Via::Direct, 0, 130.0, 200.0),
            latency_in(Layout::Isolated, Via::Splice, 0, 300.0, 500.0),
            latency_in(Layout::Isolated, Via::Sidecar, 0, 320.0, 550.0),
            latency_in(Layout::Pod, Via::Direct, 0, 180.0, 300.0),
            latency_in(Layout::Pod, Via::Splice, 0, 230.0, 400.0),
            latency_in(Layout::Pod, Via::Nginx, 0, 210.0, 360.0),
            latency_in(Layout::Pod, Via::Hyper, 0, 200.0, 350.0),
            latency_in(Layout::Pod, Via::Sidecar, 0, 250.0, 420.0),
        ];
        let report = render(&records);
        // Pod: sidecar adds 0.07 at p50 (met); isolated: 0.19, shown but not judged.
        assert_eq!(outcome(&report, "added p50 ≤ 0.1 ms (pod"), Outcome::Met);
        assert_eq!(outcome(&report, "added p99 ≤ 0.5 ms (pod"), Outcome::Met);
        assert!(!report.outcomes.iter().any(|(n, _)| n.contains("isolated")));
        assert!(
            report
                .markdown
                .contains("| p50 | 0.180 | 0.230 | 0.210 | 0.200 | 0.250 | 0.050 | 0.030 | 0.020 | 0.070 | 2.33 | ≤ 0.100 | met |"),
            "{}",
            report.markdown
        );
        assert!(
            report
                .markdown
                .contains("| p50 | 0.130 | 0.300 | — | — | 0.320 | 0.170 | — | — | 0.190 | — | (≤ 0.100) | not judged |"),
            "{}",
            report.markdown
        );
        // Records from before layouts existed read as isolated, and are then the judged ones.
        let old = r#"{"kind":"latency","via":"direct","round":0,"rate":1000.0,"connections":16,"ok":1,"errors":0,"p50_us":1.0,"p90_us":1.0,"p99_us":1.0,"p999_us":1.0,"max_us":1.0,"service_p50_us":1.0,"service_p99_us":1.0}"#;
        assert!(matches!(
            Record::parse_lines(old).unwrap()[..],
            [Record::Latency {
                layout: Layout::Isolated,
                ..
            }]
        ));
    }

    #[test]
    fn memory_and_lookup_targets() {
        let records = vec![
            Record::PeakRss {
                via: Via::Sidecar,
                keys: 10_000,
                max_rss_kb: 20_000,
                source: "t".into(),
            },
            Record::PeakRss {
                via: Via::Nginx,
                keys: 0,
                max_rss_kb: 4_000,
                source: "t".into(),
            },
            Record::Lookup {
                keys: 10_000,
                iterations: 1_000_000,
                hit_ns: 80.0,
                miss_ns: 1500.0,
                hash_and_hit_ns: 400.0,
            },
        ];
        let report = render(&records);
        assert_eq!(outcome(&report, "peak RSS"), Outcome::Met);
        assert!(
            report
                .markdown
                .contains("| sidecar | 10000 | **peak over the run** (target line) | 20.5 | 5.00 | ≤ 30 | met |"),
            "{}",
            report.markdown
        );
        // Not measured at rest in this run: said so, and the target line still judged.
        assert!(
            report
                .markdown
                .contains("| sidecar | 10000 | at rest (after ready, before load) | not run | — | ≤ 30 | not measured |"),
            "{}",
            report.markdown
        );
        assert_eq!(outcome(&report, "lookup (known"), Outcome::Met);
        assert_eq!(outcome(&report, "lookup (unknown"), Outcome::NotMet);

        let big = vec![Record::PeakRss {
            via: Via::Sidecar,
            keys: 10_000,
            max_rss_kb: 30_000,
            source: "t".into(),
        }];
        assert_eq!(outcome(&render(&big), "peak RSS"), Outcome::NotMet);
    }

    #[test]
    fn rss_at_rest_is_shown_but_the_target_line_is_the_peak() {
        let records = vec![
            Record::RssAtRest {
                via: Via::Sidecar,
                keys: 10_000,
                rss_kb: 17_000,
                source: "rest".into(),
            },
            Record::RssAtRest {
                via: Via::Nginx,
                keys: 0,
                rss_kb: 3_400,
                source: "rest".into(),
            },
            Record::PeakRss {
                via: Via::Sidecar,
                keys: 10_000,
                max_rss_kb: 33_000,
                source: "peak".into(),
            },
        ];
        let report = render(&records);
        // 17,000 KiB = 17.4 MB at rest meets the bound; the 33.8 MB peak does not, and the
        // target line follows the peak.
        assert_eq!(outcome(&report, "peak RSS"), Outcome::NotMet);
        assert!(
            report.markdown.contains(
                "| sidecar | 10000 | at rest (after ready, before load) | 17.4 | 5.00 | ≤ 30 | met |"
            ),
            "{}",
            report.markdown
        );
        assert!(
            report.markdown.contains(
                "| sidecar | 10000 | **peak over the run** (target line) | 33.8 | — | ≤ 30 | **not met** |"
            ),
            "{}",
            report.markdown
        );
        assert!(report.markdown.contains(
            "| nginx worker (baseline) | — | at rest (after start, before load) | 3.5 |"
        ));
        assert_eq!(
            Record::parse_lines(&serde_json::to_string(&records[0]).unwrap()).unwrap(),
            vec![records[0].clone()]
        );
    }

    #[test]
    fn nothing_measured_is_said_so() {
        let report = render(&[]);
        assert!(
            report
                .outcomes
                .iter()
                .all(|(_, o)| *o == Outcome::NotMeasured)
        );
        assert!(report.markdown.starts_with("**Issue 3 targets met: 0 of"));
    }
}
