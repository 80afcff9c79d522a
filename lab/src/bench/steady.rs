//! `tether bench fanout --steady RATE[,RATE…] [--vs socketio]`: fan-out at fixed rates, what it
//! costs the servers per delivery and what its tail latency is — optionally side by side with
//! Socket.IO 4 and its Redis adapter, on the same Redis, with the same load generator.
//!
//! One private `redis-server`; K Tether nodes on it (and, with `--vs socketio`, K Node.js
//! processes running `bench/socketio/server.js`, see [`super::socketio`]). For each system, R
//! rooms of M member clients connect straight to its processes, round robin (Socket.IO has no
//! sticky balancer in front; `--through-balancer` puts Tether's balancer in between), plus one
//! publisher per room, which is a member of its room as well. Then, rate by rate and system by
//! system (so that both see the machine in the same state), the publishers send 64-byte texts
//! stamped with their send time and numbered over all rooms, at the rate asked for, for an
//! unmeasured ramp and then a measured window of `--step-secs`. Per step:
//!
//! * every message sent in the window is accounted for: each client tallies the sequence
//!   numbers it received, and after the window (and a drain of at most [`DRAIN_MAX`]) the
//!   receipts of every message are compared with its room's M + 1 clients — deliveries due and
//!   received, messages short, duplicates;
//! * latency p50/p99/p99.9 of those messages, send stamp → receipt (one machine, one clock);
//! * CPU (user + system, from `/proc/PID/stat`) of the system's server processes over the
//!   window, divided by the deliveries the clients counted in it: **CPU µs per delivery**;
//!   Redis' and the load generators' CPU as percent of one core.
//!
//! A step is *clean* when every message reached every member exactly once and p99 < 50 ms.

use super::args::FanoutArgs;
use super::procfs::{self, CpuMeter};
use super::protocol::Protocol;
use super::publish::Publishers;
use super::rooms::{self, RoomLoad, RoomLoadNames};
use super::socketio::{self, SocketIoServer};
use super::worker::{Fleet, TallySummary, MAX_TRACKED};
use super::{add_pairs, new_histogram, Latency};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tether_kit::{Cluster, ClusterLogs, ClusterOptions, LogTarget};

/// The default steps, published messages per second over all rooms.
pub const DEFAULT_RATES: [f64; 5] = [1_000.0, 2_000.0, 4_000.0, 8_000.0, 16_000.0];
/// A clean step's p99 is below this, µs.
pub const CLEAN_P99_US: u64 = 50_000;
/// Longest wait after a step's window for its last messages.
pub const DRAIN_MAX: Duration = Duration::from_secs(10);
/// The drain ends early when nothing more arrived for this long.
const DRAIN_IDLE: Duration = Duration::from_millis(1500);
/// A publisher lag past this gets a note in the report.
const LAG_NOTED: Duration = Duration::from_millis(20);
/// Pause between steps.
const PAUSE: Duration = Duration::from_millis(700);
/// Most clients per Tether node or Socket.IO process (20,000 descriptors each).
const MAX_PER_SERVER: usize = 18_000;

/// What `tether bench fanout --steady` runs.
#[derive(Debug, Clone)]
pub struct SteadyOptions {
    pub rooms: usize,
    pub members: usize,
    pub nodes: usize,
    pub rates: Vec<f64>,
    /// Measured window of each step.
    pub step: Duration,
    /// Unmeasured time before each window (at least one second).
    pub ramp: Duration,
    pub vs_socketio: bool,
    /// Tether's clients connect through its balancer instead of straight to the nodes.
    pub through_balancer: bool,
    /// `--threads` of every Tether node; `None`: the machine's cores shared among the nodes.
    pub node_threads: Option<usize>,
    /// Where Socket.IO's npm packages are installed; `None`: [`socketio::default_dir`].
    pub socketio_dir: Option<PathBuf>,
    pub logs: Option<PathBuf>,
}

impl SteadyOptions {
    /// The `--quick` smoke run: 4 rooms × 10 members on 2 nodes, two 2-second steps.
    pub fn quick() -> Self {
        Self {
            rooms: 4,
            members: 10,
            nodes: 2,
            rates: vec![100.0, 300.0],
            step: Duration::from_secs(2),
            ramp: Duration::from_secs(1),
            vs_socketio: false,
            through_balancer: false,
            node_threads: None,
            socketio_dir: None,
            logs: None,
        }
    }

    fn threads_per_node(&self) -> usize {
        self.node_threads.unwrap_or_else(|| (procfs::cores() / self.nodes.max(1)).max(1))
    }

    fn cluster_logs(&self) -> ClusterLogs {
        self.logs.clone().map_or(ClusterLogs::Null, ClusterLogs::Dir)
    }

    /// Sequence numbers one step of `rate` may use (what its tallies hold).
    fn tracked(&self, rate: f64) -> u64 {
        (rate * (self.ramp + self.step).as_secs_f64() * 1.25) as u64 + 1_000
    }

    fn check(&self) -> Result<()> {
        let clients = self.rooms * self.members;
        if clients == 0 || self.rates.is_empty() || self.nodes == 0 {
            bail!("--rooms, --members, --nodes and the --steady rates must not be empty or zero");
        }
        if self.ramp < Duration::from_secs(1) {
            bail!("the ramp before each step must be at least 1 s");
        }
        let most = if self.through_balancer { super::MAX_CLIENTS } else { MAX_PER_SERVER * self.nodes };
        if clients + self.rooms > most {
            bail!(
                "{clients} members + {} publishers exceed what {} hold ({most})",
                self.rooms,
                if self.through_balancer { "one balancer process".to_owned() } else { format!("{} nodes", self.nodes) }
            );
        }
        let max_rate = self.rates.iter().copied().fold(0.0, f64::max);
        if self.tracked(max_rate) > MAX_TRACKED {
            bail!(
                "{max_rate} msg/s for {:.0} s is more messages per step than the bench tracks ({MAX_TRACKED}): \
                 use fewer --step-secs",
                (self.ramp + self.step).as_secs_f64()
            );
        }
        Ok(())
    }

    fn from_args(a: &FanoutArgs) -> Self {
        let base = if a.quick {
            Self::quick()
        } else {
            Self {
                rooms: a.rooms.unwrap_or(10),
                members: a.members.unwrap_or(100),
                nodes: a.nodes.unwrap_or(2),
                rates: a.steady.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| DEFAULT_RATES.to_vec()),
                step: Duration::from_secs_f64(a.step_secs.unwrap_or(10.0)),
                ramp: Duration::from_secs_f64(a.ramp_secs),
                ..Self::quick()
            }
        };
        Self {
            vs_socketio: a.vs.is_some(),
            through_balancer: a.through_balancer,
            node_threads: a.node_threads,
            socketio_dir: a.socketio_dir.clone(),
            logs: a.logs.clone(),
            ..base
        }
    }
}

/// One system at one rate.
#[derive(Debug, Clone, Serialize)]
pub struct SteadyStep {
    /// `tether` or `socketio`.
    pub system: &'static str,
    /// Published messages per second asked for (all rooms together).
    pub rate: f64,
    /// Messages sent in the window, and per second.
    pub messages: u64,
    pub published_per_sec: f64,
    /// Deliveries per second a lossless system makes: published × (members + 1).
    pub expected_per_sec: f64,
    /// Room messages per second the clients received during the window.
    pub delivered_per_sec: f64,
    /// The window's messages, accounted for one by one after the drain.
    pub accounting: Accounting,
    /// Send → receipt of the window's messages.
    pub latency: Latency,
    /// CPU of the system's server processes (nodes, plus the balancer with
    /// `--through-balancer`), percent of one core, and per delivery counted in the window.
    pub server_cpu: f64,
    pub cpu_us_per_delivery: Option<f64>,
    pub redis_cpu: f64,
    /// The load generators (worker processes and this one, where the publishers run).
    pub loadgen_cpu: f64,
    /// Largest delay of a publisher behind its schedule, ms (the load generator's own lag).
    pub publisher_lag_ms: f64,
    /// Member connections the servers closed during the step.
    pub closed: u64,
    pub clean: bool,
    pub note: Option<String>,
}

/// Deliveries of one step's messages, as counted after the drain.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Accounting {
    /// Deliveries due (messages × (members + 1)) and received (each at most once per client).
    pub expected: u64,
    pub received: u64,
    /// received ÷ expected.
    pub ratio: f64,
    /// Messages some client did not get; `short_exact` is false when more runs of them were
    /// found than the workers list (the figure is then a lower bound).
    pub short_messages: u64,
    pub short_exact: bool,
    /// Receipts beyond a message's due count, and receipts out of order at one client.
    pub duplicates: u64,
    pub repeats: u64,
    /// How long after the window the last of them arrived (or the drain gave up).
    pub drain_ms: u64,
}

/// The whole run, as written by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct SteadyReport {
    pub bench: &'static str,
    pub rooms: usize,
    pub members: usize,
    pub nodes: usize,
    pub through_balancer: bool,
    pub node_threads: usize,
    pub step_secs: f64,
    pub ramp_secs: f64,
    pub cores: usize,
    pub loadavg: Option<[f64; 3]>,
    /// `node --version` of the Socket.IO processes.
    pub node_version: Option<String>,
    /// Clients that connected and joined, per system.
    pub clients_open: Vec<(&'static str, u64)>,
    pub steps: Vec<SteadyStep>,
}

impl SteadyReport {
    /// The highest rate at which `system` was clean.
    pub fn highest_clean(&self, system: &str) -> Option<f64> {
        self.steps.iter().filter(|s| s.system == system && s.clean).map(|s| s.rate).reduce(f64::max)
    }

    fn step(&self, system: &str, rate: f64) -> Option<&SteadyStep> {
        self.steps.iter().find(|s| s.system == system && s.rate == rate)
    }

    /// The markdown table and the comparison.
    pub fn table(&self) -> String {
        let mut s = format!(
            "steady fan-out: {} rooms × {} members (+ 1 publisher each) over {} server processes per system, \
             clients {}; {:.0} s ramp + {:.1} s measured per step; {} worker thread(s) per Tether node; {} cores\n\n",
            self.rooms,
            self.members,
            self.nodes,
            if self.through_balancer { "through Tether's balancer" } else { "straight to the servers, round robin" },
            self.ramp_secs,
            self.step_secs,
            self.node_threads,
            self.cores,
        );
        s.push_str(
            "| rate msg/s | system | published/s | lossless deliveries/s | delivered/s | delivered/due | messages short | \
             p50 ms | p99 ms | p99.9 ms | server CPU µs/delivery | server CPU % | Redis CPU % | load-gen CPU % | clean |\n\
             |--:|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:--|\n",
        );
        let ms = |us: u64| us as f64 / 1000.0;
        for st in &self.steps {
            let a = &st.accounting;
            s.push_str(&format!(
                "| {:.0} | {} | {:.0} | {:.0} | {:.0} | {}/{} ({:.4}) | {}{} | {:.2} | {:.2} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {} |\n",
                st.rate,
                st.system,
                st.published_per_sec,
                st.expected_per_sec,
                st.delivered_per_sec,
                a.received,
                a.expected,
                a.ratio,
                if a.short_exact { "" } else { "≥ " },
                a.short_messages,
                ms(st.latency.p50_us),
                ms(st.latency.p99_us),
                ms(st.latency.p999_us),
                st.cpu_us_per_delivery.map_or("–".to_owned(), |c| format!("{c:.2}")),
                st.server_cpu,
                st.redis_cpu,
                st.loadgen_cpu,
                if st.clean { "yes" } else { "no" },
            ));
        }
        let notes: Vec<String> = self
            .steps
            .iter()
            .filter_map(|st| st.note.as_ref().map(|n| format!("- {} at {:.0} msg/s: {n}", st.system, st.rate)))
            .collect();
        if !notes.is_empty() {
            s.push_str(&format!("\n{}\n", notes.join("\n")));
        }
        let systems: Vec<&str> = self.clients_open.iter().map(|(s, _)| *s).collect();
        if systems.contains(&"socketio") {
            s.push_str(
                "\n| rate msg/s | CPU/delivery tether ÷ socketio | p99 tether ms | p99 socketio ms |\n|--:|--:|--:|--:|\n",
            );
            let mut rates: Vec<f64> = self.steps.iter().map(|st| st.rate).collect();
            rates.dedup();
            for rate in rates {
                let (t, o) = (self.step("tether", rate), self.step("socketio", rate));
                let ratio = match (t.and_then(|t| t.cpu_us_per_delivery), o.and_then(|o| o.cpu_us_per_delivery)) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
                    _ => "–".to_owned(),
                };
                let p99 =
                    |st: Option<&SteadyStep>| st.map_or("–".to_owned(), |st| format!("{:.2}", ms(st.latency.p99_us)));
                s.push_str(&format!("| {rate:.0} | {ratio} | {} | {} |\n", p99(t), p99(o)));
            }
        }
        s.push('\n');
        for sys in &systems {
            match self.highest_clean(sys) {
                Some(r) => s.push_str(&format!("highest clean step, {sys}: {r:.0} msg/s\n")),
                None => s.push_str(&format!("highest clean step, {sys}: none\n")),
            }
        }
        if systems.contains(&"socketio") {
            match (self.highest_clean("tether"), self.highest_clean("socketio")) {
                (Some(t), Some(o)) => s.push_str(&format!("highest clean step, tether ÷ socketio: {:.2}\n", t / o)),
                _ => s.push_str("highest clean step, tether ÷ socketio: – (a system had no clean step)\n"),
            }
        }
        s.push_str(&format!(
            "clean = every message of the window delivered to every member exactly once and p99 < {} ms\n",
            CLEAN_P99_US / 1000
        ));
        s
    }
}

/// `tether bench fanout --steady …`: progress on stderr, the table on stdout.
pub async fn run_cli(args: FanoutArgs) -> Result<i32> {
    let opts = SteadyOptions::from_args(&args);
    if let Err(e) = opts.check() {
        eprintln!("tether bench fanout: {e}");
        return Ok(crate::EXIT_USAGE.into());
    }
    let mut progress = std::io::stderr();
    let report = run(&opts, &mut progress).await?;
    super::print_report(&report.table(), &report, args.json.as_deref())?;
    Ok(0)
}

/// One system under test: its clients, publishers and the processes its CPU is read from.
struct System {
    protocol: Protocol,
    servers: Vec<u32>,
    fleet: Fleet,
    pubs: Publishers,
    open: u64,
    /// Why its later steps are not run.
    stopped: Option<String>,
}

/// Runs the benchmark, printing progress to `out`.
pub async fn run<W: Write>(opts: &SteadyOptions, out: &mut W) -> Result<SteadyReport> {
    opts.check()?;
    let dir = tempfile::Builder::new().prefix("tether-bench-steady-").tempdir()?;
    let installed = if opts.vs_socketio {
        let cache = opts.socketio_dir.clone().unwrap_or_else(socketio::default_dir);
        Some(socketio::install(&cache, out).await?)
    } else {
        None
    };
    let node_conf = super::write_file(dir.path(), "node.toml", "max_connections = 19000\n")?;
    let bal_conf = super::write_file(dir.path(), "balancer.toml", "max_connections = 9950\n")?;
    writeln!(out, "starting redis-server and {} Tether nodes (+ balancer)", opts.nodes)?;
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: opts.nodes,
        node_args: vec![
            "--config".to_owned(),
            node_conf.display().to_string(),
            "--threads".to_owned(),
            opts.threads_per_node().to_string(),
        ],
        balancer_args: vec!["--config".to_owned(), bal_conf.display().to_string()],
        logs: opts.cluster_logs(),
        ..ClusterOptions::default()
    })
    .await?;
    let mut sio = Vec::new();
    let result = async {
        if let Some(inst) = &installed {
            writeln!(
                out,
                "starting {} Socket.IO processes ({} server.js, Redis adapter)",
                opts.nodes, inst.node_version
            )?;
            for k in 1..=opts.nodes {
                let name = format!("socketio-{k}");
                let log = match &opts.logs {
                    Some(d) => LogTarget::File(d.join(format!("{name}.log"))),
                    None => LogTarget::File(dir.path().join(format!("{name}.log"))),
                };
                sio.push(SocketIoServer::start(&name, inst, cluster.redis_url(), &log).await?);
            }
        }
        measure(opts, &cluster, &sio, installed.as_ref().map(|i| i.node_version.clone()), out).await
    }
    .await;
    for s in &mut sio {
        s.stop().await;
    }
    cluster.kill_all().await?;
    result
}

async fn measure<W: Write>(
    opts: &SteadyOptions,
    cluster: &Cluster,
    sio: &[SocketIoServer],
    node_version: Option<String>,
    out: &mut W,
) -> Result<SteadyReport> {
    if opts.through_balancer {
        let admin = cluster.balancer().admin_addr();
        tether_kit::eventually(Duration::from_secs(15), "every node ready at the balancer", || async {
            super::metric_sum(
                &super::http_get(admin, "/metrics").await.unwrap_or_default(),
                "tether_balancer_node_ready",
            ) as usize
                == opts.nodes
        })
        .await
        .context("the balancer did not see every node ready")?;
    }
    let tag = format!("{}-{}", std::process::id(), super::unix_micros() % 1_000_000_000);
    let loadavg = procfs::loadavg();
    let mut systems = Vec::new();
    let (targets, mut servers): (Vec<SocketAddr>, Vec<u32>) = if opts.through_balancer {
        (vec![cluster.balancer().addr()], vec![cluster.balancer().pid()])
    } else {
        (cluster.nodes().iter().map(|n| n.addr()).collect(), Vec::new())
    };
    servers.extend(cluster.nodes().iter().map(|n| n.pid()));
    systems.push(connect(opts, Protocol::Tether, &targets, servers, &format!("st-{tag}"), 0, out).await?);
    if !sio.is_empty() {
        let targets: Vec<SocketAddr> = sio.iter().map(|s| s.addr()).collect();
        let pids = sio.iter().map(|s| s.pid()).collect();
        systems.push(connect(opts, Protocol::SocketIo, &targets, pids, &format!("ss-{tag}"), 50, out).await?);
    }
    let redis_pid = cluster.redis().and_then(|r| r.pid()).unwrap_or(0);
    let mut steps = Vec::new();
    for &rate in &opts.rates {
        for sys in &mut systems {
            if let Some(why) = &sys.stopped {
                writeln!(out, "  {} at {rate:.0} msg/s: not run ({why})", sys.protocol.label())?;
                continue;
            }
            let st = step(opts, sys, rate, redis_pid, out).await?;
            writeln!(
                out,
                "  {:<8} {:>6.0} msg/s: delivered {}/{} ({:.4}), {} messages short, p50 {:.2} ms p99 {:.2} ms \
                 p99.9 {:.2} ms, server CPU {} µs/delivery ({:.0} %), Redis {:.0} %, load-gen {:.0} %{}",
                st.system,
                rate,
                st.accounting.received,
                st.accounting.expected,
                st.accounting.ratio,
                st.accounting.short_messages,
                st.latency.p50_us as f64 / 1e3,
                st.latency.p99_us as f64 / 1e3,
                st.latency.p999_us as f64 / 1e3,
                st.cpu_us_per_delivery.map_or("–".to_owned(), |c| format!("{c:.2}")),
                st.server_cpu,
                st.redis_cpu,
                st.loadgen_cpu,
                if st.clean { ", clean" } else { "" },
            )?;
            out.flush()?;
            steps.push(st);
            tokio::time::sleep(PAUSE).await;
        }
    }
    let clients_open = systems.iter().map(|s| (s.protocol.label(), s.open)).collect();
    for sys in systems {
        sys.pubs.close();
        sys.fleet.close().await;
    }
    Ok(SteadyReport {
        bench: "fanout-steady",
        rooms: opts.rooms,
        members: opts.members,
        nodes: opts.nodes,
        through_balancer: opts.through_balancer,
        node_threads: opts.threads_per_node(),
        step_secs: opts.step.as_secs_f64(),
        ramp_secs: opts.ramp.as_secs_f64(),
        cores: procfs::cores(),
        loadavg,
        node_version,
        clients_open,
        steps,
    })
}

/// Connects one system's members (load-generator children) and publishers (here).
async fn connect<W: Write>(
    opts: &SteadyOptions,
    protocol: Protocol,
    targets: &[SocketAddr],
    servers: Vec<u32>,
    tag: &str,
    first_worker: usize,
    out: &mut W,
) -> Result<System> {
    let room_prefix = format!("{tag}-r");
    let lead = format!("{}: ", protocol.label());
    let names = RoomLoadNames { room_prefix: &room_prefix, id_tag: tag, lead: &lead, how: "", first_worker };
    let RoomLoad { fleet, pubs, open } =
        rooms::connect(protocol, targets, opts.rooms, opts.members, names, out).await?;
    Ok(System { protocol, servers, fleet, pubs, open, stopped: None })
}

/// One rate on one system: ramp, measured window, drain, accounting.
async fn step<W: Write>(
    opts: &SteadyOptions,
    sys: &mut System,
    rate: f64,
    redis_pid: u32,
    out: &mut W,
) -> Result<SteadyStep> {
    let base = sys.pubs.next_seq();
    let cap = opts.tracked(rate);
    let start = Instant::now() + Duration::from_millis(200);
    let start_us = super::unix_micros() + 200_000;
    let (from, to) = (start_us + opts.ramp.as_micros() as u64, start_us + (opts.ramp + opts.step).as_micros() as u64);
    sys.fleet.track(base, cap, from, to).await?;
    sys.pubs.track(base, cap, from, to);
    let closed_before = sys.fleet.stats(false).await?.closed;
    tokio::time::sleep_until(start.into()).await;

    let mut pids = vec![redis_pid];
    pids.extend(&sys.servers);
    let mut loadgen = sys.fleet.pids();
    loadgen.push(std::process::id());
    pids.extend(&loadgen);
    let echoes = std::sync::Arc::clone(&sys.pubs.received);
    let window_start = start + opts.ramp;
    let window_end = window_start + opts.step;
    let fleet = &mut sys.fleet;
    let measure = async {
        tokio::time::sleep_until(window_start.into()).await;
        fleet.stats(true).await?;
        let echoes_before = echoes.load(Ordering::Relaxed);
        let cpu = CpuMeter::start(&pids);
        tokio::time::sleep_until(window_end.into()).await;
        let stats = fleet.stats(true).await?;
        let (used, wall) = cpu.read();
        let echoed = echoes.load(Ordering::Relaxed) - echoes_before;
        Ok::<_, anyhow::Error>((stats.messages + echoed, used, wall))
    };
    let publish = sys.pubs.publish(rate, window_end.saturating_duration_since(Instant::now()), Some((from, to)));
    let (published, measured) = tokio::join!(publish, measure);
    let (delivered, used, wall) = measured?;
    let published = match published {
        Ok(p) => p,
        Err(e) => {
            // A Tether node closes a publisher that falls too far behind on its own room's
            // traffic (a slow consumer): the system cannot take this rate.
            let why = format!("a publisher's connection failed ({e:#})");
            writeln!(out, "  {} at {rate:.0} msg/s: {why}; its later steps are not run", sys.protocol.label())?;
            sys.stopped = Some(format!("at {rate:.0} msg/s {why}"));
            let (lo, hi) = (base, sys.pubs.next_seq());
            let mut st =
                account(opts, sys, rate, lo, hi, delivered, &used, wall, Duration::ZERO, closed_before, out).await?;
            st.note = Some(match st.note.take() {
                Some(n) => format!("{}; {n}", sys.stopped.clone().unwrap_or_default()),
                None => sys.stopped.clone().unwrap_or_default(),
            });
            st.clean = false;
            return Ok(st);
        }
    };
    let (lo, hi) = published.window;
    account(opts, sys, rate, lo, hi, delivered, &used, wall, published.max_lag, closed_before, out).await
}

/// Drains, tallies `lo..hi` and builds the step's row.
#[allow(clippy::too_many_arguments)]
async fn account<W: Write>(
    opts: &SteadyOptions,
    sys: &mut System,
    rate: f64,
    lo: u64,
    hi: u64,
    delivered: u64,
    used: &[Duration],
    wall: Duration,
    max_lag: Duration,
    closed_before: u64,
    out: &mut W,
) -> Result<SteadyStep> {
    let drained_from = Instant::now();
    let (mut last, mut progress_at) = (u64::MAX, Instant::now());
    let tally = loop {
        let mut t = sys.fleet.tally(lo, hi).await?;
        t.add(&sys.pubs.tally(lo, hi));
        let done = t.received >= t.expected;
        if t.received != last {
            (last, progress_at) = (t.received, Instant::now());
        }
        if done || progress_at.elapsed() >= DRAIN_IDLE || drained_from.elapsed() >= DRAIN_MAX {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let drain = drained_from.elapsed();
    let closed = sys.fleet.stats(false).await?.closed.saturating_sub(closed_before);
    if closed > 0 {
        writeln!(out, "  {}: {closed} member connections were closed by the server", sys.protocol.label())?;
    }
    let secs = wall.as_secs_f64().max(1e-9);
    let pct = |d: Duration| (d.as_secs_f64() / secs * 1000.0).round() / 10.0;
    let n = sys.servers.len();
    let server: Duration = used[1..1 + n].iter().sum();
    let loadgen: Duration = used[1 + n..].iter().sum();
    let mut h = new_histogram();
    add_pairs(&mut h, &tally.hist);
    let latency = Latency::of(&h);
    let accounting = accounting(&tally, drain);
    let messages = hi - lo;
    let clean = messages > 0
        && tally.expected > 0
        && tally.received == tally.expected
        && tally.short_messages == 0
        && tally.duplicates == 0
        && latency.p99_us < CLEAN_P99_US;
    let step_secs = opts.step.as_secs_f64();
    let mut notes = Vec::new();
    if closed > 0 {
        notes.push(format!("{closed} member connections closed by the server"));
    }
    if max_lag > LAG_NOTED {
        notes.push(format!(
            "the publishers fell up to {:.0} ms behind schedule (the load generator was short of CPU)",
            max_lag.as_secs_f64() * 1e3
        ));
    }
    Ok(SteadyStep {
        system: sys.protocol.label(),
        rate,
        messages,
        published_per_sec: (messages as f64 / step_secs).round(),
        expected_per_sec: (messages as f64 * (opts.members + 1) as f64 / step_secs).round(),
        delivered_per_sec: (delivered as f64 / secs).round(),
        accounting,
        latency,
        server_cpu: pct(server),
        cpu_us_per_delivery: (delivered > 0)
            .then(|| (server.as_secs_f64() * 1e6 / delivered as f64 * 100.0).round() / 100.0),
        redis_cpu: pct(used[0]),
        loadgen_cpu: pct(loadgen),
        publisher_lag_ms: (max_lag.as_secs_f64() * 1e4).round() / 10.0,
        closed,
        clean,
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    })
}

fn accounting(t: &TallySummary, drain: Duration) -> Accounting {
    Accounting {
        expected: t.expected,
        received: t.received,
        ratio: if t.expected == 0 { 0.0 } else { (t.received as f64 / t.expected as f64 * 1e6).round() / 1e6 },
        short_messages: t.short_messages,
        short_exact: !t.short_truncated,
        duplicates: t.duplicates,
        repeats: t.repeats,
        drain_ms: drain.as_millis() as u64,
    }
}
