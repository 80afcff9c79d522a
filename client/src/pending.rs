//! Messages sent and not yet confirmed: the client's resend queue.
//!
//! Every message the app sends gets a `msg_id` — this client's random 64-bit prefix and a
//! counter, so it is unique per client id (a restarted app draws a new prefix) and the same
//! on every connection — and waits here until it is confirmed: its own echo came back (a
//! `message` with our id and that `msg_id`, live or replayed) or the node answered
//! `duplicate` for it. After a reconnect, once the connection is in sync, whatever is still
//! here is written again, in the order it was first sent; the node publishes a `msg_id` at
//! most once, so a resend of a message that did land costs a `duplicate` frame, not a second
//! delivery.
//!
//! The queue is bounded by count and by bytes: past either, `send` fails at once
//! ([`Error::TooManyUnconfirmed`](crate::Error::TooManyUnconfirmed)) rather than letting a
//! client that cannot reach any node grow without end.

use std::collections::BTreeMap;
use tether_proto::wire::{ClientMsg, RawJson};

/// One message waiting for its confirmation.
#[derive(Debug, Clone)]
pub(crate) struct PendingMsg {
    pub(crate) room: String,
    pub(crate) text: String,
    pub(crate) data: Option<RawJson>,
    pub(crate) msg_id: String,
    /// The connection (serial) it was last written on; `None`: never written. A message not
    /// written on the current connection is due for a resend once it is in sync.
    pub(crate) written_on: Option<u64>,
}

impl PendingMsg {
    /// What it weighs against the byte bound: the parts that vary.
    fn weight(&self) -> usize {
        self.room.len() + self.text.len() + self.data.as_ref().map_or(0, |d| d.get().len()) + self.msg_id.len()
    }

    pub(crate) fn frame(&self) -> ClientMsg {
        ClientMsg::Message {
            room: self.room.clone(),
            text: self.text.clone(),
            data: self.data.clone(),
            msg_id: Some(self.msg_id.clone()),
        }
    }
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full {
    pub(crate) count: usize,
    pub(crate) bytes: usize,
}

/// The unconfirmed messages, oldest first.
#[derive(Debug)]
pub(crate) struct Pending {
    /// `msg_id` = `{prefix}-{counter}`; the prefix is random per [`Client`](crate::Client).
    prefix: String,
    next: u64,
    /// By counter: ascending = the order the app sent them.
    msgs: BTreeMap<u64, PendingMsg>,
    bytes: usize,
    max_count: usize,
    max_bytes: usize,
}

impl Pending {
    pub(crate) fn new(max_count: usize, max_bytes: usize) -> Self {
        Self::with_prefix(format!("{:016x}", rand::random::<u64>()), max_count, max_bytes)
    }

    pub(crate) fn with_prefix(prefix: String, max_count: usize, max_bytes: usize) -> Self {
        Self { prefix, next: 1, msgs: BTreeMap::new(), bytes: 0, max_count, max_bytes }
    }

    pub(crate) fn len(&self) -> usize {
        self.msgs.len()
    }

    /// Queues a message and returns its `msg_id`, or says which bound it would pass.
    pub(crate) fn push(&mut self, room: String, text: String, data: Option<RawJson>) -> Result<&PendingMsg, Full> {
        let counter = self.next;
        let msg = PendingMsg { room, text, data, msg_id: format!("{}-{counter}", self.prefix), written_on: None };
        let weight = msg.weight();
        if self.msgs.len() >= self.max_count || self.bytes + weight > self.max_bytes {
            return Err(Full { count: self.msgs.len(), bytes: self.bytes });
        }
        self.next += 1;
        self.bytes += weight;
        Ok(self.msgs.entry(counter).or_insert(msg))
    }

    /// The counter of one of our `msg_id`s; `None` for anyone else's.
    fn counter(&self, msg_id: &str) -> Option<u64> {
        let rest = msg_id.strip_prefix(self.prefix.as_str())?.strip_prefix('-')?;
        rest.parse().ok()
    }

    /// Removes a confirmed message; false when it was not waiting (already confirmed, or
    /// not ours).
    pub(crate) fn confirm(&mut self, msg_id: &str) -> bool {
        let Some(counter) = self.counter(msg_id) else { return false };
        match self.msgs.remove(&counter) {
            Some(m) => {
                self.bytes -= m.weight();
                true
            }
            None => false,
        }
    }

    /// Notes that the message was written on connection `conn`.
    pub(crate) fn written(&mut self, msg_id: &str, conn: u64) {
        if let Some(m) = self.counter(msg_id).and_then(|c| self.msgs.get_mut(&c)) {
            m.written_on = Some(conn);
        }
    }

    /// Makes every message due again on the current connection: after a
    /// `backbone_unavailable`, which the protocol does not tie to one message.
    pub(crate) fn forget_writes(&mut self) {
        for m in self.msgs.values_mut() {
            m.written_on = None;
        }
    }

    /// The messages not written on connection `conn`, oldest first: what a resend writes.
    pub(crate) fn due(&self, conn: u64) -> Vec<PendingMsg> {
        self.msgs.values().filter(|m| m.written_on != Some(conn)).cloned().collect()
    }

    /// Forgets the messages of a room the app left (a resend would be refused
    /// `not_in_room`); returns how many.
    pub(crate) fn drop_room(&mut self, room: &str) -> usize {
        let before = self.msgs.len();
        let mut freed = 0;
        self.msgs.retain(|_, m| {
            let keep = m.room != room;
            if !keep {
                freed += m.weight();
            }
            keep
        });
        self.bytes -= freed;
        before - self.msgs.len()
    }

    /// The `msg_id`s waiting, oldest first.
    pub(crate) fn ids(&self) -> Vec<String> {
        self.msgs.values().map(|m| m.msg_id.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> Pending {
        Pending::with_prefix("p".into(), 3, 1000)
    }

    #[test]
    fn ids_are_prefix_and_counter_and_confirm_only_ours() {
        let mut p = pending();
        assert_eq!(p.push("r".into(), "a".into(), None).map(|m| m.msg_id.clone()), Ok("p-1".into()));
        assert_eq!(p.push("r".into(), "b".into(), None).map(|m| m.msg_id.clone()), Ok("p-2".into()));
        assert!(!p.confirm("q-1"), "another client's id");
        assert!(!p.confirm("p-x") && !p.confirm("p1") && !p.confirm("p-9"));
        assert!(p.confirm("p-1"));
        assert!(!p.confirm("p-1"), "confirmed once");
        assert_eq!(p.ids(), ["p-2"]);
    }

    #[test]
    fn bounded_by_count_and_bytes() {
        let mut p = pending();
        for t in ["a", "b", "c"] {
            p.push("r".into(), t.into(), None).expect("room");
        }
        assert_eq!(p.push("r".into(), "d".into(), None).err(), Some(Full { count: 3, bytes: p.bytes }));
        assert!(p.confirm("p-2"));
        p.push("r".into(), "d".into(), None).expect("room again after a confirmation");
        let mut p = Pending::with_prefix("p".into(), 100, 10);
        assert!(p.push("r".into(), "x".repeat(20), None).is_err(), "over the byte bound");
        assert_eq!(p.len(), 0);
        assert_eq!(p.push("r".into(), "ok".into(), None).map(|m| m.msg_id.clone()), Ok("p-1".into()));
    }

    #[test]
    fn due_is_what_this_connection_has_not_written_in_order() {
        let mut p = pending();
        for t in ["a", "b", "c"] {
            let id = p.push("r".into(), t.into(), None).expect("room").msg_id.clone();
            p.written(&id, 1);
        }
        assert!(p.due(1).is_empty());
        p.confirm("p-2");
        let due: Vec<_> = p.due(2).into_iter().map(|m| m.text).collect();
        assert_eq!(due, ["a", "c"]);
        p.written("p-1", 2);
        assert_eq!(p.due(2).len(), 1);
    }

    #[test]
    fn leaving_a_room_drops_its_messages_and_their_bytes() {
        let mut p = pending();
        p.push("r".into(), "a".into(), None).expect("room");
        p.push("s".into(), "b".into(), None).expect("room");
        assert_eq!(p.drop_room("r"), 1);
        assert_eq!(p.ids(), ["p-2"]);
        p.confirm("p-2");
        assert_eq!(p.bytes, 0);
    }
}
