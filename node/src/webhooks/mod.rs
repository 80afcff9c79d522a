//! Webhooks: membership and connection events, each decided exactly once for the whole
//! cluster, signed and POSTed to the app.
//!
//! Where an event is decided is the backbone's business, atomically with the presence change
//! that causes it (for Redis, inside the presence Lua scripts; see `backbone/redis/hooks.rs`):
//! a change either emits its event at once (`client.online`, `member.joined`,
//! `room.occupied`, an explicit leave's `member.left`) or records it as *pending* for
//! `offline_grace_ms` (`client.offline`, `member.left` on a disconnect or a node's death,
//! `room.vacated`), and a later change that undoes it within the grace cancels it. A pending
//! event whose grace ran out is claimed by exactly one node (`backbone::claim_loop` runs on every
//! node and asks the backbone, whose claim is atomic).
//!
//! What the backbone decides it hands to [`Webhooks::offer`] on the node that ran the step:
//! the event's body is built there once (id, time, signature) and put into a bounded queue;
//! [`deliver`]'s workers POST it with retries. A full queue drops the event (counted,
//! logged at most every 10 s) rather than slow anything down.
//!
//! - [`config`]: the `[webhooks]` table;
//! - [`event`]: event types, the decided event, the body and its signature;
//! - [`deliver`]: the workers.

pub mod config;
pub mod deliver;
pub mod event;

pub use config::{FileWebhooks, WebhooksConfig};
pub use event::{Decided, Kind, Outgoing};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: &'static str,
}

/// The webhook metrics (`tether_webhook_*`).
#[derive(Debug, Clone)]
pub struct WebhookMetrics {
    /// Events decided on this node, by type (before the `events` filter).
    pub decided: Family<TypeLabel, Counter>,
    pub delivered: Counter,
    pub failed_attempts: Counter,
    /// Dropped because the queue was full.
    pub dropped_full: Counter,
    /// Dropped after `max_retry_secs` of failed attempts.
    pub dropped_retries: Counter,
    pub queue_depth: Gauge,
    /// Seconds from the body being built to its 2xx.
    pub latency: Histogram,
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        Self {
            decided: Family::default(),
            delivered: Counter::default(),
            failed_attempts: Counter::default(),
            dropped_full: Counter::default(),
            dropped_retries: Counter::default(),
            queue_depth: Gauge::default(),
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 20)),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl WebhookMetrics {
    /// Registers them under `registry` (prefixed `tether` there: `tether_webhook_…`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("webhook_decided", "Webhook events decided on this node, by type", self.decided.clone());
        registry.register("webhook_delivered", "Webhook events delivered (answered 2xx)", self.delivered.clone());
        registry.register(
            "webhook_failed_attempts",
            "Webhook POSTs that failed (refused, timed out, non-2xx); each is retried",
            self.failed_attempts.clone(),
        );
        let dropped = Family::<ReasonLabel, Counter>::default();
        dropped.get_or_create(&ReasonLabel { reason: "queue_full" }).inc_by(self.dropped_full.get());
        dropped.get_or_create(&ReasonLabel { reason: "max_retry" }).inc_by(self.dropped_retries.get());
        registry.register(
            "webhook_dropped",
            "Webhook events dropped: the local queue was full, or max_retry_secs passed without a 2xx",
            dropped,
        );
        registry.register("webhook_queue_depth", "Webhook events waiting for delivery", self.queue_depth.clone());
        registry.register(
            "webhook_delivery_seconds",
            "From an event's body being built to its 2xx",
            self.latency.clone(),
        );
    }
}

/// The node's webhook sink: what the backbone hands decided events to.
pub struct Webhooks {
    cfg: Arc<WebhooksConfig>,
    queue: mpsc::Sender<Outgoing>,
    metrics: WebhookMetrics,
    /// Drops not yet logged, and when the last drop line was written (one per 10 s at most).
    unlogged_drops: AtomicU64,
    last_drop_log: Mutex<Option<std::time::Instant>>,
}

impl Webhooks {
    /// The sink, with its delivery workers running until `stop`.
    pub fn start(cfg: WebhooksConfig, metrics: WebhookMetrics, stop: CancellationToken) -> Arc<Self> {
        let cfg = Arc::new(cfg);
        let (queue, rx) = mpsc::channel(cfg.queue_len);
        deliver::spawn_workers(Arc::clone(&cfg), metrics.clone(), rx, stop);
        Arc::new(Self { cfg, queue, metrics, unlogged_drops: AtomicU64::new(0), last_drop_log: Mutex::new(None) })
    }

    pub fn config(&self) -> &WebhooksConfig {
        &self.cfg
    }

    /// How long a removal is graced (what the backbone records pending events for).
    pub fn grace(&self) -> Duration {
        self.cfg.offline_grace
    }

    /// Takes events this node decided: each wanted one gets its body built and is queued, or
    /// dropped when the queue is full. Never waits.
    pub fn offer(&self, events: impl IntoIterator<Item = Decided>) {
        for event in events {
            self.metrics.decided.get_or_create(&TypeLabel { r#type: event.kind.as_str() }).inc();
            if !self.cfg.wants(event.kind) {
                continue;
            }
            let out = Outgoing::build(&event, &self.cfg.secret);
            // Counted before the send: a worker may take it (and count it out) at once.
            self.metrics.queue_depth.inc();
            if let Err(e) = self.queue.try_send(out) {
                self.metrics.queue_depth.dec();
                self.metrics.dropped_full.inc();
                self.log_drop(&e.into_inner());
            }
        }
    }

    fn log_drop(&self, out: &Outgoing) {
        let unlogged = self.unlogged_drops.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_drop_log.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
            *last = Some(now);
            self.unlogged_drops.store(0, Ordering::Relaxed);
            warn!(id = %out.id, kind = out.kind.as_str(), dropped = unlogged, queue_len = self.cfg.queue_len,
                "webhook queue full; events dropped (logged at most every 10 s)");
        }
    }
}

/// How often each node asks the backbone for pending events whose grace has run out: a
/// fifth of the grace, between 50 ms and 1 s — an event goes out at most that late.
pub fn claim_interval(grace: Duration) -> Duration {
    (grace / 5).clamp(Duration::from_millis(50), Duration::from_secs(1))
}
