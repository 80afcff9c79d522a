//! What starting `redis-server` and `nats-server` have in common: a free port that is never
//! the machine's shared one, a readiness probe with a deadline, and a retry on another port
//! when the server exits at once because someone took the port between our probe and its bind;
//! once one runs, [`PortServer`]: its process, port and log, killed and restarted in place.

use crate::ports::free_port;
use crate::process::ChildProcess;
use anyhow::{anyhow, Result};
use std::path::{Path, PathBuf};
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

/// A server process we started, the port it owns and where it logs: what a running
/// [`RedisServer`](crate::RedisServer) and [`NatsServer`](crate::NatsServer) have in common.
#[derive(Debug)]
pub(crate) struct PortServer {
    /// `None` after a failed restart.
    pub(crate) proc: Option<ChildProcess>,
    pub(crate) port: u16,
    pub(crate) program: PathBuf,
    pub(crate) logfile: PathBuf,
}

impl PortServer {
    /// Its pid, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.proc.as_ref().filter(|p| !p.has_exited()).map(ChildProcess::pid)
    }

    /// `SIGKILL`s it and waits until it is gone (no-op if it is not running).
    pub(crate) async fn kill(&mut self) -> Result<()> {
        if let Some(proc) = self.proc.as_mut() {
            proc.kill().await?;
        }
        Ok(())
    }

    /// Kills it and starts it again on the same port with `spawn(program, port, logfile)`.
    /// Fails (with no process left) if another process took the port meanwhile.
    pub(crate) async fn restart<F, Fut>(&mut self, what: &str, spawn: F) -> Result<()>
    where
        F: FnOnce(PathBuf, u16, PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<ChildProcess, StartError>>,
    {
        self.kill().await?;
        self.proc = None;
        let proc = spawn(self.program.clone(), self.port, self.logfile.clone()).await.map_err(
            |(StartError::ExitedEarly(e) | StartError::Fatal(e))| {
                e.context(format!("restarting {what} on port {}", self.port))
            },
        )?;
        self.proc = Some(proc);
        Ok(())
    }
}

/// The public accessors of a server handle whose [`PortServer`] is field `$srv`: written once,
/// for [`RedisServer`](crate::RedisServer) and [`NatsServer`](crate::NatsServer).
macro_rules! port_server_accessors {
    ($srv:ident) => {
        /// Its port.
        pub fn port(&self) -> u16 {
            self.$srv.port
        }

        /// Its pid, while it runs.
        pub fn pid(&self) -> Option<u32> {
            self.$srv.pid()
        }

        /// Where its log goes.
        pub fn logfile(&self) -> &Path {
            &self.$srv.logfile
        }

        /// `SIGKILL`s it and waits until it is gone (no-op if it is not running).
        pub async fn kill(&mut self) -> Result<()> {
            self.$srv.kill().await
        }
    };
}
pub(crate) use port_server_accessors;
