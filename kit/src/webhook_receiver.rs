//! An in-process webhook receiver for tests and benches: an HTTP/1.1 server on a loopback
//! port that records every request (headers, body, whether its `X-Tether-Signature` checks
//! out, what it answered) and answers as its [`Mode`] says: 200, an error status, or not at
//! all (the port refuses connections, and open keep-alive connections are dropped).

use anyhow::{Context, Result};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200 to every request.
    Accept,
    /// This status to every request (recorded all the same).
    Fail(u16),
    /// The port is closed: connections are refused, open ones dropped.
    Refuse,
}

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    /// `X-Tether-Event-Id`.
    pub event_id: String,
    /// Whether `X-Tether-Signature` is `sha256=` + the HMAC-SHA256 of the body under the secret.
    pub signature_ok: bool,
    pub content_type: String,
    pub body: Bytes,
    /// The body parsed (`Null` if it is not JSON).
    pub json: serde_json::Value,
    /// When it arrived, on the wall clock (what a body's `time` is compared with).
    pub at: SystemTime,
    /// The status answered.
    pub status: u16,
}

struct Shared {
    secret: Vec<u8>,
    mode: Mutex<Mode>,
    log: Mutex<Vec<Received>>,
    /// Woken on every request, and when the mode changes (to drop connections).
    changed: Notify,
    arrived: Notify,
}

/// A running receiver; stopped on drop.
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// The accept loop of the current open period (`None` while refusing).
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl WebhookReceiver {
    /// Starts one on 127.0.0.1 (a free port), checking signatures against `secret`.
    pub async fn start(secret: &[u8]) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the webhook receiver")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            secret: secret.to_vec(),
            mode: Mutex::new(Mode::Accept),
            log: Mutex::new(Vec::new()),
            changed: Notify::new(),
            arrived: Notify::new(),
        });
        let server = tokio::spawn(serve(listener, Arc::clone(&shared)));
        Ok(Self { addr, shared, server: Mutex::new(Some(server)) })
    }

    /// `http://127.0.0.1:PORT/hook`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes how it answers. Leaving [`Mode::Refuse`] binds the same port again.
    pub async fn set_mode(&self, mode: Mode) -> Result<()> {
        let was = std::mem::replace(&mut *self.shared.mode.lock().unwrap(), mode);
        match (was == Mode::Refuse, mode == Mode::Refuse) {
            (false, true) => {
                if let Some(server) = self.server.lock().unwrap().take() {
                    server.abort();
                }
                // Every connection task drops its connection on this.
                self.shared.changed.notify_waiters();
            }
            (true, false) => {
                let listener = TcpListener::bind(self.addr).await.context("binding the webhook receiver again")?;
                *self.server.lock().unwrap() = Some(tokio::spawn(serve(listener, Arc::clone(&self.shared))));
            }
            _ => {}
        }
        Ok(())
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The requests answered 2xx.
    pub fn delivered(&self) -> Vec<Received> {
        self.requests().into_iter().filter(|r| (200..300).contains(&r.status)).collect()
    }

    /// How many requests have arrived so far.
    pub fn count(&self) -> usize {
        self.shared.log.lock().unwrap().len()
    }

    /// Waits for the next request to arrive (or returns at once if one arrives meanwhile).
    pub async fn next_arrival(&self) {
        self.shared.arrived.notified().await;
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            server.abort();
        }
        *self.shared.mode.lock().unwrap() = Mode::Refuse;
        self.shared.changed.notify_waiters();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let svc_shared = Arc::clone(&shared);
            let svc = service_fn(move |req| handle(req, Arc::clone(&svc_shared)));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            let closed = shared.changed.notified();
            tokio::pin!(closed);
            tokio::select! {
                _ = conn => {}
                _ = &mut closed => {}
            }
        });
    }
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (event_id, signature, content_type) =
        (header("x-tether-event-id"), header("x-tether-signature"), header("content-type"));
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mode = *shared.mode.lock().unwrap();
    let status = match mode {
        Mode::Accept => 200,
        Mode::Fail(s) => s,
        // Raced with the switch: answer as closed would, with an error.
        Mode::Refuse => 503,
    };
    let signature_ok = signature == expected_signature(&shared.secret, &body);
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    shared.log.lock().unwrap().push(Received {
        event_id,
        signature_ok,
        content_type,
        body,
        json,
        at: SystemTime::now(),
        status,
    });
    shared.arrived.notify_waiters();
    let mut answer = Response::new(Full::new(Bytes::from_static(b"ok")));
    *answer.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok(answer)
}

/// `sha256=` + hex HMAC-SHA256(secret, body): what a receiver checks.
pub fn expected_signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}
