//! What starting `redis-server` and `nats-server` have in common: a free port that is never
//! the machine's shared one, a readiness probe with a deadline, and a retry on another port
//! when the server exits at once because someone took the port between our probe and its bind.

use crate::ports::free_port;
use crate::process::ChildProcess;
use anyhow::{anyhow, Result};
use std::path::Path;
use std::time::Duration;
use tokio::time::{sleep, Instant};

/// How long `redis-server` or `nats-server` may take to answer.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Fresh ports tried when `redis-server` or `nats-server` exits at once (another process took the port between
/// our probe and its bind).
const SERVER_PORT_ATTEMPTS: usize = 5;
/// How often readiness probes (Redis `INFO`, NATS `INFO`) run.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// Polls `ready` until it says yes, the process exits (likely: the port was taken) or
/// [`SERVER_READY_TIMEOUT`] passes (then it is killed).
pub(crate) async fn until_ready<F, Fut>(
    mut proc: ChildProcess,
    what: &str,
    port: u16,
    logfile: &Path,
    ready: F,
) -> Result<ChildProcess, StartError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + SERVER_READY_TIMEOUT;
    loop {
        if let Some(status) = proc.try_status().map_err(StartError::Fatal)? {
            return Err(StartError::ExitedEarly(anyhow!(
                "{what} on port {port} exited at once ({status}); {}",
                log_tail(logfile)
            )));
        }
        if ready().await {
            return Ok(proc);
        }
        if Instant::now() >= deadline {
            let status = proc.kill().await.map_err(StartError::Fatal)?;
            return Err(StartError::Fatal(anyhow!(
                "{what} on port {port} did not answer within {SERVER_READY_TIMEOUT:?}; killed it ({status}); {}",
                log_tail(logfile)
            )));
        }
        sleep(POLL_EVERY).await;
    }
}

/// Runs `spawn` on free ports (never `shared`) until a server stays up; a server that exits
/// at once (another process took the port) is retried on another port.
pub(crate) async fn on_a_free_port<F, Fut>(what: &str, shared: u16, mut spawn: F) -> Result<(ChildProcess, u16)>
where
    F: FnMut(u16) -> Fut,
    Fut: std::future::Future<Output = Result<ChildProcess, StartError>>,
{
    let mut last_err = anyhow!("no usable port found");
    for _ in 0..SERVER_PORT_ATTEMPTS {
        let port = free_port()?;
        if port == shared {
            continue;
        }
        match spawn(port).await {
            Ok(proc) => return Ok((proc, port)),
            Err(StartError::ExitedEarly(e)) => {
                tracing::debug!(port, error = %e, "{what} exited at once; trying another port");
                last_err = e;
            }
            Err(StartError::Fatal(e)) => return Err(e),
        }
    }
    Err(last_err.context(format!("{what} did not start on any of {SERVER_PORT_ATTEMPTS} free ports")))
}

pub(crate) enum StartError {
    /// The process died at once, most likely because the port was taken: worth a retry.
    ExitedEarly(anyhow::Error),
    Fatal(anyhow::Error),
}

/// The last lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
            format!("log {}: {tail}", path.display())
        }
        Err(_) => format!("no log at {}", path.display()),
    }
}
