//! How long events take from commit to Kafka's acknowledgement: a fixed-bucket histogram.
//!
//! The relay measures each transaction once all of its events are acknowledged, in commit
//! order (the moment the slot may move past it): acknowledgement time minus commit time. The
//! buckets are log-spaced, eight per doubling from 50 µs up to 6.55 s, so a quantile read
//! from them is at most 10% above the true value. Counts are cumulative since the server
//! started, as monitoring systems expect: take two snapshots and subtract for an interval.

/// Bucket `i` holds latencies up to [`upper_bound_us`]`(i)`; the last one holds the rest.
pub const BUCKETS: usize = 8 * 17 + 2;

const FIRST_BOUND_US: f64 = 50.0;

/// The inclusive upper bound of bucket `i` in µs, or `None` for the last (unbounded) bucket.
pub fn upper_bound_us(i: usize) -> Option<u64> {
    (i + 1 < BUCKETS).then(|| (FIRST_BOUND_US * 2f64.powf(i as f64 / 8.0)).round() as u64)
}

/// The bucket a latency of `us` microseconds falls into.
pub fn bucket_of(us: u64) -> usize {
    // The bounds are monotonic; a binary search over 138 values costs a few comparisons.
    let (mut lo, mut hi) = (0, BUCKETS - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if us <= upper_bound_us(mid).expect("mid < BUCKETS - 1") {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// Counts per bucket (not cumulative), and the sum of every latency recorded (a Prometheus
/// histogram's `_sum`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: [u64; BUCKETS],
    sum_us: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { counts: [0; BUCKETS], sum_us: 0 }
    }
}

impl LatencyHistogram {
    /// Records one latency. A negative one (the clock stepped back) counts as zero.
    pub fn record(&mut self, us: i64) {
        let us = us.max(0) as u64;
        self.counts[bucket_of(us)] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub fn counts(&self) -> &[u64; BUCKETS] {
        &self.counts
    }

    /// The sum of every latency recorded, in µs.
    pub fn sum_us(&self) -> u64 {
        self.sum_us
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&c| c == 0)
    }

    /// Adds `other`'s counts into `self`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    pub fn clear(&mut self) {
        self.counts = [0; BUCKETS];
        self.sum_us = 0;
    }

    /// The upper bound of the bucket holding quantile `q` (0 < q ≤ 1), in µs. `None` when
    /// empty, or `Some(u64::MAX)` when the quantile lies in the unbounded bucket.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper_bound_us(i).unwrap_or(u64::MAX));
            }
        }
        unreachable!("rank <= total")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_log_spaced_and_each_value_lands_at_or_below_its_bound() {
        assert_eq!(upper_bound_us(0), Some(50));
        assert_eq!(upper_bound_us(8), Some(100));
        assert_eq!(upper_bound_us(BUCKETS - 2), Some(50 << 17));
        assert_eq!(upper_bound_us(BUCKETS - 1), None);
        for us in [0, 1, 50, 51, 99, 100, 101, 3_000, 25_000, 50_000, 6_553_600, 6_553_601, u64::MAX] {
            let i = bucket_of(us);
            if let Some(bound) = upper_bound_us(i) {
                assert!(us <= bound, "{us} µs above its bucket's bound {bound}");
            }
            if i > 0 {
                assert!(us > upper_bound_us(i - 1).unwrap(), "{us} µs belongs in a lower bucket");
            }
        }
        for i in 1..BUCKETS - 1 {
            let ratio = upper_bound_us(i).unwrap() as f64 / upper_bound_us(i - 1).unwrap() as f64;
            // 2^(1/8) = 1.09, give or take the rounding to whole µs.
            assert!(ratio > 1.0 && ratio < 1.11, "bucket {i}: step {ratio}");
        }
    }

    #[test]
    fn quantiles_come_from_the_bucket_that_holds_the_rank() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), None);
        // 98 fast transactions, one at 40 ms, one at 10 s.
        for _ in 0..98 {
            h.record(3_000);
        }
        h.record(40_000);
        h.record(10_000_000);
        let p50 = h.quantile_us(0.5).unwrap();
        assert!((3_000..3_300).contains(&p50), "p50 {p50}");
        let p99 = h.quantile_us(0.99).unwrap();
        assert!((40_000..44_000).contains(&p99), "p99 {p99}");
        assert_eq!(h.quantile_us(1.0), Some(u64::MAX));
        assert_eq!(h.total(), 100);
    }

    #[test]
    fn negative_latencies_count_as_zero_and_merge_adds() {
        let mut a = LatencyHistogram::default();
        a.record(-5);
        assert_eq!(a.counts()[0], 1);
        let mut b = LatencyHistogram::default();
        b.record(1_000);
        b.merge(&a);
        assert_eq!(b.total(), 2);
        // The sum counts each latency as recorded (the negative one as zero).
        assert_eq!(b.sum_us(), 1_000);
        b.record(2_500);
        assert_eq!(b.sum_us(), 3_500);
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.sum_us(), 0);
    }
}
