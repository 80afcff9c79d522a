//! The one child-process guard every tool and test uses: [`ChildProcess`].
//!
//! A child runs in its own process group, so a Ctrl-C typed at a terminal reaches only the
//! parent, which then stops the children in order. On Linux every child also gets `SIGKILL`
//! when its parent dies (`PR_SET_PDEATHSIG`), so a crashed or killed run does not leave
//! servers behind. Linux ties that signal to the *thread* that spawned the child: spawn from a
//! thread that outlives the handle (a tokio worker, the test's own thread), not from a
//! short-lived one. Dropping the handle kills and reaps the process.
//!
//! Children that print a ready line (`PROGRAM ready k=v …`, exactly one line on stdout, logs on
//! stderr) are awaited with [`ChildProcess::await_ready`]:
//!
//! ```text
//! tether-node ready name=node-1 listen=127.0.0.1:40123
//! tether-balancer ready listen=127.0.0.1:8080 admin=127.0.0.1:9100
//! ```

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::fmt;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};

/// How long a node or balancer may take to print its ready line.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(15);

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

/// Stdout lines of a child, as [`ChildProcess::take_stdout`] hands them over.
pub type StdoutLines = Lines<BufReader<ChildStdout>>;

/// A child process we own. Dropping it kills and reaps the process.
#[derive(Debug)]
pub struct ChildProcess {
    /// Names the process in messages: `redis`, `node-1`, `balancer`, `worker-2`.
    label: String,
    child: Child,
    /// Kept apart from `child` because tokio forgets the id once the child is reaped, and
    /// reports want it afterwards.
    pid: u32,
    /// Set once the exit has been observed (and the process reaped): after that the pid may
    /// belong to someone else and must never be signalled.
    status: Option<ExitStatus>,
    /// Whether a supervisor (`Cluster::next_exit`) may still report this exit: false once
    /// reported, or when the exit was our own doing (`kill`, `wait_exit`), which the caller
    /// already knows.
    unreported: bool,
    /// Piped stdin of a child that exits when it closes ([`ChildProcess::spawn_piped`]).
    stdin: Option<ChildStdin>,
    /// Piped stdout, until the ready line was read or the caller took it.
    stdout: Option<StdoutLines>,
    /// Keeps reading stdout after the ready line, so that the child never blocks on a full pipe.
    stdout_drain: Option<JoinHandle<()>>,
}

impl ChildProcess {
    /// Spawns `cmd` with stdin closed, in its own process group, with `SIGKILL` on the parent
    /// thread's death. Stdout goes where `cmd` says; if piped, [`ChildProcess::await_ready`]
    /// or [`ChildProcess::take_stdout`] read it.
    pub fn spawn(label: &str, mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null());
        Self::spawn_configured(label, cmd)
    }

    /// [`ChildProcess::spawn`] with stdin and stdout piped: for our own helper children (load
    /// generators, echo backends, Socket.IO servers), which exit when their stdin closes.
    pub fn spawn_piped(label: &str, mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        Self::spawn_configured(label, cmd)
    }

    fn spawn_configured(label: &str, mut cmd: Command) -> Result<Self> {
        cmd.process_group(0);
        set_parent_death_signal(&mut cmd);
        let program = cmd.as_std().get_program().to_string_lossy().into_owned();
        let mut child = cmd.spawn().with_context(|| format!("{label}: spawning {program}"))?;
        let pid = child.id().ok_or_else(|| anyhow!("{label}: {program} exited before its pid was known"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        Ok(Self {
            label: label.to_owned(),
            child,
            pid,
            status: None,
            unreported: true,
            stdin,
            stdout,
            stdout_drain: None,
        })
    }

    /// Its label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Its pid (still known after it was reaped, for reports).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether its exit has been observed.
    pub fn has_exited(&self) -> bool {
        self.status.is_some()
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().with_context(|| format!("{}: polling for exit", self.label))?;
        }
        Ok(self.status)
    }

    /// Sends `sig` unless the process has already been reaped.
    /// Waits up to `within` until every thread of the process is stopped (state `T` in
    /// `/proc/PID/task/*/stat`), after a `SIGSTOP`.
    pub fn wait_stopped(&self, within: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + within;
        let stopped = |stat: &str| {
            // `PID (COMM) STATE …`: the state follows the last `)`.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|st| st == "T" || st == "t")
        };
        loop {
            let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid))
                .with_context(|| format!("{}: listing its threads", self.label))?;
            let mut all = true;
            for task in tasks.flatten() {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                if !stat.is_empty() && !stopped(&stat) {
                    all = false;
                    break;
                }
            }
            if all {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(anyhow!("{}: not stopped {within:?} after SIGSTOP", self.label));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn signal(&mut self, sig: Signal) -> Result<()> {
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
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = self.child.wait().await.with_context(|| format!("{}: waiting for exit", self.label))?;
        self.status = Some(status);
        Ok(status)
    }

    /// Waits up to `within` for the exit; `None` if it still runs. The caller asked, so a
    /// supervisor does not report this exit again.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<Option<ExitStatus>> {
        match timeout(within, self.wait()).await {
            Ok(status) => {
                self.unreported = false;
                status.map(Some)
            }
            Err(_) => Ok(None),
        }
    }

    /// `SIGKILL`, then reaps. The caller caused the exit, so a supervisor does not report it.
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        let status = self.wait().await;
        self.unreported = false;
        status
    }

    /// Closes stdin (our helper children then exit), waits up to `within`, kills after that.
    pub async fn stop(&mut self, within: Duration) {
        self.stdin.take();
        if self.wait_exit(within).await.ok().flatten().is_none() {
            let _ = self.kill().await;
        }
    }

    /// Its piped stdin, while open.
    pub fn stdin_mut(&mut self) -> Option<&mut ChildStdin> {
        self.stdin.as_mut()
    }

    /// Its piped stdout, for a caller that reads it itself.
    pub fn take_stdout(&mut self) -> Option<StdoutLines> {
        self.stdout.take()
    }

    /// Keeps draining stdout in the background so the child never blocks on a full pipe.
    pub fn drain_stdout(&mut self) {
        let Some(mut lines) = self.stdout.take() else { return };
        let label = self.label.clone();
        self.stdout_drain = Some(tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(process = %label, %line, "stdout");
            }
        }));
    }

    /// Reads stdout until `program`'s ready line, then keeps draining stdout in a task. On a
    /// timeout or an early exit the process is killed and the error says what happened (with
    /// `log`'s file, if any, to look at).
    pub async fn await_ready(&mut self, program: &str, within: Duration, log: &LogTarget) -> Result<ReadyLine> {
        let label = self.label.clone();
        let lines = self.stdout.as_mut().ok_or_else(|| anyhow!("{label}: stdout was not piped"))?;
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
        let hint = log.hint();
        let seen = if other.is_empty() { String::new() } else { format!("; its stdout said: {:?}", other.join(" | ")) };
        match found {
            Ok(Ok(Some(ready))) => {
                self.drain_stdout();
                Ok(ready)
            }
            Ok(Ok(None)) => {
                // Stdout closed: the process is exiting (or closed stdout, which breaks the contract).
                let status = match self.wait_exit(Duration::from_secs(2)).await? {
                    Some(status) => status.to_string(),
                    None => {
                        self.kill().await?;
                        "closed stdout but kept running; killed".to_owned()
                    }
                };
                bail!("{label} ({program}) exited before it was ready: {status}{seen}{hint}")
            }
            Ok(Err(e)) => {
                self.kill().await?;
                Err(anyhow!(e)).context(format!("{label}: reading stdout{hint}"))
            }
            Err(_) => {
                let status = self.kill().await?;
                bail!("{label} ({program}) printed no ready line within {within:?}; killed it ({status}){seen}{hint}")
            }
        }
    }

    /// The exit if it happened on its own since the last look and nobody was told yet; marks
    /// it told. `Ok(None)` while it runs (or once reported).
    pub(crate) fn unreported_exit(&mut self) -> Result<Option<ExitStatus>> {
        match self.try_status()? {
            Some(status) if self.unreported => {
                self.unreported = false;
                Ok(Some(status))
            }
            _ => Ok(None),
        }
    }

    /// Waits for the exit and marks it reported (for a supervisor's `select`).
    pub(crate) async fn wait_reported(&mut self) -> Result<ExitStatus> {
        let status = self.wait().await?;
        self.unreported = false;
        Ok(status)
    }
}

impl Drop for ChildProcess {
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
pub fn set_nofile(cmd: &mut Command, nofile: Option<(u64, u64)>) {
    let Some((soft, hard)) = nofile else { return };
    // SAFETY: the closure runs in the forked child before `exec`; `setrlimit` is
    // async-signal-safe, the closure captures two integers and allocates nothing.
    unsafe {
        cmd.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard));
    }
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

/// How one process ended in a graceful stop ([`stop_gracefully`]).
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

/// `SIGTERM` to every process in `procs` at once, a shared `grace` deadline, `SIGKILL` after.
pub async fn stop_gracefully(procs: Vec<&mut ChildProcess>, grace: Duration) -> Result<Vec<StopReport>> {
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

/// The process controls that a workspace binary's handle ([`NodeProcess`], [`BalancerProcess`])
/// passes straight to its [`ChildProcess`] in field `$proc`: written once here, so the two
/// handles cannot drift apart.
///
/// [`NodeProcess`]: crate::NodeProcess
/// [`BalancerProcess`]: crate::BalancerProcess
macro_rules! process_controls {
    ($proc:ident) => {
        /// Its pid (that of the current process after a restart).
        pub fn pid(&self) -> u32 {
            self.$proc.pid()
        }

        /// Its exit status if it has exited, `None` while it runs.
        pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
            self.$proc.try_status()
        }

        /// `SIGKILL` and reap: a crash, as far as the rest of the cluster can tell.
        pub async fn kill(&mut self) -> Result<ExitStatus> {
            self.$proc.kill().await
        }

        /// `SIGSTOP`: the process stops running but keeps its sockets open, so what peers
        /// write to it waits unread in the kernel — a node that has accepted bytes and not
        /// acted on them, deterministically. [`thaw`](Self::thaw) or `kill` it after.
        /// Returns once every thread of it has stopped (a signal is delivered asynchronously:
        /// until then it could still read what a test sends right after).
        pub fn freeze(&mut self) -> Result<()> {
            self.$proc.signal(nix::sys::signal::Signal::SIGSTOP)?;
            self.$proc.wait_stopped(std::time::Duration::from_secs(5))
        }

        /// `SIGCONT`: undoes [`freeze`](Self::freeze).
        pub fn thaw(&mut self) -> Result<()> {
            self.$proc.signal(nix::sys::signal::Signal::SIGCONT)
        }

        /// `SIGTERM`: a graceful stop (drain, then exit). Pair with `wait_exit`.
        pub fn terminate(&mut self) -> Result<()> {
            self.$proc.signal(nix::sys::signal::Signal::SIGTERM)
        }

        /// `SIGHUP`: a balancer reloads its config (and certificate files). Asynchronous: wait
        /// on what the reload shows (`/status`'s `reload`) to know it happened.
        pub fn hangup(&mut self) -> Result<()> {
            self.$proc.signal(nix::sys::signal::Signal::SIGHUP)
        }

        /// Waits up to `within` for the exit; `None` if it still runs.
        pub async fn wait_exit(&mut self, within: Duration) -> Result<Option<ExitStatus>> {
            self.$proc.wait_exit(within).await
        }
    };
}
pub(crate) use process_controls;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_parse() {
        let line = "tether-balancer ready listen=127.0.0.1:8080 admin=127.0.0.1:9100";
        let ready = ReadyLine::parse(line, "tether-balancer").expect("a ready line");
        assert_eq!(ready.addr("listen").ok(), Some("127.0.0.1:8080".parse().expect("addr")));
        assert_eq!(ready.get("admin"), Some("127.0.0.1:9100"));
        assert!(ready.addr("nope").is_err());
        assert!(ReadyLine::parse(line, "tether-node").is_none());
        assert!(ReadyLine::parse("tether-node starting", "tether-node").is_none());
        assert!(ReadyLine::parse("", "tether-node").is_none());
        let node = ReadyLine::parse("tether-node ready name=n listen=oops", "tether-node").expect("a ready line");
        assert!(node.addr("listen").is_err());
    }

    #[tokio::test]
    async fn a_piped_child_exits_when_its_stdin_closes_and_drop_reaps_a_running_one() -> Result<()> {
        let mut cat = ChildProcess::spawn_piped("cat", Command::new("cat"))?;
        assert!(cat.try_status()?.is_none(), "cat runs while its stdin is open");
        cat.stop(Duration::from_secs(5)).await;
        assert!(cat.try_status()?.is_some_and(|s| s.success()), "cat exited on its own at EOF");
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let sleeper = ChildProcess::spawn("sleep", sleeper)?;
        let pid = sleeper.pid();
        drop(sleeper);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty(), "dropped child {pid} is still there: {stat}");
        Ok(())
    }
}
