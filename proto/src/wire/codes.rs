//! The codes both sides of the wire must agree on: the `code` of an `error` frame, and the
//! WebSocket close codes a node (or the balancer) ends a connection with.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Close code: the node is draining or shutting down; reconnect now.
pub const CLOSE_RESTART: u16 = 1012;
/// Close code: a frame or message was larger than `max_message_bytes`.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: policy violation; used for slow consumers.
pub const CLOSE_POLICY: u16 = 1008;
/// Close code: the connection's token expired without a `refresh`.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;

/// The `code` of an `error` frame. An oversized frame is not among them: it closes the
/// connection with [`CLOSE_TOO_BIG`] instead of being answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    MissingField,
    InvalidField,
    InvalidRoom,
    InvalidName,
    NotInRoom,
    RateLimited,
    BackboneUnavailable,
    /// A frame or request body over `max_message_bytes` (the server API's 413; the WebSocket
    /// closes with [`CLOSE_TOO_BIG`] instead).
    TooLarge,
    /// No or a wrong credential (the server API's 401).
    Unauthorized,
    /// A credential that does not allow this (403).
    Forbidden,
    /// The server API: no such endpoint, or the API is off (404).
    NotFound,
    /// The server API: the endpoint exists, not with this method (405).
    MethodNotAllowed,
}

impl ErrorCode {
    /// Every code, in the order `docs/PROTOCOL.md` lists them.
    pub const ALL: [ErrorCode; 14] = [
        Self::BadJson,
        Self::UnknownType,
        Self::MissingField,
        Self::InvalidField,
        Self::InvalidRoom,
        Self::InvalidName,
        Self::NotInRoom,
        Self::RateLimited,
        Self::BackboneUnavailable,
        Self::TooLarge,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::MethodNotAllowed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::UnknownType => "unknown_type",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::InvalidRoom => "invalid_room",
            Self::InvalidName => "invalid_name",
            Self::NotInRoom => "not_in_room",
            Self::RateLimited => "rate_limited",
            Self::BackboneUnavailable => "backbone_unavailable",
            Self::TooLarge => "too_large",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }

    /// The code named `s` on the wire; `None` for a code this version does not know (a
    /// newer node may send one, so readers keep the text).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client frame that could not be accepted: the code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}
