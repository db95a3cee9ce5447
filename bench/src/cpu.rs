//! CPU time a proxy process spends per request: /proc/PID/stat read before and after a
//! throughput run. Shows where a throughput gap comes from (user space: parsing, policy,
//! scheduling; system: the socket calls every proxy makes alike).

use serde::{Deserialize, Serialize};

/// Linux reports times in /proc in USER_HZ units, fixed at 100 per second by the ABI.
const TICKS_PER_SEC: f64 = 100.0;

/// A process's accumulated CPU time, in clock ticks, all threads included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTicks {
    pub user: u64,
    pub system: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuParseError {
    #[error("/proc/PID/stat has no ')' after the command name")]
    NoCommandEnd,
    #[error("/proc/PID/stat has no numeric field {0}")]
    MissingField(usize),
    #[error("expected \"USER SYSTEM\" ticks, got {0:?}")]
    BadPair(String),
}

impl CpuTicks {
    /// Fields 14 (utime) and 15 (stime) of /proc/PID/stat. The command name (field 2) may hold
    /// spaces and parentheses, so fields are counted after its last ')'.
    pub fn from_proc_stat(text: &str) -> Result<Self, CpuParseError> {
        let after_command = &text[text.rfind(')').ok_or(CpuParseError::NoCommandEnd)? + 1..];
        // Field 3 (state) is the first one after the command name.
        let field = |number: usize| {
            after_command
                .split_whitespace()
                .nth(number - 3)
                .and_then(|value| value.parse::<u64>().ok())
                .ok_or(CpuParseError::MissingField(number))
        };
        Ok(Self {
            user: field(14)?,
            system: field(15)?,
        })
    }

    /// "USER SYSTEM", as `Display` writes it: how the shell carries a reading across a run.
    pub fn parse_pair(text: &str) -> Result<Self, CpuParseError> {
        let bad = || CpuParseError::BadPair(text.to_owned());
        let mut parts = text.split_whitespace().map(str::parse::<u64>);
        match (parts.next(), parts.next(), parts.next()) {
            (Some(Ok(user)), Some(Ok(system)), None) => Ok(Self { user, system }),
            _ => Err(bad()),
        }
    }

    /// The CPU spent between `before` and `self`, per request served in between.
    pub fn per_request_since(self, before: CpuTicks, requests: u64) -> Option<CpuPerRequest> {
        if requests == 0 || self.user < before.user || self.system < before.system {
            return None;
        }
        let micros = |ticks: u64| ticks as f64 / TICKS_PER_SEC * 1e6 / requests as f64;
        Some(CpuPerRequest {
            user_us: micros(self.user - before.user),
            system_us: micros(self.system - before.system),
        })
    }
}

impl std::fmt::Display for CpuTicks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.user, self.system)
    }
}

/// Microseconds of CPU the proxy process spent per request during one run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CpuPerRequest {
    pub user_us: f64,
    pub system_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_past_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 1200 0 0 0 \
                    731 288 0 0 20 0 2 0 123456 1000000 500 18446744073709551615";
        assert_eq!(
            CpuTicks::from_proc_stat(stat),
            Ok(CpuTicks {
                user: 731,
                system: 288
            })
        );
        assert_eq!(
            CpuTicks::from_proc_stat("4242 (cut) S 1 2"),
            Err(CpuParseError::MissingField(14))
        );
        assert_eq!(
            CpuTicks::from_proc_stat("no command"),
            Err(CpuParseError::NoCommandEnd)
        );
    }

    #[test]
    fn carries_a_reading_as_text() {
        let ticks = CpuTicks {
            user: 12,
            system: 345,
        };
        assert_eq!(CpuTicks::parse_pair(&ticks.to_string()), Ok(ticks));
        for bad in ["", "12", "12 x", "1 2 3"] {
            assert!(CpuTicks::parse_pair(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn divides_the_difference_by_the_requests() {
        let before = CpuTicks {
            user: 100,
            system: 1000,
        };
        let after = CpuTicks {
            user: 150,
            system: 1300,
        };
        // 50 ticks = 0.5 s over 100,000 requests = 5 µs; 300 ticks = 30 µs.
        assert_eq!(
            after.per_request_since(before, 100_000),
            Some(CpuPerRequest {
                user_us: 5.0,
                system_us: 30.0
            })
        );
        assert_eq!(after.per_request_since(before, 0), None);
        assert_eq!(before.per_request_since(after, 10), None);
    }
}
