//! Active health checks: one task per node sends `GET /readyz` every `health_interval` and
//! feeds the answer into the node's state machine ([`crate::pool::next_health`]).
//!
//! These run beside the proxy for the balancer's whole life, shutdown grace included, so a
//! node that dies while tunnels drain still has its tunnels closed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use tether_proto::limits::is_out_of_descriptors;

use crate::pool::{Node, Probe};
use crate::Shared;

/// Path probed on every node (200 = ready, other = alive but unready).
pub const READYZ_PATH: &str = "/readyz";

/// Probes node `index` until `stop` fires.
/// The interval, timeout and `rise` are the live config's, read at every probe: a reload
/// changes them for the next one.
/// The node is looked up in its slot at every probe: a discovered node found again under a
/// new instance is a new node in the same slot. A tombstone (a node that left the registry)
/// is not probed.
pub(crate) async fn check_loop(shared: Arc<Shared>, index: usize, stop: CancellationToken) {
    let mut interval = shared.config().health_interval;
    let mut ticker = ticker(interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let (timeout, rise, now) = {
            let config = shared.config();
            (config.health_timeout, config.rise, config.health_interval)
        };
        if now != interval {
            // Reloaded: the next probe is one new interval from this one.
            interval = now;
            ticker = ticker_after(interval);
        }
        let node = shared.pool.get(index);
        if node.is_gone() {
            continue;
        }
        let probe = tokio::select! {
            _ = stop.cancelled() => return,
            p = probe(&node, timeout) => p,
        };
        debug!(node = %node.name, ?probe, "probe");
        let Some(probe) = probe else {
            // Out of descriptors ourselves: that says nothing about the node.
            continue;
        };
        if node.apply_probe(&probe, rise) {
            crate::rebalance::node_available(&shared, index);
        }
    }
}

/// Ticks at once, then every `every`; a slow probe delays the next one rather than causing a
/// burst of catch-up probes.
fn ticker(every: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// [`ticker`], first tick one period from now.
fn ticker_after(every: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// One probe: connect, `GET /readyz`, read the status line — all within `timeout`. `None`
/// when the balancer itself is out of file descriptors (EMFILE, ENFILE): no verdict on the
/// node, which must not be marked down for it.
pub async fn probe(node: &Node, timeout: Duration) -> Option<Probe> {
    Some(match tokio::time::timeout(timeout, probe_inner(node)).await {
        Ok(Ok(status)) if status == StatusCode::OK => Probe::Ready,
        Ok(Ok(status)) => Probe::Unready(status.as_u16()),
        Ok(Err(ProbeError::OutOfDescriptors)) => return None,
        Ok(Err(ProbeError::Failed(why))) => Probe::Failed(why),
        Err(_) => Probe::TimedOut(format!("probe timed out after {} ms", timeout.as_millis())),
    })
}

enum ProbeError {
    OutOfDescriptors,
    Failed(String),
}

impl From<String> for ProbeError {
    fn from(why: String) -> Self {
        Self::Failed(why)
    }
}

async fn probe_inner(node: &Node) -> Result<StatusCode, ProbeError> {
    let stream = TcpStream::connect(&node.addr).await.map_err(|e| {
        if is_out_of_descriptors(&e) {
            ProbeError::OutOfDescriptors
        } else {
            ProbeError::Failed(format!("connect: {e}"))
        }
    })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    let request = Request::get(READYZ_PATH)
        .header(header::HOST, node.addr.as_str())
        .header(header::USER_AGENT, "tether-balancer")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let mut conn = std::pin::pin!(conn);
    let mut response = std::pin::pin!(sender.send_request(request));
    tokio::select! {
        biased;
        response = response.as_mut() => return response
            .map(|r| r.status())
            .map_err(|e| ProbeError::Failed(format!("readyz: {e}"))),
        result = conn.as_mut() => result.map_err(|e| format!("readyz: {e}"))?,
    }
    // The connection finished first (the node closed it after answering, as asked): the
    // answer, if there was one, is waiting in the response future.
    response.await.map(|r| r.status()).map_err(|e| ProbeError::Failed(format!("readyz: {e}")))
}
