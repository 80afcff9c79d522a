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
pub async fn catch_up(log: &dyn Backbone, inbound: &dyn Inbound, metrics: &Metrics) -> Result<(), BackboneError> {
    let positions = inbound.positions().into_iter().filter_map(|(room, last)| Some((room, last?)));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::memory::{taken, Store, TestNode};
    use crate::outbox::Outbox;
    use std::time::Duration;

    /// The `(text, seq, epoch)` of each message waiting in `out`.
    fn messages(out: &Outbox) -> Vec<(String, u64, String)> {
        taken(out)
            .iter()
            .map(|m| {
                let s = |k: &str| m[k].as_str().unwrap_or_default().to_string();
                (s("text"), m["seq"].as_u64().unwrap_or_default(), s("epoch"))
            })
            .collect()
    }

    fn texts(out: &Outbox) -> Vec<(String, u64)> {
        messages(out).into_iter().map(|(t, s, _)| (t, s)).collect()
    }

    fn expect(items: &[(&str, u64)]) -> Vec<(String, u64)> {
        items.iter().map(|(t, s)| (t.to_string(), *s)).collect()
    }

    /// Cut off `node`, let `during` happen, connect it again and catch up.
    async fn miss(node: &TestNode, during: impl std::future::Future<Output = ()>) {
        node.connect(false);
        during.await;
        node.connect(true);
        catch_up(node.backbone.as_ref(), node.inbound.as_ref(), &node.metrics).await.unwrap();
    }

    #[tokio::test]
    async fn a_reconnect_delivers_exactly_what_was_missed() {
        let store = Store::new(Duration::from_secs(30));
        let (a, b) = (store.add_node("a"), store.add_node("b"));
        a.join(1, "alice", "r").await;
        let bob = b.join(1, "bob", "r").await;
        a.say("r", &["m1", "m2", "m3"]).await;
        assert_eq!(texts(&bob), expect(&[("m1", 1), ("m2", 2), ("m3", 3)]), "live");
        miss(&b, a.say("r", &["m4", "m5", "m6"])).await;
        assert_eq!(texts(&bob), expect(&[("m4", 4), ("m5", 5), ("m6", 6)]));
        assert_eq!((b.metrics.caught_up_messages.get(), b.metrics.catch_up_gaps.get()), (3, 0));
        // Nothing missed: nothing delivered again.
        catch_up(b.backbone.as_ref(), b.inbound.as_ref(), &b.metrics).await.unwrap();
        assert!(texts(&bob).is_empty());
    }

    #[tokio::test]
    async fn a_log_trimmed_past_what_was_missed_is_flagged_as_a_gap() {
        let store = Store::new(Duration::from_secs(30));
        let (a, b) = (store.add_node("a"), store.add_node("b"));
        a.join(1, "alice", "r").await;
        let bob = b.join(1, "bob", "r").await;
        a.say("r", &["m1"]).await;
        taken(&bob);
        miss(&b, async {
            a.say("r", &["m2", "m3", "m4"]).await;
            store.trim("r", 3);
        })
        .await;
        assert_eq!(texts(&bob), expect(&[("m4", 4)]));
        assert_eq!(b.metrics.catch_up_gaps.get(), 1);
        // Everything trimmed: the head alone shows the hole.
        miss(&b, async {
            a.say("r", &["m5"]).await;
            store.trim("r", 5);
        })
        .await;
        assert!(texts(&bob).is_empty());
        assert_eq!(b.metrics.catch_up_gaps.get(), 2);
    }

    #[tokio::test]
    async fn a_room_in_a_new_epoch_is_delivered_from_its_start() {
        let store = Store::new(Duration::from_secs(30));
        let (a, b) = (store.add_node("a"), store.add_node("b"));
        a.join(1, "alice", "r").await;
        let bob = b.join(1, "bob", "r").await;
        a.say("r", &["m1", "m2"]).await;
        let old = messages(&bob)[0].2.clone();
        miss(&b, async {
            store.forget_room("r");
            a.say("r", &["n1", "n2"]).await;
        })
        .await;
        let got = messages(&bob);
        assert_eq!(got.iter().map(|(t, s, _)| (t.clone(), *s)).collect::<Vec<_>>(), expect(&[("n1", 1), ("n2", 2)]));
        assert!(got.iter().all(|(_, _, e)| *e != old), "the new epoch's frames");
        assert_eq!(b.metrics.catch_up_gaps.get(), 0, "a new epoch is not a gap");
    }

    #[test]
    fn a_gap_is_a_missing_first_seq_or_a_head_past_an_empty_read() {
        let f = |seqs: &[u64]| seqs.iter().map(|s| (*s, String::new())).collect::<Vec<_>>();
        assert!(!has_gap(3, 5, &f(&[4, 5])));
        assert!(has_gap(3, 5, &f(&[5])));
        assert!(has_gap(3, 5, &f(&[])));
        assert!(!has_gap(5, 5, &f(&[])));
    }
}
