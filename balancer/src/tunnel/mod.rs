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
//! Here: the tunnel's life ([`run`]: upgrades, copy, teardown, how each end closes). Below it:
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
use crate::pool::ActiveGuard;
use crate::quiet::Quiet;
use crate::tls::ClientStream;

mod drain;
mod linger;
mod pump;

use drain::{fired, pump_from_node, FromNode};
use linger::{linger, CLOSE_LINGER};
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
    let (Some((client, client_early)), Some(node)) = (into_client(client), into_node(node)) else {
        // The client side is served over `TokioIo<ClientStream>` (see `server`), the node's
        // over `TokioIo<TcpStream>` (see `proxy`): only a change there gets here.
        warn!("an upgraded connection is not of the expected stream type; tunnel closed");
        return;
    };
    // Each kind of client stream has its own instance of `copy`: a plain tunnel's is exactly
    // the zero-buffer copy over two bare sockets; a TLS one's splits the TLS stream.
    match client {
        ClientStream::Plain(tcp) => {
            copy((tcp, client_early), node, websocket, &stops, guard).await;
        }
        ClientStream::Tls(tls) => {
            Box::pin(copy((tls, client_early), node, websocket, &stops, guard)).await;
        }
    }
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

/// The tunnel proper, once both sides are plain TCP streams; returns why it ended. The node's
/// connection (and `guard`) are let go as soon as the copy ends; the client's lingers when the
/// node's side ended first (see [`End::lingers`]).
async fn copy<C: ClientSide>(
    (mut client, client_early): (C, Bytes),
    (mut node, node_early): (TcpStream, Bytes),
    websocket: bool,
    stops: &Stops,
    guard: Arc<ActiveGuard>,
) -> End {
    debug!("tunnel open");
    let (mut client_rx, mut client_tx) = client.halves();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::close_frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A node's whole binary frame of three bytes, unmasked.
    const SMALL_FRAME: [u8; 5] = [0x82, 3, b'x', b'x', b'x'];

    /// Bound of [`an_idle_tunnel_holds_only_a_small_task_state`]: the future is about 1.3 KB
    /// today, and Tokio rounds a task's allocation up to a multiple of 128 bytes.
    const TUNNEL_STATE_LIMIT: usize = 1536;

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

    /// A TLS connection over loopback: the balancer's side (as the tunnel gets it) and the
    /// client's.
    async fn tls_pair() -> (Box<TlsStream<TcpStream>>, tokio_rustls::client::TlsStream<TcpStream>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = tether_kit::certs::DevCa::generate("tunnel test CA").unwrap();
        let files = ca.write(dir.path()).unwrap();
        let server = crate::tls::server_config(&files.cert, &files.key).unwrap();
        let client = tether_kit::certs::client_config(ca.cert_pem()).unwrap();
        let (near, far) = tcp_pair().await;
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let (client, server) = tokio::join!(
            tokio_rustls::TlsConnector::from(client).connect(name, near),
            tokio_rustls::TlsAcceptor::from(server).accept(far),
        );
        (Box::new(server.unwrap()), client.unwrap())
    }

    #[tokio::test]
    async fn a_nodes_close_frame_reaches_a_tls_client_that_is_still_sending_then_close_notify() {
        let stops = stops();
        let ((client, client_peer), (node, mut node_peer)) = (tls_pair().await, tcp_pair().await);
        let (mut client_rx, mut client_tx) = tokio::io::split(client_peer);
        let stop = CancellationToken::new();
        let flooding = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let chunk = vec![0x5au8; 64 * 1024];
                for _ in 0..4096 {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        written = client_tx.write_all(&chunk) => if written.is_err() { return },
                    }
                }
            })
        };
        let tunnel = tokio::spawn(async move {
            let end = copy((client, Bytes::new()), (node, Bytes::new()), true, &stops, guard()).await;
            matches!(end, End::NodeGone(_) | End::NodeClosed(_))
        });
        let mut some = vec![0u8; 100_000];
        node_peer.read_exact(&mut some).await.unwrap();
        node_peer.write_all(&node_close(1009)).await.unwrap();
        drop(node_peer);
        // The frame, then a clean end of the TLS stream (close_notify): no reset, no
        // truncation error.
        let mut got = Vec::new();
        let end = client_rx.read_to_end(&mut got).await;
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
            node_peer.write_all(&SMALL_FRAME).await.unwrap();
            let mut got = [0u8; 5];
            client_peer.read_exact(&mut got).await.unwrap();
            assert_eq!(got, SMALL_FRAME);
            drop(client_peer);
        };
        let (end, ()) = tokio::join!(tunnel, peers);
        assert!(matches!(end, End::ClientClosed(Ok(4))));
    }
}
