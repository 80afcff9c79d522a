//! The one way tools and tests wait for a condition: [`eventually`] polls it until it holds
//! or a deadline passes, and then says what was awaited and for how long. Nothing waits on a
//! fixed sleep.

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// The pause between two polls: short enough that a test sees a state change (a node going
/// unready for a moment) while it lasts, long enough not to busy-loop on HTTP probes.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// A condition did not hold within its deadline.
#[derive(Debug, thiserror::Error)]
#[error("gave up waiting for {what} after {after:?}")]
pub struct TimedOut {
    /// What was awaited, as the caller named it.
    pub what: String,
    /// The deadline it was given.
    pub after: Duration,
}

/// What a polled condition answers: `bool` (holds or not) or `Option<T>` (`Some` carries the
/// value that was waited for).
pub trait Poll {
    /// The value [`eventually`] returns once the condition holds.
    type Output;
    /// `Some` once the condition holds.
    fn ready(self) -> Option<Self::Output>;
}

impl Poll for bool {
    type Output = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Poll for Option<T> {
    type Output = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// Polls `condition` until it holds (`true` or `Some`), or fails with [`TimedOut`] once
/// `deadline` has passed since the call. The condition is always polled at least once, and
/// once more at the deadline, so a condition that holds by then is not reported as a timeout.
pub async fn eventually<P, F, Fut>(deadline: Duration, what: &str, mut condition: F) -> Result<P::Output, TimedOut>
where
    P: Poll,
    F: FnMut() -> Fut,
    Fut: Future<Output = P>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = condition().await.ready() {
            return Ok(v);
        }
        let now = Instant::now();
        if now >= end {
            return Err(TimedOut { what: what.to_owned(), after: deadline });
        }
        tokio::time::sleep(POLL_EVERY.min(end - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_the_value_once_the_condition_holds() {
        let polls = AtomicU32::new(0);
        let got = eventually(Duration::from_secs(5), "the third poll", || async {
            let n = polls.fetch_add(1, Ordering::Relaxed) + 1;
            (n >= 3).then_some(n)
        })
        .await
        .expect("holds on the third poll");
        assert_eq!(got, 3);
    }

    #[tokio::test]
    async fn times_out_naming_what_was_awaited() {
        let started = Instant::now();
        let err = eventually(Duration::from_millis(50), "a miracle", || async { false }).await.expect_err("never");
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(err.to_string(), "gave up waiting for a miracle after 50ms");
    }
}
