//! The `tether-node` command line: its flags, how they lay over the config file, and the
//! start-up around [`crate::run`] (open-file limit, runtime, listener, signals, the ready
//! line). `main.rs` only calls these in order.
//!
//! Exit codes: 64 for bad flags or a bad config (sysexits' `EX_USAGE`), 1 for a failure once
//! running (the listener, the runtime, the backbone), 0 after a clean shutdown.

use crate::config::{BackboneKind, Config, ConfigError, FileConfig};
use crate::NodeError;
use clap::Parser;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tether_proto::logging::LogFormat;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Exit code for bad flags or configuration (sysexits' `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;

/// A Tether room node: WebSocket rooms shared across nodes through Redis.
#[derive(Debug, Parser)]
#[command(name = "tether-node", version)]
pub struct Args {
    /// TOML config file (see configs/node.toml); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:9001 (port 0 picks a free one).
    #[arg(long)]
    listen: Option<String>,
    /// HOST:PORT announced in the node registry for balancers to dial (default: the listen
    /// address; required when listening on 0.0.0.0 or [::]).
    #[arg(long)]
    advertise: Option<String>,
    /// Node name shown to clients as `server` (default: hostname:port).
    #[arg(long)]
    name: Option<String>,
    /// Redis URL of the backbone.
    #[arg(long)]
    redis: Option<String>,
    /// Backbone: redis, nats, or none (sticky sessions only).
    #[arg(long)]
    backbone: Option<BackboneKind>,
    /// File holding the key that signs client ids (same key as the balancer's); overrides the
    /// config file and $TETHER_SIGNING_KEY.
    #[arg(long)]
    signing_key_file: Option<PathBuf>,
    /// Turns the server API on with this key (overrides `[api] key` and $TETHER_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// NATS server URL(s) of the `nats` backbone (nats-server with JetStream); several
    /// comma-separated for a cluster: nats://a:4222,nats://b:4222,...
    #[arg(long)]
    nats: Option<String>,
    /// Replicas of every JetStream stream the backbone creates, 1-5 [default: 3 when --nats
    /// lists 3+ servers, else 1].
    #[arg(long)]
    nats_replicas: Option<usize>,
    /// Runtime worker threads [default: one per core].
    #[arg(long)]
    threads: Option<usize>,
    /// Client connections open at once; past it upgrades get 503 with Retry-After [default:
    /// the soft RLIMIT_NOFILE, once raised to the hard limit, less a reserve of up to 256].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Peers whose X-Real-IP / X-Forwarded-For name the client: CIDRs or addresses,
    /// comma-separated or repeated; replaces the file's `trusted_proxies` [default:
    /// 127.0.0.0/8,::1/128]. An empty value trusts nobody.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', num_args = 0..)]
    trusted_proxies: Option<Vec<String>>,
    /// Log format on stderr: text or json. Filter with RUST_LOG.
    #[arg(long, default_value = "text")]
    pub log_format: LogFormat,
}

/// Why the node did not run, or stopped: each says its exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("listener address: {0}")]
    ListenerAddress(#[source] std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl Failure {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Config(_) => ExitCode::from(EXIT_USAGE),
            _ => ExitCode::FAILURE,
        }
    }
}

/// The flags, or the exit code after clap said what was wrong with them (64), or printed the
/// help or version asked for (0).
pub fn parse_args() -> Result<Args, ExitCode> {
    Args::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(EXIT_USAGE)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// A validated config, and whether its name is to be derived from the port it listens on.
pub struct Startup {
    pub config: Config,
    derived_name: bool,
}

impl Args {
    /// The config file (if any) with the flags laid over it, validated.
    pub fn into_config(self) -> Result<Startup, Failure> {
        let mut file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let derived_name = self.name.is_none() && file.name.is_none();
        file.listen = self.listen.or(file.listen);
        file.advertise = self.advertise.or(file.advertise);
        file.name = self.name.or(file.name);
        file.redis = self.redis.or(file.redis);
        file.nats = self.nats.or(file.nats);
        file.nats_replicas = self.nats_replicas.or(file.nats_replicas);
        file.backbone = self.backbone.or(file.backbone);
        file.signing_key_file = self.signing_key_file.or(file.signing_key_file);
        file.threads = self.threads.or(file.threads);
        file.max_connections = self.max_connections.or(file.max_connections);
        if let Some(list) = self.trusted_proxies {
            // `--trusted-proxies ""` (or given without a value) trusts nobody.
            file.trusted_proxies = Some(list.into_iter().filter(|s| !s.trim().is_empty()).collect());
        }
        if let Some(key) = self.api_key {
            file.api.get_or_insert_with(Default::default).key = Some(key);
        }
        // Before validating: the default max_connections is derived from the raised limit.
        raise_nofile_limit();
        let config = file.validate()?;
        let limit = config.connection_limit;
        if limit.exceeds_fd_limit() {
            tracing::warn!(
                max_connections = limit.max_connections,
                fd_allowance = limit.fd_allowance(),
                "{limit}: above what the open-file limit allows; past it accepts fail with EMFILE instead of clients getting 503"
            );
        } else {
            tracing::info!(max_connections = limit.max_connections, source = limit.source(), "{limit}");
        }
        Ok(Startup { config, derived_name })
    }
}

/// The runtime for `threads` workers. Always the multi-thread scheduler, even with one
/// worker: with tokio's current-thread scheduler a busy node batched its writes far less and
/// delivered half as much (docs/PERFORMANCE.md, "runtime threads").
pub fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build().map_err(Failure::Runtime)
}

/// Binds, installs the signal handlers, prints the ready line and serves until SIGTERM or
/// Ctrl-C has drained the node.
pub async fn serve(startup: Startup) -> Result<(), Failure> {
    let Startup { mut config, derived_name } = startup;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Failure::Listen { addr: config.listen, source })?;
    let local = listener.local_addr().map_err(Failure::ListenerAddress)?;
    // A name derived from the port must use the real one when port 0 was asked for.
    if derived_name && config.listen.port() == 0 {
        config.name = format!("{}{}", config.name.trim_end_matches(":0"), format_args!(":{}", local.port()));
    }
    let term = signal(SignalKind::terminate()).map_err(Failure::Signals)?;
    let int = signal(SignalKind::interrupt()).map_err(Failure::Signals)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(term, int, shutdown.clone()));
    // The one machine-readable line: tools that start nodes on port 0 parse it.
    println!("tether-node ready name={} listen={local}", config.name);
    let _ = std::io::stdout().flush();
    crate::run(listener, config, shutdown).await?;
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (each client holds a descriptor); a
/// failure is a warning, and the limit in force then decides the default `max_connections`.
fn raise_nofile_limit() {
    match tether_proto::limits::raise_nofile_limit() {
        Ok(raised) if raised.error.is_some() => tracing::warn!("{raised}"),
        Ok(raised) => tracing::info!(soft = raised.soft, hard = raised.hard, "{raised}"),
        Err(e) => tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE; max_connections assumes 1024"),
    }
}

/// SIGTERM or Ctrl-C cancels `shutdown` once. The handlers are installed by the caller
/// *before* the ready line is printed, so a SIGTERM right after it is a graceful stop.
async fn signals(mut term: Signal, mut int: Signal, shutdown: CancellationToken) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown requested");
    shutdown.cancel();
}
