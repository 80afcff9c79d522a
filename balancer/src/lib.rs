//! `tether-balancer`: the front door of a Tether cluster. It pins each client to a node by
//! rendezvous-hashing its client id, proxies the WebSocket (and plain HTTP) to that node,
//! health-checks the nodes, and when a node dies sends that node's clients — and only those —
//! to the next node in each client's rank.
//!
//! Layout, in the order a connection meets it:
//! - [`config`]: the TOML file, flag overrides, validation into [`Config`];
//! - `reload`: SIGHUP — a freshly loaded [`Config`] swapped in for new connections, the
//!   settings that need a restart kept as they are, the outcome shown in `/status`;
//! - `server`: accept loops for the client and admin listeners, connection cap (503 with
//!   `Retry-After` past it), back-off when descriptors run out, then per client connection:
//!   PROXY header → per-IP check → TLS handshake → hyper, and graceful shutdown of each
//!   connection;
//! - `proxy_protocol`: the PROXY protocol header (v1/v2) naming the real client, read to its
//!   last byte and no further;
//! - `per_ip`: the per-source-address connection cap and connect-rate bucket (429 past them),
//!   in a table bounded under many addresses;
//! - `tls`: the listener's rustls config from the `[tls]` PEM files, the handshake each
//!   connection makes before hyper sees it, and the plain-or-TLS client stream;
//! - `proxy`: per request — client id (query, header, cookie; minted when absent; checked
//!   against the `signing_key` when one is set), node choice with failover along the
//!   client's rank, forwarding with `X-Client-Id`, `X-Forwarded-For`, `X-Real-IP` and
//!   `X-Forwarded-Proto`;
//! - `api`: `/api/` requests (the nodes' server API): no client id, any usable node round
//!   robin, the buffered body sent again to the next node on a refused connect, a 503 or a
//!   failed exchange;
//! - `tunnel`: the upgraded byte tunnel, torn down as a whole when either side ends or its node
//!   goes down, and closed with 1012 at a frame boundary when its node is drained (its byte
//!   pump, its frame-aware drain, its lingering close and where it parks for an upgrade are
//!   submodules);
//! - `quiet`: how a tunnel waits for its stop signals without polling them per message;
//! - `frames`: the WebSocket frame-boundary tracker the tunnel uses for that, and the close
//!   frame it injects;
//! - `pool`: node states (`up|unready|down|draining`), the routing choice, the state machine;
//! - `balance`: the choice policy the pool applies (plain HRW, or HRW within a load bound);
//! - `rebalance`: the paced return of clients to a node that comes back (one dispatcher
//!   task granting moves at `rebalance_per_sec`; the tunnels move themselves);
//! - `health`: the `GET /readyz` probes that drive that state machine;
//! - `discovery`: following the node registry (`--discover`): nodes join and leave the pool;
//! - `admin`: `/status`, `/route`, `/metrics`, drain/undrain, the HTML page;
//! - `metrics`: every Prometheus metric name, in one place;
//! - [`Error`]: what went wrong and whose fault it was;
//! - [`cli`]: the binary's flags and start-up (config, logging of limits, runtime, signals);
//! - `upgrade`: the zero-downtime upgrade — listeners and plain tunnels handed to a new
//!   process over a Unix socket (its `wire` submodule is the versioned hand-off format).
//!
//! Shared by several of those (so that none of them imports another back): `conn`, what each
//! request of one client connection shares; `response`, the answers the balancer writes
//! itself (plain text, the 503s).
//!
//! [`run`] takes already-bound listeners, so tests (and [`cli::serve`], through [`bind_listener`])
//! choose the ports.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

mod admin;
mod api;
pub mod balance;
pub mod cli;
pub mod config;
mod conn;
mod discovery;
mod error;
mod frames;
mod health;
pub mod metrics;
mod per_ip;
mod pool;
mod proxy;
mod proxy_protocol;
mod quiet;
pub mod rebalance;
pub mod reload;
mod response;
mod server;
mod tls;
mod tunnel;
mod upgrade;

pub use config::{Config, FileConfig, FileNode, FileTls, NodeConfig, Overrides};
pub use error::Error;
pub use server::bind_listener;
pub use upgrade::{Inherit, Launch, Start};

/// State shared by every task of one [`run`].
#[derive(Debug)]
pub(crate) struct Shared {
    /// The config in force, read through [`Shared::config`]. A reload swaps it whole; the
    /// settings that need a restart are carried over from the running one (see [`reload`]),
    /// so every field of it always says what is actually in force.
    config: ArcSwap<Config>,
    /// How the latest reload went (`/status`); `None` before the first.
    reload: Mutex<Option<reload::Outcome>>,
    pool: pool::Pool,
    metrics: metrics::Metrics,
    /// One permit per open client connection (tunnels included), `max_connections` in all.
    client_slots: Arc<tokio::sync::Semaphore>,
    /// Every client connection, admin connection, upstream connection and tunnel, so that
    /// shutdown can wait for them.
    tracker: TaskTracker,
    /// Fired when the shutdown grace is over: whatever still runs is cut.
    hard_stop: CancellationToken,
    /// Turns of the server API's round robin over nodes (see [`api`]).
    api_turn: std::sync::atomic::AtomicUsize,
    /// Open connections and connect buckets per source address (see [`per_ip`]); its limits
    /// are read from `config` at each check.
    per_ip: Arc<per_ip::PerIp>,
    /// Pid, start time, generation, and the upgrade machinery (see [`upgrade`]).
    process: upgrade::Process,
    /// The paced rebalance's token, the nodes it moves clients to, its dispatcher's queue.
    rebalancer: rebalance::Rebalancer,
    /// Duplicates of the client and admin listeners' descriptors, for an upgrade's hand-off;
    /// let go with the listeners (a duplicate would keep the port open after shutdown).
    listener_fds: std::sync::Mutex<Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>>,
}

impl Shared {
    /// The live config: a snapshot, cheap to take (no lock), to be dropped soon (not held
    /// across an `.await`: a reload would otherwise keep the old one alive).
    pub(crate) fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// How the latest reload went, if one was tried.
    pub(crate) fn reload_outcome(&self) -> Option<reload::Outcome> {
        // A panic while holding this lock leaves a plain value behind: still readable.
        self.reload.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// Runs the balancer on two bound listeners until `shutdown` fires, then stops accepting,
/// lets open connections and tunnels finish for up to `config.grace_period`, cuts the rest,
/// and returns. No reloads and no upgrades: see [`run_with`].
pub async fn run(
    listener: TcpListener,
    admin: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (_, none) = tokio::sync::mpsc::channel(1);
    run_with(listener, admin, config, shutdown, Start::default(), none).await
}

/// [`run`], started fresh or taking over from an older process (`start.inherit`), able to
/// upgrade itself when `start.launch` says how (`SIGUSR2`, `POST /upgrade`), and taking new
/// configs from `reloads` while it runs (each one freshly loaded the way the first was, or the
/// error that loading it gave: see [`reload`]). After a successful upgrade it also returns:
/// once keep-alive requests and unmovable tunnels are over, or `upgrade_drain_secs` have
/// passed (those tunnels then close 1012 at a frame boundary).
pub async fn run_with(
    listener: TcpListener,
    admin: TcpListener,
    config: Config,
    shutdown: CancellationToken,
    start: Start,
    mut reloads: reload::Reloads,
) -> Result<(), Error> {
    use std::os::fd::AsFd;
    let listen_addr = listener.local_addr().map_err(Error::Listener)?;
    let admin_addr = admin.local_addr().map_err(Error::Listener)?;
    let listener_fds = (
        listener.as_fd().try_clone_to_owned().map_err(Error::Listener)?,
        admin.as_fd().try_clone_to_owned().map_err(Error::Listener)?,
    );
    let metrics = metrics::Metrics::new();
    let pool = pool::Pool::new(&config.nodes, &metrics);
    metrics.max_connections.set(i64::try_from(config.max_connections).unwrap_or(i64::MAX));
    let client_slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let per_ip =
        Arc::new(per_ip::PerIp::new(per_ip::table_cap(config.max_connections), metrics.per_ip_entries.clone()));
    let generation = start.inherit.as_ref().map_or(1, |i| i.generation);
    if let Some(inherit) = &start.inherit {
        // Drained by an operator in the old process: drained here too.
        for name in &inherit.draining {
            if let Some(node) = pool.by_name(name) {
                node.set_draining(true);
            }
        }
    }
    let upgradable = start.launch.is_some();
    let shared = Arc::new(Shared {
        config: ArcSwap::from_pointee(config),
        reload: Mutex::new(None),
        pool,
        metrics,
        client_slots,
        tracker: TaskTracker::new(),
        hard_stop: CancellationToken::new(),
        api_turn: std::sync::atomic::AtomicUsize::new(0),
        per_ip,
        process: upgrade::Process::new(generation, start.launch, start.inherit.is_some()),
        rebalancer: rebalance::Rebalancer::default(),
        listener_fds: std::sync::Mutex::new(Some(listener_fds)),
    });

    let health_stop = CancellationToken::new();
    let mut checks = JoinSet::new();
    for index in 0..shared.pool.slots() {
        checks.spawn(health::check_loop(Arc::clone(&shared), index, health_stop.clone()));
    }
    checks.spawn(rebalance::dispatch(Arc::clone(&shared), health_stop.clone()));
    if let Some(discover) = shared.config().discover.clone() {
        // One read before serving (bounded by its timeout): the first clients, and tunnels
        // inherited from an older process, find the discovered nodes already there.
        info!(registry = %discover.source, prefix = %discover.prefix, "following the node registry");
        let mut follower = discovery::Follower::new(Arc::clone(&shared), discover, health_stop.clone());
        follower.round().await;
        checks.spawn(follower.run());
    }
    info!(addr = %listen_addr, nodes = shared.pool.nodes().len(), generation, "proxy listening");
    info!(addr = %admin_addr, "admin listening");
    if let Some(inherit) = start.inherit {
        tokio::spawn(upgrade::adopt(Arc::clone(&shared), inherit));
    }
    let signals = upgradable.then(|| tokio::spawn(on_sigusr2(Arc::clone(&shared))));

    // Stops accepting on shutdown, or once an upgrade has handed everything over.
    let stop = shutdown.child_token();
    {
        let (stop, retire) = (stop.clone(), shared.process.retire.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = retire.cancelled() => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        });
    }
    let reloading = {
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    loaded = reloads.recv() => match loaded {
                        Some(loaded) => reload::apply(&shared, loaded),
                        // Nobody sends reloads: nothing more to do until shutdown.
                        None => return,
                    },
                }
            }
        }
    };
    tokio::join!(
        server::serve_proxy(Arc::clone(&shared), listener, stop.clone()),
        server::serve_admin(Arc::clone(&shared), admin, stop.clone()),
        reloading,
    );
    if let Some(signals) = signals {
        signals.abort();
    }
    // The listeners are closed: so must be their duplicates (the port closes with them).
    drop(shared.listener_fds.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());

    // Both listeners are closed now. Probes go on during the grace period, so tunnels to a
    // node that dies meanwhile are still closed.
    shared.tracker.close();
    if shared.process.is_retired() && !shutdown.is_cancelled() {
        retire(&shared, &shutdown).await;
    } else {
        let grace = shared.config().grace_period;
        info!(
            open = shared.tracker.len(),
            grace_ms = grace.as_millis() as u64,
            "shutting down: waiting for open connections"
        );
        if tokio::time::timeout(grace, shared.tracker.wait()).await.is_ok() {
            info!("drained cleanly");
        } else {
            warn!(remaining = shared.tracker.len(), "grace period over; closing the remaining connections");
            shared.hard_stop.cancel();
            shared.tracker.wait().await;
        }
    }
    health_stop.cancel();
    checks.shutdown().await;
    Ok(())
}

/// The old process's end after a successful upgrade: what could not move (keep-alive HTTP
/// requests, TLS tunnels, tunnels that were draining or in their lingering close) finishes here
/// for up to `upgrade_drain_secs`; then every node is drained in this process (it routes no
/// one any more), so the remaining WebSockets close 1012 at a frame boundary, and what is left
/// after that is cut.
async fn retire(shared: &Shared, shutdown: &CancellationToken) {
    let drain = shared.config().upgrade_drain;
    info!(open = shared.tracker.len(), drain_secs = drain.as_secs(), "retiring: waiting for what stays here");
    let waited = tokio::select! {
        r = tokio::time::timeout(drain, shared.tracker.wait()) => r.is_ok(),
        // A SIGTERM meanwhile: the usual grace, no more.
        _ = shutdown.cancelled() => tokio::time::timeout(shared.config().grace_period, shared.tracker.wait()).await.is_ok(),
    };
    if waited {
        info!("retired cleanly");
        return;
    }
    for node in shared.pool.nodes() {
        node.set_draining(true);
    }
    let last = tunnel::DRAIN_FRAME_DEADLINE + tunnel::CLOSE_LINGER;
    if tokio::time::timeout(last, shared.tracker.wait()).await.is_err() {
        warn!(remaining = shared.tracker.len(), "upgrade drain over; closing the remaining connections");
        shared.hard_stop.cancel();
        shared.tracker.wait().await;
    }
}

/// Starts an upgrade on every `SIGUSR2`.
async fn on_sigusr2(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr2 = match signal(SignalKind::user_defined2()) {
        Ok(usr2) => usr2,
        Err(e) => {
            warn!(error = %e, "cannot install the SIGUSR2 handler: upgrades only through POST /upgrade");
            return;
        }
    };
    while usr2.recv().await.is_some() {
        info!(signal = "SIGUSR2", "upgrade requested");
        if let Err(e) = upgrade::Process::request(&shared) {
            warn!(reason = ?e, "upgrade not started");
        }
    }
}
