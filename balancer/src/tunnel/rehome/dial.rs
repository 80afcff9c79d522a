//! Opening a WebSocket to the next node of a re-homing tunnel's client: the client's own
//! upgrade request (as first forwarded: its path, id, token, cookies, forwarded addresses)
//! sent again, to the best usable node it has not just left, over hyper's client, which hands
//! back the socket and any bytes read past the 101.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri};
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

/// Connects the best node for `id` not in `except`, and upgrades; a node that fails (connect,
/// HTTP, a non-101 answer other than a 4xx) is added to `except` and the next one tried.
pub(super) async fn dial(
    shared: &Shared,
    id: &str,
    redial: &Redial,
    except: &mut Vec<usize>,
) -> Result<Dialed, NoDial> {
    while let Some(index) = shared.pool.pick_except(id, except) {
        let node = shared.pool.get(index);
        let (connect_timeout, answer_timeout) = {
            let config = shared.config();
            (config.connect_timeout, config.connect_timeout + config.health_timeout)
        };
        let stream = match connect(node, connect_timeout).await {
            Ok(stream) => stream,
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
        let guard = Arc::new(ActiveGuard::new(node));
        match tokio::time::timeout(answer_timeout, upgrade(stream, redial)).await {
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

async fn upgrade(stream: TcpStream, redial: &Redial) -> Result<Answer, hyper::Error> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let mut request = Request::get(redial.uri.clone()).body(Empty::<Bytes>::new()).expect("a GET with a known URI");
    *request.headers_mut() = redial.headers.clone();
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
