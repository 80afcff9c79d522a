//! Delivery: a few workers take events from the bounded queue and POST each to the receiver,
//! each worker over its own keep-alive HTTP/1.1 connection (opened again after a failure),
//! retrying with exponential backoff and jitter until a 2xx or `max_retry`. Nothing here is
//! on a connection's path: the presence step only `try_send`s into the queue.

use super::config::WebhooksConfig;
use super::event::Outgoing;
use super::WebhookMetrics;
use bytes::Bytes;
use http::{header, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The most of a receiver's answer body read (then dropped): enough to reuse the connection
/// after a normal answer, bounded against a receiver that streams forever.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("connect {authority}: {source}")]
    Connect { authority: String, source: std::io::Error },
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("receiver answered {0}")]
    Status(http::StatusCode),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("request: {0}")]
    Request(#[from] http::Error),
}

/// One worker's connection to the receiver.
struct Worker {
    cfg: Arc<WebhooksConfig>,
    metrics: WebhookMetrics,
    /// `host:port` of the receiver (port 80 when the url names none).
    authority: String,
    /// The open connection, reused while it stays usable.
    conn: Option<SendRequest<Full<Bytes>>>,
}

/// Starts `cfg.workers` workers on `queue`, running until `stop`.
pub fn spawn_workers(
    cfg: Arc<WebhooksConfig>,
    metrics: WebhookMetrics,
    queue: mpsc::Receiver<Outgoing>,
    stop: CancellationToken,
) {
    let queue = Arc::new(Mutex::new(queue));
    let authority = match (cfg.url.host(), cfg.url.port_u16()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => format!("{h}:80"),
        // Validation refused a url without a host.
        (None, _) => String::new(),
    };
    for _ in 0..cfg.workers {
        let mut w =
            Worker { cfg: Arc::clone(&cfg), metrics: metrics.clone(), authority: authority.clone(), conn: None };
        let queue = Arc::clone(&queue);
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let next = {
                    let mut q = queue.lock().await;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        e = q.recv() => e,
                    }
                };
                let Some(event) = next else { return };
                w.metrics.queue_depth.dec();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    () = w.deliver(event) => {}
                }
            }
        });
    }
}

impl Worker {
    /// Attempts until a 2xx or `max_retry` has passed since the first attempt.
    async fn deliver(&mut self, event: Outgoing) {
        let first = Instant::now();
        let mut wait = self.cfg.retry_min;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let result = tokio::time::timeout(self.cfg.timeout, self.attempt(&event)).await;
            let error = match result {
                Ok(Ok(())) => {
                    self.metrics.delivered.inc();
                    self.metrics.latency.observe(event.decided.elapsed().as_secs_f64());
                    return;
                }
                Ok(Err(e)) => e,
                Err(_) => AttemptError::Timeout(self.cfg.timeout),
            };
            // Whatever went wrong, the connection is not trusted again.
            self.conn = None;
            self.metrics.failed_attempts.inc();
            let pause = jittered(wait, self.cfg.jitter);
            if first.elapsed() + pause > self.cfg.max_retry {
                self.metrics.dropped_retries.inc();
                warn!(id = %event.id, kind = event.kind.as_str(), attempts, error = %error,
                    "webhook not delivered within max_retry_secs; dropped");
                return;
            }
            debug!(id = %event.id, attempts, error = %error, retry_in = ?pause, "webhook attempt failed");
            tokio::time::sleep(pause).await;
            wait = (wait * 2).min(self.cfg.retry_max);
        }
    }

    async fn attempt(&mut self, event: &Outgoing) -> Result<(), AttemptError> {
        let conn = match self.conn.take() {
            Some(c) if c.is_ready() => c,
            _ => self.connect().await?,
        };
        let mut conn = conn;
        conn.ready().await?;
        let path = self.cfg.url.path_and_query().map_or("/", |p| p.as_str());
        let request = Request::post(path)
            .header(header::HOST, self.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-tether-signature", event.signature.as_str())
            .header("x-tether-event-id", event.id.as_str())
            .header("x-tether-event-type", event.kind.as_str())
            .body(Full::new(event.body.clone()))?;
        let answer = conn.send_request(request).await?;
        let status = answer.status();
        // Read (and drop) the answer so that the connection can carry the next request.
        let _ = Limited::new(answer.into_body(), MAX_ANSWER_BYTES).collect().await;
        self.conn = Some(conn);
        if status.is_success() {
            Ok(())
        } else {
            Err(AttemptError::Status(status))
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, AttemptError> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|source| AttemptError::Connect { authority: self.authority.clone(), source })?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "webhook connection ended");
            }
        });
        Ok(send)
    }
}

/// `wait` less up to `jitter` of it, at random.
fn jittered(wait: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return wait;
    }
    let cut = rand::rng().random_range(0.0..jitter.min(1.0));
    wait.mul_f64(1.0 - cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_only_shortens() {
        let w = Duration::from_millis(1000);
        assert_eq!(jittered(w, 0.0), w);
        for _ in 0..100 {
            let j = jittered(w, 0.5);
            assert!(j <= w && j >= w / 2, "{j:?}");
        }
    }
}
