//! Slow consumers are judged by time, not by one burst: a reader that keeps reading — even one
//! that pauses for a second in a 10 MB/s stream — is never cut; only one whose queue stays over
//! its low-water mark for `slow_consumer_ms` (or passes the hard cap) is.

use anyhow::{bail, Context, Result};
use std::time::Duration;
use tether_kit::{LogTarget, NodeProcess, RedisServer, SpawnOptions};
use tether_lab::bench::wsraw::{self, OP_CLOSE, OP_TEXT};
use tether_proto::wire::ClientMsg;
use tether_tests::{http_get, WsClient, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::MaybeTlsStream;

/// A node process with the default send-queue policy.
async fn node(redis: &RedisServer) -> Result<NodeProcess> {
    let opts = SpawnOptions { stderr: LogTarget::Null, ..Default::default() };
    NodeProcess::start_with("node-1", &redis.url(), &[], &opts).await
}

/// A client that has joined `room` over `stream`, then handed its TCP stream over for raw
/// frames: a debug-build test must read and write 10 MB/s without parsing JSON or running
/// tungstenite over every byte. Nothing is sent to it between its own `user_joined` and the
/// hand-over (the others join after it), so no byte is left behind in tungstenite's buffer.
async fn joined(url: &str, room: &str, stream: TcpStream) -> Result<TcpStream> {
    let (ws, resp) =
        tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))).await??;
    let mut c = WsClient::from_stream(ws, resp.headers().clone());
    c.recv_type("connected").await?;
    c.join(room).await?;
    match c.into_stream().into_inner() {
        MaybeTlsStream::Plain(tcp) => Ok(tcp),
        _ => bail!("not a plain TCP stream"),
    }
}

/// A publisher in `room`: its write half, and a task discarding its own echoes (a publisher that
/// did not read them would be the slow consumer).
async fn publisher(url: &str, room: &str, addr: std::net::SocketAddr) -> Result<(OwnedWriteHalf, JoinHandle<()>)> {
    let (mut rx, tx) = joined(url, room, TcpStream::connect(addr).await?).await?.into_split();
    let echoes = tokio::spawn(async move {
        let mut sink = vec![0u8; 64 * 1024];
        while matches!(rx.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    Ok((tx, echoes))
}

/// A reader `reader_id` in `room` on a socket with a `recv_buffer`-byte receive buffer, and a
/// publisher in the same room (its write half and echo-discarding task).
async fn reader_and_publisher(
    node: &NodeProcess,
    room: &str,
    reader_id: &str,
    recv_buffer: u32,
) -> Result<(TcpStream, OwnedWriteHalf, JoinHandle<()>)> {
    let url = |id: &str| format!("{}?client={id}", node.ws_url());
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(recv_buffer)?;
    let reader = joined(&url(reader_id), room, socket.connect(node.addr()).await?).await?;
    let (tx, echoes) = publisher(&url("publisher"), room, node.addr()).await?;
    Ok((reader, tx, echoes))
}

/// `count` room messages of `text`, as masked client frames.
fn messages(room: &str, text: &str, count: usize) -> Vec<u8> {
    let payload = ClientMsg::text(room, text).to_json();
    let mut out = Vec::new();
    for i in 0..count {
        wsraw::encode(&mut out, OP_TEXT, payload.as_bytes(), Some(wsraw::mask_for(i as u64)));
    }
    out
}

/// The seq of a room `message` frame, found without parsing the JSON (the last `,"seq":` is
/// the field: inside JSON strings quotes are escaped).
fn seq_of(text: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b",\"seq\":";
    if !text.starts_with(b"{\"type\":\"message\"") {
        return None;
    }
    let at = text.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&text[at..at + digits]).ok()?.parse().ok()
}

/// Reads `count` room messages from a raw stream, checks they come in seq order with none
/// missing, and fails on anything else (a close above all). `pause`: stop reading for that
/// long after that many messages.
async fn read_all(tcp: &mut TcpStream, count: usize, mut pause: Option<(usize, Duration)>) -> Result<()> {
    let mut decoder = wsraw::Decoder::with_bytes(&[]);
    let mut last: Option<u64> = None;
    let mut got = 0;
    while got < count {
        let Some(frame) = decoder.next_frame()? else {
            if let Some((after, how_long)) = pause {
                if got >= after {
                    // The pause under test (once), not a synchronisation.
                    tokio::time::sleep(how_long).await;
                    pause = None;
                }
            }
            let read = tokio::time::timeout(Duration::from_secs(30), decoder.read_from(tcp, 64 * 1024))
                .await
                .with_context(|| format!("nothing for 30 s after {got} messages"))?
                .with_context(|| format!("reading after {got} messages"))?;
            if read == 0 {
                bail!("connection ended after {got} messages");
            }
            continue;
        };
        match frame.opcode {
            OP_TEXT => {}
            OP_CLOSE => bail!("closed after {got} messages: {:?}", decoder.payload(&frame)),
            _ => continue,
        }
        let Some(seq) = seq_of(decoder.payload(&frame)) else { continue };
        if let Some(prev) = last {
            assert_eq!(seq, prev + 1, "message {got}: seq {seq} after {prev}");
        }
        last = Some(seq);
        got += 1;
    }
    Ok(())
}

async fn slow_consumers(node: &NodeProcess) -> Result<String> {
    let (_, metrics) = http_get(node.addr(), "/metrics").await?;
    Ok(metrics.lines().find(|l| l.starts_with("tether_node_slow_consumers_total")).unwrap_or_default().to_string())
}

/// 20,000 messages of 1 KB produced as fast as the publisher can send them (the burst a newcomer
/// saw cut a healthy Python reader with 1008): the reader, which never stops reading, gets all
/// of them, in order, and nobody is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_reader_is_not_cut_by_a_burst() -> Result<()> {
    let redis = RedisServer::start().await?;
    let node = node(&redis).await?;
    // A reader that keeps reading, but whose receive buffer is not grown to tens of megabytes
    // (as a kernel does for an application that reads slowly): the burst waits in the node.
    let (mut reader, mut tx, _echoes) = reader_and_publisher(&node, "burst", "reader", 64 * 1024).await?;
    const COUNT: usize = 20_000;
    let reading = tokio::spawn(async move { read_all(&mut reader, COUNT, None).await });
    tokio::time::timeout(Duration::from_secs(60), tx.write_all(&messages("burst", &"b".repeat(1000), COUNT))).await??;
    tokio::time::timeout(Duration::from_secs(120), reading).await.context("reader")???;
    assert_eq!(slow_consumers(&node).await?, "tether_node_slow_consumers_total 0");
    Ok(())
}

/// A reader that stops for a second in the middle of a 10 MB/s stream (200 messages of 50 KB
/// per second, for three seconds) and then catches up is not a slow consumer: it gets every
/// message, in order, and is not closed. Its receive buffer is small, so what piles up during
/// the pause beyond the node's socket buffer (at most 4 MB here) — some 6 MB — waits in the
/// node's send queue: over the low-water mark for about a second, under the hard cap. (The
/// old policy, 1,024 frames or 1 MiB at any moment, cut it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_pauses_for_a_second_in_a_10_mb_s_stream_is_not_cut() -> Result<()> {
    let redis = RedisServer::start().await?;
    let node = node(&redis).await?;
    let (mut reader, mut tx, _echoes) = reader_and_publisher(&node, "stream", "pauser", 16 * 1024).await?;

    const PER_SEC: usize = 200;
    const SECS: usize = 3;
    const TICKS_PER_SEC: usize = 100;
    let reading =
        tokio::spawn(
            async move { read_all(&mut reader, PER_SEC * SECS, Some((PER_SEC, Duration::from_secs(1)))).await },
        );
    let tick_burst = messages("stream", &"s".repeat(50_000), PER_SEC / TICKS_PER_SEC);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / TICKS_PER_SEC as u32);
    for _ in 0..(SECS * TICKS_PER_SEC) {
        tick.tick().await;
        tokio::time::timeout(DEADLINE, tx.write_all(&tick_burst)).await??;
    }
    tokio::time::timeout(Duration::from_secs(120), reading).await.context("reader")???;
    assert_eq!(slow_consumers(&node).await?, "tether_node_slow_consumers_total 0");
    Ok(())
}
