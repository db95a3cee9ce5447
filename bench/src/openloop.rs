//! Open-loop load at a fixed rate, wrk2-style: every connection has its own schedule of
//! intended send times, and latency is measured from the intended time, not from when the
//! request actually left. A stall therefore shows up in the latency of every request it
//! delayed instead of silently lowering the rate (coordinated omission).

use std::{
    thread,
    time::{Duration, Instant},
};

use crate::client::{Connection, Target};

#[derive(Debug, Clone)]
pub struct Plan {
    /// Requests per second across all connections.
    pub rate: f64,
    pub connections: usize,
    /// Requests intended before this offset are sent but not recorded.
    pub warmup: Duration,
    pub measure: Duration,
    pub timeout: Duration,
}

impl Plan {
    /// When, counted from the start, connection `connection` intends to send its `nth` request.
    /// Connections are staggered so the aggregate is evenly spaced at `rate`.
    pub fn intended_offset(&self, connection: usize, nth: u64) -> Duration {
        let slot = connection as f64 + nth as f64 * self.connections as f64;
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
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.latency.extend(other.latency);
        self.service.extend(other.service);
        self.errors += other.errors;
    }
}

/// Runs the plan, one OS thread per connection, and returns every sample, sorted.
pub fn run(plan: &Plan, target: &Target, request: &[u8], expect_body: Option<usize>) -> Samples {
    // Connect everyone first so connection setup is not part of the first samples.
    let start = Instant::now() + Duration::from_millis(100);
    let mut all = Samples::default();
    thread::scope(|scope| {
        let workers: Vec<_> = (0..plan.connections)
            .map(|connection| {
                scope.spawn(move || {
                    run_connection(plan, target, request, expect_body, connection, start)
                })
            })
            .collect();
        for worker in workers {
            all.merge(worker.join().expect("load generator thread panicked"));
        }
    });
    all.latency.sort_unstable();
    all.service.sort_unstable();
    all
}

fn run_connection(
    plan: &Plan,
    target: &Target,
    request: &[u8],
    expect_body: Option<usize>,
    connection: usize,
    start: Instant,
) -> Samples {
    let mut samples = Samples::default();
    let mut conn = Connection::connect(target.addr, plan.timeout).ok();
    for nth in 0.. {
        let offset = plan.intended_offset(connection, nth);
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
            warmup: Duration::ZERO,
            measure: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        };
        let mut offsets: Vec<Duration> = (0..4)
            .flat_map(|c| (0..3).map(move |n| (c, n)))
            .map(|(c, n)| plan.intended_offset(c, n))
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
}
