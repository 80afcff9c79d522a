//! Re-homing through the balancer (`failover = "rehome"`), the basic case: a plain WebSocket
//! client whose node is killed mid-stream keeps its connection, is told once with `rehomed`,
//! and gets every room message exactly once, in seq order — the ones it sent meanwhile too.

use anyhow::{Context, Result};
use std::collections::BTreeSet;
use tether_proto::hrw;
use tether_tests::WsClient;

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

fn id_on(node: &str, prefix: &str) -> String {
    (0..).map(|i| format!("{prefix}-{i}")).find(|id| NODES[hrw::rank(&NODES, id)[0]] == node).expect("an id")
}

async fn rehome_cluster() -> Result<tether_kit::Cluster> {
    tether_kit::Cluster::start(tether_kit::ClusterOptions {
        nodes: 3,
        logs: tether_kit::ClusterLogs::Null,
        balancer_args: ["--health-interval-ms", "100", "--failover", "rehome"].map(String::from).to_vec(),
        ..Default::default()
    })
    .await
}

/// How the victim's node goes away.
#[derive(Debug, Clone, Copy)]
enum Loss {
    Kill,
    Drain,
    Terminate,
}

#[tokio::test]
async fn a_killed_nodes_plain_client_stays_connected_and_misses_nothing() -> Result<()> {
    moved_without_a_close(Loss::Kill).await
}

#[tokio::test]
async fn a_drained_nodes_plain_client_stays_connected_and_misses_nothing() -> Result<()> {
    moved_without_a_close(Loss::Drain).await
}

#[tokio::test]
async fn a_terminated_nodes_plain_client_stays_connected_and_misses_nothing() -> Result<()> {
    moved_without_a_close(Loss::Terminate).await
}

async fn moved_without_a_close(loss: Loss) -> Result<()> {
    let mut c = rehome_cluster().await?;
    let base = c.ws_url();
    let url = |id: &str| format!("{base}?client={id}");
    let victim = id_on("node-2", "victim");
    let (mut v, hello) = WsClient::connect_ready(&url(&victim)).await?;
    assert_eq!(hello["server"], "node-2");
    v.join("room").await?;
    let talker = id_on("node-1", "talker");
    let (mut t, _) = WsClient::connect_ready(&url(&talker)).await?;
    t.join("room").await?;

    let chatter = tokio::spawn(async move {
        for i in 0..80 {
            t.say("room", format!("t-{i}")).await?;
            t.recv_until("own echo", |m| m["text"] == format!("t-{i}").as_str()).await?;
        }
        anyhow::Ok(t)
    });
    v.recv_until("traffic before the kill", |m| m["text"] == "t-10").await?;
    // The victim sends too, with and without its own msg_id, right around the kill.
    for i in 0..5 {
        v.say("room", format!("v-{i}")).await?;
    }
    match loss {
        Loss::Kill => drop(c.node_mut("node-2").context("node-2")?.kill().await?),
        Loss::Terminate => c.node_mut("node-2").context("node-2")?.terminate()?,
        Loss::Drain => {
            let mut admin = tether_tests::HttpConn::connect(c.balancer().admin_addr()).await?;
            let (status, body) = admin.request(http::Method::POST, "/nodes/node-2/drain").await?;
            anyhow::ensure!(status == 200, "drain: {status} {body}");
        }
    }
    for i in 5..10 {
        v.send(serde_json::json!({"type": "message", "room": "room", "text": format!("v-{i}"), "msg_id": format!("m-{i}")}))
            .await?;
    }
    let rehomed = v.recv_until("rehomed", |m| m["type"] == "rehomed").await?;
    assert_eq!(rehomed["from"], "node-2", "{rehomed}");
    assert_ne!(rehomed["server"], "node-2", "{rehomed}");
    let mut t = chatter.await??;
    v.recv_until("end of chatter", |m| m["text"] == "t-79").await?;
    for i in 0..10 {
        let text = format!("v-{i}");
        if !t.seen.iter().any(|m| m["text"] == text.as_str()) {
            t.recv_until("the victim's messages", |m| m["text"] == text.as_str()).await?;
        }
    }
    // Every message once, in seq order, at both ends.
    for (who, client) in [("victim", &v), ("talker", &t)] {
        let seqs = client.seqs("room");
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(seqs, sorted, "{who}: seqs in order, none twice");
        let texts: Vec<String> = client
            .seen
            .iter()
            .filter(|m| m["type"] == "message")
            .map(|m| m["text"].as_str().unwrap_or_default().to_string())
            .collect();
        let unique: BTreeSet<&String> = texts.iter().collect();
        assert_eq!(unique.len(), texts.len(), "{who}: no text twice: {texts:?}");
        for i in 0..80 {
            assert!(texts.contains(&format!("t-{i}")), "{who} missed t-{i}");
        }
        for i in 0..10 {
            assert!(texts.contains(&format!("v-{i}")), "{who} missed v-{i}");
        }
    }
    assert_eq!(v.seen.iter().filter(|m| m["type"] == "rehomed").count(), 1);
    assert!(!v.seen.iter().any(|m| m["type"] == "connected" && m["server"] != "node-2"), "no second connected");
    Ok(())
}
