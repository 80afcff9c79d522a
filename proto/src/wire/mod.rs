//! The JSON wire protocol between clients and nodes, in one place: every frame either side
//! sends is built and read here (`docs/PROTOCOL.md` is its description for people).
//!
//! Layout:
//! - [`client`]: client → node frames: [`ClientMsg`], encoded by clients and decoded by the
//!   node's [`decode`], which never panics and names what was wrong with an [`ErrorCode`];
//! - [`event`]: node → client frames: [`Event`] (built by the node, serialised once per
//!   event and shared by every recipient) and [`NodeFrame`], the owned form readers decode
//!   with [`decode_node_frame`];
//! - [`message`]: the room `message` frame: [`MessageHead`]'s prefix that the backbone
//!   completes with `seq` and `epoch`, replay marking, and the cheap readers of a delivered
//!   frame's `type`, `room`, `seq` and `epoch`;
//! - [`codes`]: `error` frame codes and WebSocket close codes;
//! - [`validate`]: room and display-name rules.
//!
//! The golden tests (`golden.rs`) pin the exact bytes of every frame.

pub mod client;
pub mod codes;
pub mod event;
pub mod message;
pub mod validate;

#[cfg(test)]
mod golden;

pub use client::{decode, validate_msg_id, ClientMsg, ClientPeek, ResumePoint, MAX_MSG_ID_LEN};
pub use codes::{ErrorCode, ProtocolError, CLOSE_POLICY, CLOSE_RESTART, CLOSE_TOKEN_EXPIRED, CLOSE_TOO_BIG};
pub use event::{
    complete_joined, decode_node_frame, Event, LeaveReason, NodeFrame, NodeFrameError, PresenceEntry, PresenceUser,
    SessionKind, NODE_FRAME_TYPES,
};
pub use message::{
    complete_message, frame_type, mark_replay, message_room, MessageHead, MessageMeta, RawJson, RoomMessage,
};
pub use validate::{validate_name, validate_room, MAX_NAME_CHARS, MAX_ROOM_LEN};
