//! The per-client state machine: a client's name, rooms with their gates, rate limit and
//! resume grace, and what each input does to them.
//!
//! Inputs: the stored session (or the failure to load it) at the start ([`Client::begin`]), a
//! batch of consecutive text frames ([`Client::handle`]), a binary frame, an oversized one, the
//! resume grace's deadline passing ([`Client::end_grace`]), a kick ([`Client::kicked`]) and the
//! end ([`Client::disconnect`]). Outputs: frames for the client, in its [`Outbox`]; backbone
//! calls, awaited; and the close to send, where an input ends the connection. The time an
//! input happens at is passed in ([`Now`]): nothing here reads a clock or touches a socket, so
//! a `Client` over an outbox without a socket and the `none` backbone is tested as it is.

use super::access::Access;
use crate::auth::Grant;
use crate::backbone::{Backbone, BackboneError};
use crate::backbone::{PresenceChange, PresenceEntry, Scope, Seat, SessionRecord, Unpublished};
use crate::hub::{ConnCommand, Gate, GateState, Member, CONN_COMMANDS};
use crate::outbox::Outbox;
use crate::state::NodeState;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use tether_proto::wire::{
    self, ClientMsg, ClientPeek, ErrorCode, Event, LeaveReason, MessageHead, MessageMeta, ResumePoint, SessionKind,
    CLOSE_POLICY, CLOSE_RESTART, CLOSE_TOKEN_EXPIRED, CLOSE_TOO_BIG,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// The close frame the node ends a connection with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    /// Ours are constants; the server API's `disconnect` brings its own.
    pub reason: Cow<'static, str>,
}

impl Close {
    /// The hub found the client too slow (see [`crate::outbox`]).
    pub const SLOW_CONSUMER: Self = Self { code: CLOSE_POLICY, reason: Cow::Borrowed("slow consumer") };
    /// The node is shutting down: reconnect (to another node).
    pub const SHUTDOWN: Self = Self { code: CLOSE_RESTART, reason: Cow::Borrowed("node shutting down") };
    /// A frame over `max_message_bytes`.
    pub const TOO_BIG: Self = Self { code: CLOSE_TOO_BIG, reason: Cow::Borrowed("message too big") };
    /// The connection's token expired without a `refresh`.
    pub const TOKEN_EXPIRED: Self = Self { code: CLOSE_TOKEN_EXPIRED, reason: Cow::Borrowed("token expired") };
}

/// When an input is handled, as read by the connection's task.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// For the rate limit.
    pub at: Instant,
    /// Milliseconds since the Unix epoch: the `timestamp` of the messages sent.
    pub unix_ms: u64,
}

/// Token bucket of the optional rate limit: tokens left, and when they were counted.
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// Takes a token if `rate` per second (0: no limit) with bursts of `burst` allows one at
    /// `now`.
    fn take(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        if rate == 0 {
            return true;
        }
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + refill).min(f64::from(burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One client's state on this node, owned by its connection's task.
pub struct Client {
    id: String,
    name: Option<String>,
    /// Rooms this connection is a member of, with their delivery gates.
    rooms: BTreeMap<String, Arc<Gate>>,
    conn: u64,
    /// This connection's handle as stored in the hub's rooms.
    member: Member,
    state: Arc<NodeState>,
    /// While restored rooms hold frames waiting for `resume`: when to stop waiting.
    grace_until: Option<Instant>,
    rate: TokenBucket,
    /// What the server API asks of this connection, until its task takes the receiver
    /// ([`Client::take_commands`]).
    commands: Option<mpsc::Receiver<ConnCommand>>,
    /// What the connection's token allows, and its expiry (none without a token).
    access: Access,
}

impl Client {
    /// A client `id` on connection `conn` of this node, answering through `out`; registered
    /// with the hub at once (session refresh and presence see it from now on). `now` starts
    /// the rate limit's clock.
    pub fn new(id: String, conn: u64, out: Arc<Outbox>, state: Arc<NodeState>, now: Instant) -> Self {
        let (tx, rx) = mpsc::channel(CONN_COMMANDS);
        state.hub.register(conn, Arc::from(id.as_str()), Some(tx));
        Self {
            commands: Some(rx),
            id,
            name: None,
            rooms: BTreeMap::new(),
            conn,
            // A child of the node's shutdown: one wait covers both reasons to stop writing.
            member: Member { out, kick: state.shutdown.child_token() },
            grace_until: None,
            rate: TokenBucket { tokens: f64::from(state.cfg.rate_limit_burst), at: now },
            access: Access::default(),
            state,
        }
    }

    /// The receiving end of this connection's commands (see [`ConnCommand`]), for its task;
    /// `None` once taken.
    pub fn take_commands(&mut self) -> Option<mpsc::Receiver<ConnCommand>> {
        self.commands.take()
    }

    /// Acts on a command of the server API: the close to send when it ends the connection.
    pub async fn command(&mut self, command: ConnCommand) -> Option<Close> {
        match command {
            ConnCommand::Close { code, reason } => Some(Close { code, reason: Cow::Owned(reason) }),
            ConnCommand::Unsubscribe { room } => {
                self.remove_from(&room).await;
                None
            }
        }
    }

    /// Where this client's frames wait for its socket.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.member.out
    }

    /// Cancelled when the hub kicks this client as a slow consumer, or the node shuts down.
    pub fn kick(&self) -> &CancellationToken {
        &self.member.kick
    }

    /// When the rooms still holding for a `resume` are to be released as they are
    /// ([`Client::end_grace`]); `None` when none holds.
    pub fn grace_deadline(&self) -> Option<Instant> {
        self.grace_until
    }

    /// Applies the verified token the connection was admitted with, read at `now`: its name
    /// becomes the display name (over a stored one), its rooms bound every join, its expiry
    /// is the [`token_deadline`](Client::token_deadline). Called before [`start`](Client::start).
    pub fn authorize(&mut self, grant: Grant, now: Now) {
        if let Some(name) = &grant.name {
            self.state.hub.set_user(self.conn, name);
            self.name = Some(name.clone());
        }
        self.access.set(grant, now);
    }

    /// When the token runs out (`exp` + leeway): the connection is then closed 4001.
    pub fn token_deadline(&self) -> Option<Instant> {
        self.access.deadline()
    }

    /// The token's deadline passed without a `refresh`.
    pub fn expired(&self) -> Close {
        self.state.metrics.client_errors.get_or_create(&crate::metrics::CodeLabel { code: "token_expired" }).inc();
        Close::TOKEN_EXPIRED
    }

    /// A `refresh`: a token that verifies and names this client replaces the old one (its
    /// expiry and rooms apply from now; rooms already joined are kept), answered `refreshed`;
    /// anything else is `unauthorized` and the old token stands.
    fn refresh(&mut self, token: &str, now: Now) {
        let Some(verifier) = self.state.cfg.auth.clone() else {
            return self.error(ErrorCode::Unauthorized, "this node does not verify tokens");
        };
        match verifier.verify(token) {
            Ok(grant) if grant.sub != self.id => {
                let msg = format!("the token is for {:?}, not for this connection's {:?}", grant.sub, self.id);
                self.error(ErrorCode::Unauthorized, &msg)
            }
            Ok(grant) => {
                let exp = grant.exp;
                self.access.set(grant, now);
                self.send(&Event::Refreshed { exp });
            }
            Err(e) => self.error(ErrorCode::Unauthorized, &format!("refresh refused ({e}); the current token stands")),
        }
    }

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
        self.refuse(code, message, None);
    }

    /// An error about a `message` that carried `msg_id`: named in the frame, so that a
    /// resending client (or a re-homing balancer) knows that message is settled.
    fn refuse(&self, code: ErrorCode, message: &str, msg_id: Option<&str>) {
        self.state.metrics.client_errors.get_or_create(&crate::metrics::CodeLabel { code: code.as_str() }).inc();
        self.send(&Event::Error { code, message, msg_id });
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

    /// Loads the client's session from the backbone and [`begin`](Client::begin)s with it.
    pub async fn start(&mut self, now: Instant) {
        let loaded = self.backbone().load_session(&self.id).await;
        self.begin(loaded, now).await;
    }

    /// Starts from what loading the session gave: re-joins its rooms (holding their frames
    /// until `resume`, or `resume_grace` after `now`) and sends `connected`.
    pub async fn begin(&mut self, loaded: Result<Option<SessionRecord>, BackboneError>, now: Instant) {
        let (stored, load_error) = match loaded {
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
                name: self.name.as_deref(),
                rooms: Vec::new(),
            });
            if let Some(e) = load_error {
                self.error(ErrorCode::BackboneUnavailable, &format!("session could not be loaded: {e}"));
            }
            return;
        };
        self.state.metrics.sessions_restored.inc();
        // A token's name wins over the stored one.
        if self.access.name().is_none() {
            self.name = stored.name;
        }
        if let Some(name) = &self.name {
            self.state.hub.set_user(self.conn, name);
        }
        let mut failed = Vec::new();
        for room in stored.rooms.into_iter().take(self.state.cfg.max_rooms_per_client) {
            // Rooms the token does not allow are not re-joined (they leave the session the
            // next time it is written).
            if wire::validate_room(&room).is_err() || self.rooms.contains_key(&room) || !self.access.allows(&room) {
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
            self.grace_until = Some(now + self.state.cfg.resume_grace);
        }
    }

    fn presence_entry(&self) -> PresenceEntry {
        PresenceEntry { id: self.id.clone(), user: self.display().to_string(), server: self.state.cfg.name.clone() }
    }

    async fn go_online(&self) {
        if let Err(e) = self.backbone().presence_add(Seat::online(self.conn), &self.presence_entry(), None).await {
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
        match self.backbone().presence_add(Seat::room(room, self.conn), &self.presence_entry(), Some(joined)).await {
            Ok((PresenceChange::FirstOrLast, _)) => None,
            Ok((_, event)) => Some(event.unwrap_or_else(|| self.user_joined(room))),
            Err(e) => {
                let message = format!("joined {room}, but could not announce it: {e}");
                self.state
                    .metrics
                    .client_errors
                    .get_or_create(&crate::metrics::CodeLabel { code: "backbone_unavailable" })
                    .inc();
                Some(Event::Error { code: ErrorCode::BackboneUnavailable, message: &message, msg_id: None }.to_json())
            }
        }
    }

    /// Removes this connection from `room`'s presence; the id's last connection there
    /// announces `user_left` with `reason`.
    async fn leave_presence(&self, room: &str, reason: LeaveReason) {
        let left = self.user_left(room, reason);
        if let Err(e) = self.backbone().presence_remove(Seat::room(room, self.conn), &self.id, Some(left)).await {
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

    /// A binary frame: answered `bad_json`, nothing else happens.
    pub fn refuse_binary(&self) {
        self.error(ErrorCode::BadJson, "binary frames are not supported; send JSON text frames");
    }

    /// A frame over `max_message_bytes` arrived: the connection ends with 1009.
    pub fn oversized(&self) -> Close {
        self.state.metrics.oversized_frames.inc();
        Close::TOO_BIG
    }

    /// The kick token was cancelled: by the hub for a slow consumer (1008) or by the node's
    /// shutdown (1012), told apart by the shutdown token.
    pub fn kicked(&self) -> Close {
        if self.state.shutdown.is_cancelled() {
            Close::SHUTDOWN
        } else {
            Close::SLOW_CONSUMER
        }
    }

    /// `resume_grace` passed: rooms still holding release their frames as they are.
    pub fn end_grace(&mut self) {
        self.grace_until = None;
        for gate in self.rooms.values() {
            let mut g = gate.lock();
            if let Some(held) = g.held.take() {
                self.release_held(&mut g, held);
            }
        }
    }

    /// Sends held frames in order, skipping messages already sent.
    fn release_held(&self, g: &mut GateState, held: Vec<Utf8Bytes>) {
        for frame in held {
            if let Some(meta) = MessageMeta::read(frame.as_str()) {
                if g.already_sent(&meta) {
                    self.state.metrics.duplicates_suppressed.inc();
                    continue;
                }
                g.note_sent(&meta);
            }
            self.member.offer_text(frame.as_str(), &self.state.metrics);
        }
    }

    /// Handles consecutive text frames, read at `now`, in order. Consecutive `message`s to
    /// one joined room are published together, in one backbone call; anything else is
    /// handled on its own, after them.
    pub async fn handle(&mut self, first: Utf8Bytes, rest: Vec<Utf8Bytes>, now: Now) {
        let mut pending = Pending::default();
        for text in std::iter::once(first).chain(rest) {
            match self.decode(text.as_str(), now.at) {
                Ok(ClientMsg::Message { room, text, data, msg_id }) if self.rooms.contains_key(&room) => {
                    // A batch is one room's, and all with `msg_id`s or all without.
                    let keyed = msg_id.is_some();
                    if pending.room != room || pending.keyed != keyed {
                        self.publish(&mut pending).await;
                        pending.room = room;
                        pending.keyed = keyed;
                    }
                    let body = Body { text: &text, data: data.as_deref(), msg_id: msg_id.as_deref() };
                    let prefix = self.message_head(&pending.room, body, now.unix_ms).json_prefix();
                    pending.prefixes.push(prefix);
                    pending.msg_ids.extend(msg_id);
                }
                Ok(msg) => {
                    self.publish(&mut pending).await;
                    self.act(msg, now).await;
                }
                Err((code, message)) => {
                    self.publish(&mut pending).await;
                    let peek = ClientPeek::read(text.as_str());
                    self.refuse(code, &message, peek.as_ref().and_then(ClientPeek::message_msg_id));
                }
            }
        }
        self.publish(&mut pending).await;
    }

    /// Rate limit, then decoding.
    fn decode(&mut self, text: &str, now: Instant) -> Result<ClientMsg, (ErrorCode, String)> {
        let (rate, burst) = (self.state.cfg.rate_limit_per_sec, self.state.cfg.rate_limit_burst);
        if !self.rate.take(now, rate, burst) {
            let msg =
                format!("more than {} frames per second; this one was not acted on", self.state.cfg.rate_limit_per_sec);
            return Err((ErrorCode::RateLimited, msg));
        }
        wire::decode(text).map_err(|e| (e.code, e.message))
    }

    async fn act(&mut self, msg: ClientMsg, now: Now) {
        match msg {
            ClientMsg::SetName { .. } if self.access.name().is_some() => {
                self.error(ErrorCode::Forbidden, "the display name comes from your token")
            }
            ClientMsg::SetName { name } => {
                self.state.hub.set_user(self.conn, &name);
                self.name = Some(name);
                self.save_session("name set").await;
                let entry = self.presence_entry();
                let scopes = std::iter::once(Scope::Online).chain(self.rooms.keys().map(|r| Scope::Room(r)));
                for scope in scopes {
                    if let Err(e) = self.backbone().presence_rename(Seat { scope, conn: self.conn }, &entry).await {
                        debug!(error = %e, "could not rename presence");
                    }
                }
            }
            ClientMsg::Join { room } => self.join(room).await,
            ClientMsg::Leave { room } => self.leave(&room).await,
            // Messages to joined rooms never get here: `handle` gathers them.
            ClientMsg::Message { room, msg_id, .. } => {
                self.refuse(ErrorCode::NotInRoom, &format!("join {room} before sending to it"), msg_id.as_deref())
            }
            ClientMsg::Resume { rooms } => {
                for (room, point) in rooms {
                    self.resume(&room, point).await;
                }
            }
            ClientMsg::Presence { room } if !self.access.allows(&room) => {
                self.error(ErrorCode::Forbidden, &format!("your token does not allow room {room}"))
            }
            ClientMsg::Presence { room } => self.list_presence(Scope::Room(&room)).await,
            ClientMsg::Refresh { token } => self.refresh(&token, now),
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
        if !self.access.allows(&room) {
            return self.error(ErrorCode::Forbidden, &format!("your token does not allow room {room}"));
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
        if !self.rooms.contains_key(room) {
            return self.error(ErrorCode::NotInRoom, &format!("not in room {room}"));
        }
        self.leave_for(room, LeaveReason::Left).await;
    }

    /// The server API took this client out of `room` (nothing happens if it is not in it):
    /// a leave with reason `removed`, the session losing the room.
    async fn remove_from(&mut self, room: &str) {
        if self.rooms.contains_key(room) {
            self.leave_for(room, LeaveReason::Removed).await;
        }
    }

    async fn leave_for(&mut self, room: &str, reason: LeaveReason) {
        self.rooms.remove(room);
        self.state.hub.remove(room, self.conn);
        self.backbone().release(room).await;
        self.save_session(&format!("left {room}")).await;
        // The leaver is no longer a member, so it is told directly; everyone else hears it
        // through the backbone (once its id's last connection in the room is gone).
        self.send_text(self.user_left(room, reason));
        self.leave_presence(room, reason).await;
    }

    fn message_head<'a>(&'a self, room: &'a str, body: Body<'a>, unix_ms: u64) -> MessageHead<'a> {
        MessageHead {
            kind: "message",
            room,
            from: self.display(),
            id: &self.id,
            text: body.text,
            server: &self.state.cfg.name,
            timestamp: unix_ms,
            data: body.data,
            msg_id: body.msg_id,
        }
    }

    /// Publishes the gathered messages, if any; each one not published is answered with an
    /// error of its own. Messages with a `msg_id` are published once per `(client, msg_id)`
    /// within `idempotency_ttl` (a resend after a reconnect, perhaps to another node, is not
    /// published again): the sender alone is told which message a repeat was.
    async fn publish(&mut self, pending: &mut Pending) {
        if pending.prefixes.is_empty() {
            return;
        }
        let prefixes = std::mem::take(&mut pending.prefixes);
        let count = prefixes.len();
        self.state.metrics.publish_batches.inc();
        if !pending.keyed {
            if let Err(Unpublished { published, error }) =
                self.backbone().publish_messages(&pending.room, prefixes).await
            {
                for _ in published..count {
                    self.error(ErrorCode::BackboneUnavailable, &format!("message not sent: {error}"));
                }
            }
            return;
        }
        let msg_ids = std::mem::take(&mut pending.msg_ids);
        let keyed = prefixes.into_iter().zip(msg_ids.iter().map(|m| format!("c:{}:{m}", self.id))).collect();
        let room = pending.room.as_str();
        match self.backbone().publish_keyed(room, keyed).await {
            Ok(answers) => {
                for (p, msg_id) in answers.iter().zip(&msg_ids) {
                    if p.duplicate {
                        self.state.metrics.duplicates_suppressed.inc();
                        self.send(&Event::Duplicate { room, msg_id, seq: p.seq, epoch: &p.epoch });
                    }
                }
            }
            Err(Unpublished { published, error }) => {
                for msg_id in msg_ids.iter().skip(published) {
                    let message = format!("message {msg_id:?} not sent: {error}");
                    self.refuse(ErrorCode::BackboneUnavailable, &message, Some(msg_id));
                }
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
        // A log kept across a new epoch (a Redis Cluster failover: seqs go on, the log stays)
        // still holds the asked epoch's frames: those after the position are new to the
        // client, those up to it are not. A log started again holds none of them.
        let asked = point.epoch.as_deref().filter(|_| epoch_changed);
        let frames: Vec<&(u64, String)> = replay
            .frames
            .iter()
            .filter(|(seq, frame)| match (asked, MessageMeta::read(frame)) {
                (Some(asked), Some(meta)) if meta.epoch == asked => meta.seq > point.seq,
                _ => *seq > after,
            })
            .collect();
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
            let own = MessageMeta::read(frame).map_or(epoch, |m| m.epoch);
            if g.covers(own, *seq) {
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
    fn resume_failed(&mut self, room: &str, gate: &Gate, e: &BackboneError) {
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

    /// The connection ended: leaves every room and announces it, and unregisters from the
    /// hub. The session keeps the rooms: the client gets them back when it reconnects, to any
    /// node, within `session_ttl`.
    pub async fn disconnect(&mut self) {
        let rooms = std::mem::take(&mut self.rooms);
        for room in rooms.keys() {
            self.state.hub.remove(room, self.conn);
            self.backbone().release(room).await;
            self.leave_presence(room, LeaveReason::Disconnected).await;
        }
        // The expiry counts from the end of the last connection. Touched before the online
        // entry goes: the server API's `disconnect` with `forget` deletes the session once
        // presence lists no connection, and a touch after that (a read and a write back, on
        // some backbones) would bring the session back.
        let id: [Arc<str>; 1] = [Arc::from(self.id.as_str())];
        if let Err(e) = self.backbone().touch_sessions(&id).await {
            debug!(error = %e, "could not restart the session's expiry");
        }
        if let Err(e) = self.backbone().presence_remove(Seat::online(self.conn), &self.id, None).await {
            debug!(error = %e, "could not remove online presence");
        }
        self.state.hub.unregister(self.conn);
    }
}

/// What a client's `message` says, besides its room.
#[derive(Clone, Copy)]
struct Body<'a> {
    text: &'a str,
    data: Option<&'a serde_json::value::RawValue>,
    msg_id: Option<&'a str>,
}

/// Consecutive messages of one client to one room, not yet published: all with a `msg_id`
/// (`keyed`, one id per prefix) or all without.
#[derive(Default)]
struct Pending {
    room: String,
    keyed: bool,
    prefixes: Vec<String>,
    msg_ids: Vec<String>,
}
