//! What every request on one client connection shares: made by `server` when it accepts the
//! connection (after its PROXY header, if any, and its per-IP check), read by `proxy` and
//! `api` for each request, and kept by a `tunnel` for as long as the upgraded connection lives.

use std::net::SocketAddr;

use tokio::sync::OwnedSemaphorePermit;

use crate::per_ip;

/// One accepted client connection.
#[derive(Debug)]
pub(crate) struct ClientConn {
    /// The client's real address: the one its PROXY header names, else the socket's peer.
    /// What the logs (`peer`), `X-Real-IP`, `X-Forwarded-For` and the per-IP limits use.
    pub peer: SocketAddr,
    /// The TCP peer of the socket itself: the client, or a load balancer in front of us
    /// speaking the PROXY protocol.
    pub socket_peer: SocketAddr,
    /// Whether the client reached us over TLS (the listener had `[tls]` when it was accepted):
    /// what `X-Forwarded-Proto` says to the node (`https` / `http`).
    pub tls: bool,
    /// The connection's slot under `max_connections`; a tunnel keeps a reference, so an
    /// upgraded connection still counts after hyper has let go of it.
    pub _permit: OwnedSemaphorePermit,
    /// The connection's slot in its address's per-IP entry (`None` when no per-IP limit is
    /// on); given back when the last reference — hyper's or the tunnel's — goes.
    pub _per_ip: Option<per_ip::Guard>,
}
