//! `tether chat` driven through a pipe, as a script would, against a real cluster.

mod common;

use anyhow::{anyhow, Context, Result};
use common::{Ws, DEADLINE};
use serde_json::json;
use std::process::Stdio;
use tether::cluster::{Cluster, ClusterLogs, ClusterOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};
use tokio::time::{timeout, timeout_at, Instant};

async fn cluster() -> Result<Cluster> {
    Cluster::start(ClusterOptions { nodes: 2, logs: ClusterLogs::Null, ..ClusterOptions::default() }).await
}

fn chat(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.arg("chat").args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    cmd
}

/// Reads lines until one contains `needle`; returns it.
async fn until(out: &mut Lines<BufReader<ChildStdout>>, needle: &str) -> Result<String> {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let line = timeout_at(deadline, out.next_line())
            .await
            .map_err(|_| anyhow!("no line with {needle:?}; saw {seen:#?}"))??
            .ok_or_else(|| anyhow!("output ended before {needle:?}; saw {seen:#?}"))?;
        if line.contains(needle) {
            return Ok(line);
        }
        seen.push(line);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_in_a_pipe_joins_talks_and_hears_others() -> Result<()> {
    let cluster = cluster().await?;
    let mut child = chat(&[&cluster.ws_url(), "--client", "carol-pipe", "--name", "Carol"]).spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?).lines();

    until(&mut out, "connected as carol-pipe").await?;
    stdin.write_all(b"hello before joining\n").await?;
    until(&mut out, "! no current room").await?;

    stdin.write_all(b"/join lobby\n").await?;
    until(&mut out, "#lobby + Carol joined").await?;
    stdin.write_all(b"hello from a pipe\n").await?;
    let echo = until(&mut out, "#lobby Carol: hello from a pipe (seq ").await?;
    assert!(echo.starts_with("[node-"), "{echo}");

    // Someone on another node, straight to it.
    let dave_node = &cluster.node_urls()[1].1;
    let mut dave = Ws::connect(dave_node, "dave-pipe").await?;
    dave.send(json!({"type":"set_name","name":"Dave"})).await?;
    dave.join("lobby").await?;
    until(&mut out, "[node-2] #lobby + Dave joined").await?;
    dave.send(json!({"type":"message","room":"lobby","text":"hi carol"})).await?;
    until(&mut out, "[node-2] #lobby Dave: hi carol (seq ").await?;
    stdin.write_all(b"second line\n").await?;
    dave.expect_message("lobby", "second line").await?;

    // A server-side error is printed, not fatal.
    stdin.write_all(b"/room elsewhere\nlost\n").await?;
    until(&mut out, "! not_in_room").await?;
    stdin.write_all(b"/room lobby\n/leave\n").await?;
    until(&mut out, "#lobby - Carol left").await?;

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
async fn planned_subcommands_exit_2_and_say_which_issue() -> Result<()> {
    for (args, said) in [
        (&["compare", "--quick"][..], "tether compare is planned in issue 5"),
        (&["bench", "fanout"], "tether bench fanout is planned in issue 6"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_tether")).args(args).output().await?;
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(err.contains("not implemented yet") && err.contains(said), "{err}");
    }
    Ok(())
}

#[tokio::test]
async fn chaos_rejects_a_bad_flag_before_starting_anything() -> Result<()> {
    for args in [&["chaos", "--rate", "0"][..], &["chaos", "--duration", "0"], &["chaos", "--clients", "0"]] {
        let output = Command::new(env!("CARGO_BIN_EXE_tether")).args(args).output().await?;
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(args[1]), "names the flag: {err}");
    }
    Ok(())
}
