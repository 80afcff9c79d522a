//! The connection task: one per [`Client`](crate::Client), owning the socket for its whole
//! life — connect, re-sync, serve, lose, back off, connect again — until the app stops it.
//!
//! A connection goes through three phases:
//! 1. **handshake**: TCP + WebSocket upgrade, then the node's `connected` frame;
//! 2. **re-sync**: `set_name`, `leave` for restored rooms the app no longer wants, `join` for
//!    rooms the node does not have (waiting for each own `user_joined`), then one `resume`
//!    with the position of every room that has one. Live frames of a resuming room are held
//!    back until its `resumed`, so the app sees replay, then live, in seq order;
//! 3. **ready**: commands flow; every message passes its room's [`Tracker`].
//!
//! The task never waits on the app while it could be handling commands: events go through
//! an [`Outbox`] whose overflow stops socket reads, not the command loop.

use crate::backoff::Backoff;
use crate::client::{Shared, Status};
use crate::config::{connect_url, ClientConfig};
use crate::error::Error;
use crate::event::{parse, Event, Frame, Message, Parsed, Session, UPGRADE_REFUSED};
use crate::order::{Tracker, Verdict};
use crate::stats::bump;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tether_proto::id::validate_client_id;
use tether_proto::wire::CLOSE_RESTART;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, info_span, warn, Instrument};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Reply = oneshot::Sender<Result<(), Error>>;

/// Live frames held back per resuming room before the connection is given up as stuck
/// (they are not lost: the position did not move, so the next resume asks again).
const HOLD_LIMIT: usize = 100_000;
/// How long a closing client waits for the node's answer to its close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// HTTP answers to the upgrade that no retry can change: the request itself (the client id)
/// is bad or not allowed. Everything else (503 without a node, 502, 429, …) is retried.
fn refused_for_good(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 401 | 403)
}

/// A request from a [`Client`](crate::Client) handle.
#[derive(Debug)]
pub(crate) enum Command {
    Join(String, Reply),
    Leave(String, Reply),
    Send { room: String, text: String, reply: Reply },
    SetName(String, Reply),
    Presence(String, Reply),
    Online(Reply),
    Close(oneshot::Sender<()>),
}

/// Events on their way to the app. `try_send` first; when the channel is full they wait
/// here, and the connection loop stops reading the socket until this is empty again.
struct Outbox {
    tx: mpsc::Sender<Event>,
    pending: VecDeque<Event>,
    /// The app dropped its receiver: events are counted as discarded from then on.
    gone: bool,
    shared: Arc<Shared>,
}

impl Outbox {
    /// Queues `ev`; false when it was discarded because nobody listens any more.
    fn push(&mut self, ev: Event) -> bool {
        if self.gone {
            bump(&self.shared.stats.events_discarded);
            return false;
        }
        if self.pending.is_empty() {
            match self.tx.try_send(ev) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(ev)) => self.pending.push_back(ev),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.receiver_gone();
                    bump(&self.shared.stats.events_discarded);
                    return false;
                }
            }
        } else {
            self.pending.push_back(ev);
        }
        true
    }

    fn blocked(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Hands the oldest pending event over once the channel has room. Cancel-safe: the
    /// event leaves `pending` only together with a granted slot.
    async fn hand_over(&mut self) {
        let gone = match self.tx.reserve().await {
            Ok(permit) => {
                if let Some(ev) = self.pending.pop_front() {
                    permit.send(ev);
                }
                false
            }
            Err(_) => true,
        };
        if gone {
            self.receiver_gone();
        }
    }

    fn receiver_gone(&mut self) {
        if !self.gone {
            debug!("event receiver dropped; discarding events from now on");
        }
        self.gone = true;
        let n = self.pending.len() as u64;
        self.pending.clear();
        self.shared.stats.events_discarded.fetch_add(n, Relaxed);
    }

    /// At the very end: waits until every event is taken (or the receiver is gone).
    async fn flush(&mut self) {
        while let Some(ev) = self.pending.pop_front() {
            if self.gone || self.tx.send(ev).await.is_err() {
                self.receiver_gone();
                return;
            }
        }
    }
}

/// One room the app is in (or joining).
#[derive(Default)]
struct Room {
    /// The ordering state; survives reconnects, reset by `leave`.
    tracker: Tracker,
    /// App `join` calls waiting for this room's own `user_joined`.
    waiters: Vec<Reply>,
    /// The node has this room for us on the current connection (own `user_joined` seen,
    /// or restored).
    joined: bool,
    /// `Some` from `connected` until this room's `resumed`: live frames held back so that
    /// they follow the replay.
    hold: Option<Vec<Message>>,
}

/// How a connection ended.
enum Ended {
    /// The app stopped the client.
    Stop,
    /// The connection was lost (or given up).
    Lost {
        code: Option<u16>,
        reason: String,
        /// Counts as a failed attempt (never got in sync, or dropped soon after).
        failure: bool,
        /// The node's `connected` frame had arrived: a disconnect rather than a failed
        /// attempt.
        connected: bool,
    },
}

/// Per-connection state, dropped with the connection.
struct Conn {
    /// 1-based number of this attempt within the current (re)connection.
    attempt: u32,
    /// The node's name, once `connected` arrived.
    server: Option<String>,
    /// Rooms re-joined during re-sync whose own `user_joined` has not arrived.
    rejoining: BTreeSet<String>,
    /// The `resume` was sent (or nothing needed resuming).
    resume_done: bool,
    /// Send `resume` even with no positions (restored session).
    resume_always: bool,
    /// When the re-sync completed.
    ready_at: Option<Instant>,
    /// Last sign of progress during handshake/re-sync (frame read or event taken).
    progress: Instant,
    /// Last frame of any kind read from the node (for the ping timeout).
    last_rx: Instant,
}

impl Conn {
    fn ready(&self) -> bool {
        self.ready_at.is_some()
    }
}

/// The task behind a [`Client`](crate::Client).
pub(crate) struct Driver {
    cfg: ClientConfig,
    shared: Arc<Shared>,
    cmds: mpsc::Receiver<Command>,
    out: Outbox,
    backoff: Backoff,
    /// Our client id; `None` until configured or adopted from `connected`.
    id: Option<String>,
    name: Option<String>,
    /// The rooms the app wants, by name.
    rooms: BTreeMap<String, Room>,
    /// Joins the app asked for on a ready connection, oldest first. The protocol does not
    /// tie an `error` to its request; a join-shaped error fails the oldest of these.
    app_joins: VecDeque<String>,
    /// Consecutive failed attempts; reset by a connection that stays in sync.
    failures: u32,
    /// The previous 1012 reconnect has not reached `Ready` yet: a second 1012 in a row
    /// backs off like any failure, so a node stuck draining cannot make us spin.
    restart_pending: bool,
    /// When the last connection was lost; cleared once back in sync.
    lost_at: Option<Instant>,
    ever_connected: bool,
    /// `close()` callers to answer once the socket is closed.
    closers: Vec<oneshot::Sender<()>>,
}

impl Driver {
    pub(crate) fn new(
        cfg: ClientConfig,
        shared: Arc<Shared>,
        cmds: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
    ) -> Self {
        Self {
            backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max, cfg.jitter),
            id: cfg.client_id.clone(),
            name: cfg.name.clone(),
            out: Outbox { tx: events, pending: VecDeque::new(), gone: false, shared: Arc::clone(&shared) },
            cfg,
            shared,
            cmds,
            rooms: BTreeMap::new(),
            app_joins: VecDeque::new(),
            failures: 0,
            restart_pending: false,
            lost_at: None,
            ever_connected: false,
            closers: Vec::new(),
        }
    }

    pub(crate) async fn run(self) {
        let span = info_span!("tether_client", url = %self.cfg.url, id = tracing::field::Empty);
        if let Some(id) = &self.id {
            span.record("id", id.as_str());
        }
        self.run_inner().instrument(span).await
    }

    async fn run_inner(mut self) {
        let mut delay = Duration::ZERO;
        loop {
            if !delay.is_zero() && self.offline(sleep(delay)).await.is_none() {
                break;
            }
            let attempt = self.failures + 1;
            self.set_status(Status::Connecting { attempt });
            let url = connect_url(&self.cfg.url, self.id.as_deref());
            debug!(%url, attempt, "connecting");
            let connect = timeout(self.cfg.connect_timeout, tokio_tungstenite::connect_async(url));
            let Some(result) = self.offline(connect).await else {
                break;
            };
            let outcome = match result {
                Ok(Ok((ws, _response))) => Ok(self.connection(ws, attempt).await),
                Ok(Err(WsError::Http(response))) if refused_for_good(response.status()) => {
                    self.refused(attempt, &response);
                    break;
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no WebSocket handshake within {:?}", self.cfg.connect_timeout)),
            };
            let (code, reason, failure, connected) = match outcome {
                Ok(Ended::Stop) => break,
                Ok(Ended::Lost { code, reason, failure, connected }) => (code, reason, failure, connected),
                Err(error) => (None, error, true, false),
            };
            let restart = code == Some(CLOSE_RESTART) && !self.restart_pending;
            if restart {
                // The node is draining: come back at once, no backoff.
                self.restart_pending = true;
                self.failures = 0;
            } else if failure {
                self.failures += 1;
                bump(&self.shared.stats.connect_failures);
            } else {
                self.failures = 0;
            }
            let give_up = self.gives_up();
            delay = if restart { Duration::ZERO } else { self.backoff.delay(self.failures) };
            if !give_up {
                self.set_status(Status::Connecting { attempt: self.failures + 1 });
            }
            if connected {
                info!(?code, %reason, retry_in = ?delay, give_up, "disconnected");
                self.out.push(Event::Disconnected { code, reason, will_retry: !give_up });
            } else {
                debug!(attempt, ?code, %reason, retry_in = ?delay, give_up, "connect failed");
                self.out.push(Event::ConnectFailed { attempt, error: reason, retry_in: (!give_up).then_some(delay) });
            }
            if give_up {
                warn!(failures = self.failures, "giving up");
                break;
            }
        }
        self.finish().await;
    }

    /// The upgrade was refused in a way retrying cannot fix (a bad or unauthorised id):
    /// say why, as an `Error` and a final `ConnectFailed`, and stop.
    fn refused(&mut self, attempt: u32, response: &http::Response<Option<Vec<u8>>>) {
        let status = response.status();
        let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
        let body: String = body.trim().chars().take(200).collect();
        let message = if body.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {body}") };
        warn!(%status, %body, "upgrade refused; not retrying");
        self.failures += 1;
        bump(&self.shared.stats.connect_failures);
        self.out.push(Event::Error { code: UPGRADE_REFUSED.to_string(), message: message.clone() });
        self.out.push(Event::ConnectFailed { attempt, error: message, retry_in: None });
    }

    fn gives_up(&self) -> bool {
        self.cfg.max_attempts.is_some_and(|m| self.failures >= m)
    }

    fn set_status(&self, status: Status) {
        self.shared.status.send_replace(status);
    }

    /// Runs `fut` while serving commands the offline way and passing events on. `None`:
    /// the app stopped the client meanwhile.
    async fn offline<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let mut fut = pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                cmd = self.cmds.recv() => match cmd {
                    None => return None,
                    Some(Command::Close(tx)) => {
                        self.closers.push(tx);
                        return None;
                    }
                    Some(cmd) => self.offline_command(cmd),
                },
                () = self.out.hand_over(), if self.out.blocked() => {}
            }
        }
    }

    /// A command while no connection exists: room and name changes are remembered and
    /// applied on the next connection; everything else is refused.
    fn offline_command(&mut self, cmd: Command) {
        match cmd {
            Command::Join(room, reply) => {
                let entry = self.rooms.entry(room.clone()).or_default();
                entry.waiters.push(reply);
                self.shared.view().rooms.entry(room).or_insert(None);
            }
            Command::Leave(room, reply) => {
                self.forget_room(&room);
                let _ = reply.send(Ok(()));
            }
            Command::SetName(name, reply) => {
                self.set_name_locally(name);
                let _ = reply.send(Ok(()));
            }
            Command::Send { reply, .. } | Command::Presence(_, reply) | Command::Online(reply) => {
                let _ = reply.send(Err(Error::NotConnected));
            }
            Command::Close(_) => unreachable!("handled by the caller"),
        }
    }

    fn set_name_locally(&mut self, name: String) {
        self.shared.view().name = Some(name.clone());
        self.name = Some(name);
    }

    /// Removes a room from the app's set; pending joins of it fail as cancelled.
    fn forget_room(&mut self, room: &str) -> bool {
        let Some(r) = self.rooms.remove(room) else {
            return false;
        };
        for w in r.waiters {
            let _ = w.send(Err(Error::Cancelled(room.to_string())));
        }
        self.app_joins.retain(|r| r != room);
        self.shared.view().rooms.remove(room);
        true
    }

    /// Serves one connection until it ends.
    async fn connection(&mut self, mut ws: Ws, attempt: u32) -> Ended {
        let now = Instant::now();
        let mut conn = Conn {
            attempt,
            server: None,
            rejoining: BTreeSet::new(),
            resume_done: false,
            resume_always: false,
            ready_at: None,
            progress: now,
            last_rx: now,
        };
        let ping_every = self.cfg.ping_interval;
        let mut ping = pin!(sleep(ping_every.unwrap_or(Duration::MAX / 4)));
        let mut stuck = pin!(sleep(self.cfg.connect_timeout));
        let end = loop {
            tokio::select! {
                cmd = self.cmds.recv() => match cmd {
                    None => break Ended::Stop,
                    Some(Command::Close(tx)) => {
                        self.closers.push(tx);
                        break Ended::Stop;
                    }
                    Some(cmd) => {
                        if let Err(end) = self.online_command(cmd, &mut ws, &mut conn).await {
                            break end;
                        }
                    }
                },
                () = self.out.hand_over(), if self.out.blocked() => conn.progress = Instant::now(),
                frame = ws.next(), if !self.out.blocked() => {
                    let now = Instant::now();
                    conn.last_rx = now;
                    conn.progress = now;
                    let result = match frame {
                        None => Err(self.lost(&conn, None, "connection closed without a close frame".into())),
                        Some(Err(e)) => Err(self.lost(&conn, None, e.to_string())),
                        Some(Ok(WsMessage::Text(text))) => self.on_text(text.as_str(), &mut ws, &mut conn).await,
                        Some(Ok(WsMessage::Close(frame))) => {
                            let (code, reason) = match frame {
                                Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
                                None => (None, "closed by the node".to_string()),
                            };
                            // Let tungstenite send its answer to the close frame.
                            let _ = timeout(CLOSE_WAIT, async { while ws.next().await.is_some() {} }).await;
                            Err(self.lost(&conn, code, reason))
                        }
                        Some(Ok(WsMessage::Binary(_))) => {
                            bump(&self.shared.stats.invalid_frames);
                            warn!("binary frame from the node ignored");
                            Ok(())
                        }
                        Some(Ok(_)) => Ok(()), // ping, pong: tungstenite answers pings itself
                    };
                    if let Err(end) = result {
                        break end;
                    }
                }
                () = &mut ping, if ping_every.is_some() => {
                    let every = ping_every.unwrap_or(Duration::MAX / 4);
                    let now = Instant::now();
                    if self.out.blocked() {
                        // We are not reading, so silence proves nothing about the node.
                        conn.last_rx = now;
                    }
                    if now.duration_since(conn.last_rx) >= every * 2 {
                        break self.lost(&conn, None, format!("nothing from the node for {:?}", every * 2));
                    }
                    if let Err(end) = self.write_raw(&mut ws, &conn, WsMessage::Ping(Default::default())).await {
                        break end;
                    }
                    ping.as_mut().reset(now + every);
                }
                () = &mut stuck, if !conn.ready() && !self.out.blocked() => {
                    let deadline = conn.progress + self.cfg.connect_timeout;
                    if deadline > Instant::now() {
                        stuck.as_mut().reset(deadline);
                    } else {
                        let what = if conn.server.is_none() { "the connected frame" } else { "re-sync progress" };
                        let reason = format!("no {what} within {:?}", self.cfg.connect_timeout);
                        break self.lost(&conn, None, reason);
                    }
                }
            }
        };
        match &end {
            Ended::Stop => self.hang_up(&mut ws).await,
            Ended::Lost { .. } => {
                if conn.server.is_some() {
                    bump(&self.shared.stats.disconnects);
                }
            }
        }
        // Whatever was held back was not delivered; positions did not move, so the next
        // resume asks for it again.
        for room in self.rooms.values_mut() {
            room.joined = false;
            room.hold = None;
        }
        if self.ever_connected && self.lost_at.is_none() && matches!(end, Ended::Lost { .. }) {
            self.lost_at = Some(Instant::now());
        }
        end
    }

    fn lost(&self, conn: &Conn, code: Option<u16>, reason: String) -> Ended {
        let failure = match conn.ready_at {
            None => true,
            // Dropped right after getting in sync: treat like a failed attempt, so that a
            // node that accepts and drops at once cannot make us reconnect in a tight loop.
            Some(at) => at.elapsed() < self.cfg.backoff_min,
        };
        Ended::Lost { code, reason, failure, connected: conn.server.is_some() }
    }

    /// Closes our side (1000) and waits briefly for the node's answer.
    async fn hang_up(&mut self, ws: &mut Ws) {
        let frame = CloseFrame { code: CloseCode::Normal, reason: "client closing".into() };
        let _ = timeout(CLOSE_WAIT, async {
            if ws.close(Some(frame)).await.is_ok() {
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
        .await;
    }

    async fn finish(mut self) {
        for tx in self.closers.drain(..) {
            let _ = tx.send(());
        }
        for (room, r) in std::mem::take(&mut self.rooms) {
            for w in r.waiters {
                let _ = w.send(Err(Error::Closed));
            }
            debug!(%room, "client stopped");
        }
        self.set_status(Status::Closed);
        self.out.push(Event::Closed);
        // Refuse what is still queued rather than leave callers waiting.
        self.cmds.close();
        while let Ok(cmd) = self.cmds.try_recv() {
            match cmd {
                Command::Join(_, r)
                | Command::Leave(_, r)
                | Command::SetName(_, r)
                | Command::Presence(_, r)
                | Command::Online(r)
                | Command::Send { reply: r, .. } => {
                    let _ = r.send(Err(Error::Closed));
                }
                Command::Close(tx) => {
                    let _ = tx.send(());
                }
            }
        }
        self.out.flush().await;
        info!("client closed");
    }

    /// Writes one frame. A write that cannot finish within `connect_timeout` (the node
    /// stopped reading and the socket buffers are full) counts as a lost connection.
    async fn write(&self, ws: &mut Ws, conn: &Conn, frame: Value) -> Result<(), Ended> {
        self.write_raw(ws, conn, WsMessage::text(frame.to_string())).await
    }

    async fn write_raw(&self, ws: &mut Ws, conn: &Conn, msg: WsMessage) -> Result<(), Ended> {
        match timeout(self.cfg.connect_timeout, ws.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.lost(conn, None, format!("write failed: {e}"))),
            Err(_) => Err(self.lost(conn, None, format!("write stalled for {:?}", self.cfg.connect_timeout))),
        }
    }

    /// A command while connected.
    async fn online_command(&mut self, cmd: Command, ws: &mut Ws, conn: &mut Conn) -> Result<(), Ended> {
        let connected = conn.server.is_some();
        match cmd {
            Command::Join(room, reply) => {
                let entry = self.rooms.entry(room.clone()).or_default();
                if entry.joined {
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                let first = entry.waiters.is_empty();
                entry.waiters.push(reply);
                self.shared.view().rooms.entry(room.clone()).or_insert(None);
                // Before `connected`, the re-sync will join it; a second caller for the
                // same room shares the first one's request.
                if connected && first && !conn.rejoining.contains(&room) {
                    self.app_joins.push_back(room.clone());
                    self.write(ws, conn, json!({"type": "join", "room": room})).await?;
                }
            }
            Command::Leave(room, reply) => {
                let known = self.forget_room(&room);
                if known && connected {
                    self.write(ws, conn, json!({"type": "leave", "room": room})).await?;
                }
                let _ = reply.send(Ok(()));
                if conn.rejoining.remove(&room) {
                    self.after_rejoin(ws, conn).await?;
                }
                self.check_ready(conn);
            }
            Command::SetName(name, reply) => {
                self.set_name_locally(name.clone());
                if connected {
                    self.write(ws, conn, json!({"type": "set_name", "name": name})).await?;
                }
                let _ = reply.send(Ok(()));
            }
            Command::Send { room, text, reply } => {
                if !conn.ready() {
                    let _ = reply.send(Err(Error::NotConnected));
                } else if !self.rooms.get(&room).is_some_and(|r| r.joined) {
                    let _ = reply.send(Err(Error::NotJoined(room)));
                } else {
                    let frame = json!({"type": "message", "room": room, "text": text});
                    let result = self.write(ws, conn, frame).await;
                    let _ = reply.send(match &result {
                        Ok(()) => Ok(()),
                        Err(_) => Err(Error::NotConnected),
                    });
                    result?;
                }
            }
            Command::Presence(room, reply) => {
                if !conn.ready() {
                    let _ = reply.send(Err(Error::NotConnected));
                } else {
                    let result = self.write(ws, conn, json!({"type": "presence", "room": room})).await;
                    let _ = reply.send(result.as_ref().map_err(|_| Error::NotConnected).copied());
                    result?;
                }
            }
            Command::Online(reply) => {
                if !conn.ready() {
                    let _ = reply.send(Err(Error::NotConnected));
                } else {
                    let result = self.write(ws, conn, json!({"type": "online"})).await;
                    let _ = reply.send(result.as_ref().map_err(|_| Error::NotConnected).copied());
                    result?;
                }
            }
            Command::Close(_) => unreachable!("handled by the caller"),
        }
        Ok(())
    }

    async fn on_text(&mut self, text: &str, ws: &mut Ws, conn: &mut Conn) -> Result<(), Ended> {
        let frame = match parse(text) {
            Parsed::Frame(f) => f,
            Parsed::Unknown(v) => {
                bump(&self.shared.stats.unknown_frames);
                debug!(frame = %v, "unknown frame type");
                self.out.push(Event::Unknown(v));
                return Ok(());
            }
            Parsed::Malformed(v, why) => {
                bump(&self.shared.stats.malformed_frames);
                warn!(%why, frame = %v, "malformed frame from the node");
                self.out.push(Event::Unknown(v));
                return Ok(());
            }
            Parsed::Invalid(why) => {
                bump(&self.shared.stats.invalid_frames);
                let shown: String = text.chars().take(200).collect();
                warn!(%why, frame = %shown, "invalid frame from the node ignored");
                return Ok(());
            }
        };
        if conn.server.is_none() {
            return match frame {
                Frame::Connected { server, id, session, rooms, name } => {
                    self.on_connected(ws, conn, server, id, session, rooms, name).await
                }
                _ => Err(self.lost(conn, None, "protocol: the first frame was not `connected`".into())),
            };
        }
        match frame {
            Frame::Connected { .. } => {
                bump(&self.shared.stats.malformed_frames);
                warn!("second `connected` frame on one connection ignored");
            }
            Frame::Message(m) => return self.on_message(m, conn),
            Frame::UserJoined { room, user, id, server, head_seq, epoch } => {
                let own = self.id.as_deref() == Some(id.as_str());
                let room_name = room.clone();
                let start = head_seq.map(|seq| (epoch.clone(), seq));
                self.out.push(Event::UserJoined { room, user, id, server, head_seq, epoch });
                if own {
                    self.on_own_join(&room_name, start, ws, conn).await?;
                }
            }
            Frame::UserLeft { room, user, id, server, reason } => {
                self.out.push(Event::UserLeft { room, user, id, server, reason });
            }
            Frame::Resumed { room, from_seq, to_seq, complete, epoch } => {
                self.on_resumed(room, from_seq, to_seq, complete, epoch, conn)
            }
            Frame::Presence { room, users } => {
                self.out.push(Event::Presence { room, users });
            }
            Frame::Online { users } => {
                self.out.push(Event::Online { users });
            }
            Frame::Error { code, message } => return self.on_error(code, message, conn),
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)] // the fields of one frame
    async fn on_connected(
        &mut self,
        ws: &mut Ws,
        conn: &mut Conn,
        server: String,
        id: String,
        session: Session,
        restored: Vec<String>,
        server_name: Option<String>,
    ) -> Result<(), Ended> {
        if let Err(e) = validate_client_id(&id) {
            return Err(self.lost(conn, None, format!("protocol: the node announced an invalid id: {e}")));
        }
        if self.id.as_deref() != Some(id.as_str()) {
            match &self.id {
                None => info!(%id, "adopting the id the server minted"),
                Some(ours) => {
                    warn!(ours = %ours, theirs = %id, "the server replaced our id; adopting it")
                }
            }
            tracing::Span::current().record("id", id.as_str());
            self.shared.view().id = Some(id.clone());
            self.id = Some(id.clone());
        }
        conn.server = Some(server.clone());
        let stats = &self.shared.stats;
        bump(&stats.connects);
        if self.ever_connected {
            bump(&stats.reconnects);
        }
        self.ever_connected = true;
        let since_disconnect = self.lost_at.map(|t| t.elapsed());
        if let Some(d) = since_disconnect {
            stats.set_last_reconnect(d);
        }
        info!(%server, ?session, rooms = restored.len(), attempt = conn.attempt, "connected");
        let restored: BTreeSet<String> = match session {
            Session::Restored => restored.into_iter().collect(),
            Session::New => BTreeSet::new(),
        };
        self.out.push(Event::Connected {
            server: server.clone(),
            id,
            session,
            rooms: restored.iter().cloned().collect(),
            attempt: conn.attempt,
            since_disconnect,
        });
        self.set_status(Status::Syncing { server });

        match (self.name.clone(), server_name) {
            (Some(ours), theirs) => {
                if session == Session::New || theirs.as_deref() != Some(ours.as_str()) {
                    self.write(ws, conn, json!({"type": "set_name", "name": ours})).await?;
                }
            }
            // The restored session remembers a name we were not configured with: keep it.
            (None, Some(theirs)) if session == Session::Restored => self.set_name_locally(theirs),
            (None, _) => {}
        }
        for room in restored.iter().filter(|r| !self.rooms.contains_key(*r)) {
            debug!(%room, "leaving a restored room the app left");
            self.write(ws, conn, json!({"type": "leave", "room": room})).await?;
        }
        // Joins the app made on the previous connection that never completed are now part
        // of the re-sync; their waiters still resolve on the own `user_joined`.
        self.app_joins.clear();
        let mut to_join = Vec::new();
        let mut restored_waiters = Vec::new();
        for (name, room) in &mut self.rooms {
            room.joined = restored.contains(name);
            if room.tracker.has_start() {
                room.hold = Some(Vec::new());
            }
            if room.joined {
                restored_waiters.append(&mut room.waiters);
            } else {
                to_join.push(name.clone());
            }
        }
        for w in restored_waiters {
            let _ = w.send(Ok(()));
        }
        for room in to_join {
            self.write(ws, conn, json!({"type": "join", "room": room})).await?;
            conn.rejoining.insert(room);
        }
        // A restored session's node holds live frames until it sees `resume`, so it gets
        // one even when no room has a position.
        conn.resume_always = session == Session::Restored;
        self.after_rejoin(ws, conn).await?;
        self.check_ready(conn);
        Ok(())
    }

    /// Own `user_joined`: the room is live for us on this connection. `start` is the room's
    /// `(epoch, head_seq)` at the join, which anchors a room that has no position yet.
    async fn on_own_join(
        &mut self,
        room: &str,
        start: Option<(Option<String>, u64)>,
        ws: &mut Ws,
        conn: &mut Conn,
    ) -> Result<(), Ended> {
        let Some(r) = self.rooms.get_mut(room) else {
            return Ok(());
        };
        r.joined = true;
        if let Some((epoch, seq)) = start {
            if r.tracker.anchor(epoch.as_deref(), seq) {
                debug!(%room, ?epoch, seq, "room anchored at its head");
                let pos = r.tracker.position().cloned();
                if let Some(slot) = self.shared.view().rooms.get_mut(room) {
                    *slot = pos;
                }
            }
        }
        for w in r.waiters.drain(..) {
            let _ = w.send(Ok(()));
        }
        self.app_joins.retain(|j| j != room);
        if conn.rejoining.remove(room) {
            self.after_rejoin(ws, conn).await?;
        }
        self.check_ready(conn);
        Ok(())
    }

    /// A re-sync join finished (or was dropped): once none is left, resume.
    async fn after_rejoin(&mut self, ws: &mut Ws, conn: &mut Conn) -> Result<(), Ended> {
        if conn.rejoining.is_empty() && !conn.resume_done && conn.server.is_some() {
            self.send_resume(ws, conn).await?;
        }
        Ok(())
    }

    /// One `resume` with the position of every held room. Sent even when empty for a
    /// restored session (its node waits for it).
    async fn send_resume(&mut self, ws: &mut Ws, conn: &mut Conn) -> Result<(), Ended> {
        let mut rooms = Map::new();
        for (name, room) in &self.rooms {
            if let (Some(_), Some((epoch, seq))) = (&room.hold, room.tracker.resume_point()) {
                let point = match epoch {
                    Some(epoch) => json!({"seq": seq, "epoch": epoch}),
                    // Anchored before the room had a log: everything it logged since.
                    None => json!({"seq": seq}),
                };
                rooms.insert(name.clone(), point);
            }
        }
        conn.resume_done = true;
        if rooms.is_empty() && !conn.resume_always {
            return Ok(());
        }
        debug!(rooms = rooms.len(), "resuming");
        self.write(ws, conn, json!({"type": "resume", "rooms": rooms})).await
    }

    /// Marks the connection ready once nothing is left to re-join or replay.
    fn check_ready(&mut self, conn: &mut Conn) {
        if conn.ready()
            || conn.server.is_none()
            || !conn.rejoining.is_empty()
            || !conn.resume_done
            || self.rooms.values().any(|r| r.hold.is_some())
        {
            return;
        }
        let now = Instant::now();
        conn.ready_at = Some(now);
        let since_disconnect = self.lost_at.take().map(|lost| now.duration_since(lost));
        if let Some(d) = since_disconnect {
            self.shared.stats.set_last_recovery(d);
        }
        self.restart_pending = false;
        let server = conn.server.clone().unwrap_or_default();
        debug!(%server, "in sync");
        self.set_status(Status::Ready { server: server.clone() });
        self.out.push(Event::Ready { server, since_disconnect });
    }

    fn on_message(&mut self, m: Message, conn: &Conn) -> Result<(), Ended> {
        let Some(room) = self.rooms.get_mut(&m.room) else {
            bump(&self.shared.stats.stray_messages);
            debug!(room = %m.room, seq = m.seq, "message for a room the app is not in dropped");
            return Ok(());
        };
        if let Some(hold) = &mut room.hold {
            if !m.replay {
                if hold.len() >= HOLD_LIMIT {
                    let reason = format!("{HOLD_LIMIT} live frames of {} held without `resumed`", m.room);
                    return Err(self.lost(conn, None, reason));
                }
                hold.push(m);
                return Ok(());
            }
        }
        self.deliver(m);
        Ok(())
    }

    /// Passes a message through its room's tracker to the app.
    fn deliver(&mut self, m: Message) {
        let Some(room) = self.rooms.get_mut(&m.room) else {
            return;
        };
        let stats = &self.shared.stats;
        match room.tracker.accept(&m.epoch, m.seq, m.replay) {
            Verdict::Duplicate => {
                bump(&stats.duplicates_dropped);
                debug!(room = %m.room, seq = m.seq, replay = m.replay, "duplicate dropped");
            }
            Verdict::StaleEpoch => {
                bump(&stats.stale_epoch_dropped);
                debug!(room = %m.room, epoch = %m.epoch, seq = m.seq, "message of a retired epoch dropped");
            }
            Verdict::Deliver { gap, epoch_change } => {
                if let Some((old, new)) = epoch_change {
                    bump(&stats.epoch_changes);
                    warn!(room = %m.room, %old, %new, "room log epoch changed");
                    self.out.push(Event::EpochChanged { room: m.room.clone(), old, new });
                }
                if let Some((expected, got)) = gap {
                    bump(&stats.gaps);
                    stats.gap_messages.fetch_add(got - expected, Relaxed);
                    warn!(room = %m.room, expected, got, "gap in a room's messages");
                    self.out.push(Event::Gap { room: m.room.clone(), expected, got });
                }
                let pos = room.tracker.position().cloned();
                if let Some(slot) = self.shared.view().rooms.get_mut(&m.room) {
                    *slot = pos;
                }
                let replay = m.replay;
                if self.out.push(Event::Message(m)) {
                    bump(&stats.messages_delivered);
                    if replay {
                        bump(&stats.replayed_delivered);
                    }
                }
            }
        }
    }

    fn on_resumed(
        &mut self,
        room: String,
        from_seq: u64,
        to_seq: u64,
        complete: bool,
        epoch: Option<String>,
        conn: &mut Conn,
    ) {
        let Some(r) = self.rooms.get_mut(&room) else {
            debug!(%room, "`resumed` for a room the app left");
            return;
        };
        let change = epoch.as_deref().and_then(|e| r.tracker.enter_epoch(e));
        let held = r.hold.take();
        if let Some(pos) = r.tracker.position().cloned() {
            if let Some(slot) = self.shared.view().rooms.get_mut(&room) {
                *slot = Some(pos);
            }
        }
        if !complete {
            bump(&self.shared.stats.incomplete_resumes);
            warn!(%room, from_seq, to_seq, "resume incomplete: messages were lost");
        }
        if let Some((old, new)) = change {
            bump(&self.shared.stats.epoch_changes);
            warn!(%room, %old, %new, "room log epoch changed");
            self.out.push(Event::EpochChanged { room: room.clone(), old, new });
        }
        self.out.push(Event::Resumed { room, from_seq, to_seq, complete, epoch });
        for m in held.into_iter().flatten() {
            self.deliver(m);
        }
        self.check_ready(conn);
    }

    fn on_error(&mut self, code: String, message: String, conn: &Conn) -> Result<(), Ended> {
        self.out.push(Event::Error { code: code.clone(), message: message.clone() });
        if !conn.ready() {
            // During re-sync every request is ours; one that failed leaves the session
            // half-restored. Start over (with backoff) rather than serve it that way.
            return Err(self.lost(conn, None, format!("re-sync refused: {code}: {message}")));
        }
        if matches!(code.as_str(), "invalid_room" | "backbone_unavailable") {
            if let Some(room) = self.app_joins.pop_front() {
                if let Some(r) = self.rooms.remove(&room) {
                    for w in r.waiters {
                        let _ = w.send(Err(Error::Server { code: code.clone(), message: message.clone() }));
                    }
                    self.shared.view().rooms.remove(&room);
                }
            }
        }
        Ok(())
    }
}
