//! `tether bench idle`: what an idle client costs each server process, in resident memory.
//!
//! A private cluster (Redis, K nodes, B balancers) is started; every process' `VmRSS` is read;
//! N clients connect — straight to the nodes (round robin) or through the balancers — and
//! stay idle; once every node counts them, the servers are read again. Growth divided by the
//! connections a process holds is its cost per connection, *including* what its allocator
//! keeps around, which is what an operator pays.
//!
//! The clients live in load-generator children ([`super::worker`], at most 9,000 each,
//! each on its own 127.0.x.y source addresses) because one process may hold at most 20,000
//! descriptors here. For the same reason one balancer holds at most ~9,900 tunnels (two
//! descriptors each), so through the balancer N clients need ⌈N / 9,900⌉ balancer processes:
//! sharing one port with `--reuse-port` when the balancer has that flag, else each on its own
//! port with the clients spread over them (the report says which).

use super::args::IdleArgs;
use super::procfs;
use super::worker::{Fleet, WorkerSpec};
use super::{http_get, metric_sum, source_addrs, split, MAX_PER_WORKER, MAX_TUNNELS_PER_PROXY};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tether_kit::{
    bin_path, eventually, BalancerProcess, Cluster, ClusterLogs, ClusterOptions, SpawnOptions, BALANCER_BIN,
};

/// Most clients one node is given: it needs a descriptor per client plus a few of its own.
pub const MAX_PER_NODE: usize = 19_600;
/// The target for a node's memory per idle client.
pub const NODE_TARGET_KIB: f64 = 4.0;
/// Flag that lets several balancer processes share one port.
pub const REUSE_PORT_FLAG: &str = "--reuse-port";

/// What `tether bench idle` runs.
#[derive(Debug, Clone)]
pub struct IdleOptions {
    pub clients: usize,
    pub through_balancer: bool,
    pub nodes: usize,
    /// Balancer processes; `None` = as many as the descriptor limit requires.
    pub balancers: Option<usize>,
    /// Never try `--reuse-port`: one port per balancer.
    pub separate_ports: bool,
    /// Connections being set up at once, per load generator. Through the balancer it must stay
    /// low: a storm of connects fills a node's accept queue, one of the balancer's upstream
    /// connects times out (1 s), and the balancer marks the node down and cuts all its tunnels.
    pub concurrency: usize,
    /// Pause after the last connection before memory is read again.
    pub settle: Duration,
    pub logs: Option<PathBuf>,
}

impl IdleOptions {
    /// The `--quick` smoke run: a few hundred clients, one node, one balancer.
    pub fn quick(through_balancer: bool) -> Self {
        Self {
            clients: 300,
            through_balancer,
            nodes: 1,
            balancers: None,
            separate_ports: false,
            concurrency: 8,
            settle: Duration::from_millis(300),
            logs: None,
        }
    }
}

impl From<IdleArgs> for IdleOptions {
    fn from(a: IdleArgs) -> Self {
        if a.quick {
            let mut q = Self::quick(a.through_balancer);
            q.logs = a.logs;
            return q;
        }
        Self {
            clients: a.clients,
            through_balancer: a.through_balancer,
            nodes: a.nodes,
            balancers: a.balancers,
            separate_ports: a.separate_ports,
            concurrency: a.concurrency.unwrap_or(if a.through_balancer { 8 } else { 64 }),
            settle: Duration::from_secs_f64(a.settle_secs),
            logs: a.logs,
        }
    }
}

/// One server process' memory before and after.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessRow {
    /// `node-1`, `balancer-2`, `redis`.
    pub process: String,
    pub pid: u32,
    /// Connections it holds (node: its `connections_active`; balancer: its active upstream
    /// connections; Redis: the clients, whose sessions it stores).
    pub connections: u64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// Growth per connection, KiB.
    pub kib_per_connection: Option<f64>,
}

/// The whole run, as written by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub bench: &'static str,
    pub clients: usize,
    pub open: u64,
    pub failed: u64,
    pub errors: Vec<String>,
    pub through_balancer: bool,
    pub nodes: usize,
    pub balancers: usize,
    /// `one port (SO_REUSEPORT)`, `separate ports`, or `—` (direct).
    pub balancer_ports: String,
    pub load_generators: usize,
    pub connect_secs: f64,
    pub loadavg: Option<[f64; 3]>,
    pub processes: Vec<ProcessRow>,
}

impl IdleReport {
    /// The markdown table and the verdicts.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{} idle clients ({} open, {} failed) {} — {} node(s), {} balancer(s){}; {} load generators; \
             connected in {:.1} s\n\n",
            self.clients,
            self.open,
            self.failed,
            if self.through_balancer { "through the balancer" } else { "straight to the nodes" },
            self.nodes,
            self.balancers,
            if self.through_balancer { format!(" on {}", self.balancer_ports) } else { String::new() },
            self.load_generators,
            self.connect_secs,
        );
        s.push_str(
            "| process | pid | connections | RSS before MiB | RSS after MiB | KiB per connection |\n\
             |:--|--:|--:|--:|--:|--:|\n",
        );
        for r in &self.processes {
            s.push_str(&format!(
                "| {} | {} | {} | {:.1} | {:.1} | {} |\n",
                r.process,
                r.pid,
                r.connections,
                r.rss_before_kib as f64 / 1024.0,
                r.rss_after_kib as f64 / 1024.0,
                r.kib_per_connection.map_or("—".to_owned(), |k| format!("{k:.2}")),
            ));
        }
        let nodes: Vec<f64> = self
            .processes
            .iter()
            .filter(|r| r.process.starts_with("node"))
            .filter_map(|r| r.kib_per_connection)
            .collect();
        if let Some(worst) = nodes.iter().copied().reduce(f64::max) {
            let verdict = if worst <= NODE_TARGET_KIB { "met" } else { "missed" };
            s.push_str(&format!(
                "\nnode memory per idle client: {worst:.2} KiB (target ≤ {NODE_TARGET_KIB} KiB): {verdict}\n"
            ));
        }
        if !self.errors.is_empty() {
            s.push_str(&format!("\nfirst errors: {:?}\n", self.errors));
        }
        s
    }
}

/// `tether bench idle`.
pub async fn run_cli(args: IdleArgs) -> Result<i32> {
    let json = args.json.clone();
    let opts = IdleOptions::from(args);
    let mut stdout = std::io::stdout();
    let report = run(&opts, &mut stdout).await?;
    println!();
    super::print_report(&report.table(), &report, json.as_deref())?;
    Ok(if report.failed > 0 { 1 } else { 0 })
}

/// Runs the benchmark, printing progress to `out`.
pub async fn run<W: Write>(opts: &IdleOptions, out: &mut W) -> Result<IdleReport> {
    if opts.clients == 0 || opts.nodes == 0 {
        bail!("--clients and --nodes must be at least 1");
    }
    let per_node = opts.clients.div_ceil(opts.nodes);
    // Through the balancer the hash decides, so leave room for an uneven share.
    let node_share = if opts.through_balancer && opts.nodes > 1 { per_node + per_node / 10 } else { per_node };
    if node_share > MAX_PER_NODE {
        bail!(
            "{} clients on {} node(s) is ~{node_share} per node; one node holds at most {MAX_PER_NODE} \
             (20,000 descriptors per process): use --nodes {}",
            opts.clients,
            opts.nodes,
            opts.clients.div_ceil(MAX_PER_NODE * 10 / 11)
        );
    }
    let needed = opts.clients.div_ceil(MAX_TUNNELS_PER_PROXY);
    let balancers = if opts.through_balancer { opts.balancers.unwrap_or(needed).max(1) } else { 1 };
    if opts.through_balancer && balancers < needed {
        bail!(
            "{} tunnels need at least {needed} balancer processes (two descriptors per tunnel, 20,000 per process)",
            opts.clients
        );
    }
    let balancer_bin = bin_path(BALANCER_BIN)?;
    let reuse_port = opts.through_balancer
        && balancers > 1
        && !opts.separate_ports
        && super::supports_flag(&balancer_bin, REUSE_PORT_FLAG).await;
    let balancer_ports = match (opts.through_balancer, balancers, reuse_port) {
        (false, _, _) => "—".to_owned(),
        (true, 1, _) => "one port".to_owned(),
        (true, _, true) => "one port (SO_REUSEPORT)".to_owned(),
        (true, _, false) if opts.separate_ports => "separate ports (--separate-ports)".to_owned(),
        (true, _, false) => format!("separate ports (tether-balancer has no {REUSE_PORT_FLAG})"),
    };

    let dir = tempfile::Builder::new().prefix("tether-bench-idle-").tempdir()?;
    let node_conf = super::write_file(dir.path(), "node.toml", &format!("max_connections = {MAX_PER_NODE}\n"))?;
    let bal_conf =
        super::write_file(dir.path(), "balancer.toml", &format!("max_connections = {}\n", MAX_TUNNELS_PER_PROXY + 50))?;
    let logs = match &opts.logs {
        Some(d) => ClusterLogs::Dir(d.clone()),
        None => ClusterLogs::Null,
    };
    let mut balancer_args = vec!["--config".to_owned(), bal_conf.display().to_string()];
    if reuse_port {
        balancer_args.push(REUSE_PORT_FLAG.to_owned());
    }
    writeln!(
        out,
        "starting redis-server, {} node(s){}",
        opts.nodes,
        if opts.through_balancer { format!(", {balancers} balancer(s) ({balancer_ports})") } else { String::new() }
    )?;
    let cluster = Cluster::start(ClusterOptions {
        nodes: opts.nodes,
        node_args: vec!["--config".to_owned(), node_conf.display().to_string()],
        balancer_args: balancer_args.clone(),
        logs: logs.clone(),
        ..ClusterOptions::default()
    })
    .await?;
    let mut extra = Vec::new();
    if opts.through_balancer {
        let members: Vec<(String, SocketAddr)> =
            cluster.nodes().iter().map(|n| (n.name().to_owned(), n.addr())).collect();
        for b in 2..=balancers {
            let mut args = balancer_args.clone();
            if reuse_port {
                args.extend(["--listen".to_owned(), cluster.balancer().addr().to_string()]);
            }
            let stderr = match &opts.logs {
                Some(d) => tether_kit::LogTarget::File(d.join(format!("balancer-{b}.log"))),
                None => tether_kit::LogTarget::Null,
            };
            let spawn = SpawnOptions { stderr, ..SpawnOptions::default() };
            extra.push(BalancerProcess::start_with(&members, &args, &spawn).await.with_context(|| {
                format!("starting balancer {b}{}", if reuse_port { " on the shared port" } else { "" })
            })?);
        }
    }
    let result = measure(opts, &cluster, &extra, balancers, balancer_ports, out).await;
    drop(extra);
    let mut cluster = cluster;
    cluster.kill_all().await?;
    result
}

async fn measure<W: Write>(
    opts: &IdleOptions,
    cluster: &Cluster,
    extra: &[BalancerProcess],
    balancers: usize,
    balancer_ports: String,
    out: &mut W,
) -> Result<IdleReport> {
    let mut all_balancers: Vec<&BalancerProcess> = vec![cluster.balancer()];
    all_balancers.extend(extra.iter());
    if opts.through_balancer {
        // Every balancer must see every node ready before the first client arrives.
        for b in &all_balancers {
            eventually(Duration::from_secs(15), "every node ready at the balancer", || async {
                let m = http_get(b.admin_addr(), "/metrics").await.unwrap_or_default();
                metric_sum(&m, "tether_balancer_node_ready") as usize == opts.nodes
            })
            .await
            .context("balancer did not see every node ready")?;
        }
    }
    let mut procs: Vec<(String, u32, Option<SocketAddr>, bool)> =
        cluster.nodes().iter().map(|n| (n.name().to_owned(), n.pid(), Some(n.addr()), true)).collect();
    if opts.through_balancer {
        for (k, b) in all_balancers.iter().enumerate() {
            procs.push((format!("balancer-{}", k + 1), b.pid(), Some(b.admin_addr()), false));
        }
    }
    if let Some(pid) = cluster.redis().and_then(|r| r.pid()) {
        procs.push(("redis".to_owned(), pid, None, false));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: Vec<u64> = procs.iter().map(|p| procfs::rss_kib(p.1).unwrap_or(0)).collect();

    let targets: Vec<SocketAddr> = if opts.through_balancer {
        let mut t: Vec<SocketAddr> = all_balancers.iter().map(|b| b.addr()).collect();
        t.dedup();
        t
    } else {
        cluster.nodes().iter().map(|n| n.addr()).collect()
    };
    let tag = format!("{}-{}", std::process::id(), super::unix_micros() % 1_000_000_000);
    let specs: Vec<WorkerSpec> = split(opts.clients, MAX_PER_WORKER)
        .into_iter()
        .enumerate()
        .map(|(k, (first, count))| WorkerSpec {
            targets: targets.clone(),
            sources: source_addrs(k, count),
            id_prefix: format!("idle-{tag}-"),
            first: first as u64,
            count: count as u64,
            concurrency: opts.concurrency,
            rooms: None,
            connect_timeout_ms: 60_000,
            protocol: super::protocol::Protocol::Tether,
            tls: None,
        })
        .collect();
    let workers = specs.len();
    writeln!(
        out,
        "opening {} idle connections from {workers} load generator(s) to {} target address(es); {}",
        opts.clients,
        targets.len(),
        procfs::loadavg_line()
    )?;
    let loadavg = procfs::loadavg();
    let started = Instant::now();
    let (fleet, opened) = Fleet::start(specs, Duration::from_secs(600), out).await?;
    let connect_secs = started.elapsed().as_secs_f64();
    writeln!(out, "  {} open, {} failed in {connect_secs:.1} s", opened.open, opened.failed)?;
    // Wait until the nodes count every client (the last upgrades may still be in their hands).
    let node_addrs: Vec<SocketAddr> = cluster.nodes().iter().map(|n| n.addr()).collect();
    let counted = eventually(Duration::from_secs(30), "the nodes to count every client", || async {
        let mut sum = 0.0;
        for a in &node_addrs {
            sum += metric_sum(&http_get(*a, "/metrics").await.unwrap_or_default(), "tether_node_connections_active");
        }
        sum as u64 >= opened.open
    })
    .await;
    if counted.is_err() {
        writeln!(out, "  warning: the nodes did not count all {} clients within 30 s", opened.open)?;
    }
    tokio::time::sleep(opts.settle).await;
    let mut rows = Vec::new();
    for (k, (name, pid, addr, is_node)) in procs.iter().enumerate() {
        let after = procfs::rss_kib(*pid).unwrap_or(0);
        let connections = match (addr, is_node) {
            (Some(a), true) => {
                metric_sum(&http_get(*a, "/metrics").await.unwrap_or_default(), "tether_node_connections_active") as u64
            }
            (Some(a), false) => {
                metric_sum(&http_get(*a, "/metrics").await.unwrap_or_default(), "tether_balancer_active_connections")
                    as u64
            }
            (None, _) => opened.open,
        };
        let per = (connections > 0).then(|| (after as f64 - before[k] as f64) / connections as f64);
        rows.push(ProcessRow {
            process: name.clone(),
            pid: *pid,
            connections,
            rss_before_kib: before[k],
            rss_after_kib: after,
            kib_per_connection: per.map(|p| (p * 100.0).round() / 100.0),
        });
    }
    fleet.close().await;
    Ok(IdleReport {
        bench: "idle",
        clients: opts.clients,
        open: opened.open,
        failed: opened.failed,
        errors: opened.errors,
        through_balancer: opts.through_balancer,
        nodes: opts.nodes,
        balancers: if opts.through_balancer { balancers } else { 0 },
        balancer_ports,
        load_generators: workers,
        connect_secs: (connect_secs * 10.0).round() / 10.0,
        loadavg,
        processes: rows,
    })
}
