//! One client connection, from the first frame to cleanup.
//!
//! The connection task reads and handles client frames in order; a separate writer task owns
//! the socket's write half and drains the client's bounded send queue, so fan-out never
//! waits on this client and this client's reads never wait on its writes. The writer closes
//! with 1008 when the hub kicks a slow consumer, with 1012 on node shutdown and with 1009 on
//! an oversized frame; a peer that stopped reading gets at most [`CLOSE_DEADLINE`] to take
//! the close frame before its TCP connection is dropped.

use crate::backbone::Backbone;
use crate::hub::Member;
use crate::server::NodeState;
use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tether_proto::wire::{
    self, ClientMsg, ErrorCode, Event, LeaveReason, MessageHead, SessionKind, CLOSE_POLICY,
    CLOSE_RESTART, CLOSE_TOO_BIG,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, Instrument};

/// How long a closing peer gets to take its close frame before the socket is dropped.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(5);

/// Serves one upgraded connection until it ends; then leaves every room it was in.
pub async fn run<S>(ws: WebSocketStream<S>, client_id: String, peer: String, state: Arc<NodeState>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = state.hub.next_conn_id();
    let span = info_span!("client", id = %client_id, node = %state.cfg.name, peer = %peer, conn);
    async move {
        state.metrics.connections_active.inc();
        state.metrics.connections_total.inc();
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::channel(state.cfg.send_queue_len);
        let kick = CancellationToken::new();
        let (close_tx, close_rx) = oneshot::channel();
        let writer = tokio::spawn(write_loop(sink, rx, kick.clone(), close_rx).in_current_span());
        let mut client = Client {
            id: client_id,
            name: None,
            rooms: BTreeSet::new(),
            conn,
            member: Member { tx, kick },
            state: Arc::clone(&state),
        };
        client.send(&Event::Connected {
            server: &state.cfg.name,
            id: &client.id,
            session: SessionKind::New,
            name: None,
            rooms: Vec::new(),
        });
        let close = client.read_loop(stream).await;
        client.leave_all().await;
        if let Some(close) = close {
            let _ = close_tx.send(close);
        }
        drop(client);
        // The writer ends once the close frame is out, the peer is gone, or the deadline
        // passed; it never outlives CLOSE_DEADLINE by much.
        let _ = writer.await;
        state.metrics.connections_active.dec();
        debug!("connection closed");
    }
    .instrument(span)
    .await
}

/// Drains the send queue into the socket until the connection ends.
async fn write_loop<S>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    mut rx: mpsc::Receiver<Utf8Bytes>,
    kick: CancellationToken,
    mut close_rx: oneshot::Receiver<(u16, &'static str)>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let close = loop {
        tokio::select! {
            biased;
            _ = kick.cancelled() => break Some((CLOSE_POLICY, "slow consumer")),
            c = &mut close_rx => break c.ok(),
            frame = rx.recv() => {
                let Some(frame) = frame else { break None };
                let write = async {
                    sink.feed(Message::Text(frame)).await?;
                    // Batch whatever else is queued into the same flush.
                    while let Ok(more) = rx.try_recv() {
                        sink.feed(Message::Text(more)).await?;
                    }
                    sink.flush().await
                };
                tokio::select! {
                    r = write => if let Err(e) = r {
                        debug!(error = %e, "write failed");
                        return;
                    },
                    _ = kick.cancelled() => break Some((CLOSE_POLICY, "slow consumer")),
                }
            }
        }
    };
    match close {
        Some((code, reason)) => {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            };
            // A peer that stopped reading may never take this frame; it then loses its socket
            // when the deadline passes and `sink` is dropped.
            let _ =
                tokio::time::timeout(CLOSE_DEADLINE, sink.send(Message::Close(Some(frame)))).await;
        }
        // The peer closed or vanished: flush the close reply tungstenite queued, if any.
        None => {
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
        }
    }
}

/// The per-connection state the connection task owns.
struct Client {
    id: String,
    name: Option<String>,
    /// Rooms this connection is a member of (ordered, for stable `connected` lists later).
    rooms: BTreeSet<String>,
    conn: u64,
    /// This connection's handle as stored in the hub's rooms.
    member: Member,
    state: Arc<NodeState>,
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
        if self.member.tx.try_send(Utf8Bytes::from(json)).is_err()
            && !self.member.kick.is_cancelled()
        {
            self.state.metrics.slow_consumers.inc();
            self.member.kick.cancel();
        }
    }

    fn error(&self, code: ErrorCode, message: &str) {
        self.state
            .metrics
            .client_errors
            .get_or_create(&crate::metrics::CodeLabel {
                code: code.as_str(),
            })
            .inc();
        self.send(&Event::Error { code, message });
    }

    /// Handles frames until the connection should end; returns the close to send, if any.
    async fn read_loop<St>(&mut self, mut stream: St) -> Option<(u16, &'static str)>
    where
        St: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
    {
        let shutdown = self.state.shutdown.clone();
        let kick = self.member.kick.clone();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Some((CLOSE_RESTART, "node shutting down")),
                // The writer sends the 1008 itself.
                _ = kick.cancelled() => return None,
                next = stream.next() => next,
            };
            match next {
                None | Some(Ok(Message::Close(_))) => return None,
                Some(Ok(Message::Text(text))) => self.handle(text.as_str()).await,
                Some(Ok(Message::Binary(_))) => self.error(
                    ErrorCode::BadJson,
                    "binary frames are not supported; send JSON text frames",
                ),
                Some(Ok(_)) => {} // ping/pong: tungstenite answers pings itself
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

    async fn handle(&mut self, text: &str) {
        let msg = match wire::decode(text) {
            Ok(msg) => msg,
            Err(e) => return self.error(e.code, &e.message),
        };
        match msg {
            ClientMsg::SetName { name } => self.name = Some(name),
            ClientMsg::Join { room } => self.join(room).await,
            ClientMsg::Leave { room } => self.leave(&room).await,
            ClientMsg::Message { room, text } => self.message(&room, &text).await,
            ClientMsg::Resume { .. } => self.error(
                ErrorCode::UnknownType,
                "`resume` is not supported by this node yet",
            ),
            ClientMsg::Presence { .. } => self.error(
                ErrorCode::UnknownType,
                "`presence` is not supported by this node yet",
            ),
            ClientMsg::Online => self.error(
                ErrorCode::UnknownType,
                "`online` is not supported by this node yet",
            ),
        }
    }

    fn user_joined(&self, room: &str) -> String {
        Event::UserJoined {
            room,
            user: self.display(),
            id: &self.id,
            server: &self.state.cfg.name,
        }
        .to_json()
    }

    fn user_left(&self, room: &str, reason: LeaveReason) -> String {
        Event::UserLeft {
            room,
            user: self.display(),
            id: &self.id,
            server: &self.state.cfg.name,
            reason,
        }
        .to_json()
    }

    async fn join(&mut self, room: String) {
        if self.rooms.contains(&room) {
            // Already a member: confirm to this client alone, as the join would have.
            return self.send_text(self.user_joined(&room));
        }
        if self.rooms.len() >= self.state.cfg.max_rooms_per_client {
            let msg = format!(
                "already in {} rooms, the most one client may join",
                self.rooms.len()
            );
            return self.error(ErrorCode::InvalidRoom, &msg);
        }
        self.state.hub.add(&room, self.conn, self.member.clone());
        // The member is in the room before the subscription exists, so a concurrent release
        // by the last other member cannot drop the subscription under us.
        if let Err(e) = self.backbone().subscribe(&room).await {
            self.state.hub.remove(&room, self.conn);
            self.backbone().release(&room).await;
            return self.error(
                ErrorCode::BackboneUnavailable,
                &format!("cannot join {room}: {e}"),
            );
        }
        self.rooms.insert(room.clone());
        // Our own copy comes back through the subscription: it marks the join complete.
        if let Err(e) = self
            .backbone()
            .publish_event(&room, self.user_joined(&room))
            .await
        {
            self.error(
                ErrorCode::BackboneUnavailable,
                &format!("joined {room}, but could not announce it: {e}"),
            );
        }
    }

    async fn leave(&mut self, room: &str) {
        if !self.rooms.remove(room) {
            return self.error(ErrorCode::NotInRoom, &format!("not in room {room}"));
        }
        self.state.hub.remove(room, self.conn);
        self.backbone().release(room).await;
        // The leaver is no longer a member, so it is told directly; everyone else hears it
        // through the backbone.
        let left = self.user_left(room, LeaveReason::Left);
        self.send_text(left.clone());
        if let Err(e) = self.backbone().publish_event(room, left).await {
            debug!(room, error = %e, "could not announce a leave");
        }
    }

    async fn message(&mut self, room: &str, text: &str) {
        if !self.rooms.contains(room) {
            return self.error(
                ErrorCode::NotInRoom,
                &format!("join {room} before sending to it"),
            );
        }
        let head = MessageHead {
            kind: "message",
            room,
            from: self.display(),
            id: &self.id,
            text,
            server: &self.state.cfg.name,
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        if let Err(e) = self
            .backbone()
            .publish_message(room, head.json_prefix())
            .await
        {
            self.error(
                ErrorCode::BackboneUnavailable,
                &format!("message not sent: {e}"),
            );
        }
    }

    /// Leaves every room on disconnect and announces it.
    async fn leave_all(&mut self) {
        let rooms = std::mem::take(&mut self.rooms);
        for room in rooms {
            self.state.hub.remove(&room, self.conn);
            self.backbone().release(&room).await;
            if let Err(e) = self
                .backbone()
                .publish_event(&room, self.user_left(&room, LeaveReason::Disconnected))
                .await
            {
                debug!(room, error = %e, "could not announce a disconnect");
            }
        }
    }
}
