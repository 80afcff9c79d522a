//! The Redis Cluster backbone's subscription side: one dedicated RESP3 connection per shard
//! master, each room `SSUBSCRIBE`d on the connection of the master serving its slot.
//!
//! redis-rs' cluster connection can carry sharded pub/sub too, and moves subscriptions
//! itself when it refreshes its slot map; but it does so silently, so the node could not
//! catch a moved room up from its log, and it refreshes only when a command fails. So the
//! *resync* task owns the topology: every [`TOPOLOGY_POLL`] (and at once when a reader
//! reports trouble) it reads `CLUSTER SLOTS`, drops the connections of dead or demoted
//! masters, connects new masters, and moves every room whose slot is now served elsewhere:
//! `SSUBSCRIBE` on the new owner with the room's live frames *held*, a catch-up from the
//! room's log ([`super::super::catch_up`]), then the held frames (the hub's gates drop what
//! the catch-up delivered already). Nothing published meanwhile is silently dropped: it is in
//! the log, or it arrives live.
//!
//! Each shard connection has a reader task. It hands frames to the node
//! ([`super::super::inbound::Inbound`], never waiting on a client), and declares its
//! connection dead — `/readyz` turns 503 and the resync starts — when the connection ends
//! (RESP3 `Disconnection` push), when its probe (a channel whose slot that master serves,
//! published through the command connection and expected back) stays silent for three
//! probe intervals, or when Redis force-unsubscribes one of its rooms (`sunsubscribe` the
//! node did not ask for: the slot migrated). A forced unsubscribe could also be taken by
//! the connection as the answer to a subscription command in flight, so the whole
//! connection is replaced rather than trusted.
//!
//! The control channel (cluster-wide commands) stays on classic pub/sub, which a Redis
//! Cluster delivers to every node: it is `SUBSCRIBE`d on one of the shard connections.

use super::slots::{slot, SlotMap};
use super::RedisClusterBackbone;
use crate::backbone::catch_up;
use crate::backbone::BackboneError;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often the slot map is read when nothing seems wrong: the longest a migrated slot's
/// rooms go unnoticed if Redis' forced unsubscribe were lost.
pub(super) const TOPOLOGY_POLL: Duration = Duration::from_secs(1);

/// The most live frames held for one room while it is caught up; past it they are dropped
/// and the catch-up read again (the log holds them).
const HELD_CAP: usize = 10_000;

/// How many candidate probe channels are tried to find one whose slot a master serves.
const PROBE_SEARCH: usize = 1 << 16;

/// Catch-up attempts for one room in one resync.
const CATCH_UP_TRIES: usize = 3;

/// Subscription state, changed under its async mutex so that subscribe, release and a
/// resync never interleave.
#[derive(Default)]
pub(super) struct State {
    map: Option<SlotMap>,
    /// Live shard connections by master address.
    shards: HashMap<String, Shard>,
    /// Each subscribed room and the master it is subscribed on.
    rooms: HashMap<String, String>,
    /// The master whose connection carries the control channel.
    control: Option<String>,
    /// Rooms subscribed but not caught up yet (their frames are held).
    pending: HashSet<String>,
}

struct Shard {
    con: MultiplexedConnection,
    /// Stops its reader.
    stop: CancellationToken,
    /// Set by its reader when the connection cannot be trusted any more.
    dead: Arc<AtomicBool>,
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Frames of a room held while it is caught up.
#[derive(Default)]
pub(super) struct Held {
    frames: Vec<Utf8Bytes>,
    /// More than [`HELD_CAP`] came: the held ones were dropped, the catch-up must be re-read.
    overflowed: bool,
}

/// What the readers and the resync share without the async lock.
#[derive(Default)]
pub(super) struct Shared {
    pub held: std::sync::Mutex<HashMap<String, Held>>,
    /// Channels this node is unsubscribing itself (so their `sunsubscribe` is not forced).
    pub releasing: std::sync::Mutex<HashSet<String>>,
}

impl RedisClusterBackbone {
    /// Reads the topology and moves what must move, every [`TOPOLOGY_POLL`] or when woken,
    /// until shutdown; after a failed round, retries with the reconnect backoff.
    pub(super) async fn resync_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = self.backoff();
        let mut first = true;
        loop {
            match self.resync().await {
                Ok(complete) => {
                    backoff.reset();
                    self.readiness.set(|h| h.subscribed = complete);
                    if complete && first {
                        info!(seeds = %self.cfg.redis, "redis cluster backbone subscribed on every shard");
                        first = false;
                    }
                    self.resynced.send_modify(|v| *v += 1);
                    let wait = if complete { TOPOLOGY_POLL } else { backoff.next_wait() };
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => {
                    self.readiness.set(|h| h.subscribed = false);
                    debug!(error = %e, "redis cluster resync failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff.next_wait()) => {}
                    }
                }
            }
        }
        self.state.lock().await.shards.clear();
    }

    /// Reads the slot map through the command connection.
    pub(super) async fn fetch_map(&self) -> Result<SlotMap, BackboneError> {
        let mut con = self.commands.clone();
        let routing =
            redis::cluster_routing::RoutingInfo::SingleNode(redis::cluster_routing::SingleNodeRoutingInfo::Random);
        let answer =
            self.readiness.command(con.route_command(redis::cmd("CLUSTER").arg("SLOTS").to_owned(), routing)).await?;
        SlotMap::parse(&answer).ok_or(BackboneError::NotConnected)
    }

    /// One round; answers whether every room with local members is subscribed on its
    /// master and caught up, and every master has a live connection.
    async fn resync(self: &Arc<Self>) -> Result<bool, BackboneError> {
        let map = self.fetch_map().await?;
        let mut complete = true;
        let mut moved = Vec::new();
        {
            let mut st = self.state.lock().await;
            let masters = map.masters();
            let gone: Vec<String> = st
                .shards
                .iter()
                .filter(|(addr, sh)| sh.dead.load(Ordering::Acquire) || !masters.contains(addr))
                .map(|(addr, _)| addr.clone())
                .collect();
            for addr in gone {
                warn!(master = %addr, "shard subscription dropped; its rooms move to their slots' masters");
                st.shards.remove(&addr);
                st.rooms.retain(|_, on| *on != addr);
                if st.control.as_deref() == Some(addr.as_str()) {
                    st.control = None;
                }
            }
            for master in &masters {
                if st.shards.contains_key(master) {
                    continue;
                }
                match self.connect_shard(master, &map).await {
                    Ok(shard) => {
                        info!(master = %master, "shard subscription connected");
                        st.shards.insert(master.clone(), shard);
                    }
                    Err(e) => {
                        debug!(master = %master, error = %e, "shard subscription could not connect");
                        complete = false;
                    }
                }
            }
            if st.control.is_none() {
                complete &= self.subscribe_control(&mut st).await;
            }
            for room in self.inbound.rooms() {
                let channel = self.keys.channel(&room);
                let Some(owner) = map.master_of(slot(&channel)).map(str::to_string) else {
                    complete = false;
                    continue;
                };
                if st.rooms.get(&room) == Some(&owner) {
                    continue;
                }
                if let Some(old) = st.rooms.remove(&room) {
                    self.unsubscribe_on(&st, &old, &channel).await;
                }
                let Some(shard) = st.shards.get(&owner) else {
                    complete = false;
                    continue;
                };
                self.hold(&room);
                let mut con = shard.con.clone();
                match self.readiness.with_timeout(redis::cmd("SSUBSCRIBE").arg(&channel).exec_async(&mut con)).await {
                    Ok(()) => {
                        st.rooms.insert(room.clone(), owner);
                        st.pending.insert(room.clone());
                    }
                    Err(e) => {
                        debug!(room, error = %e, "resubscription failed");
                        self.unhold(&room);
                        complete = false;
                    }
                }
            }
            self.metrics.rooms_subscribed.set(st.rooms.len() as i64);
            moved.extend(st.pending.iter().cloned());
            st.map = Some(map);
        }
        if !moved.is_empty() {
            complete &= self.catch_up_moved(moved).await;
        }
        // A reader may have given up on its connection meanwhile: then the next round runs now.
        let st = self.state.lock().await;
        Ok(complete && st.pending.is_empty() && st.shards.values().all(|s| !s.dead.load(Ordering::Acquire)))
    }

    /// Catches up the rooms just (re)subscribed, then releases their held frames; answers
    /// whether all of them were. A room whose catch-up failed stays held for the next round.
    async fn catch_up_moved(&self, rooms: Vec<String>) -> bool {
        let positions: HashMap<String, Option<(String, u64)>> = self.inbound.positions().into_iter().collect();
        let mut all = true;
        for room in rooms {
            let mut done = false;
            for _ in 0..CATCH_UP_TRIES {
                let caught = match positions.get(&room).cloned().flatten() {
                    Some((epoch, seq)) => {
                        catch_up::catch_up_room(self, self.inbound.as_ref(), &self.metrics, &room, &epoch, seq)
                            .await
                            .map(drop)
                    }
                    None => Ok(()),
                };
                if let Err(e) = caught {
                    debug!(room, error = %e, "catch-up of a moved room failed");
                    break;
                }
                if self.release_held(&room) {
                    done = true;
                    break;
                }
            }
            if done {
                self.state.lock().await.pending.remove(&room);
            }
            all &= done;
        }
        all
    }

    /// Opens `master`'s subscription connection, subscribes its probe channel, starts its
    /// reader.
    async fn connect_shard(self: &Arc<Self>, master: &str, map: &SlotMap) -> Result<Shard, BackboneError> {
        let probe = (0..PROBE_SEARCH)
            .map(|k| self.keys.probe(&format!("{}-{k}", self.instance)))
            .find(|ch| map.master_of(slot(ch)) == Some(master))
            .ok_or(BackboneError::NotConnected)?;
        let client = redis::Client::open(format!("redis://{master}/?protocol=resp3"))?;
        let (tx, rx) = mpsc::unbounded_channel::<PushInfo>();
        let timeout = Some(self.cfg.redis_timeout);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_push_sender(tx);
        let mut con = self.readiness.with_timeout(client.get_multiplexed_async_connection_with_config(&config)).await?;
        self.readiness.with_timeout(redis::cmd("SSUBSCRIBE").arg(&probe).exec_async(&mut con)).await?;
        let shard = Shard { con, stop: CancellationToken::new(), dead: Arc::new(AtomicBool::new(false)) };
        tokio::spawn(Arc::clone(self).read(master.to_string(), rx, probe, Arc::clone(&shard.dead), shard.stop.clone()));
        Ok(shard)
    }

    /// `SUBSCRIBE`s the control channel on the first live shard; answers whether it could.
    async fn subscribe_control(&self, st: &mut State) -> bool {
        let control = self.keys.control();
        for (addr, shard) in &st.shards {
            let mut con = shard.con.clone();
            if self.readiness.with_timeout(redis::cmd("SUBSCRIBE").arg(&control).exec_async(&mut con)).await.is_ok() {
                st.control = Some(addr.clone());
                return true;
            }
        }
        false
    }

    /// `SUNSUBSCRIBE`s `channel` on `master`'s connection, if it is still there.
    pub(super) async fn unsubscribe_on(&self, st: &State, master: &str, channel: &str) {
        let Some(shard) = st.shards.get(master) else { return };
        self.shared.releasing.lock().expect("releasing lock").insert(channel.to_string());
        let mut con = shard.con.clone();
        if let Err(e) = self.readiness.with_timeout(redis::cmd("SUNSUBSCRIBE").arg(channel).exec_async(&mut con)).await
        {
            // The connection is going away; the next resync subscribes only rooms with members.
            debug!(channel, error = %e, "unsubscribe failed");
            self.shared.releasing.lock().expect("releasing lock").remove(channel);
        }
    }

    /// Subscribes `room` on its master's connection now, if the topology is known and that
    /// connection is live; `Ok(false)` when the caller must wait for a resync.
    pub(super) async fn subscribe_now(&self, room: &str) -> Result<bool, BackboneError> {
        let mut st = self.state.lock().await;
        if st.rooms.contains_key(room) {
            return Ok(true);
        }
        let channel = self.keys.channel(room);
        let Some(owner) = st.map.as_ref().and_then(|m| m.master_of(slot(&channel))).map(str::to_string) else {
            return Ok(false);
        };
        let Some(shard) = st.shards.get(&owner).filter(|s| !s.dead.load(Ordering::Acquire)) else {
            return Ok(false);
        };
        let mut con = shard.con.clone();
        match self.readiness.with_timeout(redis::cmd("SSUBSCRIBE").arg(&channel).exec_async(&mut con)).await {
            Ok(()) => {
                st.rooms.insert(room.to_string(), owner);
                self.metrics.rooms_subscribed.set(st.rooms.len() as i64);
                Ok(true)
            }
            // The slot moved (MOVED), or the connection is failing: the resync sorts it out.
            Err(e) => {
                debug!(room, error = %e, "subscription failed; resyncing");
                Ok(false)
            }
        }
    }

    /// Drops `room`'s subscription unless a local member is left.
    pub(super) async fn release_room(&self, room: &str) {
        let mut st = self.state.lock().await;
        if self.inbound.wants(room) {
            return;
        }
        let Some(master) = st.rooms.remove(room) else { return };
        st.pending.remove(room);
        self.unhold(room);
        self.metrics.rooms_subscribed.set(st.rooms.len() as i64);
        self.unsubscribe_on(&st, &master, &self.keys.channel(room)).await;
    }

    /// Whether this node unsubscribed `channel` itself (and forgets that it did).
    fn released(&self, channel: &str) -> bool {
        self.shared.releasing.lock().expect("releasing lock").remove(channel)
    }

    fn hold(&self, room: &str) {
        self.shared.held.lock().expect("held lock").entry(room.to_string()).or_default();
    }

    fn unhold(&self, room: &str) {
        self.shared.held.lock().expect("held lock").remove(room);
    }

    /// Delivers `room`'s held frames and stops holding it; `false` (still holding, nothing
    /// delivered) when frames were dropped meanwhile and the log must be read again.
    fn release_held(&self, room: &str) -> bool {
        let mut held = self.shared.held.lock().expect("held lock");
        let Some(h) = held.get_mut(room) else { return true };
        if h.overflowed {
            *h = Held::default();
            return false;
        }
        if let Some(h) = held.remove(room) {
            for frame in &h.frames {
                self.inbound.deliver(room, frame);
            }
        }
        true
    }

    /// A room frame from a shard: delivered now, or held while its room is caught up.
    fn offer(&self, room: &str, frame: Utf8Bytes) {
        {
            let mut held = self.shared.held.lock().expect("held lock");
            if let Some(h) = held.get_mut(room) {
                if h.frames.len() >= HELD_CAP {
                    h.frames.clear();
                    h.overflowed = true;
                } else {
                    h.frames.push(frame);
                }
                return;
            }
        }
        self.inbound.deliver(room, &frame);
    }

    /// Reads one shard connection's pushes until it stops or must be replaced.
    async fn read(
        self: Arc<Self>,
        master: String,
        mut pushes: mpsc::UnboundedReceiver<PushInfo>,
        probe: String,
        dead: Arc<AtomicBool>,
        stop: CancellationToken,
    ) {
        let every = self.cfg.probe_interval;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_probe = tokio::time::Instant::now();
        let control = self.keys.control();
        let why = loop {
            let push = tokio::select! {
                _ = stop.cancelled() => return,
                push = pushes.recv() => push,
                _ = tick.tick() => {
                    if last_probe.elapsed() > every * 3 {
                        self.metrics.probe_failures.inc();
                        break "probes do not come back";
                    }
                    let mut con = self.commands.clone();
                    let (channel, timeout) = (probe.clone(), self.cfg.redis_timeout);
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(timeout, redis::cmd("SPUBLISH").arg(channel).arg("probe").exec_async(&mut con)).await;
                    });
                    continue;
                }
            };
            let Some(PushInfo { kind, data }) = push else { break "connection closed" };
            let mut data = data.into_iter();
            let channel = data.next().and_then(|v| bytes_of(v).and_then(|b| String::from_utf8(b).ok()));
            match (kind, channel) {
                (PushKind::SMessage, Some(channel)) if channel == probe => last_probe = tokio::time::Instant::now(),
                (PushKind::SMessage, Some(channel)) => {
                    self.metrics.frames_from_backbone.inc();
                    let Some(room) = self.room_of(&channel) else { continue };
                    match data.next().and_then(bytes_of).map(|b| Utf8Bytes::try_from(bytes::Bytes::from(b))) {
                        Some(Ok(frame)) => self.offer(room, frame),
                        _ => warn!(room, "non-UTF-8 frame on a room channel; dropped"),
                    }
                }
                (PushKind::Message, Some(channel)) if channel == control => {
                    match data.next().and_then(bytes_of).map(String::from_utf8) {
                        Some(Ok(command)) => self.inbound.control(&command),
                        _ => warn!("non-UTF-8 control command; dropped"),
                    }
                }
                // Not one this node asked for: the slot moved.
                (PushKind::SUnsubscribe, Some(channel)) if !self.released(&channel) => {
                    break "Redis unsubscribed a room (its slot moved)";
                }
                (PushKind::Disconnection, _) => break "connection closed",
                _ => {}
            }
        };
        warn!(master = %master, reason = why, "shard subscription lost; resubscribing its rooms");
        dead.store(true, Ordering::Release);
        self.readiness.set(|h| h.subscribed = false);
        self.wake.notify_one();
    }
}

fn bytes_of(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}
