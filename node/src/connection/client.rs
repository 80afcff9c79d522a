//! One client connection, from the first frame to cleanup.
//!
//! On connect the client's session (name, rooms) is loaded from the backbone; if there is one,
//! the connection re-joins its rooms at once with *holding* gates (see [`crate::hub::Gate`]) and
//! says `"session":"restored"`. The client's `resume` then replays each room's log after the
//! seq it last saw and releases the held live frames behind the replay, so the client gets
//! every message once, in seq order; rooms not resumed within `resume_grace` are released as
//! they are. Every change of name or rooms is written to the session before it is confirmed,
//! so a node killed at any moment loses nothing of it.
//!
//! One task per connection reads and handles client frames in order. Frames for the client go
//! through its outbox ([`crate::outbox`]); the task writes out what gathered there, many frames
//! per write, also while a frame's handling waits on the backbone. Fan-out never waits on this client. The connection closes with 1008
//! when the hub kicks a slow consumer (and is reset), with 1012 on node shutdown and with 1009
//! on an oversized frame (a lingering close: see [`goodbye`]).

use crate::backbone::Backbone;
use crate::backbone::{PresenceChange, PresenceEntry, Scope, SessionRecord, Unpublished};
use crate::hub::{FrameMeta, Gate, Member};
use crate::outbox::{ClientIo, Outbox, Wire};
use crate::server::NodeState;
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tether_proto::wire::{
    self, ClientMsg, ErrorCode, Event, LeaveReason, MessageHead, ResumePoint, SessionKind, CLOSE_POLICY, CLOSE_RESTART,
    CLOSE_TOO_BIG,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, debug_span, Instrument};

/// How long a closing peer gets to take what is still queued for it and its close frame;
/// past it the connection is reset.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(5);

/// After the node's close frame went out (and its write side was shut down): how long the node
/// keeps reading, and discarding, what the client still sends while it waits for the client to
/// hang up. Closing a socket with unread input makes the kernel send a reset, which can destroy
/// the close frame before the client reads it (a client halfway through a large frame would
/// see 1006 instead of 1009).
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// A slow consumer's close frame, when it could still be written, gets this long to be
/// answered before the connection is reset.
pub const SLOW_LINGER: Duration = Duration::from_secs(1);

/// The connection's WebSocket: reads straight from the socket, writes through its outbox.
type Ws = WebSocketStream<ClientIo>;

/// Serves one upgraded connection until it ends; then leaves every room it was in. `early`:
/// bytes of the client's first frames that arrived with its upgrade request.
///
/// One task per connection: it waits for the client's next frame, and for frames in its outbox.
pub async fn run(sock: TcpStream, early: Bytes, client_id: String, peer: String, state: Arc<NodeState>) {
    let conn = state.hub.next_conn_id();
    // Debug level: a span per idle connection costs memory (its fields, formatted) for
    // nothing when only info and above are logged.
    let span = debug_span!("client", id = %client_id, node = %state.cfg.name, peer = %peer, conn);
    async move {
        state.metrics.connections_active.inc();
        state.metrics.connections_total.inc();
        let sock = Arc::new(sock);
        let wire: Arc<dyn Wire> = Arc::clone(&sock) as Arc<dyn Wire>;
        let out = Outbox::new(Some(wire), Arc::clone(&state.limits));
        let io = ClientIo { sock, out: Arc::clone(&out) };
        // Boxed: this await's state would otherwise size the connection's task for its life.
        let mut ws =
            Box::pin(WebSocketStream::from_partially_read(io, early.to_vec(), Role::Server, Some(state.ws_config)))
                .await;
        drop(early);
        let id: Arc<str> = Arc::from(client_id.as_str());
        state.hub.register(conn, Arc::clone(&id));
        let mut client = Client {
            id: client_id,
            name: None,
            rooms: BTreeMap::new(),
            conn,
            // A child of the node's shutdown: one wait covers both reasons to stop writing.
            member: Member { out, kick: state.shutdown.child_token() },
            state: Arc::clone(&state),
            grace_until: None,
            tokens: f64::from(state.cfg.rate_limit_burst),
            tokens_at: tokio::time::Instant::now(),
        };
        // The rarely-run steps are boxed: a connection's task is sized by its largest await
        // state, and an idle connection should pay only for waiting on its next frame.
        Box::pin(client.start()).await;
        let close = client.serve(&mut ws).await;
        // The goodbye goes out while the rooms are left: a peer that stopped reading may take
        // up to CLOSE_DEADLINE to refuse it, and nobody else should wait for that.
        let goodbye = tokio::spawn(goodbye(ws, close).in_current_span());
        Box::pin(client.leave_all()).await;
        state.hub.unregister(conn);
        drop(client);
        let _ = goodbye.await;
        state.metrics.connections_active.dec();
        debug!("connection closed");
    }
    .instrument(span)
    .await
}

/// Ends a connection without the kernel turning its close into a reset, except where a reset
/// is the point:
/// - a close the node starts (1009, 1012, …): what waits goes out, then the close frame, then
///   the write side is shut down and the client's remaining input is read and discarded
///   until it hangs up ([`CLOSE_LINGER`] at most); a client that does not take it all within
///   [`CLOSE_DEADLINE`] is reset;
/// - a slow consumer (1008): its backlog is dropped; the close frame goes only if the socket
///   takes it at once, and unless the client then hangs up within [`SLOW_LINGER`] the
///   connection is reset (`SO_LINGER` 0). A plain close would queue the FIN behind megabytes
///   of unsent data, and the socket would sit in FIN-WAIT-1, pinning that kernel memory, for
///   as long as the stalled client answers window probes;
/// - the client closed (or vanished): tungstenite's answer to its close frame goes out, then
///   the socket is closed.
async fn goodbye(mut ws: Ws, close: Option<(u16, &'static str)>) {
    let out = Arc::clone(&ws.get_ref().out);
    let sock = Arc::clone(&ws.get_ref().sock);
    let frame = |code: u16, reason: &'static str| {
        Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() }))
    };
    let clean = match close {
        Some((CLOSE_POLICY, reason)) => {
            if out.discard() {
                let _ = ws.send(frame(CLOSE_POLICY, reason)).await;
            }
            // Written whole at once, or not at all: nothing may wait behind a stalled reader.
            out.write_now() && shut_write(&sock) && linger(&sock, SLOW_LINGER).await
        }
        Some((code, reason)) => {
            out.seal();
            let _ = ws.send(frame(code, reason)).await;
            let flushed = matches!(tokio::time::timeout(CLOSE_DEADLINE, out.flush()).await, Ok(Ok(())));
            flushed && shut_write(&sock) && {
                linger(&sock, CLOSE_LINGER).await;
                true
            }
        }
        None => {
            out.seal();
            // Tungstenite answers a close frame itself; this sends the answer on its way.
            let _ = ws.flush().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), out.flush()).await;
            true
        }
    };
    if !clean {
        if let Err(e) = sock.set_zero_linger() {
            debug!(error = %e, "could not set SO_LINGER 0");
        }
    }
    out.close();
    // The socket closes when its last handle, in `ws`, goes.
}

/// Shuts down the socket's write side (the client reads what was sent, then end of stream).
fn shut_write(sock: &TcpStream) -> bool {
    socket2::SockRef::from(sock).shutdown(std::net::Shutdown::Write).is_ok()
}

/// Reads and discards what the client still sends until it hangs up (`true`) or `within`
/// passes (`false`).
async fn linger(sock: &TcpStream, within: Duration) -> bool {
    let drain = async {
        let mut sink = [0u8; 4096];
        loop {
            if sock.readable().await.is_err() {
                return true;
            }
            match sock.try_read(&mut sink) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Reset by the peer: it is gone as well.
                Err(_) => return true,
            }
        }
    };
    tokio::time::timeout(within, drain).await.unwrap_or(false)
}

/// Why a connection stopped writing.
enum WriteStop {
    /// The hub found it too slow (close with 1008), or the node is shutting down (1012).
    Kicked,
    /// The socket failed: nothing more can be sent.
    Failed,
}

/// Runs `work` to its end while writing out whatever waits in the outbox meanwhile (a resume
/// queues a whole replay), so a long step never fills this client's own queue. If writing has
/// to stop, `work` still runs to its end (dropping it halfway could leave a room half joined);
/// the reason comes back with its output. `kicked` is the connection's one wait for its kick.
async fn writing_while<F>(
    work: F,
    out: &Outbox,
    kicked: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> (F::Output, Option<WriteStop>)
where
    F: std::future::Future,
{
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            r = &mut work => return (r, None),
            _ = &mut *kicked => return (work.await, Some(WriteStop::Kicked)),
            r = out.write_backlog() => if let Err(e) = r {
                debug!(error = %e, "write failed");
                return (work.await, Some(WriteStop::Failed));
            }
        }
    }
}

/// The per-connection state the connection task owns.
struct Client {
    id: String,
    name: Option<String>,
    /// Rooms this connection is a member of, with their delivery gates.
    rooms: BTreeMap<String, Arc<Gate>>,
    conn: u64,
    /// This connection's handle as stored in the hub's rooms.
    member: Member,
    state: Arc<NodeState>,
    /// While restored rooms hold frames waiting for `resume`: when to stop waiting.
    grace_until: Option<tokio::time::Instant>,
    /// Token bucket of the optional rate limit: tokens left, and when they were counted.
    tokens: f64,
    tokens_at: tokio::time::Instant,
}

impl Client {
    fn backbone(&self) -> &dyn Backbone {
        self.state.backbone.as_ref()
    }

    fn display(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }

    /// Queues a frame for this client only. A full queue makes it a slow consumer.
    fn send(&self, event: &Event<'_>) {
        self.send_text(event.to_json());
    }

    fn send_text(&self, json: String) {
        self.member.offer_text(&json, &self.state.metrics);
    }

    fn error(&self, code: ErrorCode, message: &str) {
        self.state.metrics.client_errors.get_or_create(&crate::metrics::CodeLabel { code: code.as_str() }).inc();
        self.send(&Event::Error { code, message });
    }

    fn session_record(&self) -> SessionRecord {
        SessionRecord { name: self.name.clone(), rooms: self.rooms.keys().cloned().collect() }
    }

    /// Writes the session; says so to the client if it could not.
    async fn save_session(&self, what: &str) {
        if let Err(e) = self.backbone().save_session(&self.id, &self.session_record()).await {
            self.error(ErrorCode::BackboneUnavailable, &format!("{what}, but the session could not be saved: {e}"));
        }
    }

    /// Loads the session, re-joins its rooms (holding their frames) and sends `connected`.
    async fn start(&mut self) {
        let (stored, load_error) = match self.backbone().load_session(&self.id).await {
            Ok(s) => (s, None),
            Err(e) => (None, Some(e)),
        };
        let Some(stored) = stored else {
            // Registered before `connected`: once a client sees it, everyone sees the client.
            self.go_online().await;
            // `connected` is always the first frame; a failed load is said right after it.
            self.send(&Event::Connected {
                server: &self.state.cfg.name,
                id: &self.id,
                session: SessionKind::New,
                name: None,
                rooms: Vec::new(),
            });
            if let Some(e) = load_error {
                self.error(ErrorCode::BackboneUnavailable, &format!("session could not be loaded: {e}"));
            }
            return;
        };
        self.state.metrics.sessions_restored.inc();
        self.name = stored.name;
        if let Some(name) = &self.name {
            self.state.hub.set_user(self.conn, name);
        }
        let mut failed = Vec::new();
        for room in stored.rooms.into_iter().take(self.state.cfg.max_rooms_per_client) {
            if wire::validate_room(&room).is_err() || self.rooms.contains_key(&room) {
                continue;
            }
            let gate = Gate::holding();
            self.state.hub.add(&room, self.conn, self.member.clone(), Arc::clone(&gate));
            if let Err(e) = self.backbone().subscribe(&room).await {
                self.state.hub.remove(&room, self.conn);
                self.backbone().release(&room).await;
                failed.push(format!("{room}: {e}"));
                continue;
            }
            self.rooms.insert(room, gate);
        }
        // Presence first, `connected` after: once the client sees `connected`, every node
        // lists it. The others learn it is back (unless another connection of it never left);
        // its own copy of `user_joined` waits behind the resume.
        self.go_online().await;
        let mut direct = Vec::new();
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for room in &rooms {
            direct.extend(self.enter_presence(room).await);
        }
        self.send(&Event::Connected {
            server: &self.state.cfg.name,
            id: &self.id,
            session: SessionKind::Restored,
            name: self.name.as_deref(),
            rooms: rooms.iter().map(String::as_str).collect(),
        });
        if !failed.is_empty() {
            // The session keeps those rooms (the failure is the backbone's, likely passing):
            // they come back on a later reconnect or an explicit join.
            self.error(ErrorCode::BackboneUnavailable, &format!("could not rejoin {}", failed.join(", ")));
        }
        for frame in direct {
            self.send_text(frame);
        }
        if !self.rooms.is_empty() {
            self.grace_until = Some(tokio::time::Instant::now() + self.state.cfg.resume_grace);
        }
    }

    fn presence_entry(&self) -> PresenceEntry {
        PresenceEntry { id: self.id.clone(), user: self.display().to_string(), server: self.state.cfg.name.clone() }
    }

    async fn go_online(&self) {
        if let Err(e) = self.backbone().presence_add(Scope::Online, self.conn, &self.presence_entry(), None).await {
            debug!(error = %e, "could not register online presence");
        }
    }

    /// Registers this connection in `room`'s presence. The first connection of this id there
    /// announces `user_joined` through the backbone (this client's own copy marks its join
    /// complete); a further one (a second tab) is confirmed to this client alone.
    ///
    /// Returns the frame to send this client directly (the confirmation of a further
    /// connection, or the error), for the caller to send when its order allows.
    async fn enter_presence(&self, room: &str) -> Option<String> {
        let joined = self.user_joined(room);
        match self.backbone().presence_add(Scope::Room(room), self.conn, &self.presence_entry(), Some(joined)).await {
            Ok((PresenceChange::FirstOrLast, _)) => None,
            Ok((_, event)) => Some(event.unwrap_or_else(|| self.user_joined(room))),
            Err(e) => {
                let message = format!("joined {room}, but could not announce it: {e}");
                self.state
                    .metrics
                    .client_errors
                    .get_or_create(&crate::metrics::CodeLabel { code: "backbone_unavailable" })
                    .inc();
                Some(Event::Error { code: ErrorCode::BackboneUnavailable, message: &message }.to_json())
            }
        }
    }

    /// Removes this connection from `room`'s presence; the id's last connection there
    /// announces `user_left` with `reason`.
    async fn leave_presence(&self, room: &str, reason: LeaveReason) {
        let left = self.user_left(room, reason);
        if let Err(e) = self.backbone().presence_remove(Scope::Room(room), self.conn, &self.id, Some(left)).await {
            debug!(room, error = %e, "could not remove presence");
        }
    }

    /// Answers `presence` / `online`: one entry per client id, whichever node it is on.
    async fn list_presence(&self, scope: Scope<'_>) {
        let entries = match self.backbone().presence_list(scope).await {
            Ok(e) => e,
            Err(e) => return self.error(ErrorCode::BackboneUnavailable, &format!("presence unavailable: {e}")),
        };
        let mut seen = std::collections::BTreeMap::new();
        for e in &entries {
            seen.entry(e.id.as_str()).or_insert(e);
        }
        let users: Vec<wire::PresenceEntry<'_>> =
            seen.values().map(|e| wire::PresenceEntry { id: &e.id, user: &e.user, server: &e.server }).collect();
        match scope {
            Scope::Room(room) => self.send(&Event::Presence { room, users }),
            Scope::Online => self.send(&Event::Online { users }),
        }
    }

    /// Reads and handles the client's frames and writes out its send queue, until the
    /// connection ends; returns the close frame to send, if any.
    async fn serve(&mut self, ws: &mut Ws) -> Option<(u16, &'static str)> {
        let shutdown = self.state.shutdown.clone();
        let kick = self.member.kick.clone();
        let out = Arc::clone(&self.member.out);
        let stopped = |stop: WriteStop| match stop {
            WriteStop::Kicked if shutdown.is_cancelled() => Some((CLOSE_RESTART, "node shutting down")),
            WriteStop::Kicked => Some((CLOSE_POLICY, "slow consumer")),
            WriteStop::Failed => None,
        };
        // `kick` is a child of the node's shutdown token, so this one wait covers both. It is
        // made once, not on every turn of the loop (a fresh wait registers with its token
        // again each time), and a second one would cost every idle client its size.
        let mut kicked = std::pin::pin!(kick.cancelled());
        loop {
            let grace = self.grace_until;
            let next = tokio::select! {
                _ = &mut kicked => return stopped(WriteStop::Kicked),
                written = out.write_backlog() => {
                    if let Err(e) = written {
                        debug!(error = %e, "write failed");
                        return stopped(WriteStop::Failed);
                    }
                    continue;
                }
                _ = sleep_until_or_never(grace) => {
                    self.end_grace();
                    continue;
                }
                next = ws.next() => next,
            };
            // Text frames already received are handled together (consecutive messages to one
            // room are published in one backbone call); whatever else arrived after them is
            // handled next, before waiting again.
            let mut next = next;
            loop {
                match next {
                    None | Some(Ok(Message::Close(_))) => return None,
                    Some(Ok(Message::Text(text))) => {
                        let (rest, after) = ready_texts(ws, text.len());
                        let (_, stop) = writing_while(Box::pin(self.handle(text, rest)), &out, &mut kicked).await;
                        if let Some(stop) = stop {
                            return stopped(stop);
                        }
                        match after {
                            Some(after) => next = *after,
                            None => break,
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        self.error(ErrorCode::BadJson, "binary frames are not supported; send JSON text frames");
                        break;
                    }
                    Some(Ok(_)) => break, // ping/pong: tungstenite answers pings itself
                    Some(Err(WsError::Capacity(e))) => {
                        debug!(error = %e, "oversized frame");
                        self.state.metrics.oversized_frames.inc();
                        return Some((CLOSE_TOO_BIG, "message too big"));
                    }
                    Some(Err(e)) => {
                        debug!(error = %e, "read failed");
                        return None;
                    }
                }
            }
        }
    }

    /// `resume_grace` passed: rooms still holding release their frames as they are.
    fn end_grace(&mut self) {
        self.grace_until = None;
        for gate in self.rooms.values() {
            let mut g = gate.lock();
            if let Some(held) = g.held.take() {
                self.release_held(&mut g, held);
            }
        }
    }

    /// Sends held frames in order, skipping messages already sent.
    fn release_held(&self, g: &mut crate::hub::GateState, held: Vec<Utf8Bytes>) {
        for frame in held {
            if let Some(meta) = FrameMeta::parse(frame.as_str()) {
                if g.already_sent(&meta) {
                    self.state.metrics.duplicates_suppressed.inc();
                    continue;
                }
                g.note_sent(&meta);
            }
            self.member.offer_text(frame.as_str(), &self.state.metrics);
        }
    }

    /// Takes a token if the rate limit allows this frame.
    fn within_rate(&mut self) -> bool {
        let rate = self.state.cfg.rate_limit_per_sec;
        if rate == 0 {
            return true;
        }
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.tokens_at).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + refill).min(f64::from(self.state.cfg.rate_limit_burst));
        self.tokens_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Handles frames in order. Consecutive `message`s to one joined room are published
    /// together, in one backbone call; anything else is handled on its own, after them.
    async fn handle(&mut self, first: Utf8Bytes, rest: Vec<Utf8Bytes>) {
        let mut pending = Pending::default();
        for text in std::iter::once(first).chain(rest) {
            match self.decode(text.as_str()) {
                Ok(ClientMsg::Message { room, text }) if self.rooms.contains_key(&room) => {
                    if pending.room != room {
                        self.publish(&mut pending).await;
                        pending.room = room;
                    }
                    let prefix = self.message_head(&pending.room, &text).json_prefix();
                    pending.prefixes.push(prefix);
                }
                Ok(msg) => {
                    self.publish(&mut pending).await;
                    self.act(msg).await;
                }
                Err((code, message)) => {
                    self.publish(&mut pending).await;
                    self.error(code, &message);
                }
            }
        }
        self.publish(&mut pending).await;
    }

    /// Rate limit, then decoding.
    fn decode(&mut self, text: &str) -> Result<ClientMsg, (ErrorCode, String)> {
        if !self.within_rate() {
            let msg =
                format!("more than {} frames per second; this one was not acted on", self.state.cfg.rate_limit_per_sec);
            return Err((ErrorCode::RateLimited, msg));
        }
        wire::decode(text).map_err(|e| (e.code, e.message))
    }

    async fn act(&mut self, msg: ClientMsg) {
        match msg {
            ClientMsg::SetName { name } => {
                self.state.hub.set_user(self.conn, &name);
                self.name = Some(name);
                self.save_session("name set").await;
                let entry = self.presence_entry();
                let scopes = std::iter::once(Scope::Online).chain(self.rooms.keys().map(|r| Scope::Room(r)));
                for scope in scopes {
                    if let Err(e) = self.backbone().presence_rename(scope, self.conn, &entry).await {
                        debug!(error = %e, "could not rename presence");
                    }
                }
            }
            ClientMsg::Join { room } => self.join(room).await,
            ClientMsg::Leave { room } => self.leave(&room).await,
            // Messages to joined rooms never get here: `handle` gathers them.
            ClientMsg::Message { room, .. } => {
                self.error(ErrorCode::NotInRoom, &format!("join {room} before sending to it"))
            }
            ClientMsg::Resume { rooms } => {
                for (room, point) in rooms {
                    self.resume(&room, point).await;
                }
            }
            ClientMsg::Presence { room } => self.list_presence(Scope::Room(&room)).await,
            ClientMsg::Online => self.list_presence(Scope::Online).await,
        }
    }

    fn user_joined(&self, room: &str) -> String {
        Event::UserJoined { room, user: self.display(), id: &self.id, server: &self.state.cfg.name }.to_json()
    }

    fn user_left(&self, room: &str, reason: LeaveReason) -> String {
        Event::UserLeft { room, user: self.display(), id: &self.id, server: &self.state.cfg.name, reason }.to_json()
    }

    async fn join(&mut self, room: String) {
        if self.rooms.contains_key(&room) {
            // Already a member: confirm to this client alone, as the join would have.
            return self.send_text(self.user_joined(&room));
        }
        if self.rooms.len() >= self.state.cfg.max_rooms_per_client {
            let msg = format!("already in {} rooms, the most one client may join", self.rooms.len());
            return self.error(ErrorCode::InvalidRoom, &msg);
        }
        let gate = Gate::open();
        self.state.hub.add(&room, self.conn, self.member.clone(), Arc::clone(&gate));
        // The member is in the room before the subscription exists, so a concurrent release
        // by the last other member cannot drop the subscription under us.
        if let Err(e) = self.backbone().subscribe(&room).await {
            self.state.hub.remove(&room, self.conn);
            self.backbone().release(&room).await;
            return self.error(ErrorCode::BackboneUnavailable, &format!("cannot join {room}: {e}"));
        }
        self.rooms.insert(room.clone(), gate);
        self.save_session(&format!("joined {room}")).await;
        // Our own copy comes back through the subscription: it marks the join complete (and,
        // coming after the session write, durable).
        if let Some(direct) = self.enter_presence(&room).await {
            self.send_text(direct);
        }
    }

    async fn leave(&mut self, room: &str) {
        if self.rooms.remove(room).is_none() {
            return self.error(ErrorCode::NotInRoom, &format!("not in room {room}"));
        }
        self.state.hub.remove(room, self.conn);
        self.backbone().release(room).await;
        self.save_session(&format!("left {room}")).await;
        // The leaver is no longer a member, so it is told directly; everyone else hears it
        // through the backbone (once its id's last connection in the room is gone).
        self.send_text(self.user_left(room, LeaveReason::Left));
        self.leave_presence(room, LeaveReason::Left).await;
    }

    fn message_head<'a>(&'a self, room: &'a str, text: &'a str) -> MessageHead<'a> {
        MessageHead {
            kind: "message",
            room,
            from: self.display(),
            id: &self.id,
            text,
            server: &self.state.cfg.name,
            timestamp: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// Publishes the gathered messages, if any; each one not published is answered with an
    /// error of its own.
    async fn publish(&mut self, pending: &mut Pending) {
        if pending.prefixes.is_empty() {
            return;
        }
        let prefixes = std::mem::take(&mut pending.prefixes);
        let count = prefixes.len();
        self.state.metrics.publish_batches.inc();
        if let Err(Unpublished { published, error }) = self.backbone().publish_messages(&pending.room, prefixes).await {
            for _ in published..count {
                self.error(ErrorCode::BackboneUnavailable, &format!("message not sent: {error}"));
            }
        }
    }

    /// Replays `room` after `point`, then releases its live frames behind the replay.
    async fn resume(&mut self, room: &str, point: ResumePoint) {
        let Some(gate) = self.rooms.get(room).cloned() else {
            return self.error(ErrorCode::NotInRoom, &format!("cannot resume {room}: not in it"));
        };
        // Live frames wait while the log is read, so none can overtake the replay.
        gate.hold();
        let mut replay = match self.backbone().replay(room, point.seq).await {
            Ok(r) => r,
            Err(e) => return self.resume_failed(room, &gate, &e),
        };
        // A position in another epoch means nothing in this one: replay all that is logged.
        let epoch_changed = match (&point.epoch, &replay.epoch) {
            (Some(asked), Some(now)) => asked != now,
            _ => false,
        };
        let after = if epoch_changed { 0 } else { point.seq };
        if epoch_changed && point.seq > 0 {
            replay = match self.backbone().replay(room, 0).await {
                Ok(r) => r,
                Err(e) => return self.resume_failed(room, &gate, &e),
            };
        }
        let frames: Vec<&(u64, String)> = replay.frames.iter().filter(|(seq, _)| *seq > after).collect();
        let (from_seq, to_seq) = match (frames.first(), frames.last()) {
            (Some((first, _)), Some((last, _))) => (*first, *last),
            _ => (after + 1, after),
        };
        let complete = !epoch_changed
            && match frames.first() {
                Some((first, _)) => *first == after + 1,
                None => replay.head_seq <= after,
            };
        let mut g = gate.lock();
        // What this connection was already sent live (a client that joined, heard a live
        // message, then resumed) is not sent again: the range is covered, once.
        let epoch = replay.epoch.as_deref().unwrap_or_default();
        let mut replayed = 0u64;
        for (seq, frame) in &frames {
            if g.covers(epoch, *seq) {
                self.state.metrics.duplicates_suppressed.inc();
                continue;
            }
            self.member.offer_text(&wire::mark_replay(frame), &self.state.metrics);
            replayed += 1;
        }
        self.state.metrics.replayed_messages.inc_by(replayed);
        if replay.epoch.is_some() {
            g.note_replayed(epoch, after + 1, to_seq);
        }
        self.send(&Event::Resumed { room, from_seq, to_seq, epoch: replay.epoch.as_deref(), complete });
        if let Some(held) = g.held.take() {
            self.release_held(&mut g, held);
        }
        drop(g);
        self.end_grace_if_done();
    }

    /// The log could not be read: no `resumed` (it would claim a replay that did not
    /// happen), an error instead, and the room's live frames flow again.
    fn resume_failed(&mut self, room: &str, gate: &Gate, e: &crate::backbone::BackboneError) {
        self.error(ErrorCode::BackboneUnavailable, &format!("cannot resume {room}: {e}"));
        let mut g = gate.lock();
        if let Some(held) = g.held.take() {
            self.release_held(&mut g, held);
        }
        drop(g);
        self.end_grace_if_done();
    }

    fn end_grace_if_done(&mut self) {
        if self.rooms.values().all(|g| g.lock().held.is_none()) {
            self.grace_until = None;
        }
    }

    /// Leaves every room on disconnect and announces it. The session keeps the rooms: the
    /// client gets them back when it reconnects, to any node, within `session_ttl`.
    async fn leave_all(&mut self) {
        let rooms = std::mem::take(&mut self.rooms);
        for room in rooms.keys() {
            self.state.hub.remove(room, self.conn);
            self.backbone().release(room).await;
            self.leave_presence(room, LeaveReason::Disconnected).await;
        }
        if let Err(e) = self.backbone().presence_remove(Scope::Online, self.conn, &self.id, None).await {
            debug!(error = %e, "could not remove online presence");
        }
        // The expiry counts from the end of the last connection.
        let id: [Arc<str>; 1] = [Arc::from(self.id.as_str())];
        if let Err(e) = self.backbone().touch_sessions(&id).await {
            debug!(error = %e, "could not restart the session's expiry");
        }
    }
}

async fn sleep_until_or_never(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Consecutive messages of one client to one room, not yet published.
#[derive(Default)]
struct Pending {
    room: String,
    prefixes: Vec<String>,
}

/// Most frames handled together; and most bytes of them.
const GATHER_FRAMES: usize = 64;
const GATHER_BYTES: usize = 256 * 1024;

/// What reading a WebSocket yields: a frame, an error, or `None` at its end.
type Read = Option<Result<Message, WsError>>;

/// The text frames that have already arrived after one of `first_len` bytes, without waiting
/// (up to [`GATHER_FRAMES`] / [`GATHER_BYTES`]), and the first other item read, if any. That
/// one is boxed: it is kept while the texts are handled, and unboxed it would add the size of
/// a tungstenite error to every connection's task.
fn ready_texts(ws: &mut Ws, first_len: usize) -> (Vec<Utf8Bytes>, Option<Box<Read>>) {
    let mut texts = Vec::new();
    let mut bytes = first_len;
    while texts.len() + 1 < GATHER_FRAMES && bytes < GATHER_BYTES {
        match ws.next().now_or_never() {
            Some(Some(Ok(Message::Text(t)))) => {
                bytes += t.len();
                texts.push(t);
            }
            Some(other) => return (texts, Some(Box::new(other))),
            None => break,
        }
    }
    (texts, None)
}
