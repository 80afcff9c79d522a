//! The re-homing tunnel (`failover = "rehome"`): a client's WebSocket that outlives its node.
//!
//! It forwards **whole frames** both ways (a frame split over reads waits, its bytes kept, until
//! it is complete), so that at any moment neither side has half a frame from it. While it does,
//! [`track::Tracker`] learns what a switch needs: per room the last `(epoch, seq)` forwarded to
//! the client, and the client's `message`s the node has not confirmed (no echo, `duplicate`
//! or `error` naming their `msg_id` yet; a message without a `msg_id` gets one on the way).
//!
//! When the node dies (its connection ends or fails, or it is marked down), is drained, or
//! closes 1012, the tunnel drops the node's connection (and whatever partial frame it was
//! sending: the client never saw any of it), and **switches**: it keeps reading the client
//! (holding its frames, at most `rehome_buffer_bytes`, past which the client is closed 1008)
//! and writing it what it already had, while it dials the next node in the client's rank with
//! the client's own upgrade request ([`dial`]). The new node's `connected` is dropped; the
//! tunnel sends it a `resume` of every room, then every unconfirmed message and every held
//! frame, in order; the client gets one `rehomed` frame, then its replay. A node that fails
//! during the switch is skipped for the next; none within `rehome_timeout_ms`: the client is
//! closed 1012 after all. The node deduplicates resent messages by `(client, msg_id)`, and
//! the tracker drops any message at or below a room's position: none reaches the client twice.
//!
//! Frames larger than `rehome_buffer_bytes` are not held whole: a client's is refused (1009);
//! a node's streams through, and a switch in the middle of one cannot be repaired (the
//! client's connection is reset, as in reconnect mode). A re-homing tunnel is not handed over
//! by an upgrade of the balancer (it stays with the old process until it ends).

mod dial;
mod track;
mod wsframe;

pub(crate) use dial::Redial;

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::upgrade::OnUpgrade;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::pump::with_scratch;
use super::{into_client, into_node, linger, ClientSide, CLOSE_LINGER};
use crate::conn::ClientConn;
use crate::frames::close_frame;
use crate::pool::ActiveGuard;
use crate::quiet::Quiet;
use crate::rebalance::{self, Ticket};
use crate::Shared;
use dial::{dial, Dialed, NoDial};
use track::{Down, Tracker, Up};
use wsframe::header;

/// Pause before trying every node again when none could be opened.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// What a re-homing tunnel starts with (from [`crate::proxy`]).
pub(crate) struct Setup {
    pub shared: Arc<Shared>,
    pub id: String,
    /// What the client's nodes are ranked by (its id, or its placement key): a switch goes to
    /// the next node in that rank, so a client placed by room follows its room.
    pub place: String,
    /// The node the client's upgrade went to.
    pub index: usize,
    pub guard: Arc<ActiveGuard>,
    pub redial: Redial,
    pub conn: Arc<ClientConn>,
    /// That node's signals, as taken before connecting to it.
    pub down: CancellationToken,
    pub drain: CancellationToken,
    /// With `rebalance = "paced"`: the client's ticket to move to a node that comes back.
    pub rebalance: Option<Arc<Ticket>>,
}

/// The node under the tunnel now.
struct Link {
    index: usize,
    stream: TcpStream,
    down: CancellationToken,
    drain: CancellationToken,
    _guard: Arc<ActiveGuard>,
}

/// What set a switch off.
#[derive(Debug, Clone, Copy)]
enum Cause {
    /// The node's connection ended or failed, or the node was marked down.
    Down,
    /// An operator drained it.
    Drain,
    /// It closed 1012 (shutting down).
    Restart,
    /// A paced rebalance moves the client to a node that came back (the old one is fine).
    Rebalance,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Self::Down => "down",
            Self::Drain => "drain",
            Self::Restart => "restart",
            Self::Rebalance => "rebalance",
        }
    }
}

/// How the tunnel ends.
#[derive(Debug)]
enum End {
    /// The client hung up (or reading from it failed).
    ClientClosed,
    /// Writing to the client failed.
    ClientFailed,
    /// The node closed the WebSocket (a close other than 1012, or its answer to the
    /// client's): forwarded, then the client's side lingers.
    NodeClosed,
    Shutdown,
    /// The balancer closes the client with this code and reason.
    Close(u16, &'static str),
    /// The client's stream was cut in the middle of a frame: nothing valid can follow.
    Broken,
}

/// What [`Rehome::poll_io`] stops for.
enum Ev {
    End(End),
    Switch(Cause),
    /// The new node's `connected` came (during a switch).
    Connected,
}

/// The node's side, as the one-task copy uses it.
type NodeHalves<'a> = (ReadHalf<'a>, WriteHalf<'a>);

/// A re-homing tunnel's state besides its sockets.
struct Rehome {
    t: Tracker,
    /// Most bytes held: of one frame, and of a client's frames during a switch.
    bound: usize,
    /// Bytes of an incomplete node frame.
    down_partial: Vec<u8>,
    /// Whole frames for the client, not yet written.
    down_out: Bytes,
    /// Payload bytes still to stream of a node frame too large to hold.
    passthrough: u64,
    /// The node sent a close frame (not 1012): its hang-up ends the tunnel.
    node_closing: bool,
    /// Bytes of an incomplete client frame.
    up_partial: Vec<u8>,
    /// Whole client frames (and the balancer's own) for the node, in order.
    queue: VecDeque<Up>,
    /// Bytes of the queue's first frame already written.
    written: usize,
    /// Switching: nothing goes to a node, the client's frames are held.
    switching: bool,
}

/// Runs a re-homing tunnel: waits for both upgrades, then serves it until it ends.
pub(crate) async fn run(client: OnUpgrade, node: OnUpgrade, setup: Setup) {
    let hard_stop = setup.shared.hard_stop.clone();
    let upgrades = async { tokio::try_join!(client, node) };
    let (client, node) = tokio::select! {
        upgraded = upgrades => match upgraded {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                return;
            }
        },
        _ = setup.down.cancelled() => return,
        _ = hard_stop.cancelled() => return,
    };
    let (Some((client, client_early)), Some((node, node_early))) = (into_client(client), into_node(node)) else {
        warn!("an upgraded connection is not of the expected stream type; tunnel closed");
        return;
    };
    match client {
        Either::Left(tcp) => Box::pin(serve(tcp, node, client_early, node_early, setup)).await,
        Either::Right(tls) => Box::pin(serve(tls, node, client_early, node_early, setup)).await,
    }
}

async fn serve<C: ClientSide>(mut client: C, node: TcpStream, client_early: Bytes, node_early: Bytes, setup: Setup) {
    let Setup { shared, id, place, index, guard, redial, conn, down, drain, rebalance: ticket } = setup;
    let hard_stop = shared.hard_stop.clone();
    let (bound, switch_timeout) = {
        let config = shared.config();
        (config.rehome_buffer_bytes, config.rehome_timeout)
    };
    debug!("re-homing tunnel open");
    let mut r = Rehome {
        t: Tracker::new(&id),
        bound,
        down_partial: Vec::new(),
        down_out: Bytes::new(),
        passthrough: 0,
        node_closing: false,
        up_partial: Vec::new(),
        queue: VecDeque::new(),
        written: 0,
        switching: false,
    };
    let mut link = Some(Link { index, stream: node, down, drain, _guard: guard });
    let mut pending = r.on_client_bytes(&client_early).or(r.on_node_bytes(&node_early));
    let end = loop {
        let Some(current) = link.as_mut() else { break End::Shutdown };
        let ev = match pending.take() {
            Some(ev) => ev,
            None => {
                let (mut crx, mut ctx) = client.halves();
                let mut halves = current.stream.split();
                // Made again after each switch (rare): it asks where the client is now. Polled
                // only when its token fires ([`Quiet`]): that token is the whole balancer's.
                let mut mover =
                    ticket.as_deref().map(|t| (Quiet::new(), Box::pin(rebalance::wanted(t, current.index))));
                tokio::select! {
                    ev = poll_fn(|cx| r.poll_io(cx, &mut crx, &mut ctx, Some(&mut halves))) => ev,
                    _ = current.down.cancelled() => Ev::Switch(Cause::Down),
                    _ = current.drain.cancelled() => Ev::Switch(Cause::Drain),
                    () = granted(mover.as_mut()) => Ev::Switch(Cause::Rebalance),
                    _ = hard_stop.cancelled() => Ev::End(End::Shutdown),
                }
            }
        };
        match ev {
            Ev::End(end) => break end,
            // Only awaited during a switch.
            Ev::Connected => {}
            Ev::Switch(cause) => {
                let from = link.take().map(|l| l.index);
                // A move leaves a node that is fine: it stays a candidate (should the node
                // moved to fail, the client goes back rather than further down its rank).
                let except = if matches!(cause, Cause::Rebalance) { Vec::new() } else { from.into_iter().collect() };
                let started = Instant::now();
                let deadline = started + switch_timeout;
                let switched = r.switch(&mut client, &shared, &place, &redial, except, deadline).await;
                shared.metrics.rehomed(cause.as_str(), switched.is_ok());
                match switched {
                    Ok((new, resent)) => {
                        shared.metrics.rehome_resent.inc_by(resent as u64);
                        debug!(cause = cause.as_str(), node = %shared.pool.get(new.index).name, resent,
                            ms = started.elapsed().as_millis() as u64, "re-homed");
                        link = Some(new);
                        pending = r.on_node_bytes(&[]);
                    }
                    Err(end) => {
                        debug!(cause = cause.as_str(), ?end, "could not re-home");
                        break end;
                    }
                }
            }
        }
    };
    debug!(?end, "re-homing tunnel over");
    drop(link);
    match end {
        End::ClientClosed | End::ClientFailed | End::Shutdown => {}
        End::Broken => client.reset_on_close(),
        End::NodeClosed | End::Close(..) => {
            let until = Instant::now() + CLOSE_LINGER;
            let mut rest = std::mem::take(&mut r.down_out).to_vec();
            if let End::Close(code, reason) = end {
                if r.passthrough > 0 {
                    client.reset_on_close();
                    return;
                }
                rest.extend_from_slice(&close_frame(code, reason));
            }
            let (mut crx, mut ctx) = client.halves();
            Box::pin(async {
                tokio::select! {
                    _ = async {
                        let _ = tokio::time::timeout_at(until, ctx.write_all(&rest)).await;
                        linger(&mut crx, &mut ctx, until).await;
                    } => {}
                    _ = hard_stop.cancelled() => {}
                }
            })
            .await;
        }
    }
    drop(conn);
}

impl Rehome {
    /// Copies whole frames both ways (to a node when there is one and no switch holds them)
    /// until something ends the copy, or the node's `connected` comes.
    fn poll_io<CR, CW>(
        &mut self,
        cx: &mut Context<'_>,
        crx: &mut CR,
        ctx: &mut CW,
        mut node: Option<&mut NodeHalves<'_>>,
    ) -> Poll<Ev>
    where
        CR: AsyncRead + Unpin,
        CW: AsyncWrite + Unpin,
    {
        loop {
            let mut progress = false;
            while !self.down_out.is_empty() {
                match Pin::new(&mut *ctx).poll_write(cx, &self.down_out) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ev::End(End::ClientFailed)),
                    Poll::Ready(Ok(n)) => {
                        self.down_out.advance(n);
                        progress = true;
                    }
                    Poll::Pending => break,
                }
            }
            if self.down_out.is_empty() {
                // Let go of the allocation of what was written.
                self.down_out = Bytes::new();
            }
            if let Some((nrx, ntx)) = node.as_deref_mut() {
                if self.down_out.is_empty() {
                    match poll_read_with(cx, nrx, |bytes| self.on_node_bytes(bytes)) {
                        Poll::Ready(None) => return Poll::Ready(self.node_gone()),
                        Poll::Ready(Some(ev)) => {
                            progress = true;
                            if let Some(ev) = ev {
                                return Poll::Ready(ev);
                            }
                        }
                        Poll::Pending => {}
                    }
                }
                while let Some(front) = self.queue.front().filter(|_| !self.switching) {
                    let len = front.frame.len();
                    match Pin::new(&mut *ntx).poll_write(cx, &front.frame[self.written..]) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(self.node_gone()),
                        Poll::Ready(Ok(n)) => {
                            self.written += n;
                            if self.written == len {
                                self.queue.pop_front();
                                self.written = 0;
                            }
                            progress = true;
                        }
                        Poll::Pending => break,
                    }
                }
            }
            // During a switch the client's frames are held (bounded below); otherwise the
            // client is read only once the node took what came before and confirmed enough.
            let may_read = self.switching || (self.queue.is_empty() && self.t.unconfirmed_bytes() < self.bound);
            if may_read {
                match poll_read_with(cx, crx, |bytes| self.on_client_bytes(bytes)) {
                    Poll::Ready(None) => return Poll::Ready(Ev::End(End::ClientClosed)),
                    Poll::Ready(Some(ev)) => {
                        progress = true;
                        if let Some(ev) = ev {
                            return Poll::Ready(ev);
                        }
                    }
                    Poll::Pending => {}
                }
            }
            if self.switching && self.held_bytes() > self.bound {
                return Poll::Ready(Ev::End(End::Close(1008, "too much sent during a node switch")));
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// The node's connection ended or failed: the end of the tunnel when the WebSocket was
    /// closing anyway, else a switch.
    fn node_gone(&self) -> Ev {
        if self.node_closing || self.t.client_closing {
            Ev::End(End::NodeClosed)
        } else {
            Ev::Switch(Cause::Down)
        }
    }

    /// Client bytes held during a switch: unconfirmed messages and other queued frames.
    fn held_bytes(&self) -> usize {
        let untracked: usize = self.queue.iter().filter(|u| !u.tracked).map(|u| u.frame.len()).sum();
        self.t.unconfirmed_bytes() + untracked + self.up_partial.len()
    }

    /// Bytes from the node, after those kept from before: whole frames go to the tracker and
    /// (most of them) on to the client; an incomplete one waits.
    fn on_node_bytes(&mut self, chunk: &[u8]) -> Option<Ev> {
        let mut partial = std::mem::take(&mut self.down_partial);
        let buf: &[u8] = if partial.is_empty() {
            chunk
        } else {
            partial.extend_from_slice(chunk);
            &partial
        };
        let mut out = Vec::new();
        let mut at = 0;
        let mut ev = None;
        while at < buf.len() {
            if self.passthrough > 0 {
                let take = self.passthrough.min((buf.len() - at) as u64) as usize;
                out.extend_from_slice(&buf[at..at + take]);
                self.passthrough -= take as u64;
                at += take;
                continue;
            }
            let Some(h) = header(&buf[at..]) else { break };
            if h.frame_len() > self.bound as u64 {
                // Too large to hold: streamed, unread.
                out.extend_from_slice(&buf[at..at + h.header_len]);
                at += h.header_len;
                self.passthrough = h.payload_len;
                continue;
            }
            let len = h.frame_len() as usize;
            if buf.len() - at < len {
                break;
            }
            let frame = &buf[at..at + len];
            at += len;
            match self.t.on_node_frame(&h, &frame[h.header_len..]) {
                Down::Forward => out.extend_from_slice(frame),
                Down::Drop => {}
                Down::Closing => {
                    out.extend_from_slice(frame);
                    self.node_closing = true;
                }
                Down::Switch => {
                    // Nothing after a close counts.
                    at = buf.len();
                    ev = Some(Ev::Switch(Cause::Restart));
                    break;
                }
                Down::Connected => {
                    // What follows is read once the switch has sent its own frames.
                    ev = Some(Ev::Connected);
                    break;
                }
            }
        }
        let rest = buf[at..].to_vec();
        drop(partial);
        self.down_partial = rest;
        if !out.is_empty() {
            self.push_down(out);
        }
        ev
    }

    /// Bytes from the client: whole frames are numbered, tracked and queued for the node.
    fn on_client_bytes(&mut self, chunk: &[u8]) -> Option<Ev> {
        let mut partial = std::mem::take(&mut self.up_partial);
        let buf: &[u8] = if partial.is_empty() {
            chunk
        } else {
            partial.extend_from_slice(chunk);
            &partial
        };
        let mut at = 0;
        while at < buf.len() {
            let Some(h) = header(&buf[at..]) else { break };
            if h.frame_len() > self.bound as u64 {
                return Some(Ev::End(End::Close(1009, "frame too large")));
            }
            let len = h.frame_len() as usize;
            if buf.len() - at < len {
                break;
            }
            let up = self.t.on_client_frame(&h, &buf[at..at + len]);
            self.queue.push_back(up);
            at += len;
        }
        let rest = buf[at..].to_vec();
        drop(partial);
        self.up_partial = rest;
        None
    }

    fn push_down(&mut self, bytes: Vec<u8>) {
        if self.down_out.is_empty() {
            self.down_out = Bytes::from(bytes);
        } else {
            let mut joined = Vec::with_capacity(self.down_out.len() + bytes.len());
            joined.extend_from_slice(&self.down_out);
            joined.extend_from_slice(&bytes);
            self.down_out = Bytes::from(joined);
        }
    }

    /// Moves the client to the next node that takes it; returns that node, and how many
    /// messages were resent to it.
    async fn switch<C: ClientSide>(
        &mut self,
        client: &mut C,
        shared: &Shared,
        place: &str,
        redial: &Redial,
        mut except: Vec<usize>,
        deadline: Instant,
    ) -> Result<(Link, usize), End> {
        if self.passthrough > 0 {
            // The client has part of a frame the dead node never finished.
            return Err(End::Broken);
        }
        if shared.process.is_retired() {
            // An upgrade's old process drains every node at its end: the client reconnects,
            // to the new process.
            return Err(End::Close(1012, "balancer restarting"));
        }
        self.down_partial = Vec::new();
        self.node_closing = false;
        self.written = 0;
        self.switching = true;
        // A token the client refreshed since its upgrade replaces the one it carried.
        let token = self.t.token.clone();
        loop {
            let dialed = {
                let (mut crx, mut ctx) = client.halves();
                tokio::select! {
                    dialed = dial(shared, place, redial, token.as_deref(), &mut except) => dialed,
                    ev = poll_fn(|cx| self.poll_io(cx, &mut crx, &mut ctx, None)) => match ev {
                        Ev::End(end) => return Err(end),
                        // Without a node there is nothing else to stop for.
                        Ev::Switch(_) | Ev::Connected => continue,
                    },
                    _ = sleep_until(deadline) => return Err(End::Close(1012, "no node to move to")),
                    _ = shared.hard_stop.cancelled() => return Err(End::Shutdown),
                }
            };
            let Dialed { index, stream, early, guard } = match dialed {
                Ok(dialed) => dialed,
                Err(NoDial::Refused(status)) => {
                    debug!(%status, "rehome: the next node refused the client's request");
                    return Err(End::Close(1008, "refused by the next node"));
                }
                Err(NoDial::NoNode) => {
                    // Every node is down, drained or just failed: look again shortly (a
                    // restarting node comes back), serving the client meanwhile.
                    let pause = (Instant::now() + RETRY_PAUSE).min(deadline);
                    let (mut crx, mut ctx) = client.halves();
                    tokio::select! {
                        _ = sleep_until(pause) => {}
                        ev = poll_fn(|cx| self.poll_io(cx, &mut crx, &mut ctx, None)) => {
                            if let Ev::End(end) = ev {
                                return Err(end);
                            }
                        }
                    }
                    if Instant::now() >= deadline {
                        return Err(End::Close(1012, "no node to move to"));
                    }
                    except.clear();
                    continue;
                }
            };
            let node = shared.pool.get(index);
            let mut link = Link { index, stream, down: node.down_signal(), drain: node.drain_signal(), _guard: guard };
            self.t.expect_connected();
            let mut ev = self.on_node_bytes(&early);
            if ev.is_none() {
                let (mut crx, mut ctx) = client.halves();
                let mut halves = link.stream.split();
                ev = Some(tokio::select! {
                    ev = poll_fn(|cx| self.poll_io(cx, &mut crx, &mut ctx, Some(&mut halves))) => ev,
                    _ = link.down.cancelled() => Ev::Switch(Cause::Down),
                    _ = link.drain.cancelled() => Ev::Switch(Cause::Drain),
                    _ = sleep_until(deadline) => Ev::End(End::Close(1012, "no node to move to")),
                    _ = shared.hard_stop.cancelled() => Ev::End(End::Shutdown),
                });
            }
            match ev {
                Some(Ev::Connected) => {}
                Some(Ev::End(end)) => return Err(end),
                // This one failed too (before its `connected`): the next.
                Some(Ev::Switch(_)) | None => {
                    debug!(node = %node.name, "rehome: the next node failed during the switch");
                    except.push(index);
                    self.down_partial = Vec::new();
                    self.node_closing = false;
                    continue;
                }
            }
            let Some((server, _restored, rooms)) = self.t.take_connected() else { continue };
            let (rehomed, resent) = self.t.restart(server, &rooms, &mut self.queue);
            self.written = 0;
            self.push_down(rehomed);
            self.switching = false;
            return Ok((link, resent));
        }
    }
}

/// Waits until a rebalance grants `mover` its move (polling it only when it woke); forever
/// without one.
async fn granted<F: std::future::Future>(mover: Option<&mut (Arc<Quiet>, Pin<Box<F>>)>) {
    match mover {
        Some((quiet, mover)) => {
            quiet.wait(mover.as_mut()).await;
        }
        None => std::future::pending().await,
    }
}

/// One read from `from` into the thread's scratch buffer, handed to `f`; `None` at end of
/// stream or on an error (either way that side is over).
fn poll_read_with<R, T>(cx: &mut Context<'_>, from: &mut R, f: impl FnOnce(&[u8]) -> T) -> Poll<Option<T>>
where
    R: AsyncRead + Unpin,
{
    with_scratch(|buf| {
        let mut read = ReadBuf::new(&mut *buf);
        match ready!(Pin::new(&mut *from).poll_read(cx, &mut read)) {
            Ok(()) if !read.filled().is_empty() => {
                let n = read.filled().len();
                Poll::Ready(Some(f(&buf[..n])))
            }
            _ => Poll::Ready(None),
        }
    })
}
