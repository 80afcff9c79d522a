//! Webhook decisions in memory: what the Redis presence scripts do in Lua, for the
//! backbones whose presence is one process' (`none`) or a test's store (`memory`). Each call
//! is made under the lock that makes its presence change atomic.
//!
//! The rules (`docs/WEBHOOKS.md`):
//! - an id's first connection in a scope (`online`, or a room) emits `client.online` /
//!   `member.joined` — unless a pending `client.offline` / `member.left` of that id there
//!   exists: then that is cancelled and nothing is emitted;
//! - a room's first id emits `room.occupied`, unless a pending `room.vacated` is cancelled;
//! - an id's last connection going records a pending `client.offline` / `member.left`, due
//!   after the grace; an explicit leave (`left`, `removed`) emits `member.left` at once;
//! - a room's last id going records a pending `room.vacated` (always graced);
//! - a pending event whose due time has passed is claimed, once.

use super::{PresenceEntry, Scope};
use crate::webhooks::{Decided, Kind};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

/// Whether a removal for `reason` is graced (the client may be back within the grace) or
/// reported at once (it chose to go).
pub fn is_graced(reason: &str) -> bool {
    matches!(reason, "disconnected" | "node_down")
}

/// The `reason` of a `user_left` frame the node passes with a removal (`disconnected` when
/// there is none: an `online` removal is a connection ending).
pub fn leave_reason(event: Option<&str>) -> String {
    event
        .and_then(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_string))
        .unwrap_or_else(|| "disconnected".to_string())
}

/// The pending events' keys, as the Lua scripts spell them.
fn offline_key(id: &str) -> String {
    format!("o|{id}")
}
fn left_key(room: &str, id: &str) -> String {
    format!("l|{room}|{id}")
}
fn vacated_key(room: &str) -> String {
    format!("v|{room}")
}

/// Pending events and the rules above; `now` is the store's clock.
#[derive(Debug, Default)]
pub struct Decider {
    grace: Duration,
    /// Key → (due, event).
    pending: BTreeMap<String, (Duration, Decided)>,
}

impl Decider {
    pub fn new(grace: Duration) -> Self {
        Self { grace, pending: BTreeMap::new() }
    }

    fn emit_unless_pending(&mut self, out: &mut Vec<Decided>, key: String, kind: Kind, data: serde_json::Value) {
        if self.pending.remove(&key).is_none() {
            out.push(Decided::new(kind, data, SystemTime::now()));
        }
    }

    fn pend(&mut self, now: Duration, key: String, kind: Kind, data: serde_json::Value) {
        self.pending.insert(key, (now + self.grace, Decided::new(kind, data, SystemTime::now())));
    }

    /// `entry` got a seat in `scope`: `first_of_id` if its id had none there, `first_of_room`
    /// if the room had no id at all.
    pub fn added(
        &mut self,
        scope: Scope<'_>,
        entry: &PresenceEntry,
        first_of_id: bool,
        first_of_room: bool,
    ) -> Vec<Decided> {
        let mut out = Vec::new();
        if !first_of_id {
            return out;
        }
        let id = entry.id.as_str();
        match scope {
            Scope::Online => self.emit_unless_pending(
                &mut out,
                offline_key(id),
                Kind::ClientOnline,
                json!({"client": id, "name": entry.user, "server": entry.server}),
            ),
            Scope::Room(room) => {
                if first_of_room {
                    self.emit_unless_pending(&mut out, vacated_key(room), Kind::RoomOccupied, json!({"room": room}));
                }
                self.emit_unless_pending(
                    &mut out,
                    left_key(room, id),
                    Kind::MemberJoined,
                    json!({"room": room, "client": id}),
                );
            }
        }
        out
    }

    /// `entry`'s seat in `scope` went, for `reason`: `last_of_id` if its id has none left
    /// there, `room_empty` if the room has no id left.
    pub fn removed(
        &mut self,
        now: Duration,
        scope: Scope<'_>,
        entry: &PresenceEntry,
        reason: &str,
        last_of_id: bool,
        room_empty: bool,
    ) -> Vec<Decided> {
        let mut out = Vec::new();
        if !last_of_id {
            return out;
        }
        let id = entry.id.as_str();
        match scope {
            Scope::Online => self.pend(
                now,
                offline_key(id),
                Kind::ClientOffline,
                json!({"client": id, "name": entry.user, "reason": reason}),
            ),
            Scope::Room(room) => {
                let left = json!({"room": room, "client": id, "reason": reason});
                if is_graced(reason) {
                    self.pend(now, left_key(room, id), Kind::MemberLeft, left);
                } else {
                    out.push(Decided::new(Kind::MemberLeft, left, SystemTime::now()));
                }
                if room_empty {
                    self.pend(now, vacated_key(room), Kind::RoomVacated, json!({"room": room}));
                }
            }
        }
        out
    }

    /// Takes every pending event due at `now`, in due order.
    pub fn claim_due(&mut self, now: Duration) -> Vec<Decided> {
        let mut due: Vec<(Duration, String)> =
            self.pending.iter().filter(|(_, (d, _))| *d <= now).map(|(k, (d, _))| (*d, k.clone())).collect();
        due.sort();
        due.into_iter().filter_map(|(_, k)| self.pending.remove(&k).map(|(_, e)| e)).collect()
    }

    /// Pending events (for tests and the `none` backbone's bookkeeping).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: &str) -> PresenceEntry {
        PresenceEntry { id: id.into(), user: id.to_uppercase(), server: "n1".into() }
    }

    fn kinds(v: &[Decided]) -> Vec<Kind> {
        v.iter().map(|d| d.kind).collect()
    }

    #[test]
    fn a_return_within_the_grace_emits_nothing_and_a_late_one_emits_both() {
        let g = Duration::from_secs(5);
        let mut d = Decider::new(g);
        let t0 = Duration::ZERO;
        assert_eq!(kinds(&d.added(Scope::Online, &e("a"), true, false)), [Kind::ClientOnline]);
        assert_eq!(kinds(&d.added(Scope::Room("r"), &e("a"), true, true)), [Kind::RoomOccupied, Kind::MemberJoined]);
        // Disconnect: everything graced.
        assert!(d.removed(t0, Scope::Room("r"), &e("a"), "disconnected", true, true).is_empty());
        assert!(d.removed(t0, Scope::Online, &e("a"), "disconnected", true, false).is_empty());
        assert_eq!(d.pending(), 3);
        assert!(d.claim_due(g - Duration::from_millis(1)).is_empty());
        // Back within the grace: all three cancelled, nothing emitted.
        assert!(d.added(Scope::Online, &e("a"), true, false).is_empty());
        assert!(d.added(Scope::Room("r"), &e("a"), true, true).is_empty());
        assert_eq!(d.pending(), 0);
        // Gone for good: the three fire once, in due order (ties by key, as in Redis).
        d.removed(g, Scope::Room("r"), &e("a"), "node_down", true, true);
        d.removed(g, Scope::Online, &e("a"), "node_down", true, false);
        let fired = d.claim_due(g * 2);
        assert_eq!(kinds(&fired), [Kind::MemberLeft, Kind::ClientOffline, Kind::RoomVacated]);
        let offline: serde_json::Value = serde_json::from_str(&fired[1].data).unwrap();
        assert_eq!(offline, json!({"client":"a","name":"A","reason":"node_down"}));
        assert!(d.claim_due(g * 3).is_empty(), "claimed once");
        assert_eq!(kinds(&d.added(Scope::Online, &e("a"), true, false)), [Kind::ClientOnline]);
    }

    #[test]
    fn an_explicit_leave_is_reported_at_once_and_shared_seats_say_nothing() {
        let mut d = Decider::new(Duration::from_secs(5));
        assert!(d.added(Scope::Room("r"), &e("a"), false, false).is_empty(), "a second tab");
        assert!(d.removed(Duration::ZERO, Scope::Room("r"), &e("a"), "disconnected", false, false).is_empty());
        let left = d.removed(Duration::ZERO, Scope::Room("r"), &e("a"), "left", true, true);
        assert_eq!(kinds(&left), [Kind::MemberLeft]);
        assert_eq!(d.pending(), 1, "the room's vacated is still graced");
        // A rejoin within the grace: joined again, but the room never looked empty.
        assert_eq!(kinds(&d.added(Scope::Room("r"), &e("a"), true, true)), [Kind::MemberJoined]);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn reasons_are_read_from_the_user_left_frame() {
        assert_eq!(leave_reason(Some(r#"{"type":"user_left","reason":"left"}"#)), "left");
        assert_eq!(leave_reason(None), "disconnected");
        assert!(is_graced("node_down") && is_graced("disconnected") && !is_graced("left") && !is_graced("removed"));
    }
}
