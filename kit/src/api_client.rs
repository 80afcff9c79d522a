//! A keep-alive HTTP/1.1 client of the nodes' server API (`/api/…`, `docs/API.md`), on one
//! connection: what the API tests and `tether bench api` send their calls with.

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// How long one call may take before it is an error.
pub const API_CALL_DEADLINE: Duration = Duration::from_secs(10);

/// One connection to a node or balancer, sending `Authorization: apikey KEY` when it has a key.
pub struct ApiClient {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    key: Option<String>,
}

/// An answer: the HTTP status and the body (parsed when it is JSON, else a JSON string).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiAnswer {
    pub status: u16,
    pub body: Value,
}

impl ApiClient {
    pub async fn connect(addr: SocketAddr, key: Option<&str>) -> Result<Self> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender, host: addr.to_string(), key: key.map(str::to_owned) })
    }

    /// Whether the connection can still take a call (the server may have closed it).
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }

    /// `method path` with `body` and extra `headers` (the key header is added unless one of
    /// them is an authorization header).
    pub async fn call_with(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<ApiAnswer> {
        self.sender.ready().await.context("connection not ready")?;
        let mut req = Request::builder().method(method).uri(path).header(header::HOST, &self.host);
        let has_auth =
            headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("authorization") || k.eq_ignore_ascii_case("x-api-key"));
        if let (Some(key), false) = (&self.key, has_auth) {
            req = req.header(header::AUTHORIZATION, format!("apikey {key}"));
        }
        for (k, v) in headers {
            req = req.header(HeaderName::from_bytes(k.as_bytes())?, HeaderValue::from_str(v)?);
        }
        if !body.is_empty() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body))?;
        let resp = tokio::time::timeout(API_CALL_DEADLINE, self.sender.send_request(req))
            .await
            .map_err(|_| anyhow!("{path}: no answer within {API_CALL_DEADLINE:?}"))??;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(ApiAnswer { status, body })
    }

    /// `POST path` with `body` as JSON.
    pub async fn post(&mut self, path: &str, body: &Value) -> Result<ApiAnswer> {
        self.call_with(Method::POST, path, &[], Bytes::from(body.to_string())).await
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> Result<ApiAnswer> {
        self.call_with(Method::GET, path, &[], Bytes::new()).await
    }
}
