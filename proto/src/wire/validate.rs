//! The rules for room and display names, shared by the node (which answers a breach with an
//! `error` frame) and clients (which refuse it before sending).

use super::codes::{ErrorCode, ProtocolError};

/// Longest room name, in bytes.
pub const MAX_ROOM_LEN: usize = 128;
/// Longest display name, in characters.
pub const MAX_NAME_CHARS: usize = 64;

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
