//! The Redis backbone: pub/sub for live frames, a stream per room for its log, one Lua
//! script for the atomic publish step.
//!
//! Two connections per node:
//! - a `ConnectionManager` (multiplexed, reconnects on its own) for commands: the publish
//!   script and membership events;
//! - a dedicated pub/sub connection, owned by the *subscriber* task. redis-rs' `PubSub`
//!   never reconnects: its stream simply ends when Redis goes away (see `NOTES.md`). The
//!   subscriber treats that as an outage: `/readyz` turns 503, it reconnects with
//!   exponential backoff and jitter, and re-subscribes every room that still has local
//!   members. The subscriber only ever `try_send`s to clients (through [`Hub::deliver`]), so a
//!   slow client can never make Redis buffer output for this node.
//!
//! Key layout (braces literal: a Redis Cluster hash tag, so a room's keys share one slot):
//! channel `{prefix}room:{ROOM}`, log stream `{prefix}room:{ROOM}:log` with entry ids
//! `SEQ-0`, counter hash `{prefix}room:{ROOM}:meta` with fields `seq` and `epoch`; sessions
//! in hashes `{prefix}session:{ID}` with fields `name` and `rooms` (a JSON array).

use super::{Backbone, BackboneError, Published, Replay, SessionRecord};
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::StreamExt;
use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The atomic publish step.
///
/// KEYS: meta hash, log stream, channel. ARGV: frame prefix (ends in `"seq":`), a fresh
/// epoch to use if the room has none, history length, log TTL in ms.
///
/// A counter that starts again at 1 means Redis lost the room's state (restart without
/// persistence, eviction): the room gets a new epoch and its stale log, if any survived, is
/// dropped, so `(epoch, seq)` never repeats.
const PUBLISH_LUA: &str = r#"
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local epoch
if seq == 1 then
  epoch = ARGV[2]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('DEL', KEYS[2])
else
  epoch = redis.call('HGET', KEYS[1], 'epoch')
  if not epoch then
    epoch = ARGV[2]
    redis.call('HSET', KEYS[1], 'epoch', epoch)
  end
end
local frame = ARGV[1] .. seq .. ',"epoch":"' .. epoch .. '"}'
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], seq .. '-0', 'f', frame)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', KEYS[3], frame)
return {seq, epoch}
"#;

/// Subscription state, changed only under its async mutex so that subscribe, release and
/// the re-subscription after a reconnect never interleave.
struct Subs {
    /// The live connection's command half; `None` while disconnected.
    sink: Option<PubSubSink>,
    /// Rooms subscribed on the live connection.
    rooms: HashSet<String>,
}

pub struct RedisBackbone {
    cfg: Arc<Config>,
    hub: Arc<Hub>,
    metrics: Metrics,
    client: redis::Client,
    commands: ConnectionManager,
    publish: redis::Script,
    subs: tokio::sync::Mutex<Subs>,
    ready: AtomicBool,
    /// `{prefix}room:{` — what every channel of ours starts with.
    channel_head: String,
}

impl RedisBackbone {
    /// Creates the backbone and starts its subscriber task, which runs until `shutdown`.
    /// Does not wait for Redis: a node starts (unready) while Redis is down.
    pub fn start(
        cfg: Arc<Config>,
        hub: Arc<Hub>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, BackboneError> {
        let client = redis::Client::open(cfg.redis.as_str())?;
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.redis_timeout))
            .set_response_timeout(Some(cfg.redis_timeout))
            .set_min_delay(cfg.reconnect_min)
            .set_max_delay(cfg.reconnect_max);
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), manager_cfg)?;
        let backbone = Arc::new(Self {
            channel_head: format!("{}room:{{", cfg.prefix),
            cfg,
            hub,
            metrics,
            client,
            commands,
            publish: redis::Script::new(PUBLISH_LUA),
            subs: tokio::sync::Mutex::new(Subs {
                sink: None,
                rooms: HashSet::new(),
            }),
            ready: AtomicBool::new(false),
        });
        tokio::spawn(Arc::clone(&backbone).subscriber(shutdown));
        Ok(backbone)
    }

    fn channel(&self, room: &str) -> String {
        format!("{}{room}}}", self.channel_head)
    }

    fn session_key(&self, id: &str) -> String {
        format!("{}session:{{{id}}}", self.cfg.prefix)
    }

    fn room_of<'c>(&self, channel: &'c str) -> Option<&'c str> {
        channel
            .strip_prefix(self.channel_head.as_str())?
            .strip_suffix('}')
    }

    async fn with_timeout<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BackboneError> {
        match tokio::time::timeout(self.cfg.redis_timeout, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(BackboneError::Timeout(self.cfg.redis_timeout)),
        }
    }

    /// Connects, re-subscribes, reads until the connection ends, and starts again, until
    /// shutdown.
    async fn subscriber(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = self.cfg.reconnect_min;
        let mut first = true;
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.connect_subscriber() => r,
            };
            match connected {
                Ok(stream) => {
                    if !first {
                        self.metrics.backbone_reconnects.inc();
                    }
                    first = false;
                    backoff = self.cfg.reconnect_min;
                    self.ready.store(true, Ordering::Release);
                    self.metrics.backbone_ready.set(1);
                    info!(redis = %self.cfg.redis, "backbone subscriber connected");
                    let ended = tokio::select! {
                        _ = shutdown.cancelled() => true,
                        _ = self.read(stream) => false,
                    };
                    self.ready.store(false, Ordering::Release);
                    self.metrics.backbone_ready.set(0);
                    {
                        let mut subs = self.subs.lock().await;
                        subs.sink = None;
                        subs.rooms.clear();
                        self.metrics.rooms_subscribed.set(0);
                    }
                    if ended {
                        return;
                    }
                    warn!(redis = %self.cfg.redis, "backbone subscriber lost its connection; reconnecting");
                }
                Err(e) => {
                    debug!(error = %e, ?backoff, "backbone subscriber could not connect");
                    if first {
                        warn!(redis = %self.cfg.redis, error = %e, "backbone not reachable yet; retrying");
                        first = false;
                    }
                }
            }
            let jitter = rand::rng().random_range(0.5..1.0);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
            }
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
        }
    }

    /// Opens the pub/sub connection and subscribes every room with local members, under
    /// the subscription lock.
    async fn connect_subscriber(&self) -> Result<redis::aio::PubSubStream, BackboneError> {
        let pubsub = self.with_timeout(self.client.get_async_pubsub()).await?;
        let (mut sink, stream) = pubsub.split();
        let mut subs = self.subs.lock().await;
        let rooms: HashSet<String> = self.hub.rooms().into_iter().collect();
        if !rooms.is_empty() {
            let channels: Vec<String> = rooms.iter().map(|r| self.channel(r)).collect();
            self.with_timeout(sink.subscribe(channels)).await?;
        }
        self.metrics.rooms_subscribed.set(rooms.len() as i64);
        subs.rooms = rooms;
        subs.sink = Some(sink);
        Ok(stream)
    }

    /// Fans out every frame of the subscription until it ends.
    async fn read(&self, mut stream: redis::aio::PubSubStream) {
        while let Some(msg) = stream.next().await {
            self.metrics.frames_from_backbone.inc();
            let Some(room) = self.room_of(msg.get_channel_name()) else {
                debug!(
                    channel = msg.get_channel_name(),
                    "frame on a channel that is not ours"
                );
                continue;
            };
            let bytes = bytes::Bytes::copy_from_slice(msg.get_payload_bytes());
            match Utf8Bytes::try_from(bytes) {
                Ok(frame) => {
                    self.hub.deliver(room, &frame, &self.metrics);
                }
                Err(_) => warn!(room, "non-UTF-8 frame on a room channel; dropped"),
            }
        }
    }
}

impl Backbone for RedisBackbone {
    fn publish_message<'a>(
        &'a self,
        room: &'a str,
        prefix: String,
    ) -> BoxFuture<'a, Result<Published, BackboneError>> {
        async move {
            let base = format!("{}room:{{{room}}}", self.cfg.prefix);
            let epoch = tether_proto::id::mint_client_id();
            let mut con = self.commands.clone();
            let mut invocation = self.publish.prepare_invoke();
            invocation
                .key(format!("{base}:meta"))
                .key(format!("{base}:log"))
                .key(&base)
                .arg(prefix)
                .arg(epoch)
                .arg(self.cfg.history_len)
                .arg(self.cfg.log_ttl.as_millis() as u64);
            let (seq, epoch): (u64, String) =
                self.with_timeout(invocation.invoke_async(&mut con)).await?;
            self.metrics.messages_published.inc();
            Ok(Published { seq, epoch })
        }
        .boxed()
    }

    fn publish_event<'a>(
        &'a self,
        room: &'a str,
        json: String,
    ) -> BoxFuture<'a, Result<(), BackboneError>> {
        async move {
            let mut con = self.commands.clone();
            let channel = self.channel(room);
            let _receivers: i64 = self
                .with_timeout(
                    redis::cmd("PUBLISH")
                        .arg(channel)
                        .arg(json)
                        .query_async(&mut con),
                )
                .await?;
            Ok(())
        }
        .boxed()
    }

    fn subscribe<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<(), BackboneError>> {
        async move {
            let mut subs = self.subs.lock().await;
            if subs.rooms.contains(room) {
                return Ok(());
            }
            let channel = self.channel(room);
            let Some(sink) = subs.sink.as_mut() else {
                return Err(BackboneError::NotConnected);
            };
            self.with_timeout(sink.subscribe(channel)).await?;
            subs.rooms.insert(room.to_string());
            self.metrics.rooms_subscribed.set(subs.rooms.len() as i64);
            Ok(())
        }
        .boxed()
    }

    fn release<'a>(&'a self, room: &'a str) -> BoxFuture<'a, ()> {
        async move {
            let mut subs = self.subs.lock().await;
            if self.hub.has_members(room) || !subs.rooms.remove(room) {
                return;
            }
            self.metrics.rooms_subscribed.set(subs.rooms.len() as i64);
            let channel = self.channel(room);
            if let Some(sink) = subs.sink.as_mut() {
                // A failure here means the connection is going away; the reconnect
                // subscribes only rooms with members, so nothing leaks.
                if let Err(e) = self.with_timeout(sink.unsubscribe(channel)).await {
                    debug!(room, error = %e, "unsubscribe failed");
                }
            }
        }
        .boxed()
    }

    fn load_session<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, BackboneError>> {
        async move {
            let mut con = self.commands.clone();
            let (name, rooms): (Option<String>, Option<String>) = self
                .with_timeout(
                    redis::cmd("HMGET")
                        .arg(self.session_key(id))
                        .arg("name")
                        .arg("rooms")
                        .query_async(&mut con),
                )
                .await?;
            let Some(rooms) = rooms else {
                return Ok(None);
            };
            // A record we cannot read is treated as no record (and logged): the client then
            // starts a new session instead of failing to connect.
            let rooms: Vec<String> = match serde_json::from_str(&rooms) {
                Ok(r) => r,
                Err(e) => {
                    warn!(id, error = %e, "unreadable session record; starting a new session");
                    return Ok(None);
                }
            };
            Ok(Some(SessionRecord { name, rooms }))
        }
        .boxed()
    }

    fn save_session<'a>(
        &'a self,
        id: &'a str,
        session: &'a SessionRecord,
    ) -> BoxFuture<'a, Result<(), BackboneError>> {
        async move {
            let key = self.session_key(id);
            // Vec<String> always serialises.
            let rooms = serde_json::to_string(&session.rooms).expect("room names serialise");
            let mut pipe = redis::pipe();
            pipe.atomic()
                .del(&key)
                .ignore()
                .hset(&key, "rooms", rooms)
                .ignore();
            if let Some(name) = &session.name {
                pipe.hset(&key, "name", name).ignore();
            }
            pipe.pexpire(&key, self.cfg.session_ttl.as_millis() as i64)
                .ignore();
            let mut con = self.commands.clone();
            self.with_timeout(pipe.query_async::<()>(&mut con)).await
        }
        .boxed()
    }

    fn touch_sessions<'a>(
        &'a self,
        ids: &'a [Arc<str>],
    ) -> BoxFuture<'a, Result<(), BackboneError>> {
        async move {
            let ttl = self.cfg.session_ttl.as_millis() as i64;
            for chunk in ids.chunks(1000) {
                let mut pipe = redis::pipe();
                for id in chunk {
                    pipe.pexpire(self.session_key(id), ttl).ignore();
                }
                let mut con = self.commands.clone();
                self.with_timeout(pipe.query_async::<()>(&mut con)).await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn replay<'a>(
        &'a self,
        room: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<Replay, BackboneError>> {
        async move {
            let base = format!("{}room:{{{room}}}", self.cfg.prefix);
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("HMGET")
                .arg(format!("{base}:meta"))
                .arg("seq")
                .arg("epoch")
                .xrange(
                    format!("{base}:log"),
                    format!("{}-0", after.saturating_add(1)),
                    "+",
                );
            let mut con = self.commands.clone();
            let ((seq, epoch), range): (
                (Option<u64>, Option<String>),
                redis::streams::StreamRangeReply,
            ) = self.with_timeout(pipe.query_async(&mut con)).await?;
            let mut frames = Vec::with_capacity(range.ids.len());
            for entry in range.ids {
                let seq = entry
                    .id
                    .split('-')
                    .next()
                    .and_then(|s| s.parse::<u64>().ok());
                match (seq, entry.get::<String>("f")) {
                    (Some(seq), Some(frame)) => frames.push((seq, frame)),
                    _ => warn!(room, id = %entry.id, "malformed log entry skipped"),
                }
            }
            Ok(Replay {
                epoch,
                head_seq: seq.unwrap_or(0),
                frames,
            })
        }
        .boxed()
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}
