//! The listener: accepts TCP connections, serves HTTP/1.1 on each (`/healthz`, `/readyz`,
//! `/metrics`, the server API under `/api/`, handed to [`api`]), and upgrades WebSocket
//! requests on any other path into a [`connection`].
//!
//! Shutdown is one token: the accept loop stops, every connection closes its client with 1012
//! and leaves its rooms, and [`run`] waits for them up to `grace_period`.

use crate::api;
use crate::auth;
use crate::backbone;
use crate::config::{Config, RETRY_AFTER_SECS};
use crate::connection;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::state::NodeState;
use crate::webhooks::Webhooks;
use crate::NodeError;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tether_proto::id::{self, IdSource};
use tether_proto::limits;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A node reached through the balancer gets the id in `X-Client-Id` (which the balancer
/// chose by *its* order); reached directly, the query and cookie apply.
const NODE_ID_ORDER: [IdSource; 3] = [IdSource::Header, IdSource::Query, IdSource::Cookie];

/// Serves `listener` until `shutdown` is cancelled, then drains.
pub async fn run(listener: TcpListener, cfg: Config, shutdown: CancellationToken) -> Result<(), NodeError> {
    let cfg = Arc::new(cfg);
    // A holding gate may keep as many frames as a send queue.
    let hub = Arc::new(Hub::new(cfg.send_queue_len));
    let metrics = Metrics::new();
    // The backbone outlives the connections: they still publish their `user_left` while draining.
    let backbone_stop = CancellationToken::new();
    // Webhook delivery outlives the connections too: their last removals decide events.
    let hooks = cfg.webhooks.clone().map(|w| Webhooks::start(w, metrics.webhooks.clone(), backbone_stop.clone()));
    let backbone::Started { backbone, instance } =
        backbone::start(Arc::clone(&cfg), Arc::clone(&hub), metrics.clone(), hooks.clone(), backbone_stop.clone())
            .await
            .map_err(|e| NodeError::Backbone(e.to_string()))?;
    let local = listener.local_addr().map_err(NodeError::Io)?;
    // Stopped with the accept loop (not with the backbone): withdrawn before the drain.
    let announcing = cfg.announce.then(|| {
        let addr = cfg.advertise.clone().unwrap_or_else(|| local.to_string());
        let record = backbone::NodeRecord { name: cfg.name.clone(), addr, instance };
        backbone::registry::spawn(Arc::clone(&backbone), record, cfg.redis_timeout, shutdown.child_token())
    });
    if let Some(h) = &hooks {
        info!(url = %h.config().url, grace_ms = h.grace().as_millis() as u64, "webhooks on");
        tokio::spawn(backbone::claim_loop(Arc::clone(&backbone), h.grace(), backbone_stop.clone()));
    }
    let state = Arc::new(NodeState::new(Arc::clone(&cfg), hub, backbone, metrics));
    let tracker = state.tracker.clone();
    tokio::spawn(refresh_sessions(Arc::clone(&state), backbone_stop.clone()));
    info!(node = %cfg.name, listen = %local, backbone = ?cfg.backbone, "node serving");
    state.metrics.max_connections.set(i64::try_from(cfg.max_connections).unwrap_or(i64::MAX));
    let mut backoff = limits::AcceptBackoff::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.succeeded();
                let state = Arc::clone(&state);
                tracker.spawn(serve_connection(stream, peer, state));
            }
            Err(e) if limits::is_per_connection(&e) => debug!(error = %e, "accept: connection failed"),
            Err(e) => {
                // EMFILE and friends: pause (doubling up to 1 s) instead of spinning, log at
                // most once per 10 s; the loop never dies.
                state.metrics.accept_errors.inc();
                let failure = backoff.failed(std::time::Instant::now());
                if let Some(unlogged) = failure.log {
                    let pause_ms = failure.pause.as_millis() as u64;
                    warn!(error = %e, pause_ms, unlogged, "accept failed; backing off (logged at most every 10 s)");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(failure.pause) => {}
                }
            }
        }
    }
    // Out of the registry first, so balancers stop choosing this node while it still answers.
    if let Some(task) = announcing {
        let _ = task.await;
    }
    // Closed before the clients are told to go: one that reconnects at once must find this
    // node refusing (the balancer then tries the next), not accepting and then gone.
    drop(listener);
    state.shutdown.cancel();
    tracker.close();
    let clean = tokio::time::timeout(cfg.grace_period, tracker.wait()).await.is_ok();
    backbone_stop.cancel();
    if clean {
        info!(node = %cfg.name, "drained cleanly");
    } else {
        warn!(node = %cfg.name, remaining = tracker.len(), "grace period over; dropping remaining connections");
    }
    Ok(())
}

/// Keeps the sessions of connected clients from expiring: each is refreshed every third of
/// `session_ttl` (at least every 10 minutes), so only a client gone for `session_ttl` loses it.
async fn refresh_sessions(state: Arc<NodeState>, stop: CancellationToken) {
    let every = (state.cfg.session_ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ids = state.hub.client_ids();
        if ids.is_empty() {
            continue;
        }
        if let Err(e) = state.backbone.touch_sessions(&ids).await {
            debug!(error = %e, sessions = ids.len(), "session refresh failed; retrying next round");
        }
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, state: Arc<NodeState>) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    let svc_state = Arc::clone(&state);
    let svc = service_fn(move |req: Request<Incoming>| {
        let state = Arc::clone(&svc_state);
        async move {
            if req.uri().path().starts_with("/api/") {
                return Ok::<_, Infallible>(api::handle(req, state).await);
            }
            Ok(route(req, peer, state))
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(state.cfg.header_read_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { debug!(%peer, error = %e, "http connection ended with an error") },
        _ = state.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// 503 for an upgrade past `max_connections`, with `Retry-After` so clients wait, not hammer.
fn at_capacity(max_connections: usize) -> Response<Full<Bytes>> {
    let body = format!("node is at max_connections ({max_connections}); retry in {RETRY_AFTER_SECS} s\n");
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    r
}

fn route(req: Request<Incoming>, peer: SocketAddr, state: Arc<NodeState>) -> Response<Full<Bytes>> {
    if req.headers().contains_key(header::UPGRADE) {
        return upgrade(req, peer, state);
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if state.backbone.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "backbone not connected\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        _ => text(StatusCode::UPGRADE_REQUIRED, "this is a tether node: connect with a WebSocket upgrade\n"),
    }
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
}

fn bad_request(reason: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(reason + "\n")));
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn upgrade(mut req: Request<Incoming>, peer: SocketAddr, state: Arc<NodeState>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET
        || !header_has_token(&req, header::UPGRADE, "websocket")
        || !header_has_token(&req, header::CONNECTION, "upgrade")
    {
        return bad_request("only WebSocket upgrades (GET, Upgrade: websocket) are served".into());
    }
    if req.headers().get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return bad_request("Sec-WebSocket-Version must be 13".into());
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return bad_request("Sec-WebSocket-Key is missing".into());
    };
    let accept = derive_accept_key(key.as_bytes());
    // With JWT on, a verified token names the client (its `sub`), and any other id it is
    // sent with must agree; without a token (allowed only when not `required`) ids work as
    // before.
    let grant = match auth::admit(state.cfg.auth.as_deref(), req.uri().query(), req.headers()) {
        Ok(grant) => grant,
        Err(e) => {
            state.metrics.client_errors.get_or_create(&crate::metrics::CodeLabel { code: "unauthorized" }).inc();
            debug!(%peer, reason = %e, "upgrade refused: 401");
            return auth::unauthorized(&e);
        }
    };
    // Who the client is: the TCP peer, or whom a trusted proxy (the balancer) names.
    let client_addr = crate::client_addr::resolve(peer, req.headers(), &state.cfg.trusted_proxies);
    let (client_id, minted) = match &grant {
        Some(grant) => (grant.sub.clone(), false),
        None => match client_id(&req, &state) {
            Ok(found) => found,
            Err(refused) => return refused,
        },
    };
    if state.metrics.connections_active.get() >= state.cfg.max_connections as i64 {
        state.metrics.connections_refused.inc();
        return at_capacity(state.cfg.max_connections);
    }
    // Ids are header-safe by construction (validated alphabet, or minted hex).
    let cookie = minted.then(|| HeaderValue::from_str(&id::session_cookie(&client_id)).expect("ids are header-safe"));
    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_state = Arc::clone(&state);
    state.tracker.spawn(async move {
        match on_upgrade.await {
            // The plain TCP stream under the upgrade (served over `TokioIo<TcpStream>` in
            // `serve_connection`), and what hyper had read past the request head.
            Ok(upgraded) => match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    let sock = parts.io.into_inner();
                    debug!(peer = %client_addr, tcp_peer = %peer, client = %client_id, "websocket accepted");
                    connection::run(sock, parts.read_buf, client_id, grant, client_addr.to_string(), task_state).await
                }
                Err(_) => warn!(%peer, "an upgraded connection is not a plain TCP stream; closed"),
            },
            Err(e) => debug!(%peer, error = %e, "upgrade failed"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    // The accept key is base64: always a valid header value.
    h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).expect("base64 is a valid header"));
    if let Some(cookie) = cookie {
        h.insert(header::SET_COOKIE, cookie);
    }
    resp
}

/// The id of a request that no token names: found (and, with a signing key, verified) or
/// minted here (`true`).
#[allow(clippy::result_large_err)] // the refusal is the response itself
fn client_id(req: &Request<Incoming>, state: &NodeState) -> Result<(String, bool), Response<Full<Bytes>>> {
    let cookies: Vec<&[u8]> = req.headers().get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect();
    let found = id::extract_client_id(
        req.uri().query(),
        req.headers().get(id::CLIENT_ID_HEADER).map(HeaderValue::as_bytes),
        None,
        cookies.iter().copied(),
        &NODE_ID_ORDER,
    );
    let (client_id, minted) = match found {
        Ok(Some(id)) => (id.into_owned(), false),
        Ok(None) => match &state.cfg.signing_key {
            Some(key) => (key.mint(), true),
            None => (id::mint_client_id(), true),
        },
        Err(e) => return Err(bad_request(format!("bad client id: {e}"))),
    };
    if let Some(key) = &state.cfg.signing_key {
        if !key.verify(&client_id) {
            state.metrics.client_errors.get_or_create(&crate::metrics::CodeLabel { code: "forged_id" }).inc();
            return Err(text(StatusCode::FORBIDDEN, "unsigned or forged client id\n"));
        }
    }
    Ok((client_id, minted))
}
