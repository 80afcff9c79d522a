//! What `/readyz` says of a Redis backbone (single or cluster), kept where the state changes:
//! the subscription side (subscribed to every room with local members, and caught up) and
//! the command side (the last command, or the keeper's probe, answered). Each command goes
//! through [`Readiness::command`], with its deadline; a failure that says the connection is
//! unusable makes the node unready at once, and [`Readiness::keep_commands`] probes with the
//! reconnect backoff until a command answers again.

use crate::backbone::keeper::Backoff;
use crate::backbone::BackboneError;
use crate::metrics::Metrics;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// The state readiness derives from, changed at the moment it changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Health {
    /// Subscribed to every room with local members (and the probe channels), and caught up.
    pub subscribed: bool,
    /// The command connection's last command (or the keeper's probe) succeeded.
    pub commands: bool,
}

impl Health {
    pub fn ready(self) -> bool {
        self.subscribed && self.commands
    }
}

pub(crate) struct Readiness {
    health: watch::Sender<Health>,
    /// Bumped whenever the command connection is seen failing: a command that started
    /// before a failure and succeeds after it says nothing about the connection now.
    command_failures: AtomicU64,
    /// Tells the command keeper to probe now (the subscriber just reached Redis).
    pub probe_now: Notify,
    metrics: Metrics,
    /// What the logs name the backbone by (its URL).
    label: String,
    /// Each command's deadline.
    pub timeout: Duration,
}

impl Readiness {
    pub fn new(metrics: Metrics, label: String, timeout: Duration) -> Self {
        Self {
            health: watch::Sender::new(Health::default()),
            command_failures: AtomicU64::new(0),
            probe_now: Notify::new(),
            metrics,
            label,
            timeout,
        }
    }

    pub fn ready(&self) -> bool {
        self.health.borrow().ready()
    }

    /// `fut` with the command deadline.
    pub async fn with_timeout<T>(&self, fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, BackboneError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(BackboneError::Timeout(self.timeout)),
        }
    }

    /// A command on the command connection, with its deadline; its outcome is what
    /// readiness knows of that connection. A failure that says the connection is unusable
    /// (I/O: refused, dropped, timed out; or no answer by the deadline) makes the node unready
    /// at once and wakes the keeper; a success makes it ready again at once, unless the
    /// connection was seen failing after this command started.
    pub async fn command<T>(&self, fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, BackboneError> {
        let failures = self.command_failures.load(Ordering::Acquire);
        let result = self.with_timeout(fut).await;
        match &result {
            Ok(_) => {
                // A read first: every publish passes here, and the write lock is needed only
                // on the one success after a failure.
                if !self.health.borrow().commands && self.command_failures.load(Ordering::Acquire) == failures {
                    self.set(|h| h.commands = true);
                }
            }
            Err(e) if e.is_connection_failure() => self.commands_failed(),
            Err(_) => {}
        }
        result
    }

    /// The command connection is not known to work (any more): unready until it is shown to.
    pub fn commands_failed(&self) {
        self.command_failures.fetch_add(1, Ordering::AcqRel);
        self.set(|h| h.commands = false);
    }

    /// Changes the health; `/readyz` and the metric follow at once.
    pub fn set(&self, change: impl FnOnce(&mut Health)) {
        self.health.send_if_modified(|h| {
            let before = *h;
            let was = h.ready();
            change(h);
            let now = h.ready();
            if was != now {
                self.metrics.backbone_ready.set(i64::from(now));
                if now {
                    info!(redis = %self.label, "backbone ready: subscribed, caught up, commands answered");
                } else {
                    info!(redis = %self.label, subscribed = h.subscribed, commands = h.commands, "backbone not ready");
                }
            }
            *h != before
        });
    }

    /// Whenever the command connection is not known to work, runs `probe` (a command through
    /// [`Readiness::command`]) with the reconnect backoff until it answers; until shutdown.
    ///
    /// A probe that fails is retried once at once: a lazily reconnecting connection answers
    /// the first command after a failure with that failure and only then starts a new
    /// attempt, which the second awaits.
    pub async fn keep_commands<F, Fut>(&self, probe: F, backoff: impl Fn() -> Backoff, shutdown: CancellationToken)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), BackboneError>>,
    {
        let mut health = self.health.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = health.wait_for(|h| !h.commands) => if r.is_err() { return },
            }
            let mut backoff = backoff();
            loop {
                if probe().await.is_ok() || probe().await.is_ok() {
                    break;
                }
                let wait = backoff.next_wait();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.probe_now.notified() => {}
                    // A client's command got through meanwhile.
                    r = health.wait_for(|h| h.commands) => if r.is_err() { return } else { break },
                }
            }
        }
    }

    /// Waits (up to the command deadline) until commands answer.
    pub async fn until_commands_answer(&self) -> Result<(), BackboneError> {
        let mut health = self.health.subscribe();
        let answered = tokio::time::timeout(self.timeout, health.wait_for(|h| h.commands)).await.map(|r| r.is_ok());
        match answered {
            Ok(true) => Ok(()),
            Ok(false) => Err(BackboneError::NotConnected),
            Err(_) => Err(BackboneError::Timeout(self.timeout)),
        }
    }
}
