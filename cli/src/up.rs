//! `tether up`: a local cluster in the foreground.
//!
//! Starts a [`Cluster`] (private `redis-server` unless `--redis`, `node-1..node-N`, one
//! balancer), prints where everything listens and how to talk to it, then watches: a child
//! that dies is reported (the others keep running), and `SIGINT`/`SIGTERM` stop everything —
//! `SIGTERM` to each child, a grace period, `SIGKILL` for stragglers. A second signal during
//! that grace period kills at once.
//!
//! The summary goes to stdout with the *bound* addresses, so `--listen 127.0.0.1:0` works and
//! scripts can read the URLs back (`balancer ws://…/ws`, `admin http://…/status` lines).

use crate::args::UpArgs;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tether_kit::certs::{CertFiles, DevCa};
use tether_kit::{Cluster, ClusterLogs, ClusterOptions, StopReport, DEFAULT_READY_TIMEOUT};
use tokio::signal::unix::{signal, SignalKind};

/// What `tether up` runs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub nodes: usize,
    pub redis: Option<String>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub logs: Option<PathBuf>,
    /// Time between `SIGTERM` and `SIGKILL` at shutdown.
    pub grace: Duration,
    pub node_args: Vec<String>,
    pub balancer_args: Vec<String>,
    /// Run the nodes on a private nats-server instead of Redis.
    pub nats: bool,
    /// `--tls`: wss:// on the balancer with a development certificate; `Some(dir)` when
    /// `--tls-dir` names where it lives.
    pub tls: Option<Option<PathBuf>>,
}

impl From<UpArgs> for UpOptions {
    fn from(a: UpArgs) -> Self {
        Self {
            nodes: usize::from(a.nodes),
            redis: a.redis,
            listen: a.listen,
            admin: a.admin,
            logs: a.logs,
            // Negative or NaN is nonsense; treat it as "no grace" rather than panic.
            grace: Duration::try_from_secs_f64(a.grace).unwrap_or(Duration::ZERO),
            node_args: a.node_args,
            balancer_args: a.balancer_args,
            nats: a.nats,
            tls: a.tls.then_some(a.tls_dir),
        }
    }
}

/// Runs the cluster until a signal; returns the exit code (0 when every process stopped
/// cleanly on `SIGTERM`, 1 otherwise).
pub async fn run(opts: UpOptions) -> Result<i32> {
    // Installed before anything is spawned: a Ctrl-C during start-up must reach us, not the
    // default handler that would leave children behind.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let logs = match &opts.logs {
        Some(dir) => ClusterLogs::Dir(dir.clone()),
        None => ClusterLogs::Inherit,
    };
    // Kept until the cluster has stopped: a temporary directory goes with it.
    let tls = match &opts.tls {
        Some(dir) => Some(DevTls::prepare(dir.as_deref())?),
        None => None,
    };
    let mut balancer_args = opts.balancer_args.clone();
    if let Some(tls) = &tls {
        balancer_args.extend(tls.balancer_args());
    }
    let cluster_opts = ClusterOptions {
        nodes: opts.nodes,
        redis: opts.redis.clone(),
        balancer_listen: Some(opts.listen),
        balancer_admin: Some(opts.admin),
        node_args: opts.node_args.clone(),
        balancer_args,
        logs,
        ready_timeout: DEFAULT_READY_TIMEOUT,
        redis_persistence: Default::default(),
        nats: opts.nats,
    };
    let mut cluster = tokio::select! {
        started = Cluster::start(cluster_opts) => started?,
        // Dropping the start future kills whatever it had spawned.
        _ = sigint.recv() => { eprintln!("tether up: interrupted while starting; nothing left running"); return Ok(130) }
        _ = sigterm.recv() => { eprintln!("tether up: terminated while starting; nothing left running"); return Ok(143) }
    };
    print!("{}", summary(&cluster, &opts, tls.as_ref()));

    let mut died = false;
    let signal_name = loop {
        tokio::select! {
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
            exit = cluster.next_exit() => {
                let (label, pid, status) = exit?;
                died = true;
                println!("! {label} (pid {pid}) exited unexpectedly: {status}; the rest keep running");
            }
        }
    };

    println!(
        "{signal_name}: stopping (SIGTERM to every process, SIGKILL after {:.1} s; signal again to kill now)",
        opts.grace.as_secs_f64()
    );
    let reports = tokio::select! {
        reports = cluster.shutdown(opts.grace) => reports?,
        _ = sigint.recv() => kill_now(&mut cluster).await?,
        _ = sigterm.recv() => kill_now(&mut cluster).await?,
    };
    for r in &reports {
        println!("  {:<9} pid {:<7} {}", r.label, r.pid, r.outcome);
    }
    let clean = reports.iter().all(|r| r.outcome.is_clean());
    if clean && !died {
        println!("tether up: stopped cleanly");
        Ok(0)
    } else {
        println!("tether up: stopped; not every process exited cleanly (see above)");
        Ok(1)
    }
}

async fn kill_now(cluster: &mut Cluster) -> Result<Vec<StopReport>> {
    println!("second signal: killing every process now");
    cluster.kill_all().await
}

/// The development certificate of `tether up --tls`: a CA made for the purpose and a leaf for
/// localhost / 127.0.0.1 / ::1 it signed, as PEM files the balancer reads (`--tls-cert`,
/// `--tls-key`) and clients trust (`ca.pem`).
pub struct DevTls {
    files: CertFiles,
    /// Whether the files were there already (`--tls-dir` from an earlier run).
    reused: bool,
    /// The temporary directory holding them when no `--tls-dir` was given.
    _tmp: Option<tempfile::TempDir>,
}

impl DevTls {
    /// Reuses `dir`'s `ca.pem`, `cert.pem` and `key.pem` when all three are there; otherwise
    /// makes a CA and a certificate and writes them to `dir` (or a fresh temporary directory).
    pub fn prepare(dir: Option<&std::path::Path>) -> Result<Self> {
        let (dir, tmp) = match dir {
            Some(dir) => (dir.to_path_buf(), None),
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("tether-up-tls-")
                    .tempdir()
                    .context("creating a directory for the development certificate")?;
                (tmp.path().to_path_buf(), Some(tmp))
            }
        };
        let files = CertFiles { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        if [&files.ca, &files.cert, &files.key].iter().all(|p| p.is_file()) {
            return Ok(Self { files, reused: true, _tmp: tmp });
        }
        let ca = DevCa::generate("Tether development CA (tether up --tls)")?;
        let files =
            ca.write(&dir).with_context(|| format!("writing the development certificate to {}", dir.display()))?;
        Ok(Self { files, reused: false, _tmp: tmp })
    }

    /// The balancer flags that serve this certificate.
    pub fn balancer_args(&self) -> [String; 4] {
        [
            "--tls-cert".to_owned(),
            self.files.cert.display().to_string(),
            "--tls-key".to_owned(),
            self.files.key.display().to_string(),
        ]
    }

    /// The CA certificate clients must trust.
    pub fn ca(&self) -> &std::path::Path {
        &self.files.ca
    }
}

/// The start-up banner: where everything listens and what to try.
pub fn summary(cluster: &Cluster, opts: &UpOptions, tls: Option<&DevTls>) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let ws = match tls {
        Some(_) => format!("wss://{}/ws", cluster.balancer().addr()),
        None => cluster.ws_url(),
    };
    let admin = cluster.admin_url();
    let _ = writeln!(
        s,
        "tether up: {} node{} behind one balancer",
        cluster.nodes().len(),
        if cluster.nodes().len() == 1 { "" } else { "s" }
    );
    match cluster.redis() {
        Some(redis) => {
            let _ = writeln!(
                s,
                "  {:<9} {:<34} (private redis-server, pid {})",
                "redis",
                redis.url(),
                redis.pid().unwrap_or(0)
            );
        }
        None => {
            let _ = writeln!(s, "  {:<9} {:<34} (external)", "redis", cluster.redis_url());
        }
    }
    for node in cluster.nodes() {
        let _ = writeln!(s, "  {:<9} {:<34} (pid {})", node.name(), node.ws_url(), node.pid());
    }
    let _ = writeln!(s, "  {:<9} {:<34} (pid {})", "balancer", ws, cluster.balancer().pid());
    let _ = writeln!(s, "  {:<9} {admin}/status", "admin");
    if let Some(tls) = tls {
        let ca = tls.ca().display();
        let how = if tls.reused { "reused" } else { "made for this run" };
        let _ = writeln!(s, "  {:<9} {ca} (development CA, {how}: trust it to connect)", "ca");
    }
    if let Some(dir) = &opts.logs {
        let _ = writeln!(s, "  {:<9} {}/*.log", "logs", dir.display());
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Try:");
    match tls {
        Some(tls) => {
            let ca = tls.ca().display();
            let _ = writeln!(s, "  tether chat {ws} --ca {ca} --name alice");
            let _ = writeln!(s, "  SSL_CERT_FILE={ca} websocat '{ws}?client=alice'");
        }
        None => {
            let _ = writeln!(s, "  tether chat {ws} --name alice");
            let _ = writeln!(s, "  websocat '{ws}?client=alice'");
        }
    }
    let _ = writeln!(s, "      {{\"type\":\"set_name\",\"name\":\"Alice\"}}");
    let _ = writeln!(s, "      {{\"type\":\"join\",\"room\":\"general\"}}");
    let _ = writeln!(s, "      {{\"type\":\"message\",\"room\":\"general\",\"text\":\"hello\"}}");
    let _ = writeln!(s, "      {{\"type\":\"presence\",\"room\":\"general\"}}");
    let _ = writeln!(s, "  curl '{admin}/route?client=alice'");
    let _ = writeln!(s, "  curl {admin}/status");
    let _ = writeln!(s);
    let _ = writeln!(s, "Ctrl-C stops the cluster.");
    s
}
