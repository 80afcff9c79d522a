//! The node's local view of rooms: which of *this node's* connections are in which room, and
//! the fan-out of one backbone frame to them.
//!
//! A frame arrives once from the backbone (already encoded JSON, shared as `Utf8Bytes`), and
//! is offered to each local member's bounded send queue with `try_send`: fan-out never waits on
//! a client. A member whose queue is full is a slow consumer: its `kick` token is cancelled and
//! its connection task closes it with 1008.

use dashmap::DashMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The handle a room keeps for one local member.
#[derive(Debug, Clone)]
pub struct Member {
    /// The member's send queue: text frames shared with every other recipient.
    pub tx: mpsc::Sender<Utf8Bytes>,
    /// Cancelled when the member cannot keep up; its connection task closes it.
    pub kick: CancellationToken,
}

/// Local members of every room that has any on this node.
#[derive(Debug, Default)]
pub struct Hub {
    rooms: DashMap<String, HashMap<u64, Member>>,
    next_conn: AtomicU64,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// A node-unique connection number.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a member; returns true if it is the room's first local member.
    pub fn add(&self, room: &str, conn: u64, member: Member) -> bool {
        let mut entry = self.rooms.entry(room.to_string()).or_default();
        let first = entry.is_empty();
        entry.insert(conn, member);
        first
    }

    /// Removes a member; returns true if the room has no local member left.
    pub fn remove(&self, room: &str, conn: u64) -> bool {
        // `remove_if` drops the room entry in the same shard lock that saw it empty, so a
        // concurrent `add` either lands before (and keeps the room) or creates a fresh entry.
        let mut now_empty = false;
        if let Some(mut members) = self.rooms.get_mut(room) {
            members.remove(&conn);
            now_empty = members.is_empty();
        }
        if now_empty {
            self.rooms.remove_if(room, |_, m| m.is_empty());
        }
        now_empty
    }

    /// Whether any local connection is in `room`.
    pub fn has_members(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(|m| !m.is_empty())
    }

    pub fn member_count(&self, room: &str) -> usize {
        self.rooms.get(room).map_or(0, |m| m.len())
    }

    /// Rooms with at least one local member.
    pub fn rooms(&self) -> Vec<String> {
        self.rooms
            .iter()
            .filter(|e| !e.value().is_empty())
            .map(|e| e.key().clone())
            .collect()
    }

    /// Offers `frame` to every local member of `room`; returns how many accepted it.
    pub fn deliver(&self, room: &str, frame: &Utf8Bytes, metrics: &Metrics) -> usize {
        let Some(members) = self.rooms.get(room) else {
            return 0;
        };
        let mut delivered = 0;
        for member in members.values() {
            match member.tx.try_send(frame.clone()) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if !member.kick.is_cancelled() {
                        metrics.slow_consumers.inc();
                        member.kick.cancel();
                    }
                }
                // The connection is on its way out; its cleanup removes it from the room.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        metrics.frames_delivered.inc_by(delivered as u64);
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(cap: usize) -> (Member, mpsc::Receiver<Utf8Bytes>) {
        let (tx, rx) = mpsc::channel(cap);
        (
            Member {
                tx,
                kick: CancellationToken::new(),
            },
            rx,
        )
    }

    #[test]
    fn first_and_last_member_are_reported() {
        let hub = Hub::new();
        let (a, _ra) = member(4);
        let (b, _rb) = member(4);
        assert!(hub.add("r", 1, a));
        assert!(!hub.add("r", 2, b));
        assert!(!hub.remove("r", 1));
        assert!(hub.has_members("r"));
        assert!(hub.remove("r", 2));
        assert!(!hub.has_members("r"));
        assert!(hub.rooms().is_empty());
    }

    #[test]
    fn a_full_queue_kicks_only_that_member() {
        let hub = Hub::new();
        let metrics = Metrics::new();
        let (slow, _rs) = member(1);
        let (fast, mut rf) = member(8);
        hub.add("r", 1, slow.clone());
        hub.add("r", 2, fast.clone());
        let frame = Utf8Bytes::from_static("{}");
        assert_eq!(hub.deliver("r", &frame, &metrics), 2);
        assert_eq!(hub.deliver("r", &frame, &metrics), 1);
        assert!(slow.kick.is_cancelled());
        assert!(!fast.kick.is_cancelled());
        assert!(rf.try_recv().is_ok());
        assert!(rf.try_recv().is_ok());
    }
}
