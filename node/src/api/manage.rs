//! Acting on clients wherever they are connected: `POST /api/disconnect` and
//! `POST /api/unsubscribe`. The node that takes the call counts the client's connections
//! from cluster-wide presence, then sends one `ControlCommand` through the backbone's control
//! channel; every node (this one too) hands it to its own connections of that client
//! (`Inbound::control` → the hub → each connection's command queue).
//!
//! The count is what presence listed just before the command went out: a connection opened
//! or closed in between may make it differ by that one, and a node cut off from the backbone
//! at that moment misses the command (the control channel is at most once, like live frames).

use super::{to_json, Answer, ApiError, Logged};
use crate::backbone::Scope;
use crate::state::NodeState;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tether_proto::backbone::ControlCommand;
use tether_proto::id::validate_client_id;
use tether_proto::wire::{self, ErrorCode};

/// The close code a `disconnect` sends unless told otherwise.
pub const DEFAULT_CLOSE_CODE: u16 = 4000;
pub const DEFAULT_CLOSE_REASON: &str = "disconnected by server";
/// A close frame's reason fits in 123 bytes (RFC 6455 §5.5: 125 with the code).
pub const MAX_CLOSE_REASON_BYTES: usize = 123;
/// How long a `disconnect` with `forget` waits for the client's connections to be gone before
/// deleting its session (so that a closing connection does not write it back).
const FORGET_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisconnectBody {
    client: Option<String>,
    code: Option<u16>,
    reason: Option<String>,
    #[serde(default)]
    forget: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsubscribeBody {
    client: Option<String>,
    room: Option<String>,
}

fn client_field(client: Option<String>, logged: &mut Logged) -> Result<String, ApiError> {
    let client = client.ok_or_else(|| ApiError::missing("client"))?;
    logged.client = Some(client.clone());
    validate_client_id(&client).map_err(|e| ApiError::bad(ErrorCode::InvalidField, format!("`client`: {e}")))?;
    Ok(client)
}

/// How many connections of `client` presence lists in `scope`, cluster-wide.
async fn connections(state: &NodeState, scope: Scope<'_>, client: &str) -> Result<usize, ApiError> {
    let entries = state.backbone.presence_list(scope).await.map_err(|e| ApiError::backbone(&e))?;
    Ok(entries.iter().filter(|e| e.id == client).count())
}

pub async fn disconnect(body: DisconnectBody, state: &NodeState, logged: &mut Logged) -> Answer {
    let client = client_field(body.client, logged)?;
    let code = body.code.unwrap_or(DEFAULT_CLOSE_CODE);
    if !(code == 1000 || (4000..=4999).contains(&code)) {
        return Err(ApiError::bad(ErrorCode::InvalidField, format!("`code` is 1000 or 4000–4999, not {code}")));
    }
    let reason = body.reason.unwrap_or_else(|| DEFAULT_CLOSE_REASON.to_string());
    if reason.len() > MAX_CLOSE_REASON_BYTES {
        return Err(ApiError::bad(
            ErrorCode::InvalidField,
            format!("`reason` is at most {MAX_CLOSE_REASON_BYTES} bytes (a close frame's limit)"),
        ));
    }
    let disconnected = connections(state, Scope::Online, &client).await?;
    let command = ControlCommand::Disconnect { client: client.clone(), code, reason };
    state.backbone.control(command.to_json()).await.map_err(|e| ApiError::backbone(&e))?;
    if body.forget {
        // Connections touch their session as they end; deleting it before they are gone could
        // see it written back. Wait (bounded) for presence to list none, then delete.
        let deadline = tokio::time::Instant::now() + FORGET_WAIT;
        while disconnected > 0 && tokio::time::Instant::now() < deadline {
            if connections(state, Scope::Online, &client).await? == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        state.backbone.forget_session(&client).await.map_err(|e| ApiError::backbone(&e))?;
    }
    #[derive(Serialize)]
    struct Disconnected {
        disconnected: usize,
    }
    Ok(to_json(&Disconnected { disconnected }))
}

pub async fn unsubscribe(body: UnsubscribeBody, state: &NodeState, logged: &mut Logged) -> Answer {
    let client = client_field(body.client, logged)?;
    let room = body.room.ok_or_else(|| ApiError::missing("room"))?;
    logged.room = Some(room.clone());
    wire::validate_room(&room).map_err(|e| ApiError::bad(ErrorCode::InvalidRoom, e.message))?;
    let removed = connections(state, Scope::Room(&room), &client).await?;
    let command = ControlCommand::Unsubscribe { client, room };
    state.backbone.control(command.to_json()).await.map_err(|e| ApiError::backbone(&e))?;
    #[derive(Serialize)]
    struct Removed {
        removed: usize,
    }
    Ok(to_json(&Removed { removed }))
}
