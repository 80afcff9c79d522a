//! A private NATS cluster: `nats-server` ×N with JetStream, each on a free client port and a
//! free cluster port, routed to all the others, every store in one temporary directory;
//! killed on drop. [`NatsCluster::start`] returns once the cluster can serve what a node
//! needs of it: the routes are up *and* a replicated stream can be created and deleted
//! through every server (right after the routes form, JetStream still elects its metadata
//! leader and stream creation times out).

use crate::nats_server::{nats_info, nats_program, spawn_nats};
use crate::ports::free_port;
use crate::server::{on_a_free_port, PortServer};
use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, stream};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::{sleep, timeout, Instant};

/// The port the machine's own NATS listens on: never ours to use.
const SHARED_NATS_PORT: u16 = 4222;
/// How long a new (or restarted) cluster may take to route and elect its JetStream leaders.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of each probe (a connection, a stream created, a stream deleted).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The pause between two probes of a server that is not ready yet.
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// Most replicas JetStream gives one stream; the probe stream asks for min(N, this).
const MAX_REPLICAS: usize = 5;

/// Where a replicated stream lives (see [`NatsCluster::stream_peers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPeers {
    /// Its configured replica count.
    pub replicas: usize,
    /// The server leading it, if it has a leader now.
    pub leader: Option<String>,
    /// The servers holding its other replicas.
    pub followers: Vec<String>,
    /// How many of those are current (caught up, online).
    pub current: usize,
}

/// One server of the cluster.
#[derive(Debug)]
struct Member {
    srv: PortServer,
    /// The port its routes listen on (the others dial it).
    cluster_port: u16,
    /// Its HTTP monitoring port (`/connz`: who is connected to it).
    monitor_port: u16,
    /// Its `server_name`: `{cluster}-{i}`.
    name: String,
}

/// A private NATS cluster of N JetStream servers on free ports, killed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    // Before `dir`: the processes die before their stores are removed.
    members: Vec<Member>,
    cluster_name: String,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `servers` servers (at least 2) logging into the temporary directory, and waits
    /// until the cluster is routed and JetStream answers through every server.
    pub async fn start(servers: usize) -> Result<Self> {
        Self::start_with(servers, None).await
    }

    /// As [`NatsCluster::start`], the servers logging to `log_dir/nats-{i}.log` when given.
    pub async fn start_with(servers: usize, log_dir: Option<PathBuf>) -> Result<Self> {
        if servers < 2 {
            bail!("a NATS cluster needs at least 2 servers, not {servers}");
        }
        let program = nats_program()?;
        if let Some(d) = &log_dir {
            std::fs::create_dir_all(d).with_context(|| format!("creating log directory {}", d.display()))?;
        }
        let dir = tempfile::Builder::new()
            .prefix("tether-nats-cluster-")
            .tempdir()
            .context("creating a directory for the NATS cluster")?;
        let cluster_name = format!("tether-test-{}-{}", std::process::id(), free_port()?);
        // Every route is known up front: each server dials all the others' cluster ports.
        // (And each one's monitoring port.)
        let mut ports: Vec<u16> = Vec::with_capacity(2 * servers);
        while ports.len() < 2 * servers {
            let port = free_port()?;
            if port != SHARED_NATS_PORT && !ports.contains(&port) {
                ports.push(port);
            }
        }
        let monitor_ports = ports.split_off(servers);
        let cluster_ports = ports;
        let mut members = Vec::with_capacity(servers);
        for (i, (&cluster_port, &monitor_port)) in cluster_ports.iter().zip(&monitor_ports).enumerate() {
            let name = format!("{cluster_name}-{i}");
            let logfile = match &log_dir {
                Some(d) => d.join(format!("nats-{i}.log")),
                None => dir.path().join(format!("nats-{i}.log")),
            };
            let args = cluster_args(&cluster_name, i, &cluster_ports, monitor_port);
            let store = dir.path().join(format!("s{i}"));
            let (proc, port) = on_a_free_port("nats-server", SHARED_NATS_PORT, |port| {
                let (program, name, store, logfile, args) = (&program, &name, &store, &logfile, &args);
                async move { spawn_nats(program, port, name, store, logfile, args).await }
            })
            .await
            .with_context(|| format!("starting NATS cluster server {i}"))?;
            members.push(Member {
                srv: PortServer { proc: Some(proc), port, program: program.clone(), logfile },
                cluster_port,
                monitor_port,
                name,
            });
        }
        let cluster = Self { members, cluster_name, dir };
        for i in 0..servers {
            cluster.until_serving(i).await?;
        }
        Ok(cluster)
    }

    /// How many servers it has.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Never: a cluster has at least two servers.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// `nats://127.0.0.1:P1,nats://127.0.0.1:P2,…`: what a node's `--nats` takes.
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// Each server's `nats://127.0.0.1:PORT`.
    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("nats://127.0.0.1:{}", m.srv.port)).collect()
    }

    /// Server `i`'s client port.
    pub fn port(&self, i: usize) -> u16 {
        self.members[i].srv.port
    }

    /// Server `i`'s `server_name` (as JetStream names stream leaders and peers).
    pub fn server_name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// The index of the server called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }

    /// Server `i`'s pid, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].srv.pid()
    }

    /// Where server `i` logs.
    pub fn logfile(&self, i: usize) -> &Path {
        &self.members[i].srv.logfile
    }

    /// The names of the clients connected to server `i` (a node's is `tether-node NAME`),
    /// from its monitoring endpoint.
    pub async fn client_names(&self, i: usize) -> Result<Vec<String>> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.members[i].monitor_port));
        let mut http = crate::ApiClient::connect(addr, None).await?;
        let answer = http.get("/connz?limit=1024").await?;
        if answer.status != 200 {
            bail!("server {i}: /connz answered {}", answer.status);
        }
        let conns = answer.body["connections"].as_array().cloned().unwrap_or_default();
        Ok(conns.iter().filter_map(|c| c["name"].as_str().map(str::to_owned)).collect())
    }

    /// The index of the server a client called `name` is connected to, if any.
    pub async fn server_of(&self, name: &str) -> Result<Option<usize>> {
        for i in 0..self.len() {
            if self.pid(i).is_some() && self.client_names(i).await?.iter().any(|n| n == name) {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// A JetStream context over the servers that run, for looking at streams.
    pub async fn jetstream(&self) -> Result<jetstream::Context> {
        let live: Vec<String> = (0..self.len())
            .filter(|&i| self.pid(i).is_some())
            .map(|i| format!("nats://127.0.0.1:{}", self.port(i)))
            .collect();
        let client = timeout(PROBE_TIMEOUT, async_nats::ConnectOptions::new().connect(live))
            .await
            .context("connecting to the NATS cluster timed out")??;
        Ok(jetstream::new(client))
    }

    /// Stream `stream`'s leader and its other replicas (server names), as JetStream reports
    /// them, and how many of those replicas are current.
    pub async fn stream_peers(&self, stream: &str) -> Result<StreamPeers> {
        let js = self.jetstream().await?;
        let info = timeout(PROBE_TIMEOUT, js.get_stream(stream)).await.context("stream info timed out")??;
        let cluster = info.cached_info().cluster.clone().unwrap_or_default();
        Ok(StreamPeers {
            replicas: info.cached_info().config.num_replicas.max(1),
            leader: cluster.leader,
            followers: cluster.replicas.iter().map(|r| r.name.clone()).collect(),
            current: cluster.replicas.iter().filter(|r| r.current && !r.offline).count(),
        })
    }

    /// The names of every stream in the cluster.
    pub async fn stream_names(&self) -> Result<Vec<String>> {
        use futures_util::TryStreamExt;
        let js = self.jetstream().await?;
        let names =
            timeout(PROBE_TIMEOUT, js.stream_names().try_collect()).await.context("stream names timed out")??;
        Ok(names)
    }

    /// Asks the leader of `stream` to step down: JetStream elects another (the stream keeps
    /// running; only its leader moves).
    pub async fn step_down(&self, stream: &str) -> Result<()> {
        let js = self.jetstream().await?;
        let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}");
        let answer = timeout(PROBE_TIMEOUT, js.client().request(subject, bytes::Bytes::new()))
            .await
            .context("leader step-down timed out")??;
        let v: serde_json::Value = serde_json::from_slice(&answer.payload).context("step-down answer")?;
        if v["success"] != true {
            bail!("step-down of {stream} refused: {v}");
        }
        Ok(())
    }

    /// `SIGKILL`s server `i` and waits until it is gone.
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        self.members[i].srv.kill().await
    }

    /// Starts server `i` again on the same ports with the same store, and waits until it is
    /// routed to the others and JetStream answers through it.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        let ports: Vec<u16> = self.members.iter().map(|m| m.cluster_port).collect();
        let args = cluster_args(&self.cluster_name, i, &ports, self.members[i].monitor_port);
        let store = self.dir.path().join(format!("s{i}"));
        let m = &mut self.members[i];
        let name = m.name.clone();
        m.srv
            .restart("nats-server", |program, port, logfile| async move {
                spawn_nats(&program, port, &name, &store, &logfile, &args).await
            })
            .await?;
        self.until_serving(i).await
    }

    /// Waits until server `i` sees every other server (its `INFO` lists N client URLs) and
    /// a stream with min(N, 5) replicas can be created and deleted through it.
    async fn until_serving(&self, i: usize) -> Result<()> {
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        let port = self.port(i);
        let mut last_err = String::from("no probe answered");
        while Instant::now() < deadline {
            match self.probe(i).await {
                Ok(()) => return Ok(()),
                Err(e) => last_err = format!("{e:#}"),
            }
            sleep(PROBE_EVERY).await;
        }
        bail!(
            "NATS cluster server {i} (port {port}) not serving JetStream within {CLUSTER_READY_TIMEOUT:?}: {last_err}; {}",
            crate::server::log_tail(self.logfile(i))
        )
    }

    /// One readiness probe of server `i`.
    async fn probe(&self, i: usize) -> Result<()> {
        let port = self.port(i);
        let info = nats_info(port).await.context("no INFO")?;
        let routed = info.get("connect_urls").and_then(|v| v.as_array()).map_or(0, Vec::len);
        if routed < self.len() {
            bail!("routed to {routed} of {} servers", self.len());
        }
        let client = timeout(
            PROBE_TIMEOUT,
            async_nats::ConnectOptions::new().ignore_discovered_servers().connect(format!("nats://127.0.0.1:{port}")),
        )
        .await
        .context("connecting timed out")??;
        let js = jetstream::new(client);
        let name = format!("kit_probe_{i}_{}", free_port()?);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![format!("kit.probe.{name}")],
            storage: stream::StorageType::Memory,
            num_replicas: self.len().min(MAX_REPLICAS),
            ..Default::default()
        };
        timeout(PROBE_TIMEOUT, js.create_stream(config)).await.context("creating a stream timed out")??;
        timeout(PROBE_TIMEOUT, js.delete_stream(&name)).await.context("deleting a stream timed out")??;
        Ok(())
    }
}

/// The cluster flags of server `i` of the servers whose route ports are `ports`, with its
/// monitoring on `monitor_port`.
fn cluster_args(cluster_name: &str, i: usize, ports: &[u16], monitor_port: u16) -> Vec<String> {
    let routes: Vec<String> =
        ports.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, p)| format!("nats://127.0.0.1:{p}")).collect();
    vec![
        "--cluster_name".into(),
        cluster_name.into(),
        "--cluster".into(),
        format!("nats://127.0.0.1:{}", ports[i]),
        "--routes".into(),
        routes.join(","),
        "-m".into(),
        monitor_port.to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_server_routes_to_all_the_others() {
        let args = cluster_args("c", 1, &[10, 11, 12], 20);
        let routes = "nats://127.0.0.1:10,nats://127.0.0.1:12";
        assert_eq!(args, ["--cluster_name", "c", "--cluster", "nats://127.0.0.1:11", "--routes", routes, "-m", "20"]);
    }

    #[tokio::test]
    async fn fewer_than_two_servers_is_refused() {
        assert!(NatsCluster::start(1).await.is_err());
    }
}
