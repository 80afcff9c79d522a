//! `tether bench rehome`: what `--failover rehome` costs the balancer in steady state, and how
//! long a rehome takes when a node dies or is drained.
//!
//! One private `redis-server`, 2–3 nodes, and two balancers in front of the same nodes: one
//! started with `--failover reconnect`, one with `--failover rehome`.
//!
//! * (a) [`cost`]: at fixed delivery rates, the balancer's CPU per proxied frame (both
//!   directions) and the latency of room messages, for both modes in alternating rounds; the
//!   ratio rehome ÷ reconnect per rate (target ≤ 1.3).
//! * (b) [`switch`]: in rehome mode only, K clients on node-1 while publishers on another node
//!   send to their rooms; node-1 is SIGKILLed (then restarted) or drained (then undrained),
//!   round after round; per client, the time from the kill to its `rehomed` frame and to its
//!   first room message after it, p50/p99/max over clients and rounds, and what was lost or
//!   duplicated.
//!
//! Progress goes to stderr, the table to stdout, the figures to `--json FILE`. Every wait has
//! a deadline; the run's length is bounded by its options.

pub mod client;
pub mod cost;
pub mod switch;

use super::args::RehomeArgs;
use super::procfs;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tether_kit::{eventually, BalancerProcess, Cluster, ClusterLogs, ClusterOptions, SpawnOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The two balancers, in the order the first round measures them.
pub const MODES: [&str; 2] = ["reconnect", "rehome"];
/// The target of the CPU ratio rehome ÷ reconnect.
pub const TARGET_RATIO: f64 = 1.3;

/// What `tether bench rehome` runs.
#[derive(Debug, Clone)]
pub struct RehomeOptions {
    pub nodes: usize,
    /// (a): rooms, members per room, deliveries per second per step, rounds, ramp and window.
    pub rooms: usize,
    pub members: usize,
    pub rates: Vec<f64>,
    pub rounds: u32,
    pub ramp: Duration,
    pub step: Duration,
    /// (b): clients on the victim, their rooms, messages per second to those rooms, rounds.
    pub clients: usize,
    pub switch_rooms: usize,
    pub switch_rate: f64,
    pub kills: u32,
    pub drains: u32,
    /// The rehome balancer's `rehome_timeout_ms` (it runs with its default, 10 s): how long a
    /// switch round waits, plus a margin.
    pub rehome_timeout: Duration,
    pub logs: Option<PathBuf>,
}

impl RehomeOptions {
    /// The smoke run: 2 nodes, 2 rooms × 5 at 1,000 deliveries/s, one 2-second step per mode
    /// (enough balancer CPU for `/proc`'s 10 ms ticks), 2 kills and 1 drain of 10 clients.
    pub fn quick() -> Self {
        Self {
            nodes: 2,
            rooms: 2,
            members: 5,
            rates: vec![1_000.0],
            rounds: 1,
            ramp: Duration::from_millis(500),
            step: Duration::from_secs(2),
            clients: 10,
            switch_rooms: 2,
            switch_rate: 40.0,
            kills: 2,
            drains: 1,
            rehome_timeout: Duration::from_secs(10),
            logs: None,
        }
    }

    fn from_args(a: &RehomeArgs) -> Self {
        let base = if a.quick { Self::quick() } else { Self::default_run() };
        Self {
            nodes: a.nodes.unwrap_or(base.nodes),
            rooms: a.rooms.unwrap_or(base.rooms),
            members: a.members.unwrap_or(base.members),
            rates: a.rates.clone().filter(|r| !r.is_empty()).unwrap_or(base.rates),
            rounds: a.rounds.unwrap_or(base.rounds),
            step: a.step_secs.map_or(base.step, Duration::from_secs_f64),
            clients: a.clients.unwrap_or(base.clients),
            switch_rate: a.switch_rate.unwrap_or(base.switch_rate),
            kills: a.kills.unwrap_or(base.kills),
            drains: a.drains.unwrap_or(base.drains),
            logs: a.logs.clone(),
            ..base
        }
    }

    /// The full run's defaults: 3 nodes; 4 rooms × 25 at 2,000 and 5,000 deliveries/s, 3
    /// rounds of 5 s; 5 kills and 3 drains of 100 clients in 4 rooms at 100 msg/s.
    pub fn default_run() -> Self {
        Self {
            nodes: 3,
            rooms: 4,
            members: 25,
            rates: vec![2_000.0, 5_000.0],
            rounds: 3,
            ramp: Duration::from_secs(1),
            step: Duration::from_secs(5),
            clients: 100,
            switch_rooms: 4,
            switch_rate: 100.0,
            kills: 5,
            drains: 3,
            ..Self::quick()
        }
    }

    /// Longest a switch round publishes (it stops as soon as the round has its figures).
    pub fn round_limit(&self) -> Duration {
        Duration::from_secs(20) + self.rehome_timeout + Duration::from_secs(10)
    }

    fn check(&self) -> Result<()> {
        if !(2..=3).contains(&self.nodes) {
            bail!("--nodes must be 2 or 3");
        }
        if self.rooms == 0 || self.members == 0 || self.rates.is_empty() || self.rounds == 0 {
            bail!("--rooms, --members, --rates and --rounds must not be empty or zero");
        }
        if self.clients == 0 || self.switch_rooms == 0 || self.switch_rate <= 0.0 {
            bail!("--clients and --switch-rate must not be zero");
        }
        if self.rooms * self.members > 2_000 || self.clients > 2_000 {
            bail!("this bench holds its clients in one process: at most 2,000 per part");
        }
        Ok(())
    }
}

/// The whole run, as written by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct RehomeReport {
    pub bench: &'static str,
    pub nodes: usize,
    pub rooms: usize,
    pub members: usize,
    pub rounds: u32,
    pub ramp_secs: f64,
    pub step_secs: f64,
    pub clients: usize,
    pub switch_rooms: usize,
    pub switch_rate: f64,
    pub cores: usize,
    pub loadavg: Option<[f64; 3]>,
    pub cost_steps: Vec<cost::CostStep>,
    pub cost: Vec<cost::CostSummary>,
    pub ratios: Vec<cost::CostRatio>,
    /// Clients of (a) whose connection ended during the run, per mode.
    pub cost_closed: Vec<(&'static str, usize)>,
    pub switch_rounds: Vec<switch::SwitchRound>,
    pub switch: Vec<switch::SwitchSummary>,
}

impl RehomeReport {
    /// The markdown tables.
    pub fn table(&self) -> String {
        let mut s = format!(
            "rehome bench: {} nodes; (a) {} rooms × {} clients per balancer, {} round(s) of {:.1} s per mode and rate; \
             (b) {} clients on node-1 in {} rooms, {:.0} msg/s published to them; {} cores\n\n",
            self.nodes,
            self.rooms,
            self.members,
            self.rounds,
            self.step_secs,
            self.clients,
            self.switch_rooms,
            self.switch_rate,
            self.cores
        );
        s.push_str(
            "(a) balancer CPU per proxied frame (client → node sends + node → client frames)\n\n\
             | deliveries/s | mode | frames/s | balancer CPU ms | µs/frame | p50 ms | p99 ms |\n|--:|:--|--:|--:|--:|--:|--:|\n",
        );
        for c in &self.cost {
            s.push_str(&format!(
                "| {:.0} | {} | {:.0} | {:.0} | {} | {:.2} | {:.2} |\n",
                c.rate,
                c.mode,
                c.frames_per_sec,
                c.cpu_ms,
                c.cpu_us_per_frame.map_or("–".to_owned(), |x| format!("{x:.2}")),
                c.latency.p50_us as f64 / 1e3,
                c.latency.p99_us as f64 / 1e3,
            ));
        }
        s.push_str("\n| deliveries/s | CPU/frame rehome ÷ reconnect | target | p99 reconnect ms | p99 rehome ms |\n|--:|--:|--:|--:|--:|\n");
        for r in &self.ratios {
            s.push_str(&format!(
                "| {:.0} | {} | ≤ {TARGET_RATIO} | {:.2} | {:.2} |\n",
                r.rate,
                r.cpu_ratio.map_or("–".to_owned(), |x| format!("{x:.3}")),
                r.p99_reconnect_ms,
                r.p99_rehome_ms
            ));
        }
        let closed: Vec<String> =
            self.cost_closed.iter().filter(|c| c.1 > 0).map(|(m, n)| format!("{m}: {n}")).collect();
        if !closed.is_empty() {
            s.push_str(&format!("\n(a) clients closed during the run: {}\n", closed.join(", ")));
        }
        s.push_str(
            "\n(b) rehome switch time, from the kill (or drain) of node-1, per client\n\n\
             | event | rounds | clients | rehomed | closed | → rehomed p50 / p99 / max ms | → first message p50 / p99 / max ms | \
             first was a replay | lost | duplicated | second `connected` |\n|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for w in &self.switch {
            let d = |d: &switch::Dist| {
                if d.samples == 0 {
                    "–".to_owned()
                } else {
                    format!("{:.1} / {:.1} / {:.1}", d.p50_ms, d.p99_ms, d.max_ms)
                }
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                w.how.label(),
                w.rounds,
                w.clients,
                w.rehomed,
                w.closed,
                d(&w.to_rehomed),
                d(&w.to_first_message),
                w.first_was_replay,
                w.lost,
                w.duplicates,
                w.connected_again,
            ));
        }
        for w in self.switch.iter().filter(|w| !w.close_codes.is_empty()) {
            s.push_str(&format!(
                "\n{}: closed instead of rehomed, by close code: {}",
                w.how.label(),
                switch::codes(&w.close_codes)
            ));
        }
        s.push_str(&format!(
            "\nbalancer CPU is read from /proc/PID/stat in ticks of {} ms\n",
            1000 / procfs::clock_ticks_per_sec().max(1)
        ));
        s
    }
}

/// `tether bench rehome`: progress on stderr, the table on stdout.
pub async fn run_cli(args: RehomeArgs) -> Result<i32> {
    let opts = RehomeOptions::from_args(&args);
    if let Err(e) = opts.check() {
        eprintln!("tether bench rehome: {e}");
        return Ok(crate::EXIT_USAGE.into());
    }
    let mut progress = std::io::stderr();
    let report = run(&opts, &mut progress).await?;
    super::print_report(&report.table(), &report, args.json.as_deref())?;
    Ok(0)
}

/// Runs the benchmark, printing progress to `out`.
pub async fn run<W: Write>(opts: &RehomeOptions, out: &mut W) -> Result<RehomeReport> {
    opts.check()?;
    let logs = opts.logs.clone().map_or(ClusterLogs::Null, ClusterLogs::Dir);
    writeln!(
        out,
        "starting redis-server, {} nodes and the reconnect balancer; {}",
        opts.nodes,
        procfs::loadavg_line()
    )?;
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: opts.nodes,
        balancer_args: vec!["--failover".to_owned(), "reconnect".to_owned()],
        logs: logs.clone(),
        ..ClusterOptions::default()
    })
    .await?;
    writeln!(out, "starting the rehome balancer")?;
    let spawn = SpawnOptions { stderr: logs.target("balancer-rehome"), ..SpawnOptions::default() };
    let rehome_args = vec!["--failover".to_owned(), "rehome".to_owned()];
    let started = BalancerProcess::start_with(cluster.balancer().nodes(), &rehome_args, &spawn).await;
    let result = match started {
        Ok(rehome) => {
            let r = measure(opts, &mut cluster, &rehome, out).await;
            drop(rehome);
            r
        }
        Err(e) => Err(e.context("starting the rehome balancer")),
    };
    cluster.kill_all().await?;
    result
}

async fn measure<W: Write>(
    opts: &RehomeOptions,
    cluster: &mut Cluster,
    rehome: &BalancerProcess,
    out: &mut W,
) -> Result<RehomeReport> {
    let balancers = [
        (cluster.balancer().addr(), cluster.balancer().admin_addr(), cluster.balancer().pid()),
        (rehome.addr(), rehome.admin_addr(), rehome.pid()),
    ];
    for (_, admin, _) in balancers {
        wait_ready(admin, opts.nodes).await?;
    }
    let tag = format!("{}", super::unix_micros() % 1_000_000_000);
    let loadavg = procfs::loadavg();
    writeln!(out, "(a) cost: connecting {} × {} clients per balancer", opts.rooms, opts.members)?;
    let mut loads = Vec::new();
    for (mode, (addr, _, pid)) in MODES.into_iter().zip(balancers) {
        loads.push(cost::ModeLoad::connect(mode, addr, pid, opts, &tag, out).await?);
    }
    let cost_steps = cost::measure(opts, &loads, out).await?;
    let cost_closed = loads.iter().map(|l| (l.mode, l.closed())).collect();
    for l in loads {
        l.close().await;
    }
    let summary = cost::summarise(&cost_steps, opts);
    let ratios = cost::ratios(&summary, opts);
    writeln!(
        out,
        "(b) switch: {} kill and {} drain rounds of {} clients on node-1",
        opts.kills, opts.drains, opts.clients
    )?;
    let switch_rounds = switch::measure(opts, cluster, rehome, &tag, out).await?;
    let switch = [switch::How::Kill, switch::How::Drain]
        .into_iter()
        .filter_map(|h| switch::summarise(&switch_rounds, h))
        .collect();
    Ok(RehomeReport {
        bench: "rehome",
        nodes: opts.nodes,
        rooms: opts.rooms,
        members: opts.members,
        rounds: opts.rounds,
        ramp_secs: opts.ramp.as_secs_f64(),
        step_secs: opts.step.as_secs_f64(),
        clients: opts.clients,
        switch_rooms: opts.switch_rooms,
        switch_rate: opts.switch_rate,
        cores: procfs::cores(),
        loadavg,
        cost_steps,
        cost: summary,
        ratios,
        cost_closed,
        switch_rounds,
        switch,
    })
}

async fn wait_ready(admin: SocketAddr, nodes: usize) -> Result<()> {
    eventually(Duration::from_secs(15), "every node ready at the balancer", || async {
        super::metric_sum(&super::http_get(admin, "/metrics").await.unwrap_or_default(), "tether_balancer_node_ready")
            as usize
            == nodes
    })
    .await
    .with_context(|| format!("the balancer at {admin} did not see every node ready"))
}

/// `POST path` over HTTP/1.0 to `addr` (the admin's drain and undrain); the body, if 200.
pub async fn http_post(addr: SocketAddr, path: &str) -> Result<String> {
    let post = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), post)
        .await
        .map_err(|_| anyhow!("POST http://{addr}{path}: no answer within 5 s"))?
        .with_context(|| format!("POST http://{addr}{path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("POST http://{addr}{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}
