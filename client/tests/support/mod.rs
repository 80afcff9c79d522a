//! A scripted stand-in for a Tether node, plus helpers to drive a client against it.
//!
//! [`MockNode`] listens on `127.0.0.1:0` and hands every upgraded connection to the test as
//! a [`MockConn`]; the test plays the node's side frame by frame (`connected`, replays,
//! `resumed`, live frames, duplicates, gaps, drops, close codes) and reads what the client
//! sent. Every wait has a deadline; nothing sleeps.
#![allow(dead_code)] // each test binary uses a different part

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tether_client::{ClientConfig, Event};
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
    pub async fn send(&mut self, frame: Value) {
        self.send_raw(&frame.to_string()).await;
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(WsMessage::text(text.to_string())).await.expect("mock send");
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.ws.send(WsMessage::Binary(bytes.to_vec().into())).await.expect("mock send");
    }

    /// The next JSON frame the client sent.
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("no frame from the client before the deadline");
            match msg {
                Some(Ok(WsMessage::Text(t))) => return serde_json::from_str(t.as_str()).expect("client sent JSON"),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                other => panic!("expected a text frame from the client, got {other:?}"),
            }
        }
    }

    /// The next frame, which must be of type `kind`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], kind, "unexpected frame {frame}");
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

pub fn connected(id: &str, session: &str, rooms: &[&str]) -> Value {
    json!({"type":"connected","server":"mock-1","id":id,"session":session,"name":null,"rooms":rooms})
}

pub fn msg(room: &str, seq: u64, epoch: &str) -> Value {
    json!({"type":"message","room":room,"from":"someone","id":"other","text":format!("m{seq}"),
        "server":"mock-1","timestamp":1,"seq":seq,"epoch":epoch})
}

pub fn replay(room: &str, seq: u64, epoch: &str) -> Value {
    let mut m = msg(room, seq, epoch);
    m["replay"] = json!(true);
    m
}

pub fn user_joined(room: &str, id: &str) -> Value {
    json!({"type":"user_joined","room":room,"user":id,"id":id,"server":"mock-1"})
}

/// An own or other `user_joined` carrying the room's position at the join, as nodes send it.
pub fn user_joined_at(room: &str, id: &str, head_seq: u64, epoch: Option<&str>) -> Value {
    let mut v = user_joined(room, id);
    v["head_seq"] = json!(head_seq);
    if let Some(e) = epoch {
        v["epoch"] = json!(e);
    }
    v
}

pub fn resumed(room: &str, from: u64, to: u64, epoch: &str, complete: bool) -> Value {
    json!({"type":"resumed","room":room,"from_seq":from,"to_seq":to,"epoch":epoch,"complete":complete})
}

/// A marker frame: once the app has seen its answer, the client has processed everything
/// sent before it.
pub fn barrier() -> Value {
    json!({"type":"online","users":[]})
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
