//! The byte tunnel between an upgraded client connection and its node, from the 101 until the
//! end of the WebSocket.
//!
//! Both directions are copied at once, and the tunnel is torn down *as a whole* as soon as
//! either direction ends or fails, the node is marked down, or the shutdown grace runs out.
//! WebSockets have no useful half-close: a client whose node died must see its connection
//! close promptly so it reconnects (and lands on the next node in its rank).

use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::pool::ActiveGuard;
use crate::proxy::ClientConn;

/// Per-direction copy buffer. Chat frames are small; idle tunnels are the common case, and
/// each one holds two of these, so it is kept well under tokio's 8 KiB default.
pub const TUNNEL_BUF_BYTES: usize = 4096;

/// What, besides either side hanging up, ends a tunnel.
#[derive(Debug, Clone)]
pub(crate) struct Stops {
    /// Fired when the node is marked down (not when merely unready).
    pub node_down: CancellationToken,
    /// Fired when the shutdown grace period is over.
    pub hard_stop: CancellationToken,
}

/// Why a tunnel ended, for the log (copy results carry the bytes moved that way).
enum End {
    ClientClosed(std::io::Result<u64>),
    NodeClosed(std::io::Result<u64>),
    NodeDown,
    Shutdown,
}

/// Waits for both upgrades, then copies until the first end. The guard and the client
/// connection's slot are held for as long as the tunnel lives.
pub(crate) async fn run(
    client: OnUpgrade,
    node: OnUpgrade,
    stops: Stops,
    guard: Arc<ActiveGuard>,
    conn: Arc<ClientConn>,
) {
    let upgrades = async { tokio::try_join!(client, node) };
    let (client, node) = tokio::select! {
        upgraded = upgrades => match upgraded {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                return;
            }
        },
        _ = stops.node_down.cancelled() => return,
        _ = stops.hard_stop.cancelled() => return,
    };
    debug!("tunnel open");
    let (mut client_rx, mut client_tx) = tokio::io::split(TokioIo::new(client));
    let (mut node_rx, mut node_tx) = tokio::io::split(TokioIo::new(node));
    let end = tokio::select! {
        r = pump(&mut client_rx, &mut node_tx) => End::ClientClosed(r),
        r = pump(&mut node_rx, &mut client_tx) => End::NodeClosed(r),
        _ = stops.node_down.cancelled() => End::NodeDown,
        _ = stops.hard_stop.cancelled() => End::Shutdown,
    };
    // Returning drops all four halves, closing both sockets at once.
    match end {
        End::ClientClosed(Ok(bytes)) => debug!(bytes, "tunnel closed by the client"),
        End::NodeClosed(Ok(bytes)) => debug!(bytes, "tunnel closed by the node"),
        End::ClientClosed(Err(e)) => debug!(error = %e, "tunnel failed on the client side"),
        End::NodeClosed(Err(e)) => debug!(error = %e, "tunnel failed on the node side"),
        End::NodeDown => debug!("tunnel closed: node marked down"),
        End::Shutdown => debug!("tunnel closed: shutdown grace over"),
    }
    drop(guard);
    drop(conn);
}

/// Copies `from` into `to` until end of stream; returns the bytes copied.
async fn pump<R, W>(from: &mut R, to: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; TUNNEL_BUF_BYTES];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pump_copies_until_eof() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let (mut c, mut d) = tokio::io::duplex(64);
        let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let writer = {
            let payload = payload.clone();
            tokio::spawn(async move {
                a.write_all(&payload).await.unwrap();
            })
        };
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            d.read_to_end(&mut got).await.unwrap();
            got
        });
        let copied = pump(&mut b, &mut c).await.unwrap();
        drop(c);
        writer.await.unwrap();
        assert_eq!(copied, payload.len() as u64);
        assert_eq!(reader.await.unwrap(), payload);
    }
}
