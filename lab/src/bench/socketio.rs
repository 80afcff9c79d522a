//! The Socket.IO 4 cluster `tether bench fanout --steady --vs socketio` measures against:
//! `bench/socketio/server.js` (Socket.IO with `@socket.io/redis-adapter`) on Node.js, one
//! process per "node", all on the bench's private Redis.
//!
//! The server and its pinned `package.json` / `package-lock.json` are compiled into `tether`
//! and written to a cache directory (by default `target/socketio/` next to the `tether`
//! binary's profile directory, else `~/.cache/tether/socketio/`), where `npm ci` installs the
//! packages once; it runs again only when the lock file changed.

use anyhow::{anyhow, bail, Context, Result};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tether_kit::{find_on_path, ChildProcess, LogTarget};
use tokio::process::Command;

const SERVER_JS: &str = include_str!("../../../bench/socketio/server.js");
const PACKAGE_JSON: &str = include_str!("../../../bench/socketio/package.json");
const PACKAGE_LOCK: &str = include_str!("../../../bench/socketio/package-lock.json");
/// Written into the cache directory after a successful `npm ci`: the lock file it installed.
const STAMP: &str = ".tether-installed-lock.json";
/// Longest `npm ci` we wait for.
const NPM_TIMEOUT: Duration = Duration::from_secs(300);
/// The server's ready line starts with this word.
const PROGRAM: &str = "socketio-bench";
/// Oldest Node.js major version Socket.IO 4.8 supports.
const MIN_NODE_MAJOR: u32 = 14;

/// The cache directory: `target/socketio` when `tether` runs from a cargo `target/PROFILE/`
/// directory, else `$XDG_CACHE_HOME/tether/socketio` (or `~/.cache/tether/socketio`).
pub fn default_dir() -> PathBuf {
    let exe = super::tether_exe().ok();
    let target = exe.as_deref().and_then(Path::parent).and_then(Path::parent);
    if let Some(t) = target.filter(|t| t.file_name().is_some_and(|n| n == "target")) {
        return t.join("socketio");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("tether").join("socketio")
}

/// An installed server: where `node` and `server.js` are.
#[derive(Debug, Clone)]
pub struct Installed {
    pub node: PathBuf,
    pub server_js: PathBuf,
    /// `node --version`.
    pub node_version: String,
}

/// Checks for `node` and `npm`, writes the server into `dir` and runs `npm ci` there unless
/// this lock file's packages are already installed, saying what it does on `out`.
pub async fn install<W: Write>(dir: &Path, out: &mut W) -> Result<Installed> {
    let node = find_on_path("node").ok_or_else(|| {
        anyhow!(
            "--vs socketio needs Node.js (node ≥ {MIN_NODE_MAJOR}) and npm, and `node` is not on PATH: install them \
             (e.g. `apt-get install nodejs npm`)"
        )
    })?;
    let version = run_quiet(Command::new(&node).arg("--version")).await.context("running `node --version`")?;
    let major = version.trim().trim_start_matches('v').split('.').next().and_then(|m| m.parse::<u32>().ok());
    if major.is_none_or(|m| m < MIN_NODE_MAJOR) {
        bail!("--vs socketio needs node ≥ {MIN_NODE_MAJOR}; {} says {}", node.display(), version.trim());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_if_changed(&dir.join("server.js"), SERVER_JS)?;
    write_if_changed(&dir.join("package.json"), PACKAGE_JSON)?;
    write_if_changed(&dir.join("package-lock.json"), PACKAGE_LOCK)?;
    let installed = std::fs::read_to_string(dir.join(STAMP)).is_ok_and(|s| s == PACKAGE_LOCK)
        && dir.join("node_modules").join("socket.io").join("package.json").is_file()
        && dir.join("node_modules").join("@socket.io").join("redis-adapter").join("package.json").is_file();
    if !installed {
        let npm = find_on_path("npm").ok_or_else(|| {
            anyhow!("--vs socketio needs npm to install Socket.IO, and `npm` is not on PATH: install it (e.g. `apt-get install npm`)")
        })?;
        let _ = std::fs::remove_file(dir.join(STAMP));
        writeln!(out, "installing Socket.IO's pinned npm packages: npm ci in {} (once)", dir.display())?;
        out.flush()?;
        let mut cmd = Command::new(&npm);
        cmd.args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]).current_dir(dir);
        run_quiet(&mut cmd).await.with_context(|| format!("`npm ci` in {} failed", dir.display()))?;
        std::fs::write(dir.join(STAMP), PACKAGE_LOCK)
            .with_context(|| format!("writing {}", dir.join(STAMP).display()))?;
    }
    Ok(Installed { node, server_js: dir.join("server.js"), node_version: version.trim().to_owned() })
}

fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Runs `cmd` to the end (at most [`NPM_TIMEOUT`]); its stdout, or an error quoting its stderr.
async fn run_quiet(cmd: &mut Command) -> Result<String> {
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(NPM_TIMEOUT, cmd.output())
        .await
        .map_err(|_| anyhow!("still running after {NPM_TIMEOUT:?}"))??;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("{} — {}", output.status, tail.join("\n"));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One Socket.IO server process, killed on drop.
#[derive(Debug)]
pub struct SocketIoServer {
    name: String,
    proc: ChildProcess,
    addr: SocketAddr,
}

impl SocketIoServer {
    /// Starts `node server.js 0 REDIS_URL` and waits (up to 20 s) for its ready line.
    pub async fn start(name: &str, installed: &Installed, redis_url: &str, stderr: &LogTarget) -> Result<Self> {
        let mut cmd = Command::new(&installed.node);
        cmd.arg(&installed.server_js).arg("0").arg(redis_url).stderr(stderr.stdio()?);
        let mut proc = ChildProcess::spawn_piped(name, cmd)?;
        let ready = proc
            .await_ready(PROGRAM, Duration::from_secs(20), stderr)
            .await
            .with_context(|| format!("{name}: the Socket.IO server did not start"))?;
        let addr = ready.addr("listen")?;
        Ok(Self { name: name.to_owned(), proc, addr })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Closes its stdin (it exits), kills it if it has not within 5 s.
    pub async fn stop(&mut self) {
        self.proc.stop(Duration::from_secs(5)).await;
    }
}
