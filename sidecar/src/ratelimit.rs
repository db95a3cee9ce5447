//! Per-key `callsPerMinute`: a token bucket holding at most one minute of calls, refilled
//! continuously. Integer arithmetic in micro-tokens; the caller supplies the clock.
use std::time::Instant;

const MICRO: u128 = 1_000_000;

#[derive(Debug)]
pub struct TokenBucket {
    micro_tokens: u128,
    last: Option<Instant>,
}

impl Default for TokenBucket {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenBucket {
    pub const fn new() -> Self {
        TokenBucket {
            micro_tokens: 0,
            last: None,
        }
    }

    /// Takes one call's token if the bucket (capacity `per_minute`) has one at `now`.
    pub fn try_take(&mut self, per_minute: u32, now: Instant) -> bool {
        let capacity = u128::from(per_minute) * MICRO;
        self.micro_tokens = match self.last {
            // A fresh bucket starts full.
            None => capacity,
            Some(last) => {
                let elapsed_ns = now.saturating_duration_since(last).as_nanos();
                // per_minute tokens per 60e9 ns, in micro-tokens: ns * per_minute / 60_000.
                let refill = elapsed_ns * u128::from(per_minute) / 60_000;
                (self.micro_tokens + refill).min(capacity)
            }
        };
        self.last = Some(now);
        if self.micro_tokens >= MICRO {
            self.micro_tokens -= MICRO;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn allows_a_minute_of_burst_then_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new();
        for i in 0..120 {
            assert!(b.try_take(120, t0), "call {i}");
        }
        assert!(!b.try_take(120, t0));
        // 120/min = one every 500 ms.
        assert!(!b.try_take(120, t0 + Duration::from_millis(499)));
        // One second = two tokens (the refused attempt above took nothing).
        assert!(b.try_take(120, t0 + Duration::from_millis(1000)));
        assert!(b.try_take(120, t0 + Duration::from_millis(1000)));
        assert!(!b.try_take(120, t0 + Duration::from_millis(1000)));
        // Never more than capacity, however long the pause.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..120 {
            assert!(b.try_take(120, later));
        }
        assert!(!b.try_take(120, later));
    }

    #[test]
    fn one_per_minute() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new();
        assert!(b.try_take(1, t0));
        assert!(!b.try_take(1, t0 + Duration::from_secs(59)));
        assert!(b.try_take(1, t0 + Duration::from_secs(61)));
    }
}
