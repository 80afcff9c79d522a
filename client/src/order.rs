//! Per-room ordering: which `(epoch, seq)` is new, which is a duplicate, where a gap is.
//!
//! Every `message` frame passes through its room's [`Tracker`] before the app sees it. The
//! tracker only moves forward, and only when a message is actually handed over, so the
//! position it holds is exactly what the next `resume` asks to continue after.
//!
//! A room starts with no position. The client's own `user_joined` anchors it at the room's
//! head at join time (`head_seq`, `epoch`) — or, for a room with no message yet (no epoch),
//! at "seq 0 of whatever epoch comes first" — so that a room joined but not yet talked in
//! is resumed like any other.

use serde::{Deserialize, Serialize};

/// The last message of a room delivered to the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The room log's epoch (opaque; changes only when Redis lost the log).
    pub epoch: String,
    /// The message's seq within that epoch.
    pub seq: u64,
}

/// What to do with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Hand it over; `gap` and `epoch_change` are to be reported first.
    Deliver { gap: Option<(u64, u64)>, epoch_change: Option<(String, String)> },
    /// Already delivered (`(epoch, seq)` not newer than the position): drop and count.
    Duplicate,
    /// From an epoch this room has already moved past: drop and count.
    StaleEpoch,
}

/// Epochs remembered as retired per room; they change about never, so a handful suffices.
const RETIRED_KEPT: usize = 8;

/// The ordering state of one room.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tracker {
    /// Last delivered, or the anchor at join; `None` until either.
    pos: Option<Position>,
    /// Joined while the room had no log (no epoch yet): the first epoch seen continues from
    /// seq 0. Only meaningful while `pos` is `None`.
    from_zero: bool,
    /// Epochs we moved away from. Epochs cannot be compared, so this is how a late frame
    /// of an old epoch is told apart from the start of a new one.
    retired: Vec<String>,
}

impl Tracker {
    pub(crate) fn position(&self) -> Option<&Position> {
        self.pos.as_ref()
    }

    /// Whether the room has a starting point to resume from (a position or a zero anchor).
    pub(crate) fn has_start(&self) -> bool {
        self.pos.is_some() || self.from_zero
    }

    /// What to put in `resume` for this room: `(epoch, seq)`, the epoch `None` for a room
    /// anchored before its log existed (the node then replays its whole log).
    pub(crate) fn resume_point(&self) -> Option<(Option<&str>, u64)> {
        match &self.pos {
            Some(p) => Some((Some(p.epoch.as_str()), p.seq)),
            None => self.from_zero.then_some((None, 0)),
        }
    }

    /// The own `user_joined` said where the room stood at the join. Anchors the room there
    /// unless it already has a starting point (a message arrived first, or this is a
    /// re-join/restore of a room joined long ago: anchoring then would skip what was missed).
    /// Returns whether it anchored.
    pub(crate) fn anchor(&mut self, epoch: Option<&str>, head_seq: u64) -> bool {
        if self.has_start() {
            return false;
        }
        match epoch {
            Some(e) => self.pos = Some(Position { epoch: e.to_string(), seq: head_seq }),
            // No log yet: whichever epoch the first message brings starts at seq 1.
            None => self.from_zero = true,
        }
        true
    }

    /// Judges a message and, when it is to be delivered, advances the position to it.
    /// `replay` frames fill a hole the node already reports (`resumed`, `complete:false`),
    /// so a jump inside a replay is not counted as a gap.
    pub(crate) fn accept(&mut self, epoch: &str, seq: u64, replay: bool) -> Verdict {
        let Some(pos) = &mut self.pos else {
            let gap = (self.from_zero && seq > 1 && !replay).then_some((1, seq));
            self.pos = Some(Position { epoch: epoch.to_string(), seq });
            return Verdict::Deliver { gap, epoch_change: None };
        };
        if pos.epoch == epoch {
            if seq <= pos.seq {
                return Verdict::Duplicate;
            }
            let expected = pos.seq + 1;
            pos.seq = seq;
            let gap = (seq > expected && !replay).then_some((expected, seq));
            return Verdict::Deliver { gap, epoch_change: None };
        }
        if self.retired.iter().any(|e| e == epoch) {
            return Verdict::StaleEpoch;
        }
        let old = std::mem::replace(pos, Position { epoch: epoch.to_string(), seq });
        let change = (old.epoch.clone(), epoch.to_string());
        self.retire(old.epoch);
        Verdict::Deliver { gap: None, epoch_change: Some(change) }
    }

    /// A `resumed` announced `epoch` for this room. When no message of that epoch has been
    /// delivered yet (the new log was empty), the position moves to its start, so that the
    /// next resume asks for all of it; returns the change to report, if any.
    pub(crate) fn enter_epoch(&mut self, epoch: &str) -> Option<(String, String)> {
        if self.pos.is_none() && self.from_zero {
            // Anchored before the log existed: this epoch is the first one, from its start.
            self.pos = Some(Position { epoch: epoch.to_string(), seq: 0 });
            return None;
        }
        let pos = self.pos.as_mut()?;
        if pos.epoch == epoch || self.retired.iter().any(|e| e == epoch) {
            return None;
        }
        let old = std::mem::replace(pos, Position { epoch: epoch.to_string(), seq: 0 });
        let change = (old.epoch.clone(), epoch.to_string());
        self.retire(old.epoch);
        Some(change)
    }

    fn retire(&mut self, epoch: String) {
        if self.retired.len() == RETIRED_KEPT {
            self.retired.remove(0);
        }
        self.retired.push(epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver() -> Verdict {
        Verdict::Deliver { gap: None, epoch_change: None }
    }

    #[test]
    fn in_order_then_duplicates() {
        let mut t = Tracker::default();
        assert_eq!(t.accept("e", 5, false), deliver());
        assert_eq!(t.accept("e", 6, false), deliver());
        assert_eq!(t.accept("e", 6, false), Verdict::Duplicate);
        assert_eq!(t.accept("e", 2, true), Verdict::Duplicate);
        assert_eq!(t.position(), Some(&Position { epoch: "e".into(), seq: 6 }));
    }

    #[test]
    fn gaps_outside_replays_only() {
        let mut t = Tracker::default();
        t.accept("e", 1, false);
        assert_eq!(t.accept("e", 4, false), Verdict::Deliver { gap: Some((2, 4)), epoch_change: None });
        assert_eq!(t.accept("e", 9, true), deliver());
    }

    #[test]
    fn epoch_changes_once_and_old_epoch_is_stale() {
        let mut t = Tracker::default();
        t.accept("e1", 10, false);
        assert_eq!(
            t.accept("e2", 1, false),
            Verdict::Deliver { gap: None, epoch_change: Some(("e1".into(), "e2".into())) }
        );
        assert_eq!(t.accept("e1", 11, false), Verdict::StaleEpoch);
        assert_eq!(t.accept("e2", 2, false), deliver());
        assert_eq!(t.enter_epoch("e2"), None);
        assert_eq!(t.enter_epoch("e3"), Some(("e2".into(), "e3".into())));
        assert_eq!(t.position().map(|p| p.seq), Some(0));
    }

    #[test]
    fn anchor_at_join_sets_the_start_once() {
        let mut t = Tracker::default();
        assert!(!t.has_start());
        assert!(t.anchor(Some("e"), 7));
        assert_eq!(t.resume_point(), Some((Some("e"), 7)));
        assert!(!t.anchor(Some("e"), 9), "a later join (re-join, restore) does not move it");
        assert_eq!(t.accept("e", 9, false), Verdict::Deliver { gap: Some((8, 9)), epoch_change: None });
        // A message that came before the own user_joined is a start already.
        let mut t = Tracker::default();
        t.accept("e", 3, false);
        assert!(!t.anchor(Some("e"), 5));
        assert_eq!(t.position().map(|p| p.seq), Some(3));
    }

    #[test]
    fn anchor_without_epoch_continues_from_zero_in_the_first_epoch() {
        let mut t = Tracker::default();
        assert!(t.anchor(None, 0));
        assert!(t.has_start() && t.position().is_none());
        assert_eq!(t.resume_point(), Some((None, 0)));
        assert_eq!(t.accept("e", 2, false), Verdict::Deliver { gap: Some((1, 2)), epoch_change: None });
        let mut t = Tracker::default();
        t.anchor(None, 0);
        assert_eq!(t.accept("e", 1, false), deliver());
        let mut t = Tracker::default();
        t.anchor(None, 0);
        assert_eq!(t.enter_epoch("e"), None);
        assert_eq!(t.position(), Some(&Position { epoch: "e".into(), seq: 0 }));
    }
}
