//! `tether-node` binary: flags → config → bind → [`tether_node::run`].

use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use tether_node::config::{BackboneKind, FileConfig};
use tether_proto::logging::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// A Tether room node: WebSocket rooms shared across nodes through Redis.
#[derive(Debug, Parser)]
#[command(name = "tether-node", version)]
struct Args {
    /// TOML config file (see configs/node.toml); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:9001 (port 0 picks a free one).
    #[arg(long)]
    listen: Option<String>,
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
    /// NATS URL of the `nats` backbone (nats-server with JetStream).
    #[arg(long)]
    nats: Option<String>,
    /// Runtime worker threads [default: one per core].
    #[arg(long)]
    threads: Option<usize>,
    /// Client connections open at once; past it upgrades get 503 with Retry-After [default:
    /// the soft RLIMIT_NOFILE, once raised to the hard limit, less a reserve of up to 256].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Log format on stderr: text or json. Filter with RUST_LOG.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
}

/// jemalloc rather than glibc's malloc: at 19,000 idle clients it held a node at 6.27–6.35 KiB
/// per client in three runs, where glibc gave 6.61–8.57 (its per-thread arenas fragment after
/// a connection burst); see docs/PERFORMANCE.md.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for a configuration error (EX_CONFIG-style usage error, as sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format, "info");
    let mut file = match &args.config {
        Some(path) => match FileConfig::load(path) {
            Ok(f) => f,
            Err(e) => return config_error(&e),
        },
        None => FileConfig::default(),
    };
    let derived_name = args.name.is_none() && file.name.is_none();
    file.listen = args.listen.or(file.listen);
    file.name = args.name.or(file.name);
    file.redis = args.redis.or(file.redis);
    file.nats = args.nats.or(file.nats);
    file.backbone = args.backbone.or(file.backbone);
    file.signing_key_file = args.signing_key_file.or(file.signing_key_file);
    file.threads = args.threads.or(file.threads);
    file.max_connections = args.max_connections.or(file.max_connections);
    // Before validating: the default max_connections is derived from the raised limit.
    raise_nofile_limit();
    let config = match file.validate() {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
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
    // Always the multi-thread scheduler, even with one worker: with tokio's current-thread
    // scheduler a busy node batched its writes far less and delivered half as much
    // (docs/PERFORMANCE.md, "runtime threads").
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(config.threads).enable_all().build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tether-node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tether-node: cannot listen on {}: {e}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        let local = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("tether-node: listener address: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut config = config;
        // A name derived from the port must use the real one when port 0 was asked for.
        if derived_name && config.listen.port() == 0 {
            config.name = format!("{}{}", config.name.trim_end_matches(":0"), format_args!(":{}", local.port()));
        }
        use tokio::signal::unix::{signal, SignalKind};
        let (term, int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("tether-node: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(term, int, shutdown.clone()));
        // The one machine-readable line: tools that start nodes on port 0 parse it.
        println!("tether-node ready name={} listen={local}", config.name);
        let _ = std::io::stdout().flush();
        match tether_node::run(listener, config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tether-node: {e}");
                ExitCode::FAILURE
            }
        }
    })
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

fn config_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("tether-node: configuration: {e}");
    ExitCode::from(EXIT_CONFIG)
}

/// SIGTERM or Ctrl-C cancels `shutdown` once. The handlers are installed by the caller
/// *before* the ready line is printed, so a SIGTERM right after it is a graceful stop.
async fn signals(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown requested");
    shutdown.cancel();
}
