//! The admin listener's endpoints: `/status`, `/route`, `/metrics`, node drain/undrain,
//! `POST /upgrade` and a small HTML page. It runs on its own port so that operators and Prometheus never compete
//! with clients, and it only reads the pool (drain flags aside): nothing here blocks routing.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use tether_proto::id::{query_param, validate_client_id};

use crate::response::{full, text_response, Body};
use crate::Shared;

/// Content type of the Prometheus exposition (prometheus-client writes OpenMetrics text).
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Serialize)]
struct Status<'a> {
    nodes: Vec<NodeStatus>,
    /// Open upstream connections over all nodes.
    active_connections: i64,
    placement: Placement,
    /// Open client connections (tunnels included), out of `max_connections`.
    client_connections: usize,
    max_connections: usize,
    /// `rlimit_nofile` (derived from the open-file limit) or `configured`.
    max_connections_source: &'static str,
    /// Per-IP limits (0 = off) beside the global one.
    max_connections_per_ip: u32,
    connect_rate_per_ip: f64,
    connect_burst_per_ip: u32,
    /// Source addresses (IPv6: /64s) the per-IP table tracks now.
    per_ip_entries: usize,
    /// `off`, `v1`, `v2` or `any`.
    proxy_protocol: &'static str,
    /// The soft `RLIMIT_NOFILE` in force (after the start-up raise), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    nofile_limit: Option<u64>,
    /// How the latest SIGHUP reload went; absent before the first one.
    #[serde(skip_serializing_if = "Option::is_none")]
    reload: Option<crate::reload::Outcome>,
    pid: u32,
    /// RFC 3339, UTC.
    started_at: &'a str,
    /// 1 for a fresh start, +1 per upgrade.
    generation: u64,
    /// The latest upgrade attempt of this process, once there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    upgrade: Option<crate::upgrade::Attempt>,
}

#[derive(Serialize)]
struct NodeStatus {
    name: String,
    addr: String,
    state: &'static str,
    active_connections: i64,
    total_connections: u64,
    /// Clients waiting for their turn to move here (a paced rebalance in progress).
    rebalance_pending: i64,
    /// Clients a paced rebalance moved here so far.
    rebalance_moves: u64,
    /// The registry instance of a discovered node; absent for a static one.
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<String>,
}

/// How connections are placed and whether returning nodes take clients back.
#[derive(Serialize)]
struct Placement {
    /// `hrw` or `bounded`.
    balance: &'static str,
    /// Under `bounded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    load_factor: Option<f64>,
    /// `off` or `paced`.
    rebalance: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rebalance_per_sec: Option<f64>,
    /// Nodes a paced rebalance is moving clients to now.
    rebalancing: Vec<String>,
}

#[derive(Serialize)]
struct Route<'a> {
    /// The client id asked about; absent when only a placement key was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a str>,
    /// `query:NAME` when the answer is for a placement key (the value of query parameter NAME,
    /// which `hash_keys` ranks nodes by instead of the id); absent when placed by the id.
    #[serde(skip_serializing_if = "Option::is_none")]
    placed_by: Option<String>,
    /// That placement key.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    node: &'a str,
    addr: &'a str,
    state: &'static str,
    /// The client's full preference order, whatever the nodes' states.
    rank: Vec<String>,
    /// Whether the id carries the signing key's signature; only present when a key is set
    /// and a client id was given (the proxy refuses unsigned ids with 403, this endpoint
    /// answers for any valid id).
    #[serde(skip_serializing_if = "Option::is_none")]
    signed: Option<bool>,
}

#[derive(Serialize)]
struct Drained<'a> {
    node: &'a str,
    state: &'static str,
    changed: bool,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

/// The hyper service of the admin listener.
pub(crate) async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path();
    let method = request.method();
    let response = match path {
        "/" | "/status" | "/route" | "/metrics" if method != Method::GET => method_not_allowed("GET"),
        "/upgrade" if method != Method::POST => method_not_allowed("POST"),
        "/upgrade" => upgrade(&shared),
        "/" => html(&shared),
        "/status" => json(StatusCode::OK, &status(&shared)),
        "/route" => route(&shared, request.uri().query()),
        "/metrics" => {
            let mut response = Response::new(full(shared.metrics.encode()));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            response
        }
        _ => match path.strip_prefix("/nodes/").and_then(|r| r.rsplit_once('/')) {
            Some((name, action @ ("drain" | "undrain"))) => {
                if method != Method::POST {
                    method_not_allowed("POST")
                } else {
                    drain(&shared, name, action == "drain")
                }
            }
            _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
        },
    };
    Ok(response)
}

fn status(shared: &Shared) -> Status<'_> {
    let config = shared.config();
    Status {
        nodes: shared
            .pool
            .nodes()
            .iter()
            .map(|n| NodeStatus {
                name: n.name.clone(),
                addr: n.addr.clone(),
                state: n.state_str(),
                active_connections: n.metrics.active.get(),
                total_connections: n.metrics.connections.get(),
                rebalance_pending: n.metrics.rebalance_pending.get(),
                rebalance_moves: n.metrics.rebalance_moves.get(),
                instance: n.instance.clone(),
            })
            .collect(),
        active_connections: shared.pool.active_connections(),
        placement: Placement {
            balance: config.balance.as_str(),
            load_factor: config.balance.load_factor(),
            rebalance: config.rebalance.as_str(),
            rebalance_per_sec: match config.rebalance {
                crate::rebalance::Rebalance::Paced { per_sec } => Some(per_sec),
                crate::rebalance::Rebalance::Off => None,
            },
            rebalancing: shared.rebalancer.returning(),
        },
        client_connections: config.max_connections.saturating_sub(shared.client_slots.available_permits()),
        max_connections: config.max_connections,
        max_connections_source: config.connection_limit.source(),
        max_connections_per_ip: config.max_connections_per_ip,
        connect_rate_per_ip: config.connect_rate_per_ip,
        connect_burst_per_ip: config.connect_burst_per_ip,
        per_ip_entries: shared.per_ip.len(),
        proxy_protocol: config.proxy_protocol.as_str(),
        nofile_limit: config.connection_limit.nofile,
        reload: shared.reload_outcome(),
        pid: shared.process.pid,
        started_at: &shared.process.started_at,
        generation: shared.process.generation,
        upgrade: shared.process.last_attempt(),
    }
}

#[derive(Serialize)]
struct UpgradeStarted {
    upgrade: &'static str,
    pid: u32,
    generation: u64,
}

/// `POST /upgrade`: starts one in the background (202); its outcome shows in `/status`.
fn upgrade(shared: &Arc<Shared>) -> Response<Body> {
    use crate::upgrade::{Process, Refused};
    match Process::request(shared) {
        Ok(()) => json(
            StatusCode::ACCEPTED,
            &UpgradeStarted { upgrade: "started", pid: shared.process.pid, generation: shared.process.generation },
        ),
        Err(Refused::InProgress) => error(StatusCode::CONFLICT, "an upgrade is already in progress"),
        Err(Refused::Unavailable) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "this balancer was not started as a binary that can upgrade")
        }
    }
}

/// `GET /route?client=ID`, and — when `hash_keys` names `query:NAME` — `GET /route?NAME=KEY`:
/// the node a connection with that query would go to now. As for a connection, a placement
/// key present wins over the id.
fn route(shared: &Shared, query: Option<&str>) -> Response<Body> {
    let config = shared.config();
    let client = query.and_then(|q| query_param(q, "client"));
    if let Some(Err(e)) = client.map(validate_client_id) {
        return error(StatusCode::BAD_REQUEST, &e.to_string());
    }
    let placement = match config.hash_keys.placement_key(query) {
        Ok(found) => found,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let Some(key) = placement.map(|(_, key)| key).or(client) else {
        let also: String = config.hash_keys.place_by.iter().map(|name| format!(" or {name}")).collect();
        return error(StatusCode::BAD_REQUEST, &format!("missing query parameter client{also}"));
    };
    let Some(index) = shared.pool.pick(key, config.balance) else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no node available");
    };
    let node = shared.pool.get(index);
    json(
        StatusCode::OK,
        &Route {
            client,
            placed_by: placement.map(|(name, _)| format!("{}{name}", tether_proto::placement::QUERY_PREFIX)),
            key: placement.map(|(_, key)| key),
            node: &node.name,
            addr: &node.addr,
            state: node.state_str(),
            rank: shared.pool.rank(key),
            signed: client.and_then(|c| config.signing_key.as_ref().map(|key| key.verify(c))),
        },
    )
}

fn drain(shared: &Shared, name: &str, on: bool) -> Response<Body> {
    let Some(node) = shared.pool.by_name(name) else {
        return error(StatusCode::NOT_FOUND, "unknown node");
    };
    let changed = node.set_draining(on);
    if changed && !on && node.health() == crate::pool::Health::Up {
        // Undrained: available again, as a node that comes back up is.
        if let Some(index) = shared.pool.nodes().iter().position(|n| n.name == name) {
            crate::rebalance::node_available(shared, index);
        }
    }
    json(StatusCode::OK, &Drained { node: &node.name, state: node.state_str(), changed })
}

fn html(shared: &Shared) -> Response<Body> {
    let status = status(shared);
    let mut page = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"2\">\
         <title>tether-balancer</title>\
         <style>body{font-family:sans-serif}td,th{padding:2px 12px;text-align:left}\
         .up{color:green}.unready{color:darkorange}.down{color:red}.draining{color:gray}</style>\
         </head><body><h1>tether-balancer</h1>\n<table>\
         <tr><th>node</th><th>address</th><th>state</th><th>active</th><th>total</th></tr>\n",
    );
    for n in &status.nodes {
        // Writing into a String cannot fail.
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td class=\"{state}\">{state}</td><td>{}</td><td>{}</td></tr>",
            escape(&n.name),
            escape(&n.addr),
            n.active_connections,
            n.total_connections,
            state = n.state,
        );
    }
    let _ = write!(
        page,
        "</table>\n<p>{} active upstream connections. \
         <a href=\"/status\">status</a> · <a href=\"/metrics\">metrics</a></p></body></html>\n",
        status.active_connections
    );
    let mut response = Response::new(full(page));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    response
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            let mut response = Response::new(full(bytes));
            *response.status_mut() = status;
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => text_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &ErrorBody { error: message })
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn html_escapes_markup() {
        assert_eq!(escape("<a href='x'>&\""), "&lt;a href=&#39;x&#39;&gt;&amp;&quot;");
    }
}
