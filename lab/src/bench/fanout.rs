//! `tether bench fanout`: busy rooms spread over the nodes, publishers at rising rates.
//!
//! A private cluster (Redis, K nodes, one balancer) is started; R rooms of M member clients
//! each connect through the balancer — so a room's members land on every node — and join
//! (with `--direct` they connect straight to the nodes, round robin: the balancer's share).
//! One extra publisher per room sends `message`s whose text starts with its send time
//! (`t=MICROS;`), all publishers together at each rate in `--rates` for `--step-secs` (after a
//! one-second ramp that is not measured). Per step the report gives:
//!
//! * delivered messages per second as the clients counted them, and per node as each node's
//!   `/metrics` counts them (`tether_node_frames_delivered_total`), against what a lossless
//!   cluster would deliver (rate × (M + 1): every member and the publisher get each message);
//! * end-to-end latency p50/p99 (send stamp → receipt by a member, same machine clock);
//! * CPU used by Redis, the nodes, the balancer and the load generators (from `/proc`), and
//!   the machine's total against its cores;
//! * and where it saturates: the first step that delivers under 90 % of the lossless figure
//!   or whose p99 is ten times the first step's, with the component closest to its limit
//!   (Redis: one core; everything else: all cores).
//!
//! Last, the backbone hop: small rooms with the publisher connected straight to node-1 and
//! the member straight to node-2 at `--hop-rate` (10,000 msg/s), so every message crosses
//! node → Redis → node. That end-to-end figure includes two loopback WebSocket hops and both
//! nodes' frame handling, so the same load runs again with publisher and member on one extra
//! node started with `--backbone none`; the difference of the two, percentile by percentile,
//! is what the backbone hop adds.

use super::args::FanoutArgs;
use super::procfs::{self, CpuMeter};
use super::protocol::Protocol;
use super::publish::Publishers;
use super::rooms::{self, RoomLoad, RoomLoadNames};
use super::worker::{Fleet, RoomSpec, WorkerSpec};
use super::{add_pairs, http_get, metric_sum, new_histogram, source_addrs, Latency, MAX_CLIENTS};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_kit::{Cluster, ClusterLogs, ClusterOptions, NodeProcess, SpawnOptions};

/// The fan-out target, delivered messages per second.
pub const TARGET_DELIVERED_PER_SEC: f64 = 500_000.0;
/// The target for the backbone hop's p99 at 10,000 msg/s, µs.
pub const TARGET_HOP_P99_US: u64 = 1_000;
/// Unmeasured time at the start of each step.
const RAMP: Duration = Duration::from_secs(1);
/// Pause between steps, for queues to drain.
const PAUSE: Duration = Duration::from_millis(700);
/// Rooms of the hop measurement.
const HOP_ROOMS: usize = 20;

/// What `tether bench fanout` runs.
#[derive(Debug, Clone)]
pub struct FanoutOptions {
    pub rooms: usize,
    pub members: usize,
    pub rates: Vec<f64>,
    pub step: Duration,
    pub nodes: usize,
    /// Rate of the backbone-hop measurement (0: skip it).
    pub hop_rate: f64,
    /// Members and publishers connect straight to the nodes (round robin), not through the
    /// balancer: what the balancer's extra hop costs.
    pub direct: bool,
    /// `--threads` of every node; `None`: [`FanoutOptions::threads_per_node`]'s fair share.
    pub node_threads: Option<usize>,
    pub logs: Option<PathBuf>,
}

impl FanoutOptions {
    /// The options that cannot work, named (`tether bench fanout` exits 64 on them).
    fn check(&self) -> Result<()> {
        let clients = self.rooms * self.members;
        if clients == 0 || self.rates.is_empty() {
            bail!("--rooms, --members and --rates must not be empty or zero");
        }
        if clients + self.rooms > MAX_CLIENTS {
            bail!(
                "{clients} members + {} publishers exceed what one balancer process holds ({MAX_CLIENTS})",
                self.rooms
            );
        }
        Ok(())
    }

    /// Worker threads of each node: `node_threads`, or else the machine's cores shared among
    /// the nodes (at least one each). The nodes stand for machines of their own; the node's
    /// own default, one worker per core, would run three nodes' six workers on two cores.
    pub fn threads_per_node(&self) -> usize {
        self.node_threads.unwrap_or_else(|| (procfs::cores() / self.nodes.max(1)).max(1))
    }

    /// Where the processes log: `logs/NAME.log`, or nowhere.
    fn cluster_logs(&self) -> ClusterLogs {
        self.logs.clone().map_or(ClusterLogs::Null, ClusterLogs::Dir)
    }

    /// The `--quick` smoke run.
    pub fn quick() -> Self {
        Self {
            rooms: 4,
            members: 10,
            rates: vec![20.0, 50.0],
            step: Duration::from_millis(1500),
            nodes: 3,
            hop_rate: 200.0,
            direct: false,
            node_threads: None,
            logs: None,
        }
    }
}

impl From<FanoutArgs> for FanoutOptions {
    fn from(a: FanoutArgs) -> Self {
        if a.quick {
            return Self {
                logs: a.logs,
                nodes: a.nodes.unwrap_or(3).max(2),
                direct: a.direct,
                node_threads: a.node_threads,
                ..Self::quick()
            };
        }
        Self {
            rooms: a.rooms.unwrap_or(20),
            members: a.members.unwrap_or(250),
            rates: a.rates,
            step: Duration::from_secs_f64(a.step_secs.unwrap_or(5.0)),
            nodes: a.nodes.unwrap_or(3),
            hop_rate: a.hop_rate,
            direct: a.direct,
            node_threads: a.node_threads,
            logs: a.logs,
        }
    }
}

/// One rate step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Published messages per second asked for, and achieved.
    pub rate: f64,
    pub published_per_sec: f64,
    /// rate × (members + 1).
    pub expected_per_sec: f64,
    /// Room messages received per second, as the clients counted them.
    pub delivered_per_sec: f64,
    /// Frames delivered per second by each node (`tether_node_frames_delivered_total`).
    pub node_delivered_per_sec: Vec<(String, f64)>,
    pub latency: Latency,
    /// CPU, percent of one core, over the measured window.
    pub redis_cpu: f64,
    pub nodes_cpu: f64,
    pub balancer_cpu: f64,
    pub loadgen_cpu: f64,
    /// Everything on the machine (from `/proc/stat`), percent of one core.
    pub machine_cpu: f64,
}

/// The backbone-hop measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Hop {
    pub rate: f64,
    pub published_per_sec: f64,
    pub delivered_per_sec: f64,
    /// Client → node-1 → Redis → node-2 → client.
    pub latency: Latency,
    pub redis_cpu: f64,
    /// The same load with publisher and member on one node that has no backbone
    /// (`--backbone none`): client → node → client. `None` if that node could not be started.
    pub without_backbone: Option<Latency>,
}

impl Hop {
    /// What the backbone adds at the median and at p99: the hop's percentile minus the
    /// same percentile without a backbone (an estimate: percentiles do not subtract exactly).
    pub fn added_us(&self) -> Option<(i64, i64)> {
        let local = self.without_backbone.as_ref()?;
        let diff = |a: u64, b: u64| a as i64 - b as i64;
        Some((diff(self.latency.p50_us, local.p50_us), diff(self.latency.p99_us, local.p99_us)))
    }
}

/// The whole run, as written by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub bench: &'static str,
    pub rooms: usize,
    pub members: usize,
    pub nodes: usize,
    pub direct: bool,
    /// Runtime worker threads of each node.
    pub node_threads: usize,
    pub clients_open: u64,
    pub step_secs: f64,
    pub cores: usize,
    pub loadavg: Option<[f64; 3]>,
    pub steps: Vec<Step>,
    pub saturation: String,
    pub hop: Option<Hop>,
}

impl FanoutReport {
    /// The markdown tables and verdicts.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{} rooms × {} members over {} nodes {} ({} clients open), {:.1} s per step, {} worker thread(s) per node\n\n",
            self.rooms,
            self.members,
            self.nodes,
            if self.direct { "straight to the nodes (round robin)" } else { "through the balancer" },
            self.clients_open,
            self.step_secs,
            self.node_threads,
        );
        s.push_str(
            "| rate msg/s | published/s | lossless deliveries/s | delivered/s (clients) | per node (nodes' metrics) | \
             p50 ms | p99 ms | Redis CPU % | nodes CPU % | balancer CPU % | load-gen CPU % | machine CPU % |\n\
             |--:|--:|--:|--:|:--|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for st in &self.steps {
            let per_node: Vec<String> = st.node_delivered_per_sec.iter().map(|(_, v)| format!("{v:.0}")).collect();
            s.push_str(&format!(
                "| {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
                st.rate,
                st.published_per_sec,
                st.expected_per_sec,
                st.delivered_per_sec,
                per_node.join(" / "),
                st.latency.p50_us as f64 / 1000.0,
                st.latency.p99_us as f64 / 1000.0,
                st.redis_cpu,
                st.nodes_cpu,
                st.balancer_cpu,
                st.loadgen_cpu,
                st.machine_cpu,
            ));
        }
        let best = self.steps.iter().map(|s| s.delivered_per_sec).fold(0.0, f64::max);
        s.push_str(&format!(
            "\nsaturation: {}\nbest delivered: {best:.0} msg/s (target ≥ {TARGET_DELIVERED_PER_SEC:.0}): {}\n",
            self.saturation,
            if best >= TARGET_DELIVERED_PER_SEC { "met" } else { "missed" }
        ));
        if let Some(h) = &self.hop {
            let verdict = |us: i64| if us < TARGET_HOP_P99_US as i64 { "met" } else { "missed" };
            s.push_str(&format!(
                "\nbackbone hop (client → node-1 → Redis → node-2 → client) at {:.0} msg/s: published {:.0}/s, \
                 delivered {:.0}/s, p50 {} µs, p99 {} µs, p99.9 {} µs, Redis CPU {:.0} % — end to end p99 < \
                 {TARGET_HOP_P99_US} µs: {}\n",
                h.rate,
                h.published_per_sec,
                h.delivered_per_sec,
                h.latency.p50_us,
                h.latency.p99_us,
                h.latency.p999_us,
                h.redis_cpu,
                verdict(h.latency.p99_us as i64)
            ));
            match (&h.without_backbone, h.added_us()) {
                (Some(l), Some((p50, p99))) => s.push_str(&format!(
                    "same load on one node without a backbone (client → node → client): p50 {} µs, p99 {} µs, \
                     p99.9 {} µs\nadded by the backbone hop: p50 {p50:+} µs, p99 {p99:+} µs — target p99 < \
                     {TARGET_HOP_P99_US} µs: {}\n",
                    l.p50_us,
                    l.p99_us,
                    l.p999_us,
                    verdict(p99)
                )),
                _ => s.push_str("same load without a backbone: not measured (see the run's output)\n"),
            }
        }
        s
    }
}

/// `tether bench fanout`.
pub async fn run_cli(args: FanoutArgs) -> Result<i32> {
    if args.steady.is_some() {
        return super::steady::run_cli(args).await;
    }
    let json = args.json.clone();
    let opts = FanoutOptions::from(args);
    if let Err(e) = opts.check() {
        eprintln!("tether bench fanout: {e}");
        return Ok(crate::EXIT_USAGE.into());
    }
    let mut stdout = std::io::stdout();
    let report = run(&opts, &mut stdout).await?;
    println!();
    super::print_report(&report.table(), &report, json.as_deref())?;
    Ok(0)
}

/// Runs the benchmark, printing progress to `out`.
pub async fn run<W: Write>(opts: &FanoutOptions, out: &mut W) -> Result<FanoutReport> {
    opts.check()?;
    let dir = tempfile::Builder::new().prefix("tether-bench-fanout-").tempdir()?;
    let node_conf = super::write_file(dir.path(), "node.toml", "max_connections = 19000\n")?;
    let bal_conf = super::write_file(dir.path(), "balancer.toml", "max_connections = 9950\n")?;
    writeln!(out, "starting redis-server, {} nodes, balancer", opts.nodes)?;
    let node_args = vec![
        "--config".to_owned(),
        node_conf.display().to_string(),
        "--threads".to_owned(),
        opts.threads_per_node().to_string(),
    ];
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: opts.nodes,
        node_args: node_args.clone(),
        balancer_args: vec!["--config".to_owned(), bal_conf.display().to_string()],
        logs: opts.cluster_logs(),
        ..ClusterOptions::default()
    })
    .await?;
    let result = measure(opts, &cluster, &node_args, out).await;
    cluster.kill_all().await?;
    result
}

async fn measure<W: Write>(
    opts: &FanoutOptions,
    cluster: &Cluster,
    node_args: &[String],
    out: &mut W,
) -> Result<FanoutReport> {
    let admin = cluster.balancer().admin_addr();
    tether_kit::eventually(Duration::from_secs(15), "every node ready at the balancer", || async {
        metric_sum(&http_get(admin, "/metrics").await.unwrap_or_default(), "tether_balancer_node_ready") as usize
            == opts.nodes
    })
    .await
    .context("the balancer did not see every node ready")?;
    let tag = format!("{}-{}", std::process::id(), super::unix_micros() % 1_000_000_000);
    let room_prefix = format!("fan-{tag}-");
    let targets: Vec<SocketAddr> =
        if opts.direct { cluster.nodes().iter().map(|n| n.addr()).collect() } else { vec![cluster.balancer().addr()] };
    let loadavg = procfs::loadavg();
    let names = RoomLoadNames {
        room_prefix: &room_prefix,
        id_tag: &format!("fan-{tag}"),
        lead: "",
        how: if opts.direct { " straight to the nodes" } else { " through the balancer" },
        first_worker: 0,
    };
    let RoomLoad { mut fleet, mut pubs, open } =
        rooms::connect(Protocol::Tether, &targets, opts.rooms, opts.members, names, out).await?;

    let node_addrs: Vec<(String, SocketAddr)> =
        cluster.nodes().iter().map(|n| (n.name().to_owned(), n.addr())).collect();
    let redis_pid = cluster.redis().and_then(|r| r.pid()).unwrap_or(0);
    let node_pids: Vec<u32> = cluster.nodes().iter().map(|n| n.pid()).collect();
    let balancer_pid = cluster.balancer().pid();
    let mut loadgen_pids = fleet.pids();
    loadgen_pids.push(std::process::id());

    let pub_received = Arc::clone(&pubs.received);
    let mut steps = Vec::new();
    let mut notes = Vec::new();
    for &rate in &opts.rates {
        let measure_step = async {
            tokio::time::sleep(RAMP).await;
            fleet.stats(true).await?;
            let pub_before = pub_received.load(Ordering::Relaxed);
            let nodes_before = node_counters(&node_addrs).await;
            let mut pids = vec![redis_pid, balancer_pid];
            pids.extend(&node_pids);
            pids.extend(&loadgen_pids);
            let cpu = CpuMeter::start(&pids);
            let machine = MachineCpu::start();
            tokio::time::sleep(opts.step).await;
            let stats = fleet.stats(true).await?;
            let (used, wall) = cpu.read();
            let machine_cpu = machine.percent();
            let nodes_after = node_counters(&node_addrs).await;
            let pub_received = pub_received.load(Ordering::Relaxed) - pub_before;
            Ok::<_, anyhow::Error>((stats, used, wall, machine_cpu, nodes_before, nodes_after, pub_received))
        };
        let (sent, measured) = tokio::join!(pubs.publish(rate, RAMP + opts.step, None), measure_step);
        let sent = match sent {
            Ok(p) => p.sent,
            Err(e) => {
                // Past saturation a publisher (a member of its room too) can fall behind on its
                // own room's traffic and be closed as a slow consumer: that ends the run, not
                // the report.
                let note = format!("at {rate:.0} msg/s a publisher's connection failed ({e:#}); later rates not run");
                writeln!(out, "  {note}")?;
                notes.push(note);
                break;
            }
        };
        let (stats, used, wall, machine_cpu, nodes_before, nodes_after, pub_received) = measured?;
        let secs = wall.as_secs_f64();
        let pct = |d: Duration| (d.as_secs_f64() / secs * 1000.0).round() / 10.0;
        let mut h = new_histogram();
        add_pairs(&mut h, &stats.hist);
        let step = Step {
            rate,
            published_per_sec: (sent as f64 / (RAMP + opts.step).as_secs_f64()).round(),
            expected_per_sec: rate * (opts.members + 1) as f64,
            delivered_per_sec: ((stats.messages + pub_received) as f64 / secs).round(),
            node_delivered_per_sec: node_addrs
                .iter()
                .zip(nodes_before.iter().zip(&nodes_after))
                .map(|((name, _), (b, a))| (name.clone(), ((a - b) / secs).round()))
                .collect(),
            latency: Latency::of(&h),
            redis_cpu: pct(used[0]),
            balancer_cpu: pct(used[1]),
            nodes_cpu: pct(used[2..2 + node_pids.len()].iter().sum()),
            loadgen_cpu: pct(used[2 + node_pids.len()..].iter().sum()),
            machine_cpu,
        };
        writeln!(
            out,
            "  rate {:>6.0}/s: delivered {:>8.0}/s of {:>8.0} lossless, p50 {:.2} ms p99 {:.2} ms; CPU % redis {:.0} \
             nodes {:.0} balancer {:.0} load-gen {:.0} machine {:.0}",
            rate,
            step.delivered_per_sec,
            step.expected_per_sec,
            step.latency.p50_us as f64 / 1000.0,
            step.latency.p99_us as f64 / 1000.0,
            step.redis_cpu,
            step.nodes_cpu,
            step.balancer_cpu,
            step.loadgen_cpu,
            step.machine_cpu
        )?;
        out.flush()?;
        steps.push(step);
        tokio::time::sleep(PAUSE).await;
    }
    let mut saturation = saturation(&steps);
    for note in &notes {
        saturation.push_str("; ");
        saturation.push_str(note);
    }
    let stats = fleet.stats(false).await?;
    if stats.closed > 0 {
        writeln!(out, "  note: {} member connections were closed by the cluster during the run", stats.closed)?;
    }
    pubs.close();
    fleet.close().await;

    let hop = if opts.hop_rate > 0.0 && cluster.nodes().len() >= 2 {
        Some(hop(opts, cluster, node_args, &tag, redis_pid, out).await?)
    } else {
        None
    };
    Ok(FanoutReport {
        bench: "fanout",
        rooms: opts.rooms,
        members: opts.members,
        nodes: opts.nodes,
        direct: opts.direct,
        node_threads: opts.threads_per_node(),
        clients_open: open,
        step_secs: opts.step.as_secs_f64(),
        cores: procfs::cores(),
        loadavg,
        steps,
        saturation,
        hop,
    })
}

/// Publishers straight to node-1, one member per room straight to node-2, at `hop_rate`;
/// then the same with both on one node started without a backbone, for what the hop adds.
async fn hop<W: Write>(
    opts: &FanoutOptions,
    cluster: &Cluster,
    node_args: &[String],
    tag: &str,
    redis_pid: u32,
    out: &mut W,
) -> Result<Hop> {
    let (from, to) = (cluster.nodes()[0].addr(), cluster.nodes()[1].addr());
    let hop = hop_run(opts, from, to, &format!("{tag}-b"), redis_pid, out).await?;
    writeln!(
        out,
        "  backbone hop at {:.0}/s: delivered {:.0}/s, p50 {} µs, p99 {} µs, p99.9 {} µs",
        hop.rate, hop.delivered_per_sec, hop.latency.p50_us, hop.latency.p99_us, hop.latency.p999_us
    )?;
    let mut args = node_args.to_vec();
    args.extend(["--backbone".to_owned(), "none".to_owned()]);
    let spawn = SpawnOptions { stderr: opts.cluster_logs().target("hop-local"), ..SpawnOptions::default() };
    // The node ignores its Redis with `--backbone none`; the fixture passes one all the same.
    let mut local = match NodeProcess::start_with("hop-local", cluster.redis_url(), &args, &spawn).await {
        Ok(node) => node,
        Err(e) => {
            writeln!(
                out,
                "  could not start a node without a backbone ({e:#}); the hop's added latency is not measured"
            )?;
            return Ok(hop);
        }
    };
    let addr = local.addr();
    let measured = hop_run(opts, addr, addr, &format!("{tag}-l"), redis_pid, out).await;
    local.kill().await?;
    let latency = measured?.latency;
    writeln!(
        out,
        "  same load, one node without a backbone: p50 {} µs, p99 {} µs, p99.9 {} µs",
        latency.p50_us, latency.p99_us, latency.p999_us
    )?;
    Ok(Hop { without_backbone: Some(latency), ..hop })
}

/// `HOP_ROOMS` rooms, one member each connected to `to`, their publishers to `from`, at
/// `hop_rate` for one ramp and one step.
async fn hop_run<W: Write>(
    opts: &FanoutOptions,
    from: SocketAddr,
    to: SocketAddr,
    tag: &str,
    redis_pid: u32,
    out: &mut W,
) -> Result<Hop> {
    let room_prefix = format!("hop-{tag}-");
    let spec = WorkerSpec {
        targets: vec![to],
        sources: source_addrs(0, HOP_ROOMS),
        id_prefix: format!("hop-{tag}-m"),
        first: 0,
        count: HOP_ROOMS as u64,
        concurrency: 8,
        rooms: Some(RoomSpec { prefix: room_prefix.clone(), count: HOP_ROOMS as u64 }),
        connect_timeout_ms: 30_000,
        protocol: Protocol::Tether,
        tls: None,
    };
    let (mut fleet, _) = Fleet::start(vec![spec], Duration::from_secs(60), out).await?;
    let rooms: Vec<String> = (0..HOP_ROOMS).map(|r| format!("{room_prefix}{r}")).collect();
    let mut pubs = Publishers::connect(Protocol::Tether, &[from], &format!("hop-{tag}-p"), &rooms).await?;
    let measure_step = async {
        tokio::time::sleep(RAMP).await;
        fleet.stats(true).await?;
        let cpu = CpuMeter::start(&[redis_pid]);
        tokio::time::sleep(opts.step).await;
        let stats = fleet.stats(true).await?;
        let (used, wall) = cpu.read();
        Ok::<_, anyhow::Error>((stats, used[0], wall))
    };
    let (sent, measured) = tokio::join!(pubs.publish(opts.hop_rate, RAMP + opts.step, None), measure_step);
    let sent = sent?.sent;
    let (stats, redis, wall) = measured?;
    pubs.close();
    fleet.close().await;
    let mut h = new_histogram();
    add_pairs(&mut h, &stats.hist);
    Ok(Hop {
        rate: opts.hop_rate,
        published_per_sec: (sent as f64 / (RAMP + opts.step).as_secs_f64()).round(),
        delivered_per_sec: (stats.messages as f64 / wall.as_secs_f64()).round(),
        latency: Latency::of(&h),
        redis_cpu: (redis.as_secs_f64() / wall.as_secs_f64() * 1000.0).round() / 10.0,
        without_backbone: None,
    })
}

/// Where the steps stop scaling, and what is closest to its limit there.
fn saturation(steps: &[Step]) -> String {
    let cores = procfs::cores() as f64 * 100.0;
    let base_p99 = steps.first().map_or(0, |s| s.latency.p99_us).max(1);
    let at = steps
        .iter()
        .find(|s| s.delivered_per_sec < 0.9 * s.expected_per_sec || s.latency.p99_us > 10 * base_p99.max(1_000));
    let Some(st) = at else {
        let last = steps.last().map_or(0.0, |s| s.rate);
        return format!("not reached: every step up to {last:.0} msg/s delivered ≥ 90 % with a steady p99");
    };
    let mut parts = [
        ("Redis (one core)", st.redis_cpu / 100.0, st.redis_cpu),
        ("the nodes", st.nodes_cpu / cores, st.nodes_cpu),
        ("the balancer", st.balancer_cpu / cores, st.balancer_cpu),
        ("the load generators", st.loadgen_cpu / cores, st.loadgen_cpu),
    ];
    parts.sort_by(|a, b| b.1.total_cmp(&a.1));
    let why = if st.delivered_per_sec < 0.9 * st.expected_per_sec {
        format!("delivers {:.0} % of lossless", 100.0 * st.delivered_per_sec / st.expected_per_sec)
    } else {
        format!("p99 {:.1} ms vs {:.1} ms at the first step", st.latency.p99_us as f64 / 1e3, base_p99 as f64 / 1e3)
    };
    let machine = if st.machine_cpu >= 0.9 * cores {
        format!("the machine is out of CPU ({:.0} % of {:.0} %)", st.machine_cpu, cores)
    } else {
        format!("the machine still had CPU ({:.0} % of {:.0} %)", st.machine_cpu, cores)
    };
    format!(
        "at {:.0} msg/s ({why}); {machine}; largest users: {} {:.0} %, {} {:.0} %, {} {:.0} %, {} {:.0} %",
        st.rate, parts[0].0, parts[0].2, parts[1].0, parts[1].2, parts[2].0, parts[2].2, parts[3].0, parts[3].2
    )
}

async fn node_counters(nodes: &[(String, SocketAddr)]) -> Vec<f64> {
    let mut v = Vec::with_capacity(nodes.len());
    for (_, addr) in nodes {
        v.push(metric_sum(
            &http_get(*addr, "/metrics").await.unwrap_or_default(),
            "tether_node_frames_delivered_total",
        ));
    }
    v
}

/// Busy time of all CPUs from `/proc/stat`.
struct MachineCpu {
    busy: u64,
    at: Instant,
}

impl MachineCpu {
    fn read_busy() -> u64 {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = text.lines().next() else { return 0 };
        let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
        f.iter().take(8).sum::<u64>() - f.get(3).copied().unwrap_or(0) - f.get(4).copied().unwrap_or(0)
    }

    fn start() -> Self {
        Self { busy: Self::read_busy(), at: Instant::now() }
    }

    fn percent(&self) -> f64 {
        let busy = procfs::ticks_to_duration(Self::read_busy().saturating_sub(self.busy));
        (busy.as_secs_f64() / self.at.elapsed().as_secs_f64() * 1000.0).round() / 10.0
    }
}
