//! Resident set size: the peak from the two places Linux reports it, and the current one.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no {0} line found")]
pub struct RssParseError(&'static str);

/// `Maximum resident set size (kbytes): N` from `/usr/bin/time -v`.
pub fn from_time_verbose(text: &str) -> Result<u64, RssParseError> {
    field(text, "Maximum resident set size (kbytes):")
        .ok_or(RssParseError("Maximum resident set size"))
}

/// `VmHWM:   N kB` from /proc/PID/status.
pub fn from_proc_status(text: &str) -> Result<u64, RssParseError> {
    field(text, "VmHWM:").ok_or(RssParseError("VmHWM"))
}

/// `VmRSS:   N kB` from /proc/PID/status: resident right now.
pub fn current_from_proc_status(text: &str) -> Result<u64, RssParseError> {
    field(text, "VmRSS:").ok_or(RssParseError("VmRSS"))
}

fn field(text: &str, label: &str) -> Option<u64> {
    text.lines()
        .map(str::trim)
        .find_map(|line| line.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_formats() {
        let time = "\tCommand being timed: \"sleep 1\"\n\tMaximum resident set size (kbytes): 1964\n\tAverage resident set size (kbytes): 0\n";
        assert_eq!(from_time_verbose(time), Ok(1964));
        let status =
            "Name:\tnginx\nVmPeak:\t   12000 kB\nVmHWM:\t    4321 kB\nVmRSS:\t    4000 kB\n";
        assert_eq!(from_proc_status(status), Ok(4321));
        assert_eq!(current_from_proc_status(status), Ok(4000));
        assert!(from_proc_status(time).is_err());
        assert!(current_from_proc_status(time).is_err());
    }
}
