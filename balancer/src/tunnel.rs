//! The byte tunnel between an upgraded client connection and its node, from the 101 until the
//! end of the WebSocket.
//!
//! Both directions are copied at once, and the tunnel is torn down *as a whole* as soon as
//! either direction ends or fails, the node is marked down, or the shutdown grace runs out.
//! WebSockets have no useful half-close: a client whose node died must see its connection
//! close promptly so it reconnects (and lands on the next node in its rank).
//!
//! The node→client direction also follows frame boundaries ([`crate::frames`]), so that when
//! an operator drains the node the balancer can finish the frame in progress, add a close
//! frame with code 1012 ("reconnect now") and hang up: the client moves at once, to the next
//! node in its rank. The node's own 1012 (when it shuts down) needs nothing of the sort: it is
//! just bytes passing through.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tether_proto::wire::CLOSE_RESTART;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::frames::{close_frame, FrameTracker};
use crate::pool::ActiveGuard;
use crate::proxy::ClientConn;

/// Per-direction copy buffer. Chat frames are small; idle tunnels are the common case, and
/// each one holds two of these, so it is kept well under tokio's 8 KiB default.
pub const TUNNEL_BUF_BYTES: usize = 4096;

/// Once a drain reaches a tunnel, how long the frame in progress (and then the close frame)
/// may take to reach the client. Past it the tunnel is cut without a close frame: a node in the
/// middle of a huge frame, or a client that stopped reading, must not hold the drain up. Five
/// seconds, as the node gives a closing slow consumer (`DESIGN.md`: "dropped within 5 s"): a
/// client that is merely slow (a loaded machine, a big frame in flight) still gets its 1012.
pub const DRAIN_FRAME_DEADLINE: Duration = Duration::from_secs(5);

/// After the drain's close frame, how long the balancer keeps reading (and discarding) what
/// the client still sends while waiting for it to hang up. Closing a socket with unread input
/// sends a reset, which on some stacks destroys the close frame before the client reads it.
pub const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// Reason of the close frame sent to the clients of a drained node.
pub const DRAIN_REASON: &str = "node draining";

/// What, besides either side hanging up, ends a tunnel.
#[derive(Debug, Clone)]
pub(crate) struct Stops {
    /// Fired when the node is marked down (not when merely unready).
    pub node_down: CancellationToken,
    /// Fired when an operator drains the node: close with 1012 at the next frame boundary.
    pub drain: CancellationToken,
    /// Fired when the shutdown grace period is over.
    pub hard_stop: CancellationToken,
}

/// Why a tunnel ended, for the log (copy results carry the bytes moved that way).
enum End {
    ClientClosed(io::Result<u64>),
    NodeClosed(io::Result<u64>),
    /// Drained; `true` when the 1012 close frame reached the client's socket in time.
    Drained(bool),
    NodeDown,
    Shutdown,
}

/// How the node→client direction ended without an error.
#[derive(Debug, PartialEq, Eq)]
enum FromNode {
    /// The node hung up after this many bytes.
    Eof(u64),
    /// The node was drained: `true` when the close frame went out, `false` when the
    /// [`DRAIN_FRAME_DEADLINE`] passed first.
    Drained(bool),
}

/// Waits for both upgrades, then copies until the first end. The guard and the client
/// connection's slot are held for as long as the tunnel lives. `websocket`: the node switched
/// to WebSocket, so a drain can close it with a frame; any other protocol is cut on drain.
pub(crate) async fn run(
    client: OnUpgrade,
    node: OnUpgrade,
    websocket: bool,
    stops: Stops,
    guard: Arc<ActiveGuard>,
    conn: Arc<ClientConn>,
) {
    let upgrades = async { tokio::try_join!(client, node) };
    // A drain during the upgrades is not watched here: the client has (or is about to have)
    // its 101, so it gets its close frame from the pump, at once.
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
    // Not a WebSocket: no frames to respect, so a drain cuts at once.
    let (frame_drain, cut_drain) = if websocket { (Some(&stops.drain), None) } else { (None, Some(&stops.drain)) };
    let end = tokio::select! {
        r = pump(&mut client_rx, &mut node_tx) => End::ClientClosed(r),
        r = pump_from_node(&mut node_rx, &mut client_tx, frame_drain) => match r {
            Ok(FromNode::Eof(bytes)) => End::NodeClosed(Ok(bytes)),
            Ok(FromNode::Drained(sent)) => End::Drained(sent),
            Err(e) => End::NodeClosed(Err(e)),
        },
        _ = stops.node_down.cancelled() => End::NodeDown,
        _ = fired(cut_drain) => End::Drained(false),
        _ = stops.hard_stop.cancelled() => End::Shutdown,
    };
    match &end {
        End::ClientClosed(Ok(bytes)) => debug!(bytes, "tunnel closed by the client"),
        End::NodeClosed(Ok(bytes)) => debug!(bytes, "tunnel closed by the node"),
        End::ClientClosed(Err(e)) => debug!(error = %e, "tunnel failed on the client side"),
        End::NodeClosed(Err(e)) => debug!(error = %e, "tunnel failed on the node side"),
        End::Drained(true) => debug!("tunnel closed: node drained, 1012 sent to the client"),
        End::Drained(false) => {
            debug!("tunnel cut: node drained, frame not over in time (or not a WebSocket)")
        }
        End::NodeDown => debug!("tunnel closed: node marked down"),
        End::Shutdown => debug!("tunnel closed: shutdown grace over"),
    }
    // The node's side is done with in every case: its connection closes here.
    drop((node_rx, node_tx));
    drop(guard);
    if matches!(end, End::Drained(true)) {
        tokio::select! {
            _ = linger(&mut client_rx, &mut client_tx) => {}
            _ = stops.hard_stop.cancelled() => {}
        }
    }
    // Returning drops the client's halves, closing its socket.
    drop(conn);
}

/// Copies `from` into `to` until end of stream; returns the bytes copied.
async fn pump<R, W>(from: &mut R, to: &mut W) -> io::Result<u64>
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

/// Copies the node's bytes to the client like [`pump`], following frame boundaries. Once
/// `drain` fires it forwards only the rest of the frame in progress, then writes a 1012 close
/// frame and returns — all within [`DRAIN_FRAME_DEADLINE`], or it gives up and returns
/// `Drained(false)`. Bytes of the node's next frame that were already read are dropped.
/// Without a `drain` token it is a plain copy.
async fn pump_from_node<R, W>(from: &mut R, to: &mut W, drain: Option<&CancellationToken>) -> io::Result<FromNode>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; TUNNEL_BUF_BYTES];
    let mut frames = FrameTracker::new();
    let mut total = 0u64;
    // Set when the drain is first noticed: everything left must be done by then.
    let mut deadline: Option<Instant> = None;
    loop {
        if deadline.is_some() && frames.at_boundary() {
            let close = close_frame(CLOSE_RESTART, DRAIN_REASON);
            let sent = write_step(to, &close, drain, &mut deadline).await?;
            return Ok(FromNode::Drained(sent));
        }
        // Reading is cancel-safe, so a drain may interrupt it: at a boundary the close frame
        // must go out now, not after the node's next frame.
        let n = tokio::select! {
            biased;
            _ = fired(drain), if deadline.is_none() => {
                deadline = Some(Instant::now() + DRAIN_FRAME_DEADLINE);
                continue;
            }
            _ = until(deadline) => return Ok(FromNode::Drained(false)),
            read = from.read(&mut buf) => read?,
        };
        if n == 0 {
            return Ok(FromNode::Eof(total));
        }
        let len = if deadline.is_some() {
            frames.finish_frame(&buf[..n]).unwrap_or(n)
        } else {
            frames.advance(&buf[..n]);
            n
        };
        if !write_step(to, &buf[..len], drain, &mut deadline).await? {
            return Ok(FromNode::Drained(false));
        }
        total += len as u64;
    }
}

/// Writes and flushes `bytes` whole. A drain noticed meanwhile only starts the deadline (the
/// write goes on: cutting it would leave a partial frame); past the deadline, gives up and
/// returns `false`.
async fn write_step<W>(
    to: &mut W,
    bytes: &[u8],
    drain: Option<&CancellationToken>,
    deadline: &mut Option<Instant>,
) -> io::Result<bool>
where
    W: AsyncWrite + Unpin,
{
    let write = async {
        to.write_all(bytes).await?;
        to.flush().await
    };
    let mut write = std::pin::pin!(write);
    loop {
        tokio::select! {
            biased;
            _ = fired(drain), if deadline.is_none() => {
                *deadline = Some(Instant::now() + DRAIN_FRAME_DEADLINE);
            }
            _ = until(*deadline) => return Ok(false),
            written = write.as_mut() => return written.map(|()| true),
        }
    }
}

/// Waits for `token` to fire; forever when there is none.
async fn fired(token: Option<&CancellationToken>) {
    match token {
        Some(token) => token.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`; forever when there is none.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// After the drain's close frame: half-closes towards the client (it reads the close frame,
/// then end of stream) and discards what it still sends until it hangs up, for at most
/// [`DRAIN_LINGER`].
async fn linger<R, W>(from: &mut R, to: &mut W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let wait = async {
        let _ = to.shutdown().await;
        let mut scrap = [0u8; 512];
        while matches!(from.read(&mut scrap).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(DRAIN_LINGER, wait).await;
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

    /// An unmasked binary frame of `len` bytes of `fill`.
    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut out = vec![0x82];
        match len {
            0..=125 => out.push(len as u8),
            126..=0xffff => {
                out.push(126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.resize(out.len() + len, fill);
        out
    }

    fn drain_close() -> Vec<u8> {
        close_frame(CLOSE_RESTART, DRAIN_REASON)
    }

    #[tokio::test]
    async fn an_idle_drained_tunnel_sends_the_close_frame_at_once() {
        let (mut node, mut from) = tokio::io::duplex(1 << 16);
        let (mut to, mut client) = tokio::io::duplex(1 << 16);
        let drain = CancellationToken::new();
        let pumping = {
            let drain = drain.clone();
            tokio::spawn(async move { pump_from_node(&mut from, &mut to, Some(&drain)).await })
        };
        let first = frame(10, b'a');
        node.write_all(&first).await.unwrap();
        let mut got = vec![0u8; first.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, first);
        // The node says nothing more; the drain must not wait for it.
        drain.cancel();
        assert_eq!(pumping.await.unwrap().unwrap(), FromNode::Drained(true));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, drain_close());
        drop(node);
    }

    #[tokio::test]
    async fn a_drain_before_the_first_byte_closes_at_once() {
        let (_node, mut from) = tokio::io::duplex(64);
        let (mut to, mut client) = tokio::io::duplex(64);
        let drain = CancellationToken::new();
        drain.cancel();
        let end = pump_from_node(&mut from, &mut to, Some(&drain)).await;
        assert_eq!(end.unwrap(), FromNode::Drained(true));
        drop(to);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, drain_close());
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_mid_frame_finishes_that_frame_then_closes() {
        let (mut node, mut from) = tokio::io::duplex(1 << 20);
        let (mut to, mut client) = tokio::io::duplex(1 << 20);
        let drain = CancellationToken::new();
        let big = frame(70_000, b'b');
        let next = frame(300, b'c');
        // Half of the big frame, then the drain, then the rest and a further frame.
        node.write_all(&big[..35_000]).await.unwrap();
        let pumping = {
            let drain = drain.clone();
            tokio::spawn(async move { pump_from_node(&mut from, &mut to, Some(&drain)).await })
        };
        let mut got = vec![0u8; 35_000];
        client.read_exact(&mut got).await.unwrap();
        drain.cancel();
        tokio::task::yield_now().await;
        node.write_all(&big[35_000..]).await.unwrap();
        node.write_all(&next).await.unwrap();
        assert_eq!(pumping.await.unwrap().unwrap(), FromNode::Drained(true));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        got.extend_from_slice(&rest);
        assert_eq!(got, [big, drain_close()].concat());
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_that_does_not_finish_in_time_is_cut_without_a_close() {
        let (mut node, mut from) = tokio::io::duplex(1 << 16);
        let (mut to, mut client) = tokio::io::duplex(1 << 16);
        let drain = CancellationToken::new();
        let big = frame(1000, b'd');
        node.write_all(&big[..100]).await.unwrap();
        let pumping = {
            let drain = drain.clone();
            tokio::spawn(async move { pump_from_node(&mut from, &mut to, Some(&drain)).await })
        };
        let mut got = vec![0u8; 100];
        client.read_exact(&mut got).await.unwrap();
        let start = Instant::now();
        drain.cancel();
        // The node stalls mid-frame: the deadline cuts the tunnel.
        assert_eq!(pumping.await.unwrap().unwrap(), FromNode::Drained(false));
        assert_eq!(start.elapsed(), DRAIN_FRAME_DEADLINE);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing after the partial frame");
        drop(node);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stopped_reading_does_not_hold_the_drain_up() {
        // The client never reads: its side of the pipe fills up and writes block.
        let (mut node, mut from) = tokio::io::duplex(1 << 16);
        let (mut to, _client) = tokio::io::duplex(64);
        let drain = CancellationToken::new();
        node.write_all(&frame(5000, b'e')).await.unwrap();
        let pumping = {
            let drain = drain.clone();
            tokio::spawn(async move { pump_from_node(&mut from, &mut to, Some(&drain)).await })
        };
        tokio::task::yield_now().await;
        let start = Instant::now();
        drain.cancel();
        assert_eq!(pumping.await.unwrap().unwrap(), FromNode::Drained(false));
        assert_eq!(start.elapsed(), DRAIN_FRAME_DEADLINE);
    }

    #[tokio::test]
    async fn without_a_drain_the_node_pump_is_a_plain_copy() {
        let (mut node, mut from) = tokio::io::duplex(64);
        let (mut to, mut client) = tokio::io::duplex(64);
        // Not even WebSocket frames: the copy must not care.
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 31) as u8).collect();
        let writer = {
            let payload = payload.clone();
            tokio::spawn(async move { node.write_all(&payload).await.unwrap() })
        };
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let end = pump_from_node(&mut from, &mut to, None).await;
        drop(to);
        writer.await.unwrap();
        assert_eq!(end.unwrap(), FromNode::Eof(payload.len() as u64));
        assert_eq!(reader.await.unwrap(), payload);
    }
}
