//! Opening a WebSocket to the next node of a re-homing tunnel's client: the client's own
//! upgrade request (as first forwarded: its path, id, token, cookies, forwarded addresses)
//! sent again, to the best usable node it has not just left, over hyper's client, which hands
//! back the socket and any bytes read past the 101.

use std::sync::Arc;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tether_proto::limits::is_out_of_descriptors;
use tokio::net::TcpStream;
use tracing::debug;

use crate::pool::connect;
use crate::pool::ActiveGuard;
use crate::{Error, Shared};

/// What a re-homing tunnel sends a new node: the upgrade request the first node got.
#[derive(Debug, Clone)]
pub(crate) struct Redial {
    pub uri: Uri,
    pub headers: HeaderMap,
}

impl Redial {
    /// The upgrade request for the next node: the first one, but with `token` (one the client
    /// refreshed since, a node accepted it) in place of the token it carried, wherever it
    /// carried one (the `token` query parameter, `Authorization: Bearer`).
    fn request(&self, token: Option<&str>) -> Request<Empty<Bytes>> {
        let mut uri = self.uri.clone();
        let mut headers = self.headers.clone();
        if let Some(token) = token {
            if let Some(query) =
                uri.query().filter(|q| q.split('&').any(|pair| pair.split('=').next() == Some("token")))
            {
                let query: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split('=').next() {
                        Some("token") => format!("token={token}"),
                        _ => pair.to_owned(),
                    })
                    .collect();
                let mut parts = uri.clone().into_parts();
                let with = format!("{}?{}", uri.path(), query.join("&"));
                if let Ok(pq) = http::uri::PathAndQuery::try_from(with) {
                    parts.path_and_query = Some(pq);
                    if let Ok(changed) = Uri::from_parts(parts) {
                        uri = changed;
                    }
                }
            }
            let bearer = headers
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer "));
            if bearer {
                if let Ok(value) = HeaderValue::try_from(format!("Bearer {token}")) {
                    headers.insert(AUTHORIZATION, value);
                }
            }
        }
        let mut request = Request::get(uri).body(Empty::<Bytes>::new()).expect("a GET with a valid URI");
        *request.headers_mut() = headers;
        request
    }
}

/// A node's WebSocket, opened.
pub(super) struct Dialed {
    pub index: usize,
    pub stream: TcpStream,
    /// The node's first bytes, read along with its 101.
    pub early: Bytes,
    pub guard: Arc<ActiveGuard>,
}

/// Why no node could be opened.
#[derive(Debug)]
pub(super) enum NoDial {
    /// No usable node right now (all down, drained or just failed): try again shortly.
    NoNode,
    /// A node answered the upgrade with 4xx: the client's request itself is refused (its
    /// token expired, say); no other node will say otherwise.
    Refused(StatusCode),
}

/// Connects the best node for placement key `place` (the client id, or the value of its
/// `query:NAME` placement parameter) not in `except`, and upgrades (with the client's refreshed
/// `token`, if any); a node that fails (connect, HTTP, a non-101 answer other than a 4xx) is
/// added to `except` and the next one tried.
pub(super) async fn dial(
    shared: &Shared,
    place: &str,
    redial: &Redial,
    token: Option<&str>,
    except: &mut Vec<usize>,
) -> Result<Dialed, NoDial> {
    while let Some(index) = shared.pool.pick_except(place, except, shared.config().balance) {
        let node = shared.pool.get(index);
        let (connect_timeout, answer_timeout) = {
            let config = shared.config();
            (config.connect_timeout, config.connect_timeout + config.health_timeout)
        };
        let guard = ActiveGuard::reserve(&node);
        let stream = match connect(&node, connect_timeout).await {
            Ok(stream) => {
                guard.opened();
                stream
            }
            Err(Error::NodeConnect { source, .. }) if is_out_of_descriptors(&source) => {
                // The balancer's own shortage, no node's fault: none is marked down.
                debug!(error = %source, "rehome: connect: out of file descriptors");
                return Err(NoDial::NoNode);
            }
            Err(e) => {
                node.metrics.connect_failures.inc();
                debug!(error = %e, "rehome: connect failed; trying the next node");
                match e {
                    Error::NodeConnectTimeout { .. } => node.mark_suspect(&e.to_string()),
                    _ => node.mark_down(&e.to_string()),
                }
                except.push(index);
                continue;
            }
        };
        let guard = Arc::new(guard);
        match tokio::time::timeout(answer_timeout, upgrade(stream, redial.request(token))).await {
            Ok(Ok(Answer::Switched(stream, early))) => return Ok(Dialed { index, stream, early, guard }),
            Ok(Ok(Answer::Status(status))) if status.is_client_error() => return Err(NoDial::Refused(status)),
            Ok(Ok(Answer::Status(status))) => debug!(node = %node.name, %status, "rehome: upgrade not accepted"),
            Ok(Err(e)) => debug!(node = %node.name, error = %e, "rehome: upgrade failed"),
            Err(_) => debug!(node = %node.name, "rehome: no answer to the upgrade in time"),
        }
        except.push(index);
    }
    Err(NoDial::NoNode)
}

enum Answer {
    Switched(TcpStream, Bytes),
    Status(StatusCode),
}

async fn upgrade(stream: TcpStream, request: Request<Empty<Bytes>>) -> Result<Answer, hyper::Error> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection is driven here, alongside the request: it ends when it hands the
    // socket over (or fails).
    let exchange = async {
        let mut response = sender.send_request(request).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Err(response.status()));
        }
        Ok::<_, hyper::Error>(Ok(hyper::upgrade::on(&mut response).await?))
    };
    let mut connection = std::pin::pin!(connection.with_upgrades());
    let mut exchange = std::pin::pin!(exchange);
    let answer = tokio::select! {
        answer = &mut exchange => answer,
        ended = &mut connection => {
            ended?;
            // The connection handed over: the exchange completes at once.
            exchange.await
        }
    };
    match answer? {
        Err(status) => Ok(Answer::Status(status)),
        Ok(upgraded) => match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => Ok(Answer::Switched(parts.io.into_inner(), parts.read_buf)),
            // Only a change in how this module builds the connection gets here.
            Err(_) => Ok(Answer::Status(StatusCode::BAD_GATEWAY)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redial(uri: &str, bearer: Option<&str>) -> Redial {
        let mut headers = HeaderMap::new();
        headers.insert("x-other", HeaderValue::from_static("kept"));
        if let Some(b) = bearer {
            headers.insert(AUTHORIZATION, HeaderValue::try_from(format!("Bearer {b}")).unwrap());
        }
        Redial { uri: uri.parse().unwrap(), headers }
    }

    #[test]
    fn the_request_is_the_first_one_without_a_refreshed_token() {
        let r = redial("/ws?client=a&token=old", Some("old"));
        let req = r.request(None);
        assert_eq!(req.uri(), "/ws?client=a&token=old");
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer old");
        assert_eq!(req.headers()["x-other"], "kept");
    }

    #[test]
    fn a_refreshed_token_replaces_the_old_one_where_it_was() {
        let req = redial("/ws?client=a&token=old&x=1", None).request(Some("new.tok-en_"));
        assert_eq!(req.uri(), "/ws?client=a&token=new.tok-en_&x=1");
        assert!(req.headers().get(AUTHORIZATION).is_none(), "no header added");
        let req = redial("/ws?client=a", Some("old")).request(Some("new"));
        assert_eq!(req.uri(), "/ws?client=a", "no query parameter added");
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer new");
        assert_eq!(req.headers()["x-other"], "kept");
    }
}
