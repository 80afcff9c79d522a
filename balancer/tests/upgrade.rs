//! Zero-downtime upgrade of the real `tether-balancer` binary, run from a copy in a temp dir
//! (so that the test can replace the file, as a package upgrade does): chatting WebSocket
//! clients through it to echo mock nodes must see no close and lose or double no message
//! across `SIGUSR2` and `POST /upgrade`; a broken or silent new binary changes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{expect_close_code, http, ids_ranking_first, three_nodes, ws_for, MockNode, NAMES};
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use serde_json::Value;
use tether_kit::{ChildProcess, LogTarget};
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_tether-balancer");
/// Conditions in these tests involve process start-ups under load: a generous bound.
const DEADLINE: Duration = Duration::from_secs(30);

async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tether_kit::eventually(DEADLINE, what, check).await.unwrap_or_else(|e| panic!("{e}"));
}

/// The config file: the upgrade durations and the nodes (in the file, not in flags, so that a
/// test can change them for the next process).
fn config_toml<'a>(nodes: impl Iterator<Item = &'a MockNode>, timeout_secs: u64) -> String {
    config_toml_with(nodes, timeout_secs, "")
}

/// [`config_toml`] with `tables` (e.g. `[tls]`) between the top-level keys and the nodes.
fn config_toml_with<'a>(nodes: impl Iterator<Item = &'a MockNode>, timeout_secs: u64, tables: &str) -> String {
    let mut toml = format!("upgrade_timeout_secs = {timeout_secs}\nupgrade_drain_secs = 5\ngrace_period_ms = 1000\n");
    toml.push_str(tables);
    for node in nodes {
        let node = node.file_node();
        toml.push_str(&format!("[[nodes]]\nname = \"{}\"\naddr = \"{}\"\n", node.name, node.addr));
    }
    toml
}

/// A balancer binary copied into a temp dir, its process group killed when dropped (the
/// processes an upgrade starts are not the test's children).
struct Installed {
    dir: PathBuf,
    proc: Option<ChildProcess>,
    pgid: u32,
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{}", self.pgid)]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Installed {
    /// Installs and starts it; `timeout_secs` is its `upgrade_timeout_secs`.
    async fn start(nodes: &[MockNode], test: &str, timeout_secs: u64) -> Self {
        Self::start_with(nodes, test, timeout_secs, "").await
    }

    /// [`Installed::start`] with `tables` in its config (see [`config_toml_with`]).
    async fn start_with(nodes: &[MockNode], test: &str, timeout_secs: u64, tables: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tether-upgrade-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("tether-balancer");
        std::fs::copy(BIN, &exe).unwrap();
        let config = dir.join("balancer.toml");
        std::fs::write(&config, config_toml_with(nodes.iter(), timeout_secs, tables)).unwrap();
        let mut cmd = Command::new(&exe);
        cmd.arg("--config").arg(&config).args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
        cmd.args(["--health-interval-ms", "100", "--threads", "2"]);
        cmd.stdout(std::process::Stdio::piped()).env("XDG_RUNTIME_DIR", &dir);
        let mut proc = ChildProcess::spawn("balancer", cmd).unwrap();
        let ready = proc.await_ready("tether-balancer", DEADLINE, &LogTarget::Inherit).await.unwrap();
        assert_eq!(ready.get("generation"), Some("1"));
        let (addr, admin) = (ready.addr("listen").unwrap(), ready.addr("admin").unwrap());
        let pgid = proc.pid();
        Self { dir, proc: Some(proc), pgid, addr, admin }
    }

    /// Replaces the installed binary by `exe` (a new file renamed over the old one: the
    /// running process's file stays intact).
    fn replace_with(&self, exe: &Path) {
        let tmp = self.dir.join("tether-balancer.new");
        std::fs::copy(exe, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("tether-balancer")).unwrap();
    }

    /// Replaces the installed binary by a shell script.
    fn replace_with_script(&self, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let script = self.dir.join("script.sh");
        std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        self.replace_with(&script);
    }

    async fn status(&self) -> Option<Value> {
        // During a hand-off either process may answer; a refused connect is not expected.
        let (code, _, body) = http(self.admin, Method::GET, "/status", &[]).await;
        (code == StatusCode::OK).then(|| serde_json::from_str(&body).unwrap())
    }

    async fn post_upgrade(&self) -> Value {
        let (code, _, body) = http(self.admin, Method::POST, "/upgrade", &[]).await;
        assert_eq!(code, StatusCode::ACCEPTED, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits until a process of `generation` answers `/status`; returns its pid.
    async fn wait_generation(&self, generation: u64) -> u64 {
        let pid = std::sync::Mutex::new(0);
        let pid_ref = &pid;
        eventually(&format!("generation {generation} to answer /status"), || async move {
            match self.status().await {
                Some(s) if s["generation"] == generation => {
                    *pid_ref.lock().unwrap() = s["pid"].as_u64().unwrap();
                    assert!(s["started_at"].as_str().unwrap().ends_with('Z'), "{s}");
                    true
                }
                _ => false,
            }
        })
        .await;
        pid.into_inner().unwrap()
    }
}

/// Whether `pid` is gone (or a zombie: it has exited, its parent has not reaped it yet).
fn exited(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) == Some("Z"),
    }
}

/// A WebSocket client that keeps sending numbered messages, two at a time, and checks every
/// echo is the next one it sent: a lost, doubled, reordered or altered byte fails it, and so
/// does any close.
struct Chatter {
    rounds: Arc<AtomicU64>,
    task: JoinHandle<Result<u64, String>>,
}

async fn chatter(addr: std::net::SocketAddr, i: usize, stop: Arc<AtomicBool>) -> Chatter {
    let client = format!("chat-{i}");
    let (mut ws, _) = ws_for(addr, &client).await;
    let rounds = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&rounds);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(40));
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let sent = [format!("{client}:{n}"), format!("{client}:{}:{}", n + 1, "x".repeat((n % 7) as usize * 100))];
            for text in &sent {
                ws.send(Message::text(text.clone())).await.map_err(|e| format!("{client}: send {n}: {e}"))?;
            }
            for text in &sent {
                let got = tokio::time::timeout(Duration::from_secs(10), ws.next())
                    .await
                    .map_err(|_| format!("{client}: no echo of {n} within 10 s"))?;
                match got {
                    Some(Ok(Message::Text(back))) if back.as_str() == text => {}
                    other => return Err(format!("{client}: expected echo {text:?}, got {other:?}")),
                }
            }
            n += 2;
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let _ = ws.close(None).await;
        Ok(n)
    });
    Chatter { rounds, task }
}

/// Waits until every chatter has done `more` rounds past what it had done when called.
async fn every_chatter_progresses(chatters: &[Chatter], more: u64) {
    let marks: Vec<u64> = chatters.iter().map(|c| c.rounds.load(Ordering::Relaxed)).collect();
    eventually(&format!("every client to chat {more} more rounds"), || async {
        chatters.iter().zip(&marks).all(|(c, mark)| c.rounds.load(Ordering::Relaxed) >= mark + more)
            || chatters.iter().any(|c| c.task.is_finished())
    })
    .await;
    for (i, c) in chatters.iter().enumerate() {
        assert!(!c.task.is_finished(), "client {i} stopped early");
    }
}

async fn start_chatters(addr: std::net::SocketAddr, count: usize, stop: &Arc<AtomicBool>) -> Vec<Chatter> {
    let mut chatters = Vec::with_capacity(count);
    for i in 0..count {
        chatters.push(chatter(addr, i, Arc::clone(stop)).await);
    }
    chatters
}

async fn finish(chatters: Vec<Chatter>, stop: &AtomicBool) {
    stop.store(true, Ordering::Relaxed);
    for (i, c) in chatters.into_iter().enumerate() {
        let sent = tokio::time::timeout(DEADLINE, c.task).await.expect("client finished").expect("client task");
        let sent = sent.unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert!(sent > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_upgrades_with_200_chatting_clients_lose_nothing() {
    let nodes = three_nodes().await;
    let mut balancer = Installed::start(&nodes, "chat", 10).await;
    let stop = Arc::new(AtomicBool::new(false));
    let chatters = start_chatters(balancer.addr, 200, &stop).await;
    every_chatter_progresses(&chatters, 3).await;
    let first = balancer.status().await.unwrap();
    assert_eq!(first["generation"], 1);
    assert!(first.get("upgrade").is_none(), "{first}");
    let first_pid = first["pid"].as_u64().unwrap();

    // SIGUSR2: generation 2 takes over, the first process exits 0.
    let kill = std::process::Command::new("kill").args(["-USR2", &first_pid.to_string()]).status().unwrap();
    assert!(kill.success());
    let second_pid = balancer.wait_generation(2).await;
    assert_ne!(second_pid, first_pid);
    let mut old = balancer.proc.take().unwrap();
    let status = tokio::time::timeout(DEADLINE, old.wait()).await.expect("the old process exits").unwrap();
    assert!(status.success(), "the old process exited with {status}");
    let after = balancer.status().await.unwrap();
    assert_eq!(after["pid"].as_u64(), Some(second_pid));
    // Every tunnel is in the new process, counted there.
    assert_eq!(after["client_connections"], 200, "{after}");
    assert_eq!(after["active_connections"], 200, "{after}");
    every_chatter_progresses(&chatters, 3).await;

    // POST /upgrade: generation 3.
    let started = balancer.post_upgrade().await;
    assert_eq!(started["pid"].as_u64(), Some(second_pid));
    let third_pid = balancer.wait_generation(3).await;
    assert_ne!(third_pid, second_pid);
    eventually("the second process to exit", || async { exited(second_pid) }).await;
    every_chatter_progresses(&chatters, 3).await;
    let last = balancer.status().await.unwrap();
    assert_eq!(last["client_connections"], 200, "{last}");
    // The upgrade outcome is the old process's to report; the new one made no attempt.
    assert!(last.get("upgrade").is_none(), "{last}");

    // New clients are served by the new process.
    let (mut ws, hello) = ws_for(balancer.addr, "late-comer").await;
    assert!(hello.server.starts_with("node-"));
    common::echo(&mut ws, "hello after two upgrades").await;
    finish(chatters, &stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_or_silent_new_binary_leaves_the_old_process_serving() {
    let nodes = three_nodes().await;
    let balancer = Installed::start(&nodes, "broken", 3).await;
    let stop = Arc::new(AtomicBool::new(false));
    let chatters = start_chatters(balancer.addr, 20, &stop).await;
    every_chatter_progresses(&chatters, 2).await;
    let pid = balancer.status().await.unwrap()["pid"].as_u64().unwrap();

    // A binary that exits at once.
    balancer.replace_with_script("exit 1");
    balancer.post_upgrade().await;
    let error = std::sync::Mutex::new(String::new());
    let error_ref = &error;
    let balancer_ref = &balancer;
    eventually("the failed upgrade to show in /status", || async move {
        let s = balancer_ref.status().await.unwrap();
        match s.get("upgrade") {
            Some(u) if u["ok"] == false => {
                *error_ref.lock().unwrap() = u["error"].as_str().unwrap().to_owned();
                assert!(u["at"].as_str().unwrap().ends_with('Z'), "{u}");
                true
            }
            _ => false,
        }
    })
    .await;
    let error = error.into_inner().unwrap();
    assert!(error.contains("exited") && error.contains("before taking over"), "{error}");
    let s = balancer.status().await.unwrap();
    assert_eq!((s["pid"].as_u64(), s["generation"].as_u64()), (Some(pid), Some(1)), "{s}");
    every_chatter_progresses(&chatters, 2).await;

    // A binary that never connects: refused after upgrade_timeout_secs, and killed.
    balancer.replace_with_script("exec sleep 120");
    balancer.post_upgrade().await;
    eventually("the timed-out upgrade to show in /status", || async {
        let s = balancer.status().await.unwrap();
        s["upgrade"]["error"].as_str().is_some_and(|e| e.contains("did not connect within 3s"))
            && s["upgrade"]["ok"] == false
    })
    .await;
    let s = balancer.status().await.unwrap();
    assert_eq!((s["pid"].as_u64(), s["generation"].as_u64()), (Some(pid), Some(1)), "{s}");
    every_chatter_progresses(&chatters, 2).await;

    // The real binary back: a good upgrade.
    balancer.replace_with(Path::new(BIN));
    balancer.post_upgrade().await;
    let new_pid = balancer.wait_generation(2).await;
    assert_ne!(new_pid, pid);
    eventually("the old process to exit", || async { exited(pid) }).await;
    every_chatter_progresses(&chatters, 2).await;
    finish(chatters, &stop).await;
}

/// A "new binary" that speaks the hand-off far enough to confirm, then dies on the first batch
/// of tunnels without acknowledging it.
const DIES_AFTER_READY: &str = r#"
import json, os, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(os.environ["TETHER_UPGRADE_SOCKET"])
s.recvmsg(1 << 20, socket.CMSG_SPACE(253 * 4))  # hello and the listeners
meta = json.dumps({"pid": os.getpid()}).encode()
s.send(struct.pack(">4sHBBI", b"TBHO", 1, 2, 0, len(meta)) + meta)
msg = s.recvmsg(1 << 20, socket.CMSG_SPACE(253 * 4))[0]
assert msg[:4] == b"TBHO" and msg[6] == 3, msg[:8]
sys.exit(3)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_dies_mid_hand_off_leaves_every_tunnel_in_the_old_one() {
    let python = tether_kit::find_on_path("python3").expect("this test needs python3 on PATH");
    let nodes = three_nodes().await;
    let balancer = Installed::start(&nodes, "dies", 20).await;
    let stop = Arc::new(AtomicBool::new(false));
    let chatters = start_chatters(balancer.addr, 20, &stop).await;
    every_chatter_progresses(&chatters, 2).await;
    let pid = balancer.status().await.unwrap()["pid"].as_u64().unwrap();

    balancer.replace_with_script(&format!("exec {} - <<'PY'\n{DIES_AFTER_READY}\nPY", python.display()));
    balancer.post_upgrade().await;
    let error = std::sync::Mutex::new(String::new());
    let (error_ref, balancer_ref) = (&error, &balancer);
    eventually("the broken hand-off to show in /status", || async move {
        let s = balancer_ref.status().await.unwrap();
        match s.get("upgrade") {
            Some(u) if u["ok"] == false => {
                *error_ref.lock().unwrap() = u["error"].as_str().unwrap().to_owned();
                true
            }
            _ => false,
        }
    })
    .await;
    let error = error.into_inner().unwrap();
    // Seen either as the socket closing under the wait for the ack, or as the exit.
    assert!(error.contains("batch 1") || error.contains("exited (exit status: 3)"), "{error}");
    let s = balancer.status().await.unwrap();
    assert_eq!((s["pid"].as_u64(), s["generation"].as_u64()), (Some(pid), Some(1)), "{s}");
    // The parked tunnels resumed where they stopped, and the old process accepts again.
    every_chatter_progresses(&chatters, 2).await;
    assert_eq!(s["client_connections"], 20, "{s}");
    let (mut ws, _) = ws_for(balancer.addr, "after-the-failure").await;
    common::echo(&mut ws, "still accepting").await;
    drop(ws);

    // The next attempt moves them all (the park signal was re-armed).
    balancer.replace_with(Path::new(BIN));
    balancer.post_upgrade().await;
    balancer.wait_generation(2).await;
    eventually("the old process to exit", || async { exited(pid) }).await;
    eventually("all 20 tunnels in the new process", || async {
        balancer.status().await.is_some_and(|s| s["client_connections"] == 20)
    })
    .await;
    every_chatter_progresses(&chatters, 2).await;
    finish(chatters, &stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_of_a_node_no_longer_configured_close_1012_in_the_new_process() {
    let nodes = three_nodes().await;
    let balancer = Installed::start(&nodes, "dropped", 10).await;
    let mut kept = Vec::new();
    for id in ids_ranking_first(&NAMES, 0, 3) {
        kept.push(ws_for(balancer.addr, &id).await.0);
    }
    let mut dropped = Vec::new();
    for id in ids_ranking_first(&NAMES, 1, 3) {
        let (ws, hello) = ws_for(balancer.addr, &id).await;
        assert_eq!(hello.server, NAMES[1]);
        dropped.push(ws);
    }
    // The next process runs without node-2.
    let config = config_toml(nodes.iter().filter(|n| n.name != NAMES[1]), 10);
    std::fs::write(balancer.dir.join("balancer.toml"), config).unwrap();
    let pid = balancer.status().await.unwrap()["pid"].as_u64().unwrap();
    let kill = std::process::Command::new("kill").args(["-USR2", &pid.to_string()]).status().unwrap();
    assert!(kill.success());
    balancer.wait_generation(2).await;
    for ws in &mut dropped {
        assert_eq!(expect_close_code(ws).await, 1012);
    }
    for ws in &mut kept {
        common::echo(ws, "my node is still configured").await;
    }
    let s = balancer.status().await.unwrap();
    let names: Vec<&str> = s["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, [NAMES[0], NAMES[2]], "{s}");
    assert_eq!(s["nodes"][0]["active_connections"], 3, "{s}");
    eventually("the old process to exit", || async { exited(pid) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_tunnels_stay_in_the_old_process_then_close_1012_after_the_upgrade_drain() {
    let nodes = three_nodes().await;
    let certs = tempfile::tempdir().unwrap();
    let ca = tether_kit::certs::DevCa::generate("upgrade test CA").unwrap();
    let files = ca.write(certs.path()).unwrap();
    let trust = tether_kit::certs::client_config(ca.cert_pem()).unwrap();
    let tls = format!("[tls]\ncert = {:?}\nkey = {:?}\n", files.cert.to_str().unwrap(), files.key.to_str().unwrap());
    let balancer = Installed::start_with(&nodes, "tls", 10, &tls).await;
    let mut old = Vec::new();
    for i in 0..3 {
        let (mut ws, hello) = common::wss_for(balancer.addr, &trust, &format!("tls-old-{i}")).await;
        assert_eq!(hello.proto, "https", "X-Forwarded-Proto of a TLS client");
        common::echo(&mut ws, "before").await;
        old.push(ws);
    }
    let pid = balancer.status().await.unwrap()["pid"].as_u64().unwrap();
    balancer.post_upgrade().await;
    let new_pid = balancer.wait_generation(2).await;
    assert_ne!(new_pid, pid);
    // The old process still runs those TLS tunnels (a TLS session cannot move)...
    assert!(!exited(pid), "the old process keeps its TLS tunnels");
    for ws in &mut old {
        common::echo(ws, "still in the old process").await;
    }
    // ...while new clients are served by the new one.
    let (mut fresh, _) = common::wss_for(balancer.addr, &trust, "tls-new").await;
    common::echo(&mut fresh, "in the new process").await;
    let s = balancer.status().await.unwrap();
    assert_eq!((s["generation"].as_u64(), s["client_connections"].as_u64()), (Some(2), Some(1)), "{s}");
    // After `upgrade_drain_secs` (5 here) the old ones are told to reconnect, at a frame
    // boundary, and the old process exits.
    for ws in &mut old {
        // Longer than the harness's bound: the drain itself takes 5 s.
        let code = tokio::time::timeout(DEADLINE, async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                    Some(Ok(_)) => {}
                    other => panic!("no close frame: {other:?}"),
                }
            }
        })
        .await
        .expect("a close frame within the drain");
        assert_eq!(code, Some(1012));
    }
    eventually("the old process to exit", || async { exited(pid) }).await;
    common::echo(&mut fresh, "unaffected").await;
}
