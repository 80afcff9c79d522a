//! A `tether-node` child: spawned with `--listen 127.0.0.1:0`, awaited until its ready line
//! names the bound address, restartable on the same port.

use crate::bin::{bin_path, NODE_BIN};
use crate::flags::{has_flag, without_flag};
use crate::process::{set_nofile, ChildProcess, LogTarget, DEFAULT_READY_TIMEOUT};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::{sleep, timeout, Instant};

/// How a node or balancer is spawned.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// Where its stderr (its tracing log) goes.
    pub stderr: LogTarget,
    /// How long it may take to print its ready line before it is killed and reported.
    pub ready_timeout: Duration,
    /// `RLIMIT_NOFILE` (soft, hard) set for the child before it starts; `None` inherits ours.
    pub nofile: Option<(u64, u64)>,
}

impl Default for SpawnOptions {
    fn default() -> Self {
        Self { stderr: LogTarget::Inherit, ready_timeout: DEFAULT_READY_TIMEOUT, nofile: None }
    }
}

/// A running `tether-node`, killed on drop.
#[derive(Debug)]
pub struct NodeProcess {
    pub(crate) proc: ChildProcess,
    pub(crate) name: String,
    /// The bound address from its ready line.
    addr: SocketAddr,
    redis_url: String,
    /// Extra arguments as given, reused by [`NodeProcess::restart`].
    extra_args: Vec<String>,
    opts: SpawnOptions,
}

impl NodeProcess {
    /// Starts `tether-node --listen 127.0.0.1:0 --name NAME --redis URL EXTRA…` (a `--listen`
    /// in `extra_args` replaces the default) and waits for its ready line.
    pub async fn start(name: &str, redis_url: &str, extra_args: &[String]) -> Result<Self> {
        Self::start_with(name, redis_url, extra_args, &SpawnOptions::default()).await
    }

    /// [`NodeProcess::start`] with explicit [`SpawnOptions`].
    pub async fn start_with(name: &str, redis_url: &str, extra_args: &[String], opts: &SpawnOptions) -> Result<Self> {
        let listen = (!has_flag(extra_args, "--listen")).then(|| "127.0.0.1:0".to_owned());
        let (proc, addr) = Self::spawn(name, redis_url, listen, extra_args, opts).await?;
        Ok(Self {
            proc,
            name: name.to_owned(),
            addr,
            redis_url: redis_url.to_owned(),
            extra_args: extra_args.to_vec(),
            opts: opts.clone(),
        })
    }

    async fn spawn(
        name: &str,
        redis_url: &str,
        listen: Option<String>,
        extra_args: &[String],
        opts: &SpawnOptions,
    ) -> Result<(ChildProcess, SocketAddr)> {
        let mut cmd = Command::new(bin_path(NODE_BIN)?);
        if let Some(listen) = listen {
            cmd.args(["--listen", &listen]);
        }
        cmd.args(["--name", name, "--redis", redis_url])
            .args(extra_args)
            .stdout(Stdio::piped())
            .stderr(opts.stderr.stdio()?);
        set_nofile(&mut cmd, opts.nofile);
        let mut proc = ChildProcess::spawn(name, cmd)?;
        let ready = proc.await_ready(NODE_BIN, opts.ready_timeout, &opts.stderr).await?;
        if ready.get("name") != Some(name) {
            tracing::warn!(expected = name, got = ?ready.get("name"), "node reports another name");
        }
        let addr = ready.addr("listen").context(name.to_owned())?;
        Ok((proc, addr))
    }

    /// Its name (`--name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://ADDR/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// `http://ADDR`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    crate::process::process_controls!(proc);

    /// Waits up to `within` for `GET /readyz` to answer 200 (its backbone is connected: it
    /// prints its ready line before that).
    pub async fn wait_ready(&self, within: Duration) -> Result<()> {
        wait_node_ready(&self.name, self.addr, Instant::now() + within).await
    }

    /// Starts it again with the same name, Redis and arguments on the same port (killing it
    /// first if it still runs). The old port is usually free again at once; if another process
    /// took it meanwhile, this fails.
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.kill().await?;
        let extra = without_flag(&self.extra_args, "--listen");
        let listen = Some(self.addr.to_string());
        let (proc, addr) = Self::spawn(&self.name, &self.redis_url, listen, &extra, &self.opts).await?;
        self.proc = proc;
        self.addr = addr;
        Ok(())
    }
}

/// Polls `GET /readyz` until it answers 200, or fails at `deadline`.
pub(crate) async fn wait_node_ready(name: &str, addr: SocketAddr, deadline: Instant) -> Result<()> {
    loop {
        if readyz_ok(addr).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{name} ({addr}) did not become ready (is its Redis reachable?)");
        }
        sleep(Duration::from_millis(20)).await;
    }
}

async fn readyz_ok(addr: SocketAddr) -> bool {
    let probe = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: tether\r\n\r\n").await.ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.ok()?;
        Some(head.ends_with(b" 200"))
    };
    matches!(timeout(Duration::from_secs(1), probe).await, Ok(Some(true)))
}
