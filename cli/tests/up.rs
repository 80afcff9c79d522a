//! `tether up` end to end: the real binary, its real children, a real client, a real SIGINT.

mod common;

use anyhow::{anyhow, Context, Result};
use common::{alive, http_get, wait_gone, Ws, DEADLINE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::SocketAddr;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::{timeout, timeout_at, Instant};

/// The summary line for `label`, split into words.
fn words<'a>(lines: &'a [String], label: &str) -> Result<Vec<&'a str>> {
    lines
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&label))
        .ok_or_else(|| anyhow!("no `{label}` line in {lines:#?}"))
}

/// The number after `pid` on a summary line.
fn pid_of(words: &[&str]) -> Result<u32> {
    let at =
        words.iter().position(|w| w.trim_start_matches('(') == "pid").ok_or_else(|| anyhow!("no pid in {words:?}"))?;
    Ok(words[at + 1].trim_end_matches(')').parse()?)
}

/// Starts `tether up` with `args` on free ports, logs in `logs`; returns it, its stdout and
/// the summary's lines (up to the Ctrl-C hint).
async fn start_up(
    args: &[&str],
    logs: &std::path::Path,
) -> Result<(tokio::process::Child, tokio::io::Lines<BufReader<tokio::process::ChildStdout>>, Vec<String>)> {
    let mut up = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["up", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(args)
        .arg("--logs")
        .arg(logs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdout = BufReader::new(up.stdout.take().context("stdout")?).lines();
    // The summary ends with the Ctrl-C hint.
    let mut lines = Vec::new();
    let deadline = Instant::now() + DEADLINE * 2;
    loop {
        let line = timeout_at(deadline, stdout.next_line())
            .await
            .map_err(|_| anyhow!("no summary; got {lines:#?}"))??
            .ok_or_else(|| anyhow!("tether up exited early; printed {lines:#?}"))?;
        let done = line.starts_with("Ctrl-C");
        lines.push(line);
        if done {
            break;
        }
    }
    Ok((up, stdout, lines))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_through_its_balancer_and_stops_cleanly_on_sigint() -> Result<()> {
    let logs = tempfile::tempdir()?;
    let (mut up, mut stdout, lines) = start_up(&["--nodes", "2"], logs.path()).await?;
    let up_pid = up.id().context("pid")?;
    let balancer = words(&lines, "balancer")?;
    let ws_url = balancer[1].to_owned();
    assert!(ws_url.starts_with("ws://127.0.0.1:") && ws_url.ends_with("/ws"), "{ws_url}");
    assert!(!ws_url.contains(":0/"), "the bound port, not 0: {ws_url}");
    let admin_url = words(&lines, "admin")?[1].to_owned();
    let admin: SocketAddr = admin_url.trim_start_matches("http://").trim_end_matches("/status").parse()?;
    let mut pids = vec![pid_of(&balancer)?, pid_of(&words(&lines, "redis")?)?];
    for node in ["node-1", "node-2"] {
        pids.push(pid_of(&words(&lines, node)?)?);
    }
    assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");

    // A client through the printed balancer URL gets its own message back.
    let mut client = Ws::connect(&ws_url, "up-e2e").await?;
    client.join("general").await?;
    client.say("general", "through the balancer").await?;
    client.expect_message("general", "through the balancer").await?;
    let (status, body) = http_get(admin, "/status").await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("node-1") && body.contains("node-2"), "{body}");
    drop(client);

    kill(Pid::from_raw(i32::try_from(up_pid)?), Signal::SIGINT)?;
    let status = timeout(DEADLINE, up.wait()).await??;
    let mut rest = Vec::new();
    while let Some(line) = stdout.next_line().await? {
        rest.push(line);
    }
    assert!(status.success(), "tether up exited with {status}; said {rest:#?}");
    assert!(rest.iter().any(|l| l.contains("stopped cleanly")), "{rest:#?}");
    wait_gone(&pids).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_tls_serves_wss_with_the_ca_it_prints_and_reuses_its_tls_dir() -> Result<()> {
    let (logs, tls_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let tls_path = tls_dir.path().to_str().context("utf-8 temp path")?;
    let (mut up, _stdout, lines) =
        start_up(&["--nodes", "1", "--node-arg=--backbone=none", "--tls", "--tls-dir", tls_path], logs.path()).await?;
    let ws_url = words(&lines, "balancer")?[1].to_owned();
    assert!(ws_url.starts_with("wss://127.0.0.1:") && ws_url.ends_with("/ws"), "{ws_url}");
    let ca_line = words(&lines, "ca")?;
    let ca = std::path::PathBuf::from(ca_line[1]);
    assert_eq!(ca, tls_dir.path().join("ca.pem"), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("made for this run")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains(&format!("--ca {}", ca.display()))), "the hint names the CA: {lines:#?}");

    // wss through the balancer, trusting only the printed CA; plain ws is not served there.
    let mut client = Ws::connect_tls(&ws_url, "up-tls", &ca).await?;
    client.join("general").await?;
    client.say("general", "over tls").await?;
    client.expect_message("general", "over tls").await?;
    let plain = ws_url.replacen("wss://", "ws://", 1);
    assert!(timeout(DEADLINE, Ws::connect(&plain, "up-plain")).await?.is_err(), "plain ws on the TLS port");
    drop(client);

    // `tether chat --ca` talks over it too.
    let mut chat = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["chat", &ws_url, "--client", "up-tls-chat", "--ca"])
        .arg(&ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = chat.stdin.take().context("stdin")?;
    let mut out = BufReader::new(chat.stdout.take().context("stdout")?).lines();
    use tokio::io::AsyncWriteExt as _;
    stdin.write_all(b"/join lobby\nhello over wss\n").await?;
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let line = timeout_at(deadline, out.next_line())
            .await
            .map_err(|_| anyhow!("chat never echoed; saw {seen:#?}"))??
            .ok_or_else(|| anyhow!("chat output ended; saw {seen:#?}"))?;
        let done = line.contains("hello over wss (seq ");
        seen.push(line);
        if done {
            break;
        }
    }
    drop(stdin);
    assert!(timeout(DEADLINE, chat.wait()).await??.success());
    up.kill().await?;
    up.wait().await?;

    // A second run with the same --tls-dir serves the same certificate: the CA still works.
    let (mut up, _stdout, lines) =
        start_up(&["--nodes", "1", "--node-arg=--backbone=none", "--tls", "--tls-dir", tls_path], logs.path()).await?;
    assert!(lines.iter().any(|l| l.contains("reused")), "{lines:#?}");
    let ws_url = words(&lines, "balancer")?[1].to_owned();
    let mut client = Ws::connect_tls(&ws_url, "up-tls-again", &ca).await?;
    client.join("general").await?;
    client.say("general", "again").await?;
    client.expect_message("general", "again").await?;
    up.kill().await?;
    Ok(())
}
