//! The targets of `tether bench proxies`: starting `tether-balancer`, HAProxy and nginx (each
//! with one thread, in front of the same two echo backends), installing the latter two when
//! asked, and stopping them (nginx's worker included).

use super::Kind;
use crate::bench::{procfs, wsraw};
use anyhow::{anyhow, bail, Context, Result};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tether_kit::ports::free_port;
use tether_kit::{bin_path, ChildProcess, LogTarget, BALANCER_BIN};
use tokio::process::Command;

/// One running target.
pub(super) struct Target {
    pub(super) kind: Kind,
    pub(super) addr: SocketAddr,
    /// The process that does the proxying (nginx: its worker); `None` for direct.
    pub(super) pid: Option<u32>,
    /// Version and thread set-up, for the report.
    pub(super) setup: String,
    /// Keeps the process alive (killed on drop).
    pub(super) _proc: Option<ChildProcess>,
}

impl Drop for Target {
    fn drop(&mut self) {
        // nginx's worker is the master's child, not ours: killing the master (our child, killed
        // on drop) would leave the worker running. Kill it first, while it is still provably
        // the master's child (so the pid cannot have been reused by someone else's process).
        if let (Kind::Nginx, Some(worker), Some(master)) = (self.kind, self.pid, self._proc.as_ref()) {
            if children_of(master.pid()).contains(&worker) {
                if let Ok(pid) = i32::try_from(worker) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }
}

pub(super) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]).map(|d| d.join(name)).find(|p| p.is_file())
}

/// `apt-get update` (once per run) and `apt-get install -y PACKAGES`.
pub(super) async fn install<W: Write>(packages: &[&str], out: &mut W) -> Result<()> {
    static UPDATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if UPDATED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    writeln!(out, "installing {} from Debian packages (apt-get update, apt-get install -y)", packages.join(" "))?;
    let quiet = |cmd: &mut Command| {
        cmd.env("DEBIAN_FRONTEND", "noninteractive").stdout(std::process::Stdio::null());
    };
    let mut update = Command::new("apt-get");
    update.args(["update", "-q"]);
    quiet(&mut update);
    let status = tokio::time::timeout(Duration::from_secs(300), update.status()).await;
    if !matches!(status, Ok(Ok(s)) if s.success()) {
        writeln!(out, "  apt-get update failed; trying the install anyway")?;
    }
    let mut inst = Command::new("apt-get");
    inst.args(["install", "-y", "-q"]).args(packages);
    quiet(&mut inst);
    let status = tokio::time::timeout(Duration::from_secs(600), inst.status()).await;
    if !matches!(status, Ok(Ok(s)) if s.success()) {
        writeln!(out, "  apt-get install {} failed", packages.join(" "))?;
    }
    Ok(())
}

/// Waits until an upgrade through `addr` succeeds (the proxy is up and reaches a backend).
pub(super) async fn wait_upgrade(addr: SocketAddr, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let attempt =
            tokio::time::timeout(Duration::from_secs(1), wsraw::connect(addr, None, "/ws?client=probe")).await;
        match attempt {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if Instant::now() >= deadline => bail!("no upgrade through {addr}: {e}"),
            Err(_) if Instant::now() >= deadline => bail!("no upgrade through {addr}: timed out"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

pub(super) async fn start_balancer(backends: &[(String, SocketAddr)], dir: &Path) -> Result<Target> {
    let conf = crate::bench::write_file(dir, "balancer.toml", "max_connections = 9950\n")?;
    let program = bin_path(BALANCER_BIN)?;
    // One thread, as HAProxy and nginx get: `--threads 1` where the balancer has it, else
    // tokio's own variable (read by its default multi-thread runtime).
    let threads_flag = crate::bench::supports_flag(&program, "--threads").await;
    let mut cmd = Command::new(&program);
    cmd.args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--config"])
        .arg(&conf)
        .env("RUST_LOG", "warn")
        .stderr(log_file(dir, "balancer.log")?);
    if threads_flag {
        cmd.args(["--threads", "1"]);
    } else {
        cmd.env("TOKIO_WORKER_THREADS", "1");
    }
    for (name, addr) in backends {
        cmd.arg("--node").arg(format!("{name}={addr}"));
    }
    let mut proc = ChildProcess::spawn_piped("balancer", cmd)?;
    let log = LogTarget::File(dir.join("balancer.log"));
    let ready = proc.await_ready(BALANCER_BIN, Duration::from_secs(10), &log).await?;
    let addr = ready.addr("listen")?;
    wait_upgrade(addr, Duration::from_secs(10)).await?;
    let threads = procfs::sample(proc.pid()).map(|s| s.threads).unwrap_or(0);
    Ok(Target {
        kind: Kind::Balancer,
        addr,
        pid: Some(proc.pid()),
        setup: if threads_flag {
            format!("--threads 1 ({threads} threads in all), RUST_LOG=warn")
        } else {
            format!(
                "no --threads flag: tokio multi-thread runtime with TOKIO_WORKER_THREADS=1 ({threads} threads in \
                 all), RUST_LOG=warn"
            )
        },
        _proc: Some(proc),
    })
}

pub(super) fn log_file(dir: &Path, name: &str) -> Result<std::process::Stdio> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(name))?;
    Ok(f.into())
}

pub(super) async fn start_haproxy(backends: &[(String, SocketAddr)], dir: &Path) -> Result<Target> {
    let program = find_program("haproxy").ok_or_else(|| anyhow!("haproxy not found"))?;
    let port = free_port()?;
    let servers: String = backends.iter().map(|(n, a)| format!("    server {n} {a}\n")).collect();
    let conf = format!(
        "global\n    nbthread 1\n    maxconn 9950\n    fd-hard-limit 20000\n\n\
         defaults\n    mode http\n    maxconn 9950\n    timeout connect 5s\n    timeout client 1h\n    \
         timeout server 1h\n    timeout tunnel 1h\n    timeout http-request 10s\n\n\
         frontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n\n\
         backend be\n    balance url_param client\n    hash-type consistent\n{servers}"
    );
    let path = crate::bench::write_file(dir, "haproxy.cfg", &conf)?;
    let mut cmd = Command::new(&program);
    cmd.arg("-f").arg(&path).arg("-db").stderr(log_file(dir, "haproxy.log")?);
    let mut proc = ChildProcess::spawn_piped("haproxy", cmd)?;
    proc.drain_stdout();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    wait_upgrade(addr, Duration::from_secs(10))
        .await
        .with_context(|| format!("see {}", dir.join("haproxy.log").display()))?;
    let version = version_of(&program, "-v").await;
    let threads = procfs::sample(proc.pid()).map(|s| s.threads).unwrap_or(0);
    Ok(Target {
        kind: Kind::Haproxy,
        addr,
        pid: Some(proc.pid()),
        setup: format!(
            "{version}; nbthread 1 ({threads} threads), balance url_param client + hash-type consistent, no logs"
        ),
        _proc: Some(proc),
    })
}

pub(super) async fn start_nginx(backends: &[(String, SocketAddr)], dir: &Path) -> Result<Target> {
    let program = find_program("nginx").ok_or_else(|| anyhow!("nginx not found"))?;
    let port = free_port()?;
    let servers: String = backends.iter().map(|(_, a)| format!("        server {a};\n")).collect();
    let d = dir.display();
    let conf = format!(
        "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         worker_rlimit_nofile 20000;\n\
         events {{\n    worker_connections 20000;\n}}\n\
         http {{\n    access_log off;\n    client_body_temp_path {d}/nginx-body;\n    proxy_temp_path {d}/nginx-proxy;\n    \
         fastcgi_temp_path {d}/nginx-fastcgi;\n    uwsgi_temp_path {d}/nginx-uwsgi;\n    scgi_temp_path {d}/nginx-scgi;\n    \
         upstream echo {{\n        hash $arg_client consistent;\n{servers}    }}\n    \
         map $http_upgrade $connection_upgrade {{\n        default upgrade;\n        '' close;\n    }}\n    \
         server {{\n        listen 127.0.0.1:{port};\n        location / {{\n            proxy_pass http://echo;\n            \
         proxy_http_version 1.1;\n            proxy_set_header Upgrade $http_upgrade;\n            \
         proxy_set_header Connection $connection_upgrade;\n            proxy_read_timeout 3600s;\n            \
         proxy_send_timeout 3600s;\n        }}\n    }}\n}}\n"
    );
    let path = crate::bench::write_file(dir, "nginx.conf", &conf)?;
    let mut cmd = Command::new(&program);
    cmd.arg("-p").arg(dir).arg("-c").arg(&path).arg("-e").arg(dir.join("nginx-error.log"));
    cmd.stderr(log_file(dir, "nginx.log")?);
    let mut proc = ChildProcess::spawn_piped("nginx", cmd)?;
    proc.drain_stdout();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    wait_upgrade(addr, Duration::from_secs(10))
        .await
        .with_context(|| format!("see {}", dir.join("nginx-error.log").display()))?;
    // The master (our child) only supervises; the worker does the proxying.
    let worker = children_of(proc.pid()).into_iter().next().ok_or_else(|| anyhow!("nginx has no worker process"))?;
    let version = version_of(&program, "-v").await;
    Ok(Target {
        kind: Kind::Nginx,
        addr,
        pid: Some(worker),
        setup: format!(
            "{version}; worker_processes 1 (figures are the worker's), hash $arg_client consistent, access_log off"
        ),
        _proc: Some(proc),
    })
}

pub(super) async fn version_of(program: &Path, flag: &str) -> String {
    match tokio::time::timeout(Duration::from_secs(5), Command::new(program).arg(flag).output()).await {
        Ok(Ok(o)) => {
            let text = String::from_utf8_lossy(if o.stdout.is_empty() { &o.stderr } else { &o.stdout }).into_owned();
            let first = text.lines().next().unwrap_or("").to_owned();
            first.split(" - ").next().unwrap_or(&first).trim().to_owned()
        }
        _ => program.display().to_string(),
    }
}

/// Pids whose parent is `pid`.
pub(super) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).ok().and_then(|s| {
                let rest = &s[s.rfind(')')? + 1..];
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            }) == Some(pid)
        })
        .collect()
}
