//! The responses the balancer writes itself, rather than forwards from a node: their body
//! type, plain-text answers, and the two 503s of a balancer short of connections or of file
//! descriptors, and the 429 of a per-IP limit. Both listeners (`proxy`, `admin`) and the accept loop (`server`) use them.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

use crate::config::RETRY_AFTER_SECS;

/// Body type of every response the balancer produces.
pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

pub(crate) fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub(crate) fn text_response(status: StatusCode, text: impl Into<String>) -> Response<Body> {
    let mut text = text.into();
    text.push('\n');
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// The answer past `max_connections`: 503 with `Retry-After`; the connection then closes.
pub(crate) fn at_capacity(max_connections: usize) -> Response<Body> {
    let mut response = text_response(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("balancer is at max_connections ({max_connections}); retry in {RETRY_AFTER_SECS} s"),
    );
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    response
}

/// The answer to a connection over a per-IP limit: 429 with `Retry-After` (1 s for the
/// connection cap, until the next token for the rate); the connection then closes.
pub(crate) fn per_ip_limit(refusal: crate::per_ip::Refusal) -> Response<Body> {
    let what = match refusal.reason {
        crate::per_ip::Reason::connections => "too many connections from your address (max_connections_per_ip)",
        crate::per_ip::Reason::rate => "too many new connections from your address (connect_rate_per_ip)",
    };
    let secs = refusal.retry_after_secs;
    let mut response = text_response(StatusCode::TOO_MANY_REQUESTS, format!("{what}; retry in {secs} s"));
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

/// The answer when a node connect failed with EMFILE/ENFILE: 503 with `Retry-After`, the
/// node left alone.
pub(crate) fn out_of_descriptors() -> Response<Body> {
    let mut response = text_response(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("balancer is out of file descriptors; retry in {RETRY_AFTER_SECS} s"),
    );
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    response
}
