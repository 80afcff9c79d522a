//! The responses the balancer writes itself, rather than forwards from a node: their body
//! type, plain-text answers, and the two 503s of a balancer short of connections or of file
//! descriptors. Both listeners (`proxy`, `admin`) and the accept loop (`server`) use them.

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
