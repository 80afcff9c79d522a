//! The server API through the balancer: a request whose path starts with `/api/` belongs to
//! no client, so it is not routed by client id. It goes to any usable node, round robin
//! ([`crate::pool::Pool::api_order`]), with its body buffered (at most [`API_BODY_LIMIT`],
//! 413 beyond) so that it can be sent again: when the connect fails (the node is marked down,
//! as for any request), the node answers 503, or the exchange fails before any answer, the
//! next node is tried. No client id is minted and no cookie set. When no node takes it, the
//! answer is the API's own error shape: 503 `backbone_unavailable`.
//!
//! A retried `POST /api/publish` cannot deliver twice only when it carries an
//! `idempotency_key` (an exchange that failed after the node published looks the same as one
//! that failed before); `docs/API.md` says so.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, Instrument};

use crate::conn::ClientConn;
use crate::metrics::Kind;
use crate::pool::connect;
use crate::proxy::{set_forwarded, strip_hop_by_hop};
use crate::response::{full, Body};
use crate::{Error, Shared};

/// Largest API request body the balancer buffers (the node's own limit, `max_message_bytes`,
/// is usually lower and answers 413 itself).
pub const API_BODY_LIMIT: usize = 1024 * 1024;

/// Whether a request is for the server API.
pub(crate) fn is_api(request: &Request<Incoming>) -> bool {
    request.uri().path().starts_with("/api/")
}

/// The hyper service for `/api/` requests on the client-facing listener.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ClientConn>,
    request: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let span = tracing::debug_span!("api", path = %request.uri().path());
    let response = forward(&shared, &conn, request).instrument(span).await;
    shared.metrics.request(Kind::api, response.status().as_u16());
    Ok(response)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

async fn forward(shared: &Shared, conn: &ClientConn, request: Request<Incoming>) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let body = match Limited::new(body, API_BODY_LIMIT).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let message = format!("the body is over the balancer's limit ({API_BODY_LIMIT} bytes)");
            return error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", &message);
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_json", &format!("could not read the body: {e}")),
    };
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::from(path);
    strip_hop_by_hop(&mut parts.headers);
    set_forwarded(&mut parts.headers, conn.peer.ip(), conn.tls);
    let turn = shared.api_turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for index in shared.pool.api_order(turn) {
        let node = shared.pool.get(index);
        let connect_timeout = shared.config().connect_timeout;
        let stream = match connect(&node, connect_timeout).await {
            Ok(stream) => stream,
            Err(e) => {
                node.metrics.connect_failures.inc();
                debug!(error = %e, "api: upstream connect failed; trying the next node");
                match e {
                    Error::NodeConnectTimeout { .. } => node.mark_suspect(&e.to_string()),
                    _ => node.mark_down(&e.to_string()),
                }
                continue;
            }
        };
        let (mut sender, upstream) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(pair) => pair,
            Err(e) => {
                debug!(node = %node.name, error = %e, "api: handshake failed; trying the next node");
                continue;
            }
        };
        let hard_stop = shared.hard_stop.clone();
        shared.tracker.spawn(async move {
            tokio::select! {
                r = upstream => if let Err(e) = r { debug!(error = %e, "api upstream connection ended with an error") },
                _ = hard_stop.cancelled() => {}
            }
        });
        let mut attempt = Request::from_parts(parts.clone(), Full::new(body.clone()));
        *attempt.version_mut() = http::Version::HTTP_11;
        match sender.send_request(attempt).await {
            Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                debug!(node = %node.name, "api: node answered 503; trying the next node");
            }
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                return Response::from_parts(parts, body.boxed());
            }
            Err(e) => debug!(node = %node.name, error = %e, "api: exchange failed; trying the next node"),
        }
    }
    error(StatusCode::SERVICE_UNAVAILABLE, "backbone_unavailable", "no node could take the API request")
}
