//! Latency histograms of the lab tools: HDR histograms with fixed bounds, a lock-free
//! [`AtomicHist`] that many tasks record into with one atomic add, and [`Latency`], the
//! percentiles every report prints.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

/// The highest value [`new_histogram`] records: 10 minutes in microseconds.
const DEFAULT_MAX_US: u64 = 600_000_000;

/// A latency histogram many tasks record into with one atomic add: exact below 128, then 64
/// buckets per power of two (values within 1.6 %), in microseconds up to 2^42.
#[derive(Debug)]
pub struct AtomicHist {
    buckets: Vec<AtomicU64>,
}

/// Buckets per power of two.
const HALF: u64 = 64;
/// Powers of two above 128 that get buckets.
const SHIFTS: u64 = 36;
const BUCKETS: u64 = 2 * HALF + SHIFTS * HALF;

impl Default for AtomicHist {
    fn default() -> Self {
        Self { buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl AtomicHist {
    fn index(v: u64) -> usize {
        if v < 2 * HALF {
            return v as usize;
        }
        // v = top << shift with top in [64, 128).
        let shift = u64::from(63 - v.leading_zeros()) - 6;
        let top = v >> shift;
        (2 * HALF + (shift - 1) * HALF + (top - HALF)).min(BUCKETS - 1) as usize
    }

    /// The lowest value of bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * HALF {
            return i;
        }
        let k = i - 2 * HALF;
        (k % HALF + HALF) << (k / HALF + 1)
    }

    pub fn record(&self, v: u64) {
        self.buckets[Self::index(v)].fetch_add(1, Ordering::Relaxed);
    }

    /// Non-empty buckets as `(value, count)`, zeroing them when `reset`.
    pub fn snapshot(&self, reset: bool) -> Vec<(u64, u64)> {
        self.buckets
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let n = if reset { b.swap(0, Ordering::Relaxed) } else { b.load(Ordering::Relaxed) };
                (n > 0).then(|| (Self::value(i), n))
            })
            .collect()
    }
}

/// A fresh HDR histogram for microseconds (1 µs … 10 min, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    histogram_up_to(DEFAULT_MAX_US)
}

/// A fresh HDR histogram for microseconds from 1 µs up to `max_us` (at least 2), 3 significant
/// digits. Larger values saturate at the top when recorded with `saturating_record`.
pub fn histogram_up_to(max_us: u64) -> Histogram<u64> {
    // low = 1, high ≥ 2·low and 3 significant digits satisfy `new_with_bounds`' rules, so this
    // cannot fail.
    Histogram::new_with_bounds(1, max_us.max(2), 3).expect("valid histogram bounds")
}

/// Adds `(value, count)` pairs (from [`AtomicHist::snapshot`]) to `h`.
pub fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(v, n) in pairs {
        let _ = h.record_n(v.max(1), n);
    }
}

/// p50/p99/p99.9/max of a histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            samples: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_stay_within_two_percent() {
        for v in [0u64, 1, 63, 64, 65, 100, 127, 128, 1000, 4097, 123_456, 9_999_999] {
            let low = AtomicHist::value(AtomicHist::index(v));
            assert!(low <= v, "{v} → bucket low {low}");
            assert!(v - low <= v / 64 + 1, "{v} → bucket low {low}");
        }
        let h = AtomicHist::default();
        h.record(100);
        h.record(100);
        h.record(5000);
        let snap = h.snapshot(true);
        assert_eq!(snap.iter().map(|p| p.1).sum::<u64>(), 3);
        assert!(h.snapshot(false).is_empty(), "reset");
    }
}
