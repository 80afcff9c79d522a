//! Catch-up and gap detection, for every backbone with a room log.
//!
//! Live delivery can miss frames: a subscription that was down (a Redis that restarted, a
//! NATS reconnect) hears nothing published meanwhile. The room's log has them: for each room
//! with local members, the last position the hub delivered is compared with the log, and what
//! the log holds after it is delivered. Members' gates drop whatever also arrives live, so
//! nothing is delivered twice. When the log no longer holds everything (trimmed, expired),
//! the hole is logged and counted: members see a seq gap, as they must, rather than a
//! silent one. A room whose epoch changed (the backbone lost it and started again) is
//! delivered from the start of its new epoch.

use super::inbound::Inbound;
use super::{Backbone, BackboneError};
use crate::metrics::Metrics;
use futures_util::stream::{self, TryStreamExt};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{info, warn};

/// Rooms caught up concurrently (their reads are pipelined on the backbone's connection).
const CONCURRENCY: usize = 64;

/// Catches up every room of `positions` (the hub's rooms with the `(epoch, seq)` last
/// delivered there; rooms where nothing was delivered yet have nothing to catch up). Fails
/// on the first error that says the backbone cannot answer, so a gap is never left unfilled
/// behind a node that says it is ready; other failures are logged and cost only their room.
pub async fn catch_up(
    positions: Vec<(String, Option<(String, u64)>)>,
    log: &dyn Backbone,
    inbound: &dyn Inbound,
    metrics: &Metrics,
) -> Result<(), BackboneError> {
    let positions = positions.into_iter().filter_map(|(room, last)| Some((room, last?)));
    stream::iter(positions.map(Ok::<_, BackboneError>))
        .try_for_each_concurrent(CONCURRENCY, |(room, (epoch, seq))| async move {
            match catch_up_room(log, inbound, metrics, &room, &epoch, seq).await {
                Err(e) if e.is_connection_failure() => Err(e),
                Err(e) => {
                    warn!(room, error = %e, "catch-up from the room log failed");
                    Ok(())
                }
                Ok(_) => Ok(()),
            }
        })
        .await
}

/// Delivers what `room`'s log holds after `seq` of `epoch`; returns how many frames.
pub async fn catch_up_room(
    log: &dyn Backbone,
    inbound: &dyn Inbound,
    metrics: &Metrics,
    room: &str,
    epoch: &str,
    seq: u64,
) -> Result<usize, BackboneError> {
    let mut replay = log.replay(room, seq).await?;
    if replay.epoch.as_deref() != Some(epoch) {
        // The backbone lost the room: everything in its new epoch is new to our members.
        replay = log.replay(room, 0).await?;
    } else if has_gap(seq, replay.head_seq, &replay.frames) {
        flag_gap(metrics, room, seq);
    }
    Ok(deliver_missed(inbound, metrics, room, replay.frames))
}

/// Whether `frames` — what a log held after `after`, when its head was `head` — leave a hole:
/// the first is not `after + 1`, or there are none although the head is past `after`.
pub fn has_gap(after: u64, head: u64, frames: &[(u64, String)]) -> bool {
    match frames.first() {
        Some((first, _)) => *first > after + 1,
        None => head > after,
    }
}

/// Logs and counts a hole after `after` in `room`.
pub fn flag_gap(metrics: &Metrics, room: &str, after: u64) {
    warn!(room, after, "room log no longer holds all that was missed; members see a seq gap");
    metrics.catch_up_gaps.inc();
}

/// Delivers frames read from `room`'s log, in order, and counts them; returns how many.
pub fn deliver_missed(inbound: &dyn Inbound, metrics: &Metrics, room: &str, frames: Vec<(u64, String)>) -> usize {
    let n = frames.len();
    for (_, frame) in frames {
        inbound.deliver(room, &Utf8Bytes::from(frame));
    }
    if n > 0 {
        metrics.caught_up_messages.inc_by(n as u64);
        info!(room, messages = n, "caught up from the room log");
    }
    n
}
