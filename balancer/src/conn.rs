//! What every request on one client connection shares: made by `server` when it accepts the
//! connection, read by `proxy` for each request, and kept by a `tunnel` for as long as the
//! upgraded connection lives.

use std::net::SocketAddr;

use tokio::sync::OwnedSemaphorePermit;

/// One accepted client connection.
#[derive(Debug)]
pub(crate) struct ClientConn {
    /// Appended to `X-Forwarded-For`.
    pub peer: SocketAddr,
    /// Whether the client reached us over TLS (the listener had `[tls]` when it was accepted):
    /// what `X-Forwarded-Proto` says to the node (`https` / `http`).
    pub tls: bool,
    /// The connection's slot under `max_connections`; a tunnel keeps a reference, so an
    /// upgraded connection still counts after hyper has let go of it.
    pub _permit: OwnedSemaphorePermit,
}
