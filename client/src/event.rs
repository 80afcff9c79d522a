//! What the app receives: [`Event`]s, built from node frames and from the client's own
//! connection life (connects, losses, gaps, epoch changes).
//!
//! Node frames are parsed leniently: extra fields are ignored, a frame of a type this
//! library does not know is handed over as [`Event::Unknown`], and a known type with
//! missing or mistyped fields is handed over the same way (and counted as malformed), so
//! nothing the node says is lost to a parsing disagreement.

use serde::Deserialize;
use serde_json::Value;
use std::time::Duration;

/// [`Event::Error`] code of a WebSocket upgrade answered HTTP 400, 401 or 403: the request
/// (the client id) is refused, so the client does not retry and closes.
pub const UPGRADE_REFUSED: &str = "upgrade_refused";

/// Whether the node started a fresh session or restored one it found in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Session {
    /// No session was found: the client re-sends its name and re-joins its rooms.
    New,
    /// The node re-joined the listed rooms already and holds their live frames until the
    /// client's `resume`.
    Restored,
}

/// A chat message of a room.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Message {
    pub room: String,
    /// Display name of the sender (its client id when it set none).
    pub from: String,
    /// Client id of the sender.
    pub id: String,
    pub text: String,
    /// The node the sender was connected to.
    pub server: String,
    /// Milliseconds since the Unix epoch, stamped by the sender's node.
    #[serde(default)]
    pub timestamp: u64,
    /// Position in the room's log, strictly increasing within `epoch`.
    pub seq: u64,
    /// The room log's epoch; a new one means Redis lost the log and seqs restarted.
    pub epoch: String,
    /// Sent again from the room's log in answer to `resume`.
    #[serde(default)]
    pub replay: bool,
}

/// One member in a `presence` or `online` answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PresenceUser {
    pub id: String,
    pub user: String,
    pub server: String,
}

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

/// A node frame, parsed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Frame {
    Connected { server: String, id: String, session: Session, rooms: Vec<String>, name: Option<String> },
    Message(Message),
    UserJoined { room: String, user: String, id: String, server: String, head_seq: Option<u64>, epoch: Option<String> },
    UserLeft { room: String, user: String, id: String, server: String, reason: LeaveReason },
    Resumed { room: String, from_seq: u64, to_seq: u64, complete: bool, epoch: Option<String> },
    Presence { room: String, users: Vec<PresenceUser> },
    Online { users: Vec<PresenceUser> },
    Error { code: String, message: String },
}

/// How a text frame parsed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Parsed {
    Frame(Frame),
    /// Valid JSON object with a `type` we do not know.
    Unknown(Value),
    /// A known `type` whose fields did not fit; the value is handed over as-is.
    Malformed(Value, String),
    /// Not JSON, or not an object.
    Invalid(String),
}

#[derive(Deserialize)]
struct ConnectedWire {
    #[serde(default)]
    server: String,
    id: String,
    session: Session,
    #[serde(default)]
    rooms: Vec<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct MemberWire {
    room: String,
    #[serde(default)]
    user: String,
    id: String,
    #[serde(default)]
    server: String,
    #[serde(default)]
    reason: Option<String>,
    /// `user_joined` only: the room's position when the join was announced.
    #[serde(default)]
    head_seq: Option<u64>,
    #[serde(default)]
    epoch: Option<String>,
}

#[derive(Deserialize)]
struct ResumedWire {
    room: String,
    from_seq: u64,
    to_seq: u64,
    #[serde(default)]
    epoch: Option<String>,
    // A node that omits it has nothing to admit.
    #[serde(default = "yes")]
    complete: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct PresenceWire {
    room: String,
    #[serde(default)]
    users: Vec<PresenceUser>,
}

#[derive(Deserialize)]
struct OnlineWire {
    #[serde(default)]
    users: Vec<PresenceUser>,
}

#[derive(Deserialize)]
struct ErrorWire {
    code: String,
    #[serde(default)]
    message: String,
}

/// Parses one text frame from the node. Never panics.
pub(crate) fn parse(text: &str) -> Parsed {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Parsed::Invalid(format!("not JSON: {e}")),
    };
    let Some(kind) = value.get("type").and_then(Value::as_str) else {
        return if value.is_object() { Parsed::Unknown(value) } else { Parsed::Invalid("not a JSON object".into()) };
    };
    let result = match kind {
        "connected" => ConnectedWire::deserialize(&value).map(|c| Frame::Connected {
            server: c.server,
            id: c.id,
            session: c.session,
            rooms: c.rooms,
            name: c.name,
        }),
        "message" => Message::deserialize(&value).map(Frame::Message),
        "user_joined" => MemberWire::deserialize(&value).map(|m| Frame::UserJoined {
            room: m.room,
            user: m.user,
            id: m.id,
            server: m.server,
            head_seq: m.head_seq,
            epoch: m.epoch,
        }),
        "user_left" => MemberWire::deserialize(&value).map(|m| Frame::UserLeft {
            room: m.room,
            user: m.user,
            id: m.id,
            server: m.server,
            reason: LeaveReason::from(m.reason.unwrap_or_else(|| "left".into())),
        }),
        "resumed" => ResumedWire::deserialize(&value).map(|r| Frame::Resumed {
            room: r.room,
            from_seq: r.from_seq,
            to_seq: r.to_seq,
            complete: r.complete,
            epoch: r.epoch,
        }),
        "presence" => PresenceWire::deserialize(&value).map(|p| Frame::Presence { room: p.room, users: p.users }),
        "online" => OnlineWire::deserialize(&value).map(|o| Frame::Online { users: o.users }),
        "error" => ErrorWire::deserialize(&value).map(|e| Frame::Error { code: e.code, message: e.message }),
        _ => return Parsed::Unknown(value),
    };
    match result {
        Ok(frame) => Parsed::Frame(frame),
        Err(e) => {
            let why = e.to_string();
            Parsed::Malformed(value, why)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_node_frame() {
        let p = parse(r#"{"type":"connected","server":"n1","id":"a","session":"restored","name":null,"rooms":["g"]}"#);
        assert!(matches!(
            p,
            Parsed::Frame(Frame::Connected { session: Session::Restored, ref rooms, .. }) if rooms == &["g"]
        ));
        let p = parse(
            r#"{"type":"message","room":"g","from":"A","id":"a","text":"hi","server":"n1","timestamp":5,"seq":7,"epoch":"e","replay":true,"new":1}"#,
        );
        let Parsed::Frame(Frame::Message(m)) = p else { panic!("{p:?}") };
        assert_eq!((m.seq, m.epoch.as_str(), m.replay), (7, "e", true));
        let p = parse(r#"{"type":"user_joined","room":"g","user":"A","id":"a","server":"n","head_seq":4,"epoch":"e"}"#);
        assert!(matches!(
            p,
            Parsed::Frame(Frame::UserJoined { head_seq: Some(4), epoch: Some(ref e), .. }) if e == "e"
        ));
        let p = parse(r#"{"type":"user_joined","room":"g","user":"A","id":"a","server":"n"}"#);
        assert!(matches!(p, Parsed::Frame(Frame::UserJoined { head_seq: None, epoch: None, .. })));
        let p = parse(r#"{"type":"user_left","room":"g","user":"A","id":"a","server":"n","reason":"node_down"}"#);
        assert!(matches!(p, Parsed::Frame(Frame::UserLeft { reason: LeaveReason::NodeDown, .. })));
        let p = parse(r#"{"type":"resumed","room":"g","from_seq":3,"to_seq":2,"epoch":"e","complete":false}"#);
        assert!(matches!(p, Parsed::Frame(Frame::Resumed { complete: false, from_seq: 3, .. })));
        let p = parse(r#"{"type":"online","users":[{"id":"a","user":"A","server":"n"}]}"#);
        assert!(matches!(p, Parsed::Frame(Frame::Online { ref users }) if users.len() == 1));
    }

    #[test]
    fn never_fails_hard() {
        assert!(matches!(parse("{nope"), Parsed::Invalid(_)));
        assert!(matches!(parse("[1]"), Parsed::Invalid(_)));
        assert!(matches!(parse(r#"{"type":"dance"}"#), Parsed::Unknown(_)));
        assert!(matches!(parse(r#"{"no":"type"}"#), Parsed::Unknown(_)));
        assert!(matches!(parse(r#"{"type":"message","room":"g","seq":"x"}"#), Parsed::Malformed(..)));
        assert!(matches!(
            parse(r#"{"type":"message","room":"g","from":"A","id":"a","text":"t","server":"n","seq":-1,"epoch":"e"}"#),
            Parsed::Malformed(..)
        ));
    }
}
