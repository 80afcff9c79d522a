//! The byte tunnel between an upgraded client connection and its node, from the 101 until the
//! end of the WebSocket.
//!
//! Both directions are copied at once, and the tunnel is torn down *as a whole* as soon as
//! either direction ends or fails, the node is marked down, or the shutdown grace runs out.
//! WebSockets have no useful half-close: a client whose node died must see its connection
//! close promptly so it reconnects (and lands on the next node in its rank).
//!
//! **A close is never turned into a reset.** When the node's side ends first — the node sent
//! its close frame (1009, 1008, 1012, 4xxx: just bytes here) and hung up, or reset, or was
//! marked down, or drained — the client may well still be sending (the rest of a 4 MiB frame,
//! say). Closing its socket then, with unread input, would make the kernel answer with a reset
//! that can destroy the close frame before the client reads it. So the client's side closes
//! *lingering* ([`linger`]): everything the node sent is forwarded first, then a FIN
//! (`shutdown(Write)`: the client learns at once that the connection is over), then what the
//! client still sends is read and dropped until it hangs up, for at most [`CLOSE_LINGER`].
//! When the client ended first, or at the end of the shutdown grace, there is no linger; a
//! drain that could not finish its frame in time resets the client's connection (its peer is
//! stuck or not reading: a FIN would only queue behind data it never takes).
//!
//! The node→client direction also follows frame boundaries ([`crate::frames`]), so that when
//! an operator drains the node the balancer can finish the frame in progress, add a close
//! frame with code 1012 ("reconnect now") and hang up: the client moves at once, to the next
//! node in its rank. The node's own 1012 (when it shuts down) needs nothing of the sort: it is
//! just bytes passing through.
//!
//! **An idle tunnel holds no buffer.** Most tunnels are idle most of the time, so what one
//! costs at rest is what the balancer costs per client. hyper hands back both original
//! `TcpStream`s (plus any bytes it had read past the HTTP heads, which are written out first
//! and dropped), and both directions run in the tunnel's one task. Each direction waits until
//! its source is readable, reads into a scratch buffer that belongs to the worker thread
//! ([`SCRATCH_BYTES`]), and writes those bytes to the other side within the same poll. Only
//! when the other side cannot take them all does the rest move into a buffer of the tunnel's
//! own, freed once written — that tunnel is not idle, its reader is slow. What an idle tunnel
//! keeps is its task (about 1.5 KB of state), the two sockets' registrations, and the shared
//! handles of its node and client connection.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tether_proto::wire::CLOSE_RESTART;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::frames::{close_frame, FrameTracker};
use crate::pool::ActiveGuard;
use crate::proxy::ClientConn;
use crate::quiet::Quiet;

/// Size of the scratch buffer every copy reads into. There is one per worker thread, not one
/// per tunnel, so it can be as large as a proxy's usual buffer (HAProxy's default `bufsize`):
/// bulk streams move in few large reads. It is also the most a tunnel keeps of its own while
/// its destination is blocked.
pub const SCRATCH_BYTES: usize = 16 * 1024;

/// Once a drain reaches a tunnel, how long the frame in progress (and then the close frame)
/// may take to reach the client. Past it the tunnel is cut without a close frame: a node in the
/// middle of a huge frame, or a client that stopped reading, must not hold the drain up. Five
/// seconds, as the node gives a closing slow consumer (`DESIGN.md`: "dropped within 5 s"): a
/// client that is merely slow (a loaded machine, a big frame in flight) still gets its 1012.
pub const DRAIN_FRAME_DEADLINE: Duration = Duration::from_secs(5);

/// Once the node's side of a tunnel has ended (its close frame forwarded, its hang-up or
/// reset seen, the node marked down, or the drain's close frame written), how long the
/// balancer keeps the client's side half-open, reading and discarding what the client still
/// sends, while waiting for it to hang up. Closing a socket with unread input sends a reset,
/// which can destroy the close frame before the client reads it. A second: a client on
/// loopback or a LAN takes far less to answer a close frame or finish a frame of a few MiB,
/// and a client that does neither must not hold the balancer's socket for long.
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Reason of the close frame sent to the clients of a drained node.
pub const DRAIN_REASON: &str = "node draining";

thread_local! {
    /// The worker thread's read buffer (see [`SCRATCH_BYTES`]). Borrowed only within one poll,
    /// never across an `.await`, so every tunnel on the thread shares it.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

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

/// Why a tunnel ended, for the log and for how the client's side closes (copy results carry
/// the bytes moved that way).
enum End {
    /// The client hung up (after sending this many bytes), or reading from it failed.
    ClientClosed(io::Result<u64>),
    /// Writing to the client failed: it is gone.
    ClientFailed(io::Error),
    /// The node hung up (after sending this many bytes), or reading from it failed (a reset).
    NodeClosed(io::Result<u64>),
    /// Writing to the node failed (it reset): what it sent before may still wait to be read.
    NodeGone(io::Error),
    /// Drained; `true` when the 1012 close frame reached the client's socket in time.
    Drained(bool),
    NodeDown,
    Shutdown,
}

impl End {
    /// The node's side ended first and the client may still be sending: its side closes
    /// lingering, so that what went out before (a close frame) is not destroyed by a reset.
    fn lingers(&self) -> bool {
        matches!(self, End::NodeClosed(_) | End::NodeGone(_) | End::NodeDown | End::Drained(true))
    }
}

/// A failed copy step: reading from its source or writing to its destination.
#[derive(Debug)]
enum Fault {
    Read(io::Error),
    Write(io::Error),
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
    let (Some(client), Some(node)) = (into_tcp(client), into_tcp(node)) else {
        // Both sides are served over `TokioIo<TcpStream>` (see `server` and `proxy`): only a
        // change there gets here.
        warn!("an upgraded connection is not a plain TCP stream; tunnel closed");
        return;
    };
    copy(client, node, websocket, &stops, guard).await;
    // The client's socket closed when `copy` returned; its slot is given back now.
    drop(conn);
}

/// The TCP stream under an upgraded connection, and what hyper had read from it past the
/// HTTP head (a client's first frames sent along with its request; a node's first frames
/// sent along with its 101).
fn into_tcp(upgraded: Upgraded) -> Option<(TcpStream, Bytes)> {
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    Some((parts.io.into_inner(), parts.read_buf))
}

/// The tunnel proper, once both sides are plain TCP streams; returns why it ended. The node's
/// connection (and `guard`) are let go as soon as the copy ends; the client's lingers when the
/// node's side ended first (see [`End::lingers`]).
async fn copy(
    (mut client, client_early): (TcpStream, Bytes),
    (mut node, node_early): (TcpStream, Bytes),
    websocket: bool,
    stops: &Stops,
    guard: Arc<ActiveGuard>,
) -> End {
    debug!("tunnel open");
    let (mut client_rx, mut client_tx) = client.split();
    let (mut node_rx, mut node_tx) = node.split();
    // Not a WebSocket: no frames to respect, so a drain cuts at once.
    let (frame_drain, cut_drain) = if websocket { (Some(&stops.drain), None) } else { (None, Some(&stops.drain)) };
    let stopped = pin!(async {
        tokio::select! {
            _ = stops.node_down.cancelled() => End::NodeDown,
            _ = fired(cut_drain) => End::Drained(false),
            _ = stops.hard_stop.cancelled() => End::Shutdown,
        }
    });
    // The stop signals are polled only when one of them fires, not for every message.
    let quiet = Quiet::new();
    // `linger_until`: the node's side is over, the client's may not be; one bound for both
    // the rest of the node's bytes and the linger. (Made after the copy, not kept through it.)
    let (end, linger_until) = {
        // Outside the `select!`, so that it can run on when the node's side failed first.
        let mut from_node = pin!(pump_from_node(node_early, &mut node_rx, &mut client_tx, frame_drain));
        let end = tokio::select! {
            r = pump(client_early, &mut client_rx, &mut node_tx) => match r {
                Ok(bytes) => End::ClientClosed(Ok(bytes)),
                Err(Fault::Read(e)) => End::ClientClosed(Err(e)),
                Err(Fault::Write(e)) => End::NodeGone(e),
            },
            r = from_node.as_mut() => from_node_end(r),
            end = quiet.wait(stopped) => end,
        };
        let until = Instant::now() + CLOSE_LINGER;
        // The node reset under the client's bytes, or was marked down: what it sent before
        // (its close frame, typically) may still be unread, and goes on to the client first.
        // A node that shuts down closes its listener, so that a probe may mark it down, just
        // before it sends its clients 1012; a node that died has no connection left to read.
        let mut end = end;
        if matches!(end, End::NodeGone(_) | End::NodeDown) {
            if let Some(other) = Box::pin(finish_from_node(from_node, until, &stops.hard_stop)).await {
                end = other;
            }
        }
        (end, until)
    };
    match &end {
        End::ClientClosed(Ok(bytes)) => debug!(bytes, "tunnel closed by the client"),
        End::NodeClosed(Ok(bytes)) => debug!(bytes, "tunnel closed by the node"),
        End::ClientClosed(Err(e)) | End::ClientFailed(e) => debug!(error = %e, "tunnel failed on the client side"),
        End::NodeClosed(Err(e)) | End::NodeGone(e) => debug!(error = %e, "tunnel failed on the node side"),
        End::Drained(true) => debug!("tunnel closed: node drained, 1012 sent to the client"),
        End::Drained(false) => {
            debug!("tunnel cut: node drained, frame not over in time (or not a WebSocket)")
        }
        End::NodeDown => debug!("tunnel closed: node marked down"),
        End::Shutdown => debug!("tunnel closed: shutdown grace over"),
    }
    // The node's side is done with in every case: its connection closes here.
    drop(node);
    drop(guard);
    if end.lingers() {
        // Boxed: it runs once per tunnel, at its end, and must not weigh on an idle tunnel.
        Box::pin(async {
            tokio::select! {
                () = linger(&mut client_rx, &mut client_tx, linger_until) => {}
                _ = stops.hard_stop.cancelled() => {}
            }
        })
        .await;
    } else if matches!(end, End::Drained(false)) {
        // Its frame cut in the middle, the client cannot read the rest of the WebSocket; and it
        // may have stopped reading, so that a FIN would wait behind unsent bytes (the socket
        // kept in FIN-WAIT-1): a reset frees it at once.
        let _ = client.set_zero_linger();
    }
    // Returning closes the client's socket.
    end
}

/// The [`End`] of the node→client direction.
fn from_node_end(r: Result<FromNode, Fault>) -> End {
    match r {
        Ok(FromNode::Eof(bytes)) => End::NodeClosed(Ok(bytes)),
        Ok(FromNode::Drained(sent)) => End::Drained(sent),
        Err(Fault::Read(e)) => End::NodeClosed(Err(e)),
        Err(Fault::Write(e)) => End::ClientFailed(e),
    }
}

/// Runs the node→client direction on after the node reset under the client's bytes or was
/// marked down, until it has forwarded what the node still had to say (then it sees the
/// reset, or end of stream), for at most until `until`. `None` when it ended that way or did
/// not end by then (the reason stands); `Shutdown` at the end of the shutdown grace.
async fn finish_from_node<F>(from_node: Pin<&mut F>, until: Instant, hard_stop: &CancellationToken) -> Option<End>
where
    F: std::future::Future<Output = Result<FromNode, Fault>>,
{
    tokio::select! {
        r = tokio::time::timeout_at(until, from_node) => match r.map(from_node_end) {
            // Out of time, or the node's side ended as already known (a reset).
            Err(_) | Ok(End::NodeClosed(_)) => None,
            Ok(end) => Some(end),
        },
        _ = hard_stop.cancelled() => Some(End::Shutdown),
    }
}

/// What one [`poll_step`] did.
#[derive(Debug)]
enum Step {
    /// The source hung up.
    Eof,
    /// This many bytes went out whole.
    Copied(usize),
    /// `kept` bytes were to go out, but the destination took only part of them: `rest` must
    /// be written before anything more is read.
    Blocked { kept: usize, rest: Vec<u8> },
}

/// One read from `from` into the thread's scratch buffer, and as much of writing the bytes
/// out to `to` as `to` takes right now. `keep` sees the bytes read and says how many of them
/// go on (the others are dropped). Until `from` has something it is pending having consumed
/// nothing, so a `select!` may drop it at any time.
fn poll_step<R, W>(
    cx: &mut Context<'_>,
    from: &mut R,
    to: &mut W,
    keep: impl FnOnce(&[u8]) -> usize,
) -> Poll<Result<Step, Fault>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    with_scratch(|buf| {
        let mut read = ReadBuf::new(&mut *buf);
        ready!(Pin::new(&mut *from).poll_read(cx, &mut read)).map_err(Fault::Read)?;
        let n = read.filled().len();
        if n == 0 {
            return Poll::Ready(Ok(Step::Eof));
        }
        let kept = keep(&buf[..n]).min(n);
        let mut written = 0;
        while written < kept {
            match Pin::new(&mut *to).poll_write(cx, &buf[written..kept]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(Fault::Write(io::ErrorKind::WriteZero.into()))),
                Poll::Ready(Ok(w)) => written += w,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Fault::Write(e))),
                Poll::Pending => break,
            }
        }
        // A socket's flush is a no-op; this is for writers that do buffer.
        if written == kept && Pin::new(&mut *to).poll_flush(cx).map_err(Fault::Write)?.is_ready() {
            return Poll::Ready(Ok(Step::Copied(kept)));
        }
        Poll::Ready(Ok(Step::Blocked { kept, rest: buf[written..kept].to_vec() }))
    })
}

/// Runs `f` on this thread's scratch buffer.
fn with_scratch<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    // Polls never run during thread-local destruction, so `with` cannot fail here.
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        // Only if a copy ran inside another on this thread, which none does; a buffer of its
        // own keeps even that correct.
        Err(_) => f(&mut vec![0; SCRATCH_BYTES]),
    })
}

/// Writes and flushes `bytes` whole.
async fn write_whole<W>(to: &mut W, bytes: &[u8]) -> Result<(), Fault>
where
    W: AsyncWrite + Unpin,
{
    to.write_all(bytes).await.map_err(Fault::Write)?;
    to.flush().await.map_err(Fault::Write)
}

/// Copies `from` into `to` until end of stream, after writing out `early` (bytes of `from`
/// read before the tunnel began); returns the bytes copied.
async fn pump<R, W>(early: Bytes, from: &mut R, to: &mut W) -> Result<u64, Fault>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = early.len() as u64;
    if !early.is_empty() {
        Box::pin(write_whole(to, &early)).await?;
    }
    // It may pin hyper's whole read buffer: not to be kept for the tunnel's life.
    drop(early);
    loop {
        match poll_fn(|cx| poll_step(cx, from, to, <[u8]>::len)).await? {
            Step::Eof => return Ok(total),
            Step::Copied(n) => total += n as u64,
            Step::Blocked { kept, rest } => {
                Box::pin(write_whole(to, &rest)).await?;
                total += kept as u64;
            }
        }
    }
}

/// Copies the node's bytes to the client like [`pump`], following frame boundaries. Once
/// `drain` fires it forwards only the rest of the frame in progress, then writes a 1012 close
/// frame and returns — all within [`DRAIN_FRAME_DEADLINE`], or it gives up and returns
/// `Drained(false)`. Bytes of the node's next frame that were already read are dropped.
/// Without a `drain` token it is a plain copy.
async fn pump_from_node<R, W>(
    early: Bytes,
    from: &mut R,
    to: &mut W,
    drain: Option<&CancellationToken>,
) -> Result<FromNode, Fault>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = FrameTracker::new();
    let mut total = 0u64;
    // Set when the drain is first noticed: everything left must be done by then.
    let mut deadline: Option<Instant> = None;
    if !early.is_empty() {
        // The node's first bytes, as if they were its first read.
        if drain.is_some_and(CancellationToken::is_cancelled) {
            deadline = Some(Instant::now() + DRAIN_FRAME_DEADLINE);
        }
        let len = keep(&mut frames, deadline.is_some(), &early);
        if !Box::pin(write_step(to, &early[..len], drain, &mut deadline)).await? {
            return Ok(FromNode::Drained(false));
        }
        total += len as u64;
    }
    drop(early);
    // One wait for the drain for the whole tunnel, polled only when the drain fires (see
    // `Quiet`): not a fresh registration with the node's token for every message.
    let quiet = drain.map(|_| Quiet::new());
    let mut drained = pin!(fired(drain));
    loop {
        if deadline.is_some() && frames.at_boundary() {
            let close = close_frame(CLOSE_RESTART, DRAIN_REASON);
            let sent = Box::pin(write_step(to, &close, drain, &mut deadline)).await?;
            return Ok(FromNode::Drained(sent));
        }
        let draining = deadline.is_some();
        // A step is cancel-safe, so a drain may interrupt the wait: at a boundary the close
        // frame must go out now, not after the node's next frame.
        let step = tokio::select! {
            biased;
            // Once it has fired (`draining`), `drained` is complete and never polled again.
            _ = poll_fn(|cx| quiet.as_ref().map_or(Poll::Pending, |q| q.poll(cx, drained.as_mut()))), if !draining => {
                deadline = Some(Instant::now() + DRAIN_FRAME_DEADLINE);
                continue;
            }
            _ = until(deadline) => return Ok(FromNode::Drained(false)),
            step = poll_fn(|cx| poll_step(cx, from, to, |bytes| keep(&mut frames, draining, bytes))) => step?,
        };
        match step {
            Step::Eof => return Ok(FromNode::Eof(total)),
            Step::Copied(n) => total += n as u64,
            Step::Blocked { kept, rest } => {
                if !Box::pin(write_step(to, &rest, drain, &mut deadline)).await? {
                    return Ok(FromNode::Drained(false));
                }
                total += kept as u64;
            }
        }
    }
}

/// How many of `bytes`, the node's next ones, go on to the client: all of them (followed by
/// `frames`), or when `draining` only those that finish the frame in progress.
fn keep(frames: &mut FrameTracker, draining: bool, bytes: &[u8]) -> usize {
    if draining {
        frames.finish_frame(bytes).unwrap_or(bytes.len())
    } else {
        frames.advance(bytes);
        bytes.len()
    }
}

/// Writes and flushes `bytes` whole. A drain noticed meanwhile only starts the deadline (the
/// write goes on: cutting it would leave a partial frame); past the deadline, gives up and
/// returns `false`. Callers box it: it runs only while the client is slow or a drain is on,
/// and its timer and waits must not weigh on the state every tunnel carries all its life.
async fn write_step<W>(
    to: &mut W,
    bytes: &[u8],
    drain: Option<&CancellationToken>,
    deadline: &mut Option<Instant>,
) -> Result<bool, Fault>
where
    W: AsyncWrite + Unpin,
{
    let mut write = std::pin::pin!(write_whole(to, bytes));
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

/// Sleeps until `deadline`; forever when there is none. The timer is boxed for the same
/// reason as [`write_step`]: there is a deadline only during a drain.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => Box::pin(tokio::time::sleep_until(at)).await,
        None => std::future::pending().await,
    }
}

/// The lingering close of the client's side, once the node's side is over and all it sent has
/// been forwarded: half-closes towards the client (it reads what came before, then end of
/// stream), then reads and discards what the client still sends until it hangs up or `until`
/// (at most [`CLOSE_LINGER`] after the node's end) passes. The caller's drop then closes the
/// socket with nothing left unread, or past `until` whatever the client is still up to.
async fn linger<R, W>(from: &mut R, to: &mut W, until: Instant)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Bound of [`an_idle_tunnel_holds_only_a_small_task_state`]: the future is about 1.3 KB
    /// today, and Tokio rounds a task's allocation up to a multiple of 128 bytes.
    const TUNNEL_STATE_LIMIT: usize = 1536;

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
        let copied = pump(Bytes::new(), &mut b, &mut c).await.unwrap();
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
            tokio::spawn(async move { pump_from_node(Bytes::new(), &mut from, &mut to, Some(&drain)).await })
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
        let end = pump_from_node(Bytes::new(), &mut from, &mut to, Some(&drain)).await;
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
            tokio::spawn(async move { pump_from_node(Bytes::new(), &mut from, &mut to, Some(&drain)).await })
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
            tokio::spawn(async move { pump_from_node(Bytes::new(), &mut from, &mut to, Some(&drain)).await })
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
            tokio::spawn(async move { pump_from_node(Bytes::new(), &mut from, &mut to, Some(&drain)).await })
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
        let end = pump_from_node(Bytes::new(), &mut from, &mut to, None).await;
        drop(to);
        writer.await.unwrap();
        assert_eq!(end.unwrap(), FromNode::Eof(payload.len() as u64));
        assert_eq!(reader.await.unwrap(), payload);
    }

    #[tokio::test]
    async fn bytes_read_before_the_tunnel_go_out_first() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let (mut c, mut d) = tokio::io::duplex(64);
        a.write_all(b" and after").await.unwrap();
        drop(a);
        let copied = pump(Bytes::from_static(b"before"), &mut b, &mut c).await.unwrap();
        drop(c);
        let mut got = Vec::new();
        d.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"before and after");
        assert_eq!(copied, got.len() as u64);
    }

    #[tokio::test]
    async fn a_nodes_early_bytes_count_for_frame_boundaries() {
        // The node's 101 came with a whole frame and half of the next one.
        let (first, second) = (frame(10, b'a'), frame(300, b'b'));
        let early = Bytes::from([&first[..], &second[..100]].concat());
        let (mut node, mut from) = tokio::io::duplex(1 << 16);
        let (mut to, mut client) = tokio::io::duplex(1 << 16);
        let drain = CancellationToken::new();
        let pumping = {
            let drain = drain.clone();
            tokio::spawn(async move { pump_from_node(early, &mut from, &mut to, Some(&drain)).await })
        };
        let mut got = vec![0u8; first.len() + 100];
        client.read_exact(&mut got).await.unwrap();
        // Drained mid-frame: the rest of that frame, then the close frame; not the frame after.
        drain.cancel();
        tokio::task::yield_now().await;
        node.write_all(&[&second[100..], &frame(5, b'c')[..]].concat()).await.unwrap();
        assert_eq!(pumping.await.unwrap().unwrap(), FromNode::Drained(true));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        got.extend_from_slice(&rest);
        assert_eq!(got, [first, second, drain_close()].concat());
    }

    /// Two connected TCP streams on 127.0.0.1.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (far, _) = listener.accept().await.unwrap();
        (near, far)
    }

    fn stops() -> Stops {
        Stops {
            node_down: CancellationToken::new(),
            drain: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
        }
    }

    fn guard() -> Arc<ActiveGuard> {
        let metrics = crate::metrics::Metrics::new();
        let nodes = [crate::config::NodeConfig { name: "n".into(), addr: "127.0.0.1:1".into() }];
        let pool = crate::pool::Pool::new(&nodes, &metrics);
        Arc::new(ActiveGuard::new(pool.get(0)))
    }

    /// A close frame with `code`, as a node sends it.
    fn node_close(code: u16) -> Vec<u8> {
        close_frame(code, "bye")
    }

    /// Writes to `to` until it fails or `stop` fires (at most 256 MiB): a client in the middle
    /// of sending something big.
    async fn flood(mut to: tokio::net::tcp::OwnedWriteHalf, stop: CancellationToken) {
        let chunk = vec![0x5au8; 64 * 1024];
        for _ in 0..4096 {
            tokio::select! {
                _ = stop.cancelled() => return,
                written = to.write_all(&chunk) => if written.is_err() { return },
            }
        }
    }

    /// Reads `from` to its end: the bytes, and how it ended.
    async fn read_all(from: &mut tokio::net::tcp::OwnedReadHalf) -> (Vec<u8>, io::Result<()>) {
        let mut got = Vec::new();
        let end = from.read_to_end(&mut got).await.map(drop);
        (got, end)
    }

    #[tokio::test]
    async fn a_nodes_close_frame_reaches_a_client_that_is_still_sending() {
        let stops = stops();
        let ((client, client_peer), (node, mut node_peer)) = (tcp_pair().await, tcp_pair().await);
        let (mut client_rx, client_tx) = client_peer.into_split();
        let stop = CancellationToken::new();
        let flooding = tokio::spawn(flood(client_tx, stop.clone()));
        let tunnel = tokio::spawn(async move {
            let end = copy((client, Bytes::new()), (node, Bytes::new()), true, &stops, guard()).await;
            matches!(end, End::NodeGone(_) | End::NodeClosed(_))
        });
        // The node takes some of the flood, answers with its close frame and hangs up with the
        // rest unread: a reset, right behind the frame.
        let mut some = vec![0u8; 100_000];
        node_peer.read_exact(&mut some).await.unwrap();
        node_peer.write_all(&node_close(1009)).await.unwrap();
        drop(node_peer);
        // The client gets the frame, then end of stream: no reset.
        let (got, end) = read_all(&mut client_rx).await;
        assert_eq!(got, node_close(1009));
        assert!(end.is_ok(), "{end:?}");
        stop.cancel();
        flooding.await.unwrap();
        assert!(tunnel.await.unwrap(), "the tunnel ended on the node's side");
    }

    #[tokio::test]
    async fn a_node_marked_down_still_gets_its_last_bytes_out() {
        let stops = stops();
        let node_down = stops.node_down.clone();
        let ((client, client_peer), (node, mut node_peer)) = (tcp_pair().await, tcp_pair().await);
        let (mut client_rx, client_tx) = client_peer.into_split();
        let tunnel =
            tokio::spawn(
                async move { copy((client, Bytes::new()), (node, Bytes::new()), true, &stops, guard()).await },
            );
        // A node shutting down: marked down (its listener closed) just before its 1012.
        node_down.cancel();
        tokio::task::yield_now().await;
        node_peer.write_all(&node_close(1012)).await.unwrap();
        drop(node_peer);
        let (got, end) = read_all(&mut client_rx).await;
        assert_eq!(got, node_close(1012));
        assert!(end.is_ok(), "{end:?}");
        // The client hangs up: the linger is over.
        drop(client_tx);
        assert!(matches!(tunnel.await.unwrap(), End::NodeDown));
    }

    #[tokio::test]
    async fn a_cut_drain_resets_the_clients_connection() {
        let stops = stops();
        let drain = stops.drain.clone();
        let ((client, client_peer), (node, _node_peer)) = (tcp_pair().await, tcp_pair().await);
        let (mut client_rx, _client_tx) = client_peer.into_split();
        // Not a WebSocket: a drain cuts it at once.
        let tunnel =
            tokio::spawn(
                async move { copy((client, Bytes::new()), (node, Bytes::new()), false, &stops, guard()).await },
            );
        drain.cancel();
        assert!(matches!(tunnel.await.unwrap(), End::Drained(false)));
        let (got, end) = read_all(&mut client_rx).await;
        assert!(got.is_empty());
        assert_eq!(end.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
    }

    #[tokio::test]
    async fn an_idle_tunnel_holds_only_a_small_task_state() {
        let stops = stops();
        let ((client, mut client_peer), (node, mut node_peer)) = (tcp_pair().await, tcp_pair().await);
        let tunnel = copy((client, Bytes::new()), (node, Bytes::new()), true, &stops, guard());
        // The whole state of a tunnel, whatever it is doing, is this future (plus the sockets'
        // registrations): no copy buffer lives in it. Guards against a buffer (or a large
        // timer) creeping back in.
        let size = std::mem::size_of_val(&tunnel);
        eprintln!("TUNNEL SIZE {size}");
        assert!(size <= TUNNEL_STATE_LIMIT, "tunnel future is {size} bytes");
        let peers = async {
            client_peer.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            node_peer.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
            node_peer.write_all(&frame(3, b'x')).await.unwrap();
            let mut got = [0u8; 5];
            client_peer.read_exact(&mut got).await.unwrap();
            assert_eq!(got, frame(3, b'x')[..]);
            drop(client_peer);
        };
        let (end, ()) = tokio::join!(tunnel, peers);
        assert!(matches!(end, End::ClientClosed(Ok(4))));
    }
}
