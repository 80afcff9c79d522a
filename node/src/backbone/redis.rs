//! The Redis backbone: pub/sub for live frames, a stream per room for its log, one Lua
//! script for the atomic publish step.
//!
//! Two connections per node:
//! - a `ConnectionManager` (multiplexed) for commands: the publish script and membership
//!   events. It reconnects on the next command after a failure, without a retry loop of its
//!   own; while it is not proven working, a keeper task probes it with our backoff;
//! - a dedicated pub/sub connection, owned by the *subscriber* task. redis-rs' `PubSub`
//!   never reconnects: its stream simply ends when Redis goes away. The
//!   subscriber treats that as an outage: `/readyz` turns 503, it reconnects with
//!   exponential backoff and jitter (capped low: see `reconnect_max_ms`), re-subscribes every
//!   room that still has local members in one `SUBSCRIBE`, and catches them up (through
//!   [`Inbound::catch_up`]). The subscriber only ever `try_send`s to clients (through
//!   [`Inbound::deliver`]), so a slow client can never make Redis buffer output for this node.
//!
//! Readiness (`/readyz`) is derived from both: subscribed and caught up, and the command
//! connection's last command succeeded; each half changes where its state does.
//!
//! Key layout ([`RedisKeys`]; braces literal: a Redis Cluster hash tag, so a room's keys
//! share one slot):
//! channel `{prefix}room:{ROOM}`, log stream `{prefix}room:{ROOM}:log` with entry ids
//! `SEQ-0`, counter hash `{prefix}room:{ROOM}:meta` with fields `seq` and `epoch`; sessions
//! in hashes `{prefix}session:{ID}` with fields `name` and `rooms` (a JSON array).
//!
//! Presence: each node *instance* (a fresh id at every start, so a node restarted under the
//! same name is still a new instance) registers one entry per connection and room in
//! `{prefix}presence:{ROOM}` (field `INSTANCE/CONN`, value `{"id","user","server"}`), counts
//! connections per client id in `{prefix}presence:{ROOM}:ids` (two tabs are one presence),
//! lists what it registered in `{prefix}instance:{INSTANCE}`, and heartbeats into the sorted
//! set `{prefix}instances` (score: Redis' own clock). Every node runs the reaper (scheduled by
//! [`super::keeper`]): an instance
//! silent for `presence_ttl` is removed — in one script, so by exactly one node — with each
//! of its members whose id has no connection left announced once as `user_left`/`node_down`.
//! The cluster-wide `online` list works the same way under `{prefix}online`. The reaper's
//! keys are computed inside its script, so it needs a single Redis (not a Redis Cluster).

pub(crate) mod calls;
mod hooks;
mod publish;
pub(crate) mod readiness;
pub mod registry;
pub(crate) mod scripts;
mod sessions;

use super::inbound::Inbound;
use super::keeper::Backoff;
use super::{
    Backbone, BackboneError, Call, Joined, PresenceChange, PresenceEntry, Published, Reaped, Replay, Scope, Seat,
    SessionRecord, Unpublished,
};
use crate::config::Config;
use crate::metrics::Metrics;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::StreamExt;
use hooks::RedisHooks;
use readiness::{Health, Readiness};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use scripts::{CLAIM_LUA, HEARTBEAT_LUA, PRESENCE_ADD_LUA, PRESENCE_REMOVE_LUA, PUBLISH_LUA, REAP_LUA};
use std::collections::HashSet;
use std::sync::Arc;
use tether_proto::backbone::{conn_field, instance_member, NodeRecord, RedisKeys};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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
    inbound: Arc<dyn Inbound>,
    metrics: Metrics,
    keys: RedisKeys,
    client: redis::Client,
    commands: ConnectionManager,
    publish: redis::Script,
    presence_add: redis::Script,
    presence_remove: redis::Script,
    heartbeat: redis::Script,
    reap: redis::Script,
    claim: redis::Script,
    /// Webhooks, when on: the presence scripts decide events and return them here.
    hooks: Option<RedisHooks>,
    /// This process' presence instance: `NAME#RANDOM`, new at every start.
    instance: String,
    subs: tokio::sync::Mutex<Subs>,
    /// True while the subscriber is connected: set after `Subs::sink` is, cleared before it
    /// is, so a waiter woken by `true` finds the sink. (Joins wait on this, not on readiness.)
    connected: watch::Sender<bool>,
    /// What `/readyz` says, derived from the two connections' actual state.
    readiness: Readiness,
    /// `{prefix}room:{` — what every channel of ours starts with.
    channel_head: String,
}

impl RedisBackbone {
    pub fn start(
        cfg: Arc<Config>,
        inbound: Arc<dyn Inbound>,
        metrics: Metrics,
        instance: String,
        hooks: Option<Arc<crate::webhooks::Webhooks>>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, BackboneError> {
        let client = redis::Client::open(cfg.redis.as_str())?;
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.redis_timeout))
            .set_response_timeout(Some(cfg.redis_timeout))
            // No retry loop of its own: a failed reconnect fails the commands waiting on it,
            // and the next command (or the keeper's probe, on our backoff) starts a fresh
            // attempt at once. Its own backoff (up to 6 attempts, sleeps growing to
            // `reconnect_max` plus up to 100% jitter) kept commands failing for seconds
            // after Redis was back, while nothing outside it could tell.
            .set_number_of_retries(0);
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), manager_cfg)?;
        let keys = RedisKeys::new(&cfg.prefix);
        let readiness = Readiness::new(metrics.clone(), cfg.redis.clone(), cfg.redis_timeout);
        let backbone = Arc::new(Self {
            readiness,
            hooks: hooks.map(|sink| RedisHooks::new(sink, &keys)),
            claim: redis::Script::new(CLAIM_LUA),
            channel_head: keys.channel_head(),
            keys,
            cfg,
            inbound,
            metrics,
            client,
            commands,
            publish: redis::Script::new(PUBLISH_LUA),
            presence_add: redis::Script::new(PRESENCE_ADD_LUA),
            presence_remove: redis::Script::new(PRESENCE_REMOVE_LUA),
            heartbeat: redis::Script::new(HEARTBEAT_LUA),
            reap: redis::Script::new(REAP_LUA),
            instance,
            subs: tokio::sync::Mutex::new(Subs { sink: None, rooms: HashSet::new() }),
            connected: watch::Sender::new(false),
        });
        tokio::spawn(Arc::clone(&backbone).subscriber(shutdown.clone()));
        tokio::spawn(Arc::clone(&backbone).command_keeper(shutdown));
        Ok(backbone)
    }

    fn instance_set_key(&self) -> String {
        self.keys.instance_set(&self.instance)
    }

    /// (entries hash, ids hash, channel, instance-set member) of one entry.
    fn presence_keys(&self, scope: Scope<'_>, conn: u64) -> (String, String, String, String) {
        let room = match scope {
            Scope::Room(room) => Some(room),
            Scope::Online => None,
        };
        let entries = self.keys.presence(room);
        let channel = room.map(|r| self.keys.channel(r)).unwrap_or_default();
        (RedisKeys::presence_ids(&entries), entries, channel, instance_member(conn, room))
    }

    fn room_of<'c>(&self, channel: &'c str) -> Option<&'c str> {
        channel.strip_prefix(self.channel_head.as_str())?.strip_suffix('}')
    }

    async fn with_timeout<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BackboneError> {
        self.readiness.with_timeout(fut).await
    }

    /// A command on the command connection, through [`Readiness::command`].
    async fn command<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BackboneError> {
        self.readiness.command(fut).await
    }

    fn set_health(&self, change: impl FnOnce(&mut Health)) {
        self.readiness.set(change)
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max)
    }

    /// Whenever the command connection is not known to work, probes it — a `PUBLISH` to
    /// this instance's probe channel, the command publishing depends on — with the
    /// reconnect backoff until it answers; until shutdown.
    async fn command_keeper(self: Arc<Self>, shutdown: CancellationToken) {
        let probe = || async { self.probe_commands().await.map(drop) };
        self.readiness.keep_commands(probe, || self.backoff(), shutdown).await
    }

    async fn probe_commands(&self) -> Result<i64, BackboneError> {
        let mut con = self.commands.clone();
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.probe_channel()).arg("probe");
        self.command(cmd.query_async::<i64>(&mut con)).await
    }

    /// Connects, re-subscribes, catches up, reads until the connection ends, and starts
    /// again, until shutdown. While Redis is away it retries after `reconnect_min_ms`,
    /// doubling up to `reconnect_max_ms` (with jitter).
    async fn subscriber(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = self.backoff();
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
                    self.connected.send_replace(true);
                    info!(redis = %self.cfg.redis, "backbone subscriber connected");
                    // Redis answers again: the keeper need not wait out its backoff.
                    self.readiness.probe_now.notify_one();
                    let caught_up = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        r = self.catch_up_when_commands_answer() => r,
                    };
                    let ended = match caught_up {
                        Ok(()) => {
                            backoff.reset();
                            self.set_health(|h| h.subscribed = true);
                            tokio::select! {
                                _ = shutdown.cancelled() => true,
                                _ = self.read(stream) => false,
                            }
                        }
                        Err(e) => {
                            // Never ready without the catch-up: try it all again.
                            warn!(error = %e, "catch-up from the room logs failed; reconnecting");
                            false
                        }
                    };
                    self.set_health(|h| h.subscribed = false);
                    self.connected.send_replace(false);
                    {
                        let mut subs = self.subs.lock().await;
                        subs.sink = None;
                        subs.rooms.clear();
                        self.metrics.rooms_subscribed.set(0);
                    }
                    if ended {
                        return;
                    }
                    // Whatever cut the subscription may have cut the command connection too,
                    // which redis-rs notices only at its next command: it must prove itself
                    // again (the keeper probes it now) before the node says ready.
                    self.readiness.commands_failed();
                    warn!(redis = %self.cfg.redis, "backbone subscriber lost its connection; reconnecting");
                }
                Err(e) => {
                    debug!(error = %e, backoff = ?backoff.current(), "backbone subscriber could not connect");
                    if first {
                        warn!(redis = %self.cfg.redis, error = %e, "backbone not reachable yet; retrying");
                        first = false;
                    }
                }
            }
            let wait = backoff.next_wait();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Opens the pub/sub connection and subscribes every room with local members — all in
    /// one `SUBSCRIBE`, one round trip — under the subscription lock.
    async fn connect_subscriber(&self) -> Result<redis::aio::PubSubStream, BackboneError> {
        let pubsub = self.with_timeout(self.client.get_async_pubsub()).await?;
        let (mut sink, stream) = pubsub.split();
        let mut subs = self.subs.lock().await;
        let rooms: HashSet<String> = self.inbound.rooms().into_iter().collect();
        let mut channels: Vec<String> = rooms.iter().map(|r| self.keys.channel(r)).collect();
        channels.push(self.probe_channel());
        // Subscribed with the rooms, so it is back after every reconnect as they are.
        channels.push(self.keys.control());
        self.with_timeout(sink.subscribe(channels)).await?;
        self.metrics.rooms_subscribed.set(rooms.len() as i64);
        subs.rooms = rooms;
        subs.sink = Some(sink);
        Ok(stream)
    }

    fn probe_channel(&self) -> String {
        self.keys.probe(&self.instance)
    }

    /// After a (re)subscription, once the command connection answers: the catch-up from the
    /// room logs ([`super::catch_up`]; the rooms' reads are pipelined on the multiplexed
    /// connection). Fails — and the subscriber starts over — when the command connection
    /// cannot answer, so a gap is never left unfilled behind a node that says it is ready.
    async fn catch_up_when_commands_answer(&self) -> Result<(), BackboneError> {
        self.readiness.until_commands_answer().await?;
        super::catch_up::catch_up(self, self.inbound.as_ref(), &self.metrics).await
    }

    /// Fans out every frame of the subscription until it ends, or until it goes silent: a
    /// probe published to this instance's own channel must come back, or the subscription is
    /// considered dead (after a Redis failover a connection can look alive and receive
    /// nothing) and re-established.
    async fn read(&self, mut stream: redis::aio::PubSubStream) {
        let every = self.cfg.probe_interval;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_probe = tokio::time::Instant::now();
        let probe_channel = self.probe_channel();
        let control_channel = self.keys.control();
        loop {
            let msg = tokio::select! {
                msg = stream.next() => msg,
                _ = tick.tick() => {
                    if last_probe.elapsed() > every * 3 {
                        warn!(silent_for = ?last_probe.elapsed(), "subscription silent: probes do not come back");
                        self.metrics.probe_failures.inc();
                        return;
                    }
                    let mut con = self.commands.clone();
                    let channel = probe_channel.clone();
                    let timeout = self.cfg.redis_timeout;
                    tokio::spawn(async move {
                        let mut cmd = redis::cmd("PUBLISH");
                        cmd.arg(channel).arg("probe");
                        let _ = tokio::time::timeout(timeout, cmd.query_async::<i64>(&mut con)).await;
                    });
                    continue;
                }
            };
            let Some(msg) = msg else { return };
            let channel = msg.get_channel_name();
            if channel == probe_channel {
                last_probe = tokio::time::Instant::now();
                continue;
            }
            if channel == control_channel {
                match std::str::from_utf8(msg.get_payload_bytes()) {
                    Ok(command) => self.inbound.control(command),
                    Err(_) => warn!("non-UTF-8 control command; dropped"),
                }
                continue;
            }
            self.metrics.frames_from_backbone.inc();
            let Some(room) = self.room_of(channel) else {
                debug!(channel, "frame on a channel that is not ours");
                continue;
            };
            let bytes = bytes::Bytes::copy_from_slice(msg.get_payload_bytes());
            match Utf8Bytes::try_from(bytes) {
                Ok(frame) => self.inbound.deliver(room, &frame),
                Err(_) => warn!(room, "non-UTF-8 frame on a room channel; dropped"),
            }
        }
    }
}

/// The room a scope names, `""` for `online` (what the presence scripts take for webhooks).
fn scope_room<'a>(scope: Scope<'a>) -> &'a str {
    match scope {
        Scope::Room(room) => room,
        Scope::Online => "",
    }
}

impl Backbone for RedisBackbone {
    /// All of them in one script call: one round trip, however many.
    fn publish_messages<'a>(&'a self, room: &'a str, prefixes: Vec<String>) -> BoxFuture<'a, Result<(), Unpublished>> {
        async move { self.publish_step(room, Vec::new(), prefixes).await.map(drop).map_err(calls::unpublished) }.boxed()
    }

    fn publish_one<'a>(&'a self, room: &'a str, prefix: String, key: Option<&'a str>) -> Call<'a, Published> {
        async move {
            let keys = key.map(|k| vec![k.to_string()]).unwrap_or_default();
            calls::only(self.publish_step(room, keys, vec![prefix]).await?)
        }
        .boxed()
    }

    /// The whole batch in one script call, each key checked and set in it.
    fn publish_keyed<'a>(
        &'a self,
        room: &'a str,
        messages: Vec<(String, String)>,
    ) -> BoxFuture<'a, Result<Vec<Published>, Unpublished>> {
        async move {
            let (prefixes, keys): (Vec<String>, Vec<String>) = messages.into_iter().unzip();
            self.publish_step(room, keys, prefixes).await.map_err(calls::unpublished)
        }
        .boxed()
    }

    fn publish_event<'a>(&'a self, room: &'a str, json: String) -> Call<'a, ()> {
        async move {
            let mut con = self.commands.clone();
            let channel = self.keys.channel(room);
            let _receivers: i64 =
                self.command(redis::cmd("PUBLISH").arg(channel).arg(json).query_async(&mut con)).await?;
            Ok(())
        }
        .boxed()
    }

    /// While the subscriber is (re)connecting — a node that has just started, a Redis that
    /// blinked — waits for it up to the command timeout, as a command does through the
    /// connection manager, rather than failing at once.
    fn subscribe<'a>(&'a self, room: &'a str) -> Call<'a, ()> {
        async move {
            let deadline = tokio::time::Instant::now() + self.cfg.redis_timeout;
            loop {
                let mut ready = self.connected.subscribe();
                {
                    let mut subs = self.subs.lock().await;
                    if subs.rooms.contains(room) {
                        return Ok(());
                    }
                    if let Some(sink) = subs.sink.as_mut() {
                        self.with_timeout(sink.subscribe(self.keys.channel(room))).await?;
                        subs.rooms.insert(room.to_string());
                        self.metrics.rooms_subscribed.set(subs.rooms.len() as i64);
                        return Ok(());
                    }
                }
                // Not connected past the deadline, or the backbone stopped.
                let up = tokio::time::timeout_at(deadline, ready.wait_for(|up| *up)).await.is_ok_and(|r| r.is_ok());
                if !up {
                    return Err(BackboneError::NotConnected);
                }
            }
        }
        .boxed()
    }

    fn release<'a>(&'a self, room: &'a str) -> BoxFuture<'a, ()> {
        async move {
            let mut subs = self.subs.lock().await;
            if self.inbound.wants(room) || !subs.rooms.remove(room) {
                return;
            }
            self.metrics.rooms_subscribed.set(subs.rooms.len() as i64);
            let channel = self.keys.channel(room);
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

    fn load_session<'a>(&'a self, id: &'a str) -> Call<'a, Option<SessionRecord>> {
        self.load_session_record(id).boxed()
    }

    fn save_session<'a>(&'a self, id: &'a str, session: &'a SessionRecord) -> Call<'a, ()> {
        self.save_session_record(id, session).boxed()
    }

    fn touch_sessions<'a>(&'a self, ids: &'a [Arc<str>]) -> Call<'a, ()> {
        self.touch_session_records(ids).boxed()
    }

    fn forget_session<'a>(&'a self, id: &'a str) -> Call<'a, ()> {
        async move {
            let mut con = self.commands.clone();
            let _deleted: i64 =
                self.command(redis::cmd("DEL").arg(self.keys.session(id)).query_async(&mut con)).await?;
            Ok(())
        }
        .boxed()
    }

    fn control(&self, command: String) -> Call<'_, ()> {
        async move {
            let mut con = self.commands.clone();
            let channel = self.keys.control();
            let _receivers: i64 =
                self.command(redis::cmd("PUBLISH").arg(channel).arg(command).query_async(&mut con)).await?;
            Ok(())
        }
        .boxed()
    }

    fn replay<'a>(&'a self, room: &'a str, after: u64) -> Call<'a, Replay> {
        async move {
            let mut con = self.commands.clone();
            let answer = self.command(calls::replay_pipe(&self.keys, room, after).query_async(&mut con)).await?;
            Ok(calls::replay_of(room, answer))
        }
        .boxed()
    }

    fn presence_add<'a>(&'a self, at: Seat<'a>, entry: &'a PresenceEntry, event: Option<String>) -> Call<'a, Joined> {
        let Seat { scope, conn } = at;
        async move {
            let (ids, entries, channel, member) = self.presence_keys(scope, conn);
            let meta = match scope {
                Scope::Room(room) => self.keys.position(Some(room)),
                Scope::Online => self.keys.position(None),
            };
            let json = calls::entry_json(entry);
            let mut call = self.presence_add.prepare_invoke();
            call.key(entries)
                .key(ids)
                .key(self.instance_set_key())
                .key(channel)
                .key(meta)
                .arg(conn_field(&self.instance, conn))
                .arg(json)
                .arg(&entry.id)
                .arg(member)
                .arg(event.unwrap_or_default());
            if let Some(h) = &self.hooks {
                call.key(&h.pending).key(&h.data).arg(scope_room(scope));
            }
            let mut con = self.commands.clone();
            let (n, frame, decided): (i64, String, Vec<String>) = self.command(call.invoke_async(&mut con)).await?;
            if let Some(h) = &self.hooks {
                h.offer(decided);
            }
            Ok((calls::added(n), (!frame.is_empty()).then_some(frame)))
        }
        .boxed()
    }

    fn presence_rename<'a>(&'a self, at: Seat<'a>, entry: &'a PresenceEntry) -> Call<'a, ()> {
        let Seat { scope, conn } = at;
        async move {
            let (_, entries, _, _) = self.presence_keys(scope, conn);
            let json = calls::entry_json(entry);
            let field = conn_field(&self.instance, conn);
            let mut con = self.commands.clone();
            let script = redis::Script::new(calls::RENAME_LUA);
            let mut call = script.prepare_invoke();
            call.key(entries).arg(field).arg(json);
            self.command(call.invoke_async::<i64>(&mut con)).await?;
            Ok(())
        }
        .boxed()
    }

    fn presence_remove<'a>(&'a self, at: Seat<'a>, id: &'a str, event: Option<String>) -> Call<'a, PresenceChange> {
        let Seat { scope, conn } = at;
        async move {
            let (ids, entries, channel, member) = self.presence_keys(scope, conn);
            let mut call = self.presence_remove.prepare_invoke();
            call.key(entries)
                .key(ids)
                .key(self.instance_set_key())
                .key(channel)
                .arg(conn_field(&self.instance, conn))
                .arg(id)
                .arg(member)
                .arg(event.unwrap_or_default());
            if let Some(h) = &self.hooks {
                call.key(&h.pending).key(&h.data).arg(scope_room(scope)).arg(h.grace_ms);
            }
            let mut con = self.commands.clone();
            let (n, decided): (i64, Vec<String>) = self.command(call.invoke_async(&mut con)).await?;
            if let Some(h) = &self.hooks {
                h.offer(decided);
            }
            Ok(calls::removed(n))
        }
        .boxed()
    }

    fn presence_list<'a>(&'a self, scope: Scope<'a>) -> Call<'a, Vec<PresenceEntry>> {
        async move {
            let (_, entries, _, _) = self.presence_keys(scope, 0);
            let mut con = self.commands.clone();
            let values: Vec<String> = self.command(redis::cmd("HVALS").arg(entries).query_async(&mut con)).await?;
            Ok(calls::entries_of(values))
        }
        .boxed()
    }

    /// Subscribed (every room, caught up) and the command connection answering: the node
    /// can publish and receive. Both halves are set and cleared where their state changes.
    fn is_ready(&self) -> bool {
        self.readiness.ready()
    }

    fn heartbeat(&self) -> Call<'_, bool> {
        async move {
            let mut con = self.commands.clone();
            let mut beat = self.heartbeat.prepare_invoke();
            beat.key(self.keys.instances()).arg(&self.instance);
            Ok(self.command(beat.invoke_async::<i64>(&mut con)).await? == 1)
        }
        .boxed()
    }

    /// At most 16 instances per call: one script must not hold Redis for long.
    fn reap(&self) -> Call<'_, Reaped> {
        async move {
            let mut con = self.commands.clone();
            let mut reap = self.reap.prepare_invoke();
            reap.key(self.keys.instances())
                .arg(self.keys.prefix())
                .arg(self.cfg.presence_ttl.as_millis() as u64)
                .arg(16);
            if let Some(h) = &self.hooks {
                reap.key(&h.pending).key(&h.data).arg(h.grace_ms);
            }
            let (instances, announced) = self.command(reap.invoke_async::<(u64, u64)>(&mut con)).await?;
            Ok(Reaped { instances, announced })
        }
        .boxed()
    }

    fn claim_webhooks(&self) -> Call<'_, usize> {
        async move {
            let Some(h) = &self.hooks else { return Ok(0) };
            let mut con = self.commands.clone();
            let mut claim = self.claim.prepare_invoke();
            claim.key(&h.pending).key(&h.data).arg(super::CLAIM_BATCH);
            let claimed: Vec<String> = self.command(claim.invoke_async(&mut con)).await?;
            let n = claimed.len();
            h.offer(claimed);
            Ok(n)
        }
        .boxed()
    }

    fn announce<'a>(&'a self, record: &'a NodeRecord) -> Call<'a, ()> {
        let mut con = self.commands.clone();
        async move { self.command(registry::announce(&mut con, &self.keys, record)).await.map(drop) }.boxed()
    }

    fn withdraw<'a>(&'a self, record: &'a NodeRecord) -> Call<'a, ()> {
        let mut con = self.commands.clone();
        async move { self.command(registry::withdraw(&mut con, &self.keys, record)).await.map(drop) }.boxed()
    }

    fn deregister(&self) -> BoxFuture<'_, ()> {
        async move {
            let mut con = self.commands.clone();
            let mut pipe = redis::pipe();
            pipe.zrem(self.keys.instances(), &self.instance).ignore().del(self.instance_set_key()).ignore();
            let _ = self.command(pipe.query_async::<()>(&mut con)).await;
        }
        .boxed()
    }
}
