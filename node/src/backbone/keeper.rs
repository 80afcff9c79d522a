//! Presence keeping, the same for every backbone that shares presence: this node instance's
//! heartbeat, putting its entries back when the backbone forgot them, and reaping instances
//! that died without saying so. Also the reconnect backoff with jitter the backbones use.
//!
//! Every third of `presence_ttl` the keeper beats. A beat that finds the instance
//! unregistered (its first, or the backbone lost its data, or other nodes reaped it as dead
//! during a partition) re-registers every presence entry of this node from the hub's
//! snapshot — idempotent, existing entries are untouched — and announces `user_joined` for
//! ids that were missing. Once it has beaten for a whole ttl, each beat also reaps: after an
//! outage every instance's last beat is old, and each must get the chance to beat again
//! before anyone judges it dead. The reaping itself (find, remove, announce `node_down` once)
//! is the backbone's atomic primitive, [`Backbone::reap`].

use super::{Backbone, PresenceChange, PresenceEntry, Reaped, Scope, Seat};
use crate::hub::Hub;
use crate::metrics::Metrics;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Keeps one node instance's presence; see the module docs.
pub struct Keeper {
    backbone: Arc<dyn Backbone>,
    hub: Arc<Hub>,
    metrics: Metrics,
    /// This node's name, the `server` of its entries.
    server: String,
    instance: String,
    ttl: Duration,
    /// Since when every beat succeeded (`None` after a failed one).
    beating_since: Option<Instant>,
}

impl Keeper {
    /// The keeper of `instance` of node `server`, whose presence dies after `ttl` silent.
    pub fn new(
        backbone: Arc<dyn Backbone>,
        hub: Arc<Hub>,
        metrics: Metrics,
        server: String,
        instance: String,
        ttl: Duration,
    ) -> Self {
        Self { backbone, hub, metrics, server, instance, ttl, beating_since: None }
    }

    /// Runs [`Keeper::round`] every third of `presence_ttl` until `shutdown`, then
    /// deregisters the instance.
    pub fn spawn(mut self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.ttl / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                self.round(Instant::now()).await;
            }
            self.backbone.deregister().await;
        })
    }

    /// One beat at `now`: heartbeat, re-registration if it was missing, and the reaper once
    /// this instance has been beating for a whole ttl. Returns what the reaper did, if it ran.
    pub async fn round(&mut self, now: Instant) -> Option<Reaped> {
        let missing = match self.backbone.heartbeat().await {
            Ok(missing) => missing,
            Err(e) => {
                self.beating_since = None;
                debug!(error = %e, "presence heartbeat failed");
                return None;
            }
        };
        let since = *self.beating_since.get_or_insert(now);
        if missing {
            self.reregister().await;
        }
        if now.saturating_duration_since(since) < self.ttl {
            return None;
        }
        match self.backbone.reap().await {
            Ok(reaped) => {
                if reaped.instances > 0 {
                    info!(
                        instances = reaped.instances,
                        announced = reaped.announced,
                        "reaped dead node instances; announced their members as node_down"
                    );
                    self.metrics.instances_reaped.inc_by(reaped.instances);
                }
                Some(reaped)
            }
            Err(e) => {
                debug!(error = %e, "reaper failed");
                None
            }
        }
    }

    /// Puts back every presence entry of this node (entries present are untouched); returns
    /// how many were missing. A failure stops it: the entries are put back at the next beat
    /// that finds the instance missing.
    pub async fn reregister(&self) -> usize {
        let mut restored = 0usize;
        for (room, conn, info) in self.hub.presence_snapshot() {
            let entry = PresenceEntry { id: info.id.to_string(), user: info.user.clone(), server: self.server.clone() };
            let scope = room.as_deref().map_or(Scope::Online, Scope::Room);
            let event = room.as_deref().map(|room| {
                tether_proto::wire::Event::UserJoined { room, user: &entry.user, id: &entry.id, server: &entry.server }
                    .to_json()
            });
            match self.backbone.presence_add(Seat { scope, conn }, &entry, event).await {
                Ok((PresenceChange::Unchanged, _)) => {}
                Ok(_) => restored += 1,
                Err(e) => {
                    debug!(error = %e, "presence re-registration failed; next heartbeat retries");
                    break;
                }
            }
        }
        if restored > 0 {
            warn!(instance = %self.instance, restored, "presence entries were missing in the backbone (reaped or lost); re-registered");
        }
        restored
    }
}

/// `wait` with jitter: a random 50–100% of it, so that nodes cut off together do not all
/// come back in the same instant.
pub fn jitter(wait: Duration) -> Duration {
    wait.mul_f64(rand::rng().random_range(0.5..1.0))
}

/// A reconnect loop's exponential backoff: from `min`, doubling up to `max`, each wait
/// jittered.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, next: min }
    }

    /// The next wait (jittered), doubling the one after it.
    pub fn next_wait(&mut self) -> Duration {
        let wait = jitter(self.next);
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// The wait before attempt `attempts` (counted from 0) of a loop that keeps the count
    /// itself, jittered.
    pub fn nth(min: Duration, max: Duration, attempts: usize) -> Duration {
        jitter(min.saturating_mul(1 << attempts.min(16) as u32).min(max))
    }

    /// Back to `min`, after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The backoff the next wait is drawn from (before jitter), for logs.
    pub fn current(&self) -> Duration {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::memory::{taken, Store, TestNode};

    fn keeper_of(node: &TestNode) -> Keeper {
        let (server, instance, ttl) = node.identity();
        let backbone: Arc<dyn Backbone> = Arc::clone(&node.backbone) as Arc<dyn Backbone>;
        Keeper::new(backbone, Arc::clone(&node.hub), node.metrics.clone(), server, instance, ttl)
    }

    const TTL: Duration = Duration::from_secs(30);

    /// The `(type, id, reason)` of each membership event among `frames`.
    fn events(frames: &[serde_json::Value]) -> Vec<(String, String, Option<String>)> {
        frames
            .iter()
            .map(|f| {
                let s = |k: &str| f[k].as_str().map(String::from);
                (s("type").unwrap_or_default(), s("id").unwrap_or_default(), s("reason"))
            })
            .collect()
    }

    #[tokio::test]
    async fn entries_the_backbone_forgot_are_put_back_and_announced_once() {
        let store = Store::new(TTL);
        let (a, b) = (store.add_node("a"), store.add_node("b"));
        a.join(1, "alice", "r").await;
        let watcher = b.join(1, "bob", "r").await;
        a.say("r", &["one", "two"]).await;
        taken(&watcher);
        let mut keeper = keeper_of(&a);
        let t0 = Instant::now();
        keeper.round(t0).await;
        assert!(taken(&watcher).is_empty(), "first beat: every entry was there, nothing announced");

        store.forget();
        let online = a.backbone.presence_list(Scope::Online).await.unwrap();
        assert!(online.is_empty(), "the store lost alice");
        keeper.round(t0 + TTL / 3).await;
        let online = a.backbone.presence_list(Scope::Online).await.unwrap();
        assert_eq!(online.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["alice"]);
        let in_room = a.backbone.presence_list(Scope::Room("r")).await.unwrap();
        assert_eq!(in_room.iter().map(|e| (e.id.as_str(), e.server.as_str())).collect::<Vec<_>>(), [("alice", "a")]);
        let seen = taken(&watcher);
        assert_eq!(events(&seen), [("user_joined".to_string(), "alice".to_string(), None)]);
        assert_eq!(seen[0]["head_seq"], 0, "the store lost the room's log too: completed at its new position");

        keeper.round(t0 + TTL * 2 / 3).await;
        assert!(taken(&watcher).is_empty(), "registered again: nothing more to announce");
    }

    #[tokio::test]
    async fn a_dead_instance_is_reaped_and_its_members_announced_once() {
        let store = Store::new(TTL);
        let (a, b, c) = (store.add_node("a"), store.add_node("b"), store.add_node("c"));
        a.join(1, "alice", "r").await;
        let watcher = b.join(1, "bob", "r").await;
        let (mut ka, mut kb, mut kc) = (keeper_of(&a), keeper_of(&b), keeper_of(&c));
        let t0 = Instant::now();
        for k in [&mut ka, &mut kb, &mut kc] {
            assert_eq!(k.round(t0).await, None, "no reaping before beating a whole ttl");
        }
        // a dies; b and c go on beating.
        store.advance(TTL * 2);
        for k in [&mut kb, &mut kc] {
            assert_eq!(k.round(t0 + TTL / 3).await, None, "not beating for a ttl yet: a is not judged");
        }
        let reaped = [kb.round(t0 + TTL).await, kc.round(t0 + TTL).await];
        assert_eq!(reaped, [Some(Reaped { instances: 1, announced: 1 }), Some(Reaped::default())], "one reaper wins");
        let left = [("user_left".to_string(), "alice".to_string(), Some("node_down".to_string()))];
        assert_eq!(events(&taken(&watcher)), left);
        assert_eq!(b.metrics.instances_reaped.get() + c.metrics.instances_reaped.get(), 1);
        assert!(b.backbone.presence_list(Scope::Room("r")).await.unwrap().iter().all(|e| e.id != "alice"));
        kb.round(t0 + TTL * 2).await;
        assert!(taken(&watcher).is_empty(), "announced once");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(350));
        let mut b = Backoff::new(min, max);
        let waits: Vec<Duration> = (0..4).map(|_| b.next_wait()).collect();
        for (wait, base) in waits.iter().zip([100, 200, 350, 350]) {
            let base = Duration::from_millis(base);
            assert!(*wait >= base / 2 && *wait <= base, "{wait:?} within 50–100% of {base:?}");
        }
        b.reset();
        assert_eq!(b.current(), min);
        assert!(Backoff::nth(min, max, 40) <= max);
    }
}
