//! The `tether-balancer` binary's command line and start-up, in the library so that `main`
//! stays parse, build, run: the flags ([`Args`]), the config they make ([`load_config`]), the
//! log lines about descriptor limits ([`log_limits`]), the runtime ([`runtime`]), and serving
//! until a signal or an upgrade ([`serve`]). Exit codes: [`EXIT_USAGE`] (64) for bad flags or config, 1 for
//! a runtime failure.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use tether_proto::limits::Raised;
use tether_proto::logging::LogFormat;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{parse_node_flag, signing_key_from_env};
use crate::server::bind_listener;
use crate::{Config, Error, FileConfig, Overrides};

/// Exit code for bad flags or config (sysexits `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;

/// Sticky WebSocket/HTTP load balancer for Tether nodes.
#[derive(Debug, Clone, Parser)]
#[command(name = "tether-balancer", version, about)]
pub struct Args {
    /// TOML config file (see configs/balancer.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Client-facing address [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin address (status, route, metrics, drain) [default: 127.0.0.1:9100].
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// A node, repeatable; when given, replaces the file's node list.
    #[arg(long = "node", value_name = "NAME=HOST:PORT")]
    pub nodes: Vec<String>,
    /// Milliseconds between health checks of each node [default: 500].
    #[arg(long, value_name = "N")]
    pub health_interval_ms: Option<u64>,
    /// Runtime threads [default: one per core]; 1 runs everything on one thread.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Client connections open at once, tunnels included; past it clients get 503 with
    /// Retry-After [default: the soft RLIMIT_NOFILE, once raised to the hard limit, less a
    /// reserve of up to 256, halved: each tunnel holds two sockets].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Bind the client listener with SO_REUSEPORT, so that several balancer processes can
    /// share its port.
    #[arg(long)]
    pub reuse_port: bool,
    /// File holding the key that signs client ids (content trimmed); wins over the file's
    /// `signing_key_file` and over $TETHER_SIGNING_KEY.
    #[arg(long, value_name = "FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// PEM certificate chain (leaf first) for the client listener, which then speaks TLS only
    /// (wss/https); needs --tls-key. Replaces the file's [tls]. Read again on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert's leaf; needs --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// PROXY protocol header every client connection must start with: off, v1, v2 or any
    /// [default: off]. Only for a listener behind a load balancer that sends it.
    #[arg(long, value_name = "off|v1|v2|any")]
    pub proxy_protocol: Option<String>,
    /// Client connections open at once per source address (IPv6: per /64); past it 429
    /// with Retry-After: 1 [default: 0 = no cap].
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<u32>,
    /// New client connections per second per source address (token bucket refill); past it
    /// 429 with Retry-After [default: 0 = no limit].
    #[arg(long, value_name = "PER_SEC")]
    pub connect_rate_per_ip: Option<f64>,
    /// Size of that bucket: connections an address may open at once after a rest
    /// [default: the rate rounded up, at least 1].
    #[arg(long, value_name = "N")]
    pub connect_burst_per_ip: Option<u32>,
    /// What a tunnel does when its node dies, is drained or closes 1012: reconnect (the
    /// client's connection closes and it reconnects) or rehome (the balancer moves it to the
    /// next node without a close) [default: reconnect].
    #[arg(long, value_name = "reconnect|rehome")]
    pub failover: Option<String>,
    /// Bytes of a client's frames a re-homing tunnel may hold while it switches nodes; past
    /// it the client is closed 1008 [default: 1048576].
    #[arg(long, value_name = "N")]
    pub rehome_buffer_bytes: Option<usize>,
    /// How a new connection's node is chosen: hrw (the client's best-ranked usable node) or
    /// bounded (the first one in its rank within ceil(load_factor × mean)) [default: hrw].
    #[arg(long, value_name = "hrw|bounded")]
    pub balance: Option<String>,
    /// Under --balance bounded: no node above ceil(load_factor × mean); at least 1.0
    /// [default: 1.25].
    #[arg(long, value_name = "F")]
    pub load_factor: Option<f64>,
    /// What a node that comes back gets: off (only new connections) or paced (the clients
    /// that rank it first move back to it, at most --rebalance-per-sec) [default: off].
    #[arg(long, value_name = "off|paced")]
    pub rebalance: Option<String>,
    /// Under --rebalance paced: clients moved per second at most [default: 10].
    #[arg(long, value_name = "PER_SEC")]
    pub rebalance_per_sec: Option<f64>,
    /// Follow the node registry the nodes announce themselves in: redis://…,
    /// redis+cluster://H:P,H:P or nats://A,nats://B (overrides `discover`). Static --node
    /// entries still apply and win over a discovered node of the same name.
    #[arg(long, value_name = "URL")]
    pub discover: Option<String>,
    /// The nodes' key prefix, for --discover (overrides `discover_prefix`) [default: tether:].
    #[arg(long, value_name = "PREFIX")]
    pub discover_prefix: Option<String>,
    /// Log line format on stderr.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// Logs what raising the open-file limit came to (read before the config was validated: the
/// default `max_connections` is derived from the raised limit), and the connection limit,
/// warning when it is more than the descriptors allow.
pub fn log_limits(raised: std::io::Result<Raised>, config: &Config) {
    match raised {
        Ok(raised) if raised.error.is_some() => warn!("{raised}"),
        Ok(raised) => info!(soft = raised.soft, hard = raised.hard, "{raised}"),
        Err(e) => warn!(error = %e, "cannot read RLIMIT_NOFILE; max_connections assumes 1024"),
    }
    let limit = config.connection_limit;
    if limit.exceeds_fd_limit() {
        warn!(
            max_connections = limit.max_connections,
            fd_allowance = limit.fd_allowance(),
            "{limit}: above what the open-file limit allows; past it accepts and node connects fail with EMFILE instead of clients getting 503"
        );
    } else {
        info!(max_connections = limit.max_connections, source = limit.source(), "{limit}");
    }
}

/// One thread: Tokio's current-thread scheduler, which does without the cross-thread
/// machinery (as HAProxy's `nbthread 1`). More: the multi-thread scheduler with that many
/// workers.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build()
}

/// The config from the file named by `--config` (or the defaults), the flags applied over it,
/// validated (certificate files read and checked). An error here is the operator's: exit
/// [`EXIT_USAGE`] at start; on SIGHUP, the reload is refused and the running config stays.
pub fn load_config(args: &Args) -> Result<Config, Error> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (None, None) => None,
        (Some(_), None) => return Err(flag_needs("--tls-cert", "--tls-key")),
        (None, Some(_)) => return Err(flag_needs("--tls-key", "--tls-cert")),
    };
    let mut file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let nodes = args.nodes.iter().map(|flag| parse_node_flag(flag)).collect::<Result<Vec<_>, _>>()?;
    file.apply(Overrides {
        listen: args.listen.clone(),
        admin: args.admin.clone(),
        nodes,
        health_interval_ms: args.health_interval_ms,
        reuse_port: args.reuse_port,
        threads: args.threads,
        max_connections: args.max_connections,
        signing_key_file: args.signing_key_file.clone(),
        signing_key_env: signing_key_from_env()?,
        tls,
        proxy_protocol: args.proxy_protocol.clone(),
        max_connections_per_ip: args.max_connections_per_ip,
        connect_rate_per_ip: args.connect_rate_per_ip,
        connect_burst_per_ip: args.connect_burst_per_ip,
        failover: args.failover.clone(),
        rehome_buffer_bytes: args.rehome_buffer_bytes,
        balance: args.balance.clone(),
        load_factor: args.load_factor,
        rebalance: args.rebalance.clone(),
        rebalance_per_sec: args.rebalance_per_sec,
        discover: args.discover.clone(),
        discover_prefix: args.discover_prefix.clone(),
    });
    file.validate()
}

fn flag_needs(given: &str, missing: &str) -> Error {
    Error::Config { field: given.into(), reason: format!("needs {missing} as well (give both or neither)") }
}

/// Binds both listeners (or, started by an upgrade — [`crate::upgrade::SOCKET_ENV`] set —
/// takes them from the process it replaces), installs the signal handlers, prints the ready
/// line and runs the balancer until SIGTERM or SIGINT (and the shutdown grace) is over, or
/// until an upgrade (`SIGUSR2`, `POST /upgrade`) has handed everything to a new process. An
/// error here is a runtime one: exit 1. Each SIGHUP meanwhile loads the config again from
/// `args` (see [`crate::reload`]).
pub async fn serve(args: Args, config: Config) -> anyhow::Result<()> {
    // Read now: once the file at this path is replaced, `/proc/self/exe` says " (deleted)".
    let launch = match crate::Launch::from_env() {
        Ok(launch) => Some(launch),
        Err(e) => {
            warn!(error = %e, "cannot tell this binary's path: upgrades are off");
            None
        }
    };
    let inherited = match std::env::var_os(crate::upgrade::SOCKET_ENV) {
        Some(path) => Some(crate::upgrade::inherit(std::path::Path::new(&path)).await?),
        None => None,
    };
    let (listener, admin, inherit) = match inherited {
        Some((inherit, listener, admin)) => {
            info!(from_pid = inherit.from_pid, generation = inherit.generation, "taking over from the old process");
            (listener, admin, Some(inherit))
        }
        None => {
            let listener = bind_listener(config.listen, config.reuse_port)
                .with_context(|| format!("binding listen address {}", config.listen))?;
            // Never shared: drain and status are per process, so each needs its own admin address.
            let admin = bind_listener(config.admin, false)
                .with_context(|| format!("binding admin address {}", config.admin))?;
            (listener, admin, None)
        }
    };
    let listen_addr = listener.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let generation = inherit.as_ref().map_or(1, |i| i.generation);
    let fresh = inherit.is_none();
    // Signal handlers go in before the ready line: a SIGTERM right after it is a graceful
    // stop, a SIGHUP a reload (not the default action, which would kill the process).
    let (term, int, hup, _usr2) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
            // Installed before the ready line too, so that an early SIGUSR2 cannot kill the
            // process (its default action); `run_with` acts on the ones that follow.
            signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?,
        )
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(term, int, shutdown.clone()));
    // One pending reload at most: SIGHUPs that arrive while one is being loaded fold into it
    // (the signal stream itself coalesces them too).
    let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
    tokio::spawn(on_hangup(hup, args, reload_tx, shutdown.clone()));
    if let Some(tls) = &config.tls {
        info!(cert = %tls.cert.display(), key = %tls.key.display(), "client listener speaks TLS only (wss/https)");
    }
    {
        // Other tools wait for and parse exactly this line (`k=v` pairs).
        let mut out = std::io::stdout().lock();
        writeln!(out, "tether-balancer ready listen={listen_addr} admin={admin_addr} generation={generation}")?;
        out.flush()?;
    }
    if fresh {
        // A takeover tells systemd once it has the tunnels (see `upgrade::adopt`).
        crate::upgrade::notify_ready(false);
    }

    crate::run_with(listener, admin, config, shutdown, crate::Start { launch, inherit }, reloads).await?;
    info!("stopped");
    Ok(())
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn on_signal(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "shutdown requested"),
        _ = int.recv() => info!(signal = "SIGINT", "shutdown requested"),
    }
    shutdown.cancel();
}

/// On each SIGHUP, loads the config as at start (the same file, the same flags) and sends
/// the result to the running balancer, until shutdown.
async fn on_hangup(
    mut hup: tokio::signal::unix::Signal,
    args: Args,
    reloads: tokio::sync::mpsc::Sender<Result<Config, Error>>,
    shutdown: CancellationToken,
) {
    let args = std::sync::Arc::new(args);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        info!(signal = "SIGHUP", config = ?args.config, "reload requested");
        // File reads (the TOML, the certificates): off the runtime's threads.
        let loaded = {
            let args = std::sync::Arc::clone(&args);
            tokio::task::spawn_blocking(move || load_config(&args)).await
        };
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                warn!(error = %e, "reload: loading the config panicked; keeping the running one");
                continue;
            }
        };
        if reloads.send(loaded).await.is_err() {
            return;
        }
    }
}
