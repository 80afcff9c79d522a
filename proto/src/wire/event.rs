//! Node → client frames other than the room message's bytes: [`Event`], which the node
//! serialises once per event and shares with every recipient, and [`NodeFrame`], the owned
//! form every reader (the client library, the CLI, tests) decodes with [`decode_node_frame`].
//!
//! Reading is lenient, because a client must survive a newer or odd node: extra fields are
//! ignored, fields a reader can live without have defaults, and an unknown `type` or a known
//! one whose fields do not fit is returned whole in a [`NodeFrameError`] rather than lost.

use super::codes::ErrorCode;
use super::message::RoomMessage;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a member left a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    Left,
    Disconnected,
    NodeDown,
    /// Taken out of the room by the server API (`POST /api/unsubscribe`).
    Removed,
}

impl LeaveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Left => "left",
            Self::Disconnected => "disconnected",
            Self::NodeDown => "node_down",
            Self::Removed => "removed",
        }
    }
}

/// Whether `connected` starts a new session or brings back one found in the backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    /// No session was found: the client re-sends its name and re-joins its rooms.
    New,
    /// The node re-joined the listed rooms already and holds their live frames until the
    /// client's `resume`.
    Restored,
}

/// One member in a `presence` or `online` answer, as the node writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresenceEntry<'a> {
    pub id: &'a str,
    pub user: &'a str,
    pub server: &'a str,
}

/// A frame from node to client (all but `message`, see
/// [`MessageHead`](super::MessageHead)).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event<'a> {
    Connected {
        server: &'a str,
        id: &'a str,
        session: SessionKind,
        name: Option<&'a str>,
        rooms: Vec<&'a str>,
    },
    /// As delivered, the backbone appends the room's position: `,"head_seq":N,"epoch":"…"}`.
    UserJoined {
        room: &'a str,
        user: &'a str,
        id: &'a str,
        server: &'a str,
    },
    UserLeft {
        room: &'a str,
        user: &'a str,
        id: &'a str,
        server: &'a str,
        reason: LeaveReason,
    },
    /// End of a replay: messages `from_seq..=to_seq` were sent (`from_seq > to_seq` when
    /// nothing was missed); `complete:false` if the log no longer held everything asked for or
    /// the epoch changed.
    Resumed {
        room: &'a str,
        from_seq: u64,
        to_seq: u64,
        epoch: Option<&'a str>,
        complete: bool,
    },
    Presence {
        room: &'a str,
        users: Vec<PresenceEntry<'a>>,
    },
    Online {
        users: Vec<PresenceEntry<'a>>,
    },
    /// `msg_id`: when the refused frame was a `message` with one (so that whoever resends
    /// unconfirmed messages knows this one is settled).
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        msg_id: Option<&'a str>,
    },
    /// A `message` whose `(client, msg_id)` was published already: nothing was published
    /// again; `seq`/`epoch` name the first one. Sent to the sender alone.
    Duplicate {
        room: &'a str,
        msg_id: &'a str,
        seq: u64,
        epoch: &'a str,
    },
    /// A `refresh` was accepted: the connection now expires at `exp` (Unix seconds).
    Refreshed {
        exp: u64,
    },
    /// Sent by a balancer in `failover = "rehome"` mode, instead of the new node's
    /// `connected`: the client's connection moved from node `from` to `server`, its `rooms`
    /// were resumed, and nothing was lost.
    Rehomed {
        from: &'a str,
        server: &'a str,
        rooms: Vec<&'a str>,
    },
}

impl Event<'_> {
    /// The frame's JSON text.
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail: no maps with non-string keys, no
        // user-defined Serialize impls that error.
        serde_json::to_string(self).expect("events always serialise")
    }
}

/// One member in a `presence` or `online` answer, as a reader holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceUser {
    pub id: String,
    pub user: String,
    pub server: String,
}

/// A node frame, decoded and owned. Its JSON (via [`NodeFrame::to_json`]) is the bytes the
/// node sends for the same content, field order included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeFrame {
    Connected {
        #[serde(default)]
        server: String,
        id: String,
        session: SessionKind,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        rooms: Vec<String>,
    },
    Message(RoomMessage),
    UserJoined {
        room: String,
        #[serde(default)]
        user: String,
        id: String,
        #[serde(default)]
        server: String,
        /// The room's last assigned seq when the join was announced (0: no message yet);
        /// `None` from a node that does not report it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        head_seq: Option<u64>,
        /// The room log's epoch at that moment; `None` while the room has no log.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
    UserLeft {
        room: String,
        #[serde(default)]
        user: String,
        id: String,
        #[serde(default)]
        server: String,
        /// `left`, `disconnected`, `node_down` ([`LeaveReason`]) — kept as text so a reason
        /// this version does not know still reaches the reader.
        #[serde(default = "left")]
        reason: String,
    },
    Resumed {
        room: String,
        from_seq: u64,
        to_seq: u64,
        #[serde(default)]
        epoch: Option<String>,
        // A node that omits it has nothing to admit.
        #[serde(default = "yes")]
        complete: bool,
    },
    Presence {
        room: String,
        #[serde(default)]
        users: Vec<PresenceUser>,
    },
    Online {
        #[serde(default)]
        users: Vec<PresenceUser>,
    },
    Duplicate {
        room: String,
        msg_id: String,
        seq: u64,
        epoch: String,
    },
    Error {
        /// An [`ErrorCode`] ([`ErrorCode::parse`]), kept as text so a code this version does
        /// not know still reaches the reader.
        code: String,
        #[serde(default)]
        message: String,
        /// The refused `message`'s `msg_id`, when it had one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        msg_id: Option<String>,
    },
    Refreshed {
        exp: u64,
    },
    /// The balancer moved the connection to another node without closing it (rehome mode).
    Rehomed {
        #[serde(default)]
        from: String,
        #[serde(default)]
        server: String,
        #[serde(default)]
        rooms: Vec<String>,
    },
}

fn yes() -> bool {
    true
}

fn left() -> String {
    LeaveReason::Left.as_str().to_string()
}

/// The `type`s [`NodeFrame`] knows.
pub const NODE_FRAME_TYPES: [&str; 11] = [
    "connected",
    "message",
    "user_joined",
    "user_left",
    "resumed",
    "presence",
    "online",
    "duplicate",
    "error",
    "refreshed",
    "rehomed",
];

impl NodeFrame {
    /// The frame's JSON text.
    pub fn to_json(&self) -> String {
        match self {
            // Built the way the publishing path builds it, so the bytes agree by construction.
            Self::Message(m) => m.to_json(),
            _ => serde_json::to_string(self).expect("node frames always serialise"),
        }
    }
}

/// A node frame that [`decode_node_frame`] could not make a [`NodeFrame`] of.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NodeFrameError {
    /// Not JSON, or not a JSON object.
    #[error("{0}")]
    Invalid(String),
    /// A JSON object without a `type` this version knows; handed over as received.
    #[error("unknown frame type")]
    Unknown(Value),
    /// A known `type` whose fields did not fit; the value is handed over as received.
    #[error("malformed frame: {1}")]
    Malformed(Value, String),
}

/// Decodes one text frame from a node. Never panics.
pub fn decode_node_frame(text: &str) -> Result<NodeFrame, NodeFrameError> {
    // Room messages, the frames that come by the thousand, are read straight from the text:
    // their `data` keeps its bytes (a `RawValue` cannot come out of a parsed `Value`).
    if super::message::frame_type(text.as_bytes()) == Some(b"message") {
        if let Ok(m) = serde_json::from_str::<RoomMessage>(text) {
            return Ok(NodeFrame::Message(m));
        }
    }
    let value: Value = serde_json::from_str(text).map_err(|e| NodeFrameError::Invalid(format!("not JSON: {e}")))?;
    let Some(kind) = value.get("type").and_then(Value::as_str) else {
        return Err(if value.is_object() {
            NodeFrameError::Unknown(value)
        } else {
            NodeFrameError::Invalid("not a JSON object".into())
        });
    };
    if !NODE_FRAME_TYPES.contains(&kind) {
        return Err(NodeFrameError::Unknown(value));
    }
    if kind == "message" {
        return match serde_json::from_str::<RoomMessage>(text) {
            Ok(m) => Ok(NodeFrame::Message(m)),
            Err(e) => {
                let why = e.to_string();
                Err(NodeFrameError::Malformed(value, why))
            }
        };
    }
    match NodeFrame::deserialize(&value) {
        Ok(frame) => Ok(frame),
        Err(e) => {
            let why = e.to_string();
            Err(NodeFrameError::Malformed(value, why))
        }
    }
}

/// Frame completion of a `user_joined` event: the room's position at the join — the last seq
/// assigned (`head_seq`) and, if the room has a log, its `epoch` — appended before the closing
/// brace, so the joiner knows where its live messages start.
pub fn complete_joined(event: &str, head_seq: u64, epoch: Option<&str>) -> String {
    let body = event.strip_suffix('}').unwrap_or(event);
    match epoch {
        Some(epoch) => format!("{body},\"head_seq\":{head_seq},\"epoch\":\"{epoch}\"}}"),
        None => format!("{body},\"head_seq\":{head_seq}}}"),
    }
}
