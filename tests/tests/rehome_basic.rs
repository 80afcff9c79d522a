//! Re-homing through the balancer (`failover = "rehome"`), the basic case: a plain WebSocket
//! client whose node is killed mid-stream keeps its connection, is told once with `rehomed`,
//! and gets every room message exactly once, in seq order — the ones it sent meanwhile too.

use anyhow::{Context, Result};
use std::collections::BTreeSet;
use tether_tests::WsClient;

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

fn id_on(node: &str, prefix: &str) -> String {
    tether_tests::id_ranked(&NODES, prefix, &[node])
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

#[tokio::test]
async fn a_tls_client_is_re_homed_the_same_way() -> Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = tempfile::tempdir()?;
    let ca = tether_kit::certs::DevCa::generate("rehome test CA")?;
    let files = ca.write(dir.path())?;
    let mut args: Vec<String> = ["--health-interval-ms", "100", "--failover", "rehome"].map(String::from).to_vec();
    args.extend([
        "--tls-cert".into(),
        files.cert.display().to_string(),
        "--tls-key".into(),
        files.key.display().to_string(),
    ]);
    let mut c = tether_kit::Cluster::start(tether_kit::ClusterOptions {
        nodes: 3,
        logs: tether_kit::ClusterLogs::Null,
        balancer_args: args,
        ..Default::default()
    })
    .await?;
    let tls = tether_kit::certs::client_config(ca.cert_pem())?;
    let port = c.balancer().addr().port();
    let connect = |id: String| {
        let tls = tls.clone();
        async move {
            let request = format!("wss://localhost:{port}/ws?client={id}").into_client_request()?;
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let (ws, response) = tokio_tungstenite::client_async_tls_with_config(
                request,
                tcp,
                None,
                Some(tokio_tungstenite::Connector::Rustls(tls)),
            )
            .await?;
            let mut client = WsClient::from_stream(ws, response.headers().clone());
            let hello = client.recv_type("connected").await?;
            anyhow::Ok((client, hello))
        }
    };
    let (mut v, hello) = connect(id_on("node-2", "tls-victim")).await?;
    assert_eq!(hello["server"], "node-2");
    v.join("room").await?;
    let (mut t, _) = connect(id_on("node-1", "tls-talker")).await?;
    t.join("room").await?;
    t.say("room", "before").await?;
    v.recv_until("before", |m| m["text"] == "before").await?;
    c.node_mut("node-2").context("node-2")?.kill().await?;
    t.say("room", "during").await?;
    let rehomed = v.recv_until("rehomed", |m| m["type"] == "rehomed").await?;
    assert_eq!(rehomed["from"], "node-2");
    v.say("room", "after").await?;
    v.recv_until("during", |m| m["text"] == "during").await?;
    t.recv_until("after", |m| m["text"] == "after").await?;
    let texts: Vec<&str> =
        v.seen.iter().filter(|m| m["type"] == "message").filter_map(|m| m["text"].as_str()).collect();
    assert_eq!(texts.iter().filter(|t| **t == "during").count(), 1, "{texts:?}");
    Ok(())
}
