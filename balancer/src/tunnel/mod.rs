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
//! *lingering* ([`linger()`]): everything the node sent is forwarded first, then a FIN
//! (`shutdown(Write)`: the client learns at once that the connection is over), then what the
//! client still sends is read and dropped until it hangs up, for at most [`CLOSE_LINGER`].
//! When the client ended first, or at the end of the shutdown grace, there is no linger; a
//! drain that could not finish its frame in time resets the client's connection (its peer is
//! stuck or not reading: a FIN would only queue behind data it never takes).
//!
//! The node→client direction also follows frame boundaries ([`drain`]), so that when an
//! operator drains the node the balancer can finish the frame in progress, add a close frame
//! with code 1012 ("reconnect now") and hang up: the client moves at once, to the next node in
//! its rank. The node's own 1012 (when it shuts down) needs nothing of the sort: it is just
//! bytes passing through.
//!
//! **An idle (plain) tunnel holds no buffer.** Most tunnels are idle most of the time, so
//! what one costs at rest is what the balancer costs per client. hyper hands back both
//! original `TcpStream`s (plus any bytes it had read past the HTTP heads, which are written
//! out first and dropped), and both directions run in the tunnel's one task. Each direction waits until
//! its source is readable, reads into a scratch buffer that belongs to the worker thread
//! ([`pump::SCRATCH_BYTES`]), and writes those bytes to the other side within the same poll. Only
//! when the other side cannot take them all does the rest move into a buffer of the tunnel's
//! own, freed once written — that tunnel is not idle, its reader is slow. What an idle tunnel
//! keeps is its task (about 1.5 KB of state), the two sockets' registrations, and the shared
//! handles of its node and client connection.
//!
//! **Over TLS** the client's side is a rustls session over the socket ([`ClientSide`] for
//! `Box<TlsStream>`): one session serves both directions, so it is shared between them with
//! `tokio::io::split` (a small allocation and an uncontended lock per poll), and the bytes
//! pass through rustls's own record buffers on the way — a TLS tunnel is not free at rest
//! the way a plain one is. Everything else is the same code: frame-aware drain, lingering
//! close (its half-close is `close_notify`, then the FIN), the reset after a cut drain. Plain
//! tunnels have their own instance of [`copy`] over the bare `TcpStream`, unchanged.
//!
//!
//! **A tunnel can be parked and moved.** For a zero-downtime upgrade ([`crate::upgrade`]) a
//! plain tunnel ([`Movable`]) stops its copy when the park signal fires and hands its state to
//! the new process. That state is a [`Flow`]: the bytes each direction has read and not yet
//! written, and the node→client frame tracker. It lives outside the copy's futures, which only
//! borrow it, and the pumps keep it exact at every await (what is written is taken off its
//! front in the same poll), so a copy dropped at any point loses and repeats nothing: the same
//! tunnel, or another process, copies on from it. An idle tunnel's `Flow` is two empty `Bytes`
//! and a tracker — no buffer.
//!
//! Here: the tunnel's life ([`run`]: upgrades, copy, teardown, how each end closes; [`serve`]:
//! the copy, parked and resumed or handed over). Below it:
//! - [`mod@pump`]: one direction's copy through the thread's scratch buffer;
//! - [`drain`]: the node→client direction, frame-aware, with the drain's 1012;
//! - [`mod@linger`]: the lingering close of the client's side.

use std::io;
use std::pin::{pin, Pin};
use std::sync::Arc;

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::conn::ClientConn;
use crate::frames::FrameTracker;
use crate::pool::ActiveGuard;
use crate::quiet::Quiet;
use crate::rebalance::{self, Ticket, REBALANCE_REASON};
use crate::tls::ClientStream;
use tokio_util::either::Either;

mod drain;
mod linger;
pub(crate) mod park;
mod pump;
pub(crate) mod rehome;

use drain::{fired, pump_from_node, FromNode};
pub(crate) use drain::{DRAIN_FRAME_DEADLINE, DRAIN_REASON};
use linger::linger;
pub(crate) use linger::CLOSE_LINGER;
use pump::{pump, Fault};

/// What, besides either side hanging up, ends a tunnel.
#[derive(Debug, Clone)]
pub(crate) struct Stops {
    /// Fired when the node is marked down (not when merely unready).
    pub node_down: CancellationToken,
    /// Fired when an operator drains the node: close with 1012 at the next frame boundary.
    pub drain: CancellationToken,
    /// Fired when the shutdown grace period is over.
    pub hard_stop: CancellationToken,
    /// With `rebalance = "paced"`: the client's ticket to move when a node it ranks first
    /// becomes available ([`rebalance`]). Only WebSocket tunnels move.
    pub rebalance: Option<Arc<Ticket>>,
    /// Reason of the 1012 close frame `drain` leads to: [`DRAIN_REASON`], or
    /// [`REBALANCE_REASON`] once a rebalance moves the client (see [`Stops::move_out`]).
    pub drain_reason: &'static str,
}

impl Stops {
    pub fn new(node_down: CancellationToken, drain: CancellationToken, hard_stop: CancellationToken) -> Self {
        Self { node_down, drain, hard_stop, rebalance: None, drain_reason: DRAIN_REASON }
    }

    /// A rebalance granted this tunnel its move: from now on it closes its client 1012
    /// (`rebalance`) at the next frame boundary, exactly as a drain of its node would.
    fn move_out(&mut self) {
        let moved = CancellationToken::new();
        moved.cancel();
        self.drain = moved;
        self.drain_reason = REBALANCE_REASON;
        self.rebalance = None;
    }
}

/// Why [`copy`] stopped with both streams still open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Paused {
    /// For an upgrade's hand-off.
    Park,
    /// A rebalance moves this client: the copy goes on into a drain.
    Move,
}

/// What a tunnel has read from one side and not yet written to the other, and where the
/// node→client stream stands between frames: all the state of a tunnel besides its two
/// sockets. It lives outside the copy's futures (which only borrow it), so that a copy cut
/// short by a park leaves it exact, and an upgrade can carry it to the new process. Two empty
/// `Bytes` and a tracker: no buffer while idle.
#[derive(Debug, Default)]
pub(crate) struct Flow {
    /// The client's bytes, read, not yet written to the node.
    pub to_node: Bytes,
    /// The node's bytes, read (and followed by `frames`), not yet written to the client.
    pub to_client: Bytes,
    /// Frame boundaries of the node→client stream, up to the end of `to_client`.
    pub frames: FrameTracker,
}

impl Flow {
    /// A fresh tunnel's flow: what hyper read past each side's HTTP head goes out first.
    fn new(client_early: Bytes, node_early: Bytes) -> Self {
        let mut frames = FrameTracker::new();
        frames.advance(&node_early);
        Self { to_node: client_early, to_client: node_early, frames }
    }
}

/// A tunnel that may be handed to a new process on an upgrade ([`park`]): plain TCP
/// on both sides. A TLS tunnel is not (its session keys live in this process): it stays, and
/// is drained when the old process retires.
pub(crate) struct Movable {
    pub tunnels: Arc<park::Tunnels>,
    /// Carried over with the tunnel, for the new process's logs.
    pub client_id: Box<str>,
    /// The node's name: the new process finds the node (its signals, its counts) by it.
    pub node: Box<str>,
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
    /// Parked for an upgrade: not an end, the copy stopped with [`Flow`] exact.
    Park,
    /// A rebalance granted this tunnel its move: not an end either, it goes on into a drain.
    Move,
}

impl End {
    /// The node's side ended first and the client may still be sending: its side closes
    /// lingering, so that what went out before (a close frame) is not destroyed by a reset.
    fn lingers(&self) -> bool {
        matches!(self, End::NodeClosed(_) | End::NodeGone(_) | End::NodeDown | End::Drained(true))
    }
}

/// Waits for both upgrades, then copies until the first end. The guard and the client
/// connection's slot are held for as long as the tunnel lives. `websocket`: the node switched
/// to WebSocket, so a drain can close it with a frame; any other protocol is cut on drain.
/// `movable`: the tunnel may be handed over on an upgrade.
pub(crate) async fn run(
    client: OnUpgrade,
    node: OnUpgrade,
    websocket: bool,
    stops: Stops,
    guard: Arc<ActiveGuard>,
    conn: Arc<ClientConn>,
    movable: Option<Movable>,
) {
    // Counted from now: an upgrade waits for tunnels still being set up, to hand them over too.
    let live = movable.as_ref().map(|m| m.tunnels.live());
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
    let (Some((client, client_early)), Some((node, node_early))) = (into_client(client), into_node(node)) else {
        // The client side is served over `TokioIo<ClientStream>` (see `server`), the node's
        // over `TokioIo<TcpStream>` (see `proxy`): only a change there gets here.
        warn!("an upgraded connection is not of the expected stream type; tunnel closed");
        return;
    };
    let flow = Flow::new(client_early, node_early);
    // Each kind of client stream has its own instance of `copy`: a plain tunnel's is exactly
    // the zero-buffer copy over two bare sockets, and can be parked and handed over; a TLS
    // one's splits the TLS stream, and stays in this process (its session cannot move).
    match client {
        Either::Left(tcp) => {
            serve(tcp, node, flow, websocket, stops, Some(guard), conn, movable, live).await;
        }
        Either::Right(mut tls) => {
            drop((movable, live));
            let (mut flow, mut guard, mut stops, mut node) = (flow, Some(guard), stops, node);
            // Bounded: after a move the tunnel drains, and a drain never pauses again.
            for _ in 0..2 {
                match Box::pin(copy(tls, node, &mut flow, websocket, &stops, None, &mut guard)).await {
                    Err((t, n, Paused::Move)) => {
                        (tls, node) = (t, n);
                        stops.move_out();
                    }
                    _ => break,
                }
            }
            // The client's socket closed when `copy` returned; its slot is given back now.
            drop(conn);
        }
    }
}

/// Runs a tunnel whose both sides are plain TCP streams, from `flow` on: a new one (from
/// [`run`]) or one handed over by the process this one replaced ([`crate::upgrade`]). Parks it
/// when an upgrade asks (movable tunnels only), and either lets it go (the new process has
/// taken it) or copies on (the upgrade failed, or the node is draining: a drain finishes here).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    mut client: TcpStream,
    mut node: TcpStream,
    mut flow: Flow,
    websocket: bool,
    mut stops: Stops,
    mut guard: Option<Arc<ActiveGuard>>,
    conn: Arc<ClientConn>,
    movable: Option<Movable>,
    mut live: Option<park::Live>,
) {
    if live.is_none() {
        live = movable.as_ref().map(|m| m.tunnels.live());
    }
    let mut park = movable.as_ref().map(|m| m.tunnels.park_signal());
    loop {
        match copy(client, node, &mut flow, websocket, &stops, park.as_ref(), &mut guard).await {
            Ok(_) => break,
            Err((c, n, paused)) => {
                (client, node) = (c, n);
                if paused == Paused::Move {
                    // On into the drain that closes the client 1012 `rebalance`.
                    stops.move_out();
                    continue;
                }
                let Some(m) = &movable else { break };
                if stops.drain.is_cancelled() {
                    // A drain in progress finishes here, at its frame boundary.
                    park = None;
                    live = None;
                    continue;
                }
                match m.tunnels.offer(&client, &node, &flow, websocket, m, conn.peer, live.take()).await {
                    park::Verdict::Taken => {
                        debug!("tunnel handed over to the new process");
                        // Only this process's descriptors close: the new one has its own.
                        return;
                    }
                    park::Verdict::Resume(signal) => {
                        debug!("not handed over; tunnel resumed");
                        live = signal.as_ref().map(|_| m.tunnels.live());
                        park = signal;
                    }
                }
            }
        }
    }
    drop(live);
    // The client's socket closed when `copy` returned; its slot is given back now.
    drop(conn);
}

/// The client's stream under an upgraded connection, and what hyper had read from it past
/// the HTTP head (its first frames sent along with its request; decrypted, over TLS).
fn into_client(upgraded: Upgraded) -> Option<(ClientStream, Bytes)> {
    let parts = upgraded.downcast::<TokioIo<ClientStream>>().ok()?;
    Some((parts.io.into_inner(), parts.read_buf))
}

/// The TCP stream under the node's upgraded connection, and what hyper had read from it past
/// the 101's head (the node's first frames sent along with it).
fn into_node(upgraded: Upgraded) -> Option<(TcpStream, Bytes)> {
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    Some((parts.io.into_inner(), parts.read_buf))
}

/// The client's end of a tunnel, as [`copy`] needs it: two halves that both directions can
/// use at once in the tunnel's one task, and a way to make its close a reset.
pub(crate) trait ClientSide {
    type Rx<'a>: AsyncRead + Unpin
    where
        Self: 'a;
    type Tx<'a>: AsyncWrite + Unpin
    where
        Self: 'a;
    /// The read and write halves, borrowed for the copy.
    fn halves(&mut self) -> (Self::Rx<'_>, Self::Tx<'_>);
    /// Makes the coming close a reset (`SO_LINGER` 0) rather than a FIN queued behind data a
    /// stalled client never takes.
    fn reset_on_close(&self);
}

/// A plain client: the socket's own borrowed halves, no allocation, no lock.
impl ClientSide for TcpStream {
    type Rx<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Tx<'a> = tokio::net::tcp::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Rx<'_>, Self::Tx<'_>) {
        self.split()
    }
    fn reset_on_close(&self) {
        let _ = self.set_zero_linger();
    }
}

/// A TLS client: one rustls session serves both directions, so it is shared between the two
/// halves through `tokio::io::split` (one small allocation per tunnel, an uncontended lock
/// per poll: both halves run in the same task). Shutting the write half down sends
/// `close_notify`, then the FIN.
impl ClientSide for Box<TlsStream<TcpStream>> {
    type Rx<'a> = tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>;
    type Tx<'a> = tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>;
    fn halves(&mut self) -> (Self::Rx<'_>, Self::Tx<'_>) {
        tokio::io::split(&mut **self)
    }
    fn reset_on_close(&self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

/// The tunnel proper, once the client's side is a [`ClientSide`] and the node's a TCP stream;
/// returns why it ended, or both streams back when `park` fired or a rebalance granted this
/// tunnel its move (with `flow` exact: nothing read is lost). The node's connection (and `guard`) are let go as soon as the copy ends; the
/// client's lingers when the node's side ended first (see [`End::lingers`]).
async fn copy<C: ClientSide>(
    mut client: C,
    mut node: TcpStream,
    flow: &mut Flow,
    websocket: bool,
    stops: &Stops,
    park: Option<&CancellationToken>,
    guard: &mut Option<Arc<ActiveGuard>>,
) -> Result<End, (C, TcpStream, Paused)> {
    debug!("tunnel open");
    // Not a WebSocket: no frames to respect, so a drain cuts at once.
    let (frame_drain, cut_drain) = if websocket { (Some(&stops.drain), None) } else { (None, Some(&stops.drain)) };
    // `linger_until`: the node's side is over, the client's may not be; one bound for both
    // the rest of the node's bytes and the linger. (Made after the copy, not kept through it.)
    let (end, linger_until) = {
        let (mut client_rx, mut client_tx) = client.halves();
        let (mut node_rx, mut node_tx) = node.split();
        let Flow { to_node, to_client, frames } = flow;
        // Boxed, and only with a ticket: most tunnels never move, and `off` costs nothing.
        let mut mover = stops
            .rebalance
            .as_ref()
            .filter(|_| websocket)
            .map(|ticket| Box::pin(rebalance::wanted(ticket, ticket.node)));
        let stopped = pin!(async {
            tokio::select! {
                _ = stops.node_down.cancelled() => End::NodeDown,
                _ = fired(cut_drain) => End::Drained(false),
                _ = stops.hard_stop.cancelled() => End::Shutdown,
                _ = fired(park) => End::Park,
                _ = moved(mover.as_mut().map(|m| m.as_mut())) => End::Move,
            }
        });
        // The stop signals are polled only when one of them fires, not for every message.
        let quiet = Quiet::new();
        // Outside the `select!`, so that it can run on when the node's side failed first.
        let mut from_node =
            pin!(pump_from_node(to_client, frames, &mut node_rx, &mut client_tx, frame_drain, stops.drain_reason));
        let end = tokio::select! {
            r = pump(to_node, &mut client_rx, &mut node_tx) => match r {
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
        End::Park => {
            debug!("tunnel parked for an upgrade");
            return Err((client, node, Paused::Park));
        }
        End::Move => {
            debug!("tunnel moving: a rebalance wants its client on the node that came back");
            return Err((client, node, Paused::Move));
        }
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
    drop(guard.take());
    let (mut client_rx, mut client_tx) = client.halves();
    if end.lingers() {
        // Boxed: it runs once per tunnel, at its end, and must not weigh on an idle tunnel.
        Box::pin(async {
            tokio::select! {
                () = linger(&mut client_rx, &mut client_tx, linger_until) => {}
                _ = stops.hard_stop.cancelled() => {}
            }
        })
        .await;
    }
    // Let go of the halves (a TLS stream's share the session) before the stream itself.
    drop((client_rx, client_tx));
    if matches!(end, End::Drained(false)) {
        // Its frame cut in the middle, the client cannot read the rest of the WebSocket; and it
        // may have stopped reading, so that a FIN would wait behind unsent bytes (the socket
        // kept in FIN-WAIT-1): a reset frees it at once.
        client.reset_on_close();
    }
    // Returning closes the client's socket.
    Ok(end)
}

/// Waits until `mover` resolves (a rebalance granted the move); forever without one.
async fn moved<F: std::future::Future>(mover: Option<Pin<&mut F>>) {
    match mover {
        Some(mover) => {
            mover.await;
        }
        None => std::future::pending().await,
    }
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

#[cfg(test)]
mod tests;
