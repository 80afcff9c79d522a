//! Test fixtures: mock nodes (a hyper server answering `/readyz`, plain HTTP with its name,
//! and a tokio-tungstenite WebSocket echo — or, with `mode=stream` in the query, a steady
//! stream of text frames), an in-process balancer on port 0, and clients.
#![allow(dead_code)] // each test binary uses a different subset

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tether_balancer::{FileConfig, FileNode};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(5);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        tether_proto::logging::init(tether_proto::logging::LogFormat::Text, "debug");
    }
}

/// [`tether_kit::eventually`] with this suite's [`DEADLINE`]; panics when it times out.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    tether_kit::eventually(DEADLINE, what, check).await.unwrap_or_else(|e| panic!("{e}"));
}

/// Awaits `fut` for at most [`DEADLINE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ---------------------------------------------------------------------------------------------
// Mock node

/// The names of the usual three mock nodes, in the order [`three_nodes`] starts them.
pub const NAMES: [&str; 3] = ["node-1", "node-2", "node-3"];

/// The usual set-up: mock nodes `node-1`..`node-3`, ready.
pub async fn three_nodes() -> Vec<MockNode> {
    let mut nodes = Vec::new();
    for name in NAMES {
        nodes.push(MockNode::start(name).await);
    }
    nodes
}

/// The balancer's config entries for `nodes`.
pub fn file_nodes(nodes: &[MockNode]) -> Vec<FileNode> {
    nodes.iter().map(MockNode::file_node).collect()
}

struct MockState {
    name: String,
    ready: AtomicBool,
    /// Fired by `stop`: every connection and WebSocket of this node ends at once.
    kill: CancellationToken,
    /// Fired by `shut_down_gracefully`: every WebSocket gets a 1012 close frame, as a real node
    /// sends on SIGTERM, and ends.
    going_away: CancellationToken,
    tracker: TaskTracker,
    /// WebSocket sessions opened on this node.
    ws_opened: AtomicUsize,
    /// Requests other than `/readyz`.
    requests: AtomicUsize,
}

/// A stand-in for `tether-node`: `/readyz` (200 or 503), WebSocket upgrade on any path (first
/// frame `{"server","client","xff"}`, then echo), and any other request answered with the same
/// JSON.
pub struct MockNode {
    pub name: String,
    pub addr: SocketAddr,
    state: Arc<MockState>,
    accept: Option<JoinHandle<()>>,
}

impl MockNode {
    pub async fn start(name: &str) -> Self {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on a given address (a node coming back on its old port).
    pub async fn start_on(name: &str, addr: SocketAddr) -> Self {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let listener = loop {
            // A port just released can take a moment to be bindable again.
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(MockState {
            name: name.to_owned(),
            ready: AtomicBool::new(true),
            kill: CancellationToken::new(),
            going_away: CancellationToken::new(),
            tracker: TaskTracker::new(),
            ws_opened: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(mock_accept(listener, Arc::clone(&state)));
        Self { name: name.to_owned(), addr, state, accept: Some(accept) }
    }

    pub fn set_ready(&self, ready: bool) {
        self.state.ready.store(ready, Ordering::SeqCst);
    }

    pub fn ws_opened(&self) -> usize {
        self.state.ws_opened.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Closes the listening socket (new connects are refused); open connections go on.
    pub async fn stop_accepting(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
    }

    /// What a node does on SIGTERM: `/readyz` goes 503 and every WebSocket is closed with
    /// 1012 by the node itself. The listener stays open.
    pub fn shut_down_gracefully(&self) {
        self.set_ready(false);
        self.state.going_away.cancel();
    }

    /// The process "dies": listener and every open connection closed.
    pub async fn stop(&mut self) {
        self.stop_accepting().await;
        self.state.kill.cancel();
        self.state.tracker.close();
        self.state.tracker.wait().await;
    }

    pub fn file_node(&self) -> FileNode {
        FileNode { name: self.name.clone(), addr: self.addr.to_string() }
    }
}

impl Drop for MockNode {
    fn drop(&mut self) {
        self.state.kill.cancel();
        if let Some(accept) = &self.accept {
            accept.abort();
        }
    }
}

async fn mock_accept(listener: TcpListener, state: Arc<MockState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        let kill = state.kill.clone();
        state.tracker.clone().spawn(async move {
            let service = {
                let state = Arc::clone(&state);
                service_fn(move |req| mock_service(Arc::clone(&state), req))
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                _ = kill.cancelled() => {}
            }
        });
    }
}

async fn mock_service(state: Arc<MockState>, mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/readyz" {
        let status = if state.ready.load(Ordering::SeqCst) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        let mut r = Response::new(Full::new(Bytes::from_static(b"readyz\n")));
        *r.status_mut() = status;
        return Ok(r);
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    let text = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let info = serde_json::json!({
        "server": state.name,
        "client": text("x-client-id"),
        "xff": text("x-forwarded-for"),
        "real_ip": text("x-real-ip"),
        "proto": text("x-forwarded-proto"),
        // Every header as received, each name with all its values in order.
        "headers": header_map_json(req.headers()),
        "path": req.uri().to_string(),
    })
    .to_string();

    let wants_ws = req.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !wants_ws {
        let mut r = Response::new(Full::new(Bytes::from(info)));
        r.headers_mut().insert("x-node", state.name.parse().unwrap());
        return Ok(r);
    }
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"no key")));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(r);
    };
    let streaming = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "mode=stream"));
    let on_upgrade = hyper::upgrade::on(&mut req);
    let kill = state.kill.clone();
    let going_away = state.going_away.clone();
    let session_state = Arc::clone(&state);
    state.tracker.spawn(async move {
        let session = async {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            session_state.ws_opened.fetch_add(1, Ordering::SeqCst);
            let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            if ws.send(Message::text(info)).await.is_err() {
                return;
            }
            if streaming {
                // As fast as the peer takes them; ends when the connection does.
                for i in 0.. {
                    if ws.send(Message::text(stream_message(i))).await.is_err() {
                        return;
                    }
                }
            }
            loop {
                let msg = tokio::select! {
                    msg = ws.next() => msg,
                    _ = going_away.cancelled() => {
                        let frame = CloseFrame {
                            code: CloseCode::Restart,
                            reason: "node shutting down".into(),
                        };
                        let _ = ws.close(Some(frame)).await;
                        return;
                    }
                };
                let Some(Ok(msg)) = msg else { return };
                let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
                if msg.is_close() || (echo && ws.send(msg).await.is_err()) {
                    return;
                }
            }
        };
        tokio::select! {
            _ = session => {}
            _ = kill.cancelled() => {}
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, "websocket".parse().unwrap());
    h.insert(header::CONNECTION, "Upgrade".parse().unwrap());
    h.insert(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(key.as_bytes()).parse().unwrap());
    h.insert("x-node", state.name.parse().unwrap());
    Ok(r)
}

fn header_map_json(headers: &HeaderMap) -> Value {
    let mut map = serde_json::Map::new();
    for name in headers.keys() {
        let values: Vec<Value> = headers
            .get_all(name)
            .iter()
            .map(|v| Value::from(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        map.insert(name.as_str().to_owned(), Value::Array(values));
    }
    Value::Object(map)
}

/// Payload sizes of a streaming mock node's frames, in turn: every length encoding (7-bit,
/// 16-bit, 64-bit) and the values at their edges.
pub const STREAM_SIZES: [usize; 9] = [3, 200, 70_000, 126, 65_536, 10, 125, 65_535, 1_000];

/// The `i`-th text frame a streaming mock node sends: `"{i}:"` then a letter repeated up to
/// `STREAM_SIZES[i % 9]` bytes (at least the prefix).
pub fn stream_message(i: usize) -> String {
    let mut text = format!("{i}:");
    let fill = char::from(b'a' + (i % 26) as u8);
    let len = STREAM_SIZES[i % STREAM_SIZES.len()].max(text.len());
    text.extend(std::iter::repeat_n(fill, len - text.len()));
    text
}

/// A port that refuses connections (bound once, then released).
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Balancer

/// An in-process balancer on port-0 listeners.
pub struct Balancer {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<Result<(), tether_balancer::Error>>>,
}

/// Test defaults: quick probes, rise 1; `tweak` adjusts them.
pub async fn start_balancer(nodes: Vec<FileNode>, tweak: impl FnOnce(&mut FileConfig)) -> Balancer {
    init_logging();
    let mut file = FileConfig {
        nodes,
        health_interval_ms: Some(50),
        health_timeout_ms: Some(500),
        connect_timeout_ms: Some(500),
        rise: Some(1),
        grace_period_ms: Some(2_000),
        ..FileConfig::default()
    };
    tweak(&mut file);
    let config = file.validate().expect("valid test config");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(tether_balancer::run(listener, admin, config, shutdown.clone()));
    Balancer { addr, admin: admin_addr, shutdown, task: Some(task) }
}

impl Balancer {
    /// Asks for shutdown and waits for `run` to return.
    pub async fn stop(&mut self) -> Result<(), tether_balancer::Error> {
        self.shutdown.cancel();
        let task = self.task.take().expect("stopped once");
        within("balancer to stop", task).await.expect("run panicked")
    }

    pub async fn status(&self) -> Value {
        let (code, _, body) = http(self.admin, Method::GET, "/status", &[]).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    pub async fn node_state(&self, name: &str) -> String {
        let status = self.status().await;
        let node = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {status}"));
        node["state"].as_str().unwrap().to_owned()
    }

    pub async fn wait_state(&self, name: &str, state: &str) {
        eventually(&format!("{name} to be {state}"), || async { self.node_state(name).await == state }).await;
    }

    /// The value of one sample of `/metrics`, `series` being e.g. `name{label="v"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, _, body) = http(self.admin, Method::GET, "/metrics", &[]).await;
        body.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    /// Where `/route` sends `client` now.
    pub async fn route(&self, client: &str) -> (StatusCode, Value) {
        let (code, _, body) = http(self.admin, Method::GET, &format!("/route?client={client}"), &[]).await;
        (code, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// Which node answers a plain HTTP request for `client` through the balancer.
    pub async fn http_node(&self, client: &str) -> String {
        let (code, _, body) = http(self.addr, Method::GET, &format!("/api?client={client}"), &[]).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["client"], client);
        v["server"].as_str().unwrap().to_owned()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// One HTTP/1.1 request on a fresh connection; returns status, headers and body text.
pub async fn http(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    within(&format!("{method} {path} on {addr}"), async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path).header(header::HOST, addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned())
    })
    .await
}

/// What a mock node says first on a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub server: String,
    pub client: String,
    pub xff: String,
    /// `X-Real-IP` and `X-Forwarded-Proto` as the node received them.
    pub real_ip: String,
    pub proto: String,
}

impl Hello {
    pub fn from_json(v: &Value) -> Self {
        let text = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{k} missing in {v}")).to_owned();
        Hello {
            server: text("server"),
            client: text("client"),
            xff: text("xff"),
            real_ip: text("real_ip"),
            proto: text("proto"),
        }
    }
}

/// Opens a WebSocket through `addr` at `/ws{query}` with extra headers.
pub async fn ws_connect(
    addr: SocketAddr,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, http::Response<Option<Vec<u8>>>), tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("ws://{addr}/ws{query}").into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    within("websocket handshake", tokio_tungstenite::connect_async(request)).await
}

/// Reads the node's first frame.
pub async fn hello(ws: &mut Ws) -> Hello {
    let msg = within("hello frame", ws.next()).await.expect("stream ended before hello").expect("hello frame");
    let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    Hello::from_json(&v)
}

/// Opens a WebSocket for `client` and returns it with the node's hello.
pub async fn ws_for(addr: SocketAddr, client: &str) -> (Ws, Hello) {
    let (mut ws, _) =
        ws_connect(addr, &format!("?client={client}"), &[]).await.unwrap_or_else(|e| panic!("connect {client}: {e}"));
    let hello = hello(&mut ws).await;
    assert_eq!(hello.client, client);
    (ws, hello)
}

/// Sends a text frame and expects it echoed.
pub async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let back = within("echo", ws.next()).await.unwrap().unwrap();
    assert_eq!(back.to_text().unwrap(), text);
}

/// Waits until the balancer ends this WebSocket (close frame, EOF or reset).
pub async fn expect_closed(ws: &mut Ws) {
    within("websocket to close", async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
}

/// Reads a streaming node's frames until the connection ends, `first` being the index of the
/// next one; checks each is the next whole, intact frame of the stream; returns the index
/// after the last and the close frame (if any) that ended the stream. A cut frame would
/// surface here as a protocol error or a mismatch.
pub async fn read_stream_until_close(ws: &mut Ws, first: usize) -> (usize, Option<CloseFrame>) {
    within("the stream to end", async {
        let mut next = first;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    assert_eq!(text.as_str(), stream_message(next), "frame {next}");
                    next += 1;
                }
                Some(Ok(Message::Close(frame))) => return (next, frame),
                Some(Ok(other)) => panic!("unexpected frame after {next}: {other:?}"),
                Some(Err(e)) => panic!("stream broke after {next} frames: {e}"),
                None => return (next, None),
            }
        }
    })
    .await
}

/// Reads until a close frame and returns its code; fails on anything else ending the stream.
pub async fn expect_close_code(ws: &mut Ws) -> u16 {
    within("a close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("connection failed before a close frame: {e}"),
                None => panic!("connection ended without a close frame"),
            }
        }
    })
    .await
}

/// Client ids whose first choice among `names` is `names[target]`.
pub fn ids_ranking_first(names: &[&str], target: usize, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("client-{i}"))
        .filter(|id| tether_proto::hrw::rank(names, id)[0] == target)
        .take(count)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// wss clients

/// The name the test certificates are for (`tether_kit::certs::LOCAL_NAMES`), as clients ask
/// for it.
pub const HOST: &str = "localhost";

/// Opens `wss://localhost:PORT/ws?client=ID` trusting what `config` trusts.
pub async fn wss_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    client: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let request = format!("wss://{HOST}:{}/ws?client={client}", addr.port()).into_client_request().unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connecting = tokio_tungstenite::client_async_tls_with_config(
        request,
        tcp,
        None,
        Some(tokio_tungstenite::Connector::Rustls(config)),
    );
    within("a wss handshake", connecting).await.map(|(ws, _)| ws)
}

/// [`wss_connect`] that must succeed; returns the socket after the node's hello.
pub async fn wss_for(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, client: &str) -> (Ws, Hello) {
    let mut ws = wss_connect(addr, Arc::clone(config), client).await.unwrap_or_else(|e| panic!("wss {client}: {e}"));
    let hello = hello(&mut ws).await;
    assert_eq!(hello.client, client);
    (ws, hello)
}
