//! The Redis backbone's share of webhooks: the pending keys the presence scripts are given
//! when webhooks are on, reading what the scripts decided, and the claim of due events.
//! The decisions themselves are in the scripts (`scripts.rs`), atomic with the presence
//! change.

use crate::webhooks::{Decided, Webhooks};
use std::sync::Arc;
use std::time::SystemTime;
use tether_proto::backbone::RedisKeys;
use tracing::warn;

/// Webhooks as the Redis backbone sees them: the sink and the pending keys.
pub(super) struct RedisHooks {
    pub sink: Arc<Webhooks>,
    /// `{prefix}webhooks:{pending}` (due times) and its `:data` hash.
    pub pending: String,
    pub data: String,
    /// The grace in ms, as the scripts take it.
    pub grace_ms: u64,
}

impl RedisHooks {
    pub fn new(sink: Arc<Webhooks>, keys: &RedisKeys) -> Self {
        let grace_ms = sink.grace().as_millis() as u64;
        Self { sink, pending: keys.webhooks_pending(), data: keys.webhooks_pending_data(), grace_ms }
    }

    /// Hands what a script decided (its stored or returned forms) to the sink.
    pub fn offer(&self, forms: Vec<String>) {
        if forms.is_empty() {
            return;
        }
        let now = SystemTime::now();
        let decided = forms.into_iter().filter_map(|f| {
            let d = Decided::from_script(&f, now);
            if d.is_none() {
                warn!(form = %f, "unreadable webhook event from a script; skipped");
            }
            d
        });
        self.sink.offer(decided);
    }
}
