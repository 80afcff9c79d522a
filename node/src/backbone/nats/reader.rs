//! A room's reader on the NATS backbone: delivers what the room's live subject brings, in seq
//! order, and fills from the stream whatever never arrived live — a hole in the seqs, what
//! was republished while this node was reconnecting, and what a stream leader that moved
//! stored without its republish reaching us. After a reconnect or a leader move it compares
//! its position with the stream's head twice, a moment apart, retrying while JetStream elects.

use super::{NatsBackbone, Reader, StreamState, SEQ_HEADER};
use crate::backbone::catch_up::{deliver_missed, flag_gap, has_gap};
use crate::backbone::keeper::Backoff;
use crate::backbone::BackboneError;
use futures_util::StreamExt;
use std::sync::Arc;
use tether_proto::wire::complete_message;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{debug, warn};

/// Times a room reader compares its position with the stream after a reconnect or a leader
/// move: at once, and once more a moment later for what was still on its way (a republish
/// routed from another server before our subscription's interest reached it).
const HEAD_CHECKS: u32 = 2;
/// The pause between those two.
const HEAD_RECHECK_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// Attempts at them (JetStream may not answer while it elects a leader) before the reader
/// leaves it to the next live message's hole filling.
const HEAD_CHECK_ATTEMPTS: u32 = 30;

/// A room reader's pending comparisons with its stream's head.
struct HeadCheck {
    /// Successful checks still wanted (0: none pending).
    wanted: u32,
    /// Attempts left for them.
    attempts: u32,
    at: tokio::time::Instant,
}

impl Default for HeadCheck {
    fn default() -> Self {
        Self { wanted: 0, attempts: 0, at: tokio::time::Instant::now() }
    }
}

impl HeadCheck {
    fn due(why: &'static str) -> Self {
        debug!(why, "room reader checks its stream");
        Self { wanted: HEAD_CHECKS, attempts: HEAD_CHECK_ATTEMPTS, at: tokio::time::Instant::now() }
    }

    fn passed(&mut self) {
        self.wanted -= 1;
        self.at = tokio::time::Instant::now() + HEAD_RECHECK_AFTER;
    }

    fn failed(&mut self, room: &str, e: &BackboneError, min: std::time::Duration, max: std::time::Duration) {
        self.attempts = self.attempts.saturating_sub(1);
        let attempt = (HEAD_CHECK_ATTEMPTS - self.attempts) as usize;
        if self.attempts == 0 {
            warn!(room, error = %e, "could not check the room stream; the next message fills any hole");
            self.wanted = 0;
        } else {
            debug!(room, error = %e, attempt, "could not check the room stream; trying again");
            self.at = tokio::time::Instant::now() + Backoff::nth(min, max, attempt);
        }
    }
}

impl NatsBackbone {
    /// One room's reader: delivers what its live subject brings, in seq order, filling any
    /// hole from the stream first; runs until released or shut down.
    pub(super) async fn read_room(
        self: Arc<Self>,
        room: String,
        mut sub: async_nats::Subscriber,
        mut state: StreamState,
        reader: Reader,
    ) {
        let Reader { stop, recheck } = reader;
        let mut connected = self.connected.clone();
        connected.mark_unchanged();
        // The last seq delivered (or known to be before this node's subscription).
        let mut last = state.head;
        let mut check = HeadCheck::default();
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.shutdown.cancelled() => break,
                changed = connected.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    // After a reconnect: anything republished meanwhile was lost to us.
                    check = HeadCheck::due("reconnected");
                    continue;
                }
                () = recheck.notified() => {
                    // The stream's leader moved: what it had stored but not republished (or
                    // what was in flight from the old one) reaches us only from the log.
                    check = HeadCheck::due("stream leader moved");
                    continue;
                }
                () = tokio::time::sleep_until(check.at), if check.wanted > 0 => {
                    match self.check_head(&room, &mut state, last).await {
                        Ok(now) => {
                            last = now;
                            check.passed();
                        }
                        Err(e) => check.failed(&room, &e, self.cfg.reconnect_min, self.cfg.reconnect_max),
                    }
                    continue;
                }
                msg = sub.next() => msg,
            };
            let Some(msg) = msg else { break };
            self.metrics.frames_from_backbone.inc();
            let seq = msg.headers.as_ref().and_then(|h| h.get(SEQ_HEADER)).and_then(|v| v.as_str().parse::<u64>().ok());
            let Ok(text) = std::str::from_utf8(&msg.payload) else {
                warn!(room, "non-UTF-8 frame on a room subject; dropped");
                continue;
            };
            let Some(seq) = seq else {
                // A membership event: no seq, not logged.
                self.inbound.deliver(&room, &Utf8Bytes::from(text));
                continue;
            };
            if seq <= last {
                // Delivered already, by a fill or before this node subscribed.
                continue;
            }
            if seq > last + 1 {
                last = self.fill(&room, last, seq - 1, &state).await.unwrap_or(last);
            }
            self.inbound.deliver(&room, &Utf8Bytes::from(complete_message(text, seq, &state.epoch)));
            last = last.max(seq);
        }
        debug!(room, "room reader stopped");
    }

    /// Compares the room's stream with what this reader has delivered (`last`) and delivers
    /// what never arrived live; returns the new last seq. A re-created stream (new epoch) is
    /// delivered from its start.
    async fn check_head(&self, room: &str, state: &mut StreamState, last: u64) -> Result<u64, BackboneError> {
        let now = self.ensure_stream(room).await?;
        let from = if now.epoch == state.epoch {
            last
        } else {
            warn!(room, "room stream was re-created (new epoch); delivering it from its start");
            0
        };
        // The state moves on only once filled: a failed fill is tried again from the same place.
        let filled = self.fill(room, from, now.head, &now).await;
        let filled = filled.ok_or_else(|| BackboneError::Nats("reading the room log".into()))?;
        *state = now;
        Ok(filled)
    }

    /// Delivers the logged messages `after+1..=to` that never arrived live; returns the new
    /// last seq, or `None` if the log could not be read (the next message tries again).
    async fn fill(&self, room: &str, after: u64, to: u64, state: &StreamState) -> Option<u64> {
        if to <= after {
            return Some(after);
        }
        let frames = match self.fetch(room, after + 1, to, &state.epoch).await {
            Ok(f) => f,
            Err(e) => {
                warn!(room, after, to, error = %e, "could not read the room log to fill a hole");
                return None;
            }
        };
        if has_gap(after, to, &frames) {
            flag_gap(&self.metrics, room, after);
        }
        deliver_missed(self.inbound.as_ref(), &self.metrics, room, frames);
        Some(to)
    }
}
