//! The lingering close of a tunnel's client side. When the node's side ends first the client
//! may well still be sending (the rest of a 4 MiB frame, say); closing its socket then, with
//! unread input, would make the kernel answer with a reset that can destroy the close frame
//! before the client reads it. So the client's side is half-closed and drained first.

use std::future::poll_fn;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::pump::{poll_step, Step};

/// Once the node's side of a tunnel has ended (its close frame forwarded, its hang-up or
/// reset seen, the node marked down, or the drain's close frame written), how long the
/// balancer keeps the client's side half-open, reading and discarding what the client still
/// sends, while waiting for it to hang up. Closing a socket with unread input sends a reset,
/// which can destroy the close frame before the client reads it. A second: a client on
/// loopback or a LAN takes far less to answer a close frame or finish a frame of a few MiB,
/// and a client that does neither must not hold the balancer's socket for long.
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// The lingering close of the client's side, once the node's side is over and all it sent has
/// been forwarded: half-closes towards the client (it reads what came before, then end of
/// stream), then reads and discards what the client still sends until it hangs up or `until`
/// (at most [`CLOSE_LINGER`] after the node's end) passes. The caller's drop then closes the
/// socket with nothing left unread, or past `until` whatever the client is still up to.
pub(super) async fn linger<R, W>(from: &mut R, to: &mut W, until: Instant)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // A socket's shutdown does not wait (the FIN follows what is queued); the bound is for
    // writers that do.
    let _ = tokio::time::timeout_at(until, to.shutdown()).await;
    // Read into the scratch buffer and keep nothing, until end of stream or an error.
    let discard = async {
        while let Ok(Step::Copied(_)) = poll_fn(|cx| poll_step(cx, from, &mut tokio::io::sink(), |_| 0)).await {}
    };
    let _ = tokio::time::timeout_at(until, discard).await;
}
