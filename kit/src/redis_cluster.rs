//! A throw-away Redis Cluster: `masters` masters with `replicas_per_master` replicas each,
//! `redis-server --cluster-enabled yes` on free ports below 55535 (a cluster node's bus port
//! is its port + 10000, which must be free too), joined with `redis-cli --cluster create`,
//! and ready once every node says `cluster_state:ok` with every slot covered and every
//! replica's link to its master is up. Without persistence; every process killed on drop.
//!
//! For failure tests: find the master of a key's slot, `SIGKILL` a master and wait until a
//! replica serves its slots, stop and continue a replica (`SIGSTOP`/`SIGCONT`: a stopped
//! replica falls behind, which is how acknowledged writes get lost in a failover), and move
//! one slot to another master with `CLUSTER SETSLOT` / `MIGRATE`, as `redis-cli --cluster
//! reshard` does.

use crate::bin::find_on_path;
use crate::process::ChildProcess;
use crate::wait::eventually;
use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;
use redis::Value;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// A cluster node's bus port is its port + this.
const BUS_OFFSET: u16 = 10_000;

/// How long forming the cluster, or a failover, may take on a loaded machine.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// The deadline of each command the kit sends.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Keys moved per `MIGRATE` while a slot is migrated.
const MIGRATE_BATCH: usize = 100;

#[derive(Debug)]
struct ClusterNode {
    port: u16,
    /// `None` once killed.
    proc: Option<ChildProcess>,
}

/// A private Redis Cluster on free ports, its files in a temporary directory, killed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    // Before `dir`: the processes die before their directory is removed.
    nodes: Vec<ClusterNode>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts and forms the cluster; ready when this returns (see the module doc).
    pub async fn start(masters: usize, replicas_per_master: usize) -> Result<Self> {
        if masters < 3 {
            bail!("a Redis Cluster needs at least 3 masters, not {masters}");
        }
        let program = find_on_path("redis-server").ok_or_else(|| anyhow!("redis-server not found on PATH"))?;
        let cli = find_on_path("redis-cli").ok_or_else(|| anyhow!("redis-cli not found on PATH"))?;
        let dir = tempfile::Builder::new().prefix("tether-rcluster-").tempdir().context("creating a directory")?;
        let total = masters * (1 + replicas_per_master);
        let mut nodes = Vec::with_capacity(total);
        for _ in 0..total {
            let port = cluster_port(&nodes)?;
            let proc = spawn_node(&program, port, dir.path())?;
            nodes.push(ClusterNode { port, proc: Some(proc) });
        }
        let cluster = Self { nodes, dir };
        for n in &cluster.nodes {
            let port = n.port;
            eventually(FORM_TIMEOUT, &format!("redis-server on {port} to answer"), || async move {
                command(port, &["PING"]).await.is_ok()
            })
            .await?;
        }
        let mut create = Command::new(cli);
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create
            .args(["--cluster-replicas", &replicas_per_master.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(FORM_TIMEOUT, create.output())
            .await
            .map_err(|_| anyhow!("redis-cli --cluster create did not finish within {FORM_TIMEOUT:?}"))??;
        if !out.status.success() {
            bail!("redis-cli --cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        }
        cluster.until_healthy().await?;
        Ok(cluster)
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…` (every node as a seed).
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// Ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes.iter().filter(|n| n.proc.is_some()).map(|n| n.port).collect()
    }

    /// Runs a command on the node at `port`.
    pub async fn command(&self, port: u16, args: &[&str]) -> Result<Value> {
        command(port, args).await
    }

    /// Runs a command on any live node.
    async fn any(&self, args: &[&str]) -> Result<Value> {
        let mut last = anyhow!("no live node");
        for port in self.live_ports() {
            match command(port, args).await {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub async fn slot_of(&self, key: &str) -> Result<u16> {
        match self.any(&["CLUSTER", "KEYSLOT", key]).await? {
            Value::Int(n) => Ok(u16::try_from(n)?),
            other => bail!("CLUSTER KEYSLOT answered {other:?}"),
        }
    }

    /// The port of the master serving `slot`, as a live node sees it.
    pub async fn master_of_slot(&self, slot: u16) -> Result<u16> {
        let ranges = slot_ranges(&self.any(&["CLUSTER", "SLOTS"]).await?)?;
        ranges
            .iter()
            .find(|(s, e, _)| *s <= slot && slot <= *e)
            .map(|(_, _, port)| *port)
            .ok_or_else(|| anyhow!("no master serves slot {slot}"))
    }

    /// The port of the master serving `key`'s slot.
    pub async fn master_of(&self, key: &str) -> Result<u16> {
        self.master_of_slot(self.slot_of(key).await?).await
    }

    /// The ports of the masters, in slot order.
    pub async fn masters(&self) -> Result<Vec<u16>> {
        let mut out = Vec::new();
        for (_, _, port) in slot_ranges(&self.any(&["CLUSTER", "SLOTS"]).await?)? {
            if !out.contains(&port) {
                out.push(port);
            }
        }
        Ok(out)
    }

    /// The ports of the live replicas of the master at `port`.
    pub async fn replicas_of(&self, port: u16) -> Result<Vec<u16>> {
        let id = node_id(port).await?;
        let mut out = Vec::new();
        for p in self.live_ports() {
            if p != port && text(&command(p, &["INFO", "replication"]).await?)?.contains("role:slave") {
                let nodes = text(&command(p, &["CLUSTER", "NODES"]).await?)?;
                let me = nodes.lines().find(|l| l.contains("myself")).unwrap_or_default();
                if me.split(' ').nth(3) == Some(id.as_str()) {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }

    /// `SIGKILL`s the master at `port` and waits until one of its replicas serves its slots
    /// and every live node says the cluster is ok; answers the new master's port.
    pub async fn kill_master(&mut self, port: u16) -> Result<u16> {
        let slot = slot_ranges(&self.any(&["CLUSTER", "SLOTS"]).await?)?
            .into_iter()
            .find(|(_, _, p)| *p == port)
            .map(|(s, _, _)| s)
            .ok_or_else(|| anyhow!("{port} is not a master"))?;
        self.kill(port).await?;
        self.until_promoted(slot, port).await
    }

    /// Waits until `slot` is served by another master than `old` (a replica promoted) and
    /// every live node says the cluster is ok; answers the new master's port.
    pub async fn until_promoted(&self, slot: u16, old: u16) -> Result<u16> {
        let promoted = eventually(FORM_TIMEOUT, &format!("a replica of {old} to take over"), || async {
            self.master_of_slot(slot).await.ok().filter(|p| *p != old)
        })
        .await?;
        self.until_healthy().await?;
        Ok(promoted)
    }

    /// `SIGKILL`s the node at `port`.
    pub async fn kill(&mut self, port: u16) -> Result<()> {
        let node = self.nodes.iter_mut().find(|n| n.port == port).ok_or_else(|| anyhow!("no node on {port}"))?;
        if let Some(mut proc) = node.proc.take() {
            proc.kill().await?;
        }
        Ok(())
    }

    /// `SIGSTOP`s the node at `port` (it stops reading: a replica falls behind).
    pub fn pause(&mut self, port: u16) -> Result<()> {
        self.signal(port, Signal::SIGSTOP)
    }

    /// `SIGCONT`s a paused node.
    pub fn resume(&mut self, port: u16) -> Result<()> {
        self.signal(port, Signal::SIGCONT)
    }

    fn signal(&mut self, port: u16, sig: Signal) -> Result<()> {
        let node = self.nodes.iter_mut().find(|n| n.port == port).ok_or_else(|| anyhow!("no node on {port}"))?;
        node.proc.as_mut().ok_or_else(|| anyhow!("node on {port} is dead"))?.signal(sig)
    }

    /// Moves `slot` to the master at `to`, keys and all, as `redis-cli --cluster reshard`
    /// does: `SETSLOT IMPORTING`/`MIGRATING`, `MIGRATE` in batches until the slot is empty on
    /// its old master, then `SETSLOT NODE` on both and on every other master. Clients meanwhile
    /// get `ASK` (keys already moved) or `TRYAGAIN` (a multi-key step split by the move).
    pub async fn migrate_slot(&self, slot: u16, to: u16) -> Result<()> {
        let from = self.master_of_slot(slot).await?;
        if from == to {
            bail!("slot {slot} is already on {to}");
        }
        let (from_id, to_id) = (node_id(from).await?, node_id(to).await?);
        let s = slot.to_string();
        command(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]).await?;
        command(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]).await?;
        // Bounded: a slot with more keys than this is not what the tests move.
        for _ in 0..10_000 {
            let keys = command(from, &["CLUSTER", "GETKEYSINSLOT", &s, &MIGRATE_BATCH.to_string()]).await?;
            let keys: Vec<String> = match keys {
                Value::Array(items) => items.iter().map(text).collect::<Result<_>>()?,
                other => bail!("GETKEYSINSLOT answered {other:?}"),
            };
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut args: Vec<&str> = vec!["MIGRATE", "127.0.0.1", port.as_str(), "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            command(from, &args).await?;
        }
        command(to, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]).await?;
        command(from, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]).await?;
        for master in self.masters().await? {
            if master != from && master != to {
                command(master, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]).await?;
            }
        }
        Ok(())
    }

    /// Waits until every live node says `cluster_state:ok` with all slots ok and every live
    /// replica's link to its master is up.
    async fn until_healthy(&self) -> Result<()> {
        for port in self.live_ports() {
            eventually(FORM_TIMEOUT, &format!("redis cluster node {port} to be ok"), || async move {
                let Ok(info) = command(port, &["CLUSTER", "INFO"]).await.and_then(|v| text(&v)) else { return false };
                if !(info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")) {
                    return false;
                }
                let Ok(repl) = command(port, &["INFO", "replication"]).await.and_then(|v| text(&v)) else {
                    return false;
                };
                !repl.contains("role:slave") || repl.contains("master_link_status:up")
            })
            .await?;
        }
        Ok(())
    }

    /// Where the nodes' files and logs are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A free port below 65535 − [`BUS_OFFSET`] whose bus port is free too, not one of `taken`.
fn cluster_port(taken: &[ClusterNode]) -> Result<u16> {
    for _ in 0..1000 {
        let port = crate::ports::free_port()?;
        if port >= u16::MAX - BUS_OFFSET || taken.iter().any(|n| n.port == port || n.port + BUS_OFFSET == port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port + BUS_OFFSET)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port pair (port, port + {BUS_OFFSET}) found")
}

fn spawn_node(program: &Path, port: u16, dir: &Path) -> Result<ChildProcess> {
    let own = dir.join(port.to_string());
    std::fs::create_dir_all(&own)?;
    let mut cmd = Command::new(program);
    cmd.arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1", "--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
        .args(["--appendonly", "no", "--save", "", "--daemonize", "no"])
        .arg("--cluster-config-file")
        .arg(own.join("nodes.conf"))
        .arg("--dir")
        .arg(&own)
        .arg("--logfile")
        .arg(own.join("redis.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ChildProcess::spawn(&format!("redis-{port}"), cmd)
}

async fn command(port: u16, args: &[&str]) -> Result<Value> {
    let run = async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
        let mut con = client.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async::<Value>(&mut con).await.map_err(anyhow::Error::from)
    };
    tokio::time::timeout(COMMAND_TIMEOUT, run)
        .await
        .map_err(|_| anyhow!("{port}: {args:?} got no answer within {COMMAND_TIMEOUT:?}"))?
        .with_context(|| format!("{port}: {args:?}"))
}

async fn node_id(port: u16) -> Result<String> {
    text(&command(port, &["CLUSTER", "MYID"]).await?)
}

fn text(v: &Value) -> Result<String> {
    match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => Ok(s.clone()),
        other => bail!("expected text, got {other:?}"),
    }
}

/// `CLUSTER SLOTS` as `(start, end, master port)`.
fn slot_ranges(v: &Value) -> Result<Vec<(u16, u16, u16)>> {
    let Value::Array(entries) = v else { bail!("CLUSTER SLOTS answered {v:?}") };
    let int = |v: Option<&Value>| match v {
        Some(Value::Int(n)) => u16::try_from(*n).map_err(anyhow::Error::from),
        other => Err(anyhow!("expected an integer in CLUSTER SLOTS, got {other:?}")),
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Value::Array(f) = e else { bail!("CLUSTER SLOTS entry {e:?}") };
        let Some(Value::Array(node)) = f.get(2) else { bail!("CLUSTER SLOTS entry {e:?}") };
        out.push((int(f.first())?, int(f.get(1))?, int(node.get(1))?));
    }
    Ok(out)
}
