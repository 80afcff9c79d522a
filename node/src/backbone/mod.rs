//! The backbone: how a room's frames travel between nodes.
//!
//! A node never delivers a room frame to its local members directly: it publishes once to
//! the backbone and delivers only what comes back from its subscription (the seed lesson's
//! "double delivery" mistake cannot happen). Implementations:
//! - [`redis::RedisBackbone`]: Redis pub/sub for live frames; a Lua script assigns each
//!   message its per-room `seq`, appends it to the room's log stream and publishes it, in
//!   one atomic step, so every node sees a room's messages in seq order;
//! - [`local::LocalBackbone`]: no backbone at all (`--backbone none`): sticky sessions
//!   alone, a room reaches only the members on the same node.
//!
//! - [`nats::NatsBackbone`]: NATS, with a JetStream stream per room for seq and log,
//!   republished to a plain subject per room; sessions in a KV bucket.
//!
//! Another backbone is a new module implementing [`Backbone`].

pub mod local;
pub mod nats;
pub mod redis;

use futures_util::future::BoxFuture;
use std::sync::Arc;

/// What a client's session keeps between connections: written on every change, so that a
/// node killed without warning loses nothing of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionRecord {
    pub name: Option<String>,
    pub rooms: Vec<String>,
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

/// One connection's presence entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PresenceEntry {
    pub id: String,
    pub user: String,
    pub server: String,
}

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

/// The operations a node needs from its backbone. Object-safe, so the node holds an
/// `Arc<dyn Backbone>` chosen by configuration.
pub trait Backbone: Send + Sync {
    /// For each of `prefixes` in order (one client's consecutive messages to `room`): assigns
    /// the next seq of `room`, completes the frame (prefix + seq + epoch), logs it and
    /// publishes it to every subscribed node, each message atomically.
    fn publish_messages<'a>(&'a self, room: &'a str, prefixes: Vec<String>) -> BoxFuture<'a, Result<(), Unpublished>>;

    /// Publishes a membership event (no seq, not logged) to every subscribed node.
    fn publish_event<'a>(&'a self, room: &'a str, json: String) -> BoxFuture<'a, Result<(), BackboneError>>;

    /// Makes sure this node receives `room`'s frames; returns once the subscription is live,
    /// so anything published afterwards reaches this node.
    fn subscribe<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<(), BackboneError>>;

    /// Drops the subscription to `room` if no local member is left (checked under the same
    /// lock as `subscribe`, so a concurrent join either keeps it or re-subscribes).
    fn release<'a>(&'a self, room: &'a str) -> BoxFuture<'a, ()>;

    /// The session stored for `id`, if any.
    fn load_session<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<SessionRecord>, BackboneError>>;

    /// Replaces the session of `id` and restarts its expiry.
    fn save_session<'a>(&'a self, id: &'a str, session: &'a SessionRecord) -> BoxFuture<'a, Result<(), BackboneError>>;

    /// Restarts the expiry of these sessions (their clients are connected).
    fn touch_sessions<'a>(&'a self, ids: &'a [Arc<str>]) -> BoxFuture<'a, Result<(), BackboneError>>;

    /// The logged frames of `room` with seq > `after`, with the room's epoch and head seq.
    fn replay<'a>(&'a self, room: &'a str, after: u64) -> BoxFuture<'a, Result<Replay, BackboneError>>;

    /// Registers connection `conn` in `scope`; publishes `event` (a `user_joined`) to the
    /// room if this is the id's first connection there. The event is completed with the room's
    /// position (`head_seq`, `epoch`) at that instant and returned, published or not.
    fn presence_add<'a>(
        &'a self,
        scope: Scope<'a>,
        conn: u64,
        entry: &'a PresenceEntry,
        event: Option<String>,
    ) -> BoxFuture<'a, Result<(PresenceChange, Option<String>), BackboneError>>;

    /// Updates the display name of an entry, nothing else.
    fn presence_rename<'a>(
        &'a self,
        scope: Scope<'a>,
        conn: u64,
        entry: &'a PresenceEntry,
    ) -> BoxFuture<'a, Result<(), BackboneError>>;

    /// Removes connection `conn` from `scope`; publishes `event` (a `user_left`) if it was the
    /// id's last connection there.
    fn presence_remove<'a>(
        &'a self,
        scope: Scope<'a>,
        conn: u64,
        id: &'a str,
        event: Option<String>,
    ) -> BoxFuture<'a, Result<PresenceChange, BackboneError>>;

    /// Every entry in `scope`, cluster-wide (one per connection; callers de-duplicate ids).
    fn presence_list<'a>(&'a self, scope: Scope<'a>) -> BoxFuture<'a, Result<Vec<PresenceEntry>, BackboneError>>;

    /// Whether the backbone is connected (drives `/readyz`).
    fn is_ready(&self) -> bool;
}
