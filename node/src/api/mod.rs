//! The server API (`/api/…`, `docs/API.md`): what an application's backend calls to publish
//! into rooms and manage clients, over plain HTTP/1.1 with JSON bodies.
//!
//! [`crate::server`] hands every request whose path starts with `/api/` to [`handle`], which
//! checks that the API is on and the key (constant time), the method, reads the body with a
//! limit (`max_message_bytes`), dispatches, and answers errors as
//! `{"error":{"code","message"}}` with the wire's [`ErrorCode`]s. Every call is one `info` log
//! line (method, path, status, duration, room/client; never the key or the body) and one count
//! in `tether_node_api_requests`.
//!
//! One file per group of calls:
//! - [`publish`]: `POST /api/publish`, `POST /api/broadcast`;
//! - [`query`]: `GET /api/presence`, `GET /api/online`, `GET /api/history`;
//! - [`manage`]: `POST /api/disconnect`, `POST /api/unsubscribe` (cluster-wide, through the
//!   backbone's control channel).

mod manage;
mod publish;
mod query;

use crate::backbone::BackboneError;
use crate::metrics::ApiLabel;
use crate::state::NodeState;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;
use tether_proto::wire::ErrorCode;
use tracing::info;

/// The header an API key may come in instead of `Authorization: apikey KEY`.
pub const API_KEY_HEADER: &str = "x-api-key";

/// A call that failed: its HTTP status, and the code and message of its error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    /// 400 with `code`: the caller's request was wrong.
    pub fn bad(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn missing(field: &str) -> Self {
        Self::bad(ErrorCode::MissingField, format!("`{field}` is required"))
    }

    /// The backbone could not do it: 503, the node itself is fine.
    pub fn backbone(e: &BackboneError) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::BackboneUnavailable, e.to_string())
    }

    /// `{"code","message"}`: the inside of an error body (also a broadcast's per-room error).
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody { code: self.code, message: &self.message }
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub code: ErrorCode,
    pub message: &'a str,
}

/// What a call answers: a JSON body with 200, or an error.
pub type Answer = Result<String, ApiError>;

/// What a request's log line says besides method, path and status.
#[derive(Debug, Default)]
pub struct Logged {
    pub room: Option<String>,
    pub client: Option<String>,
}

/// The calls, by path; `name` labels the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Publish,
    Broadcast,
    Presence,
    Online,
    History,
    Disconnect,
    Unsubscribe,
}

impl Endpoint {
    fn of(path: &str) -> Option<Self> {
        Some(match path {
            "/api/publish" => Self::Publish,
            "/api/broadcast" => Self::Broadcast,
            "/api/presence" => Self::Presence,
            "/api/online" => Self::Online,
            "/api/history" => Self::History,
            "/api/disconnect" => Self::Disconnect,
            "/api/unsubscribe" => Self::Unsubscribe,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Broadcast => "broadcast",
            Self::Presence => "presence",
            Self::Online => "online",
            Self::History => "history",
            Self::Disconnect => "disconnect",
            Self::Unsubscribe => "unsubscribe",
        }
    }

    fn method(self) -> Method {
        match self {
            Self::Presence | Self::Online | Self::History => Method::GET,
            _ => Method::POST,
        }
    }

    fn allow(self) -> HeaderValue {
        HeaderValue::from_static(if self.method() == Method::GET { "GET" } else { "POST" })
    }
}

/// Serves one `/api/…` request; never fails (every failure is an error answer).
pub async fn handle(req: Request<Incoming>, state: Arc<NodeState>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let endpoint = Endpoint::of(&path);
    let mut logged = Logged::default();
    let answer = answer(req, endpoint, &state, &mut logged).await;
    let response = match answer {
        Ok(body) => json(StatusCode::OK, body),
        Err(e) => error_response(&e, endpoint),
    };
    let status = response.status().as_u16();
    let label = ApiLabel { endpoint: endpoint.map_or("unknown", Endpoint::name), status };
    state.metrics.api_requests.get_or_create(&label).inc();
    info!(
        method = %method,
        path,
        status,
        duration_us = started.elapsed().as_micros() as u64,
        room = logged.room.as_deref(),
        client = logged.client.as_deref(),
        "api request"
    );
    response
}

async fn answer(req: Request<Incoming>, endpoint: Option<Endpoint>, state: &NodeState, logged: &mut Logged) -> Answer {
    let Some(key) = &state.cfg.api_key else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "the server API is off on this node: set `[api] key` in its config, --api-key or TETHER_API_KEY",
        ));
    };
    if !presented_key(&req).is_some_and(|given| key.matches(given)) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing or wrong API key: send `Authorization: apikey KEY` or `X-API-Key: KEY`",
        ));
    }
    let Some(endpoint) = endpoint else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("no such API call: {}", req.uri().path()),
        ));
    };
    if req.method() != endpoint.method() {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            format!("{} takes {}", req.uri().path(), endpoint.method()),
        ));
    }
    match endpoint {
        Endpoint::Presence => query::presence(req.uri().query(), state, logged).await,
        Endpoint::Online => query::online(state).await,
        Endpoint::History => query::history(req.uri().query(), state, logged).await,
        Endpoint::Publish => publish::publish(read_json(req, state).await?, state, logged).await,
        Endpoint::Broadcast => publish::broadcast(read_json(req, state).await?, state).await,
        Endpoint::Disconnect => manage::disconnect(read_json(req, state).await?, state, logged).await,
        Endpoint::Unsubscribe => manage::unsubscribe(read_json(req, state).await?, state, logged).await,
    }
}

/// The key from `Authorization: apikey KEY` (scheme case-insensitive) or `X-API-Key: KEY`.
fn presented_key<B>(req: &Request<B>) -> Option<&[u8]> {
    let headers = req.headers();
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"apikey ") {
            return Some(v[7..].trim_ascii());
        }
    }
    headers.get(API_KEY_HEADER).map(|v| v.as_bytes().trim_ascii())
}

/// The body, at most `max_message_bytes` of it (never more is buffered), parsed as `T`.
async fn read_json<T: DeserializeOwned>(req: Request<Incoming>, state: &NodeState) -> Result<T, ApiError> {
    let limit = state.cfg.max_message_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!("the body is over max_message_bytes ({limit} bytes)"),
        )
    };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(e) => return Err(ApiError::bad(ErrorCode::BadJson, format!("could not read the body: {e}"))),
    };
    parse_json(&body)
}

/// Parses a JSON object body: `bad_json` when it is not JSON or not an object, `invalid_field`
/// when a field has the wrong type or is unknown.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(ApiError::bad(ErrorCode::BadJson, "the body must be a JSON object"));
    }
    serde_json::from_slice(body).map_err(|e| {
        let code = match e.classify() {
            serde_json::error::Category::Data => ErrorCode::InvalidField,
            _ => ErrorCode::BadJson,
        };
        ApiError::bad(code, e.to_string())
    })
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError, endpoint: Option<Endpoint>) -> Response<Full<Bytes>> {
    #[derive(Serialize)]
    struct Wrapped<'a> {
        error: ErrorBody<'a>,
    }
    // A code and a string always serialise.
    let body = serde_json::to_string(&Wrapped { error: e.body() }).expect("error bodies serialise");
    let mut r = json(e.status, body);
    if e.status == StatusCode::METHOD_NOT_ALLOWED {
        if let Some(endpoint) = endpoint {
            r.headers_mut().insert(header::ALLOW, endpoint.allow());
        }
    }
    r
}

/// A JSON text for a value that always serialises (our own answer types).
fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("API answers serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/api/online");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_key_comes_from_either_header() {
        assert_eq!(presented_key(&req(&[("authorization", "apikey k1")])), Some(&b"k1"[..]));
        assert_eq!(presented_key(&req(&[("authorization", "ApiKey  k1 ")])), Some(&b"k1"[..]));
        assert_eq!(presented_key(&req(&[("x-api-key", "k2")])), Some(&b"k2"[..]));
        assert_eq!(presented_key(&req(&[("authorization", "Bearer k1")])), None);
        assert_eq!(presented_key(&req(&[])), None);
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[allow(dead_code)]
        room: Option<String>,
    }

    #[test]
    fn bodies_are_sorted_into_codes() {
        let code = |b: &[u8]| parse_json::<Body>(b).unwrap_err().code;
        assert_eq!(code(b"nope"), ErrorCode::BadJson);
        assert_eq!(code(b"[1]"), ErrorCode::BadJson);
        assert_eq!(code(b"{\"room\":"), ErrorCode::BadJson);
        assert_eq!(code(b"{\"room\":1}"), ErrorCode::InvalidField);
        assert_eq!(code(b"{\"rooom\":\"a\"}"), ErrorCode::InvalidField);
        assert!(parse_json::<Body>(b" {\"room\":\"a\"}").is_ok());
    }
}
