//! What the app receives: [`Event`]s, built from node frames and from the client's own
//! connection life (connects, losses, gaps, epoch changes).
//!
//! Node frames are decoded by `tether_proto::wire` (which also defines [`Message`],
//! [`PresenceUser`] and [`Session`]), leniently: extra fields are ignored, a frame of a type
//! this library does not know is handed over as [`Event::Unknown`], and a known type with
//! missing or mistyped fields is handed over the same way (and counted as malformed), so
//! nothing the node says is lost to a parsing disagreement.

use serde_json::Value;
use std::time::Duration;

/// [`Event::Error`] code of a WebSocket upgrade answered HTTP 400, 401 or 403: the request
/// (the client id) is refused, so the client does not retry and closes.
pub const UPGRADE_REFUSED: &str = "upgrade_refused";

/// Whether the node started a fresh session or restored one it found in the backbone.
pub use tether_proto::wire::SessionKind as Session;

/// A chat message of a room, as decoded from the node's `message` frame.
pub use tether_proto::wire::RoomMessage as Message;

/// One member in a `presence` or `online` answer.
pub use tether_proto::wire::PresenceUser;

/// Why a member left a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaveReason {
    Left,
    Disconnected,
    NodeDown,
    /// A reason this library does not know yet.
    Other(String),
}

impl From<String> for LeaveReason {
    fn from(s: String) -> Self {
        match s.as_str() {
            "left" => Self::Left,
            "disconnected" => Self::Disconnected,
            "node_down" => Self::NodeDown,
            _ => Self::Other(s),
        }
    }
}

/// Everything the client reports, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A connection is up (the node's `connected` frame). Re-joins and the `resume` follow;
    /// [`Client::status`](crate::Client::status) turns `Ready` once they are done.
    Connected {
        server: String,
        /// The client id in use (the server's, when it minted one).
        id: String,
        session: Session,
        /// The rooms the node restored (empty for a new session).
        rooms: Vec<String>,
        /// 1 when the first attempt of this (re)connection succeeded.
        attempt: u32,
        /// Time since the previous connection was lost; `None` on the first connect.
        since_disconnect: Option<Duration>,
    },
    /// The connection is in sync: every room re-joined, every replay done, held live frames
    /// delivered ([`Status::Ready`](crate::Status::Ready) from now on). Follows each
    /// `Connected`, once the re-sync completed.
    Ready {
        server: String,
        /// From losing the previous connection to now (loss → back in sync); `None` on the
        /// first connect.
        since_disconnect: Option<Duration>,
    },
    Message(Message),
    /// Someone joined `room` — or this client did: its own copy completes its join.
    UserJoined {
        room: String,
        user: String,
        id: String,
        server: String,
        /// The room's last assigned seq when the join was announced (0: no message yet);
        /// `None` from a node that does not report it. Every message after it reaches the
        /// joiner, so for the client's own join this is where its room history starts.
        head_seq: Option<u64>,
        /// The room log's epoch at that moment; `None` while the room has no messages.
        epoch: Option<String>,
    },
    UserLeft {
        room: String,
        user: String,
        id: String,
        server: String,
        reason: LeaveReason,
    },
    /// The replay of a room ended. `complete: false`: the log no longer held everything
    /// after the client's position (trimmed, or a new epoch) — messages were lost.
    Resumed {
        room: String,
        from_seq: u64,
        to_seq: u64,
        complete: bool,
        epoch: Option<String>,
    },
    /// A live message skipped seqs `expected..got` of its room (same epoch).
    Gap {
        room: String,
        expected: u64,
        got: u64,
    },
    /// The room's log epoch changed: Redis lost the old log; seqs restarted.
    EpochChanged {
        room: String,
        old: String,
        new: String,
    },
    /// An `error` frame from the node — or, with code [`UPGRADE_REFUSED`], the upgrade was
    /// refused for good (HTTP 400/401/403); `ConnectFailed` without a retry and `Closed` follow.
    Error {
        code: String,
        message: String,
    },
    Presence {
        room: String,
        users: Vec<PresenceUser>,
    },
    Online {
        users: Vec<PresenceUser>,
    },
    /// A connection ended. `code` is the close code when the node sent one (1012: it is
    /// draining — the client reconnects at once).
    Disconnected {
        code: Option<u16>,
        reason: String,
        will_retry: bool,
        /// The `msg_id`s sent and not confirmed when the connection dropped, oldest first:
        /// they are resent, in this order, once the next connection is in sync.
        unconfirmed: Vec<String>,
    },
    /// The node answered a (re)sent message with `duplicate`: a message with this `msg_id`
    /// had already been published, as `(epoch, seq)`, and nothing was delivered again. The
    /// message counts as confirmed; its echo comes (or came) like any other message.
    Duplicate {
        room: String,
        msg_id: String,
        seq: u64,
        epoch: String,
    },
    /// A connection attempt failed; `retry_in: None` means the client gives up.
    ConnectFailed {
        attempt: u32,
        error: String,
        retry_in: Option<Duration>,
    },
    /// A node frame this library does not understand, as received.
    Unknown(Value),
    /// The client stopped for good (after `close()`, after the last handle was dropped, or
    /// after `max_attempts`). Always the last event.
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leave_reasons_keep_what_they_do_not_know() {
        assert_eq!(LeaveReason::from("node_down".to_string()), LeaveReason::NodeDown);
        assert_eq!(LeaveReason::from("left".to_string()), LeaveReason::Left);
        assert_eq!(LeaveReason::from("disconnected".to_string()), LeaveReason::Disconnected);
        assert_eq!(LeaveReason::from("bored".to_string()), LeaveReason::Other("bored".into()));
    }
}
