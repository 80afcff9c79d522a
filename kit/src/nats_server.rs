//! A private `nats-server` with JetStream on a free port (never 4222), its store in a
//! temporary directory, killed on drop.

use crate::bin::find_on_path;
use crate::process::ChildProcess;
use crate::server::{on_a_free_port, until_ready, PortServer, StartError};
use anyhow::{anyhow, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::timeout;

/// The port the machine's own NATS listens on: never ours to use.
const SHARED_NATS_PORT: u16 = 4222;

/// A private `nats-server` with JetStream on a free port, its store in a temporary directory,
/// killed on drop. Never the shared one on 4222.
#[derive(Debug)]
pub struct NatsServer {
    // Before `dir`: the process dies before its store is removed.
    pub(crate) srv: PortServer,
    /// The `server_name` it was given: how a readiness probe knows it reached *this* server.
    server_name: String,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts one, logging into its temporary directory (or to `logfile`).
    pub async fn start_with(logfile: Option<PathBuf>) -> Result<Self> {
        let program = nats_program()?;
        let dir = tempfile::Builder::new()
            .prefix("tether-nats-")
            .tempdir()
            .context("creating a directory for nats-server")?;
        let logfile = logfile.unwrap_or_else(|| dir.path().join("nats.log"));
        // Unique among live servers: one process owns a port at a time.
        let name = |port: u16| format!("tether-test-{}-{port}", std::process::id());
        let (proc, port) = on_a_free_port("nats-server", SHARED_NATS_PORT, |port| {
            let server_name = name(port);
            let (program, dir, logfile) = (&program, dir.path(), &logfile);
            async move { spawn_nats(program, port, &server_name, dir, logfile, &[]).await }
        })
        .await?;
        let server_name = name(port);
        Ok(Self { srv: PortServer { proc: Some(proc), port, program, logfile }, server_name, dir })
    }

    /// Starts one, logging into its temporary directory.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    crate::server::port_server_accessors!(srv);

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.srv.port)
    }

    /// Starts it again on the same port (killing the running one first), with the same store
    /// directory. Fails if another process took the port meanwhile.
    pub async fn restart(&mut self) -> Result<()> {
        let (name, dir) = (&self.server_name, self.dir.path());
        self.srv
            .restart("nats-server", |program, port, logfile| async move {
                spawn_nats(&program, port, name, dir, &logfile, &[]).await
            })
            .await
    }
}

/// The `nats-server` executable on `PATH`, or an error saying how to install it.
pub(crate) fn nats_program() -> Result<PathBuf> {
    find_on_path("nats-server").ok_or_else(|| {
        anyhow!("nats-server not found on PATH; install it with `scripts/deps.sh` or `apt-get install nats-server`")
    })
}

/// Runs `nats-server -js` on `port` (with `extra` arguments: cluster flags, say), its store
/// under `dir`, and waits until its INFO line names `server_name` and says JetStream is on.
pub(crate) async fn spawn_nats(
    program: &Path,
    port: u16,
    server_name: &str,
    dir: &Path,
    logfile: &Path,
    extra: &[String],
) -> Result<ChildProcess, StartError> {
    let mut cmd = Command::new(program);
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-n", server_name, "-js", "-sd"])
        .arg(dir.join("jetstream"))
        .arg("-l")
        .arg(logfile)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let proc = ChildProcess::spawn("nats", cmd).map_err(StartError::Fatal)?;
    until_ready(proc, "nats-server", port, logfile, || async move {
        nats_info(port).await.is_some_and(|info| {
            info.get("server_name").and_then(|v| v.as_str()) == Some(server_name)
                && info.get("jetstream").and_then(|v| v.as_bool()) == Some(true)
        })
    })
    .await
}

/// The JSON of the `INFO` line a NATS server sends first on a new connection.
pub(crate) async fn nats_info(port: u16) -> Option<serde_json::Value> {
    let ask = async {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await.ok()?;
        serde_json::from_str(line.trim_end().strip_prefix("INFO ")?).ok()
    };
    timeout(Duration::from_secs(1), ask).await.ok().flatten()
}
