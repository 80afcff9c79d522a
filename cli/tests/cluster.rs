//! The `cluster` fixtures against the real binaries (`cargo build --bins` first) and a real
//! `redis-server`.

mod common;

use anyhow::Result;
use common::{alive, wait_gone, Ws};
use std::time::Duration;
use tether_kit::{Cluster, ClusterLogs, ClusterOptions, LogTarget, NodeProcess, RedisServer, SpawnOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

async fn ping(port: u16) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(b"PING\r\n").await?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).await?;
    Ok(line.trim_end().to_owned())
}

fn quiet() -> ClusterOptions {
    ClusterOptions { nodes: 2, logs: ClusterLogs::Null, ..ClusterOptions::default() }
}

#[tokio::test]
async fn redis_server_restarts_on_its_port_and_dies_on_drop() -> Result<()> {
    let mut redis = RedisServer::start().await?;
    let port = redis.port();
    assert_ne!(port, 6379, "never the shared Redis port");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
    assert_eq!(ping(port).await?, "+PONG");
    let first = redis.pid().expect("running");

    redis.kill().await?;
    assert!(!alive(first));
    assert_eq!(redis.pid(), None);
    assert!(ping(port).await.is_err(), "nothing listens after kill");

    redis.restart().await?;
    assert_eq!(redis.port(), port);
    assert_eq!(ping(port).await?, "+PONG");
    let second = redis.pid().expect("running again");
    assert_ne!(first, second);

    drop(redis);
    assert!(!alive(second), "killed and reaped on drop");
    Ok(())
}

#[tokio::test]
async fn nodes_share_rooms_through_redis_and_restart_on_their_port() -> Result<()> {
    let mut cluster = Cluster::start(quiet()).await?;
    assert!(cluster.redis().is_some(), "a private redis-server");
    let urls = cluster.node_urls();
    assert_eq!(urls.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["node-1", "node-2"]);
    assert_eq!(cluster.ws_url(), format!("ws://{}/ws", cluster.balancer().addr()));

    // One client straight on each node: a message crosses Redis to reach the other.
    let mut a = Ws::connect(&urls[0].1, "fixture-a").await?;
    let mut b = Ws::connect(&urls[1].1, "fixture-b").await?;
    a.join("fixtures").await?;
    b.join("fixtures").await?;
    a.say("fixtures", "across").await?;
    let got = b.expect_message("fixtures", "across").await?;
    assert_eq!(got["server"], "node-1");

    // A crash and a restart on the same port, under the same name.
    let node = cluster.node_mut("node-2").expect("node-2");
    let (addr, old_pid) = (node.addr(), node.pid());
    let status = node.kill().await?;
    assert!(!status.success());
    assert!(!alive(old_pid));
    node.restart().await?;
    assert_eq!(node.addr(), addr);
    assert_ne!(node.pid(), old_pid);
    let mut b = Ws::connect(&urls[1].1, "fixture-b2").await?;
    b.expect("connected", |v| v["type"] == "connected" && v["server"] == "node-2").await?;

    let mut pids: Vec<u32> = cluster.nodes().iter().map(NodeProcess::pid).collect();
    pids.push(cluster.balancer().pid());
    pids.extend(cluster.redis().and_then(RedisServer::pid));
    assert_eq!(pids.len(), 4);
    drop(cluster);
    for pid in pids {
        assert!(!alive(pid), "pid {pid} outlived the dropped cluster");
    }
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_stops_everything_with_sigterm() -> Result<()> {
    let mut cluster = Cluster::start(quiet()).await?;
    let reports = cluster.shutdown(Duration::from_secs(10)).await?;
    let labels: Vec<&str> = reports.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(labels, ["balancer", "node-1", "node-2", "redis"], "Redis goes last");
    for r in &reports {
        assert!(r.outcome.is_clean(), "{}: {}", r.label, r.outcome);
    }
    wait_gone(&reports.iter().map(|r| r.pid).collect::<Vec<_>>()).await
}

#[tokio::test]
async fn a_node_that_dies_at_start_is_reported_with_its_exit_status() -> Result<()> {
    let opts = SpawnOptions { stderr: LogTarget::Null, ..SpawnOptions::default() };
    let err = NodeProcess::start_with("node-x", "redis://127.0.0.1:1/", &["--no-such-flag".to_owned()], &opts)
        .await
        .expect_err("an unknown flag must stop the node");
    let err = format!("{err:#}");
    assert!(err.contains("node-x"), "{err}");
    assert!(err.contains("exited before it was ready"), "{err}");
    assert!(err.contains("exit status"), "{err}");
    Ok(())
}

#[tokio::test]
async fn cluster_reports_its_exits_once() -> Result<()> {
    let mut cluster = Cluster::start(quiet()).await?;
    let pid = cluster.nodes()[0].pid();
    cluster.nodes_mut()[0].kill().await?;
    // Already reaped by `kill`, so `next_exit` must not report it; kill another one behind
    // its back and expect exactly that one.
    let victim = cluster.balancer().pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(victim)?), nix::sys::signal::Signal::SIGKILL)?;
    let (label, got_pid, status) = tokio::time::timeout(common::DEADLINE, cluster.next_exit()).await??;
    assert_eq!((label.as_str(), got_pid), ("balancer", victim));
    assert!(!status.success());
    assert_ne!(got_pid, pid);
    Ok(())
}

#[tokio::test]
async fn an_external_redis_is_used_and_left_alone() -> Result<()> {
    let redis = RedisServer::start().await?;
    let mut cluster = Cluster::start(ClusterOptions { nodes: 1, redis: Some(redis.url()), ..quiet() }).await?;
    assert!(cluster.redis().is_none());
    assert_eq!(cluster.redis_url(), redis.url());
    let reports = cluster.shutdown(Duration::from_secs(10)).await?;
    assert!(reports.iter().all(|r| r.label != "redis"), "{reports:?}");
    assert!(redis.pid().is_some_and(alive), "not ours to stop");
    Ok(())
}
