//! A backbone in memory, for the tests of what is written above the trait: one [`Store`]
//! stands for the shared Redis or NATS of several nodes, with a clock the test moves, a
//! switch that cuts one node's subscription off, and ways to make it trim or lose data.
//! Each change happens under one lock, as the real backbones' atomic steps do. With
//! [`Store::with_webhooks`] it also decides webhook events (by [`super::decide`]'s
//! rules, under that lock); each node keeps what it decided or claimed, for the test to read.

use super::decide::{leave_reason, Decider};
use super::inbound::{HubInbound, Inbound};
use super::{
    Backbone, BackboneError, Call, Joined, PresenceChange, PresenceEntry, Published, Reaped, Replay, Scope, Seat,
    SessionRecord, Unpublished,
};
use crate::hub::{Gate, Hub, Member};
use crate::metrics::Metrics;
use crate::outbox::{frame_payload, Limits, Outbox};
use crate::webhooks::Decided;
use futures_util::future::{ready, BoxFuture, FutureExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tether_proto::backbone::{conn_field, NodeRecord};
use tether_proto::wire::{complete_joined, complete_message, MessageHead};
use tether_proto::wire::{Event, LeaveReason};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

/// What every node of a test sees.
pub struct Store {
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The store's own clock (heartbeats are judged on it, as on Redis' or NATS' clock).
    clock: Duration,
    rooms: HashMap<String, RoomLog>,
    /// Scope (room, `None` for online) → `INSTANCE/CONN` → entry.
    presence: HashMap<Option<String>, BTreeMap<String, PresenceEntry>>,
    /// Instance → its last heartbeat.
    instances: HashMap<String, Duration>,
    sessions: HashMap<String, SessionRecord>,
    nodes: Vec<Subscriber>,
    epochs: u64,
    /// Webhook decisions, when on; pending events are judged on `clock`.
    decider: Option<Decider>,
    /// Room + dedup key → the position first published under it (never expires: a test's
    /// store lives for one test).
    dedup: HashMap<(String, String), (u64, String)>,
    /// The node registry: name → the record last announced and how many times it was.
    registry: BTreeMap<String, (NodeRecord, u64)>,
}

struct RoomLog {
    epoch: String,
    seq: u64,
    log: Vec<(u64, String)>,
}

struct Subscriber {
    instance: String,
    inbound: Arc<dyn Inbound>,
    rooms: HashSet<String>,
    connected: bool,
}

impl State {
    fn node(&mut self, instance: &str) -> &mut Subscriber {
        self.nodes.iter_mut().find(|n| n.instance == instance).expect("a node of this store")
    }

    /// Logs and publishes one message per prefix, in order; answers the last seq and the epoch.
    fn publish_messages(&mut self, room: &str, prefixes: Vec<String>) -> (u64, String) {
        if !self.rooms.contains_key(room) {
            self.epochs += 1;
        }
        let n = self.epochs;
        let r = self.rooms.entry(room.to_string()).or_insert_with(|| RoomLog {
            epoch: format!("e{n}"),
            seq: 0,
            log: Vec::new(),
        });
        let mut frames = Vec::new();
        for prefix in prefixes {
            r.seq += 1;
            let frame = complete_message(&prefix, r.seq, &r.epoch);
            r.log.push((r.seq, frame.clone()));
            frames.push(frame);
        }
        let at = (r.seq, r.epoch.clone());
        for f in frames {
            self.publish(room, &f);
        }
        at
    }

    fn publish(&self, room: &str, frame: &str) {
        let frame = Utf8Bytes::from(frame.to_string());
        for n in self.nodes.iter().filter(|n| n.connected && n.rooms.contains(room)) {
            n.inbound.deliver(room, &frame);
        }
    }
}

fn scope_room(scope: Scope<'_>) -> Option<String> {
    match scope {
        Scope::Room(r) => Some(r.to_string()),
        Scope::Online => None,
    }
}

impl Store {
    /// A store whose instances die after `ttl` without a heartbeat.
    pub fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(Self { ttl, state: Mutex::new(State::default()) })
    }

    /// A store that also decides webhook events, with `grace` on its clock.
    pub fn with_webhooks(ttl: Duration, grace: Duration) -> Arc<Self> {
        let state = State { decider: Some(Decider::new(grace)), ..State::default() };
        Arc::new(Self { ttl, state: Mutex::new(state) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// A node named `name` on this store, with its own hub.
    pub fn add_node(self: &Arc<Self>, name: &str) -> TestNode {
        self.add_node_on(name, Arc::new(Hub::new(64)), Metrics::new())
    }

    /// A node named `name` on this store, delivering into `hub`.
    pub fn add_node_on(self: &Arc<Self>, name: &str, hub: Arc<Hub>, metrics: Metrics) -> TestNode {
        let inbound = Arc::new(HubInbound::new(Arc::clone(&hub), metrics.clone()));
        let instance = tether_proto::backbone::instance_id(name);
        self.lock().nodes.push(Subscriber {
            instance: instance.clone(),
            inbound: Arc::clone(&inbound) as Arc<dyn Inbound>,
            rooms: HashSet::new(),
            connected: true,
        });
        let backbone = Arc::new(MemoryBackbone {
            store: Arc::clone(self),
            instance,
            server: name.to_string(),
            decided: Mutex::new(Vec::new()),
        });
        TestNode { hub, metrics, inbound, backbone }
    }

    /// The node registry, by name: each record with its count of announcements.
    pub fn registry(&self) -> Vec<(NodeRecord, u64)> {
        self.lock().registry.values().cloned().collect()
    }

    pub fn advance(&self, by: Duration) {
        self.lock().clock += by;
    }

    /// Loses everything, as a Redis restarted without persistence does.
    pub fn forget(&self) {
        let mut s = self.lock();
        s.rooms.clear();
        s.presence.clear();
        s.instances.clear();
        s.sessions.clear();
    }

    /// Loses one room's log and counter: it starts again under a new epoch.
    pub fn forget_room(&self, room: &str) {
        self.lock().rooms.remove(room);
    }

    /// Gives `room` a new epoch, keeping its counter and log (what a Redis Cluster backbone
    /// does when another master answers for the room: seqs go on, the old frames stay).
    pub fn new_epoch_keeping_log(&self, room: &str) {
        let mut s = self.lock();
        s.epochs += 1;
        let n = s.epochs;
        if let Some(r) = s.rooms.get_mut(room) {
            r.epoch = format!("e{n}");
        }
    }

    /// Trims `room`'s log to the entries after `seq`.
    pub fn trim(&self, room: &str, seq: u64) {
        if let Some(r) = self.lock().rooms.get_mut(room) {
            r.log.retain(|(s, _)| *s > seq);
        }
    }
}

/// One node of a test: its hub and its backbone on the shared store.
pub struct TestNode {
    pub hub: Arc<Hub>,
    pub metrics: Metrics,
    pub inbound: Arc<HubInbound>,
    pub backbone: Arc<MemoryBackbone>,
}

impl TestNode {
    /// Connection `conn` of client `id` joins `room` as a session does (hub, subscription,
    /// presence online and in the room); returns its outbox, with nothing waiting.
    pub async fn join(&self, conn: u64, id: &str, room: &str) -> Arc<Outbox> {
        let out = Outbox::new(None, Limits::generous());
        self.hub.register(conn, Arc::from(id), None);
        self.hub.add(room, conn, Member { out: Arc::clone(&out), kick: CancellationToken::new() }, Gate::open());
        self.backbone.subscribe(room).await.unwrap();
        let entry = PresenceEntry { id: id.into(), user: id.into(), server: self.backbone.server.clone() };
        self.backbone.presence_add(Seat::online(conn), &entry, None).await.unwrap();
        let joined = Event::UserJoined { room, user: id, id, server: &entry.server }.to_json();
        self.backbone.presence_add(Seat::room(room, conn), &entry, Some(joined)).await.unwrap();
        out.take_all();
        out
    }

    /// Publishes one message per text, as a session does.
    pub async fn say(&self, room: &str, texts: &[&str]) {
        let prefixes = texts
            .iter()
            .map(|text| {
                let server = &self.backbone.server;
                MessageHead {
                    kind: "message",
                    room,
                    from: server,
                    id: server,
                    text,
                    server,
                    timestamp: 0,
                    data: None,
                    msg_id: None,
                }
                .json_prefix()
            })
            .collect();
        self.backbone.publish_messages(room, prefixes).await.unwrap();
    }

    /// The backbone's name for this node, its instance id and the store's presence ttl: what
    /// a keeper of this node is built from.
    pub fn identity(&self) -> (String, String, Duration) {
        (self.backbone.server.clone(), self.backbone.instance.clone(), self.backbone.store.ttl)
    }

    /// Cuts this node's subscription off (`false`) or gives it back (`true`).
    pub fn connect(&self, up: bool) {
        self.backbone.store.lock().node(&self.backbone.instance).connected = up;
    }
}

/// The JSON texts waiting in `out`, taken as its writer would.
pub fn taken(out: &Outbox) -> Vec<serde_json::Value> {
    out.take_all().iter().map(|f| serde_json::from_slice(frame_payload(f)).unwrap()).collect()
}

pub struct MemoryBackbone {
    store: Arc<Store>,
    instance: String,
    server: String,
    /// The webhook events this node decided or claimed, in order.
    decided: Mutex<Vec<Decided>>,
}

impl MemoryBackbone {
    /// The store this node shares with the others.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Takes the webhook events this node decided or claimed so far.
    pub fn take_decided(&self) -> Vec<Decided> {
        std::mem::take(&mut *self.decided.lock().unwrap())
    }

    fn keep(&self, decided: Vec<Decided>) {
        self.decided.lock().unwrap().extend(decided);
    }

    fn connected(&self, s: &mut State) -> Result<(), BackboneError> {
        if s.node(&self.instance).connected {
            Ok(())
        } else {
            Err(BackboneError::NotConnected)
        }
    }
}

impl Backbone for MemoryBackbone {
    fn publish_messages<'a>(&'a self, room: &'a str, prefixes: Vec<String>) -> BoxFuture<'a, Result<(), Unpublished>> {
        self.store.lock().publish_messages(room, prefixes);
        ready(Ok(())).boxed()
    }

    fn publish_one<'a>(&'a self, room: &'a str, prefix: String, key: Option<&'a str>) -> Call<'a, Published> {
        let mut s = self.store.lock();
        let key = key.map(|k| (room.to_string(), k.to_string()));
        if let Some((seq, epoch)) = key.as_ref().and_then(|k| s.dedup.get(k)).cloned() {
            return ready(Ok(Published { seq, epoch, duplicate: true })).boxed();
        }
        let (seq, epoch) = s.publish_messages(room, vec![prefix]);
        if let Some(key) = key {
            s.dedup.insert(key, (seq, epoch.clone()));
        }
        ready(Ok(Published { seq, epoch, duplicate: false })).boxed()
    }

    fn publish_event<'a>(&'a self, room: &'a str, json: String) -> Call<'a, ()> {
        self.store.lock().publish(room, &json);
        ready(Ok(())).boxed()
    }

    fn subscribe<'a>(&'a self, room: &'a str) -> Call<'a, ()> {
        let mut s = self.store.lock();
        let r = self.connected(&mut s).map(|()| {
            s.node(&self.instance).rooms.insert(room.to_string());
        });
        ready(r).boxed()
    }

    fn release<'a>(&'a self, room: &'a str) -> BoxFuture<'a, ()> {
        let mut s = self.store.lock();
        let node = s.node(&self.instance);
        if !node.inbound.wants(room) {
            node.rooms.remove(room);
        }
        ready(()).boxed()
    }

    fn load_session<'a>(&'a self, id: &'a str) -> Call<'a, Option<SessionRecord>> {
        ready(Ok(self.store.lock().sessions.get(id).cloned())).boxed()
    }

    fn save_session<'a>(&'a self, id: &'a str, session: &'a SessionRecord) -> Call<'a, ()> {
        self.store.lock().sessions.insert(id.to_string(), session.clone());
        ready(Ok(())).boxed()
    }

    fn forget_session<'a>(&'a self, id: &'a str) -> Call<'a, ()> {
        self.store.lock().sessions.remove(id);
        ready(Ok(())).boxed()
    }

    /// Every connected node of the store gets it, as every subscriber of the channel would.
    fn control(&self, command: String) -> Call<'_, ()> {
        let mut s = self.store.lock();
        let r = self.connected(&mut s).map(|()| {
            for n in s.nodes.iter().filter(|n| n.connected) {
                n.inbound.control(&command);
            }
        });
        ready(r).boxed()
    }

    fn replay<'a>(&'a self, room: &'a str, after: u64) -> Call<'a, Replay> {
        let s = self.store.lock();
        let replay = s.rooms.get(room).map_or_else(Replay::default, |r| Replay {
            epoch: Some(r.epoch.clone()),
            head_seq: r.seq,
            frames: r.log.iter().filter(|(seq, _)| *seq > after).cloned().collect(),
        });
        ready(Ok(replay)).boxed()
    }

    fn presence_add<'a>(&'a self, at: Seat<'a>, entry: &'a PresenceEntry, event: Option<String>) -> Call<'a, Joined> {
        let Seat { scope, conn } = at;
        let mut s = self.store.lock();
        let room = scope_room(scope);
        let event = event.map(|e| match room.as_deref().and_then(|r| s.rooms.get(r)) {
            Some(r) => complete_joined(&e, r.seq, Some(&r.epoch)),
            None => complete_joined(&e, 0, None),
        });
        let entries = s.presence.entry(room.clone()).or_default();
        let change = if entries.insert(conn_field(&self.instance, conn), entry.clone()).is_some() {
            PresenceChange::Unchanged
        } else if entries.values().filter(|e| e.id == entry.id).count() == 1 {
            PresenceChange::FirstOrLast
        } else {
            PresenceChange::Shared
        };
        let first_of_room = entries.values().all(|e| e.id == entry.id);
        if let (PresenceChange::FirstOrLast, Some(d)) = (change, s.decider.as_mut()) {
            self.keep(d.added(scope, entry, true, first_of_room));
        }
        if let (PresenceChange::FirstOrLast, Some(e), Some(r)) = (change, &event, &room) {
            s.publish(r, e);
        }
        ready(Ok((change, event))).boxed()
    }

    fn presence_rename<'a>(&'a self, at: Seat<'a>, entry: &'a PresenceEntry) -> Call<'a, ()> {
        let Seat { scope, conn } = at;
        let mut s = self.store.lock();
        if let Some(e) =
            s.presence.get_mut(&scope_room(scope)).and_then(|m| m.get_mut(&conn_field(&self.instance, conn)))
        {
            *e = entry.clone();
        }
        ready(Ok(())).boxed()
    }

    fn presence_remove<'a>(&'a self, at: Seat<'a>, id: &'a str, event: Option<String>) -> Call<'a, PresenceChange> {
        let Seat { scope, conn } = at;
        let mut s = self.store.lock();
        let room = scope_room(scope);
        let now = s.clock;
        let state = &mut *s;
        let entries = state.presence.entry(room.clone()).or_default();
        let change = match entries.remove(&conn_field(&self.instance, conn)) {
            None => PresenceChange::Unchanged,
            Some(_) if entries.values().any(|e| e.id == id) => PresenceChange::Shared,
            Some(gone) => {
                if let Some(d) = state.decider.as_mut() {
                    let reason = leave_reason(event.as_deref());
                    self.keep(d.removed(now, scope, &gone, &reason, true, entries.is_empty()));
                }
                PresenceChange::FirstOrLast
            }
        };
        if let (PresenceChange::FirstOrLast, Some(e), Some(r)) = (change, &event, &room) {
            s.publish(r, e);
        }
        ready(Ok(change)).boxed()
    }

    fn presence_list<'a>(&'a self, scope: Scope<'a>) -> Call<'a, Vec<PresenceEntry>> {
        let s = self.store.lock();
        let list = s.presence.get(&scope_room(scope)).map(|m| m.values().cloned().collect()).unwrap_or_default();
        ready(Ok(list)).boxed()
    }

    fn is_ready(&self) -> bool {
        self.store.lock().node(&self.instance).connected
    }

    fn heartbeat(&self) -> Call<'_, bool> {
        let mut s = self.store.lock();
        let now = s.clock;
        ready(Ok(s.instances.insert(self.instance.clone(), now).is_none())).boxed()
    }

    fn reap(&self) -> Call<'_, Reaped> {
        let mut s = self.store.lock();
        let now = s.clock;
        let ttl = self.store.ttl;
        let dead: Vec<String> =
            s.instances.iter().filter(|(_, beat)| now - **beat > ttl).map(|(i, _)| i.clone()).collect();
        let mut announced = Vec::new();
        let state = &mut *s;
        let decider = &mut state.decider;
        for inst in &dead {
            state.instances.remove(inst);
            let head = format!("{inst}/");
            for (room, entries) in state.presence.iter_mut() {
                let gone: Vec<String> = entries.keys().filter(|f| f.starts_with(&head)).cloned().collect();
                for field in gone {
                    let e = entries.remove(&field).expect("listed just now");
                    let last = !entries.values().any(|o| o.id == e.id);
                    if let (true, Some(d)) = (last, decider.as_mut()) {
                        let scope = room.as_deref().map_or(Scope::Online, Scope::Room);
                        self.keep(d.removed(now, scope, &e, "node_down", true, entries.is_empty()));
                    }
                    if let Some(room) = room.as_deref().filter(|_| last) {
                        let reason = LeaveReason::NodeDown;
                        let left = Event::UserLeft { room, user: &e.user, id: &e.id, server: &e.server, reason };
                        announced.push((room.to_string(), left.to_json()));
                    }
                }
            }
        }
        for (room, event) in &announced {
            s.publish(room, event);
        }
        ready(Ok(Reaped { instances: dead.len() as u64, announced: announced.len() as u64 })).boxed()
    }

    fn claim_webhooks(&self) -> Call<'_, usize> {
        let mut s = self.store.lock();
        let now = s.clock;
        let claimed = s.decider.as_mut().map(|d| d.claim_due(now)).unwrap_or_default();
        let n = claimed.len();
        self.keep(claimed);
        ready(Ok(n)).boxed()
    }

    fn deregister(&self) -> BoxFuture<'_, ()> {
        self.store.lock().instances.remove(&self.instance);
        ready(()).boxed()
    }

    fn announce<'a>(&'a self, record: &'a NodeRecord) -> Call<'a, ()> {
        let mut s = self.store.lock();
        let entry = s.registry.entry(record.name.clone()).or_insert_with(|| (record.clone(), 0));
        *entry = (record.clone(), entry.1 + 1);
        ready(Ok(())).boxed()
    }

    fn withdraw<'a>(&'a self, record: &'a NodeRecord) -> Call<'a, ()> {
        let mut s = self.store.lock();
        if s.registry.get(&record.name).is_some_and(|(r, _)| r.instance == record.instance) {
            s.registry.remove(&record.name);
        }
        ready(Ok(())).boxed()
    }
}
