//! The end of a connection's socket: a lingering close, so the kernel does not turn the
//! node's close frame into a reset, except where a reset is the point (see [`goodbye`]).

use super::{Close, Ws};
use futures_util::SinkExt;
use std::sync::Arc;
use std::time::Duration;
use tether_proto::wire::CLOSE_POLICY;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tracing::debug;

/// How long a closing peer gets to take what is still queued for it and its close frame;
/// past it the connection is reset.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(5);

/// After the node's close frame went out (and its write side was shut down): how long the node
/// keeps reading, and discarding, what the client still sends while it waits for the client to
/// hang up. Closing a socket with unread input makes the kernel send a reset, which can destroy
/// the close frame before the client reads it (a client halfway through a large frame would
/// see 1006 instead of 1009).
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// A slow consumer's close frame, when it could still be written, gets this long to be
/// answered before the connection is reset.
pub const SLOW_LINGER: Duration = Duration::from_secs(1);

/// Ends a connection without the kernel turning its close into a reset, except where a reset
/// is the point:
/// - a close the node starts (1009, 1012, …): what waits goes out, then the close frame, then
///   the write side is shut down and the client's remaining input is read and discarded
///   until it hangs up ([`CLOSE_LINGER`] at most); a client that does not take it all within
///   [`CLOSE_DEADLINE`] is reset;
/// - a slow consumer (1008): its backlog is dropped; the close frame goes only if the socket
///   takes it at once, and unless the client then hangs up within [`SLOW_LINGER`] the
///   connection is reset (`SO_LINGER` 0). A plain close would queue the FIN behind megabytes
///   of unsent data, and the socket would sit in FIN-WAIT-1, pinning that kernel memory, for
///   as long as the stalled client answers window probes;
/// - the client closed (or vanished): tungstenite's answer to its close frame goes out, then
///   the socket is closed.
pub(super) async fn goodbye(mut ws: Ws, close: Option<Close>) {
    let out = Arc::clone(&ws.get_ref().out);
    let sock = Arc::clone(&ws.get_ref().sock);
    let frame = |close: Close| {
        Message::Close(Some(CloseFrame { code: CloseCode::from(close.code), reason: close.reason.into_owned().into() }))
    };
    let clean = match close {
        Some(close) if close.code == CLOSE_POLICY => {
            if out.discard() {
                let _ = ws.send(frame(close)).await;
            }
            // Written whole at once, or not at all: nothing may wait behind a stalled reader.
            out.write_now() && shut_write(&sock) && linger(&sock, SLOW_LINGER).await
        }
        Some(close) => {
            out.seal();
            let _ = ws.send(frame(close)).await;
            let flushed = matches!(tokio::time::timeout(CLOSE_DEADLINE, out.flush()).await, Ok(Ok(())));
            flushed && shut_write(&sock) && {
                linger(&sock, CLOSE_LINGER).await;
                true
            }
        }
        None => {
            out.seal();
            // Tungstenite answers a close frame itself; this sends the answer on its way.
            let _ = ws.flush().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), out.flush()).await;
            true
        }
    };
    if !clean {
        if let Err(e) = sock.set_zero_linger() {
            debug!(error = %e, "could not set SO_LINGER 0");
        }
    }
    out.close();
    // The socket closes when its last handle, in `ws`, goes.
}

/// Shuts down the socket's write side (the client reads what was sent, then end of stream).
fn shut_write(sock: &TcpStream) -> bool {
    socket2::SockRef::from(sock).shutdown(std::net::Shutdown::Write).is_ok()
}

/// Reads and discards what the client still sends until it hangs up (`true`) or `within`
/// passes (`false`).
async fn linger(sock: &TcpStream, within: Duration) -> bool {
    let drain = async {
        let mut sink = [0u8; 4096];
        loop {
            if sock.readable().await.is_err() {
                return true;
            }
            match sock.try_read(&mut sink) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Reset by the peer: it is gone as well.
                Err(_) => return true,
            }
        }
    };
    tokio::time::timeout(within, drain).await.unwrap_or(false)
}
