//! What every connection of a node shares: its config, hub, backbone, metrics, queue bounds
//! and shutdown token.
//!
//! Its own module so that the listener ([`crate::server`]) and the connections
//! ([`crate::connection`]) both depend on it, and the listener on the connections, never the
//! other way round.

use crate::backbone::Backbone;
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::outbox::Limits;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything a connection needs, shared.
pub struct NodeState {
    pub cfg: Arc<Config>,
    pub hub: Arc<Hub>,
    pub backbone: Arc<dyn Backbone>,
    pub metrics: Metrics,
    /// Cancelled when the node shuts down, once it has stopped accepting connections;
    /// connections then close their clients with 1012.
    pub shutdown: CancellationToken,
    /// Every connection's send-queue bounds (see [`crate::outbox`]).
    pub limits: Arc<Limits>,
    pub(crate) ws_config: WebSocketConfig,
    /// Every HTTP connection and WebSocket connection task, so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
}

impl NodeState {
    /// The shared state of a node running `cfg` over `backbone`; the queue bounds and the
    /// WebSocket settings come from `cfg`.
    pub fn new(cfg: Arc<Config>, hub: Arc<Hub>, backbone: Arc<dyn Backbone>, metrics: Metrics) -> Self {
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(cfg.read_buffer_bytes)
            // Tungstenite's own frames (pongs, close frames) go straight to the connection's
            // outbox, which does the buffering (see `outbox::ClientIo`).
            .write_buffer_size(0)
            .max_message_size(Some(cfg.max_message_bytes))
            .max_frame_size(Some(cfg.max_message_bytes));
        let limits = Arc::new(Limits {
            max_frames: cfg.send_queue_len,
            max_bytes: cfg.send_queue_bytes,
            low_water: cfg.send_queue_low_water_bytes,
            slow_after: cfg.slow_consumer,
        });
        Self {
            cfg,
            hub,
            backbone,
            metrics,
            // Not the node's own shutdown token: the clients are told only after the listener
            // is closed (see `server::run`).
            shutdown: CancellationToken::new(),
            limits,
            ws_config,
            tracker: TaskTracker::new(),
        }
    }
}
