//! Per-room ordering: which `(epoch, seq)` is new, which is a duplicate, where a gap is.
//!
//! Every `message` frame passes through its room's [`Tracker`] before the app sees it. The
//! tracker only moves forward, and only when a message is actually handed over, so the
//! position it holds is exactly what the next `resume` asks to continue after.

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
    /// Last delivered; `None` until the first message.
    pos: Option<Position>,
    /// Epochs we moved away from. Epochs cannot be compared, so this is how a late frame
    /// of an old epoch is told apart from the start of a new one.
    retired: Vec<String>,
}

impl Tracker {
    pub(crate) fn position(&self) -> Option<&Position> {
        self.pos.as_ref()
    }

    /// Judges a message and, when it is to be delivered, advances the position to it.
    /// `replay` frames fill a hole the node already reports (`resumed`, `complete:false`),
    /// so a jump inside a replay is not counted as a gap.
    pub(crate) fn accept(&mut self, epoch: &str, seq: u64, replay: bool) -> Verdict {
        let Some(pos) = &mut self.pos else {
            self.pos = Some(Position { epoch: epoch.to_string(), seq });
            return Verdict::Deliver { gap: None, epoch_change: None };
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
}
