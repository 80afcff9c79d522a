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
//!
//! This module runs the connection (connect, serve, back off, commands); `frames` handles
//! what the node sends.

use crate::backoff::Backoff;
use crate::config::{connect_url, ClientConfig};
use crate::error::Error;
use crate::event::{Event, Message, UPGRADE_REFUSED};
use crate::order::Tracker;
use crate::outbox::Outbox;
use crate::pending::{Full, Pending};
use crate::shared::{Command, Reply, SendReply, Shared, Status};
use crate::stats::bump;
use futures_util::{SinkExt, StreamExt};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use tether_proto::wire::{ClientMsg, RawJson, CLOSE_RESTART};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, info_span, warn, Instrument};

mod frames;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

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
    /// This connection's serial number (1, 2, …): which messages it has written.
    serial: u64,
    /// The unconfirmed messages were resent once the connection got in sync.
    resent: bool,
    /// A `backbone_unavailable` came: resend what is unconfirmed at this instant.
    retry_at: Option<Instant>,
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
    /// Messages sent and not yet confirmed, with their `msg_id`s.
    pending: Pending,
    /// Connections made so far (the serial of the latest).
    conns: u64,
}

impl Driver {
    pub(crate) fn new(
        cfg: ClientConfig,
        shared: Arc<Shared>,
        cmds: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
    ) -> Self {
        let pending = Pending::new(cfg.max_unconfirmed, cfg.max_unconfirmed_bytes);
        Self {
            backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max, cfg.jitter),
            id: cfg.client_id.clone(),
            name: cfg.name.clone(),
            out: Outbox::new(events, Arc::clone(&shared)),
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
            pending,
            conns: 0,
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
            // `wss://` with the configured TLS settings, else the system's roots; `ws://` ignores them.
            let tls = self.cfg.tls.clone().map(tokio_tungstenite::Connector::Rustls);
            let connect = timeout(
                self.cfg.connect_timeout,
                tokio_tungstenite::connect_async_tls_with_config(url, None, false, tls),
            );
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
                let unconfirmed = self.pending.ids();
                self.out.push(Event::Disconnected { code, reason, will_retry: !give_up, unconfirmed });
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
            Command::Send { reply, .. } => {
                let _ = reply.send(Err(Error::NotConnected));
            }
            Command::Presence(_, reply) | Command::Online(reply) => {
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
        let dropped = self.pending.drop_room(room) as u64;
        if dropped > 0 {
            debug!(%room, dropped, "unconfirmed messages of a room left are not resent");
            self.shared.stats.unconfirmed_abandoned.fetch_add(dropped, std::sync::atomic::Ordering::Relaxed);
            self.pending_changed();
        }
        true
    }

    /// Publishes the unconfirmed count to the handles.
    pub(super) fn pending_changed(&self) {
        self.shared.stats.unconfirmed.store(self.pending.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Serves one connection until it ends.
    async fn connection(&mut self, mut ws: Ws, attempt: u32) -> Ended {
        let now = Instant::now();
        self.conns += 1;
        let mut conn = Conn {
            serial: self.conns,
            resent: false,
            retry_at: None,
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
        let mut retry = pin!(sleep(Duration::MAX / 4));
        let mut retry_armed = false;
        let end = loop {
            // Once in sync, and before any new command is served, what is unconfirmed goes
            // out again, in order: the app's messages keep the order it sent them in.
            if conn.ready() && !conn.resent {
                conn.resent = true;
                if let Err(end) = self.resend(&mut ws, &conn).await {
                    break end;
                }
            }
            if let Some(at) = conn.retry_at.filter(|_| !retry_armed) {
                retry.as_mut().reset(at);
                retry_armed = true;
            }
            tokio::select! {
                () = &mut retry, if retry_armed => {
                    retry_armed = false;
                    conn.retry_at = None;
                    self.pending.forget_writes();
                    if let Err(end) = self.resend(&mut ws, &conn).await {
                        break end;
                    }
                }
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
                | Command::Online(r) => {
                    let _ = r.send(Err(Error::Closed));
                }
                Command::Send { reply, .. } => {
                    let _ = reply.send(Err(Error::Closed));
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
    async fn write(&self, ws: &mut Ws, conn: &Conn, frame: &ClientMsg) -> Result<(), Ended> {
        self.write_raw(ws, conn, WsMessage::text(frame.to_json())).await
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
                    self.write(ws, conn, &ClientMsg::Join { room: room.clone() }).await?;
                }
            }
            Command::Leave(room, reply) => {
                let known = self.forget_room(&room);
                if known && connected {
                    self.write(ws, conn, &ClientMsg::Leave { room: room.clone() }).await?;
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
                    self.write(ws, conn, &ClientMsg::SetName { name }).await?;
                }
                let _ = reply.send(Ok(()));
            }
            Command::Send { room, text, data, reply } => self.send_message(room, text, data, reply, ws, conn).await?,
            Command::Presence(room, reply) => {
                if !conn.ready() {
                    let _ = reply.send(Err(Error::NotConnected));
                } else {
                    let result = self.write(ws, conn, &ClientMsg::Presence { room }).await;
                    let _ = reply.send(result.as_ref().map_err(|_| Error::NotConnected).copied());
                    result?;
                }
            }
            Command::Online(reply) => {
                if !conn.ready() {
                    let _ = reply.send(Err(Error::NotConnected));
                } else {
                    let result = self.write(ws, conn, &ClientMsg::Online).await;
                    let _ = reply.send(result.as_ref().map_err(|_| Error::NotConnected).copied());
                    result?;
                }
            }
            Command::Close(_) => unreachable!("handled by the caller"),
        }
        Ok(())
    }

    /// A `send` on a connection: queue it with a fresh `msg_id`, then write it. Once queued
    /// the message is the client's to deliver — a failed write only means it goes out again
    /// on the next connection — so the app hears `Ok(msg_id)` either way.
    async fn send_message(
        &mut self,
        room: String,
        text: String,
        data: Option<RawJson>,
        reply: SendReply,
        ws: &mut Ws,
        conn: &mut Conn,
    ) -> Result<(), Ended> {
        if !conn.ready() {
            let _ = reply.send(Err(Error::NotConnected));
            return Ok(());
        }
        if !self.rooms.get(&room).is_some_and(|r| r.joined) {
            let _ = reply.send(Err(Error::NotJoined(room)));
            return Ok(());
        }
        let frame = match self.pending.push(room, text, data) {
            Ok(m) => m.frame(),
            Err(Full { count, bytes }) => {
                let _ = reply.send(Err(Error::TooManyUnconfirmed { count, bytes }));
                return Ok(());
            }
        };
        let json = frame.to_json();
        let ClientMsg::Message { msg_id: Some(msg_id), .. } = frame else {
            unreachable!("PendingMsg::frame builds a message with its msg_id")
        };
        if json.len() > self.cfg.max_message_bytes {
            self.pending.confirm(&msg_id); // not sent: take it back out
            let _ = reply.send(Err(Error::TooLarge { bytes: json.len(), limit: self.cfg.max_message_bytes }));
            return Ok(());
        }
        bump(&self.shared.stats.messages_sent);
        self.pending_changed();
        let written = self.write_raw(ws, conn, WsMessage::text(json)).await;
        if written.is_ok() {
            self.pending.written(&msg_id, conn.serial);
        }
        let _ = reply.send(Ok(msg_id));
        written
    }

    /// Writes every unconfirmed message this connection has not written yet, oldest first.
    async fn resend(&mut self, ws: &mut Ws, conn: &Conn) -> Result<(), Ended> {
        let due = self.pending.due(conn.serial);
        if !due.is_empty() {
            info!(messages = due.len(), "resending unconfirmed messages");
        }
        for m in due {
            if !self.rooms.get(&m.room).is_some_and(|r| r.joined) {
                continue; // left meanwhile: `forget_room` dropped it, nothing to resend
            }
            self.write(ws, conn, &m.frame()).await?;
            self.pending.written(&m.msg_id, conn.serial);
            bump(&self.shared.stats.messages_resent);
        }
        Ok(())
    }
}
