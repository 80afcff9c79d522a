//! The JSON wire protocol between clients and nodes (`DESIGN.md`, "Wire protocol").
//!
//! Client frames are decoded by [`decode`], which never panics and names what was wrong with
//! an [`ErrorCode`]; node frames are built from [`Event`] (serialised once per event, then
//! shared by every recipient) and, for room messages, from [`MessageHead`], whose `seq` and
//! `epoch` are filled in by Redis in the atomic publish step.

use serde::Serialize;
use serde_json::Value;
use std::fmt;

/// Longest room name, in bytes.
pub const MAX_ROOM_LEN: usize = 128;
/// Longest display name, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// Close code: the node is draining or shutting down; reconnect now.
pub const CLOSE_RESTART: u16 = 1012;
/// Close code: a frame or message was larger than `max_message_bytes`.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: policy violation; used for slow consumers.
pub const CLOSE_POLICY: u16 = 1008;

/// The `code` of an `error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    MissingField,
    InvalidField,
    InvalidRoom,
    InvalidName,
    NotInRoom,
    TooLarge,
    RateLimited,
    BackboneUnavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::UnknownType => "unknown_type",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::InvalidRoom => "invalid_room",
            Self::InvalidName => "invalid_name",
            Self::NotInRoom => "not_in_room",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::BackboneUnavailable => "backbone_unavailable",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client frame that could not be accepted: the code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ProtocolError {}

/// Where a client wants a room's replay to start: after `seq`, within `epoch` if given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    pub seq: u64,
    pub epoch: Option<String>,
}

/// A decoded, validated client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    SetName { name: String },
    Join { room: String },
    Leave { room: String },
    Message { room: String, text: String },
    Resume { rooms: Vec<(String, ResumePoint)> },
    Presence { room: String },
    Online,
}

/// Decodes one text frame. Unknown extra fields are ignored (forward compatibility); missing,
/// mistyped or invalid ones are errors with the matching code.
pub fn decode(text: &str) -> Result<ClientMsg, ProtocolError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(ErrorCode::BadJson, format!("not valid JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(ProtocolError::new(ErrorCode::BadJson, "a frame must be a JSON object"));
    };
    let kind = match obj.remove("type") {
        None => return Err(ProtocolError::new(ErrorCode::MissingField, "field `type` is required")),
        Some(Value::String(s)) => s,
        Some(_) => return Err(ProtocolError::new(ErrorCode::InvalidField, "field `type` must be a string")),
    };
    let mut take_str = |field: &'static str| -> Result<String, ProtocolError> {
        match obj.remove(field) {
            None | Some(Value::Null) => {
                Err(ProtocolError::new(ErrorCode::MissingField, format!("`{kind}` needs field `{field}`")))
            }
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(ProtocolError::new(ErrorCode::InvalidField, format!("field `{field}` must be a string"))),
        }
    };
    let msg = match kind.as_str() {
        "set_name" => {
            let name = take_str("name")?;
            validate_name(&name)?;
            ClientMsg::SetName { name }
        }
        "join" => ClientMsg::Join { room: room(take_str("room")?)? },
        "leave" => ClientMsg::Leave { room: room(take_str("room")?)? },
        "presence" => ClientMsg::Presence { room: room(take_str("room")?)? },
        "message" => {
            let r = room(take_str("room")?)?;
            let text = take_str("text")?;
            ClientMsg::Message { room: r, text }
        }
        "online" => ClientMsg::Online,
        "resume" => ClientMsg::Resume { rooms: resume_points(obj.remove("rooms"))? },
        other => {
            let mut shown: String = other.chars().take(40).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            return Err(ProtocolError::new(ErrorCode::UnknownType, format!("unknown message type {shown:?}")));
        }
    };
    Ok(msg)
}

fn room(name: String) -> Result<String, ProtocolError> {
    validate_room(&name)?;
    Ok(name)
}

fn resume_points(rooms: Option<Value>) -> Result<Vec<(String, ResumePoint)>, ProtocolError> {
    let Some(rooms) = rooms else {
        return Err(ProtocolError::new(ErrorCode::MissingField, "`resume` needs field `rooms`"));
    };
    let Value::Object(rooms) = rooms else {
        return Err(ProtocolError::new(ErrorCode::InvalidField, "field `rooms` must be an object"));
    };
    let mut out = Vec::with_capacity(rooms.len());
    for (name, point) in rooms {
        validate_room(&name)?;
        let bad = || {
            ProtocolError::new(
                ErrorCode::InvalidField,
                format!("rooms.{name} must be a seq (integer ≥ 0) or {{\"seq\":N,\"epoch\":\"…\"}}"),
            )
        };
        let point = match point {
            Value::Number(n) => ResumePoint { seq: n.as_u64().ok_or_else(bad)?, epoch: None },
            Value::Object(mut o) => {
                let seq = o.remove("seq").and_then(|v| v.as_u64()).ok_or_else(bad)?;
                let epoch = match o.remove("epoch") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s),
                    Some(_) => return Err(bad()),
                };
                ResumePoint { seq, epoch }
            }
            _ => return Err(bad()),
        };
        out.push((name, point));
    }
    Ok(out)
}

/// Room names: 1–128 bytes, no whitespace or control characters.
pub fn validate_room(name: &str) -> Result<(), ProtocolError> {
    if name.is_empty() || name.len() > MAX_ROOM_LEN {
        return Err(ProtocolError::new(
            ErrorCode::InvalidRoom,
            format!("room names are 1–{MAX_ROOM_LEN} bytes; got {}", name.len()),
        ));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ProtocolError::new(
            ErrorCode::InvalidRoom,
            "room names may not contain whitespace or control characters",
        ));
    }
    Ok(())
}

/// Display names: 1–64 characters, no control characters.
pub fn validate_name(name: &str) -> Result<(), ProtocolError> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(ProtocolError::new(
            ErrorCode::InvalidName,
            format!("display names are 1–{MAX_NAME_CHARS} characters; got {chars}"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ProtocolError::new(ErrorCode::InvalidName, "display names may not contain control characters"));
    }
    Ok(())
}

/// Why a member left a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    Left,
    Disconnected,
    NodeDown,
}

/// Whether `connected` starts a new session or brings back one found in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    New,
    Restored,
}

/// One member in a `presence` or `online` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresenceEntry<'a> {
    pub id: &'a str,
    pub user: &'a str,
    pub server: &'a str,
}

/// A frame from node to client (all but `message`, see [`MessageHead`]).
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
    Error {
        code: ErrorCode,
        message: &'a str,
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

/// The part of a room `message` frame known before publishing. The atomic publish step in
/// Redis appends `"seq":N,"epoch":"…"}` to [`MessageHead::json_prefix`], so the frame every
/// node delivers is byte-for-byte the one stored in the room's log.
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

/// Marks a logged message frame as a replay: `…,"epoch":"E"}` → `…,"epoch":"E","replay":true}`.
pub fn mark_replay(frame: &str) -> String {
    let body = frame.strip_suffix('}').unwrap_or(frame);
    let mut out = String::with_capacity(body.len() + 16);
    out.push_str(body);
    out.push_str(",\"replay\":true}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_marking_keeps_valid_json() {
        let v: Value = serde_json::from_str(&mark_replay(r#"{"type":"message","seq":3,"epoch":"e"}"#)).unwrap();
        assert_eq!(v["replay"], true);
        assert_eq!(v["seq"], 3);
    }

    fn code(text: &str) -> ErrorCode {
        decode(text).unwrap_err().code
    }

    #[test]
    fn decodes_every_client_message() {
        assert_eq!(decode(r#"{"type":"set_name","name":"Alice"}"#), Ok(ClientMsg::SetName { name: "Alice".into() }));
        assert_eq!(decode(r#"{"type":"join","room":"general"}"#), Ok(ClientMsg::Join { room: "general".into() }));
        assert_eq!(decode(r#"{"type":"leave","room":"general"}"#), Ok(ClientMsg::Leave { room: "general".into() }));
        assert_eq!(
            decode(r#"{"type":"message","room":"general","text":"hi","extra":1}"#),
            Ok(ClientMsg::Message { room: "general".into(), text: "hi".into() })
        );
        assert_eq!(decode(r#"{"type":"presence","room":"g"}"#), Ok(ClientMsg::Presence { room: "g".into() }));
        assert_eq!(decode(r#"{"type":"online"}"#), Ok(ClientMsg::Online));
        let Ok(ClientMsg::Resume { rooms }) =
            decode(r#"{"type":"resume","rooms":{"a":41,"b":{"seq":3,"epoch":"e1"}}}"#)
        else {
            panic!("resume did not decode");
        };
        assert!(rooms.contains(&("a".into(), ResumePoint { seq: 41, epoch: None })));
        assert!(rooms.contains(&("b".into(), ResumePoint { seq: 3, epoch: Some("e1".into()) })));
    }

    #[test]
    fn names_the_fault() {
        assert_eq!(code("{nope"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"room":"x"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":7}"#), ErrorCode::InvalidField);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"join"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":"join","room":5}"#), ErrorCode::InvalidField);
        assert_eq!(code(r#"{"type":"join","room":""}"#), ErrorCode::InvalidRoom);
        assert_eq!(code(r#"{"type":"join","room":"a b"}"#), ErrorCode::InvalidRoom);
        assert_eq!(code(&format!(r#"{{"type":"join","room":"{}"}}"#, "r".repeat(129))), ErrorCode::InvalidRoom);
        assert_eq!(code(r#"{"type":"message","room":"g"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":"set_name","name":""}"#), ErrorCode::InvalidName);
        assert_eq!(code(r#"{"type":"set_name","name":"a\u0007"}"#), ErrorCode::InvalidName);
        assert_eq!(code(r#"{"type":"resume","rooms":{"a":-1}}"#), ErrorCode::InvalidField);
        assert_eq!(code(r#"{"type":"resume","rooms":[]}"#), ErrorCode::InvalidField);
    }

    #[test]
    fn message_prefix_completes_to_valid_json() {
        let head =
            MessageHead { kind: "message", room: "g", from: "A\"x", id: "a", text: "hi\n", server: "n1", timestamp: 5 };
        let full = format!("{}{},\"epoch\":\"{}\"}}", head.json_prefix(), 42, "e");
        let v: Value = serde_json::from_str(&full).expect("valid json");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["from"], "A\"x");
        assert_eq!(v["type"], "message");
    }

    #[test]
    fn events_serialise_with_their_type() {
        let e = Event::UserLeft { room: "g", user: "A", id: "a", server: "n", reason: LeaveReason::Left };
        let v: Value = serde_json::from_str(&e.to_json()).expect("valid json");
        assert_eq!(v["type"], "user_left");
        assert_eq!(v["reason"], "left");
        let e = Event::Error { code: ErrorCode::NotInRoom, message: "m" };
        assert!(e.to_json().contains(r#""code":"not_in_room""#));
    }
}
