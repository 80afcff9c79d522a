//! What the connection task does with each node frame: the handshake's `connected`, the
//! re-sync (own joins, the `resume`, held live frames) and, once ready, delivery through each
//! room's tracker. Frames are decoded by [`decode_node_frame`] and requests built as
//! [`ClientMsg`]s: the wire itself lives in `tether_proto::wire`.

use super::{Conn, Driver, Ended, Ws, HOLD_LIMIT};
use crate::error::Error;
use crate::event::{Event, LeaveReason, Message, Session};
use crate::order::Verdict;
use crate::shared::Status;
use crate::stats::bump;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use tether_proto::id::validate_client_id;
use tether_proto::wire::{decode_node_frame, ClientMsg, NodeFrame, NodeFrameError, ResumePoint};
use tokio::time::Instant;
use tracing::{debug, info, warn};

impl Driver {
    pub(super) async fn on_text(&mut self, text: &str, ws: &mut Ws, conn: &mut Conn) -> Result<(), Ended> {
        let frame = match decode_node_frame(text) {
            Ok(f) => f,
            Err(NodeFrameError::Unknown(v)) => {
                bump(&self.shared.stats.unknown_frames);
                debug!(frame = %v, "unknown frame type");
                self.out.push(Event::Unknown(v));
                return Ok(());
            }
            Err(NodeFrameError::Malformed(v, why)) => {
                bump(&self.shared.stats.malformed_frames);
                warn!(%why, frame = %v, "malformed frame from the node");
                self.out.push(Event::Unknown(v));
                return Ok(());
            }
            Err(NodeFrameError::Invalid(why)) => {
                bump(&self.shared.stats.invalid_frames);
                let shown: String = text.chars().take(200).collect();
                warn!(%why, frame = %shown, "invalid frame from the node ignored");
                return Ok(());
            }
        };
        if conn.server.is_none() {
            return match frame {
                NodeFrame::Connected { server, id, session, rooms, name } => {
                    self.on_connected(ws, conn, server, id, session, rooms, name).await
                }
                _ => Err(self.lost(conn, None, "protocol: the first frame was not `connected`".into())),
            };
        }
        match frame {
            NodeFrame::Connected { .. } => {
                bump(&self.shared.stats.malformed_frames);
                warn!("second `connected` frame on one connection ignored");
            }
            NodeFrame::Message(m) => return self.on_message(m, conn),
            NodeFrame::UserJoined { room, user, id, server, head_seq, epoch } => {
                let own = self.id.as_deref() == Some(id.as_str());
                let room_name = room.clone();
                let start = head_seq.map(|seq| (epoch.clone(), seq));
                self.out.push(Event::UserJoined { room, user, id, server, head_seq, epoch });
                if own {
                    self.on_own_join(&room_name, start, ws, conn).await?;
                }
            }
            NodeFrame::UserLeft { room, user, id, server, reason } => {
                self.out.push(Event::UserLeft { room, user, id, server, reason: LeaveReason::from(reason) });
            }
            NodeFrame::Resumed { room, from_seq, to_seq, complete, epoch } => {
                self.on_resumed(room, from_seq, to_seq, complete, epoch, conn)
            }
            NodeFrame::Presence { room, users } => {
                self.out.push(Event::Presence { room, users });
            }
            NodeFrame::Online { users } => {
                self.out.push(Event::Online { users });
            }
            NodeFrame::Error { code, message, .. } => return self.on_error(code, message, conn),
            NodeFrame::Duplicate { room, msg_id, seq, epoch } => {
                if self.pending.confirm(&msg_id) {
                    bump(&self.shared.stats.confirmed_by_duplicate);
                    self.pending_changed();
                    debug!(%room, %msg_id, seq, "resend answered duplicate: it had been published");
                }
                self.out.push(Event::Duplicate { room, msg_id, seq, epoch });
            }
            // This library does not refresh tokens; a node answers only a client that did.
            NodeFrame::Refreshed { .. } => {}
            // A balancer in rehome mode moved this connection to another node and resumed its
            // rooms itself: nothing for the library to redo, only the server's name changes.
            NodeFrame::Rehomed { from, server, rooms } => {
                info!(%from, %server, rooms = rooms.len(), "the balancer moved this connection to another node");
                conn.server = Some(server);
            }
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
                    self.write(ws, conn, &ClientMsg::SetName { name: ours }).await?;
                }
            }
            // The restored session remembers a name we were not configured with: keep it.
            (None, Some(theirs)) if session == Session::Restored => self.set_name_locally(theirs),
            (None, _) => {}
        }
        for room in restored.iter().filter(|r| !self.rooms.contains_key(*r)) {
            debug!(%room, "leaving a restored room the app left");
            self.write(ws, conn, &ClientMsg::Leave { room: room.clone() }).await?;
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
            self.write(ws, conn, &ClientMsg::Join { room: room.clone() }).await?;
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
    pub(super) async fn after_rejoin(&mut self, ws: &mut Ws, conn: &mut Conn) -> Result<(), Ended> {
        if conn.rejoining.is_empty() && !conn.resume_done && conn.server.is_some() {
            self.send_resume(ws, conn).await?;
        }
        Ok(())
    }

    /// One `resume` with the position of every held room. Sent even when empty for a
    /// restored session (its node waits for it).
    async fn send_resume(&mut self, ws: &mut Ws, conn: &mut Conn) -> Result<(), Ended> {
        let mut rooms = Vec::new();
        for (name, room) in &self.rooms {
            if let (Some(_), Some((epoch, seq))) = (&room.hold, room.tracker.resume_point()) {
                // Without an epoch (anchored before the room had a log): everything it
                // logged since.
                rooms.push((name.clone(), ResumePoint { seq, epoch: epoch.map(String::from) }));
            }
        }
        conn.resume_done = true;
        if rooms.is_empty() && !conn.resume_always {
            return Ok(());
        }
        debug!(rooms = rooms.len(), "resuming");
        self.write(ws, conn, &ClientMsg::Resume { rooms }).await
    }

    /// Marks the connection ready once nothing is left to re-join or replay.
    pub(super) fn check_ready(&mut self, conn: &mut Conn) {
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
        // Our own message back, live or replayed, held or not: it was published.
        if let Some(msg_id) = m.msg_id.as_deref().filter(|_| self.id.as_deref() == Some(m.id.as_str())) {
            if self.pending.confirm(msg_id) {
                bump(&self.shared.stats.confirmed_by_echo);
                self.pending_changed();
            }
        }
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

    fn on_error(&mut self, code: String, message: String, conn: &mut Conn) -> Result<(), Ended> {
        self.out.push(Event::Error { code: code.clone(), message: message.clone() });
        if !conn.ready() {
            // During re-sync every request is ours; one that failed leaves the session
            // half-restored. Start over (with backoff) rather than serve it that way.
            return Err(self.lost(conn, None, format!("re-sync refused: {code}: {message}")));
        }
        if code == "backbone_unavailable" && self.pending.len() > 0 && conn.retry_at.is_none() {
            // Some message (or a join) was refused unpublished; which one, the protocol does
            // not say. Resending every unconfirmed one is safe — the node publishes a
            // `msg_id` once — so do that after a pause rather than wait for a reconnect.
            conn.retry_at = Some(Instant::now() + self.cfg.backoff_min);
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
