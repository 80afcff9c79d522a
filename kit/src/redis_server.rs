//! A throw-away `redis-server` on a free port (never 6379), its files in a temporary
//! directory, killed on drop: without persistence, or with an fsync'ed append-only file so
//! that a killed and restarted Redis comes back with every acknowledged write.

use crate::bin::find_on_path;
use crate::process::ChildProcess;
use crate::server::{on_a_free_port, until_ready, PortServer, StartError};
use anyhow::{anyhow, Context, Result};
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::timeout;

/// The port a developer's own Redis listens on: never ours to use.
const SHARED_REDIS_PORT: u16 = 6379;

/// Whether a [`RedisServer`] keeps its data across a restart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing is written to disk: a restart starts empty (`--save "" --appendonly no`).
    #[default]
    None,
    /// Every write is appended and fsync'ed before Redis answers it (`--appendonly yes
    /// --appendfsync always`), so a `SIGKILL` loses nothing that was acknowledged and
    /// [`RedisServer::restart`] comes back with all of it (room logs, counters, sessions).
    AppendOnly,
}

/// A private `redis-server` on a free port, files in a temporary directory, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    // Declared before `dir`: fields drop in order, so the process dies before its
    // directory is removed.
    pub(crate) srv: PortServer,
    /// Kept for restarts, which must reload what the first process wrote.
    persistence: Persistence,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one, logging into its temporary directory.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// Starts one without persistence; Redis' log goes to `logfile` (appended), or into its
    /// temporary directory.
    pub async fn start_with(logfile: Option<PathBuf>) -> Result<Self> {
        Self::start_opts(logfile, Persistence::None).await
    }

    /// Starts one with the given persistence; the log as for [`RedisServer::start_with`].
    pub async fn start_opts(logfile: Option<PathBuf>, persistence: Persistence) -> Result<Self> {
        let program = find_on_path("redis-server").ok_or_else(|| {
            anyhow!(
                "redis-server not found on PATH; install it with `scripts/deps.sh` \
                 or `apt-get install redis-server`"
            )
        })?;
        let dir = tempfile::Builder::new()
            .prefix("tether-redis-")
            .tempdir()
            .context("creating a directory for redis-server")?;
        let logfile = logfile.unwrap_or_else(|| dir.path().join("redis.log"));
        let (proc, port) = on_a_free_port("redis-server", SHARED_REDIS_PORT, |port| {
            spawn_redis(&program, port, dir.path(), &logfile, persistence)
        })
        .await?;
        Ok(Self { srv: PortServer { proc: Some(proc), port, program, logfile }, persistence, dir })
    }

    crate::server::port_server_accessors!(srv);

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.srv.port)
    }

    /// Whether it keeps its data across [`RedisServer::restart`].
    pub fn persistence(&self) -> Persistence {
        self.persistence
    }

    /// Sends `SIGTERM` (without persistence Redis exits at once: nothing to save).
    pub fn terminate(&mut self) -> Result<()> {
        match self.srv.proc.as_mut() {
            Some(proc) => proc.signal(Signal::SIGTERM),
            None => Ok(()),
        }
    }

    /// Waits up to `within` for it to exit; `None` if it still runs.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<Option<ExitStatus>> {
        match self.srv.proc.as_mut() {
            Some(proc) => proc.wait_exit(within).await,
            None => Ok(None),
        }
    }

    /// Starts it again on the same port (killing the running one first): empty, or with
    /// everything it had acknowledged under [`Persistence::AppendOnly`]. Fails if another
    /// process took the port meanwhile.
    pub async fn restart(&mut self) -> Result<()> {
        let (dir, persistence) = (self.dir.path(), self.persistence);
        self.srv
            .restart("redis-server", |program, port, logfile| async move {
                spawn_redis(&program, port, dir, &logfile, persistence).await
            })
            .await
    }

    pub(crate) fn process_mut(&mut self) -> Option<&mut ChildProcess> {
        self.srv.proc.as_mut()
    }
}

/// Runs `redis-server` on `port` and waits until it answers (which, with an append-only
/// file, is after the file was loaded).
async fn spawn_redis(
    program: &Path,
    port: u16,
    dir: &Path,
    logfile: &Path,
    persistence: Persistence,
) -> Result<ChildProcess, StartError> {
    let mut cmd = Command::new(program);
    cmd.arg("--port").arg(port.to_string()).args(["--bind", "127.0.0.1", "--save", ""]);
    match persistence {
        Persistence::None => cmd.args(["--appendonly", "no"]),
        Persistence::AppendOnly => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
    };
    cmd.args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(logfile)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let proc = ChildProcess::spawn("redis", cmd).map_err(StartError::Fatal)?;
    let pid = proc.pid();
    until_ready(proc, "redis-server", port, logfile, || async move { redis_pid(port).await == Some(pid) }).await
}

/// The `process_id` that the Redis on `port` reports, if one answers. Asking for the pid rather
/// than a bare `PING` makes sure the answer comes from our process, not from whoever else
/// might own the port.
async fn redis_pid(port: u16) -> Option<u32> {
    let ask = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"INFO server\r\n").await.ok()?;
        let mut reader = BufReader::new(stream);
        let mut header = String::new();
        reader.read_line(&mut header).await.ok()?;
        // A bulk string: `$LEN\r\n` then LEN bytes. Anything else (`-LOADING …`) is "not yet".
        let len: usize = header.trim_end().strip_prefix('$')?.parse().ok()?;
        let mut body = vec![0; len];
        reader.read_exact(&mut body).await.ok()?;
        let body = String::from_utf8_lossy(&body);
        body.lines().find_map(|l| l.strip_prefix("process_id:")).and_then(|pid| pid.trim().parse().ok())
    };
    timeout(Duration::from_secs(1), ask).await.ok().flatten()
}
