//! The backbone: how a room's frames travel between nodes.
//!
//! A node never delivers a room frame to its local members directly: it publishes once to
//! the backbone and delivers only what comes back from its subscription (the "double
//! delivery" mistake cannot happen). The seam is the [`Backbone`] trait: only what differs
//! between backbones — the atomic publish with seq, events, subscriptions, the log, the
//! presence and session records, readiness, and the liveness of node instances.
//! Implementations:
//! - [`redis::RedisBackbone`]: Redis pub/sub for live frames; a Lua script assigns each
//!   message its per-room `seq`, appends it to the room's log stream and publishes it, in
//!   one atomic step, so every node sees a room's messages in seq order;
//! - [`redis_cluster::RedisClusterBackbone`]: the same on a Redis Cluster, with sharded
//!   pub/sub, following slot moves and failovers;
//! - [`nats::NatsBackbone`]: NATS, with a JetStream stream per room for seq and log,
//!   republished to a plain subject per room; sessions and presence in streams;
//! - [`local::LocalBackbone`]: no backbone at all (`--backbone none`): sticky sessions
//!   alone, a room reaches only the members on the same node.
//!
//! Written once, above the trait:
//! - [`keeper`]: presence keeping — heartbeats, re-registration of this node's entries from
//!   the hub when the backbone forgot them, reaping dead instances; reconnect backoff and
//!   jitter;
//! - [`catch_up`]: after a reconnect, delivering from each room's log what was missed, and
//!   flagging a gap when the log no longer holds it;
//! - [`registry`]: announcing this node in the backbone's node registry while it serves,
//!   and withdrawing it on a graceful stop (balancers started with `--discover` follow it);
//! - [`inbound`]: the node's side of delivery. Backbones do not hold the hub: they hand what
//!   they receive to an [`inbound::Inbound`], synchronously, from their receiving task.
//!
//! Another backbone is a new module implementing [`Backbone`], plugged into [`start`]. The records it stores are in `tether_proto::backbone`.

pub mod catch_up;
pub mod decide;
pub mod dedup;
pub mod inbound;
pub mod keeper;
pub mod local;
pub mod nats;
pub mod redis;
pub mod redis_cluster;
pub mod registry;

#[cfg(test)]
pub(crate) mod memory;
#[cfg(test)]
mod webhook_tests;

use crate::config::{BackboneKind, Config};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::webhooks::Webhooks;
use futures_util::future::{ready, BoxFuture, FutureExt};
use std::sync::Arc;
pub use tether_proto::backbone::{NodeRecord, PresenceEntry, SessionRecord};
use tokio_util::sync::CancellationToken;

/// Starts the configured backbone, with the presence keeper above it (for the backbones that
/// share presence), all running until `shutdown`. Does not wait for the backbone to be
/// reachable: a node starts unready while it is away. With `hooks`, the backbone decides
/// webhook events in its presence steps and hands them there (configuration refuses
/// webhooks on a backbone that cannot).
pub async fn start(
    cfg: Arc<Config>,
    hub: Arc<Hub>,
    metrics: Metrics,
    hooks: Option<Arc<Webhooks>>,
    shutdown: CancellationToken,
) -> Result<Started, BackboneError> {
    let inbound: Arc<dyn inbound::Inbound> = Arc::new(inbound::HubInbound::new(Arc::clone(&hub), metrics.clone()));
    let instance = tether_proto::backbone::instance_id(&cfg.name);
    let backbone: Arc<dyn Backbone> = match (cfg.backbone, cfg.redis_cluster.clone()) {
        // Configuration refuses webhooks here.
        (BackboneKind::Redis, Some(seeds)) => {
            redis_cluster::RedisClusterBackbone::start(
                Arc::clone(&cfg),
                seeds,
                inbound,
                metrics.clone(),
                instance.clone(),
                shutdown.clone(),
            )
            .await?
        }
        (BackboneKind::Redis, None) => redis::RedisBackbone::start(
            Arc::clone(&cfg),
            inbound,
            metrics.clone(),
            instance.clone(),
            hooks,
            shutdown.clone(),
        )?,
        (BackboneKind::Nats, _) => {
            nats::NatsBackbone::start(Arc::clone(&cfg), inbound, metrics.clone(), instance.clone(), shutdown.clone())
                .await?
        }
        // One node alone: nobody else to keep presence for.
        (BackboneKind::None, _) => {
            let backbone = Arc::new(local::LocalBackbone::new(inbound, metrics, cfg.idempotency_ttl, hooks));
            return Ok(Started { backbone, instance });
        }
    };
    keeper::Keeper::new(Arc::clone(&backbone), hub, metrics, cfg.name.clone(), instance.clone(), cfg.presence_ttl)
        .spawn(shutdown);
    Ok(Started { backbone, instance })
}

/// What [`start`] started: the backbone, and this process' instance id (its presence and
/// registry entries are under it).
pub struct Started {
    pub backbone: Arc<dyn Backbone>,
    pub instance: String,
}

/// A room's log after some seq, read in one consistent snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// The room's current epoch (`None`: the room has no log at all).
    pub epoch: Option<String>,
    /// The last seq assigned in this epoch (0 when none).
    pub head_seq: u64,
    /// Logged frames with a greater seq than asked for, in seq order.
    pub frames: Vec<(u64, String)>,
}

/// What [`Backbone::publish_one`] did: the message's position, or — for a dedup key seen
/// within `idempotency_ttl` — the position of the first message published with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    pub epoch: String,
    /// Nothing was published: the key's first message already was.
    pub duplicate: bool,
}

/// A publish of several messages that stopped partway: the first `published` of them were
/// published, the rest were not (after a timeout: perhaps were, as with any command whose
/// answer did not come).
#[derive(Debug)]
pub struct Unpublished {
    pub published: usize,
    pub error: BackboneError,
}

/// Where a presence entry lives: in a room, or in the cluster-wide `online` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    Room(&'a str),
    Online,
}

/// One connection's place in presence: a scope, and the connection's number on this node (a
/// client id with two tabs has two seats in the same scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seat<'a> {
    pub scope: Scope<'a>,
    pub conn: u64,
}

impl<'a> Seat<'a> {
    /// Connection `conn`'s seat in `room`.
    pub fn room(room: &'a str, conn: u64) -> Self {
        Self { scope: Scope::Room(room), conn }
    }

    /// Connection `conn`'s seat in the cluster-wide `online` list.
    pub fn online(conn: u64) -> Self {
        Self { scope: Scope::Online, conn }
    }
}

/// What [`Backbone::presence_add`] answers: what the change did, and the `user_joined` as it
/// was completed with the room's position (published or not).
pub type Joined = (PresenceChange, Option<String>);

/// What a presence change did cluster-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// First connection of this id in the scope (the event was published) / last one gone.
    FirstOrLast,
    /// Other connections of the same id remain in the scope: nothing was announced.
    Shared,
    /// The entry was already there (add) or already gone (remove): nothing changed.
    Unchanged,
}

/// Why the backbone could not do what was asked. Always answered to the client as
/// `backbone_unavailable`: the node is fine, its backbone is not.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error("backbone not connected")]
    NotConnected,
    #[error("backbone did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("nats: {0}")]
    Nats(String),
}

impl BackboneError {
    /// Whether the error means the backbone cannot be used now (as opposed to an answer it
    /// gave: a script error, a wrong type): the node is not ready, a catch-up starts over.
    pub fn is_connection_failure(&self) -> bool {
        match self {
            Self::NotConnected | Self::Timeout(_) => true,
            Self::Redis(e) => e.is_io_error() || e.is_unrecoverable_error(),
            Self::Nats(_) => false,
        }
    }
}

/// The most pending webhook events one [`Backbone::claim_webhooks`] call claims.
pub const CLAIM_BATCH: usize = 100;

/// What the reaper did in one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Dead instances removed.
    pub instances: u64,
    /// `user_left`/`node_down` events published for their members.
    pub announced: u64,
}

/// What a backbone call returns: a boxed future (the trait is object-safe, the node holds an
/// `Arc<dyn Backbone>`) of its answer or a [`BackboneError`].
pub type Call<'a, T> = BoxFuture<'a, Result<T, BackboneError>>;

/// What differs between backbones; the node calls it directly. Object-safe, so the node
/// holds an `Arc<dyn Backbone>` chosen by configuration. Everything that is the same for
/// every backbone (keeping presence, catching up) is written once above it, in [`keeper`]
/// and [`catch_up`]; provided methods are what a backbone need not write.
pub trait Backbone: Send + Sync {
    /// For each of `prefixes` in order (one client's consecutive messages to `room`): assigns
    /// the next seq of `room`, completes the frame (prefix + seq + epoch), logs it and
    /// publishes it to every subscribed node, each message atomically.
    fn publish_messages<'a>(&'a self, room: &'a str, prefixes: Vec<String>) -> BoxFuture<'a, Result<(), Unpublished>>;

    /// Publishes one message like [`publish_messages`](Backbone::publish_messages) and answers
    /// its seq and epoch. With `key` (a dedup key, scoped to the room here): when a message
    /// with the same key was published within `idempotency_ttl`, nothing is published and the
    /// first one's position comes back with `duplicate`. Keys in use: `c:{client}:{msg_id}`
    /// (a client's message), `a:{idempotency_key}` (the server API).
    fn publish_one<'a>(&'a self, room: &'a str, prefix: String, key: Option<&'a str>) -> Call<'a, Published>;

    /// [`publish_one`](Backbone::publish_one) for consecutive messages of one client to
    /// `room`, each `(prefix, dedup key)`, in order; one answer per message. By default one
    /// call each; a backbone with a batched atomic step overrides it.
    fn publish_keyed<'a>(
        &'a self,
        room: &'a str,
        messages: Vec<(String, String)>,
    ) -> BoxFuture<'a, Result<Vec<Published>, Unpublished>> {
        async move {
            let mut out = Vec::with_capacity(messages.len());
            for (published, (prefix, key)) in messages.into_iter().enumerate() {
                out.push(
                    self.publish_one(room, prefix, Some(&key))
                        .await
                        .map_err(|error| Unpublished { published, error })?,
                );
            }
            Ok(out)
        }
        .boxed()
    }

    /// Publishes a membership event (no seq, not logged) to every subscribed node.
    fn publish_event<'a>(&'a self, room: &'a str, json: String) -> Call<'a, ()>;

    /// Makes sure this node receives `room`'s frames; returns once the subscription is live,
    /// so anything published afterwards reaches this node.
    fn subscribe<'a>(&'a self, room: &'a str) -> Call<'a, ()>;

    /// Drops the subscription to `room` if no local member is left (asked of the
    /// [`inbound::Inbound`] under the same lock as `subscribe` takes, so a concurrent join
    /// either keeps it or re-subscribes).
    fn release<'a>(&'a self, room: &'a str) -> BoxFuture<'a, ()>;

    /// The session stored for `id`, if any.
    fn load_session<'a>(&'a self, id: &'a str) -> Call<'a, Option<SessionRecord>>;

    /// Replaces the session of `id` and restarts its expiry.
    fn save_session<'a>(&'a self, id: &'a str, session: &'a SessionRecord) -> Call<'a, ()>;

    /// Restarts the expiry of these sessions (their clients are connected). By default each
    /// stored session is read and written back, which restarts an expiry that counts from
    /// the last write.
    fn touch_sessions<'a>(&'a self, ids: &'a [Arc<str>]) -> Call<'a, ()> {
        async move {
            for id in ids {
                if let Some(session) = self.load_session(id).await? {
                    self.save_session(id, &session).await?;
                }
            }
            Ok(())
        }
        .boxed()
    }

    /// Deletes the session of `id` (the server API's `disconnect` with `forget`): its next
    /// connection starts a new one.
    fn forget_session<'a>(&'a self, id: &'a str) -> Call<'a, ()>;

    /// Sends a control command (a `ControlCommand`'s JSON, `tether_proto::backbone`) to every
    /// node, this one included, which hands it to its [`inbound::Inbound::control`]. At most
    /// once, like the backbone's live frames: a node disconnected at that moment misses it.
    fn control(&self, command: String) -> Call<'_, ()>;

    /// The logged frames of `room` with seq > `after`, with the room's epoch and head seq.
    fn replay<'a>(&'a self, room: &'a str, after: u64) -> Call<'a, Replay>;

    /// Registers connection `conn` in `scope`; publishes `event` (a `user_joined`) to the
    /// room if this is the id's first connection there. The event is completed with the room's
    /// position (`head_seq`, `epoch`) at that instant and returned, published or not.
    fn presence_add<'a>(&'a self, at: Seat<'a>, entry: &'a PresenceEntry, event: Option<String>) -> Call<'a, Joined>;

    /// Updates the display name of an entry, nothing else.
    fn presence_rename<'a>(&'a self, at: Seat<'a>, entry: &'a PresenceEntry) -> Call<'a, ()>;

    /// Removes connection `conn` from `scope`; publishes `event` (a `user_left`) if it was the
    /// id's last connection there.
    fn presence_remove<'a>(&'a self, at: Seat<'a>, id: &'a str, event: Option<String>) -> Call<'a, PresenceChange>;

    /// Every entry in `scope`, cluster-wide (one per connection; callers de-duplicate ids).
    fn presence_list<'a>(&'a self, scope: Scope<'a>) -> Call<'a, Vec<PresenceEntry>>;

    /// Whether the backbone is connected (drives `/readyz`).
    fn is_ready(&self) -> bool;

    /// Records that this node instance is alive, on the backbone's clock; `true` if the
    /// instance was not registered (first beat, reaped as dead, or the backbone lost its
    /// data), so that [`keeper`] puts this node's presence entries back. By default there is
    /// nobody to tell: `false`.
    fn heartbeat(&self) -> Call<'_, bool> {
        ready(Ok(false)).boxed()
    }

    /// Removes every instance silent for `presence_ttl`, with its presence entries, and
    /// publishes `user_left`/`node_down` for each client id left with no connection in a
    /// room — decided atomically, so each is announced once however many nodes reap.
    fn reap(&self) -> Call<'_, Reaped> {
        ready(Ok(Reaped::default())).boxed()
    }

    /// Claims up to [`CLAIM_BATCH`] pending webhook events whose grace has run out — atomically,
    /// so each goes to exactly one node — and hands them to the webhook sink; answers how
    /// many. By default (no webhooks) there are none.
    fn claim_webhooks(&self) -> Call<'_, usize> {
        ready(Ok(0)).boxed()
    }

    /// A graceful stop: this instance is gone (its sessions removed their entries already).
    fn deregister(&self) -> BoxFuture<'_, ()> {
        ready(()).boxed()
    }

    /// Writes (or renews) `record` in the node registry, timed on the backbone's clock, for
    /// balancers started with `--discover` ([`registry`] calls it every
    /// `tether_proto::backbone::ANNOUNCE_INTERVAL`). By default there is no registry (the
    /// `none` backbone): nothing to do.
    fn announce<'a>(&'a self, _record: &'a NodeRecord) -> Call<'a, ()> {
        ready(Ok(())).boxed()
    }

    /// Removes `record` from the node registry (a graceful stop), unless another instance of
    /// the same name has replaced it there meanwhile.
    fn withdraw<'a>(&'a self, _record: &'a NodeRecord) -> Call<'a, ()> {
        ready(Ok(())).boxed()
    }
}

/// Claims due pending events every [`crate::webhooks::claim_interval`] until `stop`; what this node claims,
/// the backbone hands to the sink. Every node runs one: the claim is atomic, so each event
/// goes to exactly one of them, and a node's death loses none of the pending ones.
pub async fn claim_loop(backbone: Arc<dyn Backbone>, grace: std::time::Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(crate::webhooks::claim_interval(grace));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A full batch means more may be due: claim again at once.
        loop {
            match backbone.claim_webhooks().await {
                Ok(n) if n >= CLAIM_BATCH => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "claiming due webhook events failed; retrying next tick");
                    break;
                }
            }
        }
    }
}
