//! The node's side of delivery: what a backbone hands received frames to, and asks about the
//! node's interest in rooms. Backbones hold an `Arc<dyn Inbound>`, never the hub.
//!
//! Delivery stays on the backbone's receiving task: [`Inbound::deliver`] is synchronous and
//! cheap (the hub frames the bytes once and `try_send`s them to each member; it never waits
//! on a client), so there is no channel hop and no copy per frame.

use crate::hub::{ConnCommand, Hub};
use crate::metrics::Metrics;
use std::sync::Arc;
use tether_proto::backbone::ControlCommand;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{debug, warn};

/// What a backbone needs of the node it serves.
pub trait Inbound: Send + Sync {
    /// Hands a frame received for `room` to its local members, now.
    fn deliver(&self, room: &str, frame: &Utf8Bytes);

    /// Whether any local connection is in `room` (a backbone releases a subscription only
    /// when none is).
    fn wants(&self, room: &str) -> bool;

    /// Every room with local members: what a backbone subscribes after reconnecting.
    fn rooms(&self) -> Vec<String>;

    /// Each room with local members and the last `(epoch, seq)` delivered to it (`None`:
    /// nothing yet): where a catch-up after a (re)subscription starts (see
    /// [`super::catch_up`]).
    fn positions(&self) -> Vec<(String, Option<(String, u64)>)>;

    /// The last `(epoch, seq)` delivered in `room` (what a publish may tell the backbone it
    /// has seen). By default looked up in [`Inbound::positions`].
    fn position(&self, room: &str) -> Option<(String, u64)> {
        self.positions().into_iter().find(|(r, _)| r == room).and_then(|(_, p)| p)
    }

    /// A command from the control channel (a [`ControlCommand`]'s JSON), for this node's
    /// connections. Synchronous and cheap like [`Inbound::deliver`]: it only hands the command
    /// to the connections' tasks.
    fn control(&self, command: &str);
}

/// The node's [`Inbound`]: its hub.
pub struct HubInbound {
    hub: Arc<Hub>,
    metrics: Metrics,
}

impl HubInbound {
    pub fn new(hub: Arc<Hub>, metrics: Metrics) -> Self {
        Self { hub, metrics }
    }
}

impl Inbound for HubInbound {
    fn deliver(&self, room: &str, frame: &Utf8Bytes) {
        self.hub.deliver(room, frame, &self.metrics);
    }

    fn wants(&self, room: &str) -> bool {
        self.hub.has_members(room)
    }

    fn rooms(&self) -> Vec<String> {
        self.hub.rooms()
    }

    fn positions(&self) -> Vec<(String, Option<(String, u64)>)> {
        self.hub.positions()
    }

    fn position(&self, room: &str) -> Option<(String, u64)> {
        self.hub.position(room)
    }

    fn control(&self, command: &str) {
        let (client, command) = match serde_json::from_str::<ControlCommand>(command) {
            Ok(ControlCommand::Disconnect { client, code, reason }) => (client, ConnCommand::Close { code, reason }),
            Ok(ControlCommand::Unsubscribe { client, room }) => (client, ConnCommand::Unsubscribe { room }),
            Err(e) => return warn!(error = %e, "unreadable control command; ignored"),
        };
        let taken = self.hub.command(&client, &command);
        debug!(client, ?command, taken, "control command");
    }
}
