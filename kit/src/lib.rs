//! `tether-kit`: what the `tether` CLI, the lab tools and the workspace's tests share.
//!
//! - [`cluster`]: local clusters as child processes (private `redis-server`, `nats-server`,
//!   `tether-node`s, `tether-balancer`), killed on drop;
//! - [`url`]: WebSocket URLs with the client id in the query.
#![deny(unsafe_code)]

pub mod cluster;
pub mod url;
