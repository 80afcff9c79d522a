//! The read-only calls: `GET /api/presence?room=R`, `GET /api/online` (the wire's `presence`
//! and `online` answers, `type` included) and `GET /api/history?room=R&since=SEQ&limit=N`
//! (a page of the room's log, read with `Backbone::replay`).

use super::{to_json, Answer, ApiError, Logged};
use crate::backbone::{PresenceEntry, Scope};
use crate::state::NodeState;
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use tether_proto::wire::{self, ErrorCode, Event};

/// Messages a history page holds unless `limit` says otherwise.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;
/// Most messages one history page may ask for.
pub const MAX_HISTORY_LIMIT: usize = 1000;

/// The query's parameters, decoded (`%xx` and `+`); a repeated one keeps its first value.
fn params(query: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        out.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    out
}

/// The `room` parameter, present and valid.
fn room_param(params: &BTreeMap<String, String>, logged: &mut Logged) -> Result<String, ApiError> {
    let room = params.get("room").ok_or_else(|| ApiError::missing("room"))?;
    logged.room = Some(room.clone());
    wire::validate_room(room).map_err(|e| ApiError::bad(ErrorCode::InvalidRoom, e.message))?;
    Ok(room.clone())
}

fn number(params: &BTreeMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    params
        .get(name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad(ErrorCode::InvalidField, format!("`{name}` must be a whole number, not {v:?}"))
            })
        })
        .transpose()
}

/// One entry per client id, whichever node it is on (the backbone lists one per connection).
fn users(entries: &[PresenceEntry]) -> Vec<wire::PresenceEntry<'_>> {
    let mut seen = BTreeMap::new();
    for e in entries {
        seen.entry(e.id.as_str()).or_insert(e);
    }
    seen.values().map(|e| wire::PresenceEntry { id: &e.id, user: &e.user, server: &e.server }).collect()
}

pub async fn presence(query: Option<&str>, state: &NodeState, logged: &mut Logged) -> Answer {
    let room = room_param(&params(query), logged)?;
    let entries = state.backbone.presence_list(Scope::Room(&room)).await.map_err(|e| ApiError::backbone(&e))?;
    Ok(Event::Presence { room: &room, users: users(&entries) }.to_json())
}

pub async fn online(state: &NodeState) -> Answer {
    let entries = state.backbone.presence_list(Scope::Online).await.map_err(|e| ApiError::backbone(&e))?;
    Ok(Event::Online { users: users(&entries) }.to_json())
}

#[derive(Serialize)]
struct History<'a> {
    room: &'a str,
    epoch: Option<&'a str>,
    /// Each message as delivered: its JSON object, not a string.
    messages: Vec<Box<RawValue>>,
    more: bool,
}

pub async fn history(query: Option<&str>, state: &NodeState, logged: &mut Logged) -> Answer {
    let params = params(query);
    let room = room_param(&params, logged)?;
    let since = number(&params, "since")?.unwrap_or(0);
    let limit = match number(&params, "limit")? {
        None => DEFAULT_HISTORY_LIMIT,
        Some(n) if (1..=MAX_HISTORY_LIMIT as u64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::bad(ErrorCode::InvalidField, format!("`limit` is 1–{MAX_HISTORY_LIMIT}, not {n}")))
        }
    };
    let replay = state.backbone.replay(&room, since).await.map_err(|e| ApiError::backbone(&e))?;
    let mut frames = replay.frames.into_iter().filter(|(seq, _)| *seq > since);
    let mut messages = Vec::with_capacity(limit.min(64));
    let mut last = since;
    for (seq, frame) in frames.by_ref().take(limit) {
        match RawValue::from_string(frame) {
            Ok(raw) => messages.push(raw),
            // Only the node's own frames are logged; one that is not JSON is skipped, not served.
            Err(e) => tracing::warn!(room, seq, error = %e, "a logged frame is not JSON; left out of the history"),
        }
        last = seq;
    }
    let more = frames.next().is_some() || replay.head_seq > last;
    Ok(to_json(&History { room: &room, epoch: replay.epoch.as_deref(), messages, more }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        let p = params(Some("room=a%20b&since=3&room=c&x=%F0%9F%98%80"));
        assert_eq!(p["room"], "a b");
        assert_eq!(p["since"], "3");
        assert_eq!(p["x"], "😀");
        assert!(params(None).is_empty());
    }

    #[test]
    fn numbers_must_be_whole() {
        let p = params(Some("since=-1&limit=5"));
        assert_eq!(number(&p, "since").unwrap_err().code, ErrorCode::InvalidField);
        assert_eq!(number(&p, "limit").unwrap(), Some(5));
        assert_eq!(number(&p, "nope").unwrap(), None);
    }
}
