//! Reads the summary wrk prints.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrkSummary {
    pub requests_per_sec: f64,
    pub requests: u64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("wrk output has no {0} line")]
pub struct WrkParseError(&'static str);

pub fn parse(output: &str) -> Result<WrkSummary, WrkParseError> {
    let mut requests_per_sec = None;
    let mut requests = None;
    let mut non_2xx = 0;
    let mut socket_errors = 0;
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            requests_per_sec = rest.trim().parse::<f64>().ok();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx = rest.trim().parse().unwrap_or(u64::MAX);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if line.contains(" requests in ") {
            requests = line.split_whitespace().next().and_then(|n| n.parse().ok());
        }
    }
    Ok(WrkSummary {
        requests_per_sec: requests_per_sec.ok_or(WrkParseError("Requests/sec"))?,
        requests: requests.ok_or(WrkParseError("requests in"))?,
        non_2xx,
        socket_errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = "Running 5s test @ http://127.0.0.1:18080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   146.90us   40.00us   2.00ms   90.00%
    Req/Sec   108.00k     3.00k  112.00k    80.00%
  537000 requests in 5.00s, 634.00MB read
Requests/sec: 107400.12
Transfer/sec:    126.80MB
";

    #[test]
    fn reads_rate_and_count() {
        let summary = parse(CLEAN).unwrap();
        assert_eq!(summary.requests_per_sec, 107400.12);
        assert_eq!(summary.requests, 537000);
        assert_eq!((summary.non_2xx, summary.socket_errors), (0, 0));
    }

    #[test]
    fn reads_errors() {
        let text = CLEAN.replace(
            "Requests/sec",
            "  Socket errors: connect 0, read 3, write 0, timeout 2\n  Non-2xx or 3xx responses: 7\nRequests/sec",
        );
        let summary = parse(&text).unwrap();
        assert_eq!((summary.non_2xx, summary.socket_errors), (7, 5));
    }

    #[test]
    fn refuses_output_without_a_rate() {
        assert_eq!(
            parse("unable to connect to 127.0.0.1:1"),
            Err(WrkParseError("Requests/sec"))
        );
    }
}
