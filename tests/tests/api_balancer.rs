//! The server API through a real balancer in front of real node processes: requests go to
//! any live node (no cookie minted), and with a node killed the balancer's retry lands on a
//! live one, so every call still succeeds.

use anyhow::{Context, Result};
use serde_json::json;
use tether_kit::{ApiClient, Cluster, ClusterLogs, ClusterOptions};

const KEY: &str = "test-api-key-0123456789";

#[tokio::test]
async fn api_calls_through_the_balancer_survive_a_killed_node() -> Result<()> {
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 3,
        logs: ClusterLogs::Null,
        node_args: vec!["--api-key".into(), KEY.into()],
        // Slow health checks: the killed node is found by the refused connect, not a probe.
        balancer_args: vec!["--health-interval-ms".into(), "60000".into()],
        ..Default::default()
    })
    .await?;
    let front = cluster.balancer().addr();
    let mut servers = std::collections::BTreeSet::new();
    for i in 0..6 {
        let mut c = ApiClient::connect(front, Some(KEY)).await?;
        let a = c
            .call_with(
                http::Method::POST,
                "/api/publish",
                &[],
                json!({"room": "r", "text": i.to_string()}).to_string().into(),
            )
            .await?;
        assert_eq!(a.status, 200, "{a:?}");
        let h = c.get("/api/history?room=r&since=0&limit=1000").await?;
        let last = h.body["messages"].as_array().context("messages")?.last().cloned().context("a message")?;
        servers.insert(last["server"].as_str().unwrap_or("").to_string());
    }
    assert!(servers.len() >= 2, "round robin spreads calls over nodes: {servers:?}");
    let a = ApiClient::connect(front, None).await?.get("/api/online").await?;
    assert_eq!(a.status, 401, "the node's answer comes back: {a:?}");

    cluster.node_mut("node-1").context("node-1")?.kill().await?;
    for i in 0..6 {
        let mut c = ApiClient::connect(front, Some(KEY)).await?;
        let a = c
            .post(
                "/api/publish",
                &json!({"room": "r", "text": format!("after {i}"), "idempotency_key": format!("k{i}")}),
            )
            .await?;
        assert_eq!(a.status, 200, "call {i} after the kill: {a:?}");
        assert_eq!(a.body.get("duplicate"), None);
    }
    let status = tether_tests::http_get(cluster.balancer().admin_addr(), "/status").await?.1;
    assert!(status.contains(r#""name":"node-1""#) && status.contains(r#""state":"down""#), "{status}");
    // Over the balancer's own body limit: 413 there.
    let big = json!({"room": "r", "data": "x".repeat(1024 * 1024)});
    let a = ApiClient::connect(front, Some(KEY)).await?.post("/api/publish", &big).await?;
    assert_eq!((a.status, &a.body["error"]["code"]), (413, &json!("too_large")), "{a:?}");

    for name in ["node-2", "node-3"] {
        cluster.node_mut(name).context("node")?.kill().await?;
    }
    let a = ApiClient::connect(front, Some(KEY)).await?.get("/api/online").await?;
    assert_eq!((a.status, &a.body["error"]["code"]), (503, &json!("backbone_unavailable")), "{a:?}");
    Ok(())
}
