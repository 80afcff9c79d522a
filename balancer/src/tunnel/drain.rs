//! The node→client direction of a WebSocket tunnel: a [`pump`](mod@super::pump) that follows
//! frame boundaries ([`crate::frames`]), so that when an operator drains the node the balancer
//! can finish the frame in progress, add a close frame with code 1012 ("reconnect now") and
//! hang up: the client moves at once, to the next node in its rank. The node's own 1012 (when
//! it shuts down) needs nothing of the sort: it is just bytes passing through.

use std::future::poll_fn;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tether_proto::wire::CLOSE_RESTART;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pump::{poll_step, write_pending, Fault, Step};
use crate::frames::{close_frame, FrameTracker};
use crate::quiet::Quiet;

/// Once a drain reaches a tunnel, how long the frame in progress (and then the close frame)
/// may take to reach the client. Past it the tunnel is cut without a close frame: a node in the
/// middle of a huge frame, or a client that stopped reading, must not hold the drain up. Five
/// seconds, as long as the node gives a slow consumer before dropping it: a client that is
/// merely slow (a loaded machine, a big frame in flight) still gets its 1012.
pub const DRAIN_FRAME_DEADLINE: Duration = Duration::from_secs(5);

/// Reason of the close frame sent to the clients of a drained node.
pub const DRAIN_REASON: &str = "node draining";

/// How the node→client direction ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum FromNode {
    /// The node hung up after this many bytes.
    Eof(u64),
    /// The node was drained: `true` when the close frame went out, `false` when the
    /// [`DRAIN_FRAME_DEADLINE`] passed first.
    Drained(bool),
}

/// Copies the node's bytes to the client like [`pump`](super::pump::pump), following frame
/// boundaries. Once `drain` fires it forwards only the rest of the frame in progress, then
/// writes a 1012 close frame (with `reason`) and returns — all within [`DRAIN_FRAME_DEADLINE`], or it gives up
/// and returns `Drained(false)`. Bytes of the node's next frame that were already read are
/// dropped. Without a `drain` token it is a plain copy.
pub(super) async fn pump_from_node<R, W>(
    pending: &mut Bytes,
    frames: &mut FrameTracker,
    from: &mut R,
    to: &mut W,
    drain: Option<&CancellationToken>,
    reason: &str,
) -> Result<FromNode, Fault>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    // Set when the drain is first noticed: everything left must be done by then.
    let mut deadline: Option<Instant> = None;
    // One wait for the drain for the whole tunnel, polled only when the drain fires (see
    // `Quiet`): not a fresh registration with the node's token for every message.
    let quiet = drain.map(|_| Quiet::new());
    let mut drained = pin!(fired(drain));
    loop {
        if !pending.is_empty() {
            // Bytes already followed by `frames` (the node's early bytes, the rest of a step
            // the client could not take at once, or what a parked tunnel had in flight).
            if deadline.is_none() && drain.is_some_and(CancellationToken::is_cancelled) {
                deadline = Some(Instant::now() + DRAIN_FRAME_DEADLINE);
            }
            let len = pending.len() as u64;
            if !Box::pin(write_step(to, pending, drain, &mut deadline)).await? {
                return Ok(FromNode::Drained(false));
            }
            total += len;
        }
        if deadline.is_some() && frames.at_boundary() {
            let mut close = Bytes::from(close_frame(CLOSE_RESTART, reason));
            let sent = Box::pin(write_step(to, &mut close, drain, &mut deadline)).await?;
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
            step = poll_fn(|cx| poll_step(cx, from, to, |bytes| keep(frames, draining, bytes))) => step?,
        };
        match step {
            Step::Eof => return Ok(FromNode::Eof(total)),
            Step::Copied(n) => total += n as u64,
            Step::Blocked { kept, rest } => {
                total += (kept - rest.len()) as u64;
                // Written at the top of the loop; kept there so that a park sees it.
                *pending = Bytes::from(rest);
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
    bytes: &mut Bytes,
    drain: Option<&CancellationToken>,
    deadline: &mut Option<Instant>,
) -> Result<bool, Fault>
where
    W: AsyncWrite + Unpin,
{
    let mut write = std::pin::pin!(write_pending(to, bytes));
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
pub(super) async fn fired(token: Option<&CancellationToken>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    /// [`pump_from_node`] as a tunnel starts it: `early` bytes from the node's 101 pending, in
    /// the tunnel's own [`Flow`](super::super::Flow).
    async fn from_node<R, W>(
        early: Bytes,
        from: &mut R,
        to: &mut W,
        drain: Option<&CancellationToken>,
    ) -> Result<FromNode, Fault>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let super::super::Flow { mut to_client, mut frames, .. } = super::super::Flow::new(Bytes::new(), early);
        pump_from_node(&mut to_client, &mut frames, from, to, drain, DRAIN_REASON).await
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
            tokio::spawn(async move { from_node(Bytes::new(), &mut from, &mut to, Some(&drain)).await })
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
        let end = from_node(Bytes::new(), &mut from, &mut to, Some(&drain)).await;
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
            tokio::spawn(async move { from_node(Bytes::new(), &mut from, &mut to, Some(&drain)).await })
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
            tokio::spawn(async move { from_node(Bytes::new(), &mut from, &mut to, Some(&drain)).await })
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
            tokio::spawn(async move { from_node(Bytes::new(), &mut from, &mut to, Some(&drain)).await })
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
        let end = from_node(Bytes::new(), &mut from, &mut to, None).await;
        drop(to);
        writer.await.unwrap();
        assert_eq!(end.unwrap(), FromNode::Eof(payload.len() as u64));
        assert_eq!(reader.await.unwrap(), payload);
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
            tokio::spawn(async move { from_node(early, &mut from, &mut to, Some(&drain)).await })
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
}
