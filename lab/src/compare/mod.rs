//! `tether compare`: the seed lesson's "Scaling approaches compared" table, measured.
//!
//! Each mode runs on its own freshly started cluster ([`crate::cluster`]), in this order:
//! - `single`: one node, no backbone — the baseline;
//! - `sticky`: three nodes, no backbone — sticky sessions alone, a room reaches only the
//!   members on the sender's node;
//! - `routed`: three nodes, no backbone, the balancer placing by room (`hash_keys =
//!   ["query:room"]`, clients on `/ws?room=R`) — every member of a room on one node;
//! - `redis`: three nodes on the Redis backbone;
//! - `nats`: three nodes on the NATS backbone.
//!
//! Every mode gets the same workload ([`phases`]): reconnecting clients through the balancer,
//! a warm-up, a fixed-rate phase (delivery ratio and latency), a step-up of rates (the highest
//! one sustained), and a node killed with SIGKILL under load (reconnects, restored sessions,
//! lost and duplicated messages). [`workload`] drives the clients, [`account`] does the
//! arithmetic, [`report`] writes `compare.json` and `compare.md`, [`charts`] the SVGs.
//! A mode that fails — a backbone that cannot start, say — becomes a row with its error; the
//! other modes still run. `docs/COMPARISON.md` explains every figure.

pub mod account;
mod args;
pub mod charts;
mod phases;
pub mod report;
pub mod workload;

pub use args::CompareArgs;

use crate::bench::procfs;
use anyhow::{bail, Context, Result};
use report::{AddedLatency, CompareReport, Machine, ModeReport, RunParams};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tether_kit::{ClusterLogs, ClusterOptions};
use tokio::time::{timeout, Instant};

/// Clients of a full run, and of `--quick`.
pub const DEFAULT_CLIENTS: usize = 90;
pub const QUICK_CLIENTS: usize = 30;
/// Rooms of a full run, and of `--quick`.
pub const DEFAULT_ROOMS: usize = 6;
pub const QUICK_ROOMS: usize = 3;
/// Rate of the fixed phase and of the node loss, messages per second over all publishers.
pub const DEFAULT_RATE: f64 = 200.0;
/// Length of the fixed phase.
pub const DEFAULT_FIXED: Duration = Duration::from_secs(8);
pub const QUICK_FIXED: Duration = Duration::from_secs(2);
/// Unmeasured traffic before the fixed phase (connections, allocators, Redis warm up).
pub const DEFAULT_WARMUP: Duration = Duration::from_millis(500);
pub const QUICK_WARMUP: Duration = Duration::from_millis(300);
/// Rates of the step-up.
pub const DEFAULT_STEPS: [f64; 7] = [250.0, 500.0, 1_000.0, 2_000.0, 4_000.0, 8_000.0, 16_000.0];
pub const QUICK_STEPS: [f64; 5] = [250.0, 500.0, 1_000.0, 2_000.0, 4_000.0];
/// Length of each step.
pub const DEFAULT_STEP: Duration = Duration::from_millis(1500);
pub const QUICK_STEP: Duration = Duration::from_millis(500);
/// A step whose p99 exceeds this is not sustained.
pub const DEFAULT_P99_BOUND_MS: f64 = 50.0;
/// The whole step-up stops starting new steps after this long.
pub const DEFAULT_STEP_BUDGET: Duration = Duration::from_secs(45);
pub const QUICK_STEP_BUDGET: Duration = Duration::from_secs(8);
/// A killed single node is restarted after this long (its clients have nowhere else to go).
pub const SINGLE_RESTART_DELAY: Duration = Duration::from_secs(1);
/// Longest wait for the killed node's clients to be back in sync.
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const QUICK_RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for every client to connect and join.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(20);
/// The balancer's health-check period in every mode: a restarted node is taken back within it.
pub const HEALTH_INTERVAL_MS: u64 = 200;
/// The run order and the default `--modes`.
pub const ALL_MODES: [Mode; 6] = [Mode::Single, Mode::Sticky, Mode::Routed, Mode::Redis, Mode::Nats, Mode::NatsCluster];
/// The balancer's config in `routed` mode: place by the `room` query parameter.
pub const ROUTED_BALANCER_TOML: &str = "hash_keys = [\"query:room\"]\n";
/// Servers of the `nats-cluster` mode's NATS cluster (each stream replicated on all three).
pub const NATS_CLUSTER_SERVERS: usize = 3;

/// One scaling approach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Mode {
    /// One node, no backbone: the baseline.
    Single,
    /// Three nodes, no backbone: sticky sessions alone.
    Sticky,
    /// Three nodes, no backbone, the balancer pinning by room: a room's members share a node.
    Routed,
    /// Three nodes on the Redis backbone.
    Redis,
    /// Three nodes on the NATS backbone.
    Nats,
    /// Three nodes on a 3-server NATS cluster, every stream with three replicas.
    NatsCluster,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Sticky => "sticky",
            Self::Routed => "routed",
            Self::Redis => "redis",
            Self::Nats => "nats",
            Self::NatsCluster => "nats-cluster",
        }
    }

    /// The row name in the seed lesson's table.
    pub fn approach(self) -> &'static str {
        match self {
            Self::Single => "Single server",
            Self::Sticky => "Sticky sessions",
            Self::Routed => "Shared-nothing + routing",
            Self::Redis => "Redis Pub/Sub",
            Self::Nats => "NATS",
            Self::NatsCluster => "NATS cluster (R3)",
        }
    }

    /// What the approach needs behind the balancer (the balancer fronts every mode).
    pub fn processes(self) -> &'static str {
        match self {
            Self::Single => "1 node",
            Self::Sticky | Self::Routed => "3 nodes",
            Self::Redis => "3 nodes + Redis",
            Self::Nats => "3 nodes + NATS",
            Self::NatsCluster => "3 nodes + 3 NATS",
        }
    }

    pub fn nodes(self) -> usize {
        match self {
            Self::Single => 1,
            _ => 3,
        }
    }

    /// Whether a message is owed to every member of its room. Without a backbone it reaches
    /// only the sender's node: sticky sessions owe it to the members there. A single node has
    /// everyone; `routed` places every member of a room on one node, so it owes every member
    /// too — a member placed elsewhere would count as a loss, not be excused.
    pub fn cross_node(self) -> bool {
        !matches!(self, Self::Sticky)
    }

    /// Whether clients connect with `?room=R` (the balancer places them by it).
    pub fn by_room(self) -> bool {
        self == Self::Routed
    }

    /// The balancer's config file, when the mode needs one (written before the cluster starts).
    pub fn balancer_toml(self) -> Option<&'static str> {
        self.by_room().then_some(ROUTED_BALANCER_TOML)
    }

    /// The mode's cluster; `balancer_config` is the file holding [`Mode::balancer_toml`];
    /// `nats_cluster` is the URL list of the NATS cluster the `nats-cluster` mode's nodes use
    /// (started by the caller, see `phases::run_mode`).
    fn cluster_options(
        self,
        logs: ClusterLogs,
        balancer_config: Option<&Path>,
        nats_cluster: Option<String>,
    ) -> ClusterOptions {
        let no_backbone = vec!["--backbone".to_owned(), "none".to_owned()];
        let mut balancer_args = vec!["--health-interval-ms".into(), HEALTH_INTERVAL_MS.to_string()];
        if let Some(file) = balancer_config {
            balancer_args.extend(["--config".to_owned(), file.display().to_string()]);
        }
        let node_args = match (self, nats_cluster) {
            (Self::Single | Self::Sticky | Self::Routed, _) => no_backbone,
            (Self::NatsCluster, Some(url)) => ["--backbone", "nats", "--nats", &url].map(String::from).into(),
            _ => Vec::new(),
        };
        ClusterOptions {
            nodes: self.nodes(),
            // The nodes of a NATS cluster mode use no Redis: none is started.
            redis: (self == Self::NatsCluster).then(|| "redis://127.0.0.1:1/".to_owned()),
            node_args,
            nats: self == Self::Nats,
            balancer_args,
            logs,
            ..ClusterOptions::default()
        }
    }
}

/// What a comparison runs.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub modes: Vec<Mode>,
    pub clients: usize,
    pub rooms: usize,
    /// Fixed phase and node loss, msg/s.
    pub rate: f64,
    pub warmup: Duration,
    pub fixed: Duration,
    pub steps: Vec<f64>,
    pub step: Duration,
    pub step_budget: Duration,
    pub p99_bound_ms: f64,
    pub reconnect_timeout: Duration,
    pub out: PathBuf,
    /// Per-mode process logs go under `DIR/MODE/`; default `OUT/logs`.
    pub logs: Option<PathBuf>,
    pub seed: u64,
    pub quick: bool,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl CompareOptions {
    /// The defaults of a full run (`quick` false) or of `--quick`.
    pub fn defaults(quick: bool) -> Self {
        Self {
            modes: ALL_MODES.to_vec(),
            clients: if quick { QUICK_CLIENTS } else { DEFAULT_CLIENTS },
            rooms: if quick { QUICK_ROOMS } else { DEFAULT_ROOMS },
            rate: DEFAULT_RATE,
            warmup: if quick { QUICK_WARMUP } else { DEFAULT_WARMUP },
            fixed: if quick { QUICK_FIXED } else { DEFAULT_FIXED },
            steps: if quick { QUICK_STEPS.to_vec() } else { DEFAULT_STEPS.to_vec() },
            step: if quick { QUICK_STEP } else { DEFAULT_STEP },
            step_budget: if quick { QUICK_STEP_BUDGET } else { DEFAULT_STEP_BUDGET },
            p99_bound_ms: DEFAULT_P99_BOUND_MS,
            reconnect_timeout: if quick { QUICK_RECONNECT_TIMEOUT } else { DEFAULT_RECONNECT_TIMEOUT },
            out: PathBuf::from("./compare-out"),
            logs: None,
            seed: 1,
            quick,
            progress: true,
        }
    }

    /// Rejects values no run can use; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        if self.modes.is_empty() {
            bail!("--modes: name at least one of single, sticky, routed, redis, nats");
        }
        if self.clients == 0 {
            bail!("--clients must be at least 1");
        }
        if self.rooms == 0 || self.rooms > self.clients {
            bail!("--rooms must be between 1 and --clients ({}), not {}", self.clients, self.rooms);
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            bail!("--rate must be a positive number of messages per second, not {}", self.rate);
        }
        if self.fixed.is_zero() {
            bail!("--secs must be positive");
        }
        if self.step.is_zero() {
            bail!("--step-secs must be positive");
        }
        if let Some(bad) = self.steps.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
            bail!("--steps: {bad} is not a positive rate");
        }
        if !(self.p99_bound_ms.is_finite() && self.p99_bound_ms > 0.0) {
            bail!("--p99-bound-ms must be positive, not {}", self.p99_bound_ms);
        }
        Ok(())
    }

    /// Where the processes of each mode log (`DIR/MODE/node-1.log`, …), as an absolute path:
    /// `redis-server` changes into its data directory before it opens its log file.
    pub fn log_dir(&self) -> PathBuf {
        let dir = self.logs.clone().unwrap_or_else(|| self.out.join("logs"));
        std::path::absolute(&dir).unwrap_or(dir)
    }

    /// The longest one mode may take before it is abandoned: every phase at its bound, plus
    /// start-up, joins and teardown.
    fn mode_budget(&self) -> Duration {
        Duration::from_secs(60)
            + JOIN_TIMEOUT
            + self.warmup
            + self.fixed * 2
            + self.step_budget * 2
            + self.reconnect_timeout * 2
            + SINGLE_RESTART_DELAY
    }
}

impl From<CompareArgs> for CompareOptions {
    fn from(a: CompareArgs) -> Self {
        let d = Self::defaults(a.quick);
        let mut modes = Vec::new();
        // Always the canonical order, each once, whatever order the flag gave.
        for m in ALL_MODES {
            if a.modes.contains(&m) {
                modes.push(m);
            }
        }
        Self {
            modes,
            clients: a.clients.unwrap_or(d.clients),
            rooms: a.rooms.unwrap_or(d.rooms),
            rate: a.rate.unwrap_or(d.rate),
            fixed: a.secs.map_or(d.fixed, Duration::from_secs_f64),
            steps: a.steps.unwrap_or(d.steps),
            step: a.step_secs.map_or(d.step, Duration::from_secs_f64),
            p99_bound_ms: a.p99_bound_ms,
            out: a.out,
            logs: a.logs,
            seed: a.seed.unwrap_or_else(|| crate::bench::unix_micros() ^ u64::from(std::process::id())),
            ..d
        }
    }
}

/// Prints `[mode  12.3s] …` progress lines on stderr.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    label: String,
    start: Instant,
    enabled: bool,
}

impl Progress {
    fn new(label: &str, enabled: bool) -> Self {
        Self { label: label.to_owned(), start: Instant::now(), enabled }
    }

    pub(crate) fn say(&self, line: impl AsRef<str>) {
        if self.enabled {
            eprintln!("[{:<6} {:5.1}s] {}", self.label, self.start.elapsed().as_secs_f64(), line.as_ref());
        }
    }
}

/// `tether compare` on the command line: runs, writes `--out`, prints the table. Exit code 0
/// when every mode ran, 1 when one failed (the outputs are written either way),
/// [`crate::EXIT_USAGE`] (64) for a bad flag.
pub async fn run_cli(args: CompareArgs) -> Result<i32> {
    let opts = CompareOptions::from(args);
    if let Err(e) = opts.validate() {
        eprintln!("tether compare: {e}");
        return Ok(crate::EXIT_USAGE.into());
    }
    let report = run(&opts).await?;
    let written = write_outputs(&report, &opts.out)?;
    println!("{}", report.table());
    for m in report.modes.iter().filter(|m| m.error.is_some()) {
        println!("{} failed: {}", m.mode, m.error.as_deref().unwrap_or_default());
    }
    println!("written: {}", written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    Ok(if report.modes.iter().any(|m| m.error.is_some()) { 1 } else { 0 })
}

/// Runs every mode of `opts` in turn and returns the figures. A mode's failure is recorded in
/// its row; only a failure to set anything up at all is an error.
pub async fn run(opts: &CompareOptions) -> Result<CompareReport> {
    opts.validate()?;
    let started = Instant::now();
    let machine = machine();
    let top = Progress::new("compare", opts.progress);
    top.say(format!(
        "modes {}; {} clients in {} rooms; fixed {} msg/s for {:.1} s; steps {} msg/s × {:.1} s; p99 bound {} ms; \
         seed {}; output {}",
        opts.modes.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
        opts.clients,
        opts.rooms,
        opts.rate,
        opts.fixed.as_secs_f64(),
        opts.steps.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join("/"),
        opts.step.as_secs_f64(),
        opts.p99_bound_ms,
        opts.seed,
        opts.out.display()
    ));
    let mut modes = Vec::with_capacity(opts.modes.len());
    for (k, &mode) in opts.modes.iter().enumerate() {
        let progress = Progress::new(mode.name(), opts.progress);
        let mut row = ModeReport {
            mode: mode.name().into(),
            approach: mode.approach().into(),
            processes: mode.processes().into(),
            nodes: mode.nodes(),
            ..ModeReport::default()
        };
        let logs = ClusterLogs::Dir(opts.log_dir().join(mode.name()));
        let seed = opts.seed.wrapping_add(k as u64);
        let budget = opts.mode_budget();
        let t0 = Instant::now();
        match timeout(budget, phases::run_mode(mode, opts, logs, seed, &mut row, &progress)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => row.error = Some(format!("{e:#}")),
            Err(_) => row.error = Some(format!("did not finish within {:.0} s; abandoned", budget.as_secs_f64())),
        }
        row.elapsed_s = round2(t0.elapsed().as_secs_f64());
        match &row.error {
            Some(e) => progress.say(format!("FAILED: {e}")),
            None => progress.say(format!("done in {:.1} s", row.elapsed_s)),
        }
        modes.push(row);
    }
    let single = modes.iter().find(|m| m.mode == "single").and_then(|m| m.latency_us);
    for m in modes.iter_mut().filter(|m| m.mode != "single") {
        if let (Some(own), Some(base)) = (m.latency_us.as_ref(), single.as_ref()) {
            m.added_latency_us = Some(AddedLatency::between(own, base));
        }
    }
    let report = CompareReport {
        tool: "tether compare",
        machine,
        run: RunParams {
            quick: opts.quick,
            clients: opts.clients,
            rooms: opts.rooms,
            rate: opts.rate,
            warmup_s: opts.warmup.as_secs_f64(),
            fixed_s: opts.fixed.as_secs_f64(),
            steps: opts.steps.clone(),
            step_s: opts.step.as_secs_f64(),
            p99_bound_ms: opts.p99_bound_ms,
            node_loss_rate: opts.rate,
            single_restart_after_s: SINGLE_RESTART_DELAY.as_secs_f64(),
            seed: opts.seed,
        },
        modes,
        elapsed_s: round2(started.elapsed().as_secs_f64()),
    };
    top.say(format!("all modes done in {:.1} s", report.elapsed_s));
    Ok(report)
}

/// Writes `compare.json`, `compare.md`, `latency-cdf.svg` and `max-rate.svg` into `dir`
/// (created) and returns their paths.
pub fn write_outputs(report: &CompareReport, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("compare.json");
    let text = serde_json::to_string_pretty(report).context("encoding compare.json")?;
    std::fs::write(&json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
    let md = dir.join("compare.md");
    std::fs::write(&md, report.markdown()).with_context(|| format!("writing {}", md.display()))?;
    let subtitle = format!(
        "{} clients, {} rooms, {} cores, {} build",
        report.run.clients, report.run.rooms, report.machine.cores, report.machine.build
    );
    let cdf = dir.join("latency-cdf.svg");
    let series: Vec<charts::CdfSeries<'_>> =
        report.modes.iter().map(|m| charts::CdfSeries { mode: &m.mode, points: &m.latency_cdf }).collect();
    charts::latency_cdf(&cdf, &series, report.run.p99_bound_ms, &format!("{} msg/s, {subtitle}", report.run.rate))?;
    let rate = dir.join("max-rate.svg");
    let bars: Vec<charts::RateBar<'_>> =
        report.modes.iter().map(|m| charts::RateBar { mode: &m.mode, rate: m.max_rate }).collect();
    charts::max_rate(&rate, &bars, &format!("p99 ≤ {} ms, {subtitle}", report.run.p99_bound_ms))?;
    Ok(vec![md, json, cdf, rate])
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// What the report says about the machine.
fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|text| {
        text.lines().find_map(|l| {
            l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned())
        })
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Machine {
        cores: procfs::cores(),
        cpu,
        kernel,
        loadavg: procfs::loadavg(),
        build: if cfg!(debug_assertions) { "debug" } else { "release" },
        started: utc(now),
    }
}

/// `YYYY-MM-DD HH:MM UTC` of a Unix time.
fn utc(unix_secs: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_secs);
    // `YYYY-MM-DDTHH:MM:SSZ`: the date, and the time to the minute.
    let stamp = humantime::format_rfc3339_seconds(at).to_string();
    format!("{} {} UTC", &stamp[..10], &stamp[11..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    /// `tether compare …` as the CLI composes it.
    #[derive(Debug, Parser)]
    #[command(name = "tether")]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, Subcommand)]
    enum Command {
        Compare(CompareArgs),
    }

    fn parse(argv: &[&str]) -> CompareOptions {
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Compare(a)) => CompareOptions::from(a),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn quick_sets_smaller_defaults_and_flags_override_them() {
        let full = parse(&["tether", "compare"]);
        assert_eq!((full.clients, full.rooms, full.fixed), (DEFAULT_CLIENTS, DEFAULT_ROOMS, DEFAULT_FIXED));
        assert_eq!(full.modes, ALL_MODES);
        assert_eq!(full.out, PathBuf::from("./compare-out"));
        let quick = parse(&["tether", "compare", "--quick", "--out", "x"]);
        assert_eq!((quick.clients, quick.rooms, quick.step), (QUICK_CLIENTS, QUICK_ROOMS, QUICK_STEP));
        assert_eq!(quick.steps, QUICK_STEPS);
        let mixed = parse(&[
            "tether",
            "compare",
            "--quick",
            "--clients",
            "12",
            "--modes",
            "redis,single",
            "--steps",
            "100,200",
            "--p99-bound-ms",
            "20",
            "--seed",
            "4",
        ]);
        assert_eq!(mixed.clients, 12);
        assert_eq!(mixed.rooms, QUICK_ROOMS);
        assert_eq!(mixed.modes, [Mode::Single, Mode::Redis], "canonical order");
        assert_eq!(mixed.steps, [100.0, 200.0]);
        assert_eq!((mixed.p99_bound_ms, mixed.seed), (20.0, 4));
        assert!(Cli::try_parse_from(["tether", "compare", "--modes", "kafka"]).is_err());
    }

    #[test]
    fn bad_options_name_the_flag() {
        let ok = CompareOptions::defaults(true);
        assert!(ok.validate().is_ok());
        let e = CompareOptions { rooms: 31, ..ok.clone() }.validate().unwrap_err().to_string();
        assert!(e.contains("--rooms"), "{e}");
        let e = CompareOptions { steps: vec![100.0, -1.0], ..ok.clone() }.validate().unwrap_err().to_string();
        assert!(e.contains("--steps"), "{e}");
        let e = CompareOptions { modes: vec![], ..ok.clone() }.validate().unwrap_err().to_string();
        assert!(e.contains("--modes"), "{e}");
        let e = CompareOptions { p99_bound_ms: 0.0, ..ok }.validate().unwrap_err().to_string();
        assert!(e.contains("--p99-bound-ms"), "{e}");
    }

    #[test]
    fn log_directories_are_absolute_even_for_a_relative_out() {
        let o = CompareOptions { out: PathBuf::from("./rel-out"), ..CompareOptions::defaults(true) };
        let dir = o.log_dir();
        assert!(dir.is_absolute() && dir.ends_with("rel-out/logs"), "{}", dir.display());
        let o = CompareOptions { logs: Some(PathBuf::from("l")), ..o };
        assert!(o.log_dir().is_absolute() && o.log_dir().ends_with("l"));
    }

    #[test]
    fn modes_map_to_their_clusters() {
        let o = Mode::Sticky.cluster_options(ClusterLogs::Null, None, None);
        assert_eq!((o.nodes, o.nats), (3, false));
        assert_eq!(o.node_args, ["--backbone", "none"]);
        let o = Mode::Single.cluster_options(ClusterLogs::Null, None, None);
        assert_eq!((o.nodes, o.node_args.len()), (1, 2));
        let o = Mode::Redis.cluster_options(ClusterLogs::Null, None, None);
        assert!(o.node_args.is_empty() && !o.nats);
        assert!(Mode::Nats.cluster_options(ClusterLogs::Null, None, None).nats);
        let o = Mode::NatsCluster.cluster_options(ClusterLogs::Null, None, Some("nats://a:1,nats://b:2".into()));
        assert_eq!(o.node_args, ["--backbone", "nats", "--nats", "nats://a:1,nats://b:2"]);
        assert!(!o.nats && o.redis.is_some(), "neither a private nats-server nor a Redis");
        assert_eq!(Mode::NatsCluster.name(), "nats-cluster");
        assert!(!Mode::Sticky.cross_node() && Mode::Single.cross_node() && Mode::Redis.cross_node());
        let o = Mode::Routed.cluster_options(ClusterLogs::Null, Some(Path::new("/tmp/b.toml")), None);
        assert_eq!((o.nodes, o.nats), (3, false));
        assert_eq!(o.node_args, ["--backbone", "none"]);
        assert!(o.balancer_args.ends_with(&["--config".to_owned(), "/tmp/b.toml".to_owned()]), "{o:?}");
        assert!(Mode::Routed.cross_node() && Mode::Routed.by_room() && !Mode::Sticky.by_room());
        assert!(Mode::Routed.balancer_toml().is_some_and(|t| t.contains("query:room")));
        assert!(ALL_MODES.iter().filter(|m| m.balancer_toml().is_some()).eq([&Mode::Routed]));
    }

    #[test]
    fn unix_times_render_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc(1_767_323_045), "2026-01-02 03:04 UTC");
        assert_eq!(utc(1_735_689_599), "2024-12-31 23:59 UTC");
    }
}
