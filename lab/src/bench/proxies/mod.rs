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
//!   hang-up: complete cycles per second, the upgrade's latency and the proxy's CPU per
//!   cycle; then (with `--connect-rate`, on by default with `--tls`) set-ups at a fixed,
//!   moderate rate: hand-shake and upgrade latency p50/p99 and the proxy's CPU per set-up,
//!   which is what one sizes a front door by.
//!
//! With `--tls` every proxy terminates TLS on its client side with the same certificate
//! ([`super::tls`]: an ECDSA P-256 leaf of a CA made for the run; HAProxy `bind … ssl crt`,
//! nginx `listen … ssl`, the balancer `--tls-cert/--tls-key`), the backends stay plain, and
//! the clients — the in-process ones and the idle workers alike — speak `wss` offering one
//! suite only, without resumption unless `--tls-resume`. `direct` stays plain: it is the
//! floor, what the backend costs without any proxy or TLS.
//!
//! (a)–(c) run in rounds; in each round every target runs once, the starting target
//! rotating from round to round, so that drift on a shared machine hits every target alike.
//! Reported figures are medians over rounds, with ratios to HAProxy from the same run.

mod report;
mod targets;
mod workloads;

pub use report::{ProxiesReport, TargetFigures};

use super::args::ProxiesArgs;
use super::procfs;
use super::tether_exe;
use super::tls::{self as tlsmod, ClientTls, ServerFiles, TlsSpec};
use anyhow::{bail, Result};
use report::fmt_opt;
use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use targets::{find_program, install, start_balancer, start_haproxy, start_nginx, Target};
use tether_kit::{ChildProcess, LogTarget};
use tokio::process::Command;
use workloads::{connect_fixed_rate, echo_closed_loop, fixed_rate, idle, setup_rate};

/// What `tether bench proxies` runs.
#[derive(Debug, Clone)]
pub struct ProxiesOptions {
    pub targets: Vec<Kind>,
    pub workloads: Workloads,
    pub install: bool,
    /// Where the proxies' configuration and logs go (a temporary directory otherwise).
    pub logs: Option<PathBuf>,
}

/// The sizes of the workloads: what a run is asked for, and what its report repeats.
#[derive(Debug, Clone, Serialize)]
pub struct Workloads {
    pub rounds: u32,
    pub secs: f64,
    pub echo_conns: usize,
    pub rate_conns: usize,
    pub rate: f64,
    pub setup_concurrency: usize,
    pub idle: usize,
    pub message_bytes: usize,
    /// (c) at a fixed rate: set-ups per second (0: not run).
    pub connect_rate: f64,
    /// Proxies terminate TLS; clients speak `wss`.
    pub tls: bool,
    /// With `tls`: sessions are kept and resumed.
    pub tls_resume: bool,
}

/// The TLS of one run: the servers' files and the clients' config.
pub(crate) struct RunTls {
    pub(crate) files: ServerFiles,
    pub(crate) spec: TlsSpec,
    pub(crate) client: ClientTls,
}

impl RunTls {
    fn new(dir: &std::path::Path, resume: bool) -> Result<Self> {
        let files = tlsmod::server_files(dir)?;
        let spec = TlsSpec { ca_pem: files.ca_pem.clone(), resume };
        let client = ClientTls::new(&spec)?;
        Ok(Self { files, spec, client })
    }
}

/// What a `--tls` run's report says about the TLS it measured.
#[derive(Debug, Clone, Serialize)]
pub struct TlsReport {
    /// What every client offered.
    pub offered: &'static str,
    pub certificate: &'static str,
    /// Sessions kept and resumed (`--tls-resume`).
    pub resume: bool,
    /// How `direct` was measured.
    pub direct: &'static str,
}

impl ProxiesOptions {
    fn from_args(a: ProxiesArgs) -> Result<Self> {
        let targets = a.targets.iter().map(|t| Kind::parse(t)).collect::<Result<Vec<_>>>()?;
        let mut w = Workloads {
            rounds: a.rounds,
            secs: a.secs,
            echo_conns: a.echo_conns,
            rate_conns: a.rate_conns,
            rate: a.rate,
            setup_concurrency: a.setup_concurrency,
            idle: a.idle,
            message_bytes: a.message_bytes,
            connect_rate: a.connect_rate.unwrap_or(if a.tls { DEFAULT_TLS_CONNECT_RATE } else { 0.0 }),
            tls: a.tls,
            tls_resume: a.tls_resume,
        };
        if a.quick {
            w.rounds = 1;
            w.secs = 0.5;
            w.idle = w.idle.min(200);
            w.connect_rate = w.connect_rate.min(200.0);
        }
        Ok(Self { targets, workloads: w, install: !a.no_install, logs: a.logs })
    }
}

/// Set-ups per second of (c)'s fixed-rate pass with `--tls`: a steady load well below what
/// any of the proxies saturates at on two cores, so that latency is the hand-shake's, not a
/// queue's.
pub const DEFAULT_TLS_CONNECT_RATE: f64 = 300.0;

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
    let tls = if opts.workloads.tls { Some(RunTls::new(&dir, opts.workloads.tls_resume)?) } else { None };
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
                setup: format!(
                    "straight to {} (the floor; no proxy{})",
                    backend_addrs[0].0,
                    if tls.is_some() { ", plain: no TLS" } else { "" }
                ),
                tls: None,
                negotiated: None,
                _proc: None,
            }),
            Kind::Balancer => start_balancer(&backend_addrs, &dir, tls.as_ref()).await,
            Kind::Haproxy => start_haproxy(&backend_addrs, &dir, tls.as_ref()).await,
            Kind::Nginx => start_nginx(&backend_addrs, &dir, tls.as_ref()).await,
        };
        match t {
            Ok(t) => {
                writeln!(out, "{:<16} {}  {}", t.kind.label(), t.addr, t.setup)?;
                if let Some(n) = &t.negotiated {
                    writeln!(out, "{:<16} TLS: {n}", "")?;
                }
                targets.push(t);
            }
            Err(e) => {
                writeln!(out, "{:<16} could not start: {e:#}", kind.label())?;
                skipped.push(format!("{}: {e:#}", kind.label()));
            }
        }
    }
    if targets.is_empty() {
        bail!("no target could be started: {}", skipped.join("; "));
    }
    let mut figs: Vec<TargetFigures> = targets
        .iter()
        .map(|t| TargetFigures {
            target: t.kind.label().to_owned(),
            setup: t.setup.clone(),
            tls: t.negotiated.clone(),
            ..Default::default()
        })
        .collect();
    let secs = Duration::from_secs_f64(opts.workloads.secs);

    writeln!(out, "\n(d) {} idle tunnels per target (fresh processes, once each)", opts.workloads.idle)?;
    for (k, t) in targets.iter().enumerate() {
        match idle(t, opts.workloads.idle, tls.as_ref().map(|t| &t.spec), out).await {
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
    for round in 0..opts.workloads.rounds {
        writeln!(out, "\nround {}/{}", round + 1, opts.workloads.rounds)?;
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
                Ok(r) => {
                    writeln!(
                        out,
                        "  (c) {:<16} {:>8.0} cycles/s  upgrade p50 {} µs  p99 {} µs  proxy CPU {} µs/cycle{}",
                        t.kind.label(),
                        r.per_sec,
                        r.upgrade.p50_us,
                        r.upgrade.p99_us,
                        fmt_opt(r.cpu_us_per_cycle, 1),
                        outcomes(r.failed, r.resumed),
                    )?;
                    figs[k].setups_per_sec.push(r.per_sec);
                    figs[k].upgrade_p50_us.push(r.upgrade.p50_us as f64);
                    figs[k].upgrade_p99_us.push(r.upgrade.p99_us as f64);
                    if let Some(c) = r.cpu_us_per_cycle {
                        figs[k].setup_cpu_us_per_cycle.push(c);
                    }
                    if let Some(c) = r.cpu_percent {
                        figs[k].setup_cpu_percent.push(c);
                    }
                    figs[k].resumed += r.resumed;
                }
                Err(e) => note(&mut figs[k], out, "(c)", e)?,
            }
        }
        if opts.workloads.connect_rate > 0.0 {
            for j in 0..n {
                let k = (j + round as usize) % n;
                let t = &targets[k];
                match connect_fixed_rate(t, opts.workloads.connect_rate, secs, 40 + round as usize * n + j).await {
                    Ok(r) => {
                        let hs = r.handshake.as_ref().map_or(String::new(), |h| {
                            format!("hand-shake p50 {} µs  p99 {} µs  ", h.p50_us, h.p99_us)
                        });
                        writeln!(
                            out,
                            "  (c) {:<16} {:>8.0} set-ups/s  {hs}upgrade p50 {} µs  p99 {} µs  proxy CPU {} µs/set-up{}",
                            t.kind.label(),
                            r.achieved,
                            r.upgrade.p50_us,
                            r.upgrade.p99_us,
                            fmt_opt(r.cpu_us_per_cycle, 1),
                            outcomes(r.failed, r.resumed),
                        )?;
                        let f = &mut figs[k];
                        f.rate_setups_per_sec.push(r.achieved);
                        if let Some(h) = r.handshake {
                            f.handshake_p50_us.push(h.p50_us as f64);
                            f.handshake_p99_us.push(h.p99_us as f64);
                        }
                        f.rate_upgrade_p50_us.push(r.upgrade.p50_us as f64);
                        f.rate_upgrade_p99_us.push(r.upgrade.p99_us as f64);
                        if let Some(c) = r.cpu_us_per_cycle {
                            f.rate_cpu_us_per_setup.push(c);
                        }
                        f.resumed += r.resumed;
                        f.rate_failed += r.failed;
                    }
                    Err(e) => note(&mut figs[k], out, "(c) fixed rate", e)?,
                }
            }
        }
        out.flush()?;
    }
    drop(targets);
    drop(backends);
    Ok(ProxiesReport {
        bench: "proxies",
        workloads: opts.workloads.clone(),
        cores: procfs::cores(),
        loadavg_start,
        loadavg_end: procfs::loadavg(),
        skipped,
        tls: tls.as_ref().map(|t| TlsReport {
            offered: tlsmod::PINNED,
            certificate: tlsmod::CERT_KIND,
            resume: t.spec.resume,
            direct: "plain (no TLS): the floor",
        }),
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

/// The tail of a (c) progress line: failed and resumed set-ups, each only when there were any.
fn outcomes(failed: u64, resumed: u64) -> String {
    let mut tail = String::new();
    if failed > 0 {
        tail.push_str(&format!("  ({failed} failed)"));
    }
    if resumed > 0 {
        tail.push_str(&format!("  ({resumed} resumed)"));
    }
    tail
}
