//! The whole data path with real processes: `redis-server`, `tether-node`s and a
//! `tether-balancer`, started by the same `tether_kit` code `tether up` uses.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;
use tether_kit::{BalancerProcess, Cluster};
use tether_proto::hrw;
use tether_tests::{eventually, HttpConn, WsClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

async fn cluster(nodes: usize) -> Result<Cluster> {
    tether_tests::test_cluster(nodes).await
}

/// The node HRW prefers for `id` among `nodes`.
fn home(id: &str, nodes: &[&str]) -> String {
    nodes[hrw::rank(nodes, id)[0]].to_string()
}

/// Finds one id per wanted home node.
fn ids_homed_on(wanted: &[&str], prefix: &str) -> Vec<String> {
    wanted
        .iter()
        .map(|w| {
            (0..)
                .map(|i| format!("{prefix}-{i}"))
                .find(|id| home(id, &NODES) == *w)
                .expect("some id lands on every node")
        })
        .collect()
}

fn url(c: &Cluster, id: &str) -> String {
    format!("{}?client={id}", c.ws_url())
}

async fn status(c: &Cluster) -> Result<HashMap<String, String>> {
    let mut admin = HttpConn::connect(c.balancer().admin_addr()).await?;
    let v = admin.get_json("/status").await?;
    let mut out = HashMap::new();
    for n in v["nodes"].as_array().context("nodes")? {
        out.insert(
            n["name"].as_str().unwrap_or_default().to_string(),
            n["state"].as_str().unwrap_or_default().to_string(),
        );
    }
    Ok(out)
}

#[tokio::test]
async fn seed_scenario_through_the_balancer() -> Result<()> {
    let c = cluster(3).await?;
    let ids = ids_homed_on(&["node-1", "node-2"], "seed");
    let (mut alice, hello_a) = WsClient::connect_ready(&url(&c, &ids[0])).await?;
    let (mut bob, hello_b) = WsClient::connect_ready(&url(&c, &ids[1])).await?;
    assert_eq!(hello_a["server"], "node-1");
    assert_eq!(hello_b["server"], "node-2");
    alice.set_name("Alice").await?;
    bob.set_name("Bob").await?;
    alice.join("general").await?;
    bob.join("general").await?;
    alice.say("general", "Hello from Server-1!").await?;
    for cl in [&mut alice, &mut bob] {
        cl.recv_until("alice's message", |v| v["type"] == "message" && v["from"] == "Alice").await?;
    }
    bob.say("general", "Hello from Server-2!").await?;
    for cl in [&mut alice, &mut bob] {
        cl.recv_until("bob's message", |v| v["type"] == "message" && v["from"] == "Bob").await?;
    }
    alice.say("general", "end").await?;
    for cl in [&mut alice, &mut bob] {
        cl.recv_until("marker", |v| v["type"] == "message" && v["text"] == "end").await?;
        let got: Vec<&Value> = cl.seen.iter().filter(|v| v["type"] == "message").collect();
        assert_eq!(got.len(), 3, "each message exactly once: {got:?}");
        assert_eq!((got[0]["server"].as_str(), got[1]["server"].as_str()), (Some("node-1"), Some("node-2")));
        let seqs: Vec<u64> = got.iter().filter_map(|m| m["seq"].as_u64()).collect();
        assert_eq!(seqs.len(), 3);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    }
    Ok(())
}

#[tokio::test]
async fn the_same_id_always_reaches_the_same_node_and_route_agrees() -> Result<()> {
    let c = cluster(3).await?;
    let mut admin = HttpConn::connect(c.balancer().admin_addr()).await?;
    let mut spread = HashMap::new();
    for i in 0..30 {
        let id = format!("sticky-{i}");
        let routed = admin.get_json(&format!("/route?client={id}")).await?;
        assert_eq!(routed["node"], home(&id, &NODES).as_str(), "HRW over node names: {routed}");
        for _ in 0..3 {
            let (ws, hello) = WsClient::connect_ready(&url(&c, &id)).await?;
            assert_eq!(hello["server"], routed["node"], "{id}");
            ws.close().await;
        }
        *spread.entry(routed["node"].as_str().unwrap_or_default().to_string()).or_insert(0) += 1;
    }
    assert_eq!(spread.len(), 3, "30 ids use every node: {spread:?}");
    // The id may come from the header or the cookie too.
    let id = "sticky-0";
    let mut h = WsClient::connect_with(&c.ws_url(), &[("X-Client-Id", id)]).await?;
    assert_eq!(h.recv_type("connected").await?["id"], id);
    let mut k = WsClient::connect_with(&c.ws_url(), &[("Cookie", "theme=dark; tether_sid=sticky-0")]).await?;
    let hello = k.recv_type("connected").await?;
    assert_eq!((hello["id"].as_str(), hello["server"].as_str()), (Some(id), Some(home(id, &NODES).as_str())));
    Ok(())
}

#[tokio::test]
async fn a_minted_id_comes_back_as_a_cookie_and_sticks() -> Result<()> {
    let c = cluster(2).await?;
    let mut first = WsClient::connect(&c.ws_url()).await?;
    let hello = first.recv_type("connected").await?;
    let cookie =
        first.headers.get("set-cookie").and_then(|v| v.to_str().ok()).context("Set-Cookie on the 101")?.to_string();
    let id = hello["id"].as_str().context("id")?.to_string();
    assert_eq!(id.len(), 32, "128 random bits in hex: {id}");
    assert!(
        cookie.starts_with(&format!("tether_sid={id};"))
            && cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Lax")
    );
    let mut again = WsClient::connect_with(&c.ws_url(), &[("Cookie", &format!("tether_sid={id}"))]).await?;
    let hello2 = again.recv_type("connected").await?;
    assert_eq!((hello2["id"].as_str(), &hello2["server"]), (Some(id.as_str()), &hello["server"]));
    assert!(again.headers.get("set-cookie").is_none(), "no new cookie when one was sent");
    Ok(())
}

#[tokio::test]
async fn bad_client_ids_get_400_before_the_upgrade() -> Result<()> {
    let c = cluster(1).await?;
    for bad in ["client=has%20space", "client=", &format!("client={}", "x".repeat(129)), "client=semi;colon"] {
        let err = WsClient::connect(&format!("{}?{bad}", c.ws_url())).await.err().context("must be refused")?;
        assert!(format!("{err:#}").contains("400"), "{bad}: {err:#}");
    }
    // The balancer and node still serve.
    let (_ok, hello) = WsClient::connect_ready(&url(&c, "fine")).await?;
    assert_eq!(hello["id"], "fine");
    Ok(())
}

#[tokio::test]
async fn dead_node_clients_move_and_others_stay() -> Result<()> {
    let mut c = cluster(3).await?;
    let ids: Vec<String> = (0..24).map(|i| format!("fo-{i}")).collect();
    let mut clients = Vec::new();
    for id in &ids {
        let (mut ws, hello) = WsClient::connect_ready(&url(&c, id)).await?;
        assert_eq!(hello["server"], home(id, &NODES).as_str());
        ws.join("fo").await?;
        clients.push((id.clone(), hello["server"].as_str().unwrap_or_default().to_string(), ws));
    }
    let victims: Vec<String> = clients.iter().filter(|(_, n, _)| n == "node-2").map(|(id, _, _)| id.clone()).collect();
    assert!(!victims.is_empty(), "some ids live on node-2");

    c.node_mut("node-2").context("node-2")?.kill().await?;

    let survivors = ["node-1", "node-3"];
    for (id, node, ws) in clients.iter_mut() {
        if node == "node-2" {
            // Closed promptly by the balancer when the node's side dropped.
            ws.closed_within(Duration::from_secs(5)).await.with_context(|| format!("{id} not closed"))?;
            // The first reconnect succeeds, on the next node in this id's rank.
            let (mut back, hello) =
                WsClient::connect_ready(&url(&c, id)).await.with_context(|| format!("{id} first reconnect"))?;
            assert_eq!(hello["server"], home(id, &survivors).as_str(), "{id} goes to its next-ranked node");
            back.join("fo").await?;
            *ws = back;
            *node = hello["server"].as_str().unwrap_or_default().to_string();
        }
    }
    eventually("node-2 down in /status", || async { (status(&c).await.ok()?.get("node-2")? == "down").then_some(()) })
        .await?;
    // Nobody else moved: every original connection of the others still works where it was,
    // and a fresh connection of theirs lands on the same node.
    let (_, _, ws0) = &mut clients[0];
    ws0.say("fo", "after the kill").await?;
    for (id, node, ws) in clients.iter_mut() {
        ws.recv_until("post-kill message", |v| v["type"] == "message" && v["text"] == "after the kill")
            .await
            .with_context(|| format!("{id} on {node}"))?;
    }
    for (id, node, _) in &clients {
        let (_w, hello) = WsClient::connect_ready(&url(&c, id)).await?;
        assert_eq!(hello["server"], node.as_str(), "{id} stayed");
    }

    // node-2 comes back: it takes no live connection away, but gets its ids' new connections.
    c.node_mut("node-2").context("node-2")?.restart().await?;
    eventually("node-2 up again", || async { (status(&c).await.ok()?.get("node-2")? == "up").then_some(()) }).await?;
    let (_, _, ws0) = &mut clients[0];
    ws0.say("fo", "after the return").await?;
    for (id, node, ws) in clients.iter_mut() {
        ws.recv_until("post-return message", |v| v["type"] == "message" && v["text"] == "after the return")
            .await
            .with_context(|| format!("{id}'s live connection on {node} survived the return"))?;
    }
    for id in &victims {
        let (_w, hello) = WsClient::connect_ready(&url(&c, id)).await?;
        assert_eq!(hello["server"], "node-2", "{id}'s new connections go home");
    }
    Ok(())
}

#[tokio::test]
async fn two_balancer_processes_route_10000_ids_identically() -> Result<()> {
    let c = cluster(3).await?;
    let nodes = c.balancer().nodes().to_vec();
    let other = BalancerProcess::start(&nodes, &[]).await?;
    let mut a = HttpConn::connect(c.balancer().admin_addr()).await?;
    let mut b = HttpConn::connect(other.admin_addr()).await?;
    let names: Vec<&str> = nodes.iter().map(|(n, _)| n.as_str()).collect();
    let mut per_node = HashMap::new();
    for i in 0..10_000 {
        let id = format!("u{i}-{}", i * 7919 % 10007);
        let path = format!("/route?client={id}");
        let (ra, rb) = (a.get_json(&path).await?, b.get_json(&path).await?);
        if ra["node"] != rb["node"] || ra["node"] != home(&id, &names).as_str() {
            bail!("{id}: balancer A says {ra}, balancer B says {rb}");
        }
        *per_node.entry(ra["node"].to_string()).or_insert(0u32) += 1;
    }
    // About a third each (HRW spreads evenly).
    assert!(per_node.values().all(|&n| (2_900..3_800).contains(&n)), "{per_node:?}");
    // And real connections through either balancer agree.
    for i in 0..20 {
        let id = format!("both-{i}");
        let (_x, hx) = WsClient::connect_ready(&url(&c, &id)).await?;
        let (_y, hy) = WsClient::connect_ready(&format!("ws://{}/ws?client={id}", other.addr())).await?;
        assert_eq!(hx["server"], hy["server"]);
    }
    Ok(())
}

async fn send_garbage(addr: std::net::SocketAddr, bytes: &[u8]) -> Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let _ = s.shutdown().await;
    let mut sink = Vec::new();
    // Whatever the server answers (400, or nothing), it must end the exchange.
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink)).await;
    Ok(())
}

#[tokio::test]
async fn garbage_bytes_at_every_port_crash_nothing() -> Result<()> {
    let mut c = cluster(2).await?;
    let (mut live, _) = WsClient::connect_ready(&url(&c, "bystander")).await?;
    live.join("calm").await?;
    let mut junk: Vec<Vec<u8>> = vec![
        b"\x00\x01\x02\x03\xff\xfe\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec(),
        b"GET /ws?client=x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n\x81\xfe\xff\xff garbage frame".to_vec(),
        b"POST /nodes/../../drain HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nabc".to_vec(),
        format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(70_000)).into_bytes(),
    ];
    let mut rng_bytes = vec![0u8; 4096];
    for (i, b) in rng_bytes.iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8;
    }
    junk.push(rng_bytes);
    let mut targets = vec![c.balancer().addr(), c.balancer().admin_addr()];
    targets.extend(c.nodes().iter().map(|n| n.addr()));
    for addr in &targets {
        for j in &junk {
            send_garbage(*addr, j).await?;
        }
    }
    // Every process is alive and serving; the bystander's connection was never touched.
    for n in c.nodes_mut() {
        assert!(n.try_status()?.is_none(), "{} died", n.name());
    }
    assert!(c.balancer_mut().try_status()?.is_none(), "balancer died");
    live.say("calm", "still fine").await?;
    live.recv_until("own message", |v| v["type"] == "message" && v["text"] == "still fine").await?;
    let (_n, hello) = WsClient::connect_ready(&url(&c, "newcomer")).await?;
    assert_eq!(hello["type"], "connected");
    Ok(())
}
