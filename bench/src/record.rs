//! One JSON line per measurement. bench/run.sh appends them to a results file; the report
//! reads them back, so a run can be re-rendered without re-measuring.

use serde::{Deserialize, Serialize};

use crate::cpu::CpuPerRequest;

/// Which path the load took.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Direct,
    /// A byte-splicing TCP relay (socat): no HTTP parsing at all, so what it adds is the floor
    /// any proxy pays for the extra hop on this machine.
    Splice,
    Nginx,
    /// bench-hyper-relay: the cheapest hyper-based proxy doing nginx's job (bench/src/relay.rs),
    /// the floor any proxy built on hyper + tokio pays.
    Hyper,
    Sidecar,
}

impl Via {
    pub fn label(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Splice => "splice",
            Via::Nginx => "nginx",
            Via::Hyper => "hyper",
            Via::Sidecar => "sidecar",
        }
    }
}

/// Where the processes of a latency run sat on the two cores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Load generator and upstream on core 0, the proxy alone on core 1: the direct path stays
    /// on one core while a proxied call crosses cores four times.
    #[default]
    Isolated,
    /// Load generator and proxy share core 0 (an agent and its sidecar in one pod), the
    /// upstream on core 1 (the remote vendor): direct and proxied calls cross cores alike.
    Pod,
}

impl Layout {
    pub fn label(self) -> &'static str {
        match self {
            Layout::Isolated => "isolated",
            Layout::Pod => "pod",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A closed-loop run at saturation (wrk).
    Throughput {
        via: Via,
        connections: usize,
        round: u32,
        requests_per_sec: f64,
        requests: u64,
        /// Non-2xx responses plus socket errors.
        errors: u64,
        /// CPU the proxy process spent per request in this run (absent for `direct`, and in
        /// records written before it was measured).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu: Option<CpuPerRequest>,
    },
    /// An open-loop run at a fixed rate (bench-loadgen); latencies in microseconds.
    Latency {
        via: Via,
        /// Absent in records written before layouts existed: those ran isolated.
        #[serde(default)]
        layout: Layout,
        round: u32,
        rate: f64,
        connections: usize,
        ok: u64,
        errors: u64,
        p50_us: f64,
        p90_us: f64,
        p99_us: f64,
        p999_us: f64,
        max_us: f64,
        /// Uncorrected (from actual send time), for comparison.
        service_p50_us: f64,
        service_p99_us: f64,
    },
    /// Peak resident set size of a proxy process over the whole run.
    PeakRss {
        via: Via,
        keys: usize,
        max_rss_kb: u64,
        source: String,
    },
    /// Resident set size of a proxy process once started (the sidecar: ready, its keys
    /// loaded), before any load.
    RssAtRest {
        via: Via,
        keys: usize,
        rss_kb: u64,
        source: String,
    },
    /// The sidecar's policy-store lookup micro-benchmark.
    Lookup {
        keys: usize,
        iterations: u64,
        hit_ns: f64,
        miss_ns: f64,
        hash_and_hit_ns: f64,
    },
}

impl Record {
    pub fn parse_lines(text: &str) -> Result<Vec<Record>, serde_json::Error> {
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(serde_json::from_str)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_tagged_json_lines() {
        let record = Record::PeakRss {
            via: Via::Sidecar,
            keys: 10_000,
            max_rss_kb: 12_345,
            source: "/usr/bin/time -v".into(),
        };
        let line = serde_json::to_string(&record).unwrap();
        assert!(line.contains(r#""kind":"peak_rss""#), "{line}");
        assert!(line.contains(r#""via":"sidecar""#), "{line}");
        assert_eq!(
            Record::parse_lines(&format!("{line}\n\n{line}\n")).unwrap(),
            vec![record.clone(), record]
        );
    }
}
