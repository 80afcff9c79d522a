//! `tether chat` driven through a pipe, as a script would, against a real cluster.

mod common;

use anyhow::{anyhow, Context, Result};
use common::{Ws, DEADLINE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::process::Stdio;
use std::time::Duration;
use tether_client::{Client, ClientConfig, Event};
use tether_kit::{Cluster, ClusterLogs, ClusterOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};
use tokio::sync::watch;
use tokio::time::{interval, timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

async fn cluster() -> Result<Cluster> {
    Cluster::start(ClusterOptions { nodes: 2, logs: ClusterLogs::Null, ..ClusterOptions::default() }).await
}

fn chat(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.arg("chat").args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    cmd
}

/// The chat's stdout, read line by line and kept whole for checks at the end.
struct Transcript {
    out: Lines<BufReader<ChildStdout>>,
    lines: Vec<String>,
}

impl Transcript {
    fn new(stdout: ChildStdout) -> Self {
        Self { out: BufReader::new(stdout).lines(), lines: Vec::new() }
    }

    /// Reads lines until one contains `needle`; returns it.
    async fn until(&mut self, needle: &str) -> Result<String> {
        let deadline = Instant::now() + DEADLINE;
        let from = self.lines.len();
        loop {
            let line = timeout_at(deadline, self.out.next_line())
                .await
                .map_err(|_| anyhow!("no line with {needle:?}; saw {:#?}", &self.lines[from..]))??
                .ok_or_else(|| anyhow!("output ended before {needle:?}; saw {:#?}", &self.lines[from..]))?;
            self.lines.push(line.clone());
            if line.contains(needle) {
                return Ok(line);
            }
        }
    }

    /// Reads what is left, up to the end of the output.
    async fn finish(&mut self) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        while let Some(line) = timeout_at(deadline, self.out.next_line()).await.context("output did not end")?? {
            self.lines.push(line);
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_in_a_pipe_joins_talks_and_hears_others() -> Result<()> {
    let cluster = cluster().await?;
    let mut child = chat(&[&cluster.ws_url(), "--client", "carol-pipe", "--name", "Carol"]).spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut out = Transcript::new(child.stdout.take().context("stdout")?);

    out.until("connected as carol-pipe").await?;
    stdin.write_all(b"hello before joining\n").await?;
    out.until("! no current room").await?;

    stdin.write_all(b"/join lobby\n").await?;
    out.until("#lobby + Carol joined").await?;
    stdin.write_all(b"hello from a pipe\n").await?;
    let echo = out.until("#lobby Carol: hello from a pipe (seq ").await?;
    assert!(echo.starts_with("[node-"), "{echo}");

    // Someone on another node, straight to it.
    let dave_node = &cluster.node_urls()[1].1;
    let mut dave = Ws::connect(dave_node, "dave-pipe").await?;
    dave.set_name("Dave").await?;
    dave.join("lobby").await?;
    out.until("[node-2] #lobby + Dave joined").await?;
    dave.say("lobby", "hi carol").await?;
    out.until("[node-2] #lobby Dave: hi carol (seq ").await?;
    stdin.write_all(b"second line\n").await?;
    dave.expect_message("lobby", "second line").await?;

    // A server-side error is printed, not fatal.
    stdin.write_all(b"/room elsewhere\nlost\n").await?;
    out.until("! not_in_room").await?;
    stdin.write_all(b"/room lobby\n/leave\n").await?;
    out.until("#lobby - Carol left").await?;

    drop(stdin);
    let status = timeout(DEADLINE, child.wait()).await??;
    assert!(status.success(), "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_waits_for_its_answers_when_the_input_ends() -> Result<()> {
    let cluster = cluster().await?;
    let mut child = chat(&[&cluster.ws_url(), "--client", "oneshot"]).spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(b"/join r1\nfirst\nsecond\n").await?;
    drop(stdin);
    let output = timeout(DEADLINE, child.wait_with_output()).await??;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}\n{text}", output.status);
    for expected in ["#r1 + oneshot joined", "#r1 oneshot: first (seq", "#r1 oneshot: second (seq"] {
        assert!(text.contains(expected), "no {expected:?} in\n{text}");
    }
    Ok(())
}

/// One room message as the chat printed it.
#[derive(Debug)]
struct Said {
    from: String,
    text: String,
    seq: u64,
    replay: bool,
}

/// Parses `[node-2] #ROOM FROM: TEXT (seq N)` or `… (seq N, replay)`.
fn said_in(room: &str, line: &str) -> Option<Said> {
    let (_, rest) = line.split_once(&format!("] #{room} "))?;
    let (head, tail) = rest.rsplit_once(" (seq ")?;
    let (from, text) = head.split_once(": ")?;
    let tail = tail.strip_suffix(')')?;
    let (seq, replay) = match tail.strip_suffix(", replay") {
        Some(seq) => (seq, true),
        None => (tail, false),
    };
    Some(Said { from: from.to_owned(), text: text.to_owned(), seq: seq.parse().ok()?, replay })
}

/// The chat's node is `SIGKILL`ed while Bob, on the other node, keeps talking. The chat is
/// stopped (`SIGSTOP`) across the kill and until Bob has said ten more things, so that some
/// messages can only reach it through the resume's replay; it is continued afterwards and
/// must reconnect by itself, say so, and show Bob's every message once, in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_whose_node_dies_reconnects_and_shows_every_message_once_in_order() -> Result<()> {
    const ROOM: &str = "deathwatch";
    let mut cluster = cluster().await?;
    let mut child = chat(&[&cluster.ws_url(), "--client", "kill-chat", "--name", "Kim"]).spawn()?;
    let chat_pid = Pid::from_raw(i32::try_from(child.id().context("chat pid")?)?);
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut out = Transcript::new(child.stdout.take().context("stdout")?);
    let connected = out.until("connected as kill-chat").await?;
    let victim = connected.strip_prefix('[').and_then(|l| l.split_once(']')).context("node of the chat")?.0.to_owned();
    stdin.write_all(format!("/join {ROOM}\n").as_bytes()).await?;
    out.until(&format!("#{ROOM} + Kim joined")).await?;

    // Bob talks straight to the node that survives; his own echoes say what got published.
    let (_, survivor) = cluster.node_urls().into_iter().find(|(name, _)| *name != victim).context("a second node")?;
    let mut cfg = ClientConfig::new(survivor);
    cfg.client_id = Some("kill-bob".into());
    cfg.name = Some("Bob".into());
    cfg.jitter = 0.0;
    let (bob, mut bob_events) = Client::start(cfg)?;
    let (echoed_tx, mut echoed) = watch::channel(0usize);
    tokio::spawn(async move {
        while let Some(ev) = bob_events.recv().await {
            if matches!(&ev, Event::Message(m) if m.id == "kill-bob") {
                echoed_tx.send_modify(|n| *n += 1);
            }
        }
    });
    timeout(DEADLINE, bob.join(ROOM)).await.context("bob's join")??;
    let stop = CancellationToken::new();
    let sender = tokio::spawn({
        let (bob, stop) = (bob.clone(), stop.clone());
        async move {
            let mut tick = interval(Duration::from_millis(10));
            let mut sent = 0usize;
            while !stop.is_cancelled() {
                tick.tick().await;
                bob.send(ROOM, &format!("m{sent}")).await.with_context(|| format!("bob sending m{sent}"))?;
                sent += 1;
            }
            anyhow::Ok(sent)
        }
    });

    out.until(&format!("#{ROOM} Bob: m5 (seq ")).await?;
    kill(chat_pid, Signal::SIGSTOP)?;
    let at_kill = *echoed.borrow();
    let status = cluster.node_mut(&victim).context("the chat's node")?.kill().await?;
    assert!(!status.success(), "{victim}: {status}");
    timeout(DEADLINE, echoed.wait_for(|&n| n >= at_kill + 10)).await.context("bob's echoes after the kill")??;
    kill(chat_pid, Signal::SIGCONT)?;

    let reconnected = out.until("~ reconnected to ").await?;
    let back = *echoed.borrow();
    out.until(&format!("#{ROOM} Bob: m{} (seq ", back + 9)).await?;
    stop.cancel();
    let sent = timeout(DEADLINE, sender).await.context("bob's sender")???;
    timeout(DEADLINE, echoed.wait_for(|&n| n >= sent)).await.context("bob's last echoes")??;
    stdin.write_all(b"back again\n").await?;
    out.until(&format!("#{ROOM} Kim: back again (seq ")).await?;
    drop(stdin);
    out.finish().await?;
    let status = timeout(DEADLINE, child.wait()).await??;
    assert!(status.success(), "{status}");

    let lines = &out.lines;
    let transcript = || lines.join("\n");
    let lost_at = lines.iter().position(|l| l.starts_with("~ connection to ") || l.contains(" closed the connection"));
    let lost_at = lost_at.with_context(|| format!("no line about the lost connection in\n{}", transcript()))?;
    let back_at = lines.iter().position(|l| *l == reconnected).context("reconnect line")?;
    assert!(lost_at < back_at, "{}", transcript());
    assert!(!lines.iter().any(|l| l.starts_with('!')), "no warning expected:\n{}", transcript());

    let said: Vec<(usize, Said)> = lines.iter().enumerate().filter_map(|(i, l)| Some((i, said_in(ROOM, l)?))).collect();
    let seqs: Vec<u64> = said.iter().map(|(_, s)| s.seq).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "every seq once, in order:\n{}", transcript());
    let bobs: Vec<&str> = said.iter().filter(|(_, s)| s.from == "Bob").map(|(_, s)| s.text.as_str()).collect();
    let all: Vec<String> = (0..sent).map(|i| format!("m{i}")).collect();
    assert_eq!(bobs, all, "bob's every message once, in order:\n{}", transcript());
    assert_eq!(said.last().map(|(_, s)| (s.from.as_str(), s.text.as_str())), Some(("Kim", "back again")));

    // What was said while the chat was cut off came back as replays, and only then.
    let replays: Vec<usize> = said.iter().filter(|(_, s)| s.replay).map(|(i, _)| *i).collect();
    assert!(!replays.is_empty(), "nothing was replayed:\n{}", transcript());
    assert!(replays.iter().all(|&i| lost_at < i && i < back_at), "{}", transcript());
    let count = format!("{} missed message", replays.len());
    assert!(reconnected.contains(&count) && reconnected.contains("session restored"), "{reconnected}");
    Ok(())
}

#[tokio::test]
async fn chat_refuses_a_bad_url_with_exit_code_1() -> Result<()> {
    for url in ["http://127.0.0.1:1/ws", "nonsense"] {
        let output = chat(&[url]).stdin(Stdio::null()).output().await?;
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{url}: {err}");
        assert!(err.contains("ws://"), "{url}: {err}");
    }
    Ok(())
}

#[tokio::test]
async fn compare_rejects_a_bad_flag_before_starting_anything() -> Result<()> {
    // (Its real runs are in the workspace's end-to-end tests: tests/tests/compare.rs.)
    let out = std::env::temp_dir().join(format!("tether-compare-bad-flags-{}", std::process::id()));
    for (args, names) in [
        (&["compare", "--clients", "10", "--rooms", "11"][..], "--rooms"),
        (&["compare", "--modes", "kafka"], "--modes"),
        (&["compare", "--steps", "100,0"], "--steps"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_tether")).args(args).arg("--out").arg(&out).output().await?;
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(names), "names the flag: {err}");
    }
    assert!(!out.exists(), "nothing was started or written");
    Ok(())
}

#[tokio::test]
async fn chaos_rejects_a_bad_flag_before_starting_anything() -> Result<()> {
    for args in [&["chaos", "--rate", "0"][..], &["chaos", "--duration", "0"], &["chaos", "--clients", "0"]] {
        let output = Command::new(env!("CARGO_BIN_EXE_tether")).args(args).output().await?;
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(args[1]), "names the flag: {err}");
    }
    Ok(())
}
