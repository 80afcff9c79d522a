//! The targets of `tether bench proxies`: starting `tether-balancer`, HAProxy and nginx (each
//! with one thread, in front of the same two echo backends; with `--tls`, each terminating TLS
//! with the same certificate), installing the latter two when asked, and stopping them
//! (nginx's worker included). The HAProxy and nginx configurations are rendered by pure
//! functions ([`haproxy_config`], [`nginx_config`]) so that tests can read them.

use super::{Kind, RunTls};
use crate::bench::tls::{ClientTls, Negotiated};
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
    /// How clients reach it over TLS (`None`: plain, as always for direct).
    pub(super) tls: Option<ClientTls>,
    /// What the probe's TLS hand-shake negotiated, for the report.
    pub(super) negotiated: Option<String>,
    /// Keeps the process alive (killed on drop).
    pub(super) _proc: Option<ChildProcess>,
}

/// Where and how load reaches a target: what a spawned load task takes along.
#[derive(Clone)]
pub(super) struct Endpoint {
    pub(super) addr: SocketAddr,
    pub(super) tls: Option<ClientTls>,
}

impl Target {
    pub(super) fn endpoint(&self) -> Endpoint {
        Endpoint { addr: self.addr, tls: self.tls.clone() }
    }
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

/// Waits until an upgrade through `addr` succeeds (the proxy is up and reaches a backend),
/// over TLS when `tls` is given; returns what that hand-shake negotiated.
pub(super) async fn wait_upgrade(
    addr: SocketAddr,
    tls: Option<&ClientTls>,
    within: Duration,
) -> Result<Option<String>> {
    let deadline = Instant::now() + within;
    let how = if tls.is_some() { "TLS upgrade" } else { "upgrade" };
    loop {
        let attempt =
            tokio::time::timeout(Duration::from_secs(1), wsraw::connect_with(addr, None, "/ws?client=probe", tls))
                .await;
        match attempt {
            Ok(Ok((up, _))) => return Ok(wsraw::tls_session(&up.stream).map(|c| Negotiated::of(c).to_string())),
            Ok(Err(e)) if Instant::now() >= deadline => bail!("no {how} through {addr}: {e}"),
            Err(_) if Instant::now() >= deadline => bail!("no {how} through {addr}: timed out"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The balancer's command line beyond listeners, config and nodes: its TLS flags.
pub(super) fn balancer_tls_args(tls: &RunTls) -> Vec<std::ffi::OsString> {
    vec!["--tls-cert".into(), tls.files.cert.clone().into(), "--tls-key".into(), tls.files.key.clone().into()]
}

pub(super) async fn start_balancer(
    backends: &[(String, SocketAddr)],
    dir: &Path,
    tls: Option<&RunTls>,
) -> Result<Target> {
    let conf = crate::bench::write_file(dir, "balancer.toml", "max_connections = 9950\n")?;
    let program = bin_path(BALANCER_BIN)?;
    if tls.is_some() && !crate::bench::supports_flag(&program, "--tls-cert").await {
        // Fail here, in a second, naming the cause: started with flags it does not know, the
        // balancer would exit on a usage error and the reader would have to guess why.
        bail!(
            "{} has no --tls-cert flag: this tether-balancer cannot terminate TLS, so it cannot be measured with \
             --tls (build one that has `--tls-cert`/`--tls-key`, or run without --tls)",
            program.display()
        );
    }
    // One thread, as HAProxy and nginx get: `--threads 1` where the balancer has it, else
    // tokio's own variable (read by its default multi-thread runtime).
    let threads_flag = crate::bench::supports_flag(&program, "--threads").await;
    let mut cmd = Command::new(&program);
    cmd.args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--config"])
        .arg(&conf)
        .env("RUST_LOG", "warn")
        .stderr(log_file(dir, "balancer.log")?);
    if let Some(tls) = tls {
        cmd.args(balancer_tls_args(tls));
    }
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
    let client = tls.map(|t| t.client.clone());
    let negotiated = wait_upgrade(addr, client.as_ref(), Duration::from_secs(10))
        .await
        .with_context(|| format!("see {}", dir.join("balancer.log").display()))?;
    let threads = procfs::sample(proc.pid()).map(|s| s.threads).unwrap_or(0);
    let tls_note = if tls.is_some() { ", --tls-cert/--tls-key (rustls)" } else { "" };
    Ok(Target {
        kind: Kind::Balancer,
        addr,
        pid: Some(proc.pid()),
        setup: if threads_flag {
            format!("--threads 1 ({threads} threads in all), RUST_LOG=warn{tls_note}")
        } else {
            format!(
                "no --threads flag: tokio multi-thread runtime with TOKIO_WORKER_THREADS=1 ({threads} threads in \
                 all), RUST_LOG=warn{tls_note}"
            )
        },
        tls: client,
        negotiated,
        _proc: Some(proc),
    })
}

pub(super) fn log_file(dir: &Path, name: &str) -> Result<std::process::Stdio> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(name))?;
    Ok(f.into())
}

/// HAProxy's configuration: one thread, hashing `client` onto the backends; with `tls`, the
/// frontend terminates TLS with cert+key in one PEM (`crt`) and ALPN http/1.1, and — unless
/// sessions are to be resumed — keeps no session cache and issues no tickets.
pub(super) fn haproxy_config(port: u16, backends: &[(String, SocketAddr)], tls: Option<&RunTls>) -> String {
    let servers: String = backends.iter().map(|(n, a)| format!("    server {n} {a}\n")).collect();
    let (global_tls, bind_tls) = match tls {
        None => (String::new(), String::new()),
        Some(t) => (
            if t.spec.resume {
                String::new()
            } else {
                "    tune.ssl.cachesize 0\n    ssl-default-bind-options no-tls-tickets\n".to_owned()
            },
            format!(" ssl crt {} alpn http/1.1", t.files.combined.display()),
        ),
    };
    format!(
        "global\n    nbthread 1\n    maxconn 9950\n    fd-hard-limit 20000\n{global_tls}\n\
         defaults\n    mode http\n    maxconn 9950\n    timeout connect 5s\n    timeout client 1h\n    \
         timeout server 1h\n    timeout tunnel 1h\n    timeout http-request 10s\n\n\
         frontend fe\n    bind 127.0.0.1:{port}{bind_tls}\n    default_backend be\n\n\
         backend be\n    balance url_param client\n    hash-type consistent\n{servers}"
    )
}

pub(super) async fn start_haproxy(
    backends: &[(String, SocketAddr)],
    dir: &Path,
    tls: Option<&RunTls>,
) -> Result<Target> {
    let program = find_program("haproxy").ok_or_else(|| anyhow!("haproxy not found"))?;
    let port = free_port()?;
    let conf = haproxy_config(port, backends, tls);
    let path = crate::bench::write_file(dir, "haproxy.cfg", &conf)?;
    let mut cmd = Command::new(&program);
    cmd.arg("-f").arg(&path).arg("-db").stderr(log_file(dir, "haproxy.log")?);
    let mut proc = ChildProcess::spawn_piped("haproxy", cmd)?;
    proc.drain_stdout();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let client = tls.map(|t| t.client.clone());
    let negotiated = wait_upgrade(addr, client.as_ref(), Duration::from_secs(10))
        .await
        .with_context(|| format!("see {}", dir.join("haproxy.log").display()))?;
    let version = version_of(&program, "-v").await;
    let threads = procfs::sample(proc.pid()).map(|s| s.threads).unwrap_or(0);
    let tls_note = match tls {
        Some(t) if t.spec.resume => ", bind … ssl crt (cert+key PEM) alpn http/1.1, sessions and tickets on",
        Some(_) => ", bind … ssl crt (cert+key PEM) alpn http/1.1, tune.ssl.cachesize 0, no-tls-tickets",
        None => "",
    };
    Ok(Target {
        kind: Kind::Haproxy,
        addr,
        pid: Some(proc.pid()),
        setup: format!(
            "{version}; nbthread 1 ({threads} threads), balance url_param client + hash-type consistent, no \
             logs{tls_note}"
        ),
        tls: client,
        negotiated,
        _proc: Some(proc),
    })
}

/// nginx's configuration (prefix `dir`): one worker, hashing `client` onto the backends;
/// with `tls`, `listen … ssl` with the leaf and its key (ALPN http/1.1 is nginx's own answer
/// without http2) and — unless sessions are to be resumed — no session cache and no tickets.
pub(super) fn nginx_config(dir: &Path, port: u16, backends: &[(String, SocketAddr)], tls: Option<&RunTls>) -> String {
    let servers: String = backends.iter().map(|(_, a)| format!("        server {a};\n")).collect();
    let d = dir.display();
    let (listen_tls, server_tls) = match tls {
        None => (String::new(), String::new()),
        Some(t) => (
            " ssl".to_owned(),
            format!(
                "        ssl_certificate {};\n        ssl_certificate_key {};\n        \
                 ssl_protocols TLSv1.2 TLSv1.3;\n{}",
                t.files.cert.display(),
                t.files.key.display(),
                if t.spec.resume {
                    "        ssl_session_cache shared:TLS:10m;\n        ssl_session_tickets on;\n"
                } else {
                    "        ssl_session_cache off;\n        ssl_session_tickets off;\n"
                }
            ),
        ),
    };
    format!(
        "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         worker_rlimit_nofile 20000;\n\
         events {{\n    worker_connections 20000;\n}}\n\
         http {{\n    access_log off;\n    client_body_temp_path {d}/nginx-body;\n    proxy_temp_path {d}/nginx-proxy;\n    \
         fastcgi_temp_path {d}/nginx-fastcgi;\n    uwsgi_temp_path {d}/nginx-uwsgi;\n    scgi_temp_path {d}/nginx-scgi;\n    \
         upstream echo {{\n        hash $arg_client consistent;\n{servers}    }}\n    \
         map $http_upgrade $connection_upgrade {{\n        default upgrade;\n        '' close;\n    }}\n    \
         server {{\n        listen 127.0.0.1:{port}{listen_tls};\n{server_tls}        location / {{\n            proxy_pass http://echo;\n            \
         proxy_http_version 1.1;\n            proxy_set_header Upgrade $http_upgrade;\n            \
         proxy_set_header Connection $connection_upgrade;\n            proxy_read_timeout 3600s;\n            \
         proxy_send_timeout 3600s;\n        }}\n    }}\n}}\n"
    )
}

pub(super) async fn start_nginx(backends: &[(String, SocketAddr)], dir: &Path, tls: Option<&RunTls>) -> Result<Target> {
    let program = find_program("nginx").ok_or_else(|| anyhow!("nginx not found"))?;
    let port = free_port()?;
    let conf = nginx_config(dir, port, backends, tls);
    let path = crate::bench::write_file(dir, "nginx.conf", &conf)?;
    let mut cmd = Command::new(&program);
    cmd.arg("-p").arg(dir).arg("-c").arg(&path).arg("-e").arg(dir.join("nginx-error.log"));
    cmd.stderr(log_file(dir, "nginx.log")?);
    let mut proc = ChildProcess::spawn_piped("nginx", cmd)?;
    proc.drain_stdout();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let client = tls.map(|t| t.client.clone());
    let negotiated = wait_upgrade(addr, client.as_ref(), Duration::from_secs(10))
        .await
        .with_context(|| format!("see {}", dir.join("nginx-error.log").display()))?;
    // The master (our child) only supervises; the worker does the proxying.
    let worker = children_of(proc.pid()).into_iter().next().ok_or_else(|| anyhow!("nginx has no worker process"))?;
    let version = version_of(&program, "-v").await;
    let tls_note = match tls {
        Some(t) if t.spec.resume => ", listen … ssl, session cache and tickets on",
        Some(_) => ", listen … ssl, ssl_session_cache off, ssl_session_tickets off",
        None => "",
    };
    Ok(Target {
        kind: Kind::Nginx,
        addr,
        pid: Some(worker),
        setup: format!(
            "{version}; worker_processes 1 (figures are the worker's), hash $arg_client consistent, access_log \
             off{tls_note}"
        ),
        tls: client,
        negotiated,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn backends() -> Vec<(String, SocketAddr)> {
        vec![("echo-1".into(), "127.0.0.1:4001".parse().unwrap()), ("echo-2".into(), "127.0.0.1:4002".parse().unwrap())]
    }

    /// The lines of `conf` that mention `word`, trimmed.
    fn lines_with<'a>(conf: &'a str, word: &str) -> Vec<&'a str> {
        conf.lines().map(str::trim).filter(|l| l.contains(word)).collect()
    }

    #[test]
    fn haproxy_terminates_tls_with_the_combined_pem_and_no_sessions_unless_resuming() {
        let dir = tempfile::tempdir().unwrap();
        let plain = haproxy_config(8443, &backends(), None);
        assert_eq!(lines_with(&plain, "bind"), ["bind 127.0.0.1:8443"]);
        assert!(!plain.contains("ssl"), "{plain}");
        assert_eq!(lines_with(&plain, "server echo"), ["server echo-1 127.0.0.1:4001", "server echo-2 127.0.0.1:4002"]);

        let tls = RunTls::new(dir.path(), false).unwrap();
        let conf = haproxy_config(8443, &backends(), Some(&tls));
        let crt = tls.files.combined.display().to_string();
        assert_eq!(lines_with(&conf, "bind "), [format!("bind 127.0.0.1:8443 ssl crt {crt} alpn http/1.1")]);
        assert_eq!(lines_with(&conf, "tune.ssl.cachesize"), ["tune.ssl.cachesize 0"]);
        assert_eq!(lines_with(&conf, "ssl-default-bind-options"), ["ssl-default-bind-options no-tls-tickets"]);
        // The global section keeps its lines, the TLS ones inside it (before `defaults`).
        let global = &conf[..conf.find("defaults").unwrap()];
        assert!(global.contains("nbthread 1") && global.contains("tune.ssl.cachesize 0"), "{conf}");

        let resuming = RunTls::new(dir.path(), true).unwrap();
        let conf = haproxy_config(8443, &backends(), Some(&resuming));
        assert!(
            conf.contains(" ssl crt ") && !conf.contains("cachesize") && !conf.contains("no-tls-tickets"),
            "{conf}"
        );
    }

    #[test]
    fn nginx_listens_with_ssl_and_the_leaf_and_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let plain = nginx_config(dir.path(), 8443, &backends(), None);
        assert_eq!(lines_with(&plain, "listen"), ["listen 127.0.0.1:8443;"]);
        assert!(!plain.contains("ssl"), "{plain}");

        let tls = RunTls::new(dir.path(), false).unwrap();
        let conf = nginx_config(dir.path(), 8443, &backends(), Some(&tls));
        assert_eq!(lines_with(&conf, "listen"), ["listen 127.0.0.1:8443 ssl;"]);
        assert_eq!(lines_with(&conf, "ssl_certificate "), [format!("ssl_certificate {};", tls.files.cert.display())]);
        assert_eq!(
            lines_with(&conf, "ssl_certificate_key"),
            [format!("ssl_certificate_key {};", tls.files.key.display())]
        );
        assert_eq!(lines_with(&conf, "ssl_session"), ["ssl_session_cache off;", "ssl_session_tickets off;"]);
        // The TLS lines belong to the server block, before its location.
        let server = &conf[conf.find("server {").unwrap()..conf.find("location /").unwrap()];
        assert!(server.contains("ssl_certificate_key"), "{conf}");

        let resuming = RunTls::new(dir.path(), true).unwrap();
        let conf = nginx_config(dir.path(), 8443, &backends(), Some(&resuming));
        assert_eq!(lines_with(&conf, "ssl_session"), ["ssl_session_cache shared:TLS:10m;", "ssl_session_tickets on;"]);
    }

    #[test]
    fn the_balancer_is_given_the_leaf_and_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let tls = RunTls::new(dir.path(), false).unwrap();
        let args: Vec<String> = balancer_tls_args(&tls).iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args,
            [
                "--tls-cert".to_owned(),
                tls.files.cert.display().to_string(),
                "--tls-key".to_owned(),
                tls.files.key.display().to_string()
            ]
        );
    }
}
