//! The delay before each reconnect attempt.
//!
//! After a connection that was up and in sync is lost, the first attempt is immediate; each
//! further consecutive failure doubles the delay from `backoff_min` up to `backoff_max`, and
//! `jitter` randomises the lower part of it so that the clients of a dead node do not all
//! come back in the same millisecond.

use rand::Rng;
use std::time::Duration;

/// Exponential backoff with jitter; pure, so the schedule is unit-tested without a clock.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    jitter: f64,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration, jitter: f64) -> Self {
        Self { min, max, jitter: jitter.clamp(0.0, 1.0) }
    }

    /// The delay before the next attempt when `failures` attempts in a row have failed:
    /// zero for none, then `min`, `2·min`, `4·min` … capped at `max`, less a random share of
    /// up to `jitter` of it.
    pub(crate) fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        // 2^(failures-1) saturates long before the shift could overflow the factor.
        let factor = 1u32 << (failures - 1).min(20);
        let full = self.min.saturating_mul(factor).min(self.max);
        if self.jitter == 0.0 {
            return full;
        }
        let cut = rand::rng().random::<f64>() * self.jitter;
        full.mul_f64(1.0 - cut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_min_to_max() {
        let b = Backoff::new(Duration::from_millis(500), Duration::from_secs(20), 0.0);
        let got: Vec<u64> = (0..10).map(|f| b.delay(f).as_millis() as u64).collect();
        assert_eq!(got, [0, 500, 1000, 2000, 4000, 8000, 16000, 20000, 20000, 20000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(20));
    }

    #[test]
    fn jitter_stays_within_its_share() {
        let b = Backoff::new(Duration::from_millis(1000), Duration::from_secs(20), 0.5);
        for _ in 0..1000 {
            let d = b.delay(1);
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_millis(1000));
        }
    }
}
