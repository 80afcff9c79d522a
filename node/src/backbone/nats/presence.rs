//! Cluster-wide presence on NATS, with the same guarantees as the Redis backbone's scripts.
//!
//! One stream, `P_presence` (memory, one message kept per subject), holds:
//! - a *record* per client id and scope, on `P.presence.room.T.I` or `P.presence.online.I`
//!   (`T` the room, `I` the id, both in base64url): `{"id","room","conns":{"INSTANCE/CONN":
//!   {"user","server"}}}` — every connection of that id in that scope, cluster-wide;
//! - a heartbeat per node instance on `P.instance.X`, written every third of `presence_ttl`;
//!   its server-side timestamp is the instance's last sign of life (NATS' clock, not ours).
//!
//! Every change of a record is a compare-and-set: read the subject's last message, change it,
//! write it back with `Nats-Expected-Last-Subject-Sequence`, retry when another node won. So
//! "first connection of this id" and "last one gone" are decided exactly once cluster-wide, as
//! Redis' Lua scripts decide them; two tabs are one presence. A record that empties is deleted
//! by its sequence (harmless if someone wrote after it), so records do not pile up.
//!
//! The reaper (every node runs it) finds instances whose heartbeat is older than
//! `presence_ttl`, removes their connections from every record by the same compare-and-set,
//! and announces `user_left`/`node_down` for each id whose record that emptied — once, because
//! only one write can empty a given record version. Then it deletes the dead heartbeat.
//! When to beat and reap, and re-registering this node's entries, is [`crate::backbone::keeper`]'s.

use super::{nats_err, token, NatsBackbone};
use crate::backbone::{BackboneError, PresenceChange, PresenceEntry, Scope};
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use tracing::{debug, warn};

/// Compare-and-set attempts before a presence change gives up (each loses only to another
/// node's successful write, so this many in a row means heavy contention on one id).
const CAS_ATTEMPTS: usize = 32;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Record {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    room: Option<String>,
    conns: BTreeMap<String, Conn>,
}

/// A subject's last message: its stream sequence, payload and server-side time.
struct Last {
    sequence: u64,
    payload: String,
    time: async_nats::datetime::DateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Conn {
    user: String,
    server: String,
}

impl NatsBackbone {
    fn presence_stream_name(&self) -> String {
        format!("{}_presence", self.prefix)
    }

    pub(super) async fn presence_stream(&self) -> Result<&stream::Stream, BackboneError> {
        self.ensure_connected().await?;
        self.presence_stream
            .get_or_try_init(|| async {
                let config = stream::Config {
                    name: self.presence_stream_name(),
                    subjects: vec![format!("{}.presence.>", self.prefix), format!("{}.instance.*", self.prefix)],
                    storage: stream::StorageType::Memory,
                    max_messages_per_subject: 1,
                    discard: stream::DiscardPolicy::Old,
                    allow_direct: true,
                    ..Default::default()
                };
                self.ensure(config).await
            })
            .await
    }

    fn record_subject(&self, scope: Scope<'_>, id: &str) -> String {
        match scope {
            Scope::Room(room) => format!("{}.presence.room.{}.{}", self.prefix, token(room), token(id)),
            Scope::Online => format!("{}.presence.online.{}", self.prefix, token(id)),
        }
    }

    fn scope_filter(&self, scope: Scope<'_>) -> String {
        match scope {
            Scope::Room(room) => format!("{}.presence.room.{}.*", self.prefix, token(room)),
            Scope::Online => format!("{}.presence.online.*", self.prefix),
        }
    }

    fn heartbeat_subject(&self, instance: &str) -> String {
        format!("{}.instance.{}", self.prefix, token(instance))
    }

    fn conn_key(&self, conn: u64) -> String {
        tether_proto::backbone::conn_field(&self.instance, conn)
    }

    /// The last message of `subject`, if any.
    async fn last_of(&self, subject: &str) -> Result<Option<Last>, BackboneError> {
        let stream = self.presence_stream().await?;
        let found = self.direct(stream.direct_get_last_for_subject(subject)).await?;
        Ok(found.map(|m| Last {
            sequence: m.sequence,
            payload: String::from_utf8_lossy(&m.payload).into_owned(),
            time: m.time,
        }))
    }

    /// Compare-and-set on one record: `change` edits the current record (an empty one if
    /// none) and says whether it changed anything; the result is written only if nobody wrote
    /// the subject meanwhile, else everything starts again. Returns `change`'s verdict and the
    /// record as written (or found, when unchanged).
    async fn cas<T>(
        &self,
        subject: &str,
        empty: impl Fn() -> Record,
        mut change: impl FnMut(&mut Record) -> Option<T>,
    ) -> Result<Option<(T, Record)>, BackboneError> {
        for _ in 0..CAS_ATTEMPTS {
            let last = self.last_of(subject).await?;
            let (expected, mut record) = match &last {
                None => (0, empty()),
                Some(m) => match serde_json::from_str::<Record>(&m.payload) {
                    Ok(r) => (m.sequence, r),
                    Err(e) => {
                        warn!(subject, error = %e, "unreadable presence record; replacing it");
                        (m.sequence, empty())
                    }
                },
            };
            let Some(verdict) = change(&mut record) else {
                return Ok(None);
            };
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, expected.to_string().as_str());
            let payload = Bytes::from(serde_json::to_vec(&record).expect("records serialise"));
            match self.publish_acked(subject.to_string(), Some(headers), payload).await? {
                Ok(ack) => {
                    if record.conns.is_empty() {
                        // Nothing left: drop the record itself. Should anyone have written after
                        // us, this sequence is gone already and the delete does nothing.
                        let stream = self.presence_stream().await?;
                        let _ = tokio::time::timeout(self.cfg.redis_timeout, stream.delete_message(ack.sequence)).await;
                    }
                    return Ok(Some((verdict, record)));
                }
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(nats_err(e)),
            }
        }
        Err(BackboneError::Nats(format!("presence record {subject}: still contended after {CAS_ATTEMPTS} attempts")))
    }

    pub(super) async fn record_add(
        &self,
        scope: Scope<'_>,
        conn: u64,
        entry: &PresenceEntry,
    ) -> Result<PresenceChange, BackboneError> {
        let key = self.conn_key(conn);
        let value = Conn { user: entry.user.clone(), server: entry.server.clone() };
        let room = match scope {
            Scope::Room(r) => Some(r.to_string()),
            Scope::Online => None,
        };
        let empty = || Record { id: entry.id.clone(), room: room.clone(), conns: BTreeMap::new() };
        let changed = self
            .cas(&self.record_subject(scope, &entry.id), empty, |r| {
                if r.conns.contains_key(&key) {
                    return None;
                }
                r.conns.insert(key.clone(), value.clone());
                Some(if r.conns.len() == 1 { PresenceChange::FirstOrLast } else { PresenceChange::Shared })
            })
            .await?;
        Ok(changed.map_or(PresenceChange::Unchanged, |(c, _)| c))
    }

    pub(super) async fn record_rename(
        &self,
        scope: Scope<'_>,
        conn: u64,
        entry: &PresenceEntry,
    ) -> Result<(), BackboneError> {
        let key = self.conn_key(conn);
        self.cas(&self.record_subject(scope, &entry.id), Record::default, |r| {
            let c = r.conns.get_mut(&key)?;
            if c.user == entry.user {
                return None;
            }
            c.user = entry.user.clone();
            Some(())
        })
        .await?;
        Ok(())
    }

    pub(super) async fn record_remove(
        &self,
        scope: Scope<'_>,
        conn: u64,
        id: &str,
    ) -> Result<PresenceChange, BackboneError> {
        let key = self.conn_key(conn);
        let changed = self
            .cas(&self.record_subject(scope, id), Record::default, |r| {
                r.conns.remove(&key)?;
                Some(if r.conns.is_empty() { PresenceChange::FirstOrLast } else { PresenceChange::Shared })
            })
            .await?;
        Ok(changed.map_or(PresenceChange::Unchanged, |(c, _)| c))
    }

    /// Every record under `filter`, read one by one (a listing, not a hot path).
    async fn records(&self, filter: &str) -> Result<Vec<(String, Record)>, BackboneError> {
        let names = self.subjects(filter).await?;
        let mut out = Vec::with_capacity(names.len());
        for subject in names {
            if let Some(m) = self.last_of(&subject).await? {
                match serde_json::from_str::<Record>(&m.payload) {
                    Ok(r) => out.push((subject, r)),
                    Err(e) => debug!(subject, error = %e, "unreadable presence record skipped"),
                }
            }
        }
        Ok(out)
    }

    pub(super) async fn record_list(&self, scope: Scope<'_>) -> Result<Vec<PresenceEntry>, BackboneError> {
        let records = self.records(&self.scope_filter(scope)).await?;
        Ok(records
            .into_iter()
            .flat_map(|(_, r)| {
                let id = r.id;
                r.conns.into_values().map(move |c| PresenceEntry { id: id.clone(), user: c.user, server: c.server })
            })
            .collect())
    }

    /// Writes this instance's heartbeat; `true` if it was missing (first beat, reaped as dead,
    /// or NATS lost it), in which case the caller puts this instance's entries back.
    pub(super) async fn beat(&self) -> Result<bool, BackboneError> {
        let subject = self.heartbeat_subject(&self.instance);
        let missing = self.last_of(&subject).await?.is_none();
        self.publish_acked(subject, None, Bytes::from(self.instance.clone())).await?.map_err(nats_err)?;
        Ok(missing)
    }

    /// Removes the connections of every instance whose heartbeat is older than
    /// `presence_ttl` and announces ids that are gone with them; returns (instances, announced).
    pub(super) async fn reap_dead(&self) -> Result<(u64, u64), BackboneError> {
        let own = self.heartbeat_subject(&self.instance);
        let Some(now) = self.last_of(&own).await?.map(|m| m.time) else {
            return Ok((0, 0));
        };
        let ttl_ms = i128::try_from(self.cfg.presence_ttl.as_millis()).unwrap_or(i128::MAX);
        let mut dead: Vec<(String, u64)> = Vec::new();
        for subject in self.heartbeats().await? {
            if let Some(m) = self.last_of(&subject).await? {
                if (now - m.time).whole_milliseconds() > ttl_ms {
                    dead.push((m.payload.clone(), m.sequence));
                }
            }
        }
        if dead.is_empty() {
            return Ok((0, 0));
        }
        let dead_set: HashSet<&str> = dead.iter().map(|(i, _)| i.as_str()).collect();
        let mut announced = 0u64;
        for (subject, _) in self.records(&format!("{}.presence.>", self.prefix)).await? {
            let is_dead = |key: &String| key.split_once('/').is_some_and(|(inst, _)| dead_set.contains(inst));
            let removed = self
                .cas(&subject, Record::default, |r| {
                    let before = r.conns.len();
                    let gone: Vec<(String, Conn)> =
                        r.conns.iter().filter(|(k, _)| is_dead(k)).map(|(k, c)| (k.clone(), c.clone())).collect();
                    r.conns.retain(|k, _| !is_dead(k));
                    (r.conns.len() < before).then_some(gone)
                })
                .await?;
            let Some((gone, record)) = removed else { continue };
            let (Some(room), true, Some((_, last))) = (&record.room, record.conns.is_empty(), gone.last()) else {
                continue;
            };
            let event = tether_proto::wire::Event::UserLeft {
                room,
                user: &last.user,
                id: &record.id,
                server: &last.server,
                reason: tether_proto::wire::LeaveReason::NodeDown,
            }
            .to_json();
            self.publish_live(room, event).await?;
            announced += 1;
        }
        let stream = self.presence_stream().await?;
        for (_, seq) in &dead {
            let _ = self.timed(stream.delete_message(*seq)).await;
        }
        Ok((dead.len() as u64, announced))
    }

    /// The subjects of every instance heartbeat.
    async fn heartbeats(&self) -> Result<Vec<String>, BackboneError> {
        self.subjects(&format!("{}.instance.*", self.prefix)).await
    }

    /// The subjects of the presence stream under `filter` that hold a message.
    async fn subjects(&self, filter: &str) -> Result<Vec<String>, BackboneError> {
        let stream = self.presence_stream().await?;
        let mut subjects = self.timed(stream.info_with_subjects(filter)).await?;
        let mut names = Vec::new();
        while let Some(item) = subjects.next().await {
            names.push(item.map_err(nats_err)?.0);
        }
        Ok(names)
    }

    /// Graceful stop: the sessions removed their entries; drops the heartbeat too.
    pub(super) async fn drop_heartbeat(&self) {
        let subject = self.heartbeat_subject(&self.instance);
        if let Ok(Some(m)) = self.last_of(&subject).await {
            if let Ok(stream) = self.presence_stream().await {
                let _ = self.timed(stream.delete_message(m.sequence)).await;
            }
        }
    }
}
