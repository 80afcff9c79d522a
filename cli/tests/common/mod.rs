//! Helpers shared by the integration tests: a small WebSocket client that waits for frames
//! by predicate with a deadline, and process checks.
#![allow(dead_code)] // each test binary uses a different subset

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::time::Duration;
use tether_proto::wire::ClientMsg;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expectation may take.
pub const DEADLINE: Duration = Duration::from_secs(15);

pub struct Ws {
    pub id: String,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    /// Connects to `base` (a `ws://…/ws` URL) as client `id`.
    pub async fn connect(base: &str, id: &str) -> Result<Self> {
        let url = format!("{base}?client={id}");
        let (ws, _) =
            tokio_tungstenite::connect_async(url.as_str()).await.with_context(|| format!("connecting to {url}"))?;
        Ok(Self { id: id.to_owned(), ws })
    }

    /// Connects to `base` (a `wss://…/ws` URL) as client `id`, trusting only the CA in the
    /// PEM file `ca`.
    pub async fn connect_tls(base: &str, id: &str, ca: &std::path::Path) -> Result<Self> {
        let url = format!("{base}?client={id}");
        let tls = tether_kit::certs::client_config_from_file(ca)?;
        let connector = tokio_tungstenite::Connector::Rustls(tls);
        let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(url.as_str(), None, false, Some(connector))
            .await
            .with_context(|| format!("connecting to {url}"))?;
        Ok(Self { id: id.to_owned(), ws })
    }

    /// Sends a client frame, encoded as every client encodes it.
    pub async fn send_msg(&mut self, msg: &ClientMsg) -> Result<()> {
        self.ws.send(Message::text(msg.to_json())).await?;
        Ok(())
    }

    /// Sends a `message` to `room`.
    pub async fn say(&mut self, room: &str, text: &str) -> Result<()> {
        self.send_msg(&ClientMsg::text(room, text)).await
    }

    /// Sends a `set_name`.
    pub async fn set_name(&mut self, name: &str) -> Result<()> {
        self.send_msg(&ClientMsg::SetName { name: name.to_owned() }).await
    }

    /// The first JSON frame for which `pred` holds, skipping others; fails after [`DEADLINE`].
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let msg = timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("{}: no {what} within {DEADLINE:?}", self.id))?;
            match msg {
                Some(Ok(Message::Text(text))) => {
                    let v: Value = serde_json::from_str(&text)?;
                    if pred(&v) {
                        return Ok(v);
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    bail!("{}: closed while waiting for {what}: {f:?}", self.id)
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("{}: error while waiting for {what}: {e}", self.id),
                None => bail!("{}: ended while waiting for {what}", self.id),
            }
        }
    }

    /// Joins `room` and waits for its own `user_joined` (the join is then live everywhere).
    pub async fn join(&mut self, room: &str) -> Result<()> {
        self.send_msg(&ClientMsg::Join { room: room.to_owned() }).await?;
        let id = self.id.clone();
        let room = room.to_owned();
        self.expect("own user_joined", move |v| {
            v["type"] == "user_joined" && v["id"] == id.as_str() && v["room"] == room.as_str()
        })
        .await?;
        Ok(())
    }

    /// Waits for a `message` in `room` with `text`.
    pub async fn expect_message(&mut self, room: &str, text: &str) -> Result<Value> {
        let (room, text) = (room.to_owned(), text.to_owned());
        self.expect("message", move |v| {
            v["type"] == "message" && v["room"] == room.as_str() && v["text"] == text.as_str()
        })
        .await
    }
}

/// Whether a process with this pid exists (a zombie counts as gone: it runs no code).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z")
        }
        Err(_) => false,
    }
}

/// Waits until none of `pids` is alive; fails after [`DEADLINE`].
pub async fn wait_gone(pids: &[u32]) -> Result<()> {
    let what = format!("{pids:?} to be gone");
    tether_kit::eventually(DEADLINE, &what, || async { pids.iter().all(|p| !alive(*p)) }).await?;
    Ok(())
}

/// A plain HTTP/1.1 GET; returns (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP response: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}
