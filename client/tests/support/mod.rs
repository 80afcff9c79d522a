//! A scripted stand-in for a Tether node, plus helpers to drive a client against it.
//!
//! [`MockNode`] listens on `127.0.0.1:0` and hands every upgraded connection to the test as
//! a [`MockConn`]; the test plays the node's side frame by frame (`connected`, replays,
//! `resumed`, live frames, duplicates, gaps, drops, close codes) and reads what the client
//! sent. Every wait has a deadline; nothing sleeps.
#![allow(dead_code)] // each test binary uses a different part

pub mod cut;

use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tether_client::{Client, ClientConfig, Event, Session};
use tether_proto::wire::{decode, ClientMsg, NodeFrame, ResumePoint, RoomMessage, SessionKind};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

/// Longest wait for anything. With a paused clock this is virtual time, and generous on
/// purpose: the clock only jumps to it when nothing else is pending.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// A node that accepts WebSocket upgrades and queues them for the test.
pub struct MockNode {
    pub url: String,
    conns: mpsc::UnboundedReceiver<MockConn>,
}

impl MockNode {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, conns) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let mut uri = String::new();
                // The callback's signature is tungstenite's, large error type included.
                #[allow(clippy::result_large_err)]
                let ws = tokio_tungstenite::accept_hdr_async(stream, |req: &Request, resp: Response| {
                    uri = req.uri().to_string();
                    Ok(resp)
                })
                .await;
                let Ok(ws) = ws else { continue };
                let client = uri
                    .split_once('?')
                    .and_then(|(_, q)| q.split('&').find_map(|p| p.strip_prefix("client=").map(str::to_string)));
                if tx.send(MockConn { ws, uri, client }).is_err() {
                    return;
                }
            }
        });
        Self { url: format!("ws://{addr}/ws"), conns }
    }

    /// The next connection the client made.
    pub async fn accept(&mut self) -> MockConn {
        tokio::time::timeout(DEADLINE, self.conns.recv())
            .await
            .expect("no connection from the client before the deadline")
            .expect("accept loop ended")
    }
}

/// The node's side of one client connection.
pub struct MockConn {
    ws: WebSocketStream<TcpStream>,
    /// The request target, e.g. `/ws?client=c1`.
    pub uri: String,
    /// The `client` query parameter, if any.
    pub client: Option<String>,
}

impl MockConn {
    pub async fn send(&mut self, frame: NodeFrame) {
        self.send_raw(&frame.to_json()).await;
    }

    /// Sends text as it is: for frames no node would build (malformed, unknown types).
    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(WsMessage::text(text.to_string())).await.expect("mock send");
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.ws.send(WsMessage::Binary(bytes.to_vec().into())).await.expect("mock send");
    }

    /// The next frame the client sent, decoded as the node decodes it.
    pub async fn recv(&mut self) -> ClientMsg {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("no frame from the client before the deadline");
            match msg {
                Some(Ok(WsMessage::Text(t))) => {
                    return decode(t.as_str()).unwrap_or_else(|e| panic!("the client sent {t}: {e}"))
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                other => panic!("expected a text frame from the client, got {other:?}"),
            }
        }
    }

    /// The next frame, which must be a `message`: the frame without its `msg_id`, and the
    /// `msg_id` (every message the library sends has one).
    pub async fn recv_message(&mut self) -> (ClientMsg, String) {
        match self.recv().await {
            ClientMsg::Message { room, text, data, msg_id: Some(id) } => {
                (ClientMsg::Message { room, text, data, msg_id: None }, id)
            }
            other => panic!("expected a message with a msg_id, got {other:?}"),
        }
    }

    /// The next frame, which must be of type `kind`.
    pub async fn expect(&mut self, kind: &str) -> ClientMsg {
        let frame = self.recv().await;
        assert_eq!(frame.kind(), kind, "unexpected frame {frame:?}");
        frame
    }

    /// Waits for the client's close frame, answers it, hangs up and returns its code.
    pub async fn expect_close(mut self) -> Option<u16> {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("no close from the client before the deadline");
            match msg {
                Some(Ok(WsMessage::Close(f))) => {
                    // Let tungstenite send its answer, completing the handshake.
                    let _ = self.ws.next().await;
                    return f.map(|f| u16::from(f.code));
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                None | Some(Err(_)) => return None,
                Some(Ok(other)) => panic!("expected close, got {other:?}"),
            }
        }
    }

    /// Closes with a close frame, as a draining node does.
    pub async fn close(mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.to_string().into() };
        let _ = self.ws.close(Some(frame)).await;
        // Take the client's answer so the handshake completes.
        let _ = tokio::time::timeout(DEADLINE, async { while self.ws.next().await.is_some() {} }).await;
    }

    /// Drops the TCP connection without a close frame, as a killed node does.
    pub fn drop_abruptly(self) {
        drop(self.ws);
    }

    /// Reads nothing from now on (no pongs either) but keeps the socket open.
    pub fn go_silent(self) -> WebSocketStream<TcpStream> {
        self.ws
    }
}

pub fn connected(id: &str, session: &str, rooms: &[&str]) -> NodeFrame {
    let session = match session {
        "new" => SessionKind::New,
        "restored" => SessionKind::Restored,
        other => panic!("no session kind {other:?}"),
    };
    NodeFrame::Connected {
        server: "mock-1".into(),
        id: id.into(),
        session,
        name: None,
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
    }
}

fn message(room: &str, seq: u64, epoch: &str, replay: bool) -> NodeFrame {
    NodeFrame::Message(RoomMessage {
        room: room.into(),
        from: "someone".into(),
        id: "other".into(),
        text: format!("m{seq}"),
        server: "mock-1".into(),
        timestamp: 1,
        data: None,
        msg_id: None,
        seq,
        epoch: epoch.into(),
        replay,
    })
}

pub fn msg(room: &str, seq: u64, epoch: &str) -> NodeFrame {
    message(room, seq, epoch, false)
}

pub fn replay(room: &str, seq: u64, epoch: &str) -> NodeFrame {
    message(room, seq, epoch, true)
}

fn joined(room: &str, id: &str, head_seq: Option<u64>, epoch: Option<&str>) -> NodeFrame {
    NodeFrame::UserJoined {
        room: room.into(),
        user: id.into(),
        id: id.into(),
        server: "mock-1".into(),
        head_seq,
        epoch: epoch.map(String::from),
    }
}

/// A `user_joined` without the room's position, as an older node sends it.
pub fn user_joined(room: &str, id: &str) -> NodeFrame {
    joined(room, id, None, None)
}

/// An own or other `user_joined` carrying the room's position at the join, as nodes send it.
pub fn user_joined_at(room: &str, id: &str, head_seq: u64, epoch: Option<&str>) -> NodeFrame {
    joined(room, id, Some(head_seq), epoch)
}

pub fn resumed(room: &str, from: u64, to: u64, epoch: &str, complete: bool) -> NodeFrame {
    NodeFrame::Resumed { room: room.into(), from_seq: from, to_seq: to, epoch: Some(epoch.into()), complete }
}

pub fn error(code: &str, message: &str) -> NodeFrame {
    NodeFrame::Error { code: code.into(), message: message.into(), msg_id: None }
}

/// A marker frame: once the app has seen its answer, the client has processed everything
/// sent before it.
pub fn barrier() -> NodeFrame {
    NodeFrame::Online { users: vec![] }
}

/// The `resume` a client sends for these `(room, seq, epoch)` points, in room order.
pub fn resume(points: &[(&str, u64, Option<&str>)]) -> ClientMsg {
    let rooms = points
        .iter()
        .map(|&(room, seq, epoch)| (room.to_string(), ResumePoint { seq, epoch: epoch.map(String::from) }))
        .collect();
    ClientMsg::Resume { rooms }
}

pub fn join_frame(room: &str) -> ClientMsg {
    ClientMsg::Join { room: room.into() }
}

pub fn leave_frame(room: &str) -> ClientMsg {
    ClientMsg::Leave { room: room.into() }
}

pub fn set_name_frame(name: &str) -> ClientMsg {
    ClientMsg::SetName { name: name.into() }
}

/// A text `message` as the client sends it, less its `msg_id` (compare with
/// [`MockConn::recv_message`]).
pub fn message_frame(room: &str, text: &str) -> ClientMsg {
    ClientMsg::Message { room: room.into(), text: text.into(), data: None, msg_id: None }
}

/// The echo of one of the client's own messages (`id` c1, with its `msg_id`).
pub fn echo(room: &str, seq: u64, epoch: &str, text: &str, msg_id: &str, replay: bool) -> NodeFrame {
    NodeFrame::Message(RoomMessage {
        room: room.into(),
        from: "c1".into(),
        id: "c1".into(),
        text: text.into(),
        server: "mock-1".into(),
        timestamp: 1,
        data: None,
        msg_id: Some(msg_id.into()),
        seq,
        epoch: epoch.into(),
        replay,
    })
}

/// The node's answer to a message whose `msg_id` was published already.
pub fn duplicate(room: &str, msg_id: &str, seq: u64, epoch: &str) -> NodeFrame {
    NodeFrame::Duplicate { room: room.into(), msg_id: msg_id.into(), seq, epoch: epoch.into() }
}

/// Defaults for tests: a fixed id, no jitter, short backoff, no pings.
pub fn config(url: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new(url);
    cfg.client_id = Some("c1".into());
    cfg.jitter = 0.0;
    cfg.backoff_min = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    cfg.connect_timeout = Duration::from_secs(30);
    cfg.ping_interval = None;
    cfg
}

/// The next event, within the deadline.
pub async fn next_event(events: &mut mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(DEADLINE, events.recv())
        .await
        .expect("no event before the deadline")
        .expect("event stream ended")
}

/// Events up to and including the first that matches `stop`.
pub async fn events_until(events: &mut mpsc::Receiver<Event>, stop: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let ev = next_event(events).await;
        let done = stop(&ev);
        seen.push(ev);
        if done {
            return seen;
        }
    }
}

/// Events up to and including the answer to [`barrier`].
pub async fn until_barrier(events: &mut mpsc::Receiver<Event>) -> Vec<Event> {
    events_until(events, |e| matches!(e, Event::Online { .. })).await
}

/// `(room, seq, replay)` of the messages among `events`.
pub fn seqs(events: &[Event]) -> Vec<(String, u64, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((m.room.clone(), m.seq, m.replay)),
            _ => None,
        })
        .collect()
}

/// Joins `room` through the mock: the client's `join` resolves on its own `user_joined`.
pub async fn join(client: &Client, conn: &mut MockConn, room: &str) {
    let node_side = async {
        assert_eq!(conn.recv().await, join_frame(room));
        conn.send(user_joined(room, "c1")).await;
    };
    let (joined, ()) = tokio::join!(client.join(room), node_side);
    joined.expect("join");
}

/// Starts a client, accepts its first connection as a new session and waits until ready.
pub async fn ready_client(
    node: &mut MockNode,
    cfg: Option<tether_client::ClientConfig>,
) -> (Client, mpsc::Receiver<Event>, MockConn) {
    let cfg = cfg.unwrap_or_else(|| config(&node.url));
    let (client, mut events) = Client::start(cfg).expect("config");
    let mut conn = node.accept().await;
    conn.send(connected("c1", "new", &[])).await;
    let first = next_event(&mut events).await;
    assert!(
        matches!(first, Event::Connected { session: Session::New, attempt: 1, since_disconnect: None, .. }),
        "{first:?}"
    );
    tokio::time::timeout(DEADLINE, client.wait_ready()).await.expect("ready in time").expect("ready");
    (client, events, conn)
}

pub async fn wait_disconnected(events: &mut mpsc::Receiver<Event>) -> Event {
    events_until(events, |e| matches!(e, Event::Disconnected { .. })).await.pop().expect("at least one event")
}
