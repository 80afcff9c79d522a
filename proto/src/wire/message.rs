//! The room `message` frame, node → client: its one frame whose bytes are built in two
//! steps and then never re-serialised.
//!
//! The publishing node serialises a [`MessageHead`] once into [`MessageHead::json_prefix`];
//! the backbone's atomic publish step appends the seq digits and `,"epoch":"E"}`
//! ([`complete_message`] spells the same bytes), so the frame every node delivers — live or
//! from the room's log — is byte-for-byte the one stored. A replay adds `,"replay":true`
//! ([`mark_replay`]). Nodes then only need the frame's position, which [`MessageMeta::read`]
//! and [`frame_type`] find without a full parse; readers that want everything decode a
//! [`RoomMessage`] (through [`decode_node_frame`](super::decode_node_frame)).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A message's `data`: any JSON value, kept as the sender wrote it (the bytes are passed
/// through, never re-serialised, so key order and number forms survive).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(pub Box<RawValue>);

impl RawJson {
    /// Parses `json` (one JSON value) and keeps its text.
    pub fn parse(json: &str) -> Result<Self, serde_json::Error> {
        RawValue::from_string(json.to_owned()).map(Self)
    }

    /// The value as JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl std::ops::Deref for RawJson {
    type Target = RawValue;
    fn deref(&self) -> &RawValue {
        &self.0
    }
}

/// Equal when the JSON texts are.
impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for RawJson {}

/// The part of a room `message` frame known before publishing.
#[derive(Debug, Clone, Serialize)]
pub struct MessageHead<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub room: &'a str,
    pub from: &'a str,
    pub id: &'a str,
    pub text: &'a str,
    pub server: &'a str,
    pub timestamp: u64,
    /// The message's JSON payload, when the sender gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
    /// The sender's own id for the message (idempotent publish), echoed back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<&'a str>,
}

impl MessageHead<'_> {
    /// The JSON object without its closing brace, followed by `,"seq":` — ready for the seq
    /// digits, then `,"epoch":"…"}`.
    pub fn json_prefix(&self) -> String {
        let mut s = serde_json::to_string(self).expect("message heads always serialise");
        // `to_string` of a struct always ends with `}`.
        s.pop();
        s.push_str(",\"seq\":");
        s
    }
}

/// The delivered frame: `prefix` (from [`MessageHead::json_prefix`]) completed with the seq
/// and epoch the backbone assigned. Epochs are generated ids that need no JSON escaping.
pub fn complete_message(prefix: &str, seq: u64, epoch: &str) -> String {
    format!("{prefix}{seq},\"epoch\":\"{epoch}\"}}")
}

/// Marks a logged message frame as a replay: `…,"epoch":"E"}` → `…,"epoch":"E","replay":true}`.
pub fn mark_replay(frame: &str) -> String {
    let body = frame.strip_suffix('}').unwrap_or(frame);
    let mut out = String::with_capacity(body.len() + 16);
    out.push_str(body);
    out.push_str(",\"replay\":true}");
    out
}

/// A room message as a reader holds it, decoded from a `message` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMessage {
    pub room: String,
    /// Display name of the sender (its client id when it set none).
    pub from: String,
    /// Client id of the sender.
    pub id: String,
    /// `""` when the sender gave only `data`.
    #[serde(default)]
    pub text: String,
    /// The node the sender was connected to.
    pub server: String,
    /// Milliseconds since the Unix epoch, stamped by the sender's node.
    #[serde(default)]
    pub timestamp: u64,
    /// The message's JSON payload, as the sender wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<RawJson>,
    /// The sender's id for the message, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    /// Position in the room's log, strictly increasing within `epoch`.
    pub seq: u64,
    /// The room log's epoch; a new one means the backbone lost the log and seqs restarted.
    pub epoch: String,
    /// Sent again from the room's log in answer to `resume`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replay: bool,
}

impl RoomMessage {
    /// The frame's JSON text, the same bytes the publishing path produces (and, when
    /// `replay`, the same as [`mark_replay`] of them).
    pub fn to_json(&self) -> String {
        let head = MessageHead {
            kind: "message",
            room: &self.room,
            from: &self.from,
            id: &self.id,
            text: &self.text,
            server: &self.server,
            timestamp: self.timestamp,
            data: self.data.as_deref(),
            msg_id: self.msg_id.as_deref(),
        };
        let frame = complete_message(&head.json_prefix(), self.seq, &self.epoch);
        if self.replay {
            mark_replay(&frame)
        } else {
            frame
        }
    }
}

/// The `type` of a node frame, read from its opening `{"type":"…"` without parsing; `None`
/// when the frame does not start that way (every frame a node builds does). Works on bytes
/// so that raw-socket readers (the benchmarks) can use it too.
pub fn frame_type(frame: &[u8]) -> Option<&[u8]> {
    let rest = frame.strip_prefix(b"{\"type\":\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    Some(&rest[..end])
}

/// The `room` of a `message` frame as it stands in the JSON (escapes not resolved), read
/// without parsing: the head puts it right after `type`.
pub fn message_room(frame: &str) -> Option<&str> {
    let rest = frame.strip_prefix("{\"type\":\"message\",\"room\":\"")?;
    let bytes = rest.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(&rest[..i]),
            _ => i += 1,
        }
    }
    None
}

/// The seq and epoch of a room `message` frame, read from its JSON without a full parse
/// (the node does this for every delivered message, to gate it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageMeta<'a> {
    pub seq: u64,
    pub epoch: &'a str,
}

impl<'a> MessageMeta<'a> {
    /// `Some` for message frames (which the atomic publish step ends with
    /// `,"seq":N,"epoch":"E"}`), `None` for membership events.
    pub fn read(frame: &'a str) -> Option<Self> {
        if !frame.starts_with("{\"type\":\"message\"") {
            return None;
        }
        // Inside JSON strings quotes are escaped, so the unescaped `,"seq":` is the field.
        let at = frame.rfind(",\"seq\":")?;
        let rest = &frame[at + 7..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let seq = rest[..digits].parse().ok()?;
        let rest = rest[digits..].strip_prefix(",\"epoch\":\"")?;
        let epoch = &rest[..rest.find('"')?];
        Some(Self { seq, epoch })
    }
}
