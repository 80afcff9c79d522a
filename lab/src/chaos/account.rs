//! What a chaos run observed, and the arithmetic that turns it into lost / duplicated.
//!
//! Three records feed the verdict:
//! - the [`Sightings`], shared by every client's event task: each message anyone was handed,
//!   by room and `(epoch, seq)` — a message exists iff it got a seq;
//! - one [`ClientLog`] per client, kept by its event task alone: where each of its rooms
//!   stood at its own join (`user_joined`'s `head_seq`/`epoch`), every `(epoch, seq)` its app
//!   was handed, and a timeline of connection events for the post-mortem of a loss;
//! - the publisher's [`SendLog`]: every text written (with its `msg_id`), every send refused.
//!
//! [`account`] then says, for every (client, room), which published seqs the client was owed
//! (everything after its join position) and which of those it never got, and for every
//! message the library accepted whether it was published exactly once (what became of the
//! messages in flight at each kill is `in_flight`'s).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tether_client::{Event, Message as RoomMessage, Session, UPGRADE_REFUSED};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Timeline entries kept per client; connection events only, so this is generous.
const TIMELINE_MAX: usize = 10_000;

/// One message as first seen by any client.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) text: String,
    /// Client id of the sender.
    pub(crate) sender: String,
    /// The sender's node.
    pub(crate) server: String,
    /// The node's stamp, ms since the Unix epoch.
    pub(crate) timestamp: u64,
    /// When a client first received it, ms since the run's origin.
    pub(crate) first_seen_ms: u64,
}

/// Everything seen of one room (one entry of [`Sightings`]).
#[derive(Debug, Default)]
pub(crate) struct RoomSightings {
    /// Epochs in the order they were first seen (join positions included). Epochs cannot
    /// be compared; this order is how "after the join" is decided across an epoch change.
    pub(crate) epochs: Vec<String>,
    pub(crate) msgs: HashMap<(String, u64), Seen>,
    /// Highest seq seen per epoch (progress line, drain).
    pub(crate) max_seq: HashMap<String, u64>,
    /// The same `(epoch, seq)` seen with two different texts: the seq was assigned twice.
    pub(crate) conflicts: u64,
}

impl RoomSightings {
    pub(crate) fn rank(&mut self, epoch: &str) -> usize {
        match self.epochs.iter().position(|e| e == epoch) {
            Some(i) => i,
            None => {
                self.epochs.push(epoch.to_string());
                self.epochs.len() - 1
            }
        }
    }

    /// The latest epoch and its highest seq seen.
    pub(crate) fn head(&self) -> Option<(&str, u64)> {
        let e = self.epochs.last()?;
        Some((e.as_str(), self.max_seq.get(e).copied().unwrap_or(0)))
    }
}

/// Every message any client was handed, by room and the `(epoch, seq)` its node assigned: the
/// chaos run's own record, filled live by the clients' event tasks, and what decides whether a
/// message exists at all (it got a seq). Not `compare`'s [`DeliveryView`]: that one is a
/// read-only view keyed by the sender's own message ids, built after the fact from a send log.
///
/// [`DeliveryView`]: crate::compare::account::DeliveryView
#[derive(Debug, Default)]
pub(crate) struct Sightings {
    pub(crate) rooms: HashMap<String, RoomSightings>,
}

/// State shared by the event tasks, the publisher and the progress line. Counters are
/// plain atomics; the sightings' lock is never held across an `.await`.
#[derive(Debug)]
pub(crate) struct Shared {
    /// t = 0 of every `*_ms` figure: when the clients were started.
    pub(crate) origin: Instant,
    /// The same moment on the wall clock, to place the nodes' message timestamps.
    pub(crate) origin_wall_ms: u64,
    pub(crate) sightings: Mutex<Sightings>,
    pub(crate) published: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) rejected_by_node: AtomicU64,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
            origin_wall_ms: wall_ms(),
            sightings: Mutex::new(Sightings::default()),
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            rejected_by_node: AtomicU64::new(0),
        }
    }

    pub(crate) fn ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn sightings(&self) -> std::sync::MutexGuard<'_, Sightings> {
        // Poisoned only by a panic mid-insert of plain data: still the best record we have.
        self.sightings.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// Where a room stood when this client's own `user_joined` arrived.
#[derive(Debug, Clone)]
pub(crate) struct JoinPoint {
    /// `None`: the room had no log yet; every epoch seen is after the join.
    pub(crate) epoch: Option<String>,
    /// `None`: the node did not say (an older node); the first delivered message stands in.
    pub(crate) head_seq: Option<u64>,
    pub(crate) at_ms: u64,
}

/// What one client's app saw. Owned by its event task; handed back when the stream ends.
#[derive(Debug, Default)]
pub(crate) struct ClientLog {
    pub(crate) id: String,
    pub(crate) rooms: Vec<String>,
    pub(crate) joins: HashMap<String, JoinPoint>,
    /// Every `(epoch, seq)` handed to the app, per room.
    pub(crate) delivered: HashMap<String, HashSet<(String, u64)>>,
    /// The first delivered per room (stands in for a join point the node did not report).
    first: HashMap<String, (String, u64)>,
    /// The last delivered per room, to check the order the app sees.
    last: HashMap<String, (String, u64)>,
    /// Texts of this client's own messages that came back to it.
    pub(crate) echoes: HashSet<String>,
    pub(crate) app_duplicates: u64,
    pub(crate) app_out_of_order: u64,
    pub(crate) gaps: u64,
    pub(crate) gap_messages: u64,
    pub(crate) incomplete_resumes: u64,
    pub(crate) epoch_changes: u64,
    pub(crate) restored: u64,
    pub(crate) new_sessions_on_reconnect: u64,
    /// Loss → `connected` (restored sessions), µs.
    pub(crate) restore_us: Vec<u64>,
    /// Loss → back in sync (every room re-joined and replayed), µs.
    pub(crate) ready_us: Vec<u64>,
    pub(crate) rejected_by_node: u64,
    pub(crate) errors: BTreeMap<String, u64>,
    /// The node of the current (or last) connection.
    pub(crate) server: Option<String>,
    /// Each connection loss with messages unconfirmed at that moment.
    pub(crate) in_flight: Vec<LossInFlight>,
    /// `(ms, what)`: connects, losses, resumes, gaps, errors.
    pub(crate) timeline: Vec<(u64, String)>,
}

impl ClientLog {
    pub(crate) fn new(id: String, rooms: Vec<String>) -> Self {
        Self { id, rooms, ..Self::default() }
    }

    pub(crate) fn note(&mut self, ms: u64, what: String) {
        if self.timeline.len() < TIMELINE_MAX {
            self.timeline.push((ms, what));
        }
    }

    /// A room message handed to the app (the client library's `Event::Message`, or a naive
    /// client's decoded frame): into the shared [`Sightings`] and this client's deliveries,
    /// counting a second delivery of an `(epoch, seq)` and a seq at or below the last one.
    pub(crate) fn record_message(&mut self, shared: &Shared, ms: u64, m: RoomMessage) {
        shared.delivered.fetch_add(1, Relaxed);
        {
            let mut sightings = shared.sightings();
            let room = sightings.rooms.entry(m.room.clone()).or_default();
            room.rank(&m.epoch);
            let top = room.max_seq.entry(m.epoch.clone()).or_insert(0);
            *top = (*top).max(m.seq);
            match room.msgs.get(&(m.epoch.clone(), m.seq)) {
                Some(seen) => {
                    if seen.text != m.text {
                        room.conflicts += 1;
                    }
                }
                None => {
                    let seen = Seen {
                        text: m.text.clone(),
                        sender: m.id.clone(),
                        server: m.server.clone(),
                        timestamp: m.timestamp,
                        first_seen_ms: ms,
                    };
                    room.msgs.insert((m.epoch.clone(), m.seq), seen);
                    shared.published.fetch_add(1, Relaxed);
                }
            }
        }
        if m.id == self.id {
            self.echoes.insert(m.text.clone());
        }
        let key = (m.epoch.clone(), m.seq);
        if !self.delivered.entry(m.room.clone()).or_default().insert(key.clone()) {
            self.app_duplicates += 1;
            return; // a second copy is a duplicate, not also an out-of-order delivery
        }
        if let Some((e, s)) = self.last.get(&m.room) {
            if *e == m.epoch && *s >= m.seq {
                self.app_out_of_order += 1;
                return; // the last stays the highest seen
            }
        }
        self.first.entry(m.room.clone()).or_insert_with(|| key.clone());
        self.last.insert(m.room, key);
    }

    /// The client's own `user_joined` for `room`. Only the first is its join point: later ones
    /// are re-joins and restores, which must not excuse what was missed meanwhile.
    pub(crate) fn record_own_join(
        &mut self,
        shared: &Shared,
        ms: u64,
        room: String,
        head_seq: Option<u64>,
        epoch: Option<String>,
    ) {
        if self.joins.contains_key(&room) {
            return;
        }
        if let Some(e) = &epoch {
            shared.sightings().rooms.entry(room.clone()).or_default().rank(e);
        }
        self.note(ms, format!("joined {room} at head {head_seq:?} epoch {epoch:?}"));
        self.joins.insert(room, JoinPoint { epoch, head_seq, at_ms: ms });
    }

    /// The join point of `room`, falling back to "just before the first delivered".
    pub(crate) fn join_point(&self, room: &str) -> Option<(Option<String>, u64)> {
        let j = self.joins.get(room)?;
        match j.head_seq {
            Some(seq) => Some((j.epoch.clone(), seq)),
            None => {
                let (e, s) = self.first.get(room)?;
                Some((Some(e.clone()), s.saturating_sub(1)))
            }
        }
    }
}

/// One connection loss of a client, with what it had sent and not seen confirmed.
#[derive(Debug, Clone)]
pub(crate) struct LossInFlight {
    pub(crate) at_ms: u64,
    /// The node the connection was to.
    pub(crate) server: Option<String>,
    /// `msg_id`s, oldest first.
    pub(crate) msg_ids: Vec<String>,
}

/// Reads one client's events until its stream ends, recording everything in a
/// [`ClientLog`] and the shared [`Sightings`].
pub(crate) async fn watch(
    id: String,
    rooms: Vec<String>,
    mut events: mpsc::Receiver<Event>,
    shared: std::sync::Arc<Shared>,
) -> ClientLog {
    let mut log = ClientLog::new(id, rooms);
    while let Some(ev) = events.recv().await {
        let ms = shared.ms();
        match ev {
            Event::Message(m) => log.record_message(&shared, ms, m),
            Event::UserJoined { room, id, head_seq, epoch, .. } if id == log.id => {
                log.record_own_join(&shared, ms, room, head_seq, epoch);
            }
            Event::Connected { server, session, rooms, attempt, since_disconnect, .. } => {
                log.note(ms, format!("connected to {server}: {session:?} {rooms:?}, attempt {attempt}"));
                log.server = Some(server);
                if let Some(d) = since_disconnect {
                    shared.reconnects.fetch_add(1, Relaxed);
                    match session {
                        Session::Restored => {
                            log.restored += 1;
                            log.restore_us.push(micros(d));
                        }
                        Session::New => log.new_sessions_on_reconnect += 1,
                    }
                }
            }
            Event::Ready { server, since_disconnect } => {
                log.note(ms, format!("in sync on {server}"));
                if let Some(d) = since_disconnect {
                    log.ready_us.push(micros(d));
                }
            }
            Event::Disconnected { code, reason, unconfirmed, .. } => {
                log.note(ms, format!("disconnected: {code:?} {reason}; {} unconfirmed", unconfirmed.len()));
                if !unconfirmed.is_empty() {
                    log.in_flight.push(LossInFlight { at_ms: ms, server: log.server.clone(), msg_ids: unconfirmed });
                }
            }
            Event::Duplicate { room, msg_id, seq, .. } => {
                log.note(ms, format!("resend of {msg_id} to {room} answered duplicate (seq {seq})"));
            }
            Event::ConnectFailed { attempt, error, retry_in } => {
                log.note(ms, format!("attempt {attempt} failed: {error} (retry in {retry_in:?})"));
            }
            Event::Resumed { room, from_seq, to_seq, complete, epoch } => {
                log.note(ms, format!("resumed {room} {from_seq}..={to_seq} epoch {epoch:?} complete {complete}"));
                if !complete {
                    log.incomplete_resumes += 1;
                }
            }
            Event::Gap { room, expected, got } => {
                shared.gaps.fetch_add(1, Relaxed);
                log.note(ms, format!("gap in {room}: expected {expected}, got {got}"));
                log.gaps += 1;
                log.gap_messages += got - expected;
            }
            Event::EpochChanged { room, old, new } => {
                log.note(ms, format!("epoch of {room} changed {old} -> {new}"));
                log.epoch_changes += 1;
            }
            Event::Error { code, message } => {
                log.note(ms, format!("error {code}: {message}"));
                if code == "backbone_unavailable" {
                    log.rejected_by_node += 1;
                    shared.rejected_by_node.fetch_add(1, Relaxed);
                } else if code == UPGRADE_REFUSED {
                    tracing::warn!(client = %log.id, %message, "upgrade refused");
                }
                *log.errors.entry(code).or_default() += 1;
            }
            Event::Closed => break,
            _ => {}
        }
    }
    log
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Everything the publisher did.
#[derive(Debug, Default)]
pub(crate) struct SendLog {
    /// Send slots at the target rate.
    pub(crate) slots: u64,
    /// Slots for which no client was ready.
    pub(crate) no_client_ready: u64,
    /// `send` calls made.
    pub(crate) attempted: u64,
    /// Every send that was written to a socket, by text.
    pub(crate) written: HashMap<String, Sent>,
    /// Texts whose send failed (`NotConnected` and friends), with the error.
    pub(crate) refused: HashMap<String, String>,
}

impl SendLog {
    /// Text by `msg_id`, for the sends written.
    pub(crate) fn texts_by_msg_id(&self) -> HashMap<&str, &str> {
        self.written.iter().map(|(text, s)| (s.msg_id.as_str(), text.as_str())).collect()
    }
}

/// One send written to a socket.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) room: String,
    /// ms since the run's origin.
    pub(crate) at_ms: u64,
    /// The node the sender was in sync with when the send was made.
    pub(crate) node: String,
    /// The `msg_id` the library gave it.
    pub(crate) msg_id: String,
}

/// A send the library accepted whose message nobody ever received: lost, since the library
/// resends what is unconfirmed until it is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnconfirmedSend {
    pub text: String,
    pub room: String,
    /// ms since the run's origin.
    pub at_ms: u64,
    /// The sender's node at that moment.
    pub node: String,
}

/// The room heads Redis holds at the end: `(epoch, seq)`, the authority on what got a seq.
pub(crate) type Heads = HashMap<String, (Option<String>, u64)>;

/// One message a client was owed and never got.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LostMessage {
    pub client: String,
    pub room: String,
    pub epoch: String,
    pub seq: u64,
    /// `None`: Redis assigned the seq but no client ever received it.
    pub text: Option<String>,
    pub sender: Option<String>,
    pub sender_node: Option<String>,
    /// The node's timestamp, ms since the run's origin.
    pub published_ms: Option<i64>,
    /// When the first client received it, ms since the run's origin.
    pub first_received_ms: Option<u64>,
    /// The client's join position in the room.
    pub join: String,
    /// The client's connection events within 5 s of the message.
    pub client_timeline: Vec<String>,
}

/// The outcome of the accounting.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) published: u64,
    pub(crate) assigned_by_redis: u64,
    pub(crate) never_observed: u64,
    pub(crate) seq_conflicts: u64,
    pub(crate) expected: u64,
    pub(crate) delivered: u64,
    pub(crate) lost: u64,
    pub(crate) lost_distinct: u64,
    pub(crate) clients_with_loss: u64,
    pub(crate) lost_examples: Vec<LostMessage>,
    pub(crate) app_duplicates: u64,
    /// Texts that got two seqs (one send published twice).
    pub(crate) republished: u64,
    pub(crate) confirmed: u64,
    pub(crate) unconfirmed: u64,
    pub(crate) unconfirmed_examples: Vec<UnconfirmedSend>,
    pub(crate) refused_but_published: u64,
    pub(crate) foreign_texts: u64,
    pub(crate) joins_missing: u64,
    pub(crate) joins_without_head: u64,
    /// Texts of messages some owed member never got.
    pub(crate) lost_texts: HashSet<String>,
    /// How many seqs each text got.
    pub(crate) seqs_of_text: HashMap<String, u64>,
}

const EXAMPLES_KEPT: usize = 200;

/// The verdict's arithmetic; see `docs/CHAOS.md` for the rules in words.
pub(crate) fn account(
    logs: &[ClientLog],
    sightings: &Sightings,
    heads: Option<&Heads>,
    sends: &SendLog,
    origin_wall_ms: u64,
) -> Tally {
    let mut t = Tally::default();
    // Every published (epoch, seq) per room: what anyone saw, plus every seq Redis says
    // it assigned in the room's current epoch (a seq nobody saw is lost for all its members).
    let mut published: HashMap<&str, Vec<(String, u64)>> = HashMap::new();
    let mut all_rooms: HashSet<&str> = sightings.rooms.keys().map(String::as_str).collect();
    if let Some(h) = heads {
        all_rooms.extend(h.keys().map(String::as_str));
    }
    let empty = RoomSightings::default();
    for room in &all_rooms {
        let rl = sightings.rooms.get(*room).unwrap_or(&empty);
        t.published += rl.msgs.len() as u64;
        t.seq_conflicts += rl.conflicts;
        let mut set: Vec<(String, u64)> = rl.msgs.keys().cloned().collect();
        if let Some((Some(epoch), head)) = heads.and_then(|h| h.get(*room)) {
            t.assigned_by_redis += head;
            for seq in 1..=*head {
                if !rl.msgs.contains_key(&(epoch.clone(), seq)) {
                    t.never_observed += 1;
                    set.push((epoch.clone(), seq));
                }
            }
        }
        set.sort();
        published.insert(room, set);
    }
    // Epoch order per room, with epochs only Redis named appended last.
    let rank = |room: &str, epoch: &str| -> usize {
        let rl = sightings.rooms.get(room).unwrap_or(&empty);
        rl.epochs.iter().position(|e| e == epoch).unwrap_or(usize::MAX)
    };

    let mut lost_keys: HashSet<(&str, String, u64)> = HashSet::new();
    for log in logs {
        t.app_duplicates += log.app_duplicates;
        let mut client_lost = 0;
        for room in &log.rooms {
            let none = HashSet::new();
            let got = log.delivered.get(room).unwrap_or(&none);
            t.delivered += got.len() as u64;
            if log.joins.get(room).is_some_and(|j| j.head_seq.is_none()) {
                t.joins_without_head += 1;
            }
            let Some((join_epoch, join_seq)) = log.join_point(room) else {
                if log.joins.contains_key(room) {
                    continue; // joined, never got a message and no head: nothing to judge against
                }
                t.joins_missing += 1;
                continue;
            };
            let join_rank = join_epoch.as_deref().map(|e| rank(room, e));
            for (epoch, seq) in published.get(room.as_str()).map(Vec::as_slice).unwrap_or(&[]) {
                let owed = match (&join_epoch, join_rank) {
                    (None, _) => true,
                    (Some(e), _) if e == epoch => *seq > join_seq,
                    (Some(_), Some(jr)) => rank(room, epoch) > jr,
                    (Some(_), None) => true,
                };
                if !owed {
                    continue;
                }
                t.expected += 1;
                if got.contains(&(epoch.clone(), *seq)) {
                    continue;
                }
                t.lost += 1;
                client_lost += 1;
                lost_keys.insert((room.as_str(), epoch.clone(), *seq));
                if t.lost_examples.len() < EXAMPLES_KEPT {
                    let seen = sightings.rooms.get(room).and_then(|rl| rl.msgs.get(&(epoch.clone(), *seq)));
                    t.lost_examples.push(lost_message(
                        log,
                        room,
                        epoch,
                        *seq,
                        seen,
                        origin_wall_ms,
                        &join_epoch,
                        join_seq,
                    ));
                }
            }
        }
        if client_lost > 0 {
            t.clients_with_loss += 1;
        }
    }
    t.lost_distinct = lost_keys.len() as u64;
    for (room, epoch, seq) in &lost_keys {
        if let Some(seen) = sightings.rooms.get(*room).and_then(|rl| rl.msgs.get(&(epoch.clone(), *seq))) {
            t.lost_texts.insert(seen.text.clone());
        }
    }

    // Sends against what was seen.
    let mut seqs_of_text: HashMap<&str, u64> = HashMap::new();
    for rl in sightings.rooms.values() {
        for seen in rl.msgs.values() {
            *seqs_of_text.entry(seen.text.as_str()).or_default() += 1;
        }
    }
    t.republished = seqs_of_text.values().map(|n| n.saturating_sub(1)).sum();
    let echoed: HashSet<&str> = logs.iter().flat_map(|l| l.echoes.iter().map(String::as_str)).collect();
    for (text, sent) in &sends.written {
        if echoed.contains(text.as_str()) {
            t.confirmed += 1;
        }
        if !seqs_of_text.contains_key(text.as_str()) {
            t.unconfirmed += 1; // never published: lost (the library resends until it is)
            if t.unconfirmed_examples.len() < EXAMPLES_KEPT {
                t.unconfirmed_examples.push(UnconfirmedSend {
                    text: text.clone(),
                    room: sent.room.clone(),
                    at_ms: sent.at_ms,
                    node: sent.node.clone(),
                });
            }
        }
    }
    t.unconfirmed_examples.sort_by_key(|u| u.at_ms);
    t.refused_but_published =
        sends.refused.keys().filter(|text| seqs_of_text.contains_key(text.as_str())).count() as u64;
    t.foreign_texts = seqs_of_text
        .keys()
        .filter(|text| !sends.written.contains_key(**text) && !sends.refused.contains_key(**text))
        .count() as u64;
    t.seqs_of_text = seqs_of_text.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    t
}

#[allow(clippy::too_many_arguments)] // the coordinates of one loss
fn lost_message(
    log: &ClientLog,
    room: &str,
    epoch: &str,
    seq: u64,
    seen: Option<&Seen>,
    origin_wall_ms: u64,
    join_epoch: &Option<String>,
    join_seq: u64,
) -> LostMessage {
    let published_ms = seen.map(|s| s.timestamp as i64 - origin_wall_ms as i64);
    let around = published_ms.unwrap_or(i64::MAX);
    let client_timeline = log
        .timeline
        .iter()
        .filter(|(ms, _)| (*ms as i64 - around).abs() <= 5_000 || seen.is_none())
        .take(40)
        .map(|(ms, what)| format!("t={ms}ms {what}"))
        .collect();
    LostMessage {
        client: log.id.clone(),
        room: room.to_string(),
        epoch: epoch.to_string(),
        seq,
        text: seen.map(|s| s.text.clone()),
        sender: seen.map(|s| s.sender.clone()),
        sender_node: seen.map(|s| s.server.clone()),
        published_ms,
        first_received_ms: seen.map(|s| s.first_seen_ms),
        join: format!(
            "epoch {} after seq {join_seq} at t={}ms",
            join_epoch.as_deref().unwrap_or("(none yet)"),
            log.joins.get(room).map_or(0, |j| j.at_ms)
        ),
        client_timeline,
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub(crate) fn seen(text: &str) -> Seen {
        Seen { text: text.into(), sender: "s".into(), server: "n".into(), timestamp: 0, first_seen_ms: 0 }
    }

    pub(crate) fn sightings(room: &str, msgs: &[(&str, u64, &str)]) -> Sightings {
        let mut l = Sightings::default();
        let rl = l.rooms.entry(room.into()).or_default();
        for (e, s, text) in msgs {
            rl.rank(e);
            rl.msgs.insert((e.to_string(), *s), seen(text));
        }
        l
    }

    pub(crate) fn client(room: &str, join: (Option<&str>, u64), got: &[(&str, u64)]) -> ClientLog {
        let mut log = ClientLog { id: "c".into(), rooms: vec![room.into()], ..Default::default() };
        log.joins
            .insert(room.into(), JoinPoint { epoch: join.0.map(str::to_string), head_seq: Some(join.1), at_ms: 0 });
        log.delivered.insert(room.into(), got.iter().map(|(e, s)| (e.to_string(), *s)).collect());
        log
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn owed_is_everything_after_the_join_and_lost_is_owed_minus_delivered() {
        let l = sightings("r", &[("e", 1, "a"), ("e", 2, "b"), ("e", 3, "c"), ("e", 4, "d")]);
        let late = client("r", (Some("e"), 2), &[("e", 3)]); // owed 3, 4; got 3
        let early = client("r", (None, 0), &[("e", 1), ("e", 2), ("e", 3), ("e", 4)]);
        let t = account(&[late, early], &l, None, &SendLog::default(), 0);
        assert_eq!((t.published, t.expected, t.lost, t.lost_distinct), (4, 6, 1, 1));
        assert_eq!(t.lost_examples[0].seq, 4);
    }

    #[test]
    fn a_seq_redis_assigned_but_nobody_saw_is_lost_for_every_member() {
        let l = sightings("r", &[("e", 1, "a")]);
        let heads: Heads = [("r".to_string(), (Some("e".to_string()), 2))].into();
        let c = client("r", (None, 0), &[("e", 1)]);
        let t = account(&[c], &l, Some(&heads), &SendLog::default(), 0);
        assert_eq!((t.published, t.assigned_by_redis, t.never_observed, t.lost), (1, 2, 1, 1));
        assert_eq!(t.lost_examples[0].text, None);
    }

    #[test]
    fn a_later_epoch_is_owed_entirely_an_earlier_one_not_at_all() {
        let l = sightings("r", &[("old", 5, "a"), ("cur", 1, "b"), ("new", 1, "c")]);
        let c = client("r", (Some("cur"), 1), &[]);
        let t = account(&[c], &l, None, &SendLog::default(), 0);
        assert_eq!((t.expected, t.lost), (1, 1));
        assert_eq!(t.lost_examples[0].epoch, "new");
    }

    #[test]
    fn a_second_copy_is_a_duplicate_and_an_older_seq_is_out_of_order() {
        let shared = Shared::new();
        let mut log = ClientLog::new("c".into(), vec!["r".into()]);
        let msg = |seq: u64| -> RoomMessage {
            let frame = format!(
                r#"{{"type":"message","room":"r","from":"s","id":"s","text":"t{seq}","server":"n","timestamp":0,"seq":{seq},"epoch":"e"}}"#
            );
            serde_json::from_str(&frame).expect("a room message")
        };
        for seq in [1, 3, 3, 2, 4] {
            log.record_message(&shared, 0, msg(seq));
        }
        assert_eq!((log.app_duplicates, log.app_out_of_order), (1, 1));
        assert_eq!(log.delivered["r"].len(), 4);
        assert_eq!(log.last["r"], ("e".to_string(), 4), "the last is the highest seen");
    }

    #[test]
    fn sends_are_matched_against_what_was_seen() {
        let l = sightings("r", &[("e", 1, "c:1"), ("e", 2, "c:1"), ("e", 3, "x:9")]);
        let mut sends = SendLog::default();
        let sent = |id: &str| Sent { room: "r".into(), at_ms: 0, node: "n".into(), msg_id: id.into() };
        sends.written.insert("c:1".into(), sent("m1"));
        sends.written.insert("c:2".into(), sent("m2"));
        let mut c = client("r", (None, 0), &[("e", 1), ("e", 2), ("e", 3)]);
        c.echoes.insert("c:1".into());
        let t = account(&[c], &l, None, &sends, 0);
        assert_eq!((t.republished, t.confirmed, t.unconfirmed, t.foreign_texts), (1, 1, 1, 1));
    }
}
