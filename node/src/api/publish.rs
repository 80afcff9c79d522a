//! `POST /api/publish` and `POST /api/broadcast`: a message from the application's backend,
//! built as a room `message` frame (`from` default `"server"`, `"id":"server"`, `server` = this
//! node) and published with `Backbone::publish_one`, which assigns its seq like any client
//! message. An `idempotency_key` becomes the backbone's dedup key `a:{key}` (scoped to the
//! room by the backbone): a repeat within `idempotency_ttl` publishes nothing and answers the
//! first message's seq/epoch with `"duplicate":true`, whichever node takes it.

use super::{to_json, Answer, ApiError, Logged};
use crate::state::NodeState;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::time::{SystemTime, UNIX_EPOCH};
use tether_proto::wire::{self, ErrorCode, MessageHead};

/// The sender a message from the API shows, unless the call names one.
pub const DEFAULT_FROM: &str = "server";
/// The `id` of every message from the API: no client has it (ids are what clients present).
pub const SERVER_ID: &str = "server";
/// Longest `idempotency_key`.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;
/// Most rooms one broadcast may name.
pub const MAX_BROADCAST_ROOMS: usize = 100;

/// What a message carries, shared by both calls.
#[derive(Debug)]
struct Content {
    data: Option<Box<RawValue>>,
    text: Option<String>,
    from: Option<String>,
    idempotency_key: Option<String>,
}

// The fields are spelled in each body (not `#[serde(flatten)]`ed): flattening neither refuses
// unknown fields nor keeps `data` raw.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    room: Option<String>,
    data: Option<Box<RawValue>>,
    text: Option<String>,
    from: Option<String>,
    idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BroadcastBody {
    rooms: Option<Vec<String>>,
    data: Option<Box<RawValue>>,
    text: Option<String>,
    from: Option<String>,
    idempotency_key: Option<String>,
}

#[derive(Debug, Serialize)]
struct Published<'a> {
    room: &'a str,
    seq: u64,
    epoch: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

impl Content {
    /// Checks what every room's message shares: something to send, a valid sender and key.
    fn check(&self) -> Result<(), ApiError> {
        if self.data.is_none() && self.text.is_none() {
            return Err(ApiError::bad(ErrorCode::MissingField, "`data` or `text` is required"));
        }
        if let Some(from) = &self.from {
            wire::validate_name(from)
                .map_err(|e| ApiError::bad(ErrorCode::InvalidName, format!("`from`: {}", e.message)))?;
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
                return Err(ApiError::bad(
                    ErrorCode::InvalidField,
                    format!("`idempotency_key` is 1–{MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
                ));
            }
        }
        Ok(())
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Publishes `content` to `room` (already validated): the answer's JSON.
async fn publish_to(room: &str, content: &Content, state: &NodeState, timestamp: u64) -> Answer {
    let head = MessageHead {
        kind: "message",
        room,
        from: content.from.as_deref().unwrap_or(DEFAULT_FROM),
        id: SERVER_ID,
        text: content.text.as_deref().unwrap_or(""),
        server: &state.cfg.name,
        timestamp,
        data: content.data.as_deref(),
        msg_id: None,
    };
    let key = content.idempotency_key.as_ref().map(|k| format!("a:{k}"));
    let published = state
        .backbone
        .publish_one(room, head.json_prefix(), key.as_deref())
        .await
        .map_err(|e| ApiError::backbone(&e))?;
    Ok(to_json(&Published { room, seq: published.seq, epoch: &published.epoch, duplicate: published.duplicate }))
}

fn checked_room(room: &str) -> Result<(), ApiError> {
    wire::validate_room(room).map_err(|e| ApiError::bad(ErrorCode::InvalidRoom, e.message))
}

pub async fn publish(body: PublishBody, state: &NodeState, logged: &mut Logged) -> Answer {
    let PublishBody { room, data, text, from, idempotency_key } = body;
    let room = room.ok_or_else(|| ApiError::missing("room"))?;
    logged.room = Some(room.clone());
    checked_room(&room)?;
    let content = Content { data, text, from, idempotency_key };
    content.check()?;
    publish_to(&room, &content, state, unix_ms()).await
}

pub async fn broadcast(body: BroadcastBody, state: &NodeState) -> Answer {
    let BroadcastBody { rooms, data, text, from, idempotency_key } = body;
    let content = Content { data, text, from, idempotency_key };
    let rooms = rooms.ok_or_else(|| ApiError::missing("rooms"))?;
    if rooms.is_empty() || rooms.len() > MAX_BROADCAST_ROOMS {
        return Err(ApiError::bad(
            ErrorCode::InvalidField,
            format!("`rooms` lists 1–{MAX_BROADCAST_ROOMS} rooms, not {}", rooms.len()),
        ));
    }
    content.check()?;
    let timestamp = unix_ms();
    let content = &content;
    // Each room on its own: one failing (a bad name, the backbone) does not stop the others.
    let results = join_all(rooms.iter().map(|room| async move {
        let answer = match checked_room(room) {
            Ok(()) => publish_to(room, content, state, timestamp).await,
            Err(e) => Err(e),
        };
        match answer {
            // Our own JSON, so always valid.
            Ok(json) => RawValue::from_string(json).expect("our answers are JSON"),
            Err(e) => {
                #[derive(Serialize)]
                struct Failed<'a> {
                    room: &'a str,
                    error: super::ErrorBody<'a>,
                }
                RawValue::from_string(to_json(&Failed { room, error: e.body() })).expect("our answers are JSON")
            }
        }
    }))
    .await;
    #[derive(Serialize)]
    struct Results {
        results: Vec<Box<RawValue>>,
    }
    Ok(to_json(&Results { results }))
}
