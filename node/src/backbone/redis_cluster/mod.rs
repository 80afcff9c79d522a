//! The Redis Cluster backbone (`redis = "redis+cluster://h1:p1,h2:p2,…"`): the single-Redis
//! backbone's layout and steps ([`super::redis`]'s scripts and calls, shared, not copied),
//! spread over a cluster's shards.
//!
//! - Commands go through redis-rs' cluster connection (`cluster_async::ClusterConnection`):
//!   it routes each command and script by its first key, follows `MOVED`/`ASK` and refreshes
//!   its slot map. Every room key carries the room as hash tag (`tether:room:{R}:log`,
//!   `tether:presence:{R}`, …), so each publish and presence step is one script in one slot.
//! - Live frames use sharded pub/sub (`SPUBLISH` in the scripts, `SSUBSCRIBE` per shard):
//!   see [`shards`] for the subscription connections, slot moves and failovers.
//! - Epochs: the publish script ([`SPUBLISH_LUA`]) remembers which master assigned a room's
//!   last seq and starts a new epoch when another one answers (a failover may have lost
//!   acknowledged writes), keeping seq and log going, so `(epoch, seq)` never names two
//!   messages. A migration starts a new epoch too (it cannot be told from a failover there).
//! - Presence: a room's entries, ids and channel share its slot (one script, as on a single
//!   Redis); the instance set and the `instances` zset live elsewhere, so they are written by
//!   separate commands, and the reaper ([`presence`]) works room by room.
//! - Webhooks are refused on this backbone (configuration says why).

mod presence;
mod shards;
pub mod slots;

use super::inbound::Inbound;
use super::keeper::Backoff;
use super::redis::calls;
use super::redis::readiness::Readiness;
use super::redis::registry;
use super::redis::scripts::{
    HEARTBEAT_LUA, REAP_CLAIM_LUA, REAP_ENTRY_LUA, SHARDED_PRESENCE_ADD_LUA, SHARDED_PRESENCE_REMOVE_LUA, SPUBLISH_LUA,
};
use super::{
    Backbone, BackboneError, Call, Joined, PresenceChange, PresenceEntry, Published, Reaped, Replay, Scope, Seat,
    SessionRecord, Unpublished,
};
use crate::config::Config;
use crate::metrics::Metrics;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::{self, TryStreamExt};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use std::sync::Arc;
use tether_proto::backbone::{NodeRecord, RedisKeys};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// Sessions touched concurrently (each is its own key, so its own slot).
const TOUCH_CONCURRENCY: usize = 32;

pub struct RedisClusterBackbone {
    cfg: Arc<Config>,
    inbound: Arc<dyn Inbound>,
    metrics: Metrics,
    keys: RedisKeys,
    commands: ClusterConnection,
    publish: redis::Script,
    presence_add: redis::Script,
    presence_remove: redis::Script,
    rename: redis::Script,
    replay: redis::Script,
    session_write: redis::Script,
    heartbeat: redis::Script,
    reap_claim: redis::Script,
    reap_entry: redis::Script,
    /// This process' presence instance: `NAME#RANDOM`, new at every start.
    instance: String,
    readiness: Readiness,
    state: tokio::sync::Mutex<shards::State>,
    shared: shards::Shared,
    /// Wakes the resync task (a reader lost its shard, a subscription hit a moved slot).
    wake: Notify,
    /// Counts finished resync rounds: a subscription waiting for the topology waits on it.
    resynced: watch::Sender<u64>,
    /// `{prefix}room:{` — what every room channel starts with.
    channel_head: String,
}

impl RedisClusterBackbone {
    /// Connects lazily (a node starts unready while the cluster is away) and starts the
    /// resync and command-keeper tasks, until `shutdown`.
    pub async fn start(
        cfg: Arc<Config>,
        seeds: Vec<String>,
        inbound: Arc<dyn Inbound>,
        metrics: Metrics,
        instance: String,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, BackboneError> {
        let client = ClusterClientBuilder::new(seeds)
            .connection_timeout(cfg.redis_timeout)
            .response_timeout(cfg.redis_timeout)
            // Retries (MOVED, a master being replaced) stay within one command deadline:
            // past it the client hears `backbone_unavailable`, never a silent drop.
            .retries(4)
            .min_retry_wait(50)
            .max_retry_wait(cfg.redis_timeout.as_millis() as u64 / 4)
            .build()?;
        let commands = client.get_async_connection().await?;
        let keys = RedisKeys::new(&cfg.prefix);
        let backbone = Arc::new(Self {
            readiness: Readiness::new(metrics.clone(), cfg.redis.clone(), cfg.redis_timeout),
            channel_head: keys.channel_head(),
            keys,
            cfg,
            inbound,
            metrics,
            commands,
            publish: redis::Script::new(SPUBLISH_LUA),
            presence_add: redis::Script::new(SHARDED_PRESENCE_ADD_LUA),
            presence_remove: redis::Script::new(SHARDED_PRESENCE_REMOVE_LUA),
            rename: redis::Script::new(calls::RENAME_LUA),
            replay: redis::Script::new(calls::REPLAY_LUA),
            session_write: redis::Script::new(calls::SESSION_WRITE_LUA),
            heartbeat: redis::Script::new(HEARTBEAT_LUA),
            reap_claim: redis::Script::new(REAP_CLAIM_LUA),
            reap_entry: redis::Script::new(REAP_ENTRY_LUA),
            instance,
            state: tokio::sync::Mutex::new(shards::State::default()),
            shared: shards::Shared::default(),
            wake: Notify::new(),
            resynced: watch::Sender::new(0),
        });
        tokio::spawn(Arc::clone(&backbone).resync_loop(shutdown.clone()));
        let keeper = Arc::clone(&backbone);
        tokio::spawn(async move {
            let probe = || async { keeper.fetch_map().await.map(drop) };
            keeper.readiness.keep_commands(probe, || keeper.backoff(), shutdown).await
        });
        Ok(backbone)
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max)
    }

    fn room_of<'c>(&self, channel: &'c str) -> Option<&'c str> {
        channel.strip_prefix(self.channel_head.as_str())?.strip_suffix('}')
    }

    /// The publish step: one script call in the room's slot, told the last position this
    /// node delivered there (so a master that lost writes the node saw starts a new epoch).
    async fn publish_step(
        &self,
        room: &str,
        dedup: Vec<String>,
        prefixes: Vec<String>,
    ) -> Result<Vec<Published>, BackboneError> {
        if prefixes.is_empty() {
            return Ok(Vec::new());
        }
        let (seen_epoch, seen_seq) = match self.inbound.position(room) {
            Some((epoch, seq)) => (epoch, seq.to_string()),
            None => (String::new(), String::new()),
        };
        let extra = [seen_epoch, seen_seq];
        let call = calls::publish_call(&self.publish, &self.keys, &self.cfg, room, dedup, &extra, prefixes);
        let mut con = self.commands.clone();
        calls::run_publish(call, &mut con, &self.readiness, &self.metrics).await
    }
}

impl Backbone for RedisClusterBackbone {
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
            self.readiness
                .command(redis::cmd("SPUBLISH").arg(self.keys.channel(room)).arg(json).exec_async(&mut con))
                .await
        }
        .boxed()
    }

    /// Waits for the topology (a node that has just started, a shard being replaced) up to
    /// the command timeout, as a command would.
    fn subscribe<'a>(&'a self, room: &'a str) -> Call<'a, ()> {
        async move {
            let deadline = tokio::time::Instant::now() + self.cfg.redis_timeout;
            loop {
                let mut resynced = self.resynced.subscribe();
                resynced.borrow_and_update();
                if self.subscribe_now(room).await? {
                    return Ok(());
                }
                self.wake.notify_one();
                let changed = tokio::time::timeout_at(deadline, resynced.changed()).await;
                if !matches!(changed, Ok(Ok(()))) {
                    return Err(BackboneError::NotConnected);
                }
            }
        }
        .boxed()
    }

    fn release<'a>(&'a self, room: &'a str) -> BoxFuture<'a, ()> {
        self.release_room(room).boxed()
    }

    fn load_session<'a>(&'a self, id: &'a str) -> Call<'a, Option<SessionRecord>> {
        async move {
            let mut con = self.commands.clone();
            let fields = self.readiness.command(calls::session_read(&self.keys, id).query_async(&mut con)).await?;
            Ok(calls::session_of(id, fields))
        }
        .boxed()
    }

    fn save_session<'a>(&'a self, id: &'a str, session: &'a SessionRecord) -> Call<'a, ()> {
        async move {
            let call = calls::session_write_call(&self.session_write, &self.keys, id, session, &self.cfg);
            let mut con = self.commands.clone();
            self.readiness.command(call.invoke_async::<i64>(&mut con)).await.map(drop)
        }
        .boxed()
    }

    /// One `PEXPIRE` per session (each in its own slot), a few at a time.
    fn touch_sessions<'a>(&'a self, ids: &'a [Arc<str>]) -> Call<'a, ()> {
        async move {
            let ttl = self.cfg.session_ttl.as_millis() as i64;
            stream::iter(ids.iter().map(Ok::<_, BackboneError>))
                .try_for_each_concurrent(TOUCH_CONCURRENCY, |id| async move {
                    let mut con = self.commands.clone();
                    self.readiness
                        .command(redis::cmd("PEXPIRE").arg(self.keys.session(id)).arg(ttl).exec_async(&mut con))
                        .await
                })
                .await
        }
        .boxed()
    }

    fn forget_session<'a>(&'a self, id: &'a str) -> Call<'a, ()> {
        async move {
            let mut con = self.commands.clone();
            self.readiness.command(redis::cmd("DEL").arg(self.keys.session(id)).exec_async(&mut con)).await
        }
        .boxed()
    }

    /// Classic `PUBLISH`: a Redis Cluster delivers it to every node's subscribers.
    fn control(&self, command: String) -> Call<'_, ()> {
        async move {
            let mut con = self.commands.clone();
            self.readiness
                .command(redis::cmd("PUBLISH").arg(self.keys.control()).arg(command).exec_async(&mut con))
                .await
        }
        .boxed()
    }

    fn replay<'a>(&'a self, room: &'a str, after: u64) -> Call<'a, Replay> {
        async move {
            let mut con = self.commands.clone();
            let call = calls::replay_call(&self.replay, &self.keys, room, after);
            let answer = self.readiness.command(call.invoke_async(&mut con)).await?;
            Ok(calls::replay_of(room, answer))
        }
        .boxed()
    }

    fn presence_add<'a>(&'a self, at: Seat<'a>, entry: &'a PresenceEntry, event: Option<String>) -> Call<'a, Joined> {
        self.add_presence(at, entry, event).boxed()
    }

    fn presence_rename<'a>(&'a self, at: Seat<'a>, entry: &'a PresenceEntry) -> Call<'a, ()> {
        self.rename_presence(at, entry).boxed()
    }

    fn presence_remove<'a>(&'a self, at: Seat<'a>, id: &'a str, event: Option<String>) -> Call<'a, PresenceChange> {
        self.remove_presence(at, id, event).boxed()
    }

    fn presence_list<'a>(&'a self, scope: Scope<'a>) -> Call<'a, Vec<PresenceEntry>> {
        async move {
            let mut con = self.commands.clone();
            let entries = self.presence_keys(scope).entries;
            let values: Vec<String> =
                self.readiness.command(redis::cmd("HVALS").arg(entries).query_async(&mut con)).await?;
            Ok(calls::entries_of(values))
        }
        .boxed()
    }

    fn is_ready(&self) -> bool {
        self.readiness.ready()
    }

    fn heartbeat(&self) -> Call<'_, bool> {
        async move {
            let mut con = self.commands.clone();
            let mut beat = self.heartbeat.prepare_invoke();
            beat.key(self.keys.instances()).arg(&self.instance);
            Ok(self.readiness.command(beat.invoke_async::<i64>(&mut con)).await? == 1)
        }
        .boxed()
    }

    fn reap(&self) -> Call<'_, Reaped> {
        self.reap_dead().boxed()
    }

    /// The registry is one hash (one slot): the single-Redis steps serve as they are.
    fn announce<'a>(&'a self, record: &'a NodeRecord) -> Call<'a, ()> {
        let mut con = self.commands.clone();
        async move { self.readiness.command(registry::announce(&mut con, &self.keys, record)).await.map(drop) }.boxed()
    }

    fn withdraw<'a>(&'a self, record: &'a NodeRecord) -> Call<'a, ()> {
        let mut con = self.commands.clone();
        async move { self.readiness.command(registry::withdraw(&mut con, &self.keys, record)).await.map(drop) }.boxed()
    }

    fn deregister(&self) -> BoxFuture<'_, ()> {
        async move {
            // Two slots: two commands.
            let mut con = self.commands.clone();
            let _ = self
                .readiness
                .command(redis::cmd("ZREM").arg(self.keys.instances()).arg(&self.instance).exec_async(&mut con))
                .await;
            let mut con = self.commands.clone();
            let _ = self
                .readiness
                .command(redis::cmd("DEL").arg(self.keys.instance_set(&self.instance)).exec_async(&mut con))
                .await;
        }
        .boxed()
    }
}
