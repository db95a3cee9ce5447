//! The audit-overhead report (bench section `auditoverhead`): an audited and an unaudited sidecar
//! loaded side by side on one interleaved schedule, many short stretches pooled. The p99 ratio
//! gets a 95 % interval from a paired block bootstrap: calls close in time share the machine's
//! stalls, so whole blocks of time (both arms' calls in that block together) are resampled, not
//! single calls. The same is done for two unaudited sidecars (A/A): the method resolves a 10 %
//! difference only if that interval lies within it.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use crate::stats::{SplitMix64, percentile_unsorted};

#[derive(Debug, thiserror::Error)]
pub enum OverheadError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Parse {
        path: String,
        line: usize,
        reason: String,
    },
}

/// Which side of a pair an arm is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// `--audit none`.
    Base,
    /// The arm compared with it (audited; or a second `--audit none` for the A/A pair).
    Test,
}

/// One arm over one measured stretch.
#[derive(Debug, Clone, PartialEq)]
pub struct Stretch {
    /// What the base arm is compared with: `aa`, `sqlite`, `postgres`.
    pub pair: String,
    pub round: u32,
    pub role: Role,
    /// Calls sent to this arm over the stretch, warm-up included (what the CPU counters cover).
    pub calls: u64,
    /// The proxy thread's on-CPU and run-queue wait time over the stretch
    /// (/proc/PID/task/TID/schedstat fields 1 and 2).
    pub proxy_cpu_ns: u64,
    pub proxy_wait_ns: u64,
    /// The audit delivery threads' on-CPU time over the stretch.
    pub delivery_cpu_ns: u64,
    /// (intended send ms after the warm-up, latency µs) of every measured call.
    pub timed: Vec<(f64, f64)>,
}

/// One block of time of one stretch: both arms' latencies (µs) in it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Block {
    pub base: Vec<f64>,
    pub test: Vec<f64>,
}

/// Reads the stretches file: one tab-separated line per arm and stretch,
/// `pair round base|test calls proxy_cpu_ns proxy_wait_ns delivery_cpu_ns timed_file`
/// (timed_file relative to the stretches file's directory unless absolute).
pub fn read_stretches(path: &Path) -> Result<Vec<Stretch>, OverheadError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| OverheadError::Read {
        path: shown.clone(),
        source,
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut stretches = Vec::new();
    for (index, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let parse_error = |reason: String| OverheadError::Parse {
            path: shown.clone(),
            line: index + 1,
            reason,
        };
        let fields: Vec<&str> = line.split('\t').collect();
        let [pair, round, role, calls, cpu, wait, delivery, timed_file] = fields[..] else {
            return Err(parse_error(format!("{} fields, want 8", fields.len())));
        };
        let number = |field: &str, name: &str| {
            field
                .parse::<u64>()
                .map_err(|e| parse_error(format!("{name} {field:?}: {e}")))
        };
        let role = match role {
            "base" => Role::Base,
            "test" => Role::Test,
            other => return Err(parse_error(format!("role {other:?}"))),
        };
        let timed_path = dir.join(timed_file);
        let timed_text =
            std::fs::read_to_string(&timed_path).map_err(|source| OverheadError::Read {
                path: timed_path.display().to_string(),
                source,
            })?;
        stretches.push(Stretch {
            pair: pair.to_owned(),
            round: number(round, "round")? as u32,
            role,
            calls: number(calls, "calls")?,
            proxy_cpu_ns: number(cpu, "proxy_cpu_ns")?,
            proxy_wait_ns: number(wait, "proxy_wait_ns")?,
            delivery_cpu_ns: number(delivery, "delivery_cpu_ns")?,
            timed: parse_timed(&timed_text).map_err(|(line, reason)| OverheadError::Parse {
                path: timed_path.display().to_string(),
                line,
                reason,
            })?,
        });
    }
    Ok(stretches)
}

/// Parses bench-loadgen's `--timed-out` lines: "intended-ms latency-µs".
pub fn parse_timed(text: &str) -> Result<Vec<(f64, f64)>, (usize, String)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(index, line)| {
            let mut fields = line.split_whitespace().map(str::parse::<f64>);
            match (fields.next(), fields.next(), fields.next()) {
                (Some(Ok(ms)), Some(Ok(us)), None) => Ok((ms, us)),
                _ => Err((index + 1, format!("want \"ms µs\", got {line:?}"))),
            }
        })
        .collect()
}

/// Cuts a pair's stretches into blocks of `block_ms` of schedule time; a block holds both arms'
/// calls of the same round and time. Blocks where either arm has no call are left out.
pub fn blocks(stretches: &[Stretch], pair: &str, block_ms: f64) -> Vec<Block> {
    let mut by_key: BTreeMap<(u32, u64), Block> = BTreeMap::new();
    for stretch in stretches.iter().filter(|s| s.pair == pair) {
        for &(ms, us) in &stretch.timed {
            let block = by_key
                .entry((stretch.round, (ms / block_ms).floor().max(0.0) as u64))
                .or_default();
            match stretch.role {
                Role::Base => block.base.push(us),
                Role::Test => block.test.push(us),
            }
        }
    }
    by_key
        .into_values()
        .filter(|b| !b.base.is_empty() && !b.test.is_empty())
        .collect()
}

/// Percentile `q` of one arm over all blocks pooled.
pub fn pooled_percentile(blocks: &[Block], role: Role, q: f64) -> Option<f64> {
    let mut all: Vec<f64> = blocks.iter().flat_map(|b| side(b, role)).copied().collect();
    percentile_unsorted(&mut all, q)
}

fn side(block: &Block, role: Role) -> &[f64] {
    match role {
        Role::Base => &block.base,
        Role::Test => &block.test,
    }
}

/// 95 % interval of (test ÷ base) percentile `q` by the paired block bootstrap: `resamples`
/// times, draw as many blocks as there are, with replacement, and take the ratio of the two
/// arms' pooled percentiles; the interval is the 2.5th and 97.5th percentile of those ratios.
pub fn ratio_interval(blocks: &[Block], q: f64, resamples: usize, seed: u64) -> Option<(f64, f64)> {
    if blocks.is_empty() || resamples == 0 {
        return None;
    }
    let mut rng = SplitMix64::new(seed);
    let (mut base, mut test) = (Vec::new(), Vec::new());
    let mut ratios = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        base.clear();
        test.clear();
        for _ in 0..blocks.len() {
            let block = &blocks[rng.below(blocks.len())];
            base.extend_from_slice(&block.base);
            test.extend_from_slice(&block.test);
        }
        let (Some(b), Some(t)) = (
            percentile_unsorted(&mut base, q),
            percentile_unsorted(&mut test, q),
        ) else {
            continue;
        };
        if b > 0.0 {
            ratios.push(t / b);
        }
    }
    let lo = percentile_unsorted(&mut ratios, 2.5)?;
    let hi = percentile_unsorted(&mut ratios, 97.5)?;
    Some((lo, hi))
}

/// Whether the pair meets the target `ratio ≤ limit`, decided on the intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The upper bound is ≤ limit and the A/A interval shows the method resolves it.
    Met,
    /// The lower bound is above the limit (and the method resolves it).
    NotMet,
    /// The interval straddles the limit: this run cannot say.
    Undecided,
    /// The A/A interval is wider than ±(limit − 1): the method did not resolve the target.
    NotResolved,
}

/// The method resolves `limit` (e.g. 1.10) when the A/A interval lies within [1/limit, limit].
pub fn resolves(aa: (f64, f64), limit: f64) -> bool {
    aa.0 >= 1.0 / limit && aa.1 <= limit
}

pub fn verdict(interval: (f64, f64), aa: (f64, f64), limit: f64) -> Verdict {
    if !resolves(aa, limit) {
        Verdict::NotResolved
    } else if interval.1 <= limit {
        Verdict::Met
    } else if interval.0 > limit {
        Verdict::NotMet
    } else {
        Verdict::Undecided
    }
}

/// Per-call costs of one arm of a pair, from the schedstat counters: (proxy thread on-CPU µs,
/// proxy thread run-queue wait µs, delivery threads on-CPU µs) per call.
pub fn per_call_costs(stretches: &[Stretch], pair: &str, role: Role) -> Option<(f64, f64, f64)> {
    let arm: Vec<&Stretch> = stretches
        .iter()
        .filter(|s| s.pair == pair && s.role == role)
        .collect();
    let calls: u64 = arm.iter().map(|s| s.calls).sum();
    if calls == 0 {
        return None;
    }
    let per_call = |ns: u64| ns as f64 / 1e3 / calls as f64;
    Some((
        per_call(arm.iter().map(|s| s.proxy_cpu_ns).sum()),
        per_call(arm.iter().map(|s| s.proxy_wait_ns).sum()),
        per_call(arm.iter().map(|s| s.delivery_cpu_ns).sum()),
    ))
}

/// What the report says about one pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PairSummary {
    pub pair: String,
    pub blocks: usize,
    pub calls_per_arm: (usize, usize),
    /// p50, p99, p99.9 (µs) of base and test.
    pub base: [f64; 3],
    pub test: [f64; 3],
    pub p99_ratio: f64,
    pub p99_interval: (f64, f64),
    pub base_costs: Option<(f64, f64, f64)>,
    pub test_costs: Option<(f64, f64, f64)>,
}

pub const QUANTILES: [f64; 3] = [50.0, 99.0, 99.9];

pub fn summarize(
    stretches: &[Stretch],
    pair: &str,
    block_ms: f64,
    resamples: usize,
    seed: u64,
) -> Option<PairSummary> {
    let blocks = blocks(stretches, pair, block_ms);
    let arm = |role| QUANTILES.map(|q| pooled_percentile(&blocks, role, q).unwrap_or(f64::NAN));
    let (base, test) = (arm(Role::Base), arm(Role::Test));
    let p99_interval = ratio_interval(&blocks, 99.0, resamples, seed)?;
    Some(PairSummary {
        pair: pair.to_owned(),
        calls_per_arm: (
            blocks.iter().map(|b| b.base.len()).sum(),
            blocks.iter().map(|b| b.test.len()).sum(),
        ),
        blocks: blocks.len(),
        base,
        test,
        p99_ratio: test[1] / base[1],
        p99_interval,
        base_costs: per_call_costs(stretches, pair, Role::Base),
        test_costs: per_call_costs(stretches, pair, Role::Test),
    })
}

/// The Markdown table: the A/A pair first, then each audited pair with its verdict.
pub fn render(
    aa: &PairSummary,
    audited: &[PairSummary],
    limit: f64,
    labels: &dyn Fn(&str) -> String,
) -> String {
    let mut out = String::new();
    let resolved = resolves(aa.p99_interval, limit);
    let _ = writeln!(
        out,
        "A/A noise floor of this run (two `--audit none` sidecars side by side, same method): p99 ratio {:.3}, 95 % interval {:.3}–{:.3}; {}.",
        aa.p99_ratio,
        aa.p99_interval.0,
        aa.p99_interval.1,
        if resolved {
            format!(
                "inside {:.2}–{limit:.2}, so this run resolves a {:.0} % difference",
                1.0 / limit,
                (limit - 1.0) * 100.0
            )
        } else {
            format!(
                "NOT inside {:.2}–{limit:.2}: this run does not resolve a {:.0} % difference, and no verdict below is \"met\"",
                1.0 / limit,
                (limit - 1.0) * 100.0
            )
        }
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| compared with `--audit none` (side by side) | calls per arm | none p50 / p99 / p99.9 µs | this arm p50 / p99 / p99.9 µs | **p99 ratio** (95 % interval) | target ≤ {limit:.2} met? | proxy thread CPU µs/call: none → this | proxy thread run-queue wait µs/call: none → this | delivery threads CPU µs/call |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"
    );
    for summary in std::iter::once(aa).chain(audited) {
        let is_aa = std::ptr::eq(summary, aa);
        let verdict_text = if is_aa {
            "— (noise floor)".to_owned()
        } else {
            match verdict(summary.p99_interval, aa.p99_interval, limit) {
                Verdict::Met => "**met** (upper bound ≤ target)".to_owned(),
                Verdict::NotMet => "**not met** (lower bound > target)".to_owned(),
                Verdict::Undecided => "undecided (interval straddles the target)".to_owned(),
                Verdict::NotResolved => {
                    "not resolved (A/A interval wider than the target)".to_owned()
                }
            }
        };
        let triple = |t: [f64; 3]| format!("{:.0} / {:.0} / {:.0}", t[0], t[1], t[2]);
        let costs = |index: usize| match (summary.base_costs, summary.test_costs) {
            (Some(b), Some(t)) => {
                let pick = |c: (f64, f64, f64)| [c.0, c.1, c.2][index];
                format!("{:.1} → {:.1}", pick(b), pick(t))
            }
            _ => "n/a".to_owned(),
        };
        let delivery = summary
            .test_costs
            .map_or("n/a".to_owned(), |c| format!("{:.1}", c.2));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | **{:.3}** ({:.3}–{:.3}) | {} | {} | {} | {} |",
            labels(&summary.pair),
            summary.calls_per_arm.1,
            triple(summary.base),
            triple(summary.test),
            summary.p99_ratio,
            summary.p99_interval.0,
            summary.p99_interval.1,
            verdict_text,
            costs(0),
            costs(1),
            delivery,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stretch whose latencies follow `shape` (µs at call i), `calls` calls 1 ms apart.
    fn stretch(
        pair: &str,
        round: u32,
        role: Role,
        calls: usize,
        shape: impl Fn(usize) -> f64,
    ) -> Stretch {
        Stretch {
            pair: pair.into(),
            round,
            role,
            calls: calls as u64,
            proxy_cpu_ns: 20_000 * calls as u64,
            proxy_wait_ns: 5_000 * calls as u64,
            delivery_cpu_ns: 0,
            timed: (0..calls).map(|i| (i as f64, shape(i))).collect(),
        }
    }

    /// Latencies with shared stalls: every 97th call is slow, in both arms alike.
    fn noisy(i: usize) -> f64 {
        if i.is_multiple_of(97) {
            2_000.0 + (i % 7) as f64 * 100.0
        } else {
            100.0 + (i % 13) as f64
        }
    }

    #[test]
    fn timed_lines_parse_and_bad_ones_are_reported_with_their_line() {
        assert_eq!(
            parse_timed("0.500 120.5\n1.0 99\n"),
            Ok(vec![(0.5, 120.5), (1.0, 99.0)])
        );
        assert_eq!(parse_timed("0.5 1\nx 2\n").unwrap_err().0, 2);
        assert!(parse_timed("1 2 3\n").is_err());
    }

    #[test]
    fn blocks_pair_both_arms_of_the_same_round_and_second() {
        let stretches = vec![
            stretch("sqlite", 0, Role::Base, 2500, |_| 1.0),
            stretch("sqlite", 0, Role::Test, 2500, |_| 2.0),
            stretch("sqlite", 1, Role::Base, 1000, |_| 1.0),
            stretch("sqlite", 1, Role::Test, 1000, |_| 2.0),
            stretch("aa", 0, Role::Base, 1000, |_| 9.0),
        ];
        let cut = blocks(&stretches, "sqlite", 1000.0);
        // Round 0: seconds 0, 1, 2 (half full); round 1: second 0.
        assert_eq!(cut.len(), 4);
        assert_eq!(
            cut.iter().map(|b| b.base.len()).collect::<Vec<_>>(),
            vec![1000, 1000, 500, 1000]
        );
        assert!(
            cut.iter()
                .all(|b| b.base.len() == b.test.len() && b.test.iter().all(|v| *v == 2.0))
        );
        assert!(
            blocks(&stretches, "aa", 1000.0).is_empty(),
            "no test arm: no block"
        );
    }

    #[test]
    fn identical_arms_give_a_narrow_interval_around_one() {
        let stretches: Vec<Stretch> = (0..10)
            .flat_map(|r| {
                [
                    stretch("aa", r, Role::Base, 5000, noisy),
                    stretch("aa", r, Role::Test, 5000, noisy),
                ]
            })
            .collect();
        let summary = summarize(&stretches, "aa", 1000.0, 200, 1).unwrap();
        assert_eq!(summary.p99_ratio, 1.0);
        assert_eq!(
            summary.p99_interval,
            (1.0, 1.0),
            "paired blocks: shared stalls cancel"
        );
        assert_eq!(summary.blocks, 50);
        assert_eq!(summary.calls_per_arm, (50_000, 50_000));
        assert!(resolves(summary.p99_interval, 1.10));
        let (cpu, wait, _) = summary.base_costs.unwrap();
        assert!((cpu - 20.0).abs() < 1e-9 && (wait - 5.0).abs() < 1e-9);
    }

    #[test]
    fn a_slower_arm_is_seen_and_an_unresolving_floor_blocks_the_verdict() {
        let stretches: Vec<Stretch> = (0..10)
            .flat_map(|r| {
                [
                    stretch("sqlite", r, Role::Base, 5000, noisy),
                    stretch("sqlite", r, Role::Test, 5000, |i| noisy(i) * 1.5),
                ]
            })
            .collect();
        let summary = summarize(&stretches, "sqlite", 1000.0, 200, 1).unwrap();
        assert!((summary.p99_ratio - 1.5).abs() < 1e-9);
        assert!(summary.p99_interval.0 > 1.10, "{:?}", summary.p99_interval);
        assert_eq!(
            verdict(summary.p99_interval, (0.97, 1.04), 1.10),
            Verdict::NotMet
        );
        assert_eq!(verdict((0.95, 1.08), (0.97, 1.04), 1.10), Verdict::Met);
        assert_eq!(verdict((1.0, 1.2), (0.97, 1.04), 1.10), Verdict::Undecided);
        assert_eq!(
            verdict((0.95, 1.08), (0.85, 1.2), 1.10),
            Verdict::NotResolved
        );
    }

    #[test]
    fn unshared_noise_widens_the_interval() {
        // Some seconds are worse for the test arm only: each block's tail is its own.
        let stretches: Vec<Stretch> = (0..10)
            .flat_map(|r| {
                [
                    stretch("aa", r, Role::Base, 5000, noisy),
                    stretch("aa", r, Role::Test, 5000, move |i| {
                        let own_stall = (i / 1000 + r as usize).is_multiple_of(3);
                        if own_stall && i % 31 == 0 {
                            3_000.0 + (i % 11) as f64 * 50.0
                        } else {
                            noisy(i)
                        }
                    }),
                ]
            })
            .collect();
        let (lo, hi) = ratio_interval(&blocks(&stretches, "aa", 1000.0), 99.0, 200, 3).unwrap();
        assert!(lo < hi, "unshared stalls must show as width: {lo} {hi}");
    }

    #[test]
    fn the_table_names_the_floor_and_the_verdicts() {
        let mk = |pair: &str, interval| PairSummary {
            pair: pair.into(),
            blocks: 50,
            calls_per_arm: (50_000, 50_000),
            base: [100.0, 400.0, 900.0],
            test: [101.0, 410.0, 950.0],
            p99_ratio: 1.025,
            p99_interval: interval,
            base_costs: Some((20.0, 3.0, 0.0)),
            test_costs: Some((22.5, 3.2, 6.0)),
        };
        let label = |p: &str| p.to_owned();
        let table = render(
            &mk("aa", (0.95, 1.05)),
            &[mk("sqlite", (0.98, 1.07))],
            1.10,
            &label,
        );
        assert!(table.contains("resolves a 10 % difference"), "{table}");
        assert!(table.contains("| sqlite | 50000 | 100 / 400 / 900 | 101 / 410 / 950 | **1.025** (0.980–1.070) | **met**"), "{table}");
        assert!(table.contains("20.0 → 22.5"), "{table}");
        let unresolved = render(
            &mk("aa", (0.8, 1.3)),
            &[mk("sqlite", (0.98, 1.07))],
            1.10,
            &label,
        );
        assert!(unresolved.contains("does not resolve"), "{unresolved}");
        assert!(unresolved.contains("not resolved (A/A"), "{unresolved}");
    }
}
