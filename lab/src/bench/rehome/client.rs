//! The clients of `tether bench rehome`: real WebSocket clients (tokio-tungstenite) in this
//! process, each joined to one room, that count what they send and receive, record the
//! latency of live room messages and, once told a failover started ([`Client::watch`]), when
//! their first `rehomed` frame and their first room message after it arrived.
//!
//! Every room message is checked against the last seq the client saw in its room: a seq not
//! above it is a duplicate, a jump past it a gap (messages lost). The load is small (a few
//! hundred clients, a few thousand frames per second), so one process holds it without the
//! load-generator children of `fanout`.

use super::super::{protocol, unix_micros, AtomicHist};
use anyhow::{anyhow, bail, Context, Result};
use futures_util::stream::{SplitSink, StreamExt};
use futures_util::SinkExt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_proto::wire::{decode_node_frame, ClientMsg, NodeFrame};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Longest wait for a connect, its `connected` and its join.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;

/// Counters shared by a set of clients.
#[derive(Debug, Default)]
pub struct Counters {
    /// Text frames the clients received (every node → client frame the balancer delivered).
    pub received: AtomicU64,
    /// Frames the clients sent (client → node).
    pub sent: AtomicU64,
    /// Send stamp → receipt of live (not replayed) room messages, µs.
    pub latency: AtomicHist,
}

impl Counters {
    /// Frames proxied so far, both directions.
    pub fn frames(&self) -> u64 {
        self.received.load(Ordering::Relaxed) + self.sent.load(Ordering::Relaxed)
    }
}

/// What one client saw, as far as the switch measurement needs it.
#[derive(Debug, Default)]
pub struct ClientState {
    /// The failover's start, once [`Client::watch`] was called.
    pub watch_from: Option<Instant>,
    /// The first `rehomed` frame after `watch_from`: when, and the node it names.
    pub rehomed: Option<(Instant, String)>,
    /// The first room message after that `rehomed` frame: when, and whether it was a replay.
    pub first_message: Option<(Instant, bool)>,
    /// A `connected` frame after `watch_from` (a rehome never shows one).
    pub connected_again: bool,
    /// When the connection ended, and its close code.
    pub closed: Option<(Instant, Option<u16>)>,
    /// The room's epoch and highest seq seen.
    pub last: Option<(String, u64)>,
    /// Live room messages received (not replays).
    pub live: u64,
    /// Replayed room messages received.
    pub replayed: u64,
    /// Messages skipped over (seq jumps) and seen twice.
    pub gaps: u64,
    pub duplicates: u64,
}

/// One connected, joined client.
pub struct Client {
    pub id: String,
    pub room: String,
    /// The node its `connected` frame named.
    pub server: String,
    pub state: Arc<Mutex<ClientState>>,
    sink: tokio::sync::Mutex<Sink>,
    counters: Arc<Counters>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    /// Connects to `ws://addr/ws?client=ID`, waits for `connected`, joins `room` and waits for
    /// its own `user_joined`.
    pub async fn open(addr: SocketAddr, id: &str, room: &str, counters: Arc<Counters>) -> Result<Self> {
        tokio::time::timeout(OPEN_TIMEOUT, Self::open_inner(addr, id, room, counters))
            .await
            .map_err(|_| anyhow!("client {id} at {addr}: not connected and joined within {OPEN_TIMEOUT:?}"))?
    }

    async fn open_inner(addr: SocketAddr, id: &str, room: &str, counters: Arc<Counters>) -> Result<Self> {
        let url = format!("ws://{addr}/ws?client={id}");
        let (ws, _) = tokio_tungstenite::connect_async(&url).await.with_context(|| format!("connecting {url}"))?;
        let (mut sink, mut stream) = ws.split();
        let mut server = None;
        let mut sent_join = false;
        loop {
            let msg = stream.next().await.ok_or_else(|| anyhow!("{url}: closed while joining"))??;
            let Message::Text(text) = msg else {
                if let Message::Close(c) = msg {
                    bail!("{url}: closed while joining ({c:?})");
                }
                continue;
            };
            match decode_node_frame(&text) {
                Ok(NodeFrame::Connected { server: s, .. }) => server = Some(s),
                Ok(NodeFrame::UserJoined { room: r, id: who, .. }) if r == room && who == id => break,
                Ok(NodeFrame::Error { code, message, .. }) => bail!("{url}: error {code}: {message}"),
                _ => {}
            }
            if server.is_some() && !sent_join {
                sink.send(Message::text(ClientMsg::Join { room: room.to_owned() }.to_json())).await?;
                sent_join = true;
            }
        }
        let state = Arc::new(Mutex::new(ClientState::default()));
        let reader = tokio::spawn(read_loop(stream, Arc::clone(&state), Arc::clone(&counters)));
        Ok(Self {
            id: id.to_owned(),
            room: room.to_owned(),
            server: server.unwrap_or_default(),
            state,
            sink: tokio::sync::Mutex::new(sink),
            counters,
            reader,
        })
    }

    /// Sends one stamped text message `seq` to its room.
    pub async fn send_stamped(&self, seq: u64) -> Result<()> {
        let text = protocol::text(unix_micros(), seq, super::super::TEXT_BYTES);
        let frame = ClientMsg::text(self.room.clone(), text).to_json();
        self.sink.lock().await.send(Message::text(frame)).await?;
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Marks the start of a failover: what arrives from now on is timed from `at`.
    pub fn watch(&self, at: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.watch_from = Some(at);
        s.rehomed = None;
        s.first_message = None;
        s.connected_again = false;
    }

    /// Runs `f` on its state.
    pub fn with<T>(&self, f: impl FnOnce(&ClientState) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Sends a close frame (best effort) and stops reading.
    pub async fn close(self) {
        let mut sink = self.sink.lock().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    }
}

async fn read_loop(
    mut stream: futures_util::stream::SplitStream<WebSocketStream<MaybeTlsStream<TcpStream>>>,
    state: Arc<Mutex<ClientState>>,
    counters: Arc<Counters>,
) {
    let code = loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => {
                let now = Instant::now();
                counters.received.fetch_add(1, Ordering::Relaxed);
                on_frame(&text, now, &state, &counters);
            }
            Some(Ok(Message::Close(c))) => break c.map(|c| u16::from(c.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    state.lock().unwrap_or_else(|p| p.into_inner()).closed = Some((Instant::now(), code));
}

fn on_frame(text: &str, now: Instant, state: &Mutex<ClientState>, counters: &Counters) {
    let Ok(frame) = decode_node_frame(text) else { return };
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let watching = s.watch_from.is_some();
    match frame {
        NodeFrame::Rehomed { server, .. } if watching && s.rehomed.is_none() => s.rehomed = Some((now, server)),
        NodeFrame::Connected { .. } if watching => s.connected_again = true,
        NodeFrame::Message(m) => {
            if m.replay {
                s.replayed += 1;
            } else {
                s.live += 1;
                if let Some((sent, _)) = protocol::stamp_and_seq(text.as_bytes()) {
                    counters.latency.record(unix_micros().saturating_sub(sent));
                }
            }
            if s.rehomed.is_some() && s.first_message.is_none() {
                s.first_message = Some((now, m.replay));
            }
            match &s.last {
                Some((epoch, last)) if *epoch == m.epoch => {
                    let last = *last;
                    if m.seq <= last {
                        s.duplicates += 1;
                    } else {
                        s.gaps += m.seq - last - 1;
                        s.last = Some((m.epoch, m.seq));
                    }
                }
                _ => s.last = Some((m.epoch, m.seq)),
            }
        }
        _ => {}
    }
}

/// Sends `rate` stamped messages per second for `secs`, message `k` from `senders[k % len]`,
/// numbering them from `*next`; returns how many were sent. Stops at the first failed send.
pub async fn publish(senders: &[Arc<Client>], rate: f64, dur: Duration, next: &AtomicU64) -> Result<u64> {
    if senders.is_empty() || rate <= 0.0 {
        return Ok(0);
    }
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while start.elapsed() < dur {
        tick.tick().await;
        let due = ((start.elapsed().min(dur)).as_secs_f64() * rate) as u64;
        while sent < due {
            let k = next.fetch_add(1, Ordering::Relaxed);
            senders[(k % senders.len() as u64) as usize].send_stamped(k).await?;
            sent += 1;
        }
    }
    Ok(sent)
}
