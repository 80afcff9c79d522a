//! Webhooks end to end: real node processes on a private Redis, real WebSocket clients, and
//! an in-process receiver that records every request and checks its signature.
//!
//! What is pinned: each event is decided once for the whole cluster — one `client.online`
//! per first connection, one `client.offline` per client gone for good (`node_down` for a
//! killed node's), nothing for clients that fail over within the grace, occupied/vacated
//! once per transition, member joined/left once each — every body signed and with a unique
//! id, retries byte for byte the same, and a receiver that was down gets everything after.

use anyhow::{ensure, Result};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tether_kit::wait::eventually;
use tether_kit::{NodeProcess, ReceiverMode, RedisServer, WebhookReceiver};
use tether_tests::{http_get, WsClient};

const SECRET: &str = "test-secret";
/// The grace of these tests: long enough for a client to reconnect to another node after
/// its node was reaped, short enough to keep the tests quick.
const GRACE_MS: u64 = 2000;
const PRESENCE_TTL_MS: u64 = 900;
/// Long enough for an event's grace, its claim and its delivery.
const EVENTS_DEADLINE: Duration = Duration::from_secs(20);

/// A node config file with webhooks to `receiver` (and `extra` lines in the table).
fn config(receiver: &WebhookReceiver, extra: &str) -> Result<tempfile::NamedTempFile> {
    let text = format!(
        "presence_ttl_ms = {PRESENCE_TTL_MS}\n\n[webhooks]\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\
         offline_grace_ms = {GRACE_MS}\ntimeout_ms = 1000\nretry_min_ms = 100\nretry_max_ms = 500\n{extra}\n",
        receiver.url()
    );
    let mut file = tempfile::NamedTempFile::new()?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    Ok(file)
}

async fn node(name: &str, redis: &RedisServer, cfg: &tempfile::NamedTempFile) -> Result<NodeProcess> {
    let args = ["--config".to_string(), cfg.path().display().to_string()];
    NodeProcess::start(name, &redis.url(), &args).await
}

fn url(node: &NodeProcess, client: &str) -> String {
    format!("{}?client={client}", node.ws_url())
}

/// One delivered event, reduced to what a test compares: `(type, key fields)`.
fn key(v: &Value) -> (String, String) {
    let d = &v["data"];
    let s = |k: &str| d[k].as_str().unwrap_or("").to_string();
    let detail = match v["type"].as_str().unwrap_or("") {
        "client.online" => s("client"),
        "client.offline" => format!("{} {}", s("client"), s("reason")),
        "room.occupied" | "room.vacated" => s("room"),
        "member.joined" => format!("{} {}", s("room"), s("client")),
        "member.left" => format!("{} {} {}", s("room"), s("client"), s("reason")),
        other => format!("unknown {other}"),
    };
    (v["type"].as_str().unwrap_or("").to_string(), detail)
}

/// The delivered events, counted by key.
fn tally(receiver: &WebhookReceiver) -> BTreeMap<(String, String), usize> {
    let mut t = BTreeMap::new();
    for r in receiver.delivered() {
        *t.entry(key(&r.json)).or_insert(0) += 1;
    }
    t
}

fn ev(kind: &str, detail: &str) -> (String, String) {
    (kind.to_string(), detail.to_string())
}

/// Waits until every one of `expected` has been delivered at least once.
async fn delivered_all(receiver: &WebhookReceiver, expected: &[(String, String)]) -> Result<()> {
    let r = eventually(EVENTS_DEADLINE, "the expected webhook events", || async {
        let t = tally(receiver);
        expected.iter().all(|k| t.contains_key(k))
    })
    .await;
    if r.is_err() {
        let t = tally(receiver);
        let missing: Vec<_> = expected.iter().filter(|k| !t.contains_key(*k)).collect();
        anyhow::bail!("missing {missing:?}; delivered {t:?}");
    }
    Ok(())
}

/// Every request was signed right, typed JSON, with its id in the header; delivered ids are
/// unique; every attempt of one id carried the same body.
fn check_requests(receiver: &WebhookReceiver) -> Result<()> {
    let mut bodies: HashMap<String, bytes::Bytes> = HashMap::new();
    for r in receiver.requests() {
        ensure!(r.signature_ok, "bad signature on {:?}", r.body);
        ensure!(r.content_type == "application/json", "content type {:?}", r.content_type);
        ensure!(r.json["id"] == r.event_id.as_str(), "header id {} vs body {}", r.event_id, r.json);
        ensure!(r.json["time"].as_str().is_some_and(|t| t.ends_with('Z')), "time {}", r.json);
        let first = bodies.entry(r.event_id.clone()).or_insert_with(|| r.body.clone());
        ensure!(*first == r.body, "a retry changed the body of {}", r.event_id);
    }
    let delivered = receiver.delivered();
    let mut ids: Vec<&str> = delivered.iter().map(|r| r.event_id.as_str()).collect();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    ensure!(ids.len() == n, "a delivered id repeats");
    Ok(())
}

#[tokio::test]
async fn events_are_decided_once_through_joins_leaves_disconnects_and_a_node_kill() -> Result<()> {
    let redis = RedisServer::start().await?;
    let receiver = WebhookReceiver::start(SECRET.as_bytes()).await?;
    let cfg = config(&receiver, "")?;
    let n1 = node("node-1", &redis, &cfg).await?;
    let mut n2 = node("node-2", &redis, &cfg).await?;
    let n3 = node("node-3", &redis, &cfg).await?;

    let (mut alice, _) = WsClient::connect_ready(&url(&n1, "alice")).await?;
    let (mut bob, _) = WsClient::connect_ready(&url(&n2, "bob")).await?;
    let (mut carol, _) = WsClient::connect_ready(&url(&n2, "carol")).await?;
    let (mut erin, _) = WsClient::connect_ready(&url(&n2, "erin")).await?;
    let (mut dave, _) = WsClient::connect_ready(&url(&n3, "dave")).await?;
    // A second tab of alice's, on another node: still one client.online.
    let (alice_tab, _) = WsClient::connect_ready(&url(&n3, "alice")).await?;
    for c in [&mut alice, &mut bob, &mut carol, &mut erin] {
        c.join("lobby").await?;
    }
    carol.join("side").await?;
    dave.join("side").await?;
    let mut expected: Vec<_> =
        ["alice", "bob", "carol", "erin", "dave"].iter().map(|c| ev("client.online", c)).collect();
    expected.extend(["alice", "bob", "carol", "erin"].iter().map(|c| ev("member.joined", &format!("lobby {c}"))));
    expected.extend(["carol", "dave"].iter().map(|c| ev("member.joined", &format!("side {c}"))));
    expected.extend([ev("room.occupied", "lobby"), ev("room.occupied", "side")]);
    delivered_all(&receiver, &expected).await?;

    // An explicit leave is reported at once; a rejoin is a new join, but the room never
    // emptied.
    alice.leave("lobby").await?;
    alice.recv_until("own user_left", |v| v["type"] == "user_left" && v["id"] == "alice").await?;
    alice.join("lobby").await?;
    expected.push(ev("member.left", "lobby alice left"));
    delivered_all(&receiver, &expected).await?;
    // A closed second tab says nothing: alice is still connected.
    alice_tab.close().await;
    // A clean disconnect: offline and left after the grace; `side` still has carol.
    dave.close().await;
    expected.extend([ev("client.offline", "dave disconnected"), ev("member.left", "side dave disconnected")]);

    // node-2 dies: bob reconnects to another node at once (before the reap), erin only after
    // the reap was announced (within the grace); carol never does.
    n2.kill().await?;
    drop((bob, carol, erin));
    let (_bob2, hello) = WsClient::connect_ready(&url(&n3, "bob")).await?;
    ensure!(hello["session"] == "restored", "{hello}");
    alice.recv_until("carol's node_down", |v| v["type"] == "user_left" && v["id"] == "carol").await?;
    let (_erin2, hello) = WsClient::connect_ready(&url(&n1, "erin")).await?;
    ensure!(hello["session"] == "restored", "{hello}");
    expected.extend([
        ev("client.offline", "carol node_down"),
        ev("member.left", "lobby carol node_down"),
        ev("member.left", "side carol node_down"),
        ev("room.vacated", "side"),
    ]);
    delivered_all(&receiver, &expected).await?;

    // A marker: zed's offline is due a whole grace after anything the kill could have left
    // pending (claims go in due order), so once it is delivered nothing else is coming.
    let (zed, _) = WsClient::connect_ready(&url(&n1, "zed")).await?;
    zed.close().await;
    expected.extend([ev("client.online", "zed"), ev("client.offline", "zed disconnected")]);
    delivered_all(&receiver, &expected).await?;

    let t = tally(&receiver);
    let mut want: BTreeMap<(String, String), usize> = BTreeMap::new();
    for k in &expected {
        *want.entry(k.clone()).or_insert(0) += 1;
    }
    // alice's rejoin after her explicit leave is a second member.joined.
    *want.get_mut(&ev("member.joined", "lobby alice")).unwrap() = 2;
    ensure!(t == want, "delivered events differ from the expected ones:\n got  {t:?}\n want {want:?}");
    check_requests(&receiver)?;
    for n in [&n1, &n3] {
        let (_, metrics) = http_get(n.addr(), "/metrics").await?;
        ensure!(metrics.contains("tether_webhook_delivered_total"), "{metrics}");
        ensure!(metrics.contains("tether_webhook_queue_depth 0"), "{metrics}");
    }
    Ok(())
}

#[tokio::test]
async fn a_receiver_down_for_ten_seconds_gets_every_event_afterwards() -> Result<()> {
    let redis = RedisServer::start().await?;
    let receiver = WebhookReceiver::start(SECRET.as_bytes()).await?;
    let cfg = config(&receiver, "")?;
    let n1 = node("node-1", &redis, &cfg).await?;
    let n2 = node("node-2", &redis, &cfg).await?;

    // Refusing connections for 5 s, then answering 500 for 5 s.
    receiver.set_mode(ReceiverMode::Refuse).await?;
    let (mut a, _) = WsClient::connect_ready(&url(&n1, "a")).await?;
    let (mut b, _) = WsClient::connect_ready(&url(&n2, "b")).await?;
    a.join("r").await?;
    b.join("r").await?;
    b.leave("r").await?;
    b.recv_until("own user_left", |v| v["type"] == "user_left" && v["id"] == "b").await?;
    let down = tokio::time::Instant::now();
    eventually(Duration::from_secs(6), "five seconds of refusing", || async {
        down.elapsed() >= Duration::from_secs(5)
    })
    .await?;
    ensure!(receiver.count() == 0, "nothing got through while refusing");
    receiver.set_mode(ReceiverMode::Fail(500)).await?;
    b.close().await;
    eventually(Duration::from_secs(6), "five seconds of 500s", || async { down.elapsed() >= Duration::from_secs(10) })
        .await?;
    ensure!(receiver.count() > 0, "retries arrived while answering 500");
    ensure!(receiver.delivered().is_empty(), "nothing was accepted yet");
    receiver.set_mode(ReceiverMode::Accept).await?;

    let expected = [
        ev("client.online", "a"),
        ev("client.online", "b"),
        ev("room.occupied", "r"),
        ev("member.joined", "r a"),
        ev("member.joined", "r b"),
        ev("member.left", "r b left"),
        ev("client.offline", "b disconnected"),
    ];
    delivered_all(&receiver, &expected).await?;
    check_requests(&receiver)?;
    let t = tally(&receiver);
    ensure!(t.values().all(|n| *n == 1), "each once: {t:?}");
    // Retried ones came again under the same id (checked byte for byte above).
    let attempts = receiver.requests().len();
    ensure!(attempts > expected.len(), "{attempts} requests for {} events: some were retries", expected.len());
    Ok(())
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_and_the_node_keeps_serving() -> Result<()> {
    let redis = RedisServer::start().await?;
    let receiver = WebhookReceiver::start(SECRET.as_bytes()).await?;
    receiver.set_mode(ReceiverMode::Refuse).await?;
    let cfg = config(&receiver, "queue_len = 2\nworkers = 1")?;
    let n1 = node("node-1", &redis, &cfg).await?;
    let mut clients = Vec::new();
    for i in 0..10 {
        let (mut c, _) = WsClient::connect_ready(&url(&n1, &format!("c{i}"))).await?;
        c.join("busy").await?;
        clients.push(c);
    }
    let dropped = eventually(Duration::from_secs(5), "drops counted in /metrics", || async {
        let (_, m) = http_get(n1.addr(), "/metrics").await.ok()?;
        let line = m.lines().find(|l| l.starts_with("tether_webhook_dropped_total{reason=\"queue_full\"}"))?;
        let n: u64 = line.rsplit(' ').next()?.parse().ok()?;
        (n > 0).then_some(n)
    })
    .await?;
    // 21 events (10 online, 10 joined, 1 occupied) through a queue of 2 and one stuck worker.
    ensure!(dropped >= 15, "dropped {dropped}");
    // Rooms still work.
    clients[0].say("busy", "still here").await?;
    clients[9].recv_until("the message", |v| v["text"] == "still here").await?;
    Ok(())
}
