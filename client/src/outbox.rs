//! The connection task's way to the app: events are never dropped while someone listens,
//! and a full channel pauses socket reads rather than the command loop.

use crate::event::Event;
use crate::shared::Shared;
use crate::stats::bump;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::debug;

/// Events on their way to the app. `try_send` first; when the channel is full they wait
/// here, and the connection loop stops reading the socket until this is empty again.
pub(crate) struct Outbox {
    tx: mpsc::Sender<Event>,
    pending: VecDeque<Event>,
    /// The app dropped its receiver: events are counted as discarded from then on.
    gone: bool,
    shared: Arc<Shared>,
}

impl Outbox {
    pub(crate) fn new(tx: mpsc::Sender<Event>, shared: Arc<Shared>) -> Self {
        Self { tx, pending: VecDeque::new(), gone: false, shared }
    }

    /// Queues `ev`; false when it was discarded because nobody listens any more.
    pub(crate) fn push(&mut self, ev: Event) -> bool {
        if self.gone {
            bump(&self.shared.stats.events_discarded);
            return false;
        }
        if self.pending.is_empty() {
            match self.tx.try_send(ev) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(ev)) => self.pending.push_back(ev),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.receiver_gone();
                    bump(&self.shared.stats.events_discarded);
                    return false;
                }
            }
        } else {
            self.pending.push_back(ev);
        }
        true
    }

    pub(crate) fn blocked(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Hands the oldest pending event over once the channel has room. Cancel-safe: the
    /// event leaves `pending` only together with a granted slot.
    pub(crate) async fn hand_over(&mut self) {
        let gone = match self.tx.reserve().await {
            Ok(permit) => {
                if let Some(ev) = self.pending.pop_front() {
                    permit.send(ev);
                }
                false
            }
            Err(_) => true,
        };
        if gone {
            self.receiver_gone();
        }
    }

    fn receiver_gone(&mut self) {
        if !self.gone {
            debug!("event receiver dropped; discarding events from now on");
        }
        self.gone = true;
        let n = self.pending.len() as u64;
        self.pending.clear();
        self.shared.stats.events_discarded.fetch_add(n, Relaxed);
    }

    /// At the very end: waits until every event is taken (or the receiver is gone).
    pub(crate) async fn flush(&mut self) {
        while let Some(ev) = self.pending.pop_front() {
            if self.gone || self.tx.send(ev).await.is_err() {
                self.receiver_gone();
                return;
            }
        }
    }
}
