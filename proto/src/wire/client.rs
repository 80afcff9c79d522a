//! Client → node frames: [`ClientMsg`], encoded by clients ([`ClientMsg::to_json`]) and
//! decoded by the node ([`decode`]).
//!
//! The decoder is the node's first line of defence: it never panics, ignores unknown extra
//! fields (so a newer client can talk to an older node) and names what was wrong with an
//! [`ErrorCode`], which the node sends back in an `error` frame.

use super::codes::{ErrorCode, ProtocolError};
use super::validate::{validate_name, validate_room};
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};
use serde_json::Value;

/// Where a client wants a room's replay to start: after `seq`, within `epoch` if given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResumePoint {
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// A client frame: decoded and validated by [`decode`], or built by a client to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    SetName {
        name: String,
    },
    Join {
        room: String,
    },
    Leave {
        room: String,
    },
    Message {
        room: String,
        text: String,
    },
    /// Encoded as an object keyed by room, in this order; each point as `{"seq":N}` or
    /// `{"seq":N,"epoch":"…"}` (the node also reads a bare `N`).
    Resume {
        rooms: Vec<(String, ResumePoint)>,
    },
    Presence {
        room: String,
    },
    Online,
    /// A fresh JWT for this connection, before the current one expires.
    Refresh {
        token: String,
    },
}

impl ClientMsg {
    /// The frame's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::SetName { .. } => "set_name",
            Self::Join { .. } => "join",
            Self::Leave { .. } => "leave",
            Self::Message { .. } => "message",
            Self::Resume { .. } => "resume",
            Self::Presence { .. } => "presence",
            Self::Online => "online",
            Self::Refresh { .. } => "refresh",
        }
    }

    /// The frame's JSON text: `type` first, then the fields in the order `docs/PROTOCOL.md`
    /// shows them.
    pub fn to_json(&self) -> String {
        // Plain strings and integers only: serialising cannot fail.
        serde_json::to_string(self).expect("client frames always serialise")
    }
}

impl Serialize for ClientMsg {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = match self {
            Self::Online => 1,
            Self::Message { .. } => 3,
            _ => 2,
        };
        let mut st = s.serialize_struct("ClientMsg", fields)?;
        st.serialize_field("type", self.kind())?;
        match self {
            Self::SetName { name } => st.serialize_field("name", name)?,
            Self::Join { room } | Self::Leave { room } | Self::Presence { room } => st.serialize_field("room", room)?,
            Self::Message { room, text } => {
                st.serialize_field("room", room)?;
                st.serialize_field("text", text)?;
            }
            Self::Resume { rooms } => st.serialize_field("rooms", &Points(rooms))?,
            Self::Refresh { token } => st.serialize_field("token", token)?,
            Self::Online => {}
        }
        st.end()
    }
}

/// A resume's rooms as one JSON object.
struct Points<'a>(&'a [(String, ResumePoint)]);

impl Serialize for Points<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (room, point) in self.0 {
            map.serialize_entry(room, point)?;
        }
        map.end()
    }
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
        "refresh" => ClientMsg::Refresh { token: take_str("token")? },
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
