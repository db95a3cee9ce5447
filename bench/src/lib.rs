//! Tools behind `make bench` (bench/run.sh): the fixed-body upstream, an open-loop load
//! generator that corrects for coordinated omission, parsers for wrk's output and the writer of
//! docs/BENCHMARKS.md's data-plane tables. Benchmarks report numbers; they are not tests.
#![forbid(unsafe_code)]

pub mod client;
pub mod cpu;
pub mod dataplane;
pub mod doc;
pub mod keys;
pub mod openloop;
pub mod overhead;
pub mod record;
pub mod relay;
pub mod rss;
pub mod stats;
pub mod upstream;
pub mod wrk;
