//! Open-loop load at a fixed rate, wrk2-style: every connection has its own schedule of
//! intended send times, and latency is measured from the intended time, not from when the
//! request actually left. A stall therefore shows up in the latency of every request it
//! delayed instead of silently lowering the rate (coordinated omission).
//!
//! Several targets ("arms") can share one schedule: each gets `rate` calls/s over its own
//! connections, and on every tick the arms' calls are spread evenly over the tick's period, their
//! order rotated tick by tick (arm A first, then B half a period later; next tick B first). A
//! stall of the machine then delays both arms' calls alike, so their latencies can be compared
//! call for call instead of run against run.

use std::{
    thread,
    time::{Duration, Instant},
};

use crate::client::{Connection, Target};

#[derive(Debug, Clone)]
pub struct Plan {
    /// Requests per second across all connections, per arm.
    pub rate: f64,
    /// Connections per arm.
    pub connections: usize,
    /// Targets sharing the schedule (1 for a plain run).
    pub arms: usize,
    /// Requests intended before this offset are sent but not recorded.
    pub warmup: Duration,
    pub measure: Duration,
    pub timeout: Duration,
}

impl Plan {
    /// When, counted from the start, connection `connection` of arm `arm` intends to send its
    /// `nth` request. Connections are staggered so each arm's calls are evenly spaced at `rate`;
    /// within a tick the arms take turns, 1/arms of a period apart, in an order rotated each tick.
    pub fn intended_offset(&self, arm: usize, connection: usize, nth: u64) -> Duration {
        let tick = connection as u64 + nth * self.connections as u64;
        let arms = self.arms.max(1) as u64;
        let turn = (arm as u64 + tick) % arms;
        let slot = tick as f64 + turn as f64 / arms as f64;
        Duration::from_secs_f64(slot / self.rate)
    }

    pub fn end(&self) -> Duration {
        self.warmup + self.measure
    }
}

/// What one connection saw during the measured window.
#[derive(Debug, Default)]
pub struct Samples {
    /// From intended send time to the end of the response.
    pub latency: Vec<Duration>,
    /// From actual send time to the end of the response (no correction).
    pub service: Vec<Duration>,
    /// Requests that failed, or got a non-2xx or a body of the wrong size.
    pub errors: u64,
    /// (intended send time counted from the end of the warm-up, latency) of every measured
    /// call, in schedule order: what block resampling needs.
    pub timed: Vec<(Duration, Duration)>,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.latency.extend(other.latency);
        self.service.extend(other.service);
        self.errors += other.errors;
        self.timed.extend(other.timed);
    }
}

/// One arm: where its calls go and the bytes of the request.
pub struct Arm<'a> {
    pub target: &'a Target,
    pub request: &'a [u8],
}

/// Runs the plan against one target, one OS thread per connection, and returns every sample,
/// sorted.
pub fn run(plan: &Plan, target: &Target, request: &[u8], expect_body: Option<usize>) -> Samples {
    let plan = Plan {
        arms: 1,
        ..plan.clone()
    };
    run_arms(&plan, &[Arm { target, request }], expect_body)
        .pop()
        .expect("one arm")
}

/// Runs the plan against every arm at once on one shared schedule (`plan.arms` must be
/// `arms.len()`), `plan.connections` threads per arm; returns each arm's samples, sorted.
pub fn run_arms(plan: &Plan, arms: &[Arm<'_>], expect_body: Option<usize>) -> Vec<Samples> {
    assert_eq!(plan.arms, arms.len(), "plan.arms must match the arms given");
    // Connect everyone first so connection setup is not part of the first samples.
    let start = Instant::now() + Duration::from_millis(100);
    let mut per_arm: Vec<Samples> = arms.iter().map(|_| Samples::default()).collect();
    thread::scope(|scope| {
        let workers: Vec<_> = arms
            .iter()
            .enumerate()
            .flat_map(|(index, arm)| {
                (0..plan.connections).map(move |connection| (index, arm, connection))
            })
            .map(|(index, arm, connection)| {
                let worker = scope.spawn(move || {
                    run_connection(plan, arm, index, expect_body, connection, start)
                });
                (index, worker)
            })
            .collect();
        for (index, worker) in workers {
            per_arm[index].merge(worker.join().expect("load generator thread panicked"));
        }
    });
    for samples in &mut per_arm {
        samples.latency.sort_unstable();
        samples.service.sort_unstable();
        samples.timed.sort_unstable();
    }
    per_arm
}

fn run_connection(
    plan: &Plan,
    arm: &Arm<'_>,
    arm_index: usize,
    expect_body: Option<usize>,
    connection: usize,
    start: Instant,
) -> Samples {
    let (target, request) = (arm.target, arm.request);
    let mut samples = Samples::default();
    let mut conn = Connection::connect(target.addr, plan.timeout).ok();
    for nth in 0.. {
        let offset = plan.intended_offset(arm_index, connection, nth);
        if offset >= plan.end() {
            break;
        }
        let intended = start + offset;
        let now = Instant::now();
        if intended > now {
            thread::sleep(intended - now);
        }
        let sent = Instant::now();
        let outcome = match conn.as_mut() {
            Some(open) => open.round_trip(request).ok(),
            None => None,
        };
        let done = Instant::now();
        let ok = outcome.is_some_and(|reply| {
            (200..300).contains(&reply.status) && expect_body.is_none_or(|n| n == reply.body_len)
        });
        if offset >= plan.warmup {
            if ok {
                samples.latency.push(done - intended);
                samples.service.push(done - sent);
                samples.timed.push((offset - plan.warmup, done - intended));
            } else {
                samples.errors += 1;
            }
        }
        if outcome.is_none_or(|reply| reply.close) {
            conn = Connection::connect(target.addr, plan.timeout).ok();
        }
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_evenly_spaced_across_connections() {
        let plan = Plan {
            rate: 1000.0,
            connections: 4,
            arms: 1,
            warmup: Duration::ZERO,
            measure: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        };
        let mut offsets: Vec<Duration> = (0..4)
            .flat_map(|c| (0..3).map(move |n| (c, n)))
            .map(|(c, n)| plan.intended_offset(0, c, n))
            .collect();
        offsets.sort();
        let expected: Vec<Duration> = (0..12).map(Duration::from_millis).collect();
        for (got, want) in offsets.iter().zip(&expected) {
            assert!(
                got.abs_diff(*want) < Duration::from_nanos(10),
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn arms_take_turns_half_a_period_apart_in_rotated_order() {
        let plan = Plan {
            rate: 1000.0,
            connections: 2,
            arms: 2,
            warmup: Duration::ZERO,
            measure: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        };
        let micros = |arm, connection, nth| plan.intended_offset(arm, connection, nth).as_micros();
        // Tick 0 (connection 0, nth 0): arm 0 at 0, arm 1 half a period later.
        assert_eq!((micros(0, 0, 0), micros(1, 0, 0)), (0, 500));
        // Tick 1 (connection 1, nth 0): arm 1 first this time.
        assert_eq!((micros(1, 1, 0), micros(0, 1, 0)), (1000, 1500));
        // Tick 2 (connection 0, nth 1): back to arm 0 first.
        assert_eq!((micros(0, 0, 1), micros(1, 0, 1)), (2000, 2500));
        // Each arm alone keeps the full rate: one call per period.
        let mut arm0: Vec<u128> = (0..2)
            .flat_map(|c| (0..3).map(move |n| (c, n)))
            .map(|(c, n)| micros(0, c, n))
            .collect();
        arm0.sort();
        assert_eq!(arm0, vec![0, 1500, 2000, 3500, 4000, 5500]);
    }
}
