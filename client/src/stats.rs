//! Counters a chaos run or a benchmark reads to judge the client's experience.
//!
//! The connection task bumps plain atomics (relaxed: each counter stands alone); any handle
//! takes a [`StatsSnapshot`] at any time without waiting on the task.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Sentinel for "no duration recorded yet".
const NONE: u64 = u64::MAX;

/// The live counters, shared between the connection task and the handles.
#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) connects: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) messages_delivered: AtomicU64,
    pub(crate) replayed_delivered: AtomicU64,
    pub(crate) duplicates_dropped: AtomicU64,
    pub(crate) stale_epoch_dropped: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) gap_messages: AtomicU64,
    pub(crate) epoch_changes: AtomicU64,
    pub(crate) incomplete_resumes: AtomicU64,
    pub(crate) stray_messages: AtomicU64,
    pub(crate) unknown_frames: AtomicU64,
    pub(crate) malformed_frames: AtomicU64,
    pub(crate) invalid_frames: AtomicU64,
    pub(crate) events_discarded: AtomicU64,
    pub(crate) messages_sent: AtomicU64,
    pub(crate) messages_resent: AtomicU64,
    pub(crate) confirmed_by_echo: AtomicU64,
    pub(crate) confirmed_by_duplicate: AtomicU64,
    pub(crate) unconfirmed_abandoned: AtomicU64,
    pub(crate) unconfirmed: AtomicU64,
    last_reconnect_us: AtomicU64,
    last_recovery_us: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            connects: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            messages_delivered: AtomicU64::new(0),
            replayed_delivered: AtomicU64::new(0),
            duplicates_dropped: AtomicU64::new(0),
            stale_epoch_dropped: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            gap_messages: AtomicU64::new(0),
            epoch_changes: AtomicU64::new(0),
            incomplete_resumes: AtomicU64::new(0),
            stray_messages: AtomicU64::new(0),
            unknown_frames: AtomicU64::new(0),
            malformed_frames: AtomicU64::new(0),
            invalid_frames: AtomicU64::new(0),
            events_discarded: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            messages_resent: AtomicU64::new(0),
            confirmed_by_echo: AtomicU64::new(0),
            confirmed_by_duplicate: AtomicU64::new(0),
            unconfirmed_abandoned: AtomicU64::new(0),
            unconfirmed: AtomicU64::new(0),
            last_reconnect_us: AtomicU64::new(NONE),
            last_recovery_us: AtomicU64::new(NONE),
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(NONE - 1)
}

fn duration(us: u64) -> Option<Duration> {
    (us != NONE).then(|| Duration::from_micros(us))
}

impl Stats {
    pub(crate) fn set_last_reconnect(&self, d: Duration) {
        self.last_reconnect_us.store(micros(d), Relaxed);
    }

    pub(crate) fn set_last_recovery(&self, d: Duration) {
        self.last_recovery_us.store(micros(d), Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            connects: self.connects.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            disconnects: self.disconnects.load(Relaxed),
            messages_delivered: self.messages_delivered.load(Relaxed),
            replayed_delivered: self.replayed_delivered.load(Relaxed),
            duplicates_dropped: self.duplicates_dropped.load(Relaxed),
            stale_epoch_dropped: self.stale_epoch_dropped.load(Relaxed),
            gaps: self.gaps.load(Relaxed),
            gap_messages: self.gap_messages.load(Relaxed),
            epoch_changes: self.epoch_changes.load(Relaxed),
            incomplete_resumes: self.incomplete_resumes.load(Relaxed),
            stray_messages: self.stray_messages.load(Relaxed),
            unknown_frames: self.unknown_frames.load(Relaxed),
            malformed_frames: self.malformed_frames.load(Relaxed),
            invalid_frames: self.invalid_frames.load(Relaxed),
            events_discarded: self.events_discarded.load(Relaxed),
            messages_sent: self.messages_sent.load(Relaxed),
            messages_resent: self.messages_resent.load(Relaxed),
            confirmed_by_echo: self.confirmed_by_echo.load(Relaxed),
            confirmed_by_duplicate: self.confirmed_by_duplicate.load(Relaxed),
            unconfirmed_abandoned: self.unconfirmed_abandoned.load(Relaxed),
            unconfirmed: self.unconfirmed.load(Relaxed),
            last_reconnect: duration(self.last_reconnect_us.load(Relaxed)),
            last_recovery: duration(self.last_recovery_us.load(Relaxed)),
        }
    }
}

/// A point-in-time copy of the client's counters. See `docs/CLIENT.md` for how to read them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// `connected` frames received (every successful connection, the first included).
    pub connects: u64,
    /// Connections after the first: `connects - 1` once connected at all.
    pub reconnects: u64,
    /// Attempts that failed before a `connected` frame, or before the re-sync completed.
    pub connect_failures: u64,
    /// Connections lost after their `connected` frame (including close by the node).
    pub disconnects: u64,
    /// `Message` events handed to the app (replays included).
    pub messages_delivered: u64,
    /// Of those, how many were replays (`replay: true`).
    pub replayed_delivered: u64,
    /// Messages received whose `(epoch, seq)` was not newer than the last delivered for the
    /// room: raw duplicates the node sent, never seen by the app.
    pub duplicates_dropped: u64,
    /// Messages of an epoch the room had already moved past; dropped.
    pub stale_epoch_dropped: u64,
    /// Live messages that skipped seqs (one per jump; see `gap_messages`).
    pub gaps: u64,
    /// Seqs skipped by those jumps, summed: messages known to be lost.
    pub gap_messages: u64,
    /// Rooms whose log epoch changed under the client.
    pub epoch_changes: u64,
    /// `resumed` frames with `complete: false`.
    pub incomplete_resumes: u64,
    /// Messages for rooms the app is not in (left, or never joined); dropped.
    pub stray_messages: u64,
    /// Frames with a `type` this library does not know (handed over as `Event::Unknown`).
    pub unknown_frames: u64,
    /// Frames of a known type with missing or mistyped fields (handed over as
    /// `Event::Unknown`).
    pub malformed_frames: u64,
    /// Frames that were not JSON objects, or binary; logged and dropped.
    pub invalid_frames: u64,
    /// Events dropped because the app had dropped its event receiver.
    pub events_discarded: u64,
    /// Messages `send` accepted (each got a `msg_id` and waited for its confirmation).
    pub messages_sent: u64,
    /// Writes of a message again, after a reconnect (or a `backbone_unavailable`), with the
    /// same `msg_id`.
    pub messages_resent: u64,
    /// Messages confirmed by their own echo (live or replayed).
    pub confirmed_by_echo: u64,
    /// Messages confirmed by a `duplicate` answer: a resend of one that had been published.
    pub confirmed_by_duplicate: u64,
    /// Unconfirmed messages given up because the app left their room.
    pub unconfirmed_abandoned: u64,
    /// Messages waiting for their confirmation now (a gauge, not a counter).
    pub unconfirmed: u64,
    /// From losing a connection to the next `connected` frame, for the latest reconnect.
    pub last_reconnect: Option<Duration>,
    /// From losing a connection until the client was back in sync (rooms re-joined, every
    /// replay done), for the latest reconnect.
    pub last_recovery: Option<Duration>,
}
