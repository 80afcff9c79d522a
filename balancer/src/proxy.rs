//! The client-facing request path: find the client id, pick its node, connect (failing over
//! along the client's rank), forward the request, and either stream the answer back (plain
//! HTTP) or hand both upgraded connections to [`crate::tunnel`] (WebSocket).
//!
//! A client connection's life: [`crate::server`] accepts it and runs hyper on it; each request
//! lands in [`handle`]; an upgrade ends hyper's part and the tunnel takes over until either
//! side hangs up, the node goes down, or the shutdown grace runs out.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tether_proto::id::{extract_client_id, mint_client_id, session_cookie, IdSource};
use tether_proto::id::{CLIENT_ID_HEADER, SESSION_COOKIE};
use tether_proto::limits::is_out_of_descriptors;
use tether_proto::sign::SigningKey;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, field, warn, Instrument};

use crate::config::Failover;
use crate::conn::ClientConn;
use crate::metrics::Kind;
use crate::pool::{connect, ActiveGuard, Node};
use crate::rebalance::Ticket;
use crate::response::{empty, out_of_descriptors, text_response, Body};
use crate::{tunnel, Error, Shared};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1): never forwarded as-is.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The hyper service of the client-facing listener.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ClientConn>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let kind = if is_upgrade(request.headers()) { Kind::ws } else { Kind::http };
    let span = tracing::debug_span!("request", ?kind, client = field::Empty, node = field::Empty);
    let response = forward(&shared, &conn, kind, request).instrument(span).await;
    shared.metrics.request(kind, response.status().as_u16());
    Ok(response)
}

/// Whether the request asks to switch protocols (`Connection: upgrade` plus `Upgrade`).
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// The request's client id, or a fresh one (`true` = minted here). With a signing key, a
/// found id must verify (a token's `sub` too) and a minted one is signed. The `token` source
/// reads a JWT's `sub` unverified: placement only, the node verifies the token.
fn client_id(
    request: &Request<Incoming>,
    order: &[IdSource],
    key: Option<&SigningKey>,
) -> Result<(String, bool), Error> {
    let headers = request.headers();
    // Browsers send one Cookie header (RFC 6265 §5.4); the Vec allocates only when one is there.
    let cookies: Vec<&[u8]> = headers.get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect();
    let found = extract_client_id(
        request.uri().query(),
        headers.get(CLIENT_ID_HEADER).map(HeaderValue::as_bytes),
        headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes),
        cookies.iter().copied(),
        order,
    )?;
    Ok(match found {
        Some(id) if key.is_some_and(|key| !key.verify(&id)) => {
            return Err(Error::UnsignedClientId { id: id.into_owned() })
        }
        Some(id) => (id.into_owned(), false),
        None => (key.map_or_else(mint_client_id, SigningKey::mint), true),
    })
}

async fn forward(
    shared: &Arc<Shared>,
    conn: &Arc<ClientConn>,
    kind: Kind,
    mut request: Request<Incoming>,
) -> Response<Body> {
    // The live config's settings at this request's start (a reload swaps it whole).
    let found = {
        let config = shared.config();
        client_id(&request, &config.hash_keys.id_order, config.signing_key.as_ref()).and_then(|(id, minted)| {
            let place = config.hash_keys.placement_key(request.uri().query())?.map(|(_, key)| key.to_owned());
            Ok((id, minted, place))
        })
    };
    let (id, minted, place) = match found {
        Ok(found) => found,
        Err(e) => {
            // Refused before any upgrade or node contact.
            let status = match &e {
                Error::UnsignedClientId { id } => {
                    debug!(peer = %conn.peer, client = %id, "refused an unsigned or forged id");
                    StatusCode::FORBIDDEN
                }
                _ => {
                    debug!(peer = %conn.peer, error = %e, "refused request");
                    StatusCode::BAD_REQUEST
                }
            };
            return text_response(status, e.to_string());
        }
    };
    let span = tracing::Span::current();
    span.record("client", id.as_str());
    // What the node is ranked by: the placement key when `hash_keys` names one and the
    // request carries it (every client of a room on one node), else the client id.
    let place = place.unwrap_or_else(|| id.clone());

    // Taken before the connect, as the node's signals are: a node that comes back meanwhile
    // (this client placed without it) still moves it.
    let rebalance_signal = (kind == Kind::ws).then(|| Ticket::signal_if_paced(shared)).flatten();
    let Upstream { index, stream, down, drain, guard } = match connect_ranked(shared, &place).await {
        Ok(upstream) => upstream,
        Err(NoUpstream::NoNode) => return text_response(StatusCode::SERVICE_UNAVAILABLE, "no node available"),
        Err(NoUpstream::OutOfDescriptors) => return out_of_descriptors(),
    };
    let node = shared.pool.get(index);
    span.record("node", node.name.as_str());
    let guard = Arc::new(guard);

    let client_upgrade = (kind == Kind::ws).then(|| hyper::upgrade::on(&mut request));
    if let Err(e) = prepare_upstream_request(&mut request, &id, conn.peer.ip(), conn.tls) {
        return text_response(StatusCode::BAD_REQUEST, e);
    }
    // Re-homing reads the frames it forwards: no extension (compression) may change them,
    // and a new node gets the same request again.
    let redial = (kind == Kind::ws && shared.config().failover == Failover::Rehome).then(|| {
        request.headers_mut().remove(header::SEC_WEBSOCKET_EXTENSIONS);
        tunnel::rehome::Redial { uri: request.uri().clone(), headers: request.headers().clone() }
    });

    let (mut sender, upstream) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(source) => return bad_gateway(&node, source),
    };
    let upstream_span = tracing::debug_span!("upstream", node = %node.name, client = %id);
    shared.tracker.spawn(
        drive_upstream(upstream, Arc::clone(&guard), down.clone(), shared.hard_stop.clone()).instrument(upstream_span),
    );

    let mut response = match sender.send_request(request).await {
        Ok(response) => response,
        Err(source) => return bad_gateway(&node, source),
    };

    let mut out = if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            // Cannot happen with a sane node: `Upgrade` was stripped from this request.
            warn!(node = %node.name, "node switched protocols without being asked");
            return text_response(StatusCode::BAD_GATEWAY, "node switched protocols unasked");
        };
        let node_upgrade = hyper::upgrade::on(&mut response);
        // Frame tracking (and so a clean 1012 on drain) only makes sense for WebSocket;
        // another upgraded protocol is simply cut on drain.
        let websocket =
            response.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let mut stops = tunnel::Stops::new(down, drain, shared.hard_stop.clone());
        stops.rebalance = Ticket::new(shared, &place, index, rebalance_signal.filter(|_| websocket)).map(Arc::new);
        // Debug level: the span lives as long as the tunnel, and a tunnel logs only at debug
        // (bar a can't-happen warning), so at the default level an info span would cost
        // memory per tunnel and a registry enter and exit per poll, for nothing.
        let tunnel_span = tracing::debug_span!(
            "tunnel",
            peer = %conn.peer,
            socket_peer = %conn.socket_peer,
            client = %id,
            node = %node.name,
            tls = conn.tls
        );
        // Plain TCP on both sides: an upgrade can hand it over. A TLS session cannot move to
        // another process: its tunnel stays in this one through an upgrade (drained after
        // `upgrade_drain_secs`).
        match redial.filter(|_| websocket) {
            Some(redial) => {
                let setup = tunnel::rehome::Setup {
                    shared: Arc::clone(shared),
                    id: id.clone(),
                    place,
                    index,
                    guard,
                    redial,
                    conn: Arc::clone(conn),
                    down: stops.node_down,
                    drain: stops.drain,
                    rebalance: stops.rebalance,
                };
                shared.tracker.spawn(tunnel::rehome::run(client_upgrade, node_upgrade, setup).instrument(tunnel_span));
            }
            None => {
                let movable = (!conn.tls).then(|| tunnel::Movable {
                    tunnels: Arc::clone(&shared.process.tunnels),
                    client_id: id.as_str().into(),
                    node: node.name.as_str().into(),
                });
                shared.tracker.spawn(
                    tunnel::run(client_upgrade, node_upgrade, websocket, stops, guard, Arc::clone(conn), movable)
                        .instrument(tunnel_span),
                );
            }
        }
        // The node's 101 headers (Upgrade, Connection, Sec-WebSocket-*) go back unchanged.
        let (parts, _) = response.into_parts();
        Response::from_parts(parts, empty())
    } else {
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Response::from_parts(parts, body.boxed())
    };
    if minted {
        if let Ok(cookie) = HeaderValue::from_str(&session_cookie(&id)) {
            out.headers_mut().append(header::SET_COOKIE, cookie);
        }
    }
    out
}

fn bad_gateway(node: &Node, source: hyper::Error) -> Response<Body> {
    let e = Error::NodeHttp { node: node.name.clone(), source };
    debug!(error = %e, "upstream exchange failed");
    text_response(StatusCode::BAD_GATEWAY, format!("node {} failed", node.name))
}

/// A connected upstream: which node, the stream, and the node's signals as they were *before*
/// connecting (so a flip or a drain during the connect is not missed).
struct Upstream {
    index: usize,
    stream: TcpStream,
    down: CancellationToken,
    drain: CancellationToken,
    /// Counted on the node from its choice on (see [`ActiveGuard::reserve`]).
    guard: ActiveGuard,
}

/// Why [`connect_ranked`] found no upstream.
enum NoUpstream {
    /// Every node of the client's rank is down, drained, or failed its connect.
    NoNode,
    /// The connect failed with EMFILE/ENFILE: the balancer's own shortage, no node's fault.
    OutOfDescriptors,
}

/// Connects to the best usable node for placement key `id` (the client id, or the value of a
/// `query:NAME` placement parameter), and on a failed connect marks that node down
/// and tries the next one in the key's rank — unless the connect failed because the
/// balancer is out of file descriptors, which says nothing about the node.
async fn connect_ranked(shared: &Shared, id: &str) -> Result<Upstream, NoUpstream> {
    // Every failure marks one node down (or finds it drained), so this ends; the bound only
    // guards against probes reviving nodes as fast as connects fail.
    for _ in 0..shared.pool.slots() {
        let index = shared.pool.pick(id, shared.config().balance).ok_or(NoUpstream::NoNode)?;
        let node = shared.pool.get(index);
        let down = node.down_signal();
        let drain = node.drain_signal();
        if node.is_draining() {
            // Drained between `pick` and here: not a failure, just no longer a candidate.
            continue;
        }
        let connect_timeout = shared.config().connect_timeout;
        let guard = ActiveGuard::reserve(&node);
        match connect(&node, connect_timeout).await {
            Ok(stream) => {
                guard.opened();
                return Ok(Upstream { index, stream, down, drain, guard });
            }
            Err(Error::NodeConnect { source, .. }) if is_out_of_descriptors(&source) => {
                debug!(error = %source, "upstream connect: out of file descriptors; refusing with 503");
                return Err(NoUpstream::OutOfDescriptors);
            }
            Err(e) => {
                node.metrics.connect_failures.inc();
                debug!(error = %e, "upstream connect failed; trying the next node");
                match e {
                    Error::NodeConnectTimeout { .. } => node.mark_suspect(&e.to_string()),
                    _ => node.mark_down(&e.to_string()),
                }
            }
        }
    }
    Err(NoUpstream::NoNode)
}

/// Keeps the upstream HTTP connection going until it ends (or hands itself over to a tunnel),
/// the node goes down, or the shutdown grace is over.
async fn drive_upstream(
    upstream: hyper::client::conn::http1::Connection<TokioIo<TcpStream>, Incoming>,
    guard: Arc<ActiveGuard>,
    down: CancellationToken,
    hard_stop: CancellationToken,
) {
    tokio::select! {
        result = upstream.with_upgrades() => {
            if let Err(e) = result {
                debug!(error = %e, "upstream connection ended with an error");
            }
        }
        _ = down.cancelled() => debug!("node went down; upstream connection closed"),
        _ = hard_stop.cancelled() => {}
    }
    drop(guard);
}

/// Turns the client's request into the node's: origin-form URI, hop-by-hop headers dropped
/// (the upgrade pair restored for WebSockets), `X-Client-Id` set to the chosen id whatever the
/// client sent, and the client's address given (see [`set_forwarded`]).
fn prepare_upstream_request<B>(
    request: &mut Request<B>,
    id: &str,
    peer: IpAddr,
    tls: bool,
) -> Result<(), &'static str> {
    let path = request.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);

    let headers = request.headers_mut();
    let upgrade = is_upgrade(headers).then(|| headers.get(header::UPGRADE).cloned()).flatten();
    strip_hop_by_hop(headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    let id = HeaderValue::from_str(id).map_err(|_| "client id is not a header value")?;
    headers.insert(HeaderName::from_static(CLIENT_ID_HEADER), id);
    set_forwarded(headers, peer, tls);
    Ok(())
}

/// Tells the node who the client is: its real address (from the PROXY header, else the
/// socket) appended to `X-Forwarded-For`, and `X-Real-IP` and `X-Forwarded-Proto` set —
/// replacing whatever the client sent, which a node trusting us must not believe.
/// `X-Forwarded-For` is appended rather than replaced because the earlier entries are the
/// chain the client came through; a node reads it from the right, past its trusted proxies.
pub(crate) fn set_forwarded(headers: &mut HeaderMap, peer: IpAddr, tls: bool) {
    let peer = peer.to_canonical();
    append_forwarded_for(headers, peer);
    // An address always makes a valid header value.
    if let Ok(value) = HeaderValue::from_str(&peer.to_string()) {
        headers.insert(X_REAL_IP, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if tls { "https" } else { "http" }));
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        // A client cannot make us drop what identifies the request.
        .filter(|name| *name != header::HOST && name.as_str() != SESSION_COOKIE)
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: IpAddr) {
    let mut value = String::new();
    for earlier in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(earlier) = earlier.to_str() {
            let earlier = earlier.trim();
            if !earlier.is_empty() {
                value.push_str(earlier);
                value.push_str(", ");
            }
        }
    }
    value.push_str(&peer.to_string());
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)], uri: &str) -> Request<()> {
        let mut builder = Request::get(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn upstream_request_keeps_the_upgrade_and_drops_other_hop_headers() {
        let mut r = request(
            &[
                ("host", "example"),
                ("connection", "keep-alive, Upgrade, x-secret"),
                ("upgrade", "websocket"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("sec-websocket-key", "abc"),
                ("x-client-id", "spoofed"),
            ],
            "http://example/ws?client=alice",
        );
        prepare_upstream_request(&mut r, "alice", "10.0.0.9".parse().unwrap(), false).unwrap();
        assert_eq!(r.uri(), "/ws?client=alice");
        let h = r.headers();
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "abc");
        assert_eq!(h["host"], "example");
        assert_eq!(h["x-client-id"], "alice");
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert!(!h.contains_key("x-secret"));
        assert!(!h.contains_key("keep-alive"));
    }

    #[test]
    fn plain_requests_lose_upgrade_headers_and_forwarded_for_is_appended() {
        let mut r = request(
            &[
                ("upgrade", "websocket"),
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-for", "2.2.2.2"),
                ("transfer-encoding", "chunked"),
            ],
            "/api",
        );
        prepare_upstream_request(&mut r, "bob", "::1".parse().unwrap(), true).unwrap();
        let h = r.headers();
        assert!(!h.contains_key("upgrade"), "no Connection: upgrade, no upgrade");
        assert!(!h.contains_key("transfer-encoding"));
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, ::1");
        assert_eq!(h["x-real-ip"], "::1");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn real_ip_and_proto_replace_what_the_client_sent() {
        let mut r = request(
            &[
                ("x-real-ip", "6.6.6.6"),
                ("x-real-ip", "7.7.7.7"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-for", "6.6.6.6"),
            ],
            "/",
        );
        // An IPv4-mapped address is written as the IPv4 it is.
        prepare_upstream_request(&mut r, "carol", "::ffff:203.0.113.5".parse().unwrap(), false).unwrap();
        let h = r.headers();
        let real: Vec<_> = h.get_all("x-real-ip").iter().collect();
        assert_eq!(real, ["203.0.113.5"]);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-for"], "6.6.6.6, 203.0.113.5");
    }

    #[test]
    fn upgrade_detection_needs_both_headers() {
        let both = request(&[("connection", "Upgrade"), ("upgrade", "websocket")], "/");
        assert!(is_upgrade(both.headers()));
        let no_conn = request(&[("upgrade", "websocket")], "/");
        assert!(!is_upgrade(no_conn.headers()));
        let no_upgrade = request(&[("connection", "upgrade")], "/");
        assert!(!is_upgrade(no_upgrade.headers()));
    }
}
