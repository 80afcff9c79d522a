//! `--backbone none`: sticky sessions alone. Frames go straight to this node's members;
//! members on other nodes never see them (the comparison's control group). Seqs come from a
//! per-room counter in memory, under an epoch unique to this process.
//!
//! Webhooks are decided here too, by [`super::decide`]'s rules in memory: this
//! node's presence is the whole presence. Pending events die with the process.

use super::decide::{leave_reason, Decider};
use super::dedup::DedupCache;
use super::inbound::Inbound;
use super::{
    Backbone, Call, Joined, PresenceChange, PresenceEntry, Published, Replay, Scope, Seat, SessionRecord, Unpublished,
};
use crate::metrics::Metrics;
use crate::webhooks::{Decided, Webhooks};
use dashmap::DashMap;
use futures_util::future::{ready, BoxFuture, FutureExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tether_proto::wire::{complete_joined, complete_message};
use tokio_tungstenite::tungstenite::Utf8Bytes;

pub struct LocalBackbone {
    inbound: Arc<dyn Inbound>,
    metrics: Metrics,
    epoch: String,
    seqs: DashMap<String, u64>,
    dedup: DedupCache,
    /// Presence of this node's connections only: without a backbone nobody else is visible.
    presence: LocalPresence,
    hooks: Option<LocalHooks>,
}

/// Webhooks on one node: the sink, and the decisions' pending events on this node's clock.
struct LocalHooks {
    sink: Arc<Webhooks>,
    decider: Mutex<Decider>,
    started: std::time::Instant,
}

impl LocalHooks {
    fn decide<T>(&self, f: impl FnOnce(&mut Decider, std::time::Duration) -> T) -> T {
        let mut d = self.decider.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut d, self.started.elapsed())
    }
}

/// Presence entries of this node's own connections, per scope: the `none` backbone's whole
/// presence.
#[derive(Default)]
struct LocalPresence {
    scopes: DashMap<String, HashMap<u64, PresenceEntry>>,
}

impl LocalPresence {
    /// Adds the entry; with `hooks`, decides its webhook events under the same shard lock.
    fn add(
        &self,
        scope: Scope<'_>,
        conn: u64,
        entry: &PresenceEntry,
        hooks: Option<&LocalHooks>,
    ) -> (PresenceChange, Vec<Decided>) {
        let mut map = self.scopes.entry(scope_key(scope)).or_default();
        let change = if map.insert(conn, entry.clone()).is_some() {
            PresenceChange::Unchanged
        } else if map.values().filter(|e| e.id == entry.id).count() == 1 {
            PresenceChange::FirstOrLast
        } else {
            PresenceChange::Shared
        };
        let decided = match hooks {
            Some(h) if change == PresenceChange::FirstOrLast => {
                let first_of_room = map.values().all(|e| e.id == entry.id);
                h.decide(|d, _| d.added(scope, entry, true, first_of_room))
            }
            _ => Vec::new(),
        };
        (change, decided)
    }

    fn rename(&self, scope: Scope<'_>, conn: u64, entry: &PresenceEntry) {
        if let Some(mut map) = self.scopes.get_mut(&scope_key(scope)) {
            if let Some(e) = map.get_mut(&conn) {
                *e = entry.clone();
            }
        }
    }

    /// Removes the entry; with `hooks`, decides its webhook events (for `reason`) under the
    /// same shard lock.
    fn remove(
        &self,
        scope: Scope<'_>,
        conn: u64,
        id: &str,
        hooks: Option<(&LocalHooks, &str)>,
    ) -> (PresenceChange, Vec<Decided>) {
        let key = scope_key(scope);
        let mut decided = Vec::new();
        let change = match self.scopes.get_mut(&key) {
            None => PresenceChange::Unchanged,
            Some(mut map) => match map.remove(&conn) {
                None => PresenceChange::Unchanged,
                Some(_) if map.values().any(|e| e.id == id) => PresenceChange::Shared,
                Some(gone) => {
                    if let Some((h, reason)) = hooks {
                        let empty = map.is_empty();
                        decided = h.decide(|d, now| d.removed(now, scope, &gone, reason, true, empty));
                    }
                    PresenceChange::FirstOrLast
                }
            },
        };
        self.scopes.remove_if(&key, |_, m| m.is_empty());
        (change, decided)
    }

    fn list(&self, scope: Scope<'_>) -> Vec<PresenceEntry> {
        self.scopes.get(&scope_key(scope)).map(|m| m.values().cloned().collect()).unwrap_or_default()
    }
}

fn scope_key(scope: Scope<'_>) -> String {
    match scope {
        Scope::Room(r) => format!("room:{r}"),
        Scope::Online => "online".to_string(),
    }
}

impl LocalBackbone {
    /// Dedup keys are remembered for `idempotency_ttl`.
    pub fn new(
        inbound: Arc<dyn Inbound>,
        metrics: Metrics,
        idempotency_ttl: std::time::Duration,
        hooks: Option<Arc<Webhooks>>,
    ) -> Self {
        let epoch = format!("local-{}", tether_proto::id::mint_client_id());
        metrics.backbone_ready.set(1);
        let hooks = hooks.map(|sink| LocalHooks {
            decider: Mutex::new(Decider::new(sink.grace())),
            sink,
            started: std::time::Instant::now(),
        });
        Self {
            inbound,
            metrics,
            epoch,
            seqs: DashMap::new(),
            dedup: DedupCache::new(idempotency_ttl),
            presence: LocalPresence::default(),
            hooks,
        }
    }

    fn offer(&self, decided: Vec<Decided>) {
        if let (Some(h), false) = (&self.hooks, decided.is_empty()) {
            h.sink.offer(decided);
        }
    }

    fn deliver(&self, room: &str, json: String) {
        self.metrics.frames_from_backbone.inc();
        self.inbound.deliver(room, &Utf8Bytes::from(json));
    }
}

impl Backbone for LocalBackbone {
    fn publish_messages<'a>(&'a self, room: &'a str, prefixes: Vec<String>) -> BoxFuture<'a, Result<(), Unpublished>> {
        // The counter's shard lock is held across the delivery so that two publishers in one
        // room deliver in seq order.
        let mut seq = self.seqs.entry(room.to_string()).or_insert(0);
        for prefix in prefixes {
            *seq += 1;
            self.deliver(room, complete_message(&prefix, *seq, &self.epoch));
        }
        drop(seq);
        ready(Ok(())).boxed()
    }

    fn publish_one<'a>(&'a self, room: &'a str, prefix: String, key: Option<&'a str>) -> Call<'a, Published> {
        let now = std::time::Instant::now();
        let key = key.map(|k| format!("{room}\n{k}"));
        // Checked and remembered under the room counter's lock: two repeats racing publish once.
        let mut seq = self.seqs.entry(room.to_string()).or_insert(0);
        if let Some((seq, epoch)) = key.as_deref().and_then(|k| self.dedup.get(k, now)) {
            return ready(Ok(Published { seq, epoch, duplicate: true })).boxed();
        }
        *seq += 1;
        let at = *seq;
        self.deliver(room, complete_message(&prefix, at, &self.epoch));
        if let Some(key) = key {
            self.dedup.insert(key, (at, self.epoch.clone()), now);
        }
        drop(seq);
        ready(Ok(Published { seq: at, epoch: self.epoch.clone(), duplicate: false })).boxed()
    }

    fn publish_event<'a>(&'a self, room: &'a str, json: String) -> Call<'a, ()> {
        self.deliver(room, json);
        ready(Ok(())).boxed()
    }

    fn subscribe<'a>(&'a self, _room: &'a str) -> Call<'a, ()> {
        ready(Ok(())).boxed()
    }

    fn release<'a>(&'a self, _room: &'a str) -> BoxFuture<'a, ()> {
        ready(()).boxed()
    }

    /// Sessions cannot outlive a node without a shared store: every connection is new.
    fn load_session<'a>(&'a self, _id: &'a str) -> Call<'a, Option<SessionRecord>> {
        ready(Ok(None)).boxed()
    }

    fn save_session<'a>(&'a self, _id: &'a str, _s: &'a SessionRecord) -> Call<'a, ()> {
        ready(Ok(())).boxed()
    }

    fn touch_sessions<'a>(&'a self, _ids: &'a [Arc<str>]) -> Call<'a, ()> {
        ready(Ok(())).boxed()
    }

    fn forget_session<'a>(&'a self, _id: &'a str) -> Call<'a, ()> {
        ready(Ok(())).boxed()
    }

    /// This node is the whole cluster: the command comes straight back.
    fn control(&self, command: String) -> Call<'_, ()> {
        self.inbound.control(&command);
        ready(Ok(())).boxed()
    }

    /// No log is kept: a resume reports what it missed as incomplete.
    fn replay<'a>(&'a self, room: &'a str, _after: u64) -> Call<'a, Replay> {
        let head_seq = self.seqs.get(room).map_or(0, |s| *s);
        ready(Ok(Replay { epoch: Some(self.epoch.clone()), head_seq, frames: Vec::new() })).boxed()
    }

    fn presence_add<'a>(&'a self, at: Seat<'a>, entry: &'a PresenceEntry, event: Option<String>) -> Call<'a, Joined> {
        let Seat { scope, conn } = at;
        let event = match (event, scope) {
            (Some(e), Scope::Room(room)) => {
                let head = self.seqs.get(room).map_or(0, |s| *s);
                Some(complete_joined(&e, head, Some(&self.epoch)))
            }
            (e, _) => e,
        };
        let (change, decided) = self.presence.add(scope, conn, entry, self.hooks.as_ref());
        self.offer(decided);
        if let (PresenceChange::FirstOrLast, Some(event), Scope::Room(room)) = (change, &event, scope) {
            self.deliver(room, event.clone());
        }
        ready(Ok((change, event))).boxed()
    }

    fn presence_rename<'a>(&'a self, at: Seat<'a>, entry: &'a PresenceEntry) -> Call<'a, ()> {
        let Seat { scope, conn } = at;
        self.presence.rename(scope, conn, entry);
        ready(Ok(())).boxed()
    }

    fn presence_remove<'a>(&'a self, at: Seat<'a>, id: &'a str, event: Option<String>) -> Call<'a, PresenceChange> {
        let Seat { scope, conn } = at;
        let reason = self.hooks.as_ref().map(|_| leave_reason(event.as_deref()));
        let hooks = self.hooks.as_ref().zip(reason.as_deref());
        let (change, decided) = self.presence.remove(scope, conn, id, hooks);
        self.offer(decided);
        if let (PresenceChange::FirstOrLast, Some(event), Scope::Room(room)) = (change, event, scope) {
            self.deliver(room, event);
        }
        ready(Ok(change)).boxed()
    }

    fn presence_list<'a>(&'a self, scope: Scope<'a>) -> Call<'a, Vec<PresenceEntry>> {
        ready(Ok(self.presence.list(scope))).boxed()
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn claim_webhooks(&self) -> Call<'_, usize> {
        let decided = self.hooks.as_ref().map(|h| h.decide(|d, now| d.claim_due(now))).unwrap_or_default();
        let n = decided.len();
        self.offer(decided);
        ready(Ok(n)).boxed()
    }
}
