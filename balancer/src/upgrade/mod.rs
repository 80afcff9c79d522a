//! Zero-downtime upgrade: the running balancer starts the binary at its own path with its own
//! arguments and hands the new process its listening sockets and every plain tunnel — both
//! sockets and the bytes in flight — over a Unix socket (`SCM_RIGHTS`), then exits. Clients
//! see nothing: their TCP connections never close, not a byte is lost or doubled.
//!
//! The old process ([`Process::request`], from `SIGUSR2` or `POST /upgrade`):
//! 1. binds a `SOCK_SEQPACKET` listener in a private directory (0700, under `$XDG_RUNTIME_DIR`
//!    or the temp dir, unique per pid, generation and time) and starts the child with its path
//!    in [`SOCKET_ENV`];
//! 2. sends `hello`: the client and admin listeners, the next generation, the drained nodes;
//! 3. waits for `ready` (the child serves both listeners by then) — all within
//!    `upgrade_timeout_secs`, or the attempt fails, the child is killed and nothing changed;
//! 4. stops accepting, and parks every movable tunnel ([`Tunnels`]): its copy stops with its
//!    [`Flow`](crate::tunnel::Flow) exact, and it offers duplicates of its sockets with that
//!    flow; tunnels still being set up park as soon as they are set up;
//! 5. sends them in batches (at most [`wire::MAX_FDS`] descriptors, [`wire::MAX_BATCH_BLOB`]
//!    bytes in flight), each acknowledged before its tunnels let go of their sockets;
//! 6. sends `done` and retires: keep-alive HTTP requests and unmovable (TLS) tunnels finish
//!    here, for up to `upgrade_drain_secs`, then close 1012 at a frame boundary; exit 0.
//!
//! If the child dies or stalls after `ready`, the old process kills it, resumes accepting, and
//! every tunnel not yet acknowledged copies on from where it stopped. The new process
//! ([`inherit`], then [`adopt`]) counts adopted tunnels like its own: a `max_connections` slot
//! (past the cap if need be: never dropped), the node's active connections, and the node's
//! down and drain signals by name — a node it does not know has its tunnels closed 1012.
//! The format is in [`wire`].

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::conn::ClientConn;
use crate::frames::FrameTracker;
use crate::pool::ActiveGuard;
use crate::tunnel::park::{Offer, TunnelRecord, Tunnels, Verdict};
use crate::tunnel::{self, Flow, Movable, Stops};
use crate::{Error, Shared};

pub(crate) mod wire;

use wire::Message;

/// Environment variable naming the hand-off socket: set by the old process for the new one.
pub const SOCKET_ENV: &str = "TETHER_UPGRADE_SOCKET";

/// How long the old process waits, once nothing is left to collect, before it closes a
/// partial batch: parked tunnels come in quickly, one per tunnel task.
const BATCH_IDLE: Duration = Duration::from_millis(20);

/// How to start the next process: the binary's path as it was at start-up (the file at that
/// path may since have been replaced: that is the point) and the same arguments.
#[derive(Debug, Clone)]
pub struct Launch {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Launch {
    /// This process's binary and arguments. Read at start-up: `/proc/self/exe` of a replaced
    /// file ends in " (deleted)".
    pub fn from_env() -> io::Result<Self> {
        Ok(Self { exe: std::env::current_exe()?, args: std::env::args_os().skip(1).collect() })
    }
}

/// How this process started: fresh, or taking over from the one it replaces.
#[derive(Debug, Default)]
pub struct Start {
    /// `None`: upgrades are refused (an in-process balancer, in tests).
    pub launch: Option<Launch>,
    /// The hand-off socket and what `hello` said, when this process replaces another.
    pub inherit: Option<Inherit>,
}

/// The outcome of the latest upgrade attempt, for `/status`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Attempt {
    pub ok: bool,
    /// RFC 3339, UTC.
    pub at: String,
    pub error: Option<String>,
}

/// This process as `/status` shows it, and its upgrade machinery.
#[derive(Debug)]
pub(crate) struct Process {
    pub pid: u32,
    pub started_at: String,
    /// 1 for a fresh start, +1 per upgrade.
    pub generation: u64,
    launch: Option<Launch>,
    last: Mutex<Option<Attempt>>,
    running: AtomicBool,
    /// Set once a hand-off is complete: the run winds down with `upgrade_drain_secs`.
    retired: AtomicBool,
    /// Cancelled on retirement: stops the accept loops and lets keep-alive requests finish.
    pub retire: CancellationToken,
    /// `false` while a hand-off is under way: the accept loops wait.
    pub accepting: watch::Sender<bool>,
    pub tunnels: Arc<Tunnels>,
    /// Where slots come from for adopted tunnels past `max_connections` (never dropped).
    overflow: Arc<Semaphore>,
}

/// Why `POST /upgrade` cannot start one.
#[derive(Debug)]
pub(crate) enum Refused {
    Unavailable,
    InProgress,
}

impl Process {
    /// `adopting`: this process is taking tunnels over from an older one; it refuses to
    /// upgrade itself until that is over (see [`adopt`]).
    pub fn new(generation: u64, launch: Option<Launch>, adopting: bool) -> Self {
        Self {
            pid: std::process::id(),
            started_at: now_rfc3339(),
            generation,
            launch,
            last: Mutex::new(None),
            running: AtomicBool::new(adopting),
            retired: AtomicBool::new(false),
            retire: CancellationToken::new(),
            accepting: watch::Sender::new(true),
            tunnels: Arc::new(Tunnels::default()),
            overflow: Arc::new(Semaphore::new(0)),
        }
    }

    pub fn last_attempt(&self) -> Option<Attempt> {
        self.last.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Starts an upgrade in the background, unless one is under way or this process cannot.
    pub fn request(shared: &Arc<Shared>) -> Result<(), Refused> {
        let process = &shared.process;
        if process.launch.is_none() {
            return Err(Refused::Unavailable);
        }
        if process.is_retired() || process.running.swap(true, Ordering::AcqRel) {
            return Err(Refused::InProgress);
        }
        let shared = Arc::clone(shared);
        tokio::spawn(async move {
            let result = attempt(&shared).await;
            let process = &shared.process;
            let error = match result {
                Ok(moved) => {
                    info!(tunnels = moved, "upgrade complete: the new process has taken over; retiring");
                    shared.metrics.upgrade(true);
                    None
                }
                Err(e) => {
                    warn!(error = %e, "upgrade failed; this process keeps serving");
                    shared.metrics.upgrade(false);
                    Some(e)
                }
            };
            let ok = error.is_none();
            *process.last.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(Attempt { ok, at: now_rfc3339(), error });
            if ok {
                process.retired.store(true, Ordering::Release);
                process.retire.cancel();
            }
            process.running.store(false, Ordering::Release);
        });
        Ok(())
    }
}

/// Now, as RFC 3339 UTC to the second.
fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

// ---------------------------------------------------------------------------------------------
// The old process

/// A private directory for the hand-off socket, removed with it.
struct RendezvousDir(PathBuf);

impl Drop for RendezvousDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rendezvous_dir(generation: u64) -> io::Result<RendezvousDir> {
    let base = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let dir = base.join(format!("tether-balancer-upgrade-{}-{generation}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(RendezvousDir(dir))
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?)
}

fn unix_addr(path: &Path) -> io::Result<SocketAddrUnix> {
    Ok(SocketAddrUnix::new(path)?)
}

/// One upgrade attempt; the number of tunnels handed over, or why it failed.
async fn attempt(shared: &Arc<Shared>) -> Result<u64, String> {
    let process = &shared.process;
    let launch = process.launch.clone().ok_or("upgrade unavailable")?;
    let timeout = shared.config().upgrade_timeout;
    let deadline = Instant::now() + timeout;
    info!(exe = %launch.exe.display(), generation = process.generation + 1, "upgrade: starting the new process");
    let dir = rendezvous_dir(process.generation).map_err(|e| format!("creating the hand-off directory: {e}"))?;
    let path = dir.0.join("handoff.sock");
    let listener = seqpacket()
        .and_then(|fd| {
            rustix::net::bind(&fd, &unix_addr(&path)?)?;
            rustix::net::listen(&fd, 1)?;
            tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
        })
        .map_err(|e| format!("hand-off socket {}: {e}", path.display()))?;
    let mut child = tokio::process::Command::new(&launch.exe)
        .args(&launch.args)
        .env(SOCKET_ENV, &path)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", launch.exe.display()))?;

    // Until `ready`, a failure changes nothing: kill the child and report.
    let confirmed = async {
        let socket = tokio::select! {
            // A `SOCK_SEQPACKET` connection, in tokio's stream type (see `wire::registered`).
            accepted = listener.accept() => accepted.map_err(|e| format!("hand-off accept: {e}"))?.0,
            status = child.wait() => return Err(exited(status)),
            () = tokio::time::sleep_until(deadline) => {
                return Err(format!("the new process did not connect within {}s", timeout.as_secs()))
            }
        };
        wire::tune(socket.as_fd());
        let (client, admin) = {
            let fds = shared.listener_fds.lock().unwrap_or_else(PoisonError::into_inner);
            let (client, admin) = fds.as_ref().ok_or("the listeners are closed")?;
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("listener descriptor: {e}"));
            (dup(client)?, dup(admin)?)
        };
        let hello = Message::Hello {
            generation: process.generation + 1,
            from_pid: process.pid,
            draining: shared.pool.nodes().iter().filter(|n| n.is_draining()).map(|n| n.name.clone()).collect(),
            client,
            admin,
        };
        wire::send(&socket, &hello, wire::VERSION).await.map_err(|e| format!("sending hello: {e}"))?;
        drop(hello);
        tokio::select! {
            got = wire::recv(&socket) => match got {
                Ok((_, Message::Ready { pid })) => info!(pid, "upgrade: the new process is serving"),
                Ok((_, other)) => return Err(format!("expected ready, got {}", other.name())),
                Err(e) => return Err(format!("waiting for ready: {e}")),
            },
            status = child.wait() => return Err(exited(status)),
            () = tokio::time::sleep_until(deadline) => {
                return Err(format!("the new process did not confirm within {}s", timeout.as_secs()))
            }
        }
        Ok(socket)
    }
    .await;
    let socket = match confirmed {
        Ok(socket) => socket,
        Err(e) => {
            kill(&mut child).await;
            return Err(e);
        }
    };
    drop(listener);

    // Confirmed: stop accepting (the new process does), park, hand over.
    process.accepting.send_replace(false);
    let mut offers = process.tunnels.begin();
    let handed = hand_over(shared, &socket, &mut offers, &mut child).await;
    process.tunnels.end(handed.is_ok());
    // Whatever was offered and not taken copies on here (with a fresh park signal after a
    // failure, so that the next attempt can move it).
    offers.close();
    let resume = if handed.is_ok() { None } else { Some(process.tunnels.park_signal()) };
    while let Ok(offer) = offers.try_recv() {
        let _ = offer.reply.send(Verdict::Resume(resume.clone()));
    }
    match handed {
        Ok(moved) => {
            drop(child);
            Ok(moved)
        }
        Err(e) => {
            kill(&mut child).await;
            process.accepting.send_replace(true);
            Err(e)
        }
    }
}

/// Sends the parked tunnels, batch by batch, each acknowledged; then `done`.
async fn hand_over(
    shared: &Shared,
    socket: &tokio::net::UnixStream,
    offers: &mut mpsc::UnboundedReceiver<Offer>,
    child: &mut tokio::process::Child,
) -> Result<u64, String> {
    let timeout = shared.config().upgrade_timeout;
    // Tunnels still being set up when this passes stay here (and drain with the old process).
    let collect_until = Instant::now() + timeout;
    let tunnels = &shared.process.tunnels;
    let (mut batch, mut blob, mut batches, mut moved) = (Vec::<Offer>::new(), 0usize, 0u64, 0u64);
    loop {
        let next = tokio::time::timeout(BATCH_IDLE, offers.recv()).await;
        let idle = next.is_err();
        if let Ok(Some(offer)) = next {
            let size = offer.record.to_node.len() + offer.record.to_client.len();
            if size > wire::MAX_BATCH_BLOB {
                // Too much in flight for one message: it stays, and drains here.
                let _ = offer.reply.send(Verdict::Resume(None));
                continue;
            }
            if (batch.len() + 1) * 2 > wire::MAX_FDS || blob + size > wire::MAX_BATCH_BLOB {
                moved += send_batch(socket, tunnels, &mut batch, &mut batches, timeout, child).await?;
                blob = 0;
            }
            blob += size;
            batch.push(offer);
        }
        let quiet = tunnels.quiet() && offers.is_empty();
        if !batch.is_empty() && (idle || quiet) {
            moved += send_batch(socket, tunnels, &mut batch, &mut batches, timeout, child).await?;
            blob = 0;
        }
        if (quiet && batch.is_empty()) || Instant::now() >= collect_until {
            break;
        }
    }
    if !batch.is_empty() {
        moved += send_batch(socket, tunnels, &mut batch, &mut batches, timeout, child).await?;
    }
    wire::send(socket, &Message::Done { batches, tunnels: moved }, wire::VERSION)
        .await
        .map_err(|e| format!("sending done: {e}"))?;
    shared.metrics.handed_over.inc_by(moved);
    Ok(moved)
}

/// Sends one batch and waits for its ack; on success each tunnel is told it was taken. On a
/// failure the child is killed first (so that only one process ever copies a tunnel), then
/// the batch's tunnels resume, watching a fresh park signal.
async fn send_batch(
    socket: &tokio::net::UnixStream,
    tunnels: &Tunnels,
    batch: &mut Vec<Offer>,
    batches: &mut u64,
    timeout: Duration,
    child: &mut tokio::process::Child,
) -> Result<u64, String> {
    *batches += 1;
    let number = *batches;
    let (records, replies): (Vec<_>, Vec<_>) = batch.drain(..).map(|o| (o.record, o.reply)).unzip();
    let count = records.len();
    let message = Message::Tunnels { batch: number, tunnels: records };
    let sent = wire::send(socket, &message, wire::VERSION).await;
    // This process's duplicates close now; the tunnels keep their own until taken.
    drop(message);
    let acked = match sent {
        Err(e) => Err(format!("sending batch {number}: {e}")),
        Ok(()) => tokio::select! {
            got = tokio::time::timeout(timeout, wire::recv(socket)) => match got {
                Ok(Ok((_, Message::Ack { batch, adopted }))) if batch == number => Ok(adopted),
                Ok(Ok((_, other))) => Err(format!("expected the ack of batch {number}, got {}", other.name())),
                Ok(Err(e)) => Err(format!("waiting for the ack of batch {number}: {e}")),
                Err(_) => Err(format!("batch {number} not acknowledged within {}s", timeout.as_secs())),
            },
            status = child.wait() => Err(exited(status)),
        },
    };
    match acked {
        Ok(adopted) => {
            if adopted != count {
                warn!(sent = count, adopted, "the new process adopted fewer tunnels than sent");
            }
            for reply in replies {
                let _ = reply.send(Verdict::Taken);
            }
            Ok(count as u64)
        }
        Err(e) => {
            kill(child).await;
            tunnels.end(false);
            let signal = tunnels.park_signal();
            for reply in replies {
                let _ = reply.send(Verdict::Resume(Some(signal.clone())));
            }
            Err(e)
        }
    }
}

fn exited(status: io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => format!("the new process exited ({status}) before taking over"),
        Err(e) => format!("waiting for the new process: {e}"),
    }
}

async fn kill(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

// ---------------------------------------------------------------------------------------------
// The new process

/// The hand-off socket of a process that replaces another, and what its `hello` said.
#[derive(Debug)]
pub struct Inherit {
    socket: tokio::net::UnixStream,
    /// The hand-off format version the old process spoke: every answer goes in it.
    version: u16,
    pub generation: u64,
    pub from_pid: u32,
    pub draining: Vec<String>,
}

/// When [`SOCKET_ENV`] is set: connects to the old process and takes the listeners it sends.
/// Must run within a Tokio runtime.
pub async fn inherit(path: &Path) -> Result<(Inherit, tokio::net::TcpListener, tokio::net::TcpListener), Error> {
    let fail = |step: &'static str| move |source: io::Error| Error::Handoff { step, source };
    let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
        .map_err(io::Error::from)
        .map_err(fail("socket"))?;
    rustix::net::connect(&fd, &unix_addr(path).map_err(fail("socket path"))?)
        .map_err(io::Error::from)
        .map_err(fail("connect"))?;
    rustix::io::ioctl_fionbio(&fd, true).map_err(io::Error::from).map_err(fail("connect"))?;
    wire::tune(fd.as_fd());
    let socket = wire::registered(fd).map_err(fail("connect"))?;
    // Answered in the version it came in: the old process may be an older release.
    let (version, hello) = tokio::time::timeout(Duration::from_secs(30), wire::recv(&socket))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no hello"))
        .and_then(|r| r)
        .map_err(fail("hello"))?;
    let Message::Hello { generation, from_pid, draining, client, admin } = hello else {
        return Err(Error::Handoff {
            step: "hello",
            source: io::Error::new(io::ErrorKind::InvalidData, format!("expected hello, got {}", hello.name())),
        });
    };
    let listener = |fd: OwnedFd| {
        let std = std::net::TcpListener::from(fd);
        std.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std)
    };
    let client = listener(client).map_err(fail("listeners"))?;
    let admin = listener(admin).map_err(fail("listeners"))?;
    Ok((Inherit { socket, version, generation, from_pid, draining }, client, admin))
}

/// Confirms to the old process, then adopts its tunnels batch by batch until `done`. Runs in
/// the background of the new process's [`crate::run`].
pub(crate) async fn adopt(shared: Arc<Shared>, inherit: Inherit) {
    let Inherit { socket, version, from_pid, .. } = inherit;
    let result = async {
        wire::send(&socket, &Message::Ready { pid: shared.process.pid }, version).await?;
        let mut total = 0u64;
        loop {
            match wire::recv(&socket).await?.1 {
                Message::Tunnels { batch, tunnels } => {
                    let count = tunnels.len();
                    for record in tunnels {
                        adopt_one(&shared, record);
                    }
                    total += count as u64;
                    shared.metrics.adopted.inc_by(count as u64);
                    wire::send(&socket, &Message::Ack { batch, adopted: count }, version).await?;
                }
                Message::Done { .. } => return Ok::<_, io::Error>(total),
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected {} message", other.name()),
                    ))
                }
            }
        }
    }
    .await;
    match result {
        Ok(total) => {
            info!(tunnels = total, from_pid, generation = shared.process.generation, "upgrade: took over");
            notify_ready(true);
        }
        // The old process resumes whatever was not acknowledged (and kills this one if it
        // still can); the tunnels adopted so far are served here.
        Err(e) => warn!(error = %e, from_pid, "upgrade: the hand-off broke off"),
    }
    // Only now may this process be upgraded in turn.
    shared.process.running.store(false, Ordering::Release);
}

/// Tells systemd (when `NOTIFY_SOCKET` is set) that this process is ready; after a takeover,
/// that it is the service's main process now.
pub(crate) fn notify_ready(took_over: bool) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let pid = std::process::id();
    let sent = if took_over {
        sd_notify::notify(&[sd_notify::NotifyState::MainPid(pid), sd_notify::NotifyState::Ready])
    } else {
        sd_notify::notify(&[sd_notify::NotifyState::Ready])
    };
    if let Err(e) = sent {
        warn!(error = %e, "sd_notify failed");
    }
}

/// Starts one handed-over tunnel in this process.
fn adopt_one(shared: &Arc<Shared>, record: TunnelRecord) {
    let stream = |fd: OwnedFd| {
        let std = std::net::TcpStream::from(fd);
        std.set_nonblocking(true)?;
        TcpStream::from_std(std)
    };
    let (client, node) = match (stream(record.client), stream(record.node)) {
        (Ok(client), Ok(node)) => (client, node),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, client = %record.client_id, "an adopted tunnel's socket is unusable; closed");
            return;
        }
    };
    let Some(frames) = FrameTracker::from_state(record.frames) else {
        warn!(client = %record.client_id, "an adopted tunnel's frame state is inconsistent; closed");
        return;
    };
    // Counted like any tunnel; past the cap it is kept all the same.
    let permit = match Arc::clone(&shared.client_slots).try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            shared.process.overflow.add_permits(1);
            match Arc::clone(&shared.process.overflow).try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => return,
            }
        }
    };
    // The per-IP table counts it (without a check: it was admitted by the old process).
    let limits = crate::per_ip::Limits::from_config(&shared.config());
    let per_ip = limits.any().then(|| shared.per_ip.hold(record.peer.ip(), limits));
    let socket_peer = client.peer_addr().unwrap_or(record.peer);
    let conn = Arc::new(ClientConn { peer: record.peer, socket_peer, tls: false, _permit: permit, _per_ip: per_ip });
    let hard_stop = shared.hard_stop.clone();
    let (guard, stops) = match shared.pool.by_name(&record.node_name) {
        Some(node) => {
            let drain = node.drain_signal();
            if node.is_draining() {
                drain.cancel();
            }
            (Some(Arc::new(ActiveGuard::new(&node))), Stops::new(node.down_signal(), drain, hard_stop))
        }
        None => {
            // No longer in the config: closed 1012 at the next frame boundary.
            let drain = CancellationToken::new();
            drain.cancel();
            (None, Stops::new(CancellationToken::new(), drain, hard_stop))
        }
    };
    let flow = Flow { to_node: record.to_node, to_client: record.to_client, frames };
    let span =
        tracing::debug_span!("tunnel", peer = %record.peer, client = %record.client_id, node = %record.node_name);
    let movable = Movable {
        tunnels: Arc::clone(&shared.process.tunnels),
        client_id: record.client_id.into(),
        node: record.node_name.into(),
    };
    shared.tracker.spawn(
        tunnel::serve(client, node, flow, record.websocket, stops, guard, conn, Some(movable), None).instrument(span),
    );
}
