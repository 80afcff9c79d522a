//! Client → node frames: [`ClientMsg`], encoded by clients ([`ClientMsg::to_json`]) and
//! decoded by the node ([`decode`]).
//!
//! The decoder is the node's first line of defence: it never panics, ignores unknown extra
//! fields (so a newer client can talk to an older node) and names what was wrong with an
//! [`ErrorCode`], which the node sends back in an `error` frame.

use super::codes::{ErrorCode, ProtocolError};
use super::message::RawJson;
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
    /// `text` is `""` when the sender gave only `data`; at least one of them is there.
    Message {
        room: String,
        text: String,
        data: Option<RawJson>,
        msg_id: Option<String>,
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
    /// A plain text `message` to `room` (no `data`, no `msg_id`).
    pub fn text(room: impl Into<String>, text: impl Into<String>) -> Self {
        Self::Message { room: room.into(), text: text.into(), data: None, msg_id: None }
    }

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
            Self::Message { .. } => 5,
            _ => 2,
        };
        let mut st = s.serialize_struct("ClientMsg", fields)?;
        st.serialize_field("type", self.kind())?;
        match self {
            Self::SetName { name } => st.serialize_field("name", name)?,
            Self::Join { room } | Self::Leave { room } | Self::Presence { room } => st.serialize_field("room", room)?,
            Self::Message { room, text, data, msg_id } => {
                st.serialize_field("room", room)?;
                if !(text.is_empty() && data.is_some()) {
                    st.serialize_field("text", text)?;
                }
                if let Some(data) = data {
                    st.serialize_field("data", data)?;
                }
                if let Some(msg_id) = msg_id {
                    st.serialize_field("msg_id", msg_id)?;
                }
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
    let text_of_frame = text;
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
    let kind = kind.as_str();
    let take_str = |obj: &mut serde_json::Map<String, Value>, field: &'static str| take_str(obj, kind, field);
    let msg = match kind {
        "set_name" => {
            let name = take_str(&mut obj, "name")?;
            validate_name(&name)?;
            ClientMsg::SetName { name }
        }
        "join" => ClientMsg::Join { room: room(take_str(&mut obj, "room")?)? },
        "leave" => ClientMsg::Leave { room: room(take_str(&mut obj, "room")?)? },
        "presence" => ClientMsg::Presence { room: room(take_str(&mut obj, "room")?)? },
        "message" => {
            let r = room(take_str(&mut obj, "room")?)?;
            // `data` may be any JSON value, `null` included.
            let has_data = obj.contains_key("data");
            let text = match obj.get("text") {
                None | Some(Value::Null) if has_data => String::new(),
                _ => take_str(&mut obj, "text")?,
            };
            let msg_id = match obj.remove("msg_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(validate_msg_id(s)?),
                Some(_) => return Err(ProtocolError::new(ErrorCode::InvalidField, "field `msg_id` must be a string")),
            };
            // The data's own bytes, read again from the frame: the parsed value would lose its
            // key order and number forms.
            let data = if has_data { Some(raw_data(text_of_frame)?) } else { None };
            ClientMsg::Message { room: r, text, data, msg_id }
        }
        "online" => ClientMsg::Online,
        "refresh" => ClientMsg::Refresh { token: take_str(&mut obj, "token")? },
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

/// The few fields of a client frame that a balancer re-homing it needs (and the node, to name
/// a refused message's `msg_id`), read without building the whole [`ClientMsg`]: other fields
/// are skipped, strings are borrowed unless they hold escapes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ClientPeek<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    pub room: Option<std::borrow::Cow<'a, str>>,
    /// Present and a string; whether it is a *valid* `msg_id` is [`validate_msg_id`]'s call.
    #[serde(default, borrow, deserialize_with = "lenient_str")]
    pub msg_id: Option<std::borrow::Cow<'a, str>>,
    /// A `refresh` frame's token.
    #[serde(default, borrow, deserialize_with = "lenient_str")]
    pub token: Option<std::borrow::Cow<'a, str>>,
}

impl<'a> ClientPeek<'a> {
    /// `None` when `text` is not a JSON object with a string `type`.
    pub fn read(text: &'a str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    /// The `msg_id` of a `message` frame, when it has a valid one.
    pub fn message_msg_id(&self) -> Option<&str> {
        let id = self.msg_id.as_deref().filter(|_| self.kind == "message")?;
        (!id.is_empty() && id.len() <= MAX_MSG_ID_LEN && !id.chars().any(char::is_control)).then_some(id)
    }
}

/// A string field read as `None` when it is absent, `null` or not a string (the decoder
/// proper reports the wrong type; a peek only wants the string).
fn lenient_str<'de, D>(d: D) -> Result<Option<std::borrow::Cow<'de, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Maybe<'a> {
        Str(#[serde(borrow)] std::borrow::Cow<'a, str>),
        Other(serde::de::IgnoredAny),
    }
    Ok(match <Option<Maybe<'de>> as serde::Deserialize>::deserialize(d)? {
        Some(Maybe::Str(s)) => Some(s),
        _ => None,
    })
}

/// Removes string field `field` of a `kind` frame.
fn take_str(
    obj: &mut serde_json::Map<String, Value>,
    kind: &str,
    field: &'static str,
) -> Result<String, ProtocolError> {
    match obj.remove(field) {
        None | Some(Value::Null) => {
            Err(ProtocolError::new(ErrorCode::MissingField, format!("`{kind}` needs field `{field}`")))
        }
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ProtocolError::new(ErrorCode::InvalidField, format!("field `{field}` must be a string"))),
    }
}

/// Longest accepted `msg_id`, in bytes.
pub const MAX_MSG_ID_LEN: usize = 64;

/// A `msg_id` is 1–64 bytes without control characters.
pub fn validate_msg_id(id: String) -> Result<String, ProtocolError> {
    if id.is_empty() || id.len() > MAX_MSG_ID_LEN {
        return Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!("field `msg_id` must be 1–{MAX_MSG_ID_LEN} bytes, not {}", id.len()),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(ProtocolError::new(ErrorCode::InvalidField, "field `msg_id` must not contain control characters"));
    }
    Ok(id)
}

/// The `data` field of a message frame, as written in it: read straight into its own buffer
/// (one pass over the frame, no second validation of the data).
fn raw_data(frame: &str) -> Result<RawJson, ProtocolError> {
    #[derive(serde::Deserialize)]
    struct DataOnly {
        data: Box<serde_json::value::RawValue>,
    }
    serde_json::from_str::<DataOnly>(frame)
        .map(|d| RawJson(d.data))
        .map_err(|e| ProtocolError::new(ErrorCode::InvalidField, format!("field `data`: {e}")))
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
