//! Local Tether clusters as child processes: a private `redis-server` (and `nats-server`),
//! `tether-node`s and a `tether-balancer`, each started on a free port and **killed when its
//! handle is dropped**.
//!
//! This is what `tether up`, the benchmarks, `tether chaos` and the workspace's end-to-end
//! tests stand on, so that every one of them starts, watches and stops processes the same way.
//! The pieces live next door: [`crate::process`] (the child guard, ready lines, graceful
//! stops), [`crate::redis_server`], [`crate::nats_server`], [`crate::node`],
//! [`crate::balancer`]. [`Cluster`] wires them together: `node-1..node-N` behind one
//! balancer, stopped in order by [`Cluster::shutdown`] (a cluster shared between tests must be
//! started on a thread that lives as long as the sharing does; see [`crate::process`]).

use crate::balancer::BalancerProcess;
use crate::nats_server::NatsServer;
use crate::node::{wait_node_ready, NodeProcess, SpawnOptions};
use crate::process::{stop_gracefully, ChildProcess, LogTarget, StopOutcome, StopReport, DEFAULT_READY_TIMEOUT};
use crate::redis_server::{Persistence, RedisServer};
use anyhow::{bail, Context, Result};
use futures_util::future::{select_all, try_join_all};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::time::Instant;

/// Default grace period of [`Cluster::shutdown`] between `SIGTERM` and `SIGKILL`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// Where a cluster's processes log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ClusterLogs {
    /// Nodes and balancer write to our stderr; Redis logs into its temporary directory.
    #[default]
    Inherit,
    /// Nodes and balancer are silenced; Redis logs into its temporary directory.
    Null,
    /// `DIR/redis.log`, `DIR/node-1.log`, …, `DIR/balancer.log` (the directory is created).
    Dir(PathBuf),
}

impl ClusterLogs {
    /// Where the process called `name` logs.
    pub fn target(&self, name: &str) -> LogTarget {
        match self {
            Self::Inherit => LogTarget::Inherit,
            Self::Null => LogTarget::Null,
            Self::Dir(dir) => LogTarget::File(dir.join(format!("{name}.log"))),
        }
    }
}

/// What [`Cluster::start`] builds.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// How many nodes, named `node-1` … `node-N`.
    pub nodes: usize,
    /// An external Redis URL; `None` starts a private [`RedisServer`].
    pub redis: Option<String>,
    /// The balancer's client address; `None` = `127.0.0.1:0`.
    pub balancer_listen: Option<SocketAddr>,
    /// The balancer's admin address; `None` = `127.0.0.1:0`.
    pub balancer_admin: Option<SocketAddr>,
    /// Extra arguments for every node (`--backbone none`, `--config FILE`, …).
    pub node_args: Vec<String>,
    /// Extra arguments for the balancer (`--health-interval-ms 100`, …).
    pub balancer_args: Vec<String>,
    /// Where the processes log.
    pub logs: ClusterLogs,
    /// How long each node and the balancer may take to become ready.
    pub ready_timeout: Duration,
    /// Persistence of the private Redis (ignored with `redis`).
    pub redis_persistence: Persistence,
    /// Start a private [`NatsServer`] and run the nodes with `--backbone nats --nats URL`.
    pub nats: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            redis: None,
            balancer_listen: None,
            balancer_admin: None,
            node_args: Vec::new(),
            balancer_args: Vec::new(),
            logs: ClusterLogs::Inherit,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            redis_persistence: Persistence::None,
            nats: false,
        }
    }
}

/// A whole local cluster: Redis (own or external), `node-1..node-N`, one balancer in front.
/// Dropping it kills every process at once; [`Cluster::shutdown`] stops them gracefully.
#[derive(Debug)]
pub struct Cluster {
    // Drop order is field order: the balancer goes first, then the nodes, then Redis.
    balancer: BalancerProcess,
    nodes: Vec<NodeProcess>,
    redis: Option<RedisServer>,
    nats: Option<NatsServer>,
    redis_url: String,
}

impl Cluster {
    /// Starts Redis (unless `opts.redis` names one), the nodes (concurrently) and the balancer.
    /// If any piece fails, those already started are killed and the error says which failed.
    pub async fn start(opts: ClusterOptions) -> Result<Self> {
        if opts.nodes == 0 {
            bail!("a cluster needs at least one node");
        }
        if let ClusterLogs::Dir(dir) = &opts.logs {
            std::fs::create_dir_all(dir).with_context(|| format!("creating log directory {}", dir.display()))?;
        }
        let redis = match &opts.redis {
            Some(_) => None,
            None => {
                let logfile = match &opts.logs {
                    ClusterLogs::Dir(dir) => Some(dir.join("redis.log")),
                    _ => None,
                };
                Some(RedisServer::start_opts(logfile, opts.redis_persistence).await?)
            }
        };
        let redis_url = match (&opts.redis, &redis) {
            (Some(url), _) => url.clone(),
            (None, Some(server)) => server.url(),
            (None, None) => unreachable!("a private Redis is started when none is given"),
        };
        let mut node_args = opts.node_args.clone();
        let nats = match opts.nats {
            false => None,
            true => {
                let logfile = match &opts.logs {
                    ClusterLogs::Dir(dir) => Some(dir.join("nats.log")),
                    _ => None,
                };
                let server = NatsServer::start_with(logfile).await?;
                node_args.extend(["--backbone".to_owned(), "nats".to_owned(), "--nats".to_owned(), server.url()]);
                Some(server)
            }
        };
        let starts = (1..=opts.nodes).map(|i| {
            let name = format!("node-{i}");
            let spawn =
                SpawnOptions { stderr: opts.logs.target(&name), ready_timeout: opts.ready_timeout, nofile: None };
            let redis_url = &redis_url;
            let node_args = &node_args;
            async move { NodeProcess::start_with(&name, redis_url, node_args, &spawn).await }
        });
        let nodes = try_join_all(starts).await?;
        // A node prints its ready line once bound, but serves `/readyz` 200 only once its
        // backbone is connected; the balancer would route around it until then.
        let ready_by = Instant::now() + opts.ready_timeout;
        try_join_all(nodes.iter().map(|n| wait_node_ready(n.name(), n.addr(), ready_by))).await?;
        let members: Vec<(String, SocketAddr)> = nodes.iter().map(|n| (n.name().to_owned(), n.addr())).collect();
        let mut balancer_args = Vec::new();
        if let Some(listen) = opts.balancer_listen {
            balancer_args.extend(["--listen".to_owned(), listen.to_string()]);
        }
        if let Some(admin) = opts.balancer_admin {
            balancer_args.extend(["--admin".to_owned(), admin.to_string()]);
        }
        balancer_args.extend(opts.balancer_args.iter().cloned());
        let spawn =
            SpawnOptions { stderr: opts.logs.target("balancer"), ready_timeout: opts.ready_timeout, nofile: None };
        let balancer = BalancerProcess::start_with(&members, &balancer_args, &spawn).await?;
        Ok(Self { balancer, nodes, redis, nats, redis_url })
    }

    /// The private NATS server, when the cluster runs on the NATS backbone.
    pub fn nats(&self) -> Option<&NatsServer> {
        self.nats.as_ref()
    }

    /// The Redis URL every node uses.
    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    /// The private Redis, if the cluster started one.
    pub fn redis(&self) -> Option<&RedisServer> {
        self.redis.as_ref()
    }

    /// The private Redis, for `kill`/`restart`.
    pub fn redis_mut(&mut self) -> Option<&mut RedisServer> {
        self.redis.as_mut()
    }

    /// The nodes, `node-1` first.
    pub fn nodes(&self) -> &[NodeProcess] {
        &self.nodes
    }

    /// The nodes, for `kill`/`restart`.
    pub fn nodes_mut(&mut self) -> &mut [NodeProcess] {
        &mut self.nodes
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeProcess> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node called `name`, for `kill`/`restart`.
    pub fn node_mut(&mut self, name: &str) -> Option<&mut NodeProcess> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }

    /// The balancer.
    pub fn balancer(&self) -> &BalancerProcess {
        &self.balancer
    }

    /// The balancer, for `kill`/`restart`.
    pub fn balancer_mut(&mut self) -> &mut BalancerProcess {
        &mut self.balancer
    }

    /// `ws://BALANCER/ws`: where clients connect.
    pub fn ws_url(&self) -> String {
        self.balancer.ws_url()
    }

    /// `http://ADMIN`: the balancer's admin base URL.
    pub fn admin_url(&self) -> String {
        self.balancer.admin_url()
    }

    /// `(name, ws://NODE/ws)` for each node.
    pub fn node_urls(&self) -> Vec<(String, String)> {
        self.nodes.iter().map(|n| (n.name.clone(), n.ws_url())).collect()
    }

    /// Every process we own, balancer first, Redis last.
    fn owned(&mut self) -> Vec<&mut ChildProcess> {
        let mut all = vec![&mut self.balancer.proc];
        all.extend(self.nodes.iter_mut().map(|n| &mut n.proc));
        // The servers last, Redis at the very end (see `shutdown`).
        if let Some(proc) = self.nats.as_mut().and_then(|n| n.srv.proc.as_mut()) {
            all.push(proc);
        }
        if let Some(proc) = self.redis.as_mut().and_then(RedisServer::process_mut) {
            all.push(proc);
        }
        all
    }

    /// Waits until some process of the cluster exits and returns its label, pid and status.
    /// Each exit is reported once; with nothing left running it never returns. Cancel-safe,
    /// so it can sit in a `select!` next to a shutdown signal.
    pub async fn next_exit(&mut self) -> Result<(String, u32, ExitStatus)> {
        let mut running: Vec<&mut ChildProcess> = Vec::new();
        for proc in self.owned() {
            // Died on its own since we last looked (try_status reaps without reporting).
            if let Some(status) = proc.unreported_exit()? {
                return Ok((proc.label().to_owned(), proc.pid(), status));
            }
            if !proc.has_exited() {
                running.push(proc);
            }
        }
        if running.is_empty() {
            return std::future::pending().await;
        }
        let waits = running.into_iter().map(|proc| {
            Box::pin(async move {
                let status = proc.wait_reported().await?;
                Ok::<_, anyhow::Error>((proc.label().to_owned(), proc.pid(), status))
            })
        });
        select_all(waits).await.0
    }

    /// Stops everything gracefully: `SIGTERM` to the balancer and the nodes, up to `grace`
    /// for them to exit, `SIGKILL` for stragglers; then the same for Redis and NATS (last, so that the
    /// nodes can still clean up their presence on the way out).
    pub async fn shutdown(&mut self, grace: Duration) -> Result<Vec<StopReport>> {
        let servers = usize::from(self.redis.as_ref().is_some_and(|r| r.srv.proc.is_some()))
            + usize::from(self.nats.as_ref().is_some_and(|n| n.srv.proc.is_some()));
        let mut all = self.owned();
        let redis = all.split_off(all.len() - servers);
        let mut reports = stop_gracefully(all, grace).await?;
        reports.extend(stop_gracefully(redis, grace).await?);
        Ok(reports)
    }

    /// `SIGKILL`s everything still running and reaps it; reports what had to be killed.
    pub async fn kill_all(&mut self) -> Result<Vec<StopReport>> {
        let mut reports = Vec::new();
        for proc in self.owned() {
            if proc.try_status()?.is_none() {
                proc.kill().await?;
                reports.push(StopReport {
                    label: proc.label().to_owned(),
                    pid: proc.pid(),
                    outcome: StopOutcome::Killed,
                });
            }
        }
        Ok(reports)
    }
}
