//! The NATS backbone (`--backbone nats`): a JetStream stream per room assigns seqs and keeps
//! the log; the stream *republishes* every stored message to a plain subject that nodes
//! subscribe to; sessions live in a stream keeping the last message per client.
//!
//! Names (`P` = the configured prefix with anything but letters, digits, `-` and `_`
//! replaced by `_`, `tether` by default; `T` = the room name in unpadded base64url, so any
//! room name is a single valid token):
//! - stream `P_room_T` over subject `P.room.T`, memory storage, at most `history_len`
//!   messages, `log_ttl` old; republishing to `P.live.T`;
//! - membership events (no seq) are published straight to `P.live.T`;
//! - stream `P_sessions` over `P.session.*` (memory, last message per subject kept,
//!   `session_ttl`): one subject per client id in base64url, holding its session as JSON.
//!
//! Why one stream per room: a stream's sequence is the only counter JetStream assigns
//! atomically with the store, and the protocol needs per-room seqs with no holes (clients
//! spot gaps by them). A republished message carries its stream sequence in the
//! `Nats-Sequence` header and is sent in stream order, so every node sees a room in seq order
//! — the same guarantee as the Redis backbone's one Lua step. The payload is the frame up to
//! `"seq":`; the subscriber completes it with the seq and the room's epoch, the stream's
//! creation time (a stream lost and re-created, say by a NATS restart with memory storage,
//! restarts at seq 1 under a new epoch).
//!
//! Core NATS delivery is at most once: a message republished while this node was
//! disconnected never reaches it. Each room's reader therefore fills holes from the stream:
//! a seq beyond the last one it saw makes it fetch the missing ones first, and after a
//! reconnect it compares with the stream's head. So members get every logged message in
//! order even across a NATS outage.
//!
//! `nats` may list several servers of one NATS cluster (`nats://a:4222,nats://b:4222,…`): the
//! client connects to one, and when it is lost reconnects to another (the list, and the
//! servers the cluster announces). Every stream is created with `nats_replicas` copies
//! (`nats/streams.rs`), so a room's log, sessions and presence outlive one server's loss;
//! the readers' hole filling covers what was republished during the reconnect, and a stream
//! whose leader moved is checked against its log (`nats/reader.rs`, `nats/control.rs`).
//!
//! Presence is cluster-wide, as under Redis: compare-and-set records in a stream, heartbeats
//! and a reaper announcing a dead node's members once (`nats/presence.rs`), run by
//! [`super::keeper`]. Frames are handed to the node through [`Inbound`]; holes are filled
//! with the helpers of [`super::catch_up`] (by `nats/reader.rs`).

mod control;
mod presence;
mod reader;
mod registry;
mod streams;

use super::inbound::Inbound;
use super::keeper::Backoff;
use super::{
    Backbone, BackboneError, Call, Joined, PresenceChange, PresenceEntry, Published, Reaped, Replay, Scope, Seat,
    SessionRecord, Unpublished,
};
use crate::config::Config;
use crate::metrics::Metrics;
use async_nats::jetstream::{self, stream};
use base64::Engine;
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt};
use std::collections::HashMap;
use std::sync::Arc;
use streams::REPLAY_CONCURRENCY;
use tether_proto::backbone::{nats_prefix, nats_token as token, NodeRecord};
use tether_proto::wire::complete_joined;
use tokio::sync::{watch, Mutex, Notify, OnceCell};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The header a republished message carries its stream sequence in.
const SEQ_HEADER: &str = "Nats-Sequence";

/// A room's stream as last seen: its epoch (creation time) and head.
#[derive(Debug, Clone)]
struct StreamState {
    epoch: Arc<str>,
    head: u64,
    first: u64,
}

pub struct NatsBackbone {
    cfg: Arc<Config>,
    inbound: Arc<dyn Inbound>,
    metrics: Metrics,
    client: async_nats::Client,
    js: jetstream::Context,
    /// `P` of the module docs.
    prefix: String,
    /// Epochs of the rooms whose streams this node has made sure of.
    epochs: DashMap<String, Arc<str>>,
    /// Room → its reader task, changed only under this lock (subscribe/release never interleave).
    readers: Mutex<HashMap<String, Reader>>,
    /// The sessions stream, once made sure of.
    sessions: OnceCell<stream::Stream>,
    /// Whether the registry stream has been made sure of (created, or scaled to
    /// `nats_replicas`) since this process started.
    registry_checked: std::sync::atomic::AtomicBool,
    /// The presence stream, once made sure of (see `presence.rs`).
    presence_stream: OnceCell<stream::Stream>,
    /// This process' presence instance: `NAME#RANDOM`, new at every start.
    instance: String,
    /// Bumped at every (re)connection to NATS; readers then check their rooms for holes.
    connected: watch::Receiver<u64>,
    shutdown: CancellationToken,
    /// This backbone itself, for the reader tasks `subscribe` spawns.
    me: std::sync::Weak<Self>,
}

#[derive(Clone)]
struct Reader {
    stop: CancellationToken,
    /// Told when the room's stream gets a new leader (see `control.rs`).
    recheck: Arc<Notify>,
}

/// The JetStream stream holding `room`'s log for a node whose `prefix` (the config key) is
/// `prefix`: for tools and tests that look at the streams themselves.
pub fn room_stream(prefix: &str, room: &str) -> String {
    room_stream_name(&nats_prefix(prefix), room)
}

/// The stream of `room` under the NATS prefix `prefix` (see [`nats_prefix`]).
fn room_stream_name(prefix: &str, room: &str) -> String {
    format!("{prefix}_room_{}", token(room))
}

/// The room whose stream is called `name`, if it is one of ours under `prefix`.
fn room_of_stream(prefix: &str, name: &str) -> Option<String> {
    let t = name.strip_prefix(prefix)?.strip_prefix("_room_")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t).ok()?;
    String::from_utf8(bytes).ok()
}

fn no_such_stream(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

fn nats_err(e: impl std::fmt::Display) -> BackboneError {
    BackboneError::Nats(e.to_string())
}

impl NatsBackbone {
    /// Connects (in the background: the node starts unready while NATS is away) as node
    /// instance `instance`, and returns.
    pub async fn start(
        cfg: Arc<Config>,
        inbound: Arc<dyn Inbound>,
        metrics: Metrics,
        instance: String,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, BackboneError> {
        let (tx, connected) = watch::channel(0u64);
        let events_metrics = metrics.clone();
        let url = cfg.nats.clone();
        let options = async_nats::ConnectOptions::new()
            .name(format!("tether-node {}", cfg.name))
            .retry_on_initial_connect()
            .connection_timeout(cfg.redis_timeout)
            .request_timeout(Some(cfg.redis_timeout))
            .reconnect_delay_callback({
                let (min, max) = (cfg.reconnect_min, cfg.reconnect_max);
                move |attempts| Backoff::nth(min, max, attempts)
            })
            .event_callback(move |event| {
                let tx = tx.clone();
                let metrics = events_metrics.clone();
                let url = url.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tx.send_modify(|g| *g += 1);
                            if *tx.borrow() > 1 {
                                metrics.backbone_reconnects.inc();
                            }
                            metrics.backbone_ready.set(1);
                            info!(nats = %url, "backbone connected");
                        }
                        async_nats::Event::Disconnected => {
                            metrics.backbone_ready.set(0);
                            warn!(nats = %url, "backbone lost its connection; reconnecting");
                        }
                        other => debug!(event = %other, "nats event"),
                    }
                }
            });
        let client = options.connect(crate::config::nats_servers(&cfg.nats)).await.map_err(nats_err)?;
        let js = jetstream::new(client.clone());
        let control_inbound = Arc::clone(&inbound);
        let backbone = Arc::new_cyclic(|me| Self {
            prefix: nats_prefix(&cfg.prefix),
            cfg,
            inbound,
            metrics,
            client,
            js,
            epochs: DashMap::new(),
            readers: Mutex::new(HashMap::new()),
            sessions: OnceCell::new(),
            registry_checked: std::sync::atomic::AtomicBool::new(false),
            presence_stream: OnceCell::new(),
            instance,
            connected,
            shutdown,
            me: me.clone(),
        });
        backbone.spawn_control_reader(control_inbound, backbone.shutdown.clone());
        backbone.spawn_leader_watch();
        // After a reconnect the streams may be new ones (NATS lost them): forget cached epochs.
        let weak = Arc::downgrade(&backbone);
        let mut changes = backbone.connected.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                match weak.upgrade() {
                    Some(b) => b.epochs.clear(),
                    None => break,
                }
            }
        });
        Ok(backbone)
    }

    fn stream_name(&self, room: &str) -> String {
        room_stream_name(&self.prefix, room)
    }

    fn log_subject(&self, room: &str) -> String {
        format!("{}.room.{}", self.prefix, token(room))
    }

    fn live_subject(&self, room: &str) -> String {
        format!("{}.live.{}", self.prefix, token(room))
    }

    async fn timed<T, E: std::fmt::Display>(
        &self,
        fut: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, BackboneError> {
        match tokio::time::timeout(self.cfg.redis_timeout, fut).await {
            Ok(r) => r.map_err(nats_err),
            Err(_) => Err(BackboneError::Timeout(self.cfg.redis_timeout)),
        }
    }

    /// A direct get (bypassing the JetStream API queue) within the command timeout;
    /// `None` when there is no such message.
    async fn direct<T>(
        &self,
        get: impl std::future::Future<Output = Result<T, stream::DirectGetError>>,
    ) -> Result<Option<T>, BackboneError> {
        match tokio::time::timeout(self.cfg.redis_timeout, get).await {
            Err(_) => Err(BackboneError::Timeout(self.cfg.redis_timeout)),
            Ok(Ok(m)) => Ok(Some(m)),
            Ok(Err(e)) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Ok(Err(e)) => Err(nats_err(e)),
        }
    }

    /// Publishes into a stream and waits for its acknowledgement, within the command timeout.
    /// Never while disconnected: the client would queue the message and send it after the
    /// reconnect, long after its sender was told it failed. The outer error is ours (not
    /// connected, timeout); the inner one the server's answer, which some callers act on.
    async fn publish_acked(
        &self,
        subject: String,
        headers: Option<async_nats::HeaderMap>,
        payload: Bytes,
    ) -> Result<Result<jetstream::publish::PublishAck, jetstream::context::PublishError>, BackboneError> {
        self.ensure_connected().await?;
        let sent = match headers {
            Some(h) => self.timed(self.js.publish_with_headers(subject, h, payload)).await?,
            None => self.timed(self.js.publish(subject, payload)).await?,
        };
        match tokio::time::timeout(self.cfg.redis_timeout, std::future::IntoFuture::into_future(sent)).await {
            Err(_) => Err(BackboneError::Timeout(self.cfg.redis_timeout)),
            Ok(answer) => Ok(answer),
        }
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Waits (up to the command timeout, as a Redis command would through a reconnect) for
    /// the connection to NATS.
    async fn ensure_connected(&self) -> Result<(), BackboneError> {
        if self.is_connected() {
            return Ok(());
        }
        let mut changes = self.connected.clone();
        let wait = async {
            while !self.is_connected() {
                if changes.changed().await.is_err() {
                    break;
                }
            }
        };
        match tokio::time::timeout(self.cfg.redis_timeout, wait).await {
            Ok(()) if self.is_connected() => Ok(()),
            _ => Err(BackboneError::NotConnected),
        }
    }

    /// The room's stream state, or `None` if it has no stream (nothing was ever said there).
    async fn stream_state(&self, room: &str) -> Result<Option<StreamState>, BackboneError> {
        self.ensure_connected().await?;
        match tokio::time::timeout(self.cfg.redis_timeout, self.js.get_stream(self.stream_name(room))).await {
            Err(_) => Err(BackboneError::Timeout(self.cfg.redis_timeout)),
            Ok(Ok(stream)) => Ok(Some(Self::state_of(stream.cached_info()))),
            Ok(Err(e)) if no_such_stream(&e) => Ok(None),
            Ok(Err(e)) => Err(nats_err(e)),
        }
    }

    /// The room's last seq and epoch, `None` without a stream. Cheap when the epoch is known
    /// (the joiner's node is subscribed, so it is): one direct get of the log's last message,
    /// which bypasses the JetStream API queue that stream lookups wait in.
    async fn head(&self, room: &str) -> Result<Option<(u64, Arc<str>)>, BackboneError> {
        let cached = self.epochs.get(room).map(|e| Arc::clone(e.value()));
        if let Some(epoch) = cached {
            let stream = self.timed(self.js.get_stream_no_info(self.stream_name(room))).await?;
            // Nothing logged (or all of it aged out): ask the stream itself, below.
            if let Some(m) = self.direct(stream.direct_get_last_for_subject(self.log_subject(room))).await? {
                return Ok(Some((m.sequence, epoch)));
            }
        }
        Ok(self.stream_state(room).await?.map(|s| (s.head, s.epoch)))
    }

    async fn epoch(&self, room: &str) -> Result<Arc<str>, BackboneError> {
        if let Some(e) = self.epochs.get(room) {
            return Ok(Arc::clone(e.value()));
        }
        Ok(self.ensure_stream(room).await?.epoch)
    }

    /// Logs and publishes one message in `room`'s stream. With `key`, JetStream's own
    /// deduplication (`Nats-Msg-Id`, within the stream's duplicate window) keeps a repeat out
    /// of the log, and its acknowledgement names the first one's seq.
    async fn publish_message(&self, room: &str, prefix: String, key: Option<&str>) -> Result<Published, BackboneError> {
        // Makes sure the room's stream exists: a room's first message creates it.
        let mut epoch = self.epoch(room).await?;
        let payload = Bytes::from(prefix);
        let headers = key.map(|key| {
            let mut h = async_nats::HeaderMap::new();
            h.insert(async_nats::header::NATS_MESSAGE_ID, key);
            h
        });
        let ack = match self.publish_logged(room, headers.clone(), payload.clone()).await {
            // No stream captured the subject, so nothing was stored: the stream was lost
            // (NATS restarted without it). Make sure of it and try once more.
            Err(PublishFailure::NoStream) => {
                self.epochs.remove(room);
                epoch = self.ensure_stream(room).await?.epoch;
                self.publish_logged(room, headers, payload).await
            }
            other => other,
        }
        .map_err(|e| match e {
            PublishFailure::NoStream => BackboneError::Nats(format!("no stream for room {room:?}")),
            PublishFailure::Other(e) => e,
        })?;
        if !ack.duplicate {
            self.metrics.messages_published.inc();
        }
        Ok(Published { seq: ack.sequence, epoch: epoch.to_string(), duplicate: ack.duplicate })
    }

    /// Publishes to the room's log subject and waits for the stream's acknowledgement (the
    /// seq it assigned, and whether it was a duplicate).
    async fn publish_logged(
        &self,
        room: &str,
        headers: Option<async_nats::HeaderMap>,
        payload: Bytes,
    ) -> Result<jetstream::publish::PublishAck, PublishFailure> {
        match self.publish_acked(self.log_subject(room), headers, payload).await.map_err(PublishFailure::Other)? {
            Ok(ack) => Ok(ack),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => Err(PublishFailure::NoStream),
            Err(e) => Err(PublishFailure::Other(nats_err(e))),
        }
    }

    /// Publishes a membership event (no seq, not logged) to every node subscribed to `room`.
    async fn publish_live(&self, room: &str, json: String) -> Result<(), BackboneError> {
        self.ensure_connected().await?;
        self.timed(self.client.publish(self.live_subject(room), Bytes::from(json))).await
    }

    fn session_subject(&self, id: &str) -> String {
        format!("{}.session.{}", self.prefix, token(id))
    }

    /// The stored session of `subject`, raw.
    async fn session_bytes(&self, subject: String) -> Result<Option<Bytes>, BackboneError> {
        let store = self.sessions().await?;
        Ok(self.direct(store.direct_get_last_for_subject(subject)).await?.map(|m| m.payload))
    }

    async fn put_session(&self, subject: String, value: Bytes) -> Result<(), BackboneError> {
        self.sessions().await?;
        self.publish_acked(subject, None, value).await?.map_err(nats_err)?;
        Ok(())
    }

    async fn touch_one(&self, subject: String) -> Result<(), BackboneError> {
        if let Some(value) = self.session_bytes(subject.clone()).await? {
            self.put_session(subject, value).await?;
        }
        Ok(())
    }
}

/// Each room's `(epoch, last seq)` as a NATS backbone with key prefix `prefix` keeps it
/// (`(None, 0)` for a room without a stream): for tools that check what clients were owed,
/// such as `tether chaos`.
pub async fn room_heads(
    url: &str,
    prefix: &str,
    rooms: &[String],
) -> Result<HashMap<String, (Option<String>, u64)>, BackboneError> {
    let client = async_nats::connect(crate::config::nats_servers(url)).await.map_err(nats_err)?;
    let js = jetstream::new(client);
    let prefix = nats_prefix(prefix);
    let mut heads = HashMap::with_capacity(rooms.len());
    for room in rooms {
        let head = match js.get_stream(room_stream_name(&prefix, room)).await {
            Ok(stream) => {
                let state = NatsBackbone::state_of(stream.cached_info());
                (Some(state.epoch.to_string()), state.head)
            }
            Err(e) if no_such_stream(&e) => (None, 0),
            Err(e) => return Err(nats_err(e)),
        };
        heads.insert(room.clone(), head);
    }
    Ok(heads)
}

/// Why a logged publish failed: `NoStream` means nothing was stored (safe to retry).
enum PublishFailure {
    NoStream,
    Other(BackboneError),
}

impl Backbone for NatsBackbone {
    /// One message at a time: each is one stream publish awaiting its ack.
    fn publish_messages<'a>(&'a self, room: &'a str, prefixes: Vec<String>) -> BoxFuture<'a, Result<(), Unpublished>> {
        async move {
            for (published, prefix) in prefixes.into_iter().enumerate() {
                self.publish_message(room, prefix, None).await.map_err(|error| Unpublished { published, error })?;
            }
            Ok(())
        }
        .boxed()
    }

    fn publish_one<'a>(&'a self, room: &'a str, prefix: String, key: Option<&'a str>) -> Call<'a, Published> {
        self.publish_message(room, prefix, key).boxed()
    }

    fn publish_event<'a>(&'a self, room: &'a str, json: String) -> Call<'a, ()> {
        self.publish_live(room, json).boxed()
    }

    fn subscribe<'a>(&'a self, room: &'a str) -> Call<'a, ()> {
        async move {
            let mut readers = self.readers.lock().await;
            if readers.contains_key(room) {
                return Ok(());
            }
            self.ensure_connected().await?;
            let sub = self.timed(self.client.subscribe(self.live_subject(room))).await?;
            // Once the server has our SUB, everything republished afterwards reaches us.
            self.timed(self.client.flush()).await?;
            let state = self.ensure_stream(room).await?;
            let reader = Reader { stop: CancellationToken::new(), recheck: Arc::new(Notify::new()) };
            let me = self.me.upgrade().ok_or(BackboneError::NotConnected)?;
            tokio::spawn(me.read_room(room.to_string(), sub, state, reader.clone()));
            readers.insert(room.to_string(), reader);
            self.metrics.rooms_subscribed.set(readers.len() as i64);
            Ok(())
        }
        .boxed()
    }

    fn release<'a>(&'a self, room: &'a str) -> BoxFuture<'a, ()> {
        async move {
            let mut readers = self.readers.lock().await;
            if self.inbound.wants(room) {
                return;
            }
            if let Some(reader) = readers.remove(room) {
                // Dropping the subscriber (when the task ends) unsubscribes.
                reader.stop.cancel();
            }
            self.metrics.rooms_subscribed.set(readers.len() as i64);
        }
        .boxed()
    }

    fn load_session<'a>(&'a self, id: &'a str) -> Call<'a, Option<SessionRecord>> {
        async move {
            let Some(bytes) = self.session_bytes(self.session_subject(id)).await? else {
                return Ok(None);
            };
            match serde_json::from_slice::<SessionRecord>(&bytes) {
                Ok(s) => Ok(Some(s)),
                Err(e) => {
                    warn!(id, error = %e, "unreadable session record; starting a new session");
                    Ok(None)
                }
            }
        }
        .boxed()
    }

    fn save_session<'a>(&'a self, id: &'a str, session: &'a SessionRecord) -> Call<'a, ()> {
        async move {
            let json = serde_json::to_vec(session).expect("sessions serialise");
            self.put_session(self.session_subject(id), Bytes::from(json)).await
        }
        .boxed()
    }

    /// Messages age from their last write, so touching is reading and writing back.
    fn touch_sessions<'a>(&'a self, ids: &'a [Arc<str>]) -> Call<'a, ()> {
        async move {
            for chunk in ids.chunks(REPLAY_CONCURRENCY) {
                let touches = chunk.iter().map(|id| self.touch_one(self.session_subject(id)));
                futures_util::future::join_all(touches).await.into_iter().collect::<Result<Vec<()>, _>>()?;
            }
            Ok(())
        }
        .boxed()
    }

    fn forget_session<'a>(&'a self, id: &'a str) -> Call<'a, ()> {
        self.purge_session(id).boxed()
    }

    fn control(&self, command: String) -> Call<'_, ()> {
        self.publish_control(command).boxed()
    }

    fn replay<'a>(&'a self, room: &'a str, after: u64) -> Call<'a, Replay> {
        async move {
            let Some(state) = self.stream_state(room).await? else {
                return Ok(Replay::default());
            };
            let from = after.saturating_add(1).max(state.first);
            let frames = self.fetch(room, from, state.head, &state.epoch).await?;
            Ok(Replay { epoch: Some(state.epoch.to_string()), head_seq: state.head, frames })
        }
        .boxed()
    }

    fn presence_add<'a>(&'a self, at: Seat<'a>, entry: &'a PresenceEntry, event: Option<String>) -> Call<'a, Joined> {
        let Seat { scope, conn } = at;
        async move {
            let event = match (event, scope) {
                (Some(e), Scope::Room(room)) => Some(match self.head(room).await? {
                    Some((head, epoch)) => complete_joined(&e, head, Some(&epoch)),
                    None => complete_joined(&e, 0, None),
                }),
                (e, _) => e,
            };
            let change = self.record_add(scope, conn, entry).await?;
            if let (PresenceChange::FirstOrLast, Some(event), Scope::Room(room)) = (change, &event, scope) {
                self.publish_live(room, event.clone()).await?;
            }
            Ok((change, event))
        }
        .boxed()
    }

    fn presence_rename<'a>(&'a self, at: Seat<'a>, entry: &'a PresenceEntry) -> Call<'a, ()> {
        let Seat { scope, conn } = at;
        self.record_rename(scope, conn, entry).boxed()
    }

    fn presence_remove<'a>(&'a self, at: Seat<'a>, id: &'a str, event: Option<String>) -> Call<'a, PresenceChange> {
        let Seat { scope, conn } = at;
        async move {
            let change = self.record_remove(scope, conn, id).await?;
            if let (PresenceChange::FirstOrLast, Some(event), Scope::Room(room)) = (change, event, scope) {
                self.publish_live(room, event).await?;
            }
            Ok(change)
        }
        .boxed()
    }

    fn presence_list<'a>(&'a self, scope: Scope<'a>) -> Call<'a, Vec<PresenceEntry>> {
        self.record_list(scope).boxed()
    }

    fn is_ready(&self) -> bool {
        self.is_connected()
    }

    fn heartbeat(&self) -> Call<'_, bool> {
        self.beat().boxed()
    }

    fn reap(&self) -> Call<'_, Reaped> {
        async move {
            let (instances, announced) = self.reap_dead().await?;
            Ok(Reaped { instances, announced })
        }
        .boxed()
    }

    fn announce<'a>(&'a self, record: &'a NodeRecord) -> Call<'a, ()> {
        self.announce_record(record).boxed()
    }

    fn withdraw<'a>(&'a self, record: &'a NodeRecord) -> Call<'a, ()> {
        self.withdraw_record(record).boxed()
    }

    fn deregister(&self) -> BoxFuture<'_, ()> {
        self.drop_heartbeat().boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_room_name_is_one_valid_token() {
        for room in ["general", "a.b", "x>*", "ünï", "a/b\\c"] {
            let t = token(room);
            assert!(t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{room} → {t}");
        }
        assert_ne!(token("a.b"), token("a_b"));
        for room in ["general", "a_room_b", "ünï", ""] {
            assert_eq!(room_of_stream("app", &room_stream_name("app", room)).as_deref(), Some(room));
        }
        assert_eq!(room_of_stream("app", "app_sessions"), None);
        assert_eq!(room_of_stream("app", "other_room_Z2VuZXJhbA"), None);
    }
}
