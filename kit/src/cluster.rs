//! Local Tether clusters as child processes: a private `redis-server`, `tether-node`s and a
//! `tether-balancer`, each started on a free port and **killed when its handle is dropped**.
//!
//! This is what `tether up`, the benchmarks, `tether chaos` and the workspace's end-to-end
//! tests stand on, so that every one of them starts, watches and stops processes the same way:
//!
//! * [`bin_path`] finds the workspace binaries (`TETHER_BIN_DIR`, next to the running
//!   executable, then `PATH`);
//! * [`RedisServer`] runs a throw-away `redis-server` on a free port (never 6379), its files
//!   in a temporary directory; without persistence, or with an fsync'ed append-only file so
//!   that a killed and restarted Redis comes back with every acknowledged write;
//! * [`NodeProcess`] and [`BalancerProcess`] spawn the binaries with `--listen 127.0.0.1:0`,
//!   wait for their single `… ready …` stdout line and learn the bound addresses from it;
//! * [`Cluster`] wires all of them together: `node-1..node-N` behind one balancer.
//!
//! Every child runs in its own process group, so a Ctrl-C typed at a terminal reaches only the
//! parent, which then stops the children in order (see [`Cluster::shutdown`]). On Linux every
//! child also gets `SIGKILL` when its parent dies (`PR_SET_PDEATHSIG`), so a crashed or
//! killed test run does not leave `redis-server`s behind. Linux ties that signal to the
//! *thread* that spawned the child: spawn from a thread that outlives the handle (a tokio
//! worker, the test's own thread), not from a short-lived one — a cluster shared between
//! tests must be started on a thread that lives as long as the sharing does.
//!
//! The ready-line contract (stdout, exactly one line, logs go to stderr):
//!
//! ```text
//! tether-node ready name=node-1 listen=127.0.0.1:40123
//! tether-balancer ready listen=127.0.0.1:8080 admin=127.0.0.1:9100
//! ```

use anyhow::{anyhow, bail, Context, Result};
use futures_util::future::{select_all, try_join_all};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::fmt;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, timeout_at, Instant};

/// Environment variable naming the directory that holds `tether-node` and `tether-balancer`.
pub const BIN_DIR_ENV: &str = "TETHER_BIN_DIR";
/// File name of the node binary.
pub const NODE_BIN: &str = "tether-node";
/// File name of the balancer binary.
pub const BALANCER_BIN: &str = "tether-balancer";
/// How long a node or balancer may take to print its ready line.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `redis-server` or `nats-server` may take to answer.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default grace period of [`Cluster::shutdown`] between `SIGTERM` and `SIGKILL`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// Fresh ports tried when `redis-server` or `nats-server` exits at once (another process took the port between
/// our probe and its bind).
const SERVER_PORT_ATTEMPTS: usize = 5;
/// How often readiness probes (Redis `PING`, exit polls in `Drop`) run.
const POLL_EVERY: Duration = Duration::from_millis(20);
/// The port a developer's own Redis listens on: never ours to use.
const SHARED_REDIS_PORT: u16 = 6379;
/// The port the machine's own NATS listens on: never ours to use.
const SHARED_NATS_PORT: u16 = 4222;

/// Finds a workspace binary such as [`NODE_BIN`].
///
/// Looks in `$TETHER_BIN_DIR` if it is set (and nowhere else, so a wrong setting is not
/// silently papered over); otherwise next to the running executable and in its parent
/// directory (integration-test binaries live in `target/debug/deps`, the workspace binaries in
/// `target/debug`); then on `PATH`.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    bin_path_in(name, std::env::var_os(BIN_DIR_ENV))
}

fn bin_path_in(name: &str, bin_dir: Option<std::ffi::OsString>) -> Result<PathBuf> {
    const HINT: &str = "build them with `cargo build --bins`";
    if let Some(dir) = bin_dir {
        let candidate = Path::new(&dir).join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        bail!("{name} not found: {} does not exist ({BIN_DIR_ENV} is set); {HINT}", candidate.display());
    }
    let mut searched = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        let dir = exe.parent();
        for dir in [dir, dir.and_then(Path::parent)].into_iter().flatten() {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
            searched.push(dir.display().to_string());
        }
    }
    if let Some(found) = find_on_path(name) {
        return Ok(found);
    }
    searched.push("$PATH".to_owned());
    bail!("{name} not found (searched {}); {HINT}", searched.join(", "))
}

/// The first `name` in a directory of `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
}

/// Where a child's log output (stderr; Redis' log file) goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LogTarget {
    /// The parent's stderr: handy at a terminal and in a failing test's output.
    #[default]
    Inherit,
    /// Discarded.
    Null,
    /// Appended to this file (created if missing), so a restarted process keeps one log.
    File(PathBuf),
}

impl LogTarget {
    pub fn stdio(&self) -> Result<Stdio> {
        Ok(match self {
            Self::Inherit => Stdio::inherit(),
            Self::Null => Stdio::null(),
            Self::File(path) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log file {}", path.display()))?
                .into(),
        })
    }

    /// " (log: FILE)" for error messages, when there is a file to look at.
    pub fn hint(&self) -> String {
        match self {
            Self::File(path) => format!(" (log: {})", path.display()),
            _ => String::new(),
        }
    }
}

/// How a node or balancer is spawned.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// Where its stderr (its tracing log) goes.
    pub stderr: LogTarget,
    /// How long it may take to print its ready line before it is killed and reported.
    pub ready_timeout: Duration,
    /// `RLIMIT_NOFILE` (soft, hard) set for the child before it starts; `None` inherits ours.
    pub nofile: Option<(u64, u64)>,
}

impl Default for SpawnOptions {
    fn default() -> Self {
        Self { stderr: LogTarget::Inherit, ready_timeout: DEFAULT_READY_TIMEOUT, nofile: None }
    }
}

/// A child process we own. Dropping it kills and reaps the process.
#[derive(Debug)]
struct Owned {
    /// Names the process in messages: `redis`, `node-1`, `balancer`.
    label: String,
    child: Child,
    /// Kept apart from `child` because tokio forgets the id once the child is reaped, and
    /// reports want it afterwards.
    pid: u32,
    /// Set once the exit has been observed (and the process reaped): after that the pid may
    /// belong to someone else and must never be signalled.
    status: Option<ExitStatus>,
    /// Whether [`Cluster::next_exit`] may still report this exit: false once reported, or
    /// when the exit was our own doing (`kill`, `wait_exit`), which the caller already knows.
    unreported: bool,
    /// Keeps reading stdout after the ready line, so that the child never blocks on a full pipe.
    stdout_drain: Option<JoinHandle<()>>,
}

impl Owned {
    /// Spawns `cmd` in its own process group, with `SIGKILL` on the parent thread's death.
    fn spawn(label: &str, mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null()).process_group(0);
        set_parent_death_signal(&mut cmd);
        let program = cmd.as_std().get_program().to_string_lossy().into_owned();
        let child = cmd.spawn().with_context(|| format!("{label}: spawning {program}"))?;
        let pid = child.id().ok_or_else(|| anyhow!("{label}: {program} exited before its pid was known"))?;
        Ok(Self { label: label.to_owned(), child, pid, status: None, unreported: true, stdout_drain: None })
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().with_context(|| format!("{}: polling for exit", self.label))?;
        }
        Ok(self.status)
    }

    /// Sends `sig` unless the process has already been reaped.
    fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        // The child is not reaped yet (a zombie at worst), so the pid is still ours.
        let pid = i32::try_from(self.pid).context("pid out of range")?;
        match signal::kill(Pid::from_raw(pid), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(anyhow!("{}: sending {sig} to pid {}: {e}", self.label, self.pid)),
        }
    }

    /// Waits for the exit. Cancel-safe: dropping the future leaves the process untouched.
    async fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = self.child.wait().await.with_context(|| format!("{}: waiting for exit", self.label))?;
        self.status = Some(status);
        Ok(status)
    }

    async fn wait_exit(&mut self, within: Duration) -> Result<Option<ExitStatus>> {
        match timeout(within, self.wait()).await {
            Ok(status) => {
                self.unreported = false;
                status.map(Some)
            }
            Err(_) => Ok(None),
        }
    }

    /// `SIGKILL`, then reaps. The caller caused the exit, so `next_exit` does not report it.
    async fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        let status = self.wait().await;
        self.unreported = false;
        status
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(task) = self.stdout_drain.take() {
            task.abort();
        }
        if self.status.is_some() {
            return;
        }
        let _ = self.child.start_kill();
        // Reap synchronously (SIGKILL takes effect within milliseconds) so that "dropped"
        // means "gone" for whoever checks right after; give up after two seconds rather than
        // hang a Drop on a process stuck in the kernel.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        tracing::warn!(process = %self.label, pid = self.pid, "child did not die within 2 s of SIGKILL");
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before `exec`; it only calls `prctl`, which
    // is async-signal-safe, and touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_cmd: &mut Command) {}

/// Gives the child the open-file limit `nofile` (soft, hard), if set.
#[allow(unsafe_code)]
fn set_nofile(cmd: &mut Command, nofile: Option<(u64, u64)>) {
    let Some((soft, hard)) = nofile else { return };
    // SAFETY: the closure runs in the forked child before `exec`; `setrlimit` is
    // async-signal-safe, the closure captures two integers and allocates nothing.
    unsafe {
        cmd.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard));
    }
}

/// Polls `GET /readyz` until it answers 200, or fails at `deadline`.
async fn wait_node_ready(name: &str, addr: SocketAddr, deadline: Instant) -> Result<()> {
    loop {
        if readyz_ok(addr).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{name} ({addr}) did not become ready (is its Redis reachable?)");
        }
        sleep(Duration::from_millis(20)).await;
    }
}

async fn readyz_ok(addr: SocketAddr) -> bool {
    let probe = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: tether\r\n\r\n").await.ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.ok()?;
        Some(head.ends_with(b" 200"))
    };
    matches!(timeout(Duration::from_secs(1), probe).await, Ok(Some(true)))
}

/// The `key=value` fields of a `PROGRAM ready k=v …` stdout line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    fields: Vec<(String, String)>,
}

impl ReadyLine {
    /// Parses `line` if it is `program`'s ready line.
    pub fn parse(line: &str, program: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        if words.next()? != program || words.next()? != "ready" {
            return None;
        }
        let fields = words.filter_map(|w| w.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        Some(Self { fields })
    }

    /// The value of field `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Field `key` as a socket address.
    pub fn addr(&self, key: &str) -> Result<SocketAddr> {
        let raw = self.get(key).ok_or_else(|| anyhow!("ready line has no `{key}=` field"))?;
        raw.parse().with_context(|| format!("ready line field {key}={raw} is not an IP:PORT address"))
    }
}

/// Reads `proc`'s stdout until `program`'s ready line; then keeps draining stdout in a task.
/// On a timeout or an early exit the process is killed and the error says what happened.
async fn await_ready(
    proc: &mut Owned,
    stdout: ChildStdout,
    program: &str,
    within: Duration,
    log: &LogTarget,
) -> Result<ReadyLine> {
    let mut lines = BufReader::new(stdout).lines();
    let mut other = Vec::new();
    let found = timeout(within, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(ready) = ReadyLine::parse(&line, program) {
                return Ok(Some(ready));
            }
            other.push(line);
        }
        Ok::<_, std::io::Error>(None)
    })
    .await;
    let label = proc.label.clone();
    let hint = log.hint();
    let seen = if other.is_empty() { String::new() } else { format!("; its stdout said: {:?}", other.join(" | ")) };
    match found {
        Ok(Ok(Some(ready))) => {
            proc.stdout_drain = Some(tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!(process = %label, %line, "stdout");
                }
            }));
            Ok(ready)
        }
        Ok(Ok(None)) => {
            // Stdout closed: the process is exiting (or closed stdout, which breaks the contract).
            let status = match proc.wait_exit(Duration::from_secs(2)).await? {
                Some(status) => status.to_string(),
                None => {
                    proc.kill().await?;
                    "closed stdout but kept running; killed".to_owned()
                }
            };
            bail!("{label} ({program}) exited before it was ready: {status}{seen}{hint}")
        }
        Ok(Err(e)) => {
            proc.kill().await?;
            Err(anyhow!(e)).context(format!("{label}: reading stdout{hint}"))
        }
        Err(_) => {
            let status = proc.kill().await?;
            bail!("{label} ({program}) printed no ready line within {within:?}; killed it ({status}){seen}{hint}")
        }
    }
}

/// Whether `args` sets `--flag` (as `--flag VALUE` or `--flag=VALUE`).
fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| a == flag || a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
}

/// `args` without `--flag VALUE` / `--flag=VALUE`.
fn without_flag(args: &[String], flag: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        if a == flag {
            iter.next();
        } else if !a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')) {
            out.push(a.clone());
        }
    }
    out
}

/// A port that was free a moment ago. Racy by nature: callers retry when the bind fails.
fn free_port() -> Result<u16> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a port")?;
    Ok(probe.local_addr()?.port())
}

/// Whether a [`RedisServer`] keeps its data across a restart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing is written to disk: a restart starts empty (`--save "" --appendonly no`).
    #[default]
    None,
    /// Every write is appended and fsync'ed before Redis answers it (`--appendonly yes
    /// --appendfsync always`), so a `SIGKILL` loses nothing that was acknowledged and
    /// [`RedisServer::restart`] comes back with all of it (room logs, counters, sessions).
    AppendOnly,
}

/// A private `redis-server` on a free port, files in a temporary directory, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    // Declared before `dir`: fields drop in order, so the process dies before its
    // directory is removed.
    proc: Option<Owned>,
    port: u16,
    program: PathBuf,
    logfile: PathBuf,
    /// Kept for restarts, which must reload what the first process wrote.
    persistence: Persistence,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one, logging into its temporary directory.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// Starts one without persistence; Redis' log goes to `logfile` (appended), or into its
    /// temporary directory.
    pub async fn start_with(logfile: Option<PathBuf>) -> Result<Self> {
        Self::start_opts(logfile, Persistence::None).await
    }

    /// Starts one with the given persistence; the log as for [`RedisServer::start_with`].
    pub async fn start_opts(logfile: Option<PathBuf>, persistence: Persistence) -> Result<Self> {
        let program = find_on_path("redis-server").ok_or_else(|| {
            anyhow!(
                "redis-server not found on PATH; install it with `scripts/deps.sh` \
                 or `apt-get install redis-server`"
            )
        })?;
        let dir = tempfile::Builder::new()
            .prefix("tether-redis-")
            .tempdir()
            .context("creating a directory for redis-server")?;
        let logfile = logfile.unwrap_or_else(|| dir.path().join("redis.log"));
        let (proc, port) = on_a_free_port("redis-server", SHARED_REDIS_PORT, |port| {
            spawn_redis(&program, port, dir.path(), &logfile, persistence)
        })
        .await?;
        Ok(Self { proc: Some(proc), port, program, logfile, persistence, dir })
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().filter(|p| p.status.is_none()).map(|p| p.pid)
    }

    /// Where its log goes.
    pub fn logfile(&self) -> &Path {
        &self.logfile
    }

    /// `SIGKILL`s it and waits until it is gone (no-op if it is not running).
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(proc) = self.proc.as_mut() {
            proc.kill().await?;
        }
        Ok(())
    }

    /// Whether it keeps its data across [`RedisServer::restart`].
    pub fn persistence(&self) -> Persistence {
        self.persistence
    }

    /// Sends `SIGTERM` (without persistence Redis exits at once: nothing to save).
    pub fn terminate(&mut self) -> Result<()> {
        match self.proc.as_mut() {
            Some(proc) => proc.signal(Signal::SIGTERM),
            None => Ok(()),
        }
    }

    /// Waits up to `within` for it to exit; `None` if it still runs.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<Option<ExitStatus>> {
        match self.proc.as_mut() {
            Some(proc) => proc.wait_exit(within).await,
            None => Ok(None),
        }
    }

    /// Starts it again on the same port (killing the running one first): empty, or with
    /// everything it had acknowledged under [`Persistence::AppendOnly`]. Fails if another
    /// process took the port meanwhile.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.proc = None;
        let proc = spawn_redis(&self.program, self.port, self.dir.path(), &self.logfile, self.persistence)
            .await
            .map_err(|(StartError::ExitedEarly(e) | StartError::Fatal(e))| {
                e.context(format!("restarting redis-server on port {}", self.port))
            })?;
        self.proc = Some(proc);
        Ok(())
    }

    fn owned_mut(&mut self) -> Option<&mut Owned> {
        self.proc.as_mut()
    }
}

/// Runs `redis-server` on `port` and waits until it answers (which, with an append-only
/// file, is after the file was loaded).
async fn spawn_redis(
    program: &Path,
    port: u16,
    dir: &Path,
    logfile: &Path,
    persistence: Persistence,
) -> Result<Owned, StartError> {
    let mut cmd = Command::new(program);
    cmd.arg("--port").arg(port.to_string()).args(["--bind", "127.0.0.1", "--save", ""]);
    match persistence {
        Persistence::None => cmd.args(["--appendonly", "no"]),
        Persistence::AppendOnly => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
    };
    cmd.args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(logfile)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let proc = Owned::spawn("redis", cmd).map_err(StartError::Fatal)?;
    let pid = proc.pid;
    until_ready(proc, "redis-server", port, logfile, || async move { redis_pid(port).await == Some(pid) }).await
}

/// Polls `ready` until it says yes, the process exits (likely: the port was taken) or
/// [`SERVER_READY_TIMEOUT`] passes (then it is killed).
async fn until_ready<F, Fut>(
    mut proc: Owned,
    what: &str,
    port: u16,
    logfile: &Path,
    ready: F,
) -> Result<Owned, StartError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + SERVER_READY_TIMEOUT;
    loop {
        if let Some(status) = proc.try_status().map_err(StartError::Fatal)? {
            return Err(StartError::ExitedEarly(anyhow!(
                "{what} on port {port} exited at once ({status}); {}",
                log_tail(logfile)
            )));
        }
        if ready().await {
            return Ok(proc);
        }
        if Instant::now() >= deadline {
            let status = proc.kill().await.map_err(StartError::Fatal)?;
            return Err(StartError::Fatal(anyhow!(
                "{what} on port {port} did not answer within {SERVER_READY_TIMEOUT:?}; killed it ({status}); {}",
                log_tail(logfile)
            )));
        }
        sleep(POLL_EVERY).await;
    }
}

/// Runs `spawn` on free ports (never `shared`) until a server stays up; a server that exits
/// at once (another process took the port) is retried on another port.
async fn on_a_free_port<F, Fut>(what: &str, shared: u16, mut spawn: F) -> Result<(Owned, u16)>
where
    F: FnMut(u16) -> Fut,
    Fut: std::future::Future<Output = Result<Owned, StartError>>,
{
    let mut last_err = anyhow!("no usable port found");
    for _ in 0..SERVER_PORT_ATTEMPTS {
        let port = free_port()?;
        if port == shared {
            continue;
        }
        match spawn(port).await {
            Ok(proc) => return Ok((proc, port)),
            Err(StartError::ExitedEarly(e)) => {
                tracing::debug!(port, error = %e, "{what} exited at once; trying another port");
                last_err = e;
            }
            Err(StartError::Fatal(e)) => return Err(e),
        }
    }
    Err(last_err.context(format!("{what} did not start on any of {SERVER_PORT_ATTEMPTS} free ports")))
}

enum StartError {
    /// The process died at once, most likely because the port was taken: worth a retry.
    ExitedEarly(anyhow::Error),
    Fatal(anyhow::Error),
}

/// The `process_id` that the Redis on `port` reports, if one answers. Asking for the pid rather
/// than a bare `PING` makes sure the answer comes from our process, not from whoever else
/// might own the port.
async fn redis_pid(port: u16) -> Option<u32> {
    let ask = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"INFO server\r\n").await.ok()?;
        let mut reader = BufReader::new(stream);
        let mut header = String::new();
        reader.read_line(&mut header).await.ok()?;
        // A bulk string: `$LEN\r\n` then LEN bytes. Anything else (`-LOADING …`) is "not yet".
        let len: usize = header.trim_end().strip_prefix('$')?.parse().ok()?;
        let mut body = vec![0; len];
        reader.read_exact(&mut body).await.ok()?;
        let body = String::from_utf8_lossy(&body);
        body.lines().find_map(|l| l.strip_prefix("process_id:")).and_then(|pid| pid.trim().parse().ok())
    };
    timeout(Duration::from_secs(1), ask).await.ok().flatten()
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
            format!("log {}: {tail}", path.display())
        }
        Err(_) => format!("no log at {}", path.display()),
    }
}

/// A private `nats-server` with JetStream on a free port, its store in a temporary directory,
/// killed on drop. Never the shared one on 4222.
#[derive(Debug)]
pub struct NatsServer {
    // Before `dir`: the process dies before its store is removed.
    proc: Option<Owned>,
    port: u16,
    program: PathBuf,
    logfile: PathBuf,
    /// The `server_name` it was given: how a readiness probe knows it reached *this* server.
    server_name: String,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts one, logging into its temporary directory (or to `logfile`).
    pub async fn start_with(logfile: Option<PathBuf>) -> Result<Self> {
        let program = find_on_path("nats-server").ok_or_else(|| {
            anyhow!(
                "nats-server not found on PATH; install it with `scripts/deps.sh` \
                 or `apt-get install nats-server`"
            )
        })?;
        let dir = tempfile::Builder::new()
            .prefix("tether-nats-")
            .tempdir()
            .context("creating a directory for nats-server")?;
        let logfile = logfile.unwrap_or_else(|| dir.path().join("nats.log"));
        // Unique among live servers: one process owns a port at a time.
        let name = |port: u16| format!("tether-test-{}-{port}", std::process::id());
        let (proc, port) = on_a_free_port("nats-server", SHARED_NATS_PORT, |port| {
            let server_name = name(port);
            let (program, dir, logfile) = (&program, dir.path(), &logfile);
            async move { spawn_nats(program, port, &server_name, dir, logfile).await }
        })
        .await?;
        let server_name = name(port);
        Ok(Self { proc: Some(proc), port, program, logfile, server_name, dir })
    }

    /// Starts one, logging into its temporary directory.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().filter(|p| p.status.is_none()).map(|p| p.pid)
    }

    /// Where its log goes.
    pub fn logfile(&self) -> &Path {
        &self.logfile
    }

    /// `SIGKILL`s it and waits until it is gone (no-op if it is not running).
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(proc) = self.proc.as_mut() {
            proc.kill().await?;
        }
        Ok(())
    }

    /// Starts it again on the same port (killing the running one first), with the same store
    /// directory. Fails if another process took the port meanwhile.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.proc = None;
        let proc = spawn_nats(&self.program, self.port, &self.server_name, self.dir.path(), &self.logfile)
            .await
            .map_err(|(StartError::ExitedEarly(e) | StartError::Fatal(e))| {
                e.context(format!("restarting nats-server on port {}", self.port))
            })?;
        self.proc = Some(proc);
        Ok(())
    }
}

/// Runs `nats-server -js` on `port` and waits until its INFO line names `server_name` and
/// says JetStream is on.
async fn spawn_nats(
    program: &Path,
    port: u16,
    server_name: &str,
    dir: &Path,
    logfile: &Path,
) -> Result<Owned, StartError> {
    let mut cmd = Command::new(program);
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-n", server_name, "-js", "-sd"])
        .arg(dir.join("jetstream"))
        .arg("-l")
        .arg(logfile)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let proc = Owned::spawn("nats", cmd).map_err(StartError::Fatal)?;
    until_ready(proc, "nats-server", port, logfile, || async move {
        nats_info(port).await.is_some_and(|info| {
            info.get("server_name").and_then(|v| v.as_str()) == Some(server_name)
                && info.get("jetstream").and_then(|v| v.as_bool()) == Some(true)
        })
    })
    .await
}

/// The JSON of the `INFO` line a NATS server sends first on a new connection.
async fn nats_info(port: u16) -> Option<serde_json::Value> {
    let ask = async {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await.ok()?;
        serde_json::from_str(line.trim_end().strip_prefix("INFO ")?).ok()
    };
    timeout(Duration::from_secs(1), ask).await.ok().flatten()
}

/// A running `tether-node`, killed on drop.
#[derive(Debug)]
pub struct NodeProcess {
    proc: Owned,
    name: String,
    /// The bound address from its ready line.
    addr: SocketAddr,
    redis_url: String,
    /// Extra arguments as given, reused by [`NodeProcess::restart`].
    extra_args: Vec<String>,
    opts: SpawnOptions,
}

impl NodeProcess {
    /// Starts `tether-node --listen 127.0.0.1:0 --name NAME --redis URL EXTRA…` (a `--listen`
    /// in `extra_args` replaces the default) and waits for its ready line.
    pub async fn start(name: &str, redis_url: &str, extra_args: &[String]) -> Result<Self> {
        Self::start_with(name, redis_url, extra_args, &SpawnOptions::default()).await
    }

    /// [`NodeProcess::start`] with explicit [`SpawnOptions`].
    pub async fn start_with(name: &str, redis_url: &str, extra_args: &[String], opts: &SpawnOptions) -> Result<Self> {
        let listen = (!has_flag(extra_args, "--listen")).then(|| "127.0.0.1:0".to_owned());
        let (proc, addr) = Self::spawn(name, redis_url, listen, extra_args, opts).await?;
        Ok(Self {
            proc,
            name: name.to_owned(),
            addr,
            redis_url: redis_url.to_owned(),
            extra_args: extra_args.to_vec(),
            opts: opts.clone(),
        })
    }

    async fn spawn(
        name: &str,
        redis_url: &str,
        listen: Option<String>,
        extra_args: &[String],
        opts: &SpawnOptions,
    ) -> Result<(Owned, SocketAddr)> {
        let mut cmd = Command::new(bin_path(NODE_BIN)?);
        if let Some(listen) = listen {
            cmd.args(["--listen", &listen]);
        }
        cmd.args(["--name", name, "--redis", redis_url])
            .args(extra_args)
            .stdout(Stdio::piped())
            .stderr(opts.stderr.stdio()?);
        set_nofile(&mut cmd, opts.nofile);
        let mut proc = Owned::spawn(name, cmd)?;
        let stdout = proc.child.stdout.take().context("stdout was not piped")?;
        let ready = await_ready(&mut proc, stdout, NODE_BIN, opts.ready_timeout, &opts.stderr).await?;
        if ready.get("name") != Some(name) {
            tracing::warn!(expected = name, got = ?ready.get("name"), "node reports another name");
        }
        let addr = ready.addr("listen").context(name.to_owned())?;
        Ok((proc, addr))
    }

    /// Its name (`--name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://ADDR/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// `http://ADDR`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its pid (that of the current process after a restart).
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// Its exit status if it has exited, `None` while it runs.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        self.proc.try_status()
    }

    /// `SIGKILL` and reap: a crash, as far as the rest of the cluster can tell.
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        self.proc.kill().await
    }

    /// `SIGTERM`: a graceful stop. Pair with [`NodeProcess::wait_exit`].
    pub fn terminate(&mut self) -> Result<()> {
        self.proc.signal(Signal::SIGTERM)
    }

    /// Waits up to `within` for the exit; `None` if it still runs.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<Option<ExitStatus>> {
        self.proc.wait_exit(within).await
    }

    /// Starts it again with the same name, Redis and arguments on the same port (killing it
    /// first if it still runs). The old port is usually free again at once; if another process
    /// took it meanwhile, this fails.
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.kill().await?;
        let extra = without_flag(&self.extra_args, "--listen");
        let listen = Some(self.addr.to_string());
        let (proc, addr) = Self::spawn(&self.name, &self.redis_url, listen, &extra, &self.opts).await?;
        self.proc = proc;
        self.addr = addr;
        Ok(())
    }
}

/// A running `tether-balancer`, killed on drop.
#[derive(Debug)]
pub struct BalancerProcess {
    proc: Owned,
    /// Where clients connect.
    addr: SocketAddr,
    /// Where `/status` and `/route` answer.
    admin: SocketAddr,
    nodes: Vec<(String, SocketAddr)>,
    extra_args: Vec<String>,
    opts: SpawnOptions,
}

impl BalancerProcess {
    /// Starts `tether-balancer --listen 127.0.0.1:0 --admin 127.0.0.1:0 --node NAME=ADDR… EXTRA…`
    /// (a `--listen` or `--admin` in `extra_args` replaces the default) and waits for its ready
    /// line.
    pub async fn start(nodes: &[(String, SocketAddr)], extra_args: &[String]) -> Result<Self> {
        Self::start_with(nodes, extra_args, &SpawnOptions::default()).await
    }

    /// [`BalancerProcess::start`] with explicit [`SpawnOptions`].
    pub async fn start_with(
        nodes: &[(String, SocketAddr)],
        extra_args: &[String],
        opts: &SpawnOptions,
    ) -> Result<Self> {
        let (proc, addr, admin) = Self::spawn(nodes, extra_args, opts).await?;
        Ok(Self { proc, addr, admin, nodes: nodes.to_vec(), extra_args: extra_args.to_vec(), opts: opts.clone() })
    }

    async fn spawn(
        nodes: &[(String, SocketAddr)],
        extra_args: &[String],
        opts: &SpawnOptions,
    ) -> Result<(Owned, SocketAddr, SocketAddr)> {
        let mut cmd = Command::new(bin_path(BALANCER_BIN)?);
        for flag in ["--listen", "--admin"] {
            if !has_flag(extra_args, flag) {
                cmd.args([flag, "127.0.0.1:0"]);
            }
        }
        for (name, addr) in nodes {
            cmd.arg("--node").arg(format!("{name}={addr}"));
        }
        cmd.args(extra_args).stdout(Stdio::piped()).stderr(opts.stderr.stdio()?);
        set_nofile(&mut cmd, opts.nofile);
        let mut proc = Owned::spawn("balancer", cmd)?;
        let stdout = proc.child.stdout.take().context("stdout was not piped")?;
        let ready = await_ready(&mut proc, stdout, BALANCER_BIN, opts.ready_timeout, &opts.stderr).await?;
        let addr = ready.addr("listen").context("balancer")?;
        let admin = ready.addr("admin").context("balancer")?;
        Ok((proc, addr, admin))
    }

    /// The client-facing address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// `ws://ADDR/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// `http://ADMIN`, the base of `/status`, `/route?client=ID`, `/metrics`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// The `--node` list it was started with.
    pub fn nodes(&self) -> &[(String, SocketAddr)] {
        &self.nodes
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// Its exit status if it has exited, `None` while it runs.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        self.proc.try_status()
    }

    /// `SIGKILL` and reap.
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        self.proc.kill().await
    }

    /// `SIGTERM`: stop accepting, drain, exit.
    pub fn terminate(&mut self) -> Result<()> {
        self.proc.signal(Signal::SIGTERM)
    }

    /// Waits up to `within` for the exit; `None` if it still runs.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<Option<ExitStatus>> {
        self.proc.wait_exit(within).await
    }

    /// Starts it again on the same two ports with the same nodes (killing it first).
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.kill().await?;
        let mut extra = without_flag(&without_flag(&self.extra_args, "--listen"), "--admin");
        extra.extend(["--listen".to_owned(), self.addr.to_string(), "--admin".to_owned(), self.admin.to_string()]);
        let (proc, addr, admin) = Self::spawn(&self.nodes, &extra, &self.opts).await?;
        self.proc = proc;
        self.addr = addr;
        self.admin = admin;
        Ok(())
    }
}

/// Where a cluster's processes log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ClusterLogs {
    /// Nodes and balancer write to our stderr; Redis logs into its temporary directory.
    #[default]
    Inherit,
    /// Nodes and balancer are silenced; Redis logs into its temporary directory.
    Null,
    /// `DIR/redis.log`, `DIR/node-1.log`, …, `DIR/balancer.log` (the directory is created).
    Dir(PathBuf),
}

impl ClusterLogs {
    /// Where the process called `name` logs.
    pub fn target(&self, name: &str) -> LogTarget {
        match self {
            Self::Inherit => LogTarget::Inherit,
            Self::Null => LogTarget::Null,
            Self::Dir(dir) => LogTarget::File(dir.join(format!("{name}.log"))),
        }
    }
}

/// What [`Cluster::start`] builds.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// How many nodes, named `node-1` … `node-N`.
    pub nodes: usize,
    /// An external Redis URL; `None` starts a private [`RedisServer`].
    pub redis: Option<String>,
    /// The balancer's client address; `None` = `127.0.0.1:0`.
    pub balancer_listen: Option<SocketAddr>,
    /// The balancer's admin address; `None` = `127.0.0.1:0`.
    pub balancer_admin: Option<SocketAddr>,
    /// Extra arguments for every node (`--backbone none`, `--config FILE`, …).
    pub node_args: Vec<String>,
    /// Extra arguments for the balancer (`--health-interval-ms 100`, …).
    pub balancer_args: Vec<String>,
    /// Where the processes log.
    pub logs: ClusterLogs,
    /// How long each node and the balancer may take to become ready.
    pub ready_timeout: Duration,
    /// Persistence of the private Redis (ignored with `redis`).
    pub redis_persistence: Persistence,
    /// Start a private [`NatsServer`] and run the nodes with `--backbone nats --nats URL`.
    pub nats: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            redis: None,
            balancer_listen: None,
            balancer_admin: None,
            node_args: Vec::new(),
            balancer_args: Vec::new(),
            logs: ClusterLogs::Inherit,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            redis_persistence: Persistence::None,
            nats: false,
        }
    }
}

/// How one process ended in [`Cluster::shutdown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// It exited after `SIGTERM`, within the grace period.
    Exited(ExitStatus),
    /// It outlived the grace period (or a second signal cut it short) and was `SIGKILL`ed.
    Killed,
    /// It had died on its own before the shutdown began.
    DiedEarlier(ExitStatus),
}

impl StopOutcome {
    /// Exited with status 0 when asked to.
    pub fn is_clean(&self) -> bool {
        matches!(self, Self::Exited(s) if s.success())
    }
}

impl fmt::Display for StopOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(s) => write!(f, "stopped ({s})"),
            Self::Killed => f.write_str("killed with SIGKILL after the grace period"),
            Self::DiedEarlier(s) => write!(f, "had already died ({s})"),
        }
    }
}

/// One line of a shutdown report.
#[derive(Debug, Clone)]
pub struct StopReport {
    /// `balancer`, `node-1`, `redis`.
    pub label: String,
    pub pid: u32,
    pub outcome: StopOutcome,
}

/// A whole local cluster: Redis (own or external), `node-1..node-N`, one balancer in front.
/// Dropping it kills every process at once; [`Cluster::shutdown`] stops them gracefully.
#[derive(Debug)]
pub struct Cluster {
    // Drop order is field order: the balancer goes first, then the nodes, then Redis.
    balancer: BalancerProcess,
    nodes: Vec<NodeProcess>,
    redis: Option<RedisServer>,
    nats: Option<NatsServer>,
    redis_url: String,
}

impl Cluster {
    /// Starts Redis (unless `opts.redis` names one), the nodes (concurrently) and the balancer.
    /// If any piece fails, those already started are killed and the error says which failed.
    pub async fn start(opts: ClusterOptions) -> Result<Self> {
        if opts.nodes == 0 {
            bail!("a cluster needs at least one node");
        }
        if let ClusterLogs::Dir(dir) = &opts.logs {
            std::fs::create_dir_all(dir).with_context(|| format!("creating log directory {}", dir.display()))?;
        }
        let redis = match &opts.redis {
            Some(_) => None,
            None => {
                let logfile = match &opts.logs {
                    ClusterLogs::Dir(dir) => Some(dir.join("redis.log")),
                    _ => None,
                };
                Some(RedisServer::start_opts(logfile, opts.redis_persistence).await?)
            }
        };
        let redis_url = match (&opts.redis, &redis) {
            (Some(url), _) => url.clone(),
            (None, Some(server)) => server.url(),
            (None, None) => unreachable!("a private Redis is started when none is given"),
        };
        let mut node_args = opts.node_args.clone();
        let nats = match opts.nats {
            false => None,
            true => {
                let logfile = match &opts.logs {
                    ClusterLogs::Dir(dir) => Some(dir.join("nats.log")),
                    _ => None,
                };
                let server = NatsServer::start_with(logfile).await?;
                node_args.extend(["--backbone".to_owned(), "nats".to_owned(), "--nats".to_owned(), server.url()]);
                Some(server)
            }
        };
        let starts = (1..=opts.nodes).map(|i| {
            let name = format!("node-{i}");
            let spawn =
                SpawnOptions { stderr: opts.logs.target(&name), ready_timeout: opts.ready_timeout, nofile: None };
            let redis_url = &redis_url;
            let node_args = &node_args;
            async move { NodeProcess::start_with(&name, redis_url, node_args, &spawn).await }
        });
        let nodes = try_join_all(starts).await?;
        // A node prints its ready line once bound, but serves `/readyz` 200 only once its
        // backbone is connected; the balancer would route around it until then.
        let ready_by = Instant::now() + opts.ready_timeout;
        try_join_all(nodes.iter().map(|n| wait_node_ready(n.name(), n.addr(), ready_by))).await?;
        let members: Vec<(String, SocketAddr)> = nodes.iter().map(|n| (n.name().to_owned(), n.addr())).collect();
        let mut balancer_args = Vec::new();
        if let Some(listen) = opts.balancer_listen {
            balancer_args.extend(["--listen".to_owned(), listen.to_string()]);
        }
        if let Some(admin) = opts.balancer_admin {
            balancer_args.extend(["--admin".to_owned(), admin.to_string()]);
        }
        balancer_args.extend(opts.balancer_args.iter().cloned());
        let spawn =
            SpawnOptions { stderr: opts.logs.target("balancer"), ready_timeout: opts.ready_timeout, nofile: None };
        let balancer = BalancerProcess::start_with(&members, &balancer_args, &spawn).await?;
        Ok(Self { balancer, nodes, redis, nats, redis_url })
    }

    /// The private NATS server, when the cluster runs on the NATS backbone.
    pub fn nats(&self) -> Option<&NatsServer> {
        self.nats.as_ref()
    }

    /// The Redis URL every node uses.
    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    /// The private Redis, if the cluster started one.
    pub fn redis(&self) -> Option<&RedisServer> {
        self.redis.as_ref()
    }

    /// The private Redis, for `kill`/`restart`.
    pub fn redis_mut(&mut self) -> Option<&mut RedisServer> {
        self.redis.as_mut()
    }

    /// The nodes, `node-1` first.
    pub fn nodes(&self) -> &[NodeProcess] {
        &self.nodes
    }

    /// The nodes, for `kill`/`restart`.
    pub fn nodes_mut(&mut self) -> &mut [NodeProcess] {
        &mut self.nodes
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeProcess> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node called `name`, for `kill`/`restart`.
    pub fn node_mut(&mut self, name: &str) -> Option<&mut NodeProcess> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }

    /// The balancer.
    pub fn balancer(&self) -> &BalancerProcess {
        &self.balancer
    }

    /// The balancer, for `kill`/`restart`.
    pub fn balancer_mut(&mut self) -> &mut BalancerProcess {
        &mut self.balancer
    }

    /// `ws://BALANCER/ws`: where clients connect.
    pub fn ws_url(&self) -> String {
        self.balancer.ws_url()
    }

    /// `http://ADMIN`: the balancer's admin base URL.
    pub fn admin_url(&self) -> String {
        self.balancer.admin_url()
    }

    /// `(name, ws://NODE/ws)` for each node.
    pub fn node_urls(&self) -> Vec<(String, String)> {
        self.nodes.iter().map(|n| (n.name.clone(), n.ws_url())).collect()
    }

    /// Every process we own, balancer first, Redis last.
    fn owned(&mut self) -> Vec<&mut Owned> {
        let mut all = vec![&mut self.balancer.proc];
        all.extend(self.nodes.iter_mut().map(|n| &mut n.proc));
        // The servers last, Redis at the very end (see `shutdown`).
        if let Some(proc) = self.nats.as_mut().and_then(|n| n.proc.as_mut()) {
            all.push(proc);
        }
        if let Some(proc) = self.redis.as_mut().and_then(RedisServer::owned_mut) {
            all.push(proc);
        }
        all
    }

    /// Waits until some process of the cluster exits and returns its label, pid and status.
    /// Each exit is reported once; with nothing left running it never returns. Cancel-safe,
    /// so it can sit in a `select!` next to a shutdown signal.
    pub async fn next_exit(&mut self) -> Result<(String, u32, ExitStatus)> {
        let mut running: Vec<&mut Owned> = Vec::new();
        for proc in self.owned() {
            match proc.try_status()? {
                // Died on its own since we last looked (try_status reaps without reporting).
                Some(status) if proc.unreported => {
                    proc.unreported = false;
                    return Ok((proc.label.clone(), proc.pid, status));
                }
                Some(_) => {}
                None => running.push(proc),
            }
        }
        if running.is_empty() {
            return std::future::pending().await;
        }
        let waits = running.into_iter().map(|proc| {
            Box::pin(async move {
                let status = proc.wait().await?;
                proc.unreported = false;
                Ok::<_, anyhow::Error>((proc.label.clone(), proc.pid, status))
            })
        });
        select_all(waits).await.0
    }

    /// Stops everything gracefully: `SIGTERM` to the balancer and the nodes, up to `grace`
    /// for them to exit, `SIGKILL` for stragglers; then the same for Redis and NATS (last, so that the
    /// nodes can still clean up their presence on the way out).
    pub async fn shutdown(&mut self, grace: Duration) -> Result<Vec<StopReport>> {
        let servers = usize::from(self.redis.as_ref().is_some_and(|r| r.proc.is_some()))
            + usize::from(self.nats.as_ref().is_some_and(|n| n.proc.is_some()));
        let mut all = self.owned();
        let redis = all.split_off(all.len() - servers);
        let mut reports = stop_gracefully(all, grace).await?;
        reports.extend(stop_gracefully(redis, grace).await?);
        Ok(reports)
    }

    /// `SIGKILL`s everything still running and reaps it; reports what had to be killed.
    pub async fn kill_all(&mut self) -> Result<Vec<StopReport>> {
        let mut reports = Vec::new();
        for proc in self.owned() {
            if proc.try_status()?.is_none() {
                proc.kill().await?;
                reports.push(StopReport { label: proc.label.clone(), pid: proc.pid, outcome: StopOutcome::Killed });
            }
        }
        Ok(reports)
    }
}

/// `SIGTERM` to every process in `procs` at once, a shared `grace` deadline, `SIGKILL` after.
async fn stop_gracefully(procs: Vec<&mut Owned>, grace: Duration) -> Result<Vec<StopReport>> {
    let mut pending = Vec::with_capacity(procs.len());
    for proc in procs {
        let earlier = proc.try_status()?;
        if earlier.is_none() {
            proc.signal(Signal::SIGTERM)?;
        }
        pending.push((proc, earlier));
    }
    let deadline = Instant::now() + grace;
    let mut reports = Vec::with_capacity(pending.len());
    for (proc, earlier) in pending {
        let outcome = match earlier {
            Some(status) => StopOutcome::DiedEarlier(status),
            None => match timeout_at(deadline, proc.wait()).await {
                Ok(status) => StopOutcome::Exited(status?),
                Err(_) => {
                    proc.kill().await?;
                    StopOutcome::Killed
                }
            },
        };
        reports.push(StopReport { label: proc.label.clone(), pid: proc.pid, outcome });
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_parse() {
        let line = "tether-balancer ready listen=127.0.0.1:8080 admin=127.0.0.1:9100";
        let ready = ReadyLine::parse(line, BALANCER_BIN).expect("a ready line");
        assert_eq!(ready.addr("listen").ok(), Some("127.0.0.1:8080".parse().expect("addr")));
        assert_eq!(ready.get("admin"), Some("127.0.0.1:9100"));
        assert!(ready.addr("nope").is_err());
        assert!(ReadyLine::parse(line, NODE_BIN).is_none());
        assert!(ReadyLine::parse("tether-node starting", NODE_BIN).is_none());
        assert!(ReadyLine::parse("", NODE_BIN).is_none());
        let node = ReadyLine::parse("tether-node ready name=n listen=oops", NODE_BIN).expect("a ready line");
        assert!(node.addr("listen").is_err());
    }

    #[test]
    fn flags_are_found_and_removed_in_both_spellings() {
        let args: Vec<String> =
            ["--listen", "1.2.3.4:5", "--x", "--admin=a:1", "--listener"].map(String::from).to_vec();
        assert!(has_flag(&args, "--listen"));
        assert!(has_flag(&args, "--admin"));
        assert!(!has_flag(&args, "--name"));
        assert_eq!(without_flag(&args, "--listen"), ["--x", "--admin=a:1", "--listener"]);
        assert_eq!(without_flag(&args, "--admin"), ["--listen", "1.2.3.4:5", "--x", "--listener"]);
    }

    #[test]
    fn bin_dir_env_is_authoritative() {
        let err = bin_path_in(NODE_BIN, Some("/nonexistent-tether-bin-dir".into())).expect_err("missing").to_string();
        assert!(err.contains("/nonexistent-tether-bin-dir/tether-node"), "{err}");
        assert!(err.contains("cargo build --bins"), "{err}");
    }
}
