//! The Redis Cluster backbone's presence: the single-Redis presence scripts (sharded
//! variants), one slot per step, and a reaper that works room by room.
//!
//! A scope's keys share its slot: a room's entries, ids, channel and meta all carry the
//! room's hash tag, and `online` is `{prefix}{online}` (with `:ids` and `:meta`). What a
//! node instance registered (`{prefix}instance:{INSTANCE}`) is in its own slot, so it is
//! written by separate commands: `SADD` before the add script, `SREM` after the remove
//! script. A member without an entry behind it is harmless: the reaper finds nothing to
//! remove for it.
//!
//! The reaper: one script on the `instances` zset claims dead instances (leasing each, so
//! that if this node dies mid-way another one takes it over once the lease runs out); for
//! each, the instance set is read and each entry reaped by a slot-local script whose `HDEL`
//! decides, so every id left with no connection is announced once (`user_left`,
//! `node_down`) even when two nodes reap the same instance; then the instance is removed.

use super::RedisClusterBackbone;
use crate::backbone::redis::calls;
use crate::backbone::{BackboneError, Joined, PresenceChange, PresenceEntry, Reaped, Scope, Seat};
use tether_proto::backbone::{conn_field, instance_member, RedisKeys};
use tracing::debug;

/// The most instances one reap claims.
const REAP_BATCH: usize = 16;

/// How long a claimed instance is this node's to reap before another node may take it.
const REAP_LEASE_MS: u64 = 30_000;

/// One scope's keys, all in one slot.
pub(super) struct ScopeKeys {
    pub entries: String,
    ids: String,
    /// The room's channel; for `online` (which publishes nothing) the entries hash, so that
    /// every key of the script is in the slot.
    channel: String,
    /// Where a `user_joined` is completed from.
    meta: String,
}

impl RedisClusterBackbone {
    pub(super) fn presence_keys(&self, scope: Scope<'_>) -> ScopeKeys {
        let (entries, channel, meta) = match scope {
            Scope::Room(room) => (self.keys.presence(Some(room)), self.keys.channel(room), self.keys.meta(room)),
            Scope::Online => {
                let online = self.keys.sharded_online();
                (online.clone(), online.clone(), format!("{online}:meta"))
            }
        };
        ScopeKeys { ids: RedisKeys::presence_ids(&entries), entries, channel, meta }
    }

    fn member(scope: Scope<'_>, conn: u64) -> String {
        match scope {
            Scope::Room(room) => instance_member(conn, Some(room)),
            Scope::Online => instance_member(conn, None),
        }
    }

    pub(super) async fn add_presence(
        &self,
        at: Seat<'_>,
        entry: &PresenceEntry,
        event: Option<String>,
    ) -> Result<Joined, BackboneError> {
        let Seat { scope, conn } = at;
        let k = self.presence_keys(scope);
        let member = Self::member(scope, conn);
        let mut con = self.commands.clone();
        self.readiness
            .command(redis::cmd("SADD").arg(self.keys.instance_set(&self.instance)).arg(&member).exec_async(&mut con))
            .await?;
        let mut call = self.presence_add.prepare_invoke();
        call.key(&k.entries)
            .key(&k.ids)
            // The instance set's place: written above, here any key of the slot.
            .key(&k.entries)
            .key(&k.channel)
            .key(&k.meta)
            .arg(conn_field(&self.instance, conn))
            .arg(calls::entry_json(entry))
            .arg(&entry.id)
            .arg(member)
            .arg(event.unwrap_or_default());
        let mut con = self.commands.clone();
        let (n, frame, _hooks): (i64, String, Vec<String>) =
            self.readiness.command(call.invoke_async(&mut con)).await?;
        Ok((calls::added(n), (!frame.is_empty()).then_some(frame)))
    }

    pub(super) async fn rename_presence(&self, at: Seat<'_>, entry: &PresenceEntry) -> Result<(), BackboneError> {
        let Seat { scope, conn } = at;
        let mut call = self.rename.prepare_invoke();
        call.key(self.presence_keys(scope).entries).arg(conn_field(&self.instance, conn)).arg(calls::entry_json(entry));
        let mut con = self.commands.clone();
        self.readiness.command(call.invoke_async::<i64>(&mut con)).await?;
        Ok(())
    }

    pub(super) async fn remove_presence(
        &self,
        at: Seat<'_>,
        id: &str,
        event: Option<String>,
    ) -> Result<PresenceChange, BackboneError> {
        let Seat { scope, conn } = at;
        let k = self.presence_keys(scope);
        let member = Self::member(scope, conn);
        let mut call = self.presence_remove.prepare_invoke();
        call.key(&k.entries)
            .key(&k.ids)
            .key(&k.entries)
            .key(&k.channel)
            .arg(conn_field(&self.instance, conn))
            .arg(id)
            .arg(&member)
            .arg(event.unwrap_or_default());
        let mut con = self.commands.clone();
        let (n, _hooks): (i64, Vec<String>) = self.readiness.command(call.invoke_async(&mut con)).await?;
        let mut con = self.commands.clone();
        self.readiness
            .command(redis::cmd("SREM").arg(self.keys.instance_set(&self.instance)).arg(&member).exec_async(&mut con))
            .await?;
        Ok(calls::removed(n))
    }

    pub(super) async fn reap_dead(&self) -> Result<Reaped, BackboneError> {
        let mut claim = self.reap_claim.prepare_invoke();
        claim
            .key(self.keys.instances())
            .arg(self.cfg.presence_ttl.as_millis() as u64)
            .arg(REAP_BATCH)
            .arg(REAP_LEASE_MS);
        let mut con = self.commands.clone();
        let dead: Vec<String> = self.readiness.command(claim.invoke_async(&mut con)).await?;
        let mut reaped = Reaped::default();
        for inst in dead {
            reaped.announced += self.reap_instance(&inst).await?;
            reaped.instances += 1;
        }
        Ok(reaped)
    }

    /// Reaps every entry `inst` registered, then forgets the instance; answers how many ids
    /// were announced gone.
    async fn reap_instance(&self, inst: &str) -> Result<u64, BackboneError> {
        let set = self.keys.instance_set(inst);
        let mut con = self.commands.clone();
        let members: Vec<String> =
            self.readiness.command(redis::cmd("SMEMBERS").arg(&set).query_async(&mut con)).await?;
        let mut announced = 0;
        for m in &members {
            let Some((conn, room)) = m.split_once('|') else { continue };
            let Ok(conn) = conn.parse::<u64>() else { continue };
            let scope = if room.is_empty() { Scope::Online } else { Scope::Room(room) };
            let k = self.presence_keys(scope);
            let mut call = self.reap_entry.prepare_invoke();
            call.key(&k.entries).key(&k.ids).key(&k.channel).arg(conn_field(inst, conn)).arg(room);
            let mut con = self.commands.clone();
            announced += self.readiness.command(call.invoke_async::<u64>(&mut con)).await?;
        }
        let mut con = self.commands.clone();
        self.readiness.command(redis::cmd("DEL").arg(&set).exec_async(&mut con)).await?;
        let mut con = self.commands.clone();
        self.readiness.command(redis::cmd("ZREM").arg(self.keys.instances()).arg(inst).exec_async(&mut con)).await?;
        debug!(instance = inst, entries = members.len(), announced, "reaped a dead instance");
        Ok(announced)
    }
}
