use super::*;
use crate::frames::close_frame;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A node's whole binary frame of three bytes, unmasked.
const SMALL_FRAME: [u8; 5] = [0x82, 3, b'x', b'x', b'x'];

/// Bound of [`an_idle_tunnel_holds_only_a_small_task_state`]: the future is about 1.1 KB
/// today (its pending bytes and frame tracker are borrowed from the caller's [`Flow`]), and
/// Tokio rounds a task's allocation up to a multiple of 128 bytes.
const TUNNEL_STATE_LIMIT: usize = 1536;

/// Two connected TCP streams on 127.0.0.1.
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let near = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (far, _) = listener.accept().await.unwrap();
    (near, far)
}

fn stops() -> Stops {
    Stops::new(CancellationToken::new(), CancellationToken::new(), CancellationToken::new())
}

fn guard() -> Arc<ActiveGuard> {
    let metrics = crate::metrics::Metrics::new();
    let nodes = [crate::config::NodeConfig { name: "n".into(), addr: "127.0.0.1:1".into() }];
    let pool = crate::pool::Pool::new(&nodes, &metrics);
    Arc::new(ActiveGuard::new(&pool.get(0)))
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
        let end = copy(client, node, &mut Flow::default(), true, &stops, None, &mut Some(guard())).await.ok().unwrap();
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
        let end = copy(client, node, &mut Flow::default(), true, &stops, None, &mut Some(guard())).await;
        matches!(end, Ok(End::NodeGone(_) | End::NodeClosed(_)))
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
    let tunnel = tokio::spawn(async move {
        copy(client, node, &mut Flow::default(), true, &stops, None, &mut Some(guard())).await.ok().unwrap()
    });
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
    let tunnel = tokio::spawn(async move {
        copy(client, node, &mut Flow::default(), false, &stops, None, &mut Some(guard())).await.ok().unwrap()
    });
    drain.cancel();
    assert!(matches!(tunnel.await.unwrap(), End::Drained(false)));
    let (got, end) = read_all(&mut client_rx).await;
    assert!(got.is_empty());
    assert_eq!(end.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
}

/// [`tcp_pair`] with small kernel buffers (set before the handshake, so that the windows
/// are small from the start): a peer that does not read blocks the tunnel after a few KB.
async fn small_tcp_pair() -> (TcpStream, TcpStream) {
    let small = || {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(4096).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket
    };
    let listening = small();
    listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = listening.listen(1).unwrap();
    let near = small().connect(listener.local_addr().unwrap()).await.unwrap();
    let (far, _) = listener.accept().await.unwrap();
    (near, far)
}

/// Writes `bytes` in 4 KB pieces, counting what went out in `progress`; keeps the stream
/// open until `done`.
async fn write_counted(
    mut to: tokio::net::tcp::OwnedWriteHalf,
    bytes: Arc<Vec<u8>>,
    progress: Arc<std::sync::atomic::AtomicUsize>,
    done: CancellationToken,
) {
    for chunk in bytes.chunks(4096) {
        to.write_all(chunk).await.unwrap();
        progress.fetch_add(chunk.len(), std::sync::atomic::Ordering::SeqCst);
    }
    done.cancelled().await;
}

#[tokio::test]
async fn a_parked_tunnel_resumes_with_its_bytes_in_flight_both_ways() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let stops = stops();
    let ((client, client_peer), (node, node_peer)) = (small_tcp_pair().await, small_tcp_pair().await);
    // Up: arbitrary bytes; down: whole WebSocket frames (the tracker must follow them).
    let up: Arc<Vec<u8>> = Arc::new((0..600_000u32).map(|i| (i.wrapping_mul(31) % 251) as u8).collect());
    let mut down = Vec::new();
    for i in 0..500u32 {
        down.extend_from_slice(&[0x82, 126, 0x03, 0xe8]);
        down.extend((0..1000u32).map(|j| ((i * 7 + j) % 253) as u8));
    }
    let down = Arc::new(down);
    let (mut client_rx, client_tx) = client_peer.into_split();
    let (mut node_rx, node_tx) = node_peer.into_split();
    let done = CancellationToken::new();
    let (up_progress, down_progress) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let writers = [
        tokio::spawn(write_counted(client_tx, Arc::clone(&up), Arc::clone(&up_progress), done.clone())),
        tokio::spawn(write_counted(node_tx, Arc::clone(&down), Arc::clone(&down_progress), done.clone())),
    ];
    let park = CancellationToken::new();
    let mut flow = Flow::default();
    let mut guard = Some(guard());
    let parked = {
        let copying = copy(client, node, &mut flow, true, &stops, Some(&park), &mut guard);
        // Nobody reads: both directions stall with bytes read and not written. Park then.
        let stalled = async {
            let mut last = (usize::MAX, usize::MAX);
            let mut still = 0;
            tether_kit::eventually(Duration::from_secs(10), "both directions to stall", || {
                let now = (up_progress.load(Ordering::SeqCst), down_progress.load(Ordering::SeqCst));
                still = if now == last && now.0 > 0 && now.1 > 0 { still + 1 } else { 0 };
                last = now;
                std::future::ready(still >= 3)
            })
            .await
            .unwrap();
            park.cancel();
            std::future::pending::<()>().await
        };
        tokio::select! {
            r = copying => r,
            () = stalled => unreachable!(),
        }
    };
    let Err((client, node, Paused::Park)) = parked else { panic!("the tunnel ended instead of parking") };
    let written = (up_progress.load(Ordering::SeqCst), down_progress.load(Ordering::SeqCst));
    assert!(written.0 < up.len() && written.1 < down.len(), "the writers were not blocked: {written:?}");
    assert!(
        !flow.to_node.is_empty() || !flow.to_client.is_empty(),
        "parked with nothing in flight: the test did not test it"
    );
    eprintln!("parked with {} bytes to the node, {} to the client", flow.to_node.len(), flow.to_client.len());
    // Resumed (as the old process does when a hand-off fails, or the new one with what it
    // was sent): every byte arrives once, in order.
    let readers = async {
        let mut got_up = vec![0u8; up.len()];
        node_rx.read_exact(&mut got_up).await.unwrap();
        let mut got_down = vec![0u8; down.len()];
        client_rx.read_exact(&mut got_down).await.unwrap();
        assert!(got_up == *up, "client→node bytes differ");
        assert!(got_down == *down, "node→client bytes differ");
        done.cancel();
    };
    let (end, ()) = tokio::join!(copy(client, node, &mut flow, true, &stops, None, &mut guard), readers);
    assert!(matches!(end, Ok(End::ClientClosed(Ok(_))) | Ok(End::NodeClosed(Ok(_)))));
    assert!(flow.frames.at_boundary(), "the tracker followed every frame exactly once");
    for writer in writers {
        writer.await.unwrap();
    }
}

#[tokio::test]
async fn an_idle_tunnel_holds_only_a_small_task_state() {
    let stops = stops();
    let ((client, mut client_peer), (node, mut node_peer)) = (tcp_pair().await, tcp_pair().await);
    let mut flow = Flow::default();
    let mut guard = Some(guard());
    let tunnel = copy(client, node, &mut flow, true, &stops, None, &mut guard);
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
    assert!(matches!(end, Ok(End::ClientClosed(Ok(4)))));
}
