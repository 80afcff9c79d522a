//! Close codes reach the client whatever it is doing when its connection ends — directly from
//! a node and through the balancer — and a stalled reader's connection is reset, not left
//! behind a FIN that never arrives.
//!
//! The trap these guard against: closing a socket while unread input is still arriving makes
//! the kernel answer with a reset, which can destroy the close frame queued just before it, so
//! a client in the middle of sending sees 1006 instead of 1009 or 1012. The clients here speak
//! raw WebSocket frames over TCP, to control exactly what is on the wire (one huge frame, a
//! message in 16 KiB fragments, a continuous stream of frames) and to tell a close frame from
//! end of stream and from a reset.
//!
//! Each path has its own test function, so that a failure says which side is at fault: the
//! `_direct` tests exercise only the node's own close path, the `_through_the_balancer` ones
//! the balancer's on top of it.

use anyhow::{bail, Context, Result};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_kit::{LogTarget, NodeProcess, RedisServer, SpawnOptions};
use tether_proto::wire::ClientMsg;
use tether_tests::{eventually, http_get, until_up, HttpConn, WsClient, DEADLINE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// How often each case is repeated: the reset is a race, one run proves little.
const REPEAT: usize = 3;

/// Sizes of the oversized messages (the node's `max_message_bytes` is 64 KiB by default).
const OVERSIZED: [usize; 3] = [MIB, 4 * MIB, 16 * MIB];

/// Fragment size of the fragmented cases.
const FRAGMENT: usize = 16 * KIB;

/// Streaming clients per round of the 1012 tests.
const STREAMERS: usize = 3;

/// The mask every client frame here carries (RFC 6455 requires one; its value is ours).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

// ---------------------------------------------------------------------------------------
// A raw WebSocket client.

/// A WebSocket connection after the upgrade, read and written as raw frames.
struct Raw {
    rx: BufReader<OwnedReadHalf>,
    tx: OwnedWriteHalf,
}

/// Connects to `addr`, upgrades `GET /ws?client=ID` and checks for the 101. `rcvbuf` shrinks
/// the client's receive buffer (for a reader that stalls).
async fn connect_raw(addr: SocketAddr, client: &str, rcvbuf: Option<u32>) -> Result<Raw> {
    let socket = TcpSocket::new_v4()?;
    if let Some(bytes) = rcvbuf {
        socket.set_recv_buffer_size(bytes)?;
    }
    let stream = tokio::time::timeout(DEADLINE, socket.connect(addr)).await.context("connect timed out")??;
    stream.set_nodelay(true)?;
    let (rx, mut tx) = stream.into_split();
    let request = format!(
        "GET /ws?client={client} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tx.write_all(request.as_bytes()).await?;
    let mut rx = BufReader::new(rx);
    let status = tokio::time::timeout(DEADLINE, async {
        let mut status = String::new();
        let mut line = String::new();
        // The head is a few hundred bytes: 64 lines is plenty.
        for _ in 0..64 {
            line.clear();
            if rx.read_line(&mut line).await? == 0 {
                bail!("connection closed during the upgrade (status {status:?})");
            }
            if status.is_empty() {
                status = line.trim_end().to_owned();
            } else if line == "\r\n" {
                return Ok(status);
            }
        }
        bail!("upgrade answer has no end")
    })
    .await
    .context("upgrade timed out")??;
    if !status.starts_with("HTTP/1.1 101") {
        bail!("upgrade refused: {status}");
    }
    Ok(Raw { rx, tx })
}

/// A frame from the server, its payload kept whole (the server's frames are small).
struct Frame {
    opcode: u8,
    payload: Vec<u8>,
}

/// The most of a server frame's payload a test reads into memory.
const MAX_SERVER_FRAME: u64 = 4 * MIB as u64;

/// Reads the next server frame; `None` on end of stream between frames.
async fn read_frame(rx: &mut BufReader<OwnedReadHalf>) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 2];
    match rx.read(&mut head[..1]).await? {
        0 => return Ok(None),
        _ => rx.read_exact(&mut head[1..]).await?,
    };
    let opcode = head[0] & 0x0f;
    let len = match head[1] & 0x7f {
        126 => u64::from(rx.read_u16().await?),
        127 => rx.read_u64().await?,
        n => u64::from(n),
    };
    if head[1] & 0x80 != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "masked frame from the server"));
    }
    if len > MAX_SERVER_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("server frame of {len} bytes")));
    }
    let mut payload = vec![0; len as usize];
    rx.read_exact(&mut payload).await?;
    Ok(Some(Frame { opcode, payload }))
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// A close frame with this code and reason.
    Close(u16, String),
    /// End of stream without a close frame.
    Eof,
    /// `ECONNRESET` before any close frame.
    Reset,
    /// Another read error.
    Failed(String),
    /// Nothing within the deadline.
    Silent,
}

/// Reads (skipping everything else) until the connection ends, for at most `within`.
async fn ending(rx: &mut BufReader<OwnedReadHalf>, within: Duration) -> Ending {
    let read = async {
        loop {
            match read_frame(rx).await {
                Ok(Some(Frame { opcode: 8, payload })) => {
                    let code = payload.get(..2).map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
                    return Ending::Close(code, reason);
                }
                Ok(Some(_)) => continue,
                Ok(None) => return Ending::Eof,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ending::Eof,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ending::Reset,
                Err(e) => return Ending::Failed(e.to_string()),
            }
        }
    };
    tokio::time::timeout(within, read).await.unwrap_or(Ending::Silent)
}

/// The next text frame's payload, skipping other frames; fails on anything else.
async fn next_text(rx: &mut BufReader<OwnedReadHalf>) -> Result<String> {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match read_frame(rx).await? {
                Some(Frame { opcode: 1, payload }) => return Ok(String::from_utf8(payload)?),
                Some(Frame { opcode: 8, payload }) => bail!("closed early: {payload:?}"),
                Some(_) => continue,
                None => bail!("end of stream while waiting for a text frame"),
            }
        }
    })
    .await
    .context("no text frame in time")?
}

/// The header of a masked client frame.
fn header(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
    let mut out = vec![u8::from(fin) << 7 | opcode];
    match len {
        0..=125 => out.push(0x80 | len as u8),
        126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out
}

/// `payload` masked, as its frame's first bytes.
fn masked(payload: &[u8]) -> Vec<u8> {
    payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]).collect()
}

/// A whole masked client frame.
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    [header(fin, opcode, payload.len()), masked(payload)].concat()
}

/// Sends a text message of `total` bytes of `a`, in one frame or in `fragment`-byte fragments,
/// for as long as the peer takes it; returns the bytes written and the error that stopped it.
async fn send_oversized(tx: &mut OwnedWriteHalf, total: usize, fragment: Option<usize>) -> (usize, Option<io::Error>) {
    let mut written = 0;
    let result = async {
        match fragment {
            None => {
                // Every chunk is a multiple of 4 bytes long, so each one masks the same way.
                const CHUNK: usize = 64 * KIB;
                let chunk = masked(&[b'a'; CHUNK]);
                tx.write_all(&header(true, 1, total)).await?;
                for _ in 0..total / CHUNK {
                    tx.write_all(&chunk).await?;
                    written += CHUNK;
                }
            }
            Some(size) => {
                let count = total / size;
                let payload = vec![b'a'; size];
                for i in 0..count {
                    let opcode = if i == 0 { 1 } else { 0 };
                    tx.write_all(&client_frame(i + 1 == count, opcode, &payload)).await?;
                    written += size;
                }
            }
        }
        io::Result::Ok(())
    }
    .await;
    (written, result.err())
}

/// Sends unsolicited pongs (which a server ignores) as fast as the peer takes them, until
/// `stop` fires, a write fails, or a minute passes; counts the bytes in `sent`.
async fn stream_frames(mut tx: OwnedWriteHalf, sent: Arc<AtomicU64>, stop: CancellationToken) -> io::Result<()> {
    let batch: Vec<u8> = (0..100).flat_map(|_| client_frame(true, 0xa, &[b'p'; 125])).collect();
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            written = tx.write_all(&batch) => written?,
        }
        sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 1009 for an oversized message.

/// One oversized message from a fresh client; `Ok` when it got close 1009.
async fn oversized_case(addr: SocketAddr, id: &str, total: usize, fragment: Option<usize>) -> Result<()> {
    let Raw { mut rx, mut tx } = connect_raw(addr, id, None).await?;
    let hello = next_text(&mut rx).await?;
    if !hello.contains("\"connected\"") {
        bail!("first frame is not `connected`: {hello}");
    }
    let writer = tokio::spawn(async move {
        let sent = send_oversized(&mut tx, total, fragment).await;
        (tx, sent)
    });
    let end = ending(&mut rx, DEADLINE).await;
    let sent = match tokio::time::timeout(Duration::from_secs(2), writer).await {
        Ok(Ok((_tx, (written, err)))) => format!("{written} bytes written, then {err:?}"),
        Ok(Err(e)) => format!("writer failed: {e}"),
        Err(_) => "writer still blocked".to_owned(),
    };
    match end {
        Ending::Close(1009, _) => Ok(()),
        other => bail!("{other:?} ({sent})"),
    }
}

/// Every oversized case against `addr`, `REPEAT` times each; the failures, one line each.
async fn oversized_cases(addr: SocketAddr, path: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for total in OVERSIZED {
        for fragment in [None, Some(FRAGMENT)] {
            for round in 0..REPEAT {
                let id = format!("big-{path}-{}m-{}-{round}", total / MIB, fragment.map_or(0, |f| f / KIB));
                let shape = match fragment {
                    None => "one frame".to_owned(),
                    Some(f) => format!("{} KiB fragments", f / KIB),
                };
                if let Err(e) = oversized_case(addr, &id, total, fragment).await {
                    failures.push(format!("{path}: {} MiB in {shape}, round {round}: {e:#}", total / MIB));
                }
            }
        }
    }
    failures
}

/// The node's own close path: no balancer in between.
#[tokio::test]
async fn an_oversized_message_gets_1009_direct() -> Result<()> {
    let c = tether_tests::test_cluster(1).await?;
    let failures = oversized_cases(c.nodes()[0].addr(), "direct").await;
    assert!(failures.is_empty(), "{} of {} cases did not get 1009:\n{}", failures.len(), cases(), failures.join("\n"));
    Ok(())
}

/// The node's close frame passes through the balancer while the client is still sending.
#[tokio::test]
async fn an_oversized_message_gets_1009_through_the_balancer() -> Result<()> {
    let c = tether_tests::test_cluster(1).await?;
    let failures = oversized_cases(c.balancer().addr(), "balancer").await;
    assert!(failures.is_empty(), "{} of {} cases did not get 1009:\n{}", failures.len(), cases(), failures.join("\n"));
    Ok(())
}

fn cases() -> usize {
    OVERSIZED.len() * 2 * REPEAT
}

// ---------------------------------------------------------------------------------------
// 1012 for a client that is streaming when its node drains or stops.

/// `STREAMERS` clients at `addr`, each sending frames continuously once connected.
struct Streamers {
    readers: Vec<BufReader<OwnedReadHalf>>,
    sent: Vec<Arc<AtomicU64>>,
    stop: CancellationToken,
}

impl Streamers {
    async fn start(addr: SocketAddr, prefix: &str) -> Result<Self> {
        let stop = CancellationToken::new();
        let (mut readers, mut sent) = (Vec::new(), Vec::new());
        for i in 0..STREAMERS {
            let Raw { mut rx, tx } = connect_raw(addr, &format!("{prefix}-{i}"), None).await?;
            next_text(&mut rx).await.context("`connected`")?;
            let count = Arc::new(AtomicU64::new(0));
            tokio::spawn(stream_frames(tx, Arc::clone(&count), stop.clone()));
            readers.push(rx);
            sent.push(count);
        }
        // Streaming for real: each has sent a good amount, and is still at it.
        for (i, count) in sent.iter().enumerate() {
            eventually(&format!("streamer {i} under way"), || async {
                (count.load(Ordering::Relaxed) >= 512 * KIB as u64).then_some(())
            })
            .await?;
        }
        Ok(Self { readers, sent, stop })
    }

    /// How each connection ended (the streams stop at once after it).
    async fn endings(mut self) -> Vec<(Ending, u64)> {
        let ends = futures_util::future::join_all(self.readers.iter_mut().map(|rx| ending(rx, DEADLINE))).await;
        self.stop.cancel();
        ends.into_iter().zip(self.sent.iter().map(|s| s.load(Ordering::Relaxed))).collect()
    }
}

/// `Ok` when every streamer got 1012 with `reason`.
fn expect_1012(round: usize, ends: &[(Ending, u64)], reason: &str) -> Result<()> {
    let bad: Vec<String> = ends
        .iter()
        .enumerate()
        .filter(|(_, (end, _))| *end != Ending::Close(1012, reason.to_owned()))
        .map(|(i, (end, sent))| format!("round {round}, streamer {i} ({sent} bytes sent): {end:?}"))
        .collect();
    if !bad.is_empty() {
        bail!("{} of {} streamers did not get 1012 {reason:?}:\n{}", bad.len(), ends.len(), bad.join("\n"));
    }
    Ok(())
}

#[tokio::test]
async fn an_admin_drain_gets_streaming_clients_1012_through_the_balancer() -> Result<()> {
    let c = tether_tests::test_cluster(1).await?;
    let mut admin = HttpConn::connect(c.balancer().admin_addr()).await?;
    let mut failures = Vec::new();
    for round in 0..REPEAT {
        let streamers = Streamers::start(c.balancer().addr(), &format!("drain-{round}")).await?;
        let (status, body) = admin.request(http::Method::POST, "/nodes/node-1/drain").await?;
        assert_eq!(status, 200, "{body}");
        let ends = streamers.endings().await;
        if let Err(e) = expect_1012(round, &ends, "node draining") {
            failures.push(format!("{e:#}"));
        }
        let (status, body) = admin.request(http::Method::POST, "/nodes/node-1/undrain").await?;
        assert_eq!(status, 200, "{body}");
        until_up(&c, "node-1").await?;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// SIGTERM of the node, `REPEAT` times, with the streamers connected to the node or the balancer.
async fn sigterm_rounds(through_balancer: bool) -> Result<()> {
    let mut c = tether_tests::test_cluster(1).await?;
    let mut failures = Vec::new();
    for round in 0..REPEAT {
        let addr = if through_balancer { c.balancer().addr() } else { c.nodes()[0].addr() };
        let streamers = Streamers::start(addr, &format!("term-{round}")).await?;
        let node = c.node_mut("node-1").context("node-1")?;
        node.terminate()?;
        let ends = streamers.endings().await;
        if let Err(e) = expect_1012(round, &ends, "node shutting down") {
            failures.push(format!("{e:#}"));
        }
        let exit = node.wait_exit(DEADLINE).await?;
        assert!(exit.is_some_and(|s| s.success()), "the node exits 0 after SIGTERM: {exit:?}");
        node.restart().await?;
        if through_balancer {
            until_up(&c, "node-1").await?;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// The node's own close path on shutdown: no balancer in between.
#[tokio::test]
async fn a_node_sigterm_gets_streaming_clients_1012_direct() -> Result<()> {
    sigterm_rounds(false).await
}

#[tokio::test]
async fn a_node_sigterm_gets_streaming_clients_1012_through_the_balancer() -> Result<()> {
    sigterm_rounds(true).await
}

// ---------------------------------------------------------------------------------------
// A stalled reader is reset.

/// The node config that makes a client that stopped reading a slow consumer, and how long
/// after it stops that may take at most: its queue over a 64 KiB low-water mark for 1.5 s (the
/// time rule, not the hard cap, is what cuts it: the flood is slower than 8 MiB in 1.5 s once
/// the socket buffers are full).
fn slow_consumer_config() -> (&'static str, Duration) {
    ("slow_consumer_ms = 1500\nsend_queue_low_water_bytes = 65536\n", DEADLINE)
}

/// How long after the kick the stalled reader's TCP connection must be gone.
const RESET_WITHIN: Duration = Duration::from_secs(2);

/// A TCP socket's state from `/proc/net/tcp`, by its two ports on 127.0.0.1: (state, send
/// queue bytes), or `None` when no such socket exists.
fn tcp_state(local_port: u16, remote_port: u16) -> Result<Option<(&'static str, u64)>> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let (local, remote) = (format!("0100007F:{local_port:04X}"), format!("0100007F:{remote_port:04X}"));
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 5 || fields[1] != local || fields[2] != remote {
            continue;
        }
        let state = match fields[3] {
            "01" => "ESTABLISHED",
            "02" => "SYN-SENT",
            "03" => "SYN-RECV",
            "04" => "FIN-WAIT-1",
            "05" => "FIN-WAIT-2",
            "06" => "TIME-WAIT",
            "07" => "CLOSE",
            "08" => "CLOSE-WAIT",
            "09" => "LAST-ACK",
            "0A" => "LISTEN",
            "0B" => "CLOSING",
            _ => "other",
        };
        let tx_queue = fields[4].split(':').next().and_then(|q| u64::from_str_radix(q, 16).ok()).unwrap_or(0);
        return Ok(Some((state, tx_queue)));
    }
    Ok(None)
}

/// The node's side of this: fails until the node resets a slow consumer (`SO_LINGER` 0)
/// instead of queueing a close frame and a FIN behind megabytes the client will never read.
#[tokio::test]
async fn a_stalled_reader_kicked_as_a_slow_consumer_is_reset_direct() -> Result<()> {
    let redis = RedisServer::start().await?;
    let dir = std::env::temp_dir().join(format!("tether-close-codes-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("node.toml");
    let (toml, kick_within) = slow_consumer_config();
    std::fs::write(&config, toml)?;
    let args = vec!["--config".to_string(), config.display().to_string()];
    let opts = SpawnOptions { stderr: LogTarget::Null, ..Default::default() };
    let node = NodeProcess::start_with("node-1", &redis.url(), &args, &opts).await?;

    // The stalled reader: a small receive buffer; joins, then never reads again.
    let Raw { mut rx, mut tx } = connect_raw(node.addr(), "stalled", Some(4096)).await?;
    next_text(&mut rx).await.context("`connected`")?;
    tx.write_all(&client_frame(true, 1, ClientMsg::Join { room: "flood".into() }.to_json().as_bytes())).await?;
    for _ in 0..16 {
        if next_text(&mut rx).await?.contains("user_joined") {
            break;
        }
    }
    let client_port = rx.get_ref().local_addr()?.port();
    let node_port = node.addr().port();

    // Someone floods the room until the node gives up on the stalled reader.
    let (mut publisher, _) = WsClient::connect_ready(&format!("{}?client=publisher", node.ws_url())).await?;
    publisher.join("flood").await?;
    let text = "x".repeat(10_000);
    let started = Instant::now();
    let kicked = async {
        // 10 KB each: 2,000 of them are 20 MB, far past any socket buffer and send queue.
        for i in 0..2000 {
            publisher.say("flood", text.as_str()).await?;
            publisher.recv_until("own echo", |v| v["type"] == "message").await?;
            publisher.seen.clear();
            if i % 10 == 0 {
                let (_, metrics) = http_get(node.addr(), "/metrics").await?;
                if metrics.lines().any(|l| l == "tether_node_slow_consumers_total 1") {
                    return anyhow::Ok(Instant::now());
                }
            }
            if started.elapsed() > kick_within {
                break;
            }
        }
        bail!("the stalled reader was not kicked within {kick_within:?}")
    };
    let kicked_at = kicked.await?;

    // Within RESET_WITHIN of the kick: the client's socket has seen a reset, and the node
    // holds no socket to it (none in FIN-WAIT-1 with the unsent megabytes, none at all).
    let mut client_error = None;
    let mut node_side = tcp_state(node_port, client_port)?;
    while kicked_at.elapsed() < RESET_WITHIN {
        if client_error.is_none() {
            client_error = rx.get_ref().as_ref().take_error()?;
        }
        node_side = tcp_state(node_port, client_port)?;
        if client_error.is_some() && node_side.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client_side = tcp_state(client_port, node_port)?;
    let reset = client_error.as_ref().is_some_and(|e| e.kind() == io::ErrorKind::ConnectionReset);
    assert!(
        reset && node_side.is_none(),
        "{RESET_WITHIN:?} after the kick: the client's socket error is {client_error:?} (want ECONNRESET), \
         its socket {client_side:?}; the node's socket to it {node_side:?} (want none)"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
