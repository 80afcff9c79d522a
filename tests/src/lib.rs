//! Fixtures for Tether's end-to-end tests.
//!
//! - [`WsClient`]: a real WebSocket client (tokio-tungstenite) with deadline-bound receive
//!   helpers, so tests wait on conditions, never on sleeps;
//! - [`InProcessNode`]: a `tether-node` served in this process on a port-0 listener, with
//!   its own runtime thread so that "killing" it drops every socket at once;
//! - process fixtures (a real `redis-server` on a free port, node and balancer processes)
//!   come from `tether-kit` ([`tether_kit::Cluster`] and the processes it is made of), shared with `tether up`.

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tether_proto::wire::{ClientMsg, ResumePoint};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// Default deadline for anything a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A WebSocket client speaking Tether's JSON protocol.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Every frame received so far, in order (also those `recv_until` skipped over).
    pub seen: Vec<Value>,
    /// Response headers of the upgrade.
    pub headers: http::HeaderMap,
}

/// How a connection ended, as seen by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// A close frame with this code and reason.
    Code(u16, String),
    /// The connection ended without a close frame (EOF or reset).
    Dropped,
}

impl WsClient {
    /// Connects to `url` (e.g. `ws://127.0.0.1:8080/ws?client=alice`).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, &[]).await
    }

    /// Connects with extra request headers.
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<Self> {
        let mut req = url.into_client_request().context("building the request")?;
        for (k, v) in headers {
            req.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes())?, http::HeaderValue::from_str(v)?);
        }
        let (ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| anyhow!("connecting to {url} timed out"))?
            .with_context(|| format!("connecting to {url}"))?;
        Ok(Self { ws, seen: Vec::new(), headers: resp.headers().clone() })
    }

    /// A client over a WebSocket set up by the caller (say, on a socket with special options).
    pub fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>, headers: http::HeaderMap) -> Self {
        Self { ws, seen: Vec::new(), headers }
    }

    /// The WebSocket itself, for a test that reads it its own way.
    pub fn into_stream(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.ws
    }

    /// The TCP socket under a plain `ws://` connection, for a test that writes raw bytes (half
    /// a frame, say) between two whole frames of its own.
    pub fn tcp_mut(&mut self) -> Option<&mut TcpStream> {
        match self.ws.get_mut() {
            MaybeTlsStream::Plain(tcp) => Some(tcp),
            _ => None,
        }
    }

    /// Connects and reads the `connected` frame.
    pub async fn connect_ready(url: &str) -> Result<(Self, Value)> {
        let mut c = Self::connect(url).await?;
        let hello = c.recv_type("connected").await?;
        Ok((c, hello))
    }

    /// Sends a client frame, encoded as every client encodes it.
    pub async fn send_msg(&mut self, msg: &ClientMsg) -> Result<()> {
        self.send_text(msg.to_json()).await
    }

    /// Sends a `message` to `room` (no wait: the sender's copy comes back like anyone's).
    pub async fn say(&mut self, room: &str, text: impl Into<String>) -> Result<()> {
        self.send_msg(&ClientMsg::text(room, text)).await
    }

    /// Sends a `leave` for `room`, without waiting for the `user_left`.
    pub async fn leave(&mut self, room: &str) -> Result<()> {
        self.send_msg(&ClientMsg::Leave { room: room.to_owned() }).await
    }

    /// Sends a `set_name`.
    pub async fn set_name(&mut self, name: &str) -> Result<()> {
        self.send_msg(&ClientMsg::SetName { name: name.to_owned() }).await
    }

    /// Sends a `resume` of these rooms, each from its point (see [`WsClient::position`]).
    pub async fn resume(&mut self, rooms: impl IntoIterator<Item = (&str, ResumePoint)>) -> Result<()> {
        let rooms = rooms.into_iter().map(|(room, point)| (room.to_owned(), point)).collect();
        self.send_msg(&ClientMsg::Resume { rooms }).await
    }

    /// Where this client is in `room`: the `seq` and `epoch` of the last `message` it
    /// received there, as a resume would name them; `None` before any.
    pub fn position(&self, room: &str) -> Option<ResumePoint> {
        let last = self.seen.iter().rfind(|v| v["type"] == "message" && v["room"] == room)?;
        Some(ResumePoint { seq: last["seq"].as_u64()?, epoch: last["epoch"].as_str().map(String::from) })
    }

    /// The `seq`s of the `message` frames received in `room`, in arrival order.
    pub fn seqs(&self, room: &str) -> Vec<u64> {
        self.seen
            .iter()
            .filter(|v| v["type"] == "message" && v["room"] == room)
            .filter_map(|v| v["seq"].as_u64())
            .collect()
    }

    /// Sends any JSON value: for frames no client library would build (malformed, unknown
    /// types, odd field types).
    pub async fn send(&mut self, v: Value) -> Result<()> {
        self.send_text(v.to_string()).await
    }

    pub async fn send_text(&mut self, text: String) -> Result<()> {
        self.send_raw(Message::Text(text.into())).await
    }

    /// Writes every text frame, then flushes them together, within `DEADLINE`: they reach
    /// the server as one burst.
    pub async fn send_burst(&mut self, frames: impl IntoIterator<Item = String>) -> Result<()> {
        let burst = async {
            for text in frames {
                self.ws.feed(Message::Text(text.into())).await?;
            }
            self.ws.flush().await
        };
        tokio::time::timeout(DEADLINE, burst)
            .await
            .map_err(|_| anyhow!("sending a burst: not taken within {DEADLINE:?}"))?
            .context("sending a burst")
    }

    /// Sends a frame, within `DEADLINE` (a server that stops reading fails the test, not hangs it).
    pub async fn send_raw(&mut self, msg: Message) -> Result<()> {
        tokio::time::timeout(DEADLINE, self.ws.send(msg))
            .await
            .map_err(|_| anyhow!("sending: not taken within {DEADLINE:?}"))?
            .context("sending")
    }

    /// The next JSON frame, within `DEADLINE`.
    pub async fn recv(&mut self) -> Result<Value> {
        self.recv_within(DEADLINE).await
    }

    pub async fn recv_within(&mut self, deadline: Duration) -> Result<Value> {
        loop {
            let msg = tokio::time::timeout(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("no frame within {deadline:?}; seen so far: {:?}", self.seen))?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).with_context(|| format!("frame {t:?}"))?;
                    self.seen.push(v.clone());
                    return Ok(v);
                }
                Some(Ok(Message::Close(c))) => bail!("closed by the server: {c:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("receive failed: {e}"),
                None => bail!("connection ended"),
            }
        }
    }

    /// Reads frames until one satisfies `pred`, within `DEADLINE` in all.
    pub async fn recv_until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let v = self.recv_within(left).await.with_context(|| format!("waiting for {what}"))?;
            if pred(&v) {
                return Ok(v);
            }
        }
    }

    /// Reads until a frame of `type` arrives.
    pub async fn recv_type(&mut self, kind: &str) -> Result<Value> {
        self.recv_until(kind, |v| v["type"] == kind).await
    }

    /// Joins `room` and waits for this client's own `user_joined` (the join is complete).
    pub async fn join(&mut self, room: &str) -> Result<()> {
        self.send_msg(&ClientMsg::Join { room: room.to_owned() }).await?;
        let id = self.id_hint();
        self.recv_until("own user_joined", |v| {
            v["type"] == "user_joined" && v["room"] == room && id.as_ref().is_none_or(|id| v["id"] == *id)
        })
        .await?;
        Ok(())
    }

    /// The client id from the `connected` frame, once seen.
    pub fn id_hint(&self) -> Option<String> {
        self.seen.iter().find(|v| v["type"] == "connected").and_then(|v| v["id"].as_str().map(String::from))
    }

    /// Waits for the connection to end and says how.
    pub async fn closed(&mut self) -> Result<Closed> {
        self.closed_within(DEADLINE).await
    }

    pub async fn closed_within(&mut self, deadline: Duration) -> Result<Closed> {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let msg = tokio::time::timeout(left, self.ws.next())
                .await
                .map_err(|_| anyhow!("connection still open after {deadline:?}"))?;
            match msg {
                Some(Ok(Message::Close(Some(f)))) => return Ok(Closed::Code(f.code.into(), f.reason.to_string())),
                Some(Ok(Message::Close(None))) => return Ok(Closed::Code(1005, String::new())),
                Some(Ok(Message::Text(t))) => {
                    if let Ok(v) = serde_json::from_str(t.as_str()) {
                        self.seen.push(v);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Ok(Closed::Dropped),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// A node served in this process, on its own runtime thread.
pub struct InProcessNode {
    pub name: String,
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
}

impl InProcessNode {
    /// Starts a node named `name` on 127.0.0.1:0 with `config` tweaks applied.
    pub fn start(name: &str, redis_url: &str, tweak: impl FnOnce(&mut tether_node::Config)) -> Result<Self> {
        let mut cfg = tether_node::Config::with_defaults(name, redis_url);
        cfg.listen = "127.0.0.1:0".parse()?;
        tweak(&mut cfg);
        let std_listener = std::net::TcpListener::bind(cfg.listen)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let (kill_tx, kill_rx) = tokio::sync::oneshot::channel();
        let token = shutdown.clone();
        let thread = std::thread::Builder::new().name(format!("node-{name}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("test runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                tokio::select! {
                    r = tether_node::run(listener, cfg, token) => { let _ = r; }
                    _ = kill_rx => {}
                }
            });
            // Dropping the runtime drops every task and socket at once, as a SIGKILL would.
            rt.shutdown_background();
        })?;
        Ok(Self { name: name.to_string(), addr, shutdown, thread: Some(thread), kill: Some(kill_tx) })
    }

    pub fn ws_url(&self, client: &str) -> String {
        format!("ws://{}/ws?client={client}", self.addr)
    }

    /// Graceful stop (as SIGTERM): clients get 1012.
    pub fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Abrupt stop: every task and socket dropped, no goodbye to anyone.
    pub fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for InProcessNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Which backbone a shared test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Nats,
}

/// A private backbone server (redis-server or nats-server with JetStream) for in-process
/// nodes, so the same room/session tests run on every backbone that supports the feature.
pub enum Backend {
    Redis(tether_kit::RedisServer),
    Nats(tether_kit::NatsServer),
}

impl Backend {
    pub async fn start(kind: Kind) -> Result<Self> {
        Ok(match kind {
            Kind::Redis => Self::Redis(tether_kit::RedisServer::start().await?),
            Kind::Nats => Self::Nats(tether_kit::NatsServer::start().await?),
        })
    }

    pub fn kind(&self) -> Kind {
        match self {
            Self::Redis(_) => Kind::Redis,
            Self::Nats(_) => Kind::Nats,
        }
    }

    /// An in-process node on this backbone, with `tweak` applied to its config.
    pub fn node(&self, name: &str, tweak: impl FnOnce(&mut tether_node::Config)) -> Result<InProcessNode> {
        match self {
            Self::Redis(r) => InProcessNode::start(name, &r.url(), tweak),
            Self::Nats(n) => {
                let url = n.url();
                InProcessNode::start(name, "redis://127.0.0.1:1/", move |cfg| {
                    cfg.backbone = tether_node::config::BackboneKind::Nats;
                    cfg.nats = url;
                    tweak(cfg);
                })
            }
        }
    }

    /// `SIGKILL`s the server.
    pub async fn kill(&mut self) -> Result<()> {
        match self {
            Self::Redis(r) => r.kill().await,
            Self::Nats(n) => n.kill().await,
        }
    }

    /// Starts it again on the same port (empty: neither keeps data across this restart).
    pub async fn restart(&mut self) -> Result<()> {
        match self {
            Self::Redis(r) => r.restart().await,
            Self::Nats(n) => n.restart().await,
        }
    }
}

/// Defines one `#[tokio::test]` per backbone (`NAME::redis`, `NAME::nats`) calling
/// `async fn NAME(kind: Kind) -> Result<()>`.
#[macro_export]
macro_rules! on_every_backbone {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn redis() -> anyhow::Result<()> {
                    super::$name($crate::Kind::Redis).await
                }
                #[tokio::test]
                async fn nats() -> anyhow::Result<()> {
                    super::$name($crate::Kind::Nats).await
                }
            }
        )+
    };
}

/// [`tether_kit::eventually`] with this crate's [`DEADLINE`]: polls `check` until it returns
/// `Some`.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    Ok(tether_kit::eventually(DEADLINE, what, check).await?)
}

/// The first id `{prefix}-N` whose rank order over `nodes` starts with `order` (its first
/// node, or its first few): how a test puts a client where it wants it.
pub fn id_ranked(nodes: &[&str], prefix: &str, order: &[&str]) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| tether_proto::hrw::rank(nodes, id).iter().zip(order).all(|(&i, want)| nodes[i] == *want))
        .expect("an id")
}

/// A node's state (`up`, `down`, `draining`…) in the balancer's `/status`.
pub async fn node_state(c: &tether_kit::Cluster, name: &str) -> Option<String> {
    let mut admin = HttpConn::connect(c.balancer().admin_addr()).await.ok()?;
    let status = admin.get_json("/status").await.ok()?;
    let node = status["nodes"].as_array()?.iter().find(|n| n["name"] == name)?;
    node["state"].as_str().map(str::to_owned)
}

/// Waits until the balancer shows node `name` up.
pub async fn until_up(c: &tether_kit::Cluster, name: &str) -> Result<()> {
    eventually(&format!("{name} up"), || async { (node_state(c, name).await? == "up").then_some(()) }).await
}

/// `PUBSUB NUMSUB channel` on the given Redis.
pub async fn numsub(redis_url: &str, channel: &str) -> Result<i64> {
    let client = redis::Client::open(redis_url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let (_, n): (String, i64) = redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(&mut con).await?;
    Ok(n)
}

/// A keep-alive HTTP/1.1 client on one connection, for admin and health endpoints (many
/// requests without filling the port range with TIME_WAIT sockets).
pub struct HttpConn {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    host: String,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender, host: addr.to_string() })
    }

    /// `method path` → (status, body).
    pub async fn request(&mut self, method: http::Method, path: &str) -> Result<(u16, String)> {
        use http_body_util::BodyExt;
        self.sender.ready().await?;
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.host)
            .body(http_body_util::Empty::new())?;
        let resp = tokio::time::timeout(DEADLINE, self.sender.send_request(req))
            .await
            .map_err(|_| anyhow!("{path}: no answer within {DEADLINE:?}"))??;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    pub async fn get(&mut self, path: &str) -> Result<(u16, String)> {
        self.request(http::Method::GET, path).await
    }

    pub async fn get_json(&mut self, path: &str) -> Result<Value> {
        let (status, body) = self.get(path).await?;
        if status != 200 {
            bail!("GET {path}: {status} {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {path}: {body}"))
    }
}

/// One GET on a fresh connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    HttpConn::connect(addr).await?.get(path).await
}

/// A quiet cluster of real processes for tests: a private Redis, `node-1..node-N`, and a
/// balancer health-checking every 100 ms (so failover tests do not wait on the default).
pub async fn test_cluster(nodes: usize) -> Result<tether_kit::Cluster> {
    tether_kit::Cluster::start(tether_kit::ClusterOptions {
        nodes,
        logs: tether_kit::ClusterLogs::Null,
        balancer_args: vec!["--health-interval-ms".into(), "100".into()],
        ..Default::default()
    })
    .await
}
