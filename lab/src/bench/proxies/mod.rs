//! `tether bench proxies`: `tether-balancer` against HAProxy and nginx, with a direct
//! connection to the backend as the floor, on the same WebSocket echo workloads.
//!
//! Two echo backends ([`super::echo`]) stand behind every proxy; each proxy hashes the
//! `client` query parameter onto them (HAProxy `balance url_param client` + `hash-type
//! consistent`, nginx `hash $arg_client consistent`, the balancer its rendezvous hash), with
//! one thread each: HAProxy `nbthread 1`, nginx `worker_processes 1`, the balancer with
//! `--threads 1` (or, for a balancer without that flag, `TOKIO_WORKER_THREADS=1`, which its
//! default tokio runtime reads). Access logs are off everywhere and the balancer logs at
//! `warn`, so nobody pays for logging. Workloads:
//!
//! * (d) idle: N idle tunnels opened by load-generator children; the proxy's `VmRSS` growth
//!   per tunnel. Measured *first*, on fresh processes, once per proxy: after any other
//!   workload the allocator would hand back memory it kept and hide the growth;
//! * (a) closed-loop echo: C connections each sending a 64-byte binary message and waiting
//!   for its echo, as fast as they can: echoes per second, and the proxy's CPU time
//!   (`utime + stime`) per echo;
//! * (b) fixed rate: C connections together sending R messages per second at evenly spread
//!   times; latency from each send to its echo (p50/p99/p99.9);
//! * (c) connection setup: K concurrent loops of connect → upgrade → close handshake →
//!   hang-up: complete cycles per second, and the upgrade's latency.
//!
//! (a)–(c) run in rounds; in each round every target runs once, the starting target
//! rotating from round to round, so that drift on a shared machine hits every target alike.
//! Reported figures are medians over rounds, with ratios to HAProxy from the same run.

use super::args::ProxiesArgs;
use super::procfs::{self, CpuMeter};
use super::worker::{Fleet, WorkerSpec};
use super::wsraw::{self, Decoder, OP_BINARY, OP_CLOSE};
use super::{median, new_histogram, source_addrs, split, tether_exe, Latency, MAX_PER_WORKER};
use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_kit::ports::free_port;
use tether_kit::{bin_path, ChildProcess, LogTarget, BALANCER_BIN};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// What `tether bench proxies` runs.
#[derive(Debug, Clone)]
pub struct ProxiesOptions {
    pub targets: Vec<Kind>,
    pub rounds: u32,
    pub secs: f64,
    pub echo_conns: usize,
    pub rate_conns: usize,
    pub rate: f64,
    pub setup_concurrency: usize,
    pub idle: usize,
    pub message_bytes: usize,
    pub install: bool,
    /// Where the proxies' configuration and logs go (a temporary directory otherwise).
    pub logs: Option<PathBuf>,
}

impl ProxiesOptions {
    fn from_args(a: ProxiesArgs) -> Result<Self> {
        let targets = a.targets.iter().map(|t| Kind::parse(t)).collect::<Result<Vec<_>>>()?;
        let mut o = Self {
            targets,
            rounds: a.rounds,
            secs: a.secs,
            echo_conns: a.echo_conns,
            rate_conns: a.rate_conns,
            rate: a.rate,
            setup_concurrency: a.setup_concurrency,
            idle: a.idle,
            message_bytes: a.message_bytes,
            install: !a.no_install,
            logs: a.logs,
        };
        if a.quick {
            o.rounds = 1;
            o.secs = 0.5;
            o.idle = o.idle.min(200);
        }
        Ok(o)
    }
}

/// A target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Direct,
    Balancer,
    Haproxy,
    Nginx,
}

impl Kind {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "direct" => Self::Direct,
            "balancer" | "tether" | "tether-balancer" => Self::Balancer,
            "haproxy" => Self::Haproxy,
            "nginx" => Self::Nginx,
            other => bail!("unknown target {other:?} (direct, balancer, haproxy, nginx)"),
        })
    }

    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Balancer => "tether-balancer",
            Self::Haproxy => "HAProxy",
            Self::Nginx => "nginx",
        }
    }
}

/// One running target.
struct Target {
    kind: Kind,
    addr: SocketAddr,
    /// The process that does the proxying (nginx: its worker); `None` for direct.
    pid: Option<u32>,
    /// Version and thread set-up, for the report.
    setup: String,
    /// Keeps the process alive (killed on drop).
    _proc: Option<ChildProcess>,
}

impl Drop for Target {
    fn drop(&mut self) {
        // nginx's worker is the master's child, not ours: killing the master (our child, killed
        // on drop) would leave the worker running. Kill it first, while it is still provably
        // the master's child (so the pid cannot have been reused by someone else's process).
        if let (Kind::Nginx, Some(worker), Some(master)) = (self.kind, self.pid, self._proc.as_ref()) {
            if children_of(master.pid()).contains(&worker) {
                if let Ok(pid) = i32::try_from(worker) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }
}

/// Per-target figures: each field holds one value per round, and the report its median.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetFigures {
    pub target: String,
    pub setup: String,
    pub echo_per_sec: Vec<f64>,
    pub cpu_us_per_echo: Vec<f64>,
    pub cpu_percent: Vec<f64>,
    pub rate_achieved: Vec<f64>,
    pub p50_us: Vec<f64>,
    pub p99_us: Vec<f64>,
    pub p999_us: Vec<f64>,
    pub setups_per_sec: Vec<f64>,
    pub upgrade_p50_us: Vec<f64>,
    pub upgrade_p99_us: Vec<f64>,
    pub idle_kib_per_tunnel: Vec<f64>,
    pub idle_open: Vec<f64>,
    pub errors: Vec<String>,
}

/// The whole run, as written by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct ProxiesReport {
    pub bench: &'static str,
    pub rounds: u32,
    pub secs: f64,
    pub echo_conns: usize,
    pub rate_conns: usize,
    pub rate: f64,
    pub setup_concurrency: usize,
    pub idle: usize,
    pub message_bytes: usize,
    pub cores: usize,
    pub loadavg_start: Option<[f64; 3]>,
    pub loadavg_end: Option<[f64; 3]>,
    pub skipped: Vec<String>,
    pub targets: Vec<TargetFigures>,
}

/// Reads one figure's per-round values.
type Field = fn(&TargetFigures) -> &Vec<f64>;
/// `(label, field, lower is better, decimals)` for each table row.
type Row = (&'static str, Field, bool, usize);

const ROWS: [Row; 11] = [
    ("(a) echo throughput, msg/s", |t| &t.echo_per_sec, false, 0),
    ("(a) proxy CPU per echo, µs", |t| &t.cpu_us_per_echo, true, 2),
    ("(a) proxy CPU, % of a core", |t| &t.cpu_percent, true, 0),
    ("(b) latency p50, µs", |t| &t.p50_us, true, 0),
    ("(b) latency p99, µs", |t| &t.p99_us, true, 0),
    ("(b) latency p99.9, µs", |t| &t.p999_us, true, 0),
    ("(b) achieved rate, msg/s", |t| &t.rate_achieved, false, 0),
    ("(c) connection cycles (upgrades)/s", |t| &t.setups_per_sec, false, 0),
    ("(c) upgrade latency p50, µs", |t| &t.upgrade_p50_us, true, 0),
    ("(d) RSS growth per idle tunnel, KiB", |t| &t.idle_kib_per_tunnel, true, 2),
    ("(d) idle tunnels open", |t| &t.idle_open, false, 0),
];

impl ProxiesReport {
    /// The markdown table (medians, ratios to HAProxy) and the verdicts against the targets.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{} round(s) of {:.1} s per target and workload; (a) {} connections, {}-byte messages; (b) {} \
             connections, {:.0} msg/s; (c) {} concurrent; (d) {} idle tunnels. {} cores; load average at start \
             {}, at end {}.\n\n",
            self.rounds,
            self.secs,
            self.echo_conns,
            self.message_bytes,
            self.rate_conns,
            self.rate,
            self.setup_concurrency,
            self.idle,
            self.cores,
            fmt_load(self.loadavg_start),
            fmt_load(self.loadavg_end),
        );
        for t in &self.targets {
            s.push_str(&format!("- {}: {}\n", t.target, t.setup));
        }
        for skip in &self.skipped {
            s.push_str(&format!("- skipped: {skip}\n"));
        }
        let haproxy = self.targets.iter().find(|t| t.target == Kind::Haproxy.label());
        let ratio_cols: Vec<&TargetFigures> =
            self.targets.iter().filter(|t| t.target != Kind::Haproxy.label() && t.target != "direct").collect();
        s.push_str("\n| workload (median) |");
        for t in &self.targets {
            s.push_str(&format!(" {} |", t.target));
        }
        for t in &ratio_cols {
            s.push_str(&format!(" {} / HAProxy |", t.target));
        }
        s.push_str("\n|:--|");
        for _ in 0..self.targets.len() + if haproxy.is_some() { ratio_cols.len() } else { 0 } {
            s.push_str("--:|");
        }
        s.push('\n');
        for (name, field, _, decimals) in ROWS {
            s.push_str(&format!("| {name} |"));
            for t in &self.targets {
                s.push_str(&format!(" {} |", fmt_opt(median(field(t)), decimals)));
            }
            if let Some(h) = haproxy {
                for t in &ratio_cols {
                    let r = match (median(field(t)), median(field(h))) {
                        (Some(a), Some(b)) if b > 0.0 => format!("×{:.2}", a / b),
                        _ => "—".to_owned(),
                    };
                    s.push_str(&format!(" {r} |"));
                }
            }
            s.push('\n');
        }
        if let (Some(h), Some(b)) = (haproxy, self.targets.iter().find(|t| t.target == Kind::Balancer.label())) {
            s.push_str("\nTargets (tether-balancer against HAProxy, same run):\n");
            let checks: [(&str, Field, bool); 4] = [
                ("throughput ≥ 1.0× HAProxy", |t| &t.echo_per_sec, false),
                ("p99 ≤ HAProxy", |t| &t.p99_us, true),
                ("CPU per echo ≤ HAProxy", |t| &t.cpu_us_per_echo, true),
                ("idle memory per tunnel ≤ HAProxy", |t| &t.idle_kib_per_tunnel, true),
            ];
            for (what, field, lower) in checks {
                let line = match (median(field(b)), median(field(h))) {
                    (Some(bv), Some(hv)) if hv > 0.0 => {
                        let ok = if lower { bv <= hv } else { bv >= hv };
                        format!(
                            "- {what}: balancer {bv:.2} vs HAProxy {hv:.2} (×{:.2}): {}\n",
                            bv / hv,
                            if ok { "met" } else { "missed" }
                        )
                    }
                    _ => format!("- {what}: not measured\n"),
                };
                s.push_str(&line);
            }
        }
        for t in &self.targets {
            if !t.errors.is_empty() {
                s.push_str(&format!("\n{} errors (first few): {:?}\n", t.target, t.errors));
            }
        }
        s
    }
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("—".to_owned(), |v| format!("{v:.decimals$}"))
}

fn fmt_load(l: Option<[f64; 3]>) -> String {
    l.map_or("unknown".to_owned(), |[a, b, c]| format!("{a:.2} {b:.2} {c:.2}"))
}

/// `tether bench proxies`.
pub async fn run_cli(args: ProxiesArgs) -> Result<i32> {
    let json = args.json.clone();
    let opts = ProxiesOptions::from_args(args)?;
    let mut stdout = std::io::stdout();
    let report = run(&opts, &mut stdout).await?;
    println!();
    super::print_report(&report.table(), &report, json.as_deref())?;
    Ok(0)
}

/// Runs the benchmark, printing progress to `out`.
pub async fn run<W: Write>(opts: &ProxiesOptions, out: &mut W) -> Result<ProxiesReport> {
    let tmp = tempfile::Builder::new().prefix("tether-bench-proxies-").tempdir()?;
    let dir = match &opts.logs {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    let loadavg_start = procfs::loadavg();
    writeln!(out, "{}", procfs::loadavg_line())?;
    let mut skipped = Vec::new();
    let mut kinds = opts.targets.clone();
    for (kind, program) in [(Kind::Haproxy, "haproxy"), (Kind::Nginx, "nginx")] {
        if kinds.contains(&kind) && find_program(program).is_none() {
            if opts.install {
                install(&["haproxy", "nginx"], out).await?;
            }
            if find_program(program).is_none() {
                kinds.retain(|k| *k != kind);
                skipped.push(format!("{program}: not installed (`apt-get install -y {program}`)"));
            }
        }
    }

    let mut backends = Vec::new();
    for k in 1..=2 {
        let mut cmd = Command::new(tether_exe()?);
        cmd.args(["bench", "echo-backend", "--listen", "127.0.0.1:0"]).env("TOKIO_WORKER_THREADS", "1");
        let mut proc = ChildProcess::spawn_piped(&format!("echo-{k}"), cmd)?;
        let ready = proc.await_ready(super::echo::PROGRAM, Duration::from_secs(10), &LogTarget::Inherit).await?;
        let addr = ready.addr("listen")?;
        backends.push((format!("echo-{k}"), addr, proc));
    }
    let backend_addrs: Vec<(String, SocketAddr)> = backends.iter().map(|(n, a, _)| (n.clone(), *a)).collect();
    writeln!(
        out,
        "echo backends: {} (1 runtime thread each)",
        backend_addrs.iter().map(|(n, a)| format!("{n} {a}")).collect::<Vec<_>>().join(", ")
    )?;

    let mut targets = Vec::new();
    for kind in kinds {
        let t = match kind {
            Kind::Direct => Ok(Target {
                kind,
                addr: backend_addrs[0].1,
                pid: None,
                setup: format!("straight to {} (the floor; no proxy)", backend_addrs[0].0),
                _proc: None,
            }),
            Kind::Balancer => start_balancer(&backend_addrs, &dir).await,
            Kind::Haproxy => start_haproxy(&backend_addrs, &dir).await,
            Kind::Nginx => start_nginx(&backend_addrs, &dir).await,
        };
        match t {
            Ok(t) => {
                writeln!(out, "{:<16} {}  {}", t.kind.label(), t.addr, t.setup)?;
                targets.push(t);
            }
            Err(e) => {
                writeln!(out, "{:<16} could not start: {e:#}", kind.label())?;
                skipped.push(format!("{}: {e:#}", kind.label()));
            }
        }
    }
    if targets.is_empty() {
        bail!("no target could be started");
    }
    let mut figs: Vec<TargetFigures> = targets
        .iter()
        .map(|t| TargetFigures { target: t.kind.label().to_owned(), setup: t.setup.clone(), ..Default::default() })
        .collect();
    let secs = Duration::from_secs_f64(opts.secs);

    writeln!(out, "\n(d) {} idle tunnels per target (fresh processes, once each)", opts.idle)?;
    for (k, t) in targets.iter().enumerate() {
        match idle(t, opts.idle, out).await {
            Ok((kib, open)) => {
                writeln!(out, "  {:<16} {open} open, {}", t.kind.label(), fmt_opt(kib, 2) + " KiB per tunnel")?;
                if let Some(kib) = kib {
                    figs[k].idle_kib_per_tunnel.push(kib);
                }
                figs[k].idle_open.push(open as f64);
            }
            Err(e) => note(&mut figs[k], out, "(d)", e)?,
        }
    }

    let n = targets.len();
    for round in 0..opts.rounds {
        writeln!(out, "\nround {}/{}", round + 1, opts.rounds)?;
        for j in 0..n {
            let k = (j + round as usize) % n;
            let t = &targets[k];
            match echo_closed_loop(t, opts, secs).await {
                Ok(e) => {
                    writeln!(
                        out,
                        "  (a) {:<16} {:>8.0} echoes/s  proxy CPU {} µs/echo",
                        t.kind.label(),
                        e.per_sec,
                        fmt_opt(e.cpu_us_per_echo, 2)
                    )?;
                    figs[k].echo_per_sec.push(e.per_sec);
                    if let Some(c) = e.cpu_us_per_echo {
                        figs[k].cpu_us_per_echo.push(c);
                    }
                    if let Some(c) = e.cpu_percent {
                        figs[k].cpu_percent.push(c);
                    }
                }
                Err(e) => note(&mut figs[k], out, "(a)", e)?,
            }
        }
        for j in 0..n {
            let k = (j + round as usize) % n;
            let t = &targets[k];
            match fixed_rate(t, opts, secs).await {
                Ok((lat, achieved)) => {
                    writeln!(
                        out,
                        "  (b) {:<16} {achieved:>8.0} msg/s  p50 {} µs  p99 {} µs  p99.9 {} µs",
                        t.kind.label(),
                        lat.p50_us,
                        lat.p99_us,
                        lat.p999_us
                    )?;
                    figs[k].p50_us.push(lat.p50_us as f64);
                    figs[k].p99_us.push(lat.p99_us as f64);
                    figs[k].p999_us.push(lat.p999_us as f64);
                    figs[k].rate_achieved.push(achieved);
                }
                Err(e) => note(&mut figs[k], out, "(b)", e)?,
            }
        }
        for j in 0..n {
            let k = (j + round as usize) % n;
            let t = &targets[k];
            match setup_rate(t, opts, secs, round as usize * n + j).await {
                Ok((per_sec, lat, failed)) => {
                    writeln!(
                        out,
                        "  (c) {:<16} {per_sec:>8.0} cycles/s  upgrade p50 {} µs  p99 {} µs{}",
                        t.kind.label(),
                        lat.p50_us,
                        lat.p99_us,
                        if failed > 0 { format!("  ({failed} failed)") } else { String::new() }
                    )?;
                    figs[k].setups_per_sec.push(per_sec);
                    figs[k].upgrade_p50_us.push(lat.p50_us as f64);
                    figs[k].upgrade_p99_us.push(lat.p99_us as f64);
                }
                Err(e) => note(&mut figs[k], out, "(c)", e)?,
            }
        }
        out.flush()?;
    }
    drop(targets);
    drop(backends);
    Ok(ProxiesReport {
        bench: "proxies",
        rounds: opts.rounds,
        secs: opts.secs,
        echo_conns: opts.echo_conns,
        rate_conns: opts.rate_conns,
        rate: opts.rate,
        setup_concurrency: opts.setup_concurrency,
        idle: opts.idle,
        message_bytes: opts.message_bytes,
        cores: procfs::cores(),
        loadavg_start,
        loadavg_end: procfs::loadavg(),
        skipped,
        targets: figs,
    })
}

fn note<W: Write>(f: &mut TargetFigures, out: &mut W, what: &str, e: anyhow::Error) -> Result<()> {
    writeln!(out, "  {what} {:<16} failed: {e:#}", f.target)?;
    if f.errors.len() < 5 {
        f.errors.push(format!("{what}: {e:#}"));
    }
    Ok(())
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]).map(|d| d.join(name)).find(|p| p.is_file())
}

/// `apt-get update` (once per run) and `apt-get install -y PACKAGES`.
async fn install<W: Write>(packages: &[&str], out: &mut W) -> Result<()> {
    static UPDATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if UPDATED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    writeln!(out, "installing {} from Debian packages (apt-get update, apt-get install -y)", packages.join(" "))?;
    let quiet = |cmd: &mut Command| {
        cmd.env("DEBIAN_FRONTEND", "noninteractive").stdout(std::process::Stdio::null());
    };
    let mut update = Command::new("apt-get");
    update.args(["update", "-q"]);
    quiet(&mut update);
    let status = tokio::time::timeout(Duration::from_secs(300), update.status()).await;
    if !matches!(status, Ok(Ok(s)) if s.success()) {
        writeln!(out, "  apt-get update failed; trying the install anyway")?;
    }
    let mut inst = Command::new("apt-get");
    inst.args(["install", "-y", "-q"]).args(packages);
    quiet(&mut inst);
    let status = tokio::time::timeout(Duration::from_secs(600), inst.status()).await;
    if !matches!(status, Ok(Ok(s)) if s.success()) {
        writeln!(out, "  apt-get install {} failed", packages.join(" "))?;
    }
    Ok(())
}

/// Waits until an upgrade through `addr` succeeds (the proxy is up and reaches a backend).
async fn wait_upgrade(addr: SocketAddr, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let attempt =
            tokio::time::timeout(Duration::from_secs(1), wsraw::connect(addr, None, "/ws?client=probe")).await;
        match attempt {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if Instant::now() >= deadline => bail!("no upgrade through {addr}: {e}"),
            Err(_) if Instant::now() >= deadline => bail!("no upgrade through {addr}: timed out"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn start_balancer(backends: &[(String, SocketAddr)], dir: &Path) -> Result<Target> {
    let conf = super::write_file(dir, "balancer.toml", "max_connections = 9950\n")?;
    let program = bin_path(BALANCER_BIN)?;
    // One thread, as HAProxy and nginx get: `--threads 1` where the balancer has it, else
    // tokio's own variable (read by its default multi-thread runtime).
    let threads_flag = super::supports_flag(&program, "--threads").await;
    let mut cmd = Command::new(&program);
    cmd.args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--config"])
        .arg(&conf)
        .env("RUST_LOG", "warn")
        .stderr(log_file(dir, "balancer.log")?);
    if threads_flag {
        cmd.args(["--threads", "1"]);
    } else {
        cmd.env("TOKIO_WORKER_THREADS", "1");
    }
    for (name, addr) in backends {
        cmd.arg("--node").arg(format!("{name}={addr}"));
    }
    let mut proc = ChildProcess::spawn_piped("balancer", cmd)?;
    let log = LogTarget::File(dir.join("balancer.log"));
    let ready = proc.await_ready(BALANCER_BIN, Duration::from_secs(10), &log).await?;
    let addr = ready.addr("listen")?;
    wait_upgrade(addr, Duration::from_secs(10)).await?;
    let threads = procfs::sample(proc.pid()).map(|s| s.threads).unwrap_or(0);
    Ok(Target {
        kind: Kind::Balancer,
        addr,
        pid: Some(proc.pid()),
        setup: if threads_flag {
            format!("--threads 1 ({threads} threads in all), RUST_LOG=warn")
        } else {
            format!(
                "no --threads flag: tokio multi-thread runtime with TOKIO_WORKER_THREADS=1 ({threads} threads in \
                 all), RUST_LOG=warn"
            )
        },
        _proc: Some(proc),
    })
}

fn log_file(dir: &Path, name: &str) -> Result<std::process::Stdio> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(name))?;
    Ok(f.into())
}

async fn start_haproxy(backends: &[(String, SocketAddr)], dir: &Path) -> Result<Target> {
    let program = find_program("haproxy").ok_or_else(|| anyhow!("haproxy not found"))?;
    let port = free_port()?;
    let servers: String = backends.iter().map(|(n, a)| format!("    server {n} {a}\n")).collect();
    let conf = format!(
        "global\n    nbthread 1\n    maxconn 9950\n    fd-hard-limit 20000\n\n\
         defaults\n    mode http\n    maxconn 9950\n    timeout connect 5s\n    timeout client 1h\n    \
         timeout server 1h\n    timeout tunnel 1h\n    timeout http-request 10s\n\n\
         frontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n\n\
         backend be\n    balance url_param client\n    hash-type consistent\n{servers}"
    );
    let path = super::write_file(dir, "haproxy.cfg", &conf)?;
    let mut cmd = Command::new(&program);
    cmd.arg("-f").arg(&path).arg("-db").stderr(log_file(dir, "haproxy.log")?);
    let mut proc = ChildProcess::spawn_piped("haproxy", cmd)?;
    proc.drain_stdout();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    wait_upgrade(addr, Duration::from_secs(10))
        .await
        .with_context(|| format!("see {}", dir.join("haproxy.log").display()))?;
    let version = version_of(&program, "-v").await;
    let threads = procfs::sample(proc.pid()).map(|s| s.threads).unwrap_or(0);
    Ok(Target {
        kind: Kind::Haproxy,
        addr,
        pid: Some(proc.pid()),
        setup: format!(
            "{version}; nbthread 1 ({threads} threads), balance url_param client + hash-type consistent, no logs"
        ),
        _proc: Some(proc),
    })
}

async fn start_nginx(backends: &[(String, SocketAddr)], dir: &Path) -> Result<Target> {
    let program = find_program("nginx").ok_or_else(|| anyhow!("nginx not found"))?;
    let port = free_port()?;
    let servers: String = backends.iter().map(|(_, a)| format!("        server {a};\n")).collect();
    let d = dir.display();
    let conf = format!(
        "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         worker_rlimit_nofile 20000;\n\
         events {{\n    worker_connections 20000;\n}}\n\
         http {{\n    access_log off;\n    client_body_temp_path {d}/nginx-body;\n    proxy_temp_path {d}/nginx-proxy;\n    \
         fastcgi_temp_path {d}/nginx-fastcgi;\n    uwsgi_temp_path {d}/nginx-uwsgi;\n    scgi_temp_path {d}/nginx-scgi;\n    \
         upstream echo {{\n        hash $arg_client consistent;\n{servers}    }}\n    \
         map $http_upgrade $connection_upgrade {{\n        default upgrade;\n        '' close;\n    }}\n    \
         server {{\n        listen 127.0.0.1:{port};\n        location / {{\n            proxy_pass http://echo;\n            \
         proxy_http_version 1.1;\n            proxy_set_header Upgrade $http_upgrade;\n            \
         proxy_set_header Connection $connection_upgrade;\n            proxy_read_timeout 3600s;\n            \
         proxy_send_timeout 3600s;\n        }}\n    }}\n}}\n"
    );
    let path = super::write_file(dir, "nginx.conf", &conf)?;
    let mut cmd = Command::new(&program);
    cmd.arg("-p").arg(dir).arg("-c").arg(&path).arg("-e").arg(dir.join("nginx-error.log"));
    cmd.stderr(log_file(dir, "nginx.log")?);
    let mut proc = ChildProcess::spawn_piped("nginx", cmd)?;
    proc.drain_stdout();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    wait_upgrade(addr, Duration::from_secs(10))
        .await
        .with_context(|| format!("see {}", dir.join("nginx-error.log").display()))?;
    // The master (our child) only supervises; the worker does the proxying.
    let worker = children_of(proc.pid()).into_iter().next().ok_or_else(|| anyhow!("nginx has no worker process"))?;
    let version = version_of(&program, "-v").await;
    Ok(Target {
        kind: Kind::Nginx,
        addr,
        pid: Some(worker),
        setup: format!(
            "{version}; worker_processes 1 (figures are the worker's), hash $arg_client consistent, access_log off"
        ),
        _proc: Some(proc),
    })
}

async fn version_of(program: &Path, flag: &str) -> String {
    match tokio::time::timeout(Duration::from_secs(5), Command::new(program).arg(flag).output()).await {
        Ok(Ok(o)) => {
            let text = String::from_utf8_lossy(if o.stdout.is_empty() { &o.stderr } else { &o.stdout }).into_owned();
            let first = text.lines().next().unwrap_or("").to_owned();
            first.split(" - ").next().unwrap_or(&first).trim().to_owned()
        }
        _ => program.display().to_string(),
    }
}

/// Pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).ok().and_then(|s| {
                let rest = &s[s.rfind(')')? + 1..];
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            }) == Some(pid)
        })
        .collect()
}

/// Source addresses for in-process load (disjoint from the workers' 127.0.10+.x).
fn local_sources(slot: usize, n: usize) -> Vec<IpAddr> {
    source_addrs(150 + slot % 50, n)
}

/// (d): RSS growth of the proxy per idle tunnel (the backend's for direct, as a reference).
async fn idle<W: Write>(t: &Target, n: usize, out: &mut W) -> Result<(Option<f64>, u64)> {
    let pid = t.pid;
    let before = pid.map(procfs::rss_kib).transpose()?;
    let tag = format!("{}-{}", std::process::id(), super::unix_micros() % 1_000_000_000);
    let specs: Vec<WorkerSpec> = split(n, MAX_PER_WORKER)
        .into_iter()
        .enumerate()
        .map(|(k, (first, count))| WorkerSpec {
            targets: vec![t.addr],
            sources: source_addrs(k, count),
            id_prefix: format!("px-idle-{tag}-"),
            first: first as u64,
            count: count as u64,
            concurrency: 64,
            rooms: None,
            connect_timeout_ms: 30_000,
            protocol: super::protocol::Protocol::Tether,
        })
        .collect();
    let (fleet, opened) = Fleet::start(specs, Duration::from_secs(300), out).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = pid.map(procfs::rss_kib).transpose()?;
    fleet.close().await;
    // Let the proxy close its side before the next target's turn.
    tokio::time::sleep(Duration::from_secs(1)).await;
    if opened.failed > 0 {
        // Still a valid figure over the tunnels that did open; the table says how many.
        writeln!(out, "  {}: {} of {n} idle connections failed: {:?}", t.kind.label(), opened.failed, opened.errors)?;
    }
    let per = match (before, after) {
        (Some(b), Some(a)) if opened.open > 0 => Some((a as f64 - b as f64) / opened.open as f64),
        _ => None,
    };
    Ok((per, opened.open))
}

/// Opens `n` upgraded connections through `t` as clients `{prefix}{i}`.
async fn open_many(t: &Target, n: usize, prefix: &str, slot: usize) -> Result<Vec<wsraw::Upgraded>> {
    let sources = local_sources(slot, n);
    let conns = futures_util::future::try_join_all((0..n).map(|i| {
        let source = sources[i % sources.len()];
        async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                wsraw::connect(t.addr, Some(source), &format!("/ws?client={prefix}{i}")),
            )
            .await
            .map_err(|_| anyhow!("upgrade {i} timed out"))?
            .with_context(|| format!("upgrade {i} through {}", t.addr))
        }
    }))
    .await?;
    Ok(conns)
}

/// Reads until one data frame arrived; `Ok(false)` at EOF.
async fn read_one(stream: &mut tokio::net::TcpStream, dec: &mut Decoder) -> Result<bool> {
    loop {
        if let Some(f) = dec.next_frame()? {
            if f.opcode == OP_CLOSE {
                return Ok(false);
            }
            if f.opcode == OP_BINARY || f.opcode == wsraw::OP_TEXT {
                return Ok(true);
            }
            continue;
        }
        if dec.read_from(stream, 4096).await? == 0 {
            return Ok(false);
        }
    }
}

struct EchoResult {
    per_sec: f64,
    cpu_us_per_echo: Option<f64>,
    cpu_percent: Option<f64>,
}

/// (a): closed-loop echo throughput.
async fn echo_closed_loop(t: &Target, opts: &ProxiesOptions, secs: Duration) -> Result<EchoResult> {
    let conns = open_many(t, opts.echo_conns, "a-", 0).await?;
    let payload = vec![b'e'; opts.message_bytes];
    let total = Arc::new(AtomicU64::new(0));
    // Two gates: everyone is warm (then the clock and the CPU meter start), everyone goes.
    let warm = Arc::new(tokio::sync::Barrier::new(conns.len() + 1));
    let go = Arc::new(tokio::sync::Barrier::new(conns.len() + 1));
    let deadline = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut tasks = Vec::with_capacity(conns.len());
    for (i, mut c) in conns.into_iter().enumerate() {
        let mut frame = Vec::new();
        wsraw::encode(&mut frame, OP_BINARY, &payload, Some(wsraw::mask_for(i as u64)));
        let (total, warm, go, deadline) =
            (Arc::clone(&total), Arc::clone(&warm), Arc::clone(&go), Arc::clone(&deadline));
        tasks.push(tokio::spawn(async move {
            let mut result = Ok(());
            for _ in 0..5 {
                if result.is_ok() {
                    c.stream.write_all(&frame).await?;
                    if !read_one(&mut c.stream, &mut c.decoder).await? {
                        result = Err(anyhow!("closed during warm-up"));
                    }
                }
            }
            // Reach both gates even after a failure, so the others are not left waiting.
            warm.wait().await;
            go.wait().await;
            result?;
            let end = *deadline.get().ok_or_else(|| anyhow!("no deadline"))?;
            let mut n = 0u64;
            while Instant::now() < end {
                c.stream.write_all(&frame).await?;
                if !read_one(&mut c.stream, &mut c.decoder).await? {
                    bail!("closed by the proxy");
                }
                n += 1;
            }
            total.fetch_add(n, Ordering::Relaxed);
            Ok::<_, anyhow::Error>(())
        }));
    }
    warm.wait().await;
    let meter = t.pid.map(|p| CpuMeter::start(&[p]));
    let started = Instant::now();
    let _ = deadline.set(started + secs);
    go.wait().await;
    let mut first_err = None;
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(e) => first_err = first_err.or(Some(anyhow!("echo task: {e}"))),
        }
    }
    let elapsed = started.elapsed();
    let cpu = meter.map(|m| m.read().0[0]);
    if let Some(e) = first_err {
        return Err(e);
    }
    let echoes = total.load(Ordering::Relaxed);
    if echoes == 0 {
        bail!("no echo at all");
    }
    Ok(EchoResult {
        per_sec: echoes as f64 / elapsed.as_secs_f64(),
        cpu_us_per_echo: cpu.map(|c| c.as_secs_f64() * 1e6 / echoes as f64),
        cpu_percent: cpu.map(|c| 100.0 * c.as_secs_f64() / elapsed.as_secs_f64()),
    })
}

/// (b): open-loop fixed rate; latency from send to echo.
async fn fixed_rate(t: &Target, opts: &ProxiesOptions, secs: Duration) -> Result<(Latency, f64)> {
    let conns = open_many(t, opts.rate_conns, "b-", 1).await?;
    let per_conn = opts.rate / conns.len() as f64;
    let interval = Duration::from_secs_f64(1.0 / per_conn);
    let warm = Duration::from_millis(500);
    let base = Instant::now() + Duration::from_millis(50);
    let end = base + warm + secs;
    let n = conns.len();
    let mut tasks = Vec::with_capacity(n);
    for (i, c) in conns.into_iter().enumerate() {
        let msg_len = opts.message_bytes;
        tasks.push(tokio::spawn(async move {
            let (mut rd, mut wr) = c.stream.into_split();
            let mut dec = c.decoder;
            // How many the writer sent, once it is done (the reader stops after that many).
            let sent_total = Arc::new(AtomicU64::new(u64::MAX));
            let sent_final = Arc::clone(&sent_total);
            let mask = wsraw::mask_for(i as u64);
            let first = base + interval.mul_f64(i as f64 / n as f64);
            let writer = async move {
                let mut payload = vec![b'r'; msg_len];
                let mut frame = Vec::with_capacity(msg_len + 16);
                let mut next = first;
                let mut sent = 0u64;
                while next < end {
                    tokio::time::sleep_until(next.into()).await;
                    let stamp = base.elapsed().as_nanos() as u64;
                    payload[..8].copy_from_slice(&stamp.to_be_bytes());
                    frame.clear();
                    wsraw::encode(&mut frame, OP_BINARY, &payload, Some(mask));
                    wr.write_all(&frame).await?;
                    sent += 1;
                    next += interval;
                }
                sent_final.store(sent, Ordering::Release);
                Ok::<_, anyhow::Error>((sent, wr))
            };
            let reader = async move {
                let mut h = new_histogram();
                let mut received = 0u64;
                let stop = end + Duration::from_secs(2);
                loop {
                    while let Some(f) = dec.next_frame()? {
                        let p = dec.payload(&f);
                        if f.opcode == OP_BINARY && p.len() >= 8 {
                            let mut b = [0u8; 8];
                            b.copy_from_slice(&p[..8]);
                            let sent_at = Duration::from_nanos(u64::from_be_bytes(b));
                            let now = base.elapsed();
                            received += 1;
                            if sent_at >= warm {
                                let us = now.saturating_sub(sent_at).as_micros() as u64;
                                h.saturating_record(us.max(1));
                            }
                        }
                    }
                    if received >= sent_total.load(Ordering::Acquire) || Instant::now() >= stop {
                        return Ok::<_, anyhow::Error>((h, received));
                    }
                    // Short reads, so that the end is noticed soon after the writer's last send.
                    match tokio::time::timeout(Duration::from_millis(50), dec.read_from(&mut rd, 4096)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Ok((h, received)),
                        Ok(Ok(_)) | Err(_) => {}
                    }
                }
            };
            let (w, r) = tokio::join!(writer, reader);
            let (sent, _wr) = w?;
            let (h, received) = r?;
            Ok::<_, anyhow::Error>((h, sent, received))
        }));
    }
    let mut all = new_histogram();
    let mut lost = 0u64;
    for task in tasks {
        let (h, sent, received) = task.await.map_err(|e| anyhow!("rate task: {e}"))??;
        all.add(&h).map_err(|e| anyhow!("histogram: {e}"))?;
        lost += sent.saturating_sub(received);
    }
    if lost > 0 {
        bail!("{lost} echoes never came back");
    }
    let achieved = all.len() as f64 / secs.as_secs_f64();
    Ok((Latency::of(&all), achieved))
}

/// (c): complete connection cycles per second.
async fn setup_rate(t: &Target, opts: &ProxiesOptions, secs: Duration, slot: usize) -> Result<(f64, Latency, u64)> {
    let end = Instant::now() + secs;
    // Cycles spread over 32 source addresses, so ephemeral ports never run short.
    let sources = local_sources(2 + slot % 40, 32 * super::CONNECTIONS_PER_SOURCE);
    let mut tasks = Vec::with_capacity(opts.setup_concurrency);
    for l in 0..opts.setup_concurrency {
        let sources = sources.clone();
        let addr = t.addr;
        tasks.push(tokio::spawn(async move {
            let mut h: Histogram<u64> = new_histogram();
            let (mut done, mut failed) = (0u64, 0u64);
            let mut k = l;
            let mut close = Vec::new();
            wsraw::encode(&mut close, OP_CLOSE, &1000u16.to_be_bytes(), Some(wsraw::mask_for(l as u64)));
            while Instant::now() < end {
                let source = sources[k % sources.len()];
                k += 7;
                let started = Instant::now();
                let cycle = async {
                    let mut up = wsraw::connect(addr, Some(source), &format!("/ws?client=c-{l}-{k}")).await?;
                    let upgraded = started.elapsed();
                    up.stream.write_all(&close).await?;
                    // Until the close reply and the hang-up (or an error: the cycle is over).
                    while read_one(&mut up.stream, &mut up.decoder).await.unwrap_or(false) {}
                    Ok::<_, anyhow::Error>(upgraded)
                };
                match tokio::time::timeout(Duration::from_secs(5), cycle).await {
                    Ok(Ok(upgraded)) => {
                        h.saturating_record(upgraded.as_micros() as u64);
                        done += 1;
                    }
                    _ => failed += 1,
                }
            }
            Ok::<_, anyhow::Error>((h, done, failed))
        }));
    }
    let started = Instant::now();
    let mut all = new_histogram();
    let (mut done, mut failed) = (0, 0);
    for task in tasks {
        let (h, d, f) = task.await.map_err(|e| anyhow!("setup task: {e}"))??;
        all.add(&h).map_err(|e| anyhow!("histogram: {e}"))?;
        done += d;
        failed += f;
    }
    let elapsed = started.elapsed().max(secs);
    Ok((done as f64 / elapsed.as_secs_f64(), Latency::of(&all), failed))
}
