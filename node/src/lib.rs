//! `tether-node`: a WebSocket room server whose rooms span every node through a backbone.
//!
//! Layout, in the order a connection meets them:
//! - [`server`]: the listener; HTTP/1.1 (`/healthz`, `/readyz`, `/metrics`) and the
//!   WebSocket upgrade on any path; shutdown and drain;
//! - [`client_addr`]: the client's address — the TCP peer, or what a trusted proxy (the
//!   balancer, `trusted_proxies`) says in `X-Real-IP`/`X-Forwarded-For`;
//! - [`auth`]: JWT verification of the upgrade (401 before any WebSocket) and of in-band
//!   `refresh`; what a token grants a connection (name, rooms, expiry);
//! - [`connection`]: one client connection: its state machine ([`connection::Client`]:
//!   decodes frames, joins/leaves rooms, publishes messages, resumes) and the socket task
//!   around it, which writes its outbox and closes it;
//! - [`state`]: what every connection shares (config, hub, backbone, metrics, shutdown);
//! - [`hub`]: which local connections are in which room, and the non-blocking fan-out of
//!   one backbone frame to them;
//! - [`outbox`]: one connection's way out: frames written at once when the socket takes
//!   them, a bounded queue when it does not, and the slow-consumer policy;
//! - [`backbone`]: how frames travel between nodes (Redis pub/sub + streams, NATS
//!   JetStream, or none), and what is the same above every backbone (presence keeping,
//!   catch-up);
//! - [`api`]: the server API (`/api/…`): publish, broadcast, presence, history, and acting on
//!   clients cluster-wide through the backbone's control channel;
//! - [`config`]: `configs/node.toml` and its validation;
//! - [`cli`]: the binary's flags laid over the config, its start-up and exit codes;
//! - [`webhooks`]: signed webhooks — the events the backbone decides once for the cluster,
//!   their bounded queue and delivery with retries;
//! - [`metrics`]: every exported metric.
//!
//! The binary (`main.rs`) only calls [`cli`]: parse the flags, load the config, start the
//! runtime, bind and call [`run`].
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod backbone;
pub mod cli;
pub mod client_addr;
pub mod config;
pub mod connection;
pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod server;
pub mod state;
pub mod webhooks;

pub use config::{Config, FileConfig};
pub use server::run;

/// Why the node could not run. Per-connection errors never get here: they are logged at the
/// connection's boundary and cost only that connection.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("listener: {0}")]
    Io(#[source] std::io::Error),
    #[error("backbone set-up: {0}")]
    Backbone(String),
}
