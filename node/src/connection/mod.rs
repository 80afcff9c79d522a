//! One client connection, from the first frame to cleanup.
//!
//! On connect the client's session (its stored name and rooms, see
//! [`crate::backbone::SessionRecord`]) is loaded from the backbone; if there is one, the
//! connection re-joins its rooms at once with *holding* gates (see [`crate::hub::Gate`]) and
//! says `"session":"restored"`. The client's `resume` then replays each room's log after the
//! seq it last saw and releases the held live frames behind the replay, so the client gets
//! every message once, in seq order; rooms not resumed within `resume_grace` are released as
//! they are. Every change of name or rooms is written to the session before it is confirmed,
//! so a node killed at any moment loses nothing of it.
//!
//! Two halves:
//! - [`client`]: the client's state and what it does with each input (frames, the resume
//!   grace passing, a kick, the end); it answers through the outbox and calls the backbone,
//!   and knows nothing of sockets or the clock, so it is tested without either;
//! - [`task`]: the one task per connection that reads frames off the socket, feeds them to
//!   the client, and writes out the outbox ([`crate::outbox`]) meanwhile; then
//!   [`close`] ends the socket.
//!
//! Fan-out never waits on this client. The connection closes with 1008 when the hub kicks a
//! slow consumer (and is reset), with 1012 on node shutdown and with 1009 on an oversized
//! frame (a lingering close: see [`close`]); with 4001 when its token expires unrefreshed
//! ([`access`]).

pub mod access;
pub mod client;
pub mod close;
pub mod task;

pub use client::{Client, Close, Now};
pub use task::run;

use crate::outbox::ClientIo;
use tokio_tungstenite::WebSocketStream;

/// The connection's WebSocket: reads straight from the socket, writes through its outbox.
type Ws = WebSocketStream<ClientIo>;

#[cfg(test)]
mod tests;
