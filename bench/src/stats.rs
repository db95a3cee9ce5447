//! Percentiles and medians, done the plain way: sort and pick.

use std::time::Duration;

/// Nearest-rank percentile (`q` in 0..=100) of an ascending slice; `None` when empty.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Median of the values (mean of the middle two for an even count); `None` when empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    })
}

/// Nearest-rank percentile (`q` in 0..=100) of unsorted values, reordering them (linear time:
/// bootstrap resamples take thousands of these); `None` when empty.
pub fn percentile_unsorted(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let rank = ((q / 100.0) * values.len() as f64).ceil() as usize;
    let index = rank.clamp(1, values.len()) - 1;
    let (_, value, _) = values.select_nth_unstable_by(index, f64::total_cmp);
    Some(*value)
}

/// A small deterministic generator (SplitMix64) for resampling: the same seed gives the same
/// interval, so a report can be re-rendered identically.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0); the modulo bias is negligible for the block counts used.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|v| Duration::from_micros(*v)).collect()
    }

    #[test]
    fn nearest_rank_percentiles() {
        let sorted = micros(&(1..=100).collect::<Vec<_>>());
        assert_eq!(percentile(&sorted, 50.0), Some(Duration::from_micros(50)));
        assert_eq!(percentile(&sorted, 99.0), Some(Duration::from_micros(99)));
        assert_eq!(percentile(&sorted, 99.9), Some(Duration::from_micros(100)));
        assert_eq!(percentile(&sorted, 0.0), Some(Duration::from_micros(1)));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median([]), None);
    }

    #[test]
    fn unsorted_percentiles_match_the_sorted_ones() {
        let mut values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile_unsorted(&mut values, 99.0), Some(99.0));
        assert_eq!(percentile_unsorted(&mut values, 50.0), Some(50.0));
        assert_eq!(percentile_unsorted(&mut values, 99.9), Some(100.0));
        assert_eq!(percentile_unsorted(&mut [], 50.0), None);
    }

    #[test]
    fn the_generator_is_deterministic_and_covers_its_range() {
        let (mut a, mut b) = (SplitMix64::new(7), SplitMix64::new(7));
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let x = a.below(10);
            assert_eq!(x, b.below(10));
            seen[x] = true;
        }
        assert!(seen.iter().all(|s| *s), "{seen:?}");
    }
}
