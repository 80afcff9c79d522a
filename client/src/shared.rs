//! What a [`Client`](crate::Client) handle and its connection task share: the [`Status`]
//! they both see, the [`Shared`] state the task updates and handles read, and the
//! [`Command`]s handles send. Kept apart from both so that neither imports the other's
//! internals.

use crate::error::Error;
use crate::order::Position;
use crate::stats::Stats;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use tether_proto::wire::RawJson;
use tokio::sync::{oneshot, watch};

/// How a command's outcome gets back to the handle that sent it.
pub(crate) type Reply = oneshot::Sender<Result<(), Error>>;
/// A `send`'s outcome: the message's `msg_id` once it is queued for delivery.
pub(crate) type SendReply = oneshot::Sender<Result<String, Error>>;

/// Where the connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Connecting, or waiting to; `attempt` counts consecutive tries (1 = the first).
    Connecting { attempt: u32 },
    /// Connected to `server`; re-joining rooms and replaying what was missed. Sends are
    /// refused with [`Error::NotConnected`] until `Ready`.
    Syncing { server: String },
    /// In sync with `server`: every room re-joined, every replay done.
    Ready { server: String },
    /// Stopped for good.
    Closed,
}

/// State shared by the connection task and every handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) stats: Stats,
    pub(crate) status: watch::Sender<Status>,
    pub(crate) view: Mutex<View>,
}

/// What handles may read about the session. Updated by the connection task; the lock is
/// never held across an `.await`.
#[derive(Debug, Default)]
pub(crate) struct View {
    pub(crate) id: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) rooms: BTreeMap<String, Option<Position>>,
}

impl Shared {
    pub(crate) fn view(&self) -> MutexGuard<'_, View> {
        // A poisoned lock only means a panic elsewhere mid-update of plain data; the data
        // is still the best we have.
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request from a [`Client`](crate::Client) handle.
#[derive(Debug)]
pub(crate) enum Command {
    Join(String, Reply),
    Leave(String, Reply),
    Send { room: String, text: String, data: Option<RawJson>, reply: SendReply },
    SetName(String, Reply),
    Presence(String, Reply),
    Online(Reply),
    Close(oneshot::Sender<()>),
}
