//! The node's local view of rooms: which of *this node's* connections are in which room, and
//! the fan-out of one backbone frame to them.
//!
//! A frame arrives once from the backbone (already encoded JSON, shared as `Utf8Bytes`), is
//! framed as a WebSocket text frame once, and the same bytes go to each local member's
//! [`Outbox`], which its connection's task writes out.
//! Fan-out never waits on a client. A member the outbox refuses is a slow consumer: its `kick`
//! token is cancelled and its connection task closes it with 1008.
//!
//! Each membership also has a [`Gate`]: normally open, it remembers the last message seq it
//! let through (so a replay and live traffic never deliver the same seq twice); while a resume
//! is being prepared it *holds* the room's live frames, which the resume then releases after
//! the replay, in seq order.

use bytes::Bytes;
use dashmap::DashMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tether_proto::wire::MessageMeta;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::outbox::{text_frame, Outbox, Pushed};

/// The handle a room keeps for one local member.
#[derive(Debug, Clone)]
pub struct Member {
    /// The member's way out: complete WebSocket frames, shared with every other recipient.
    pub out: Arc<Outbox>,
    /// Cancelled when the member cannot keep up; its connection task closes it. (A
    /// connection's token is a child of the node's shutdown token, so a shutdown cancels it
    /// too; the connection tells the two apart by the shutdown token.)
    pub kick: CancellationToken,
}

impl Member {
    /// Sends (or queues) a WebSocket frame; a client that cannot keep up becomes a slow
    /// consumer, closed with 1008 — fan-out never waits and never buffers without bound.
    pub fn offer(&self, frame: Bytes, metrics: &Metrics) -> bool {
        match self.out.push(frame) {
            Pushed::Queued => true,
            Pushed::Full => {
                self.slow(metrics);
                false
            }
            // The connection is on its way out; its cleanup removes it from rooms.
            Pushed::Closed => false,
        }
    }

    /// [`Member::offer`] for a JSON text not yet framed.
    pub fn offer_text(&self, json: &str, metrics: &Metrics) -> bool {
        self.offer(text_frame(json.as_bytes()), metrics)
    }

    fn slow(&self, metrics: &Metrics) {
        if !self.kick.is_cancelled() {
            metrics.slow_consumers.inc();
            self.kick.cancel();
        }
    }
}

/// One membership's delivery state; see the module docs.
#[derive(Debug, Default)]
pub struct Gate(Mutex<GateState>);

#[derive(Debug, Default)]
pub struct GateState {
    /// `Some` while holding: live frames wait here for the resume in progress.
    pub held: Option<Vec<Utf8Bytes>>,
    /// Last message seq let through, within `epoch`.
    pub last_seq: u64,
    /// First seq of the unbroken run `first_seq..=last_seq` this connection has been sent
    /// (live, in order, or by a resume), within `epoch`.
    pub first_seq: Option<u64>,
    pub epoch: Option<String>,
}

impl GateState {
    /// Whether a live message is not newer than the last one let through (sending it would
    /// repeat it or break seq order).
    pub fn already_sent(&self, meta: &MessageMeta<'_>) -> bool {
        self.epoch.as_deref() == Some(meta.epoch) && meta.seq <= self.last_seq
    }

    pub fn note_sent(&mut self, meta: &MessageMeta<'_>) {
        if self.epoch.as_deref() != Some(meta.epoch) {
            self.epoch = Some(meta.epoch.to_string());
            self.first_seq = None;
        }
        self.first_seq.get_or_insert(meta.seq);
        self.last_seq = meta.seq;
    }

    /// Whether a replay of `seq` in `epoch` would repeat what this connection was already sent.
    pub fn covers(&self, epoch: &str, seq: u64) -> bool {
        self.epoch.as_deref() == Some(epoch) && self.first_seq.is_some_and(|f| f <= seq) && seq <= self.last_seq
    }

    /// After a resume: the connection holds everything in `from..=to` of `epoch`.
    pub fn note_replayed(&mut self, epoch: &str, from: u64, to: u64) {
        if self.epoch.as_deref() != Some(epoch) {
            self.epoch = Some(epoch.to_string());
            self.first_seq = None;
            self.last_seq = 0;
        }
        self.first_seq = Some(self.first_seq.map_or(from, |f| f.min(from)));
        self.last_seq = self.last_seq.max(to);
    }
}

impl Gate {
    /// A gate that starts out holding (for rooms restored from a session).
    pub fn holding() -> Arc<Self> {
        Arc::new(Self(Mutex::new(GateState { held: Some(Vec::new()), ..Default::default() })))
    }

    pub fn open() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn lock(&self) -> MutexGuard<'_, GateState> {
        // A panic while holding this lock would be a bug in this module; the state stays
        // usable (it is plain data), so poisoning is ignored.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts holding live frames, unless already holding.
    pub fn hold(&self) {
        let mut g = self.lock();
        if g.held.is_none() {
            g.held = Some(Vec::new());
        }
    }

    /// Lets one frame through (or holds it), dropping a message already delivered. `wire` is
    /// the frame as a WebSocket frame, made by the first member that needs it and shared by all.
    fn pass(
        &self,
        member: &Member,
        frame: &Utf8Bytes,
        wire: &mut Option<Bytes>,
        meta: Option<MessageMeta<'_>>,
        hold_cap: usize,
        metrics: &Metrics,
    ) -> bool {
        let mut g = self.lock();
        if let Some(held) = g.held.as_mut() {
            if held.len() >= hold_cap {
                member.slow(metrics);
                return false;
            }
            held.push(frame.clone());
            return true;
        }
        if let Some(meta) = meta {
            if g.already_sent(&meta) {
                metrics.duplicates_suppressed.inc();
                return false;
            }
            g.note_sent(&meta);
        }
        let wire = wire.get_or_insert_with(|| text_frame(frame.as_bytes()));
        member.offer(wire.clone(), metrics)
    }
}

/// One room's local members, and the last message this node delivered in it (where a
/// catch-up from the room's log starts after the backbone was away).
#[derive(Debug, Default)]
struct Room {
    members: HashMap<u64, (Member, Arc<Gate>)>,
    last: Option<(String, u64)>,
}

/// Who an open connection is.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub id: Arc<str>,
    /// Display name, or the id when none was set.
    pub user: String,
    /// The way into the connection's task, for what the server API asks of it (see
    /// [`ConnCommand`]); `None` for a connection that takes no commands (state-machine tests).
    pub commands: Option<mpsc::Sender<ConnCommand>>,
}

/// What the server API (through the backbone's control channel) asks of one connection; its
/// task acts on it between frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnCommand {
    /// Close the connection with this close code and reason.
    Close { code: u16, reason: String },
    /// Leave `room` (members hear `user_left` with reason `removed`); stay connected.
    Unsubscribe { room: String },
}

/// Commands one connection may have waiting: the API sends a handful at most, and a task
/// that does not take them is closing anyway.
pub const CONN_COMMANDS: usize = 16;

/// Local members of every room that has any on this node.
#[derive(Debug, Default)]
pub struct Hub {
    rooms: DashMap<String, Room>,
    /// Id and display name of every open connection (session refresh, presence).
    clients: DashMap<u64, ClientInfo>,
    next_conn: AtomicU64,
    /// Most frames a holding gate keeps before its member counts as a slow consumer.
    hold_cap: usize,
}

impl Hub {
    /// A hub whose holding gates keep at most `hold_cap` frames.
    pub fn new(hold_cap: usize) -> Self {
        Self { hold_cap, ..Self::default() }
    }

    pub fn register(&self, conn: u64, id: Arc<str>, commands: Option<mpsc::Sender<ConnCommand>>) {
        let user = id.to_string();
        self.clients.insert(conn, ClientInfo { id, user, commands });
    }

    /// Hands `command` to every local connection of client `id`; returns how many took it
    /// (one whose command queue is full, or closed, is skipped and logged).
    pub fn command(&self, id: &str, command: &ConnCommand) -> usize {
        let targets: Vec<(u64, mpsc::Sender<ConnCommand>)> = self
            .clients
            .iter()
            .filter(|e| &*e.value().id == id)
            .filter_map(|e| e.value().commands.clone().map(|tx| (*e.key(), tx)))
            .collect();
        let mut taken = 0;
        for (conn, tx) in targets {
            match tx.try_send(command.clone()) {
                Ok(()) => taken += 1,
                Err(e) => tracing::debug!(id, conn, error = %e, "connection did not take a command"),
            }
        }
        taken
    }

    /// Records a connection's display name (for presence re-registration).
    pub fn set_user(&self, conn: u64, user: &str) {
        if let Some(mut c) = self.clients.get_mut(&conn) {
            c.user = user.to_string();
        }
    }

    /// Every presence entry this node should have in the backbone: one per connection for
    /// `online` (room `None`) and one per connection and room.
    pub fn presence_snapshot(&self) -> Vec<(Option<String>, u64, ClientInfo)> {
        let mut out: Vec<(Option<String>, u64, ClientInfo)> =
            self.clients.iter().map(|e| (None, *e.key(), e.value().clone())).collect();
        for room in self.rooms.iter() {
            for conn in room.value().members.keys() {
                if let Some(info) = self.clients.get(conn) {
                    out.push((Some(room.key().clone()), *conn, info.clone()));
                }
            }
        }
        out
    }

    pub fn unregister(&self, conn: u64) {
        self.clients.remove(&conn);
    }

    /// Ids of every open connection (an id connected twice appears twice).
    pub fn client_ids(&self) -> Vec<Arc<str>> {
        self.clients.iter().map(|e| Arc::clone(&e.value().id)).collect()
    }

    /// A node-unique connection number.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a member; returns true if it is the room's first local member.
    pub fn add(&self, room: &str, conn: u64, member: Member, gate: Arc<Gate>) -> bool {
        let mut entry = self.rooms.entry(room.to_string()).or_default();
        let first = entry.members.is_empty();
        entry.members.insert(conn, (member, gate));
        first
    }

    /// Removes a member; returns true if the room has no local member left.
    pub fn remove(&self, room: &str, conn: u64) -> bool {
        // `remove_if` drops the room entry in the same shard lock that saw it empty, so a
        // concurrent `add` either lands before (and keeps the room) or creates a fresh entry.
        let mut now_empty = false;
        if let Some(mut r) = self.rooms.get_mut(room) {
            r.members.remove(&conn);
            now_empty = r.members.is_empty();
        }
        if now_empty {
            self.rooms.remove_if(room, |_, r| r.members.is_empty());
        }
        now_empty
    }

    /// Whether any local connection is in `room`.
    pub fn has_members(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(|r| !r.members.is_empty())
    }

    /// Rooms with at least one local member.
    pub fn rooms(&self) -> Vec<String> {
        self.rooms.iter().filter(|e| !e.value().members.is_empty()).map(|e| e.key().clone()).collect()
    }

    /// Every room with local members and the (epoch, seq) of the last message delivered in it.
    pub fn positions(&self) -> Vec<(String, Option<(String, u64)>)> {
        self.rooms
            .iter()
            .filter(|e| !e.value().members.is_empty())
            .map(|e| (e.key().clone(), e.value().last.clone()))
            .collect()
    }

    /// The (epoch, seq) of the last message delivered in `room`, if any.
    pub fn position(&self, room: &str) -> Option<(String, u64)> {
        self.rooms.get(room).and_then(|e| e.value().last.clone())
    }

    /// Offers `frame` to every local member of `room`; returns how many accepted it.
    pub fn deliver(&self, room: &str, frame: &Utf8Bytes, metrics: &Metrics) -> usize {
        let meta = MessageMeta::read(frame.as_str());
        let Some(mut r) = self.rooms.get_mut(room) else {
            return 0;
        };
        if let Some(m) = meta {
            match &mut r.last {
                Some((epoch, seq)) if epoch == m.epoch => *seq = (*seq).max(m.seq),
                last => *last = Some((m.epoch.to_string(), m.seq)),
            }
        }
        let mut wire = None;
        let delivered = r
            .members
            .values()
            .filter(|(member, gate)| gate.pass(member, frame, &mut wire, meta, self.hold_cap, metrics))
            .count();
        metrics.frames_delivered.inc_by(delivered as u64);
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{frame_payload, Limits};

    /// A member whose queue has no socket behind it: every frame waits, for the test to see.
    fn member(max_frames: usize) -> (Member, Arc<Outbox>) {
        let limits = Arc::new(Limits { max_frames, ..(*Limits::generous()).clone() });
        let out = Outbox::new(None, limits);
        (Member { out: Arc::clone(&out), kick: CancellationToken::new() }, out)
    }

    /// The payloads waiting in `out`, taken as the writer would.
    fn taken(out: &Outbox) -> Vec<String> {
        out.take_all().iter().map(|f| String::from_utf8_lossy(frame_payload(f)).into_owned()).collect()
    }

    #[test]
    fn first_and_last_member_are_reported() {
        let hub = Hub::new(8);
        let (a, _ra) = member(4);
        let (b, _rb) = member(4);
        assert!(hub.add("r", 1, a, Gate::open()));
        assert!(!hub.add("r", 2, b, Gate::open()));
        assert!(!hub.remove("r", 1));
        assert!(hub.has_members("r"));
        assert!(hub.remove("r", 2));
        assert!(!hub.has_members("r"));
        assert!(hub.rooms().is_empty());
    }

    #[test]
    fn a_full_queue_kicks_only_that_member() {
        let hub = Hub::new(8);
        let metrics = Metrics::new();
        let (slow, _rs) = member(1);
        let (fast, rf) = member(8);
        hub.add("r", 1, slow.clone(), Gate::open());
        hub.add("r", 2, fast.clone(), Gate::open());
        let frame = Utf8Bytes::from_static("{}");
        assert_eq!(hub.deliver("r", &frame, &metrics), 2);
        assert_eq!(hub.deliver("r", &frame, &metrics), 1);
        assert!(slow.kick.is_cancelled());
        assert!(!fast.kick.is_cancelled());
        assert_eq!(taken(&rf), ["{}", "{}"], "framed once, as text frames");
    }

    fn msg(seq: u64, epoch: &str) -> Utf8Bytes {
        Utf8Bytes::from(format!(
            r#"{{"type":"message","room":"r","from":"a","id":"a","text":"\",\"seq\":99","server":"n","timestamp":1,"seq":{seq},"epoch":"{epoch}"}}"#
        ))
    }

    #[test]
    fn frame_meta_reads_seq_and_epoch_even_with_tricky_text() {
        let f = msg(42, "e1");
        assert_eq!(MessageMeta::read(f.as_str()), Some(MessageMeta { seq: 42, epoch: "e1" }));
        assert_eq!(MessageMeta::read(r#"{"type":"user_joined","room":"r"}"#), None);
    }

    #[test]
    fn a_gate_drops_seqs_already_sent_and_holds_while_resuming() {
        let hub = Hub::new(8);
        let metrics = Metrics::new();
        let (m, rx) = member(16);
        let gate = Gate::open();
        hub.add("r", 1, m, Arc::clone(&gate));
        hub.deliver("r", &msg(1, "e"), &metrics);
        hub.deliver("r", &msg(1, "e"), &metrics);
        assert_eq!(taken(&rx).len(), 1, "seq 1 twice is delivered once");
        gate.hold();
        hub.deliver("r", &msg(2, "e"), &metrics);
        assert!(taken(&rx).is_empty(), "held");
        assert_eq!(gate.lock().held.as_ref().map(Vec::len), Some(1));
        // A new epoch starts again at 1 and is not mistaken for a duplicate.
        gate.lock().held = None;
        hub.deliver("r", &msg(1, "e2"), &metrics);
        assert_eq!(taken(&rx), [msg(1, "e2").as_str()]);
    }

    #[test]
    fn a_holding_gate_that_overflows_kicks_its_member() {
        let hub = Hub::new(2);
        let metrics = Metrics::new();
        let (m, _rx) = member(16);
        hub.add("r", 1, m.clone(), Gate::holding());
        for seq in 1..=3 {
            hub.deliver("r", &msg(seq, "e"), &metrics);
        }
        assert!(m.kick.is_cancelled());
    }

    #[test]
    fn a_queue_over_its_byte_budget_kicks_its_member() {
        let metrics = Metrics::new();
        let limits = Arc::new(Limits { max_bytes: 10, low_water: 10, ..(*Limits::generous()).clone() });
        let m = Member { out: Outbox::new(None, limits), kick: CancellationToken::new() };
        assert!(m.offer_text("123456", &metrics));
        assert!(!m.offer_text("123456", &metrics));
        assert!(m.kick.is_cancelled());
        assert_eq!(m.out.queued_bytes(), 8, "one framed text");
    }
}
