//! Errors of the client's commands.

pub use crate::config::ConfigError;

/// Why a command failed. The variant says whose fault it was: the app's input
/// (`InvalidRoom`, `InvalidName`, `NotJoined`, `TooLarge`, `InvalidData`), the connection
/// (`NotConnected`, `Closed`, `TooManyUnconfirmed`), or the node (`Server`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The room name breaks the protocol's rules (checked before sending).
    #[error("room {room:?}: {reason}")]
    InvalidRoom { room: String, reason: String },
    /// The display name breaks the protocol's rules (checked before sending).
    #[error("name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    /// `send` to a room the app has not joined.
    #[error("not in room {0:?}")]
    NotJoined(String),
    /// No connection is in sync right now; the request was not sent (nothing is buffered).
    #[error("not connected")]
    NotConnected,
    /// The node refused the request with an `error` frame.
    #[error("server refused: {code}: {message}")]
    Server { code: String, message: String },
    /// The room was left before its join completed.
    #[error("left room {0:?} before the join completed")]
    Cancelled(String),
    /// The client has stopped (closed, gave up, or its task ended).
    #[error("the client is closed")]
    Closed,
    /// `send` while `count` messages (`bytes` bytes) still await their confirmation — the
    /// bound is `max_unconfirmed` / `max_unconfirmed_bytes`. Nothing was queued; try again
    /// once some are confirmed ([`Client::unconfirmed`](crate::Client::unconfirmed)).
    #[error("{count} messages ({bytes} bytes) await confirmation, the most this client keeps")]
    TooManyUnconfirmed { count: usize, bytes: usize },
    /// The `message` frame would be `bytes` long, over `max_message_bytes` (`limit`).
    #[error("message frame of {bytes} bytes is over the limit of {limit}")]
    TooLarge { bytes: usize, limit: usize },
    /// `data` given as raw JSON text that does not parse as one JSON value.
    #[error("data is not valid JSON: {0}")]
    InvalidData(String),
}
