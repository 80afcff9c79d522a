//! A `tether-balancer` child: spawned with `--listen`/`--admin 127.0.0.1:0` and the nodes as
//! `--node NAME=ADDR`, awaited until its ready line names both addresses, restartable on them.

use crate::bin::{bin_path, BALANCER_BIN};
use crate::flags::{has_flag, without_flag};
use crate::node::SpawnOptions;
use crate::process::{set_nofile, ChildProcess};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::Command;

/// A running `tether-balancer`, killed on drop.
#[derive(Debug)]
pub struct BalancerProcess {
    pub(crate) proc: ChildProcess,
    /// Where clients connect.
    addr: SocketAddr,
    /// Where `/status` and `/route` answer.
    admin: SocketAddr,
    nodes: Vec<(String, SocketAddr)>,
    extra_args: Vec<String>,
    opts: SpawnOptions,
}

impl BalancerProcess {
    /// Starts `tether-balancer --listen 127.0.0.1:0 --admin 127.0.0.1:0 --node NAME=ADDR… EXTRA…`
    /// (a `--listen` or `--admin` in `extra_args` replaces the default) and waits for its ready
    /// line.
    pub async fn start(nodes: &[(String, SocketAddr)], extra_args: &[String]) -> Result<Self> {
        Self::start_with(nodes, extra_args, &SpawnOptions::default()).await
    }

    /// [`BalancerProcess::start`] with explicit [`SpawnOptions`].
    pub async fn start_with(
        nodes: &[(String, SocketAddr)],
        extra_args: &[String],
        opts: &SpawnOptions,
    ) -> Result<Self> {
        let (proc, addr, admin) = Self::spawn(nodes, extra_args, opts).await?;
        Ok(Self { proc, addr, admin, nodes: nodes.to_vec(), extra_args: extra_args.to_vec(), opts: opts.clone() })
    }

    async fn spawn(
        nodes: &[(String, SocketAddr)],
        extra_args: &[String],
        opts: &SpawnOptions,
    ) -> Result<(ChildProcess, SocketAddr, SocketAddr)> {
        let mut cmd = Command::new(bin_path(BALANCER_BIN)?);
        for flag in ["--listen", "--admin"] {
            if !has_flag(extra_args, flag) {
                cmd.args([flag, "127.0.0.1:0"]);
            }
        }
        for (name, addr) in nodes {
            cmd.arg("--node").arg(format!("{name}={addr}"));
        }
        cmd.args(extra_args).stdout(Stdio::piped()).stderr(opts.stderr.stdio()?);
        set_nofile(&mut cmd, opts.nofile);
        let mut proc = ChildProcess::spawn("balancer", cmd)?;
        let ready = proc.await_ready(BALANCER_BIN, opts.ready_timeout, &opts.stderr).await?;
        let addr = ready.addr("listen").context("balancer")?;
        let admin = ready.addr("admin").context("balancer")?;
        Ok((proc, addr, admin))
    }

    /// The client-facing address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// `ws://ADDR/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// `http://ADMIN`, the base of `/status`, `/route?client=ID`, `/metrics`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// The `--node` list it was started with.
    pub fn nodes(&self) -> &[(String, SocketAddr)] {
        &self.nodes
    }

    crate::process::process_controls!(proc);

    /// Starts it again on the same two ports with the same nodes (killing it first).
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.kill().await?;
        let mut extra = without_flag(&without_flag(&self.extra_args, "--listen"), "--admin");
        extra.extend(["--listen".to_owned(), self.addr.to_string(), "--admin".to_owned(), self.admin.to_string()]);
        let (proc, addr, admin) = Self::spawn(&self.nodes, &extra, &self.opts).await?;
        self.proc = proc;
        self.addr = addr;
        self.admin = admin;
        Ok(())
    }
}
