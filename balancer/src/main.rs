//! `tether-balancer` binary: parse flags, load and validate the config (exit 64 on a bad one),
//! set up logging, start the runtime with the configured threads, bind, print the ready line,
//! and hand over to [`tether_balancer::run`].

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tether_balancer::config::{parse_node_flag, signing_key_from_env};
use tether_balancer::{bind_listener, FileConfig, Overrides};
use tether_proto::logging::{self, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Exit code for bad flags or config (sysexits `EX_USAGE`).
const EXIT_USAGE: u8 = 64;

/// Sticky WebSocket/HTTP load balancer for Tether nodes.
#[derive(Debug, Parser)]
#[command(name = "tether-balancer", version, about)]
struct Cli {
    /// TOML config file (see configs/balancer.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Client-facing address [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Admin address (status, route, metrics, drain) [default: 127.0.0.1:9100].
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    /// A node, repeatable; when given, replaces the file's node list.
    #[arg(long = "node", value_name = "NAME=HOST:PORT")]
    nodes: Vec<String>,
    /// Milliseconds between health checks of each node [default: 500].
    #[arg(long, value_name = "N")]
    health_interval_ms: Option<u64>,
    /// Runtime threads [default: one per core]; 1 runs everything on one thread.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Client connections open at once, tunnels included; past it clients get 503 with
    /// Retry-After [default: the soft RLIMIT_NOFILE, once raised to the hard limit, less a
    /// reserve of up to 256, halved: each tunnel holds two sockets].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Bind the client listener with SO_REUSEPORT, so that several balancer processes can
    /// share its port.
    #[arg(long)]
    reuse_port: bool,
    /// File holding the key that signs client ids (content trimmed); wins over the file's
    /// `signing_key_file` and over $TETHER_SIGNING_KEY.
    #[arg(long, value_name = "FILE")]
    signing_key_file: Option<PathBuf>,
    /// Log line format on stderr.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS // --help, --version
            };
        }
    };
    // Before the config is validated: the default max_connections is derived from the raised
    // limit. Logged once logging is set up.
    let raised = tether_proto::limits::raise_nofile_limit();
    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tether-balancer: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    logging::init(cli.log_format, "info");
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
    let served = runtime(config.threads)
        .context("starting the runtime")
        // Spawned rather than run by `block_on`, so that with N threads all the work (accepting
        // included) is on those N, not on this one besides.
        .and_then(|runtime| runtime.block_on(async { tokio::spawn(serve(config)).await })?);
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-balancer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One thread: Tokio's current-thread scheduler, which does without the cross-thread
/// machinery (as HAProxy's `nbthread 1`). More: the multi-thread scheduler with that many
/// workers.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build()
}

fn load_config(cli: &Cli) -> Result<tether_balancer::Config, tether_balancer::Error> {
    let mut file = match &cli.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let nodes = cli.nodes.iter().map(|flag| parse_node_flag(flag)).collect::<Result<Vec<_>, _>>()?;
    file.apply(Overrides {
        listen: cli.listen.clone(),
        admin: cli.admin.clone(),
        nodes,
        health_interval_ms: cli.health_interval_ms,
        reuse_port: cli.reuse_port,
        threads: cli.threads,
        max_connections: cli.max_connections,
        signing_key_file: cli.signing_key_file.clone(),
        signing_key_env: signing_key_from_env()?,
    });
    file.validate()
}

async fn serve(config: tether_balancer::Config) -> anyhow::Result<()> {
    let listener = bind_listener(config.listen, config.reuse_port)
        .with_context(|| format!("binding listen address {}", config.listen))?;
    // Never shared: drain and status are per process, so each needs its own admin address.
    let admin =
        bind_listener(config.admin, false).with_context(|| format!("binding admin address {}", config.admin))?;
    let listen_addr = listener.local_addr()?;
    let admin_addr = admin.local_addr()?;
    // Signal handlers go in before the ready line: a SIGTERM right after it is a graceful stop.
    let (term, int) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        )
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(term, int, shutdown.clone()));
    {
        // Other tools wait for and parse exactly this line.
        let mut out = std::io::stdout().lock();
        writeln!(out, "tether-balancer ready listen={listen_addr} admin={admin_addr}")?;
        out.flush()?;
    }

    tether_balancer::run(listener, admin, config, shutdown).await?;
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
