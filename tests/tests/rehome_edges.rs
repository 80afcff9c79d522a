//! Re-homing (`failover = "rehome"`) at its edges, with plain WebSocket clients that never
//! reconnect: a rolling restart of every node; a next node that dies or hangs during the
//! switch; a next node that refuses the client; clients that send nothing; a node that dies in
//! the middle of a frame while the client is in the middle of one too; a client that floods
//! during a switch. Real node and balancer processes, a real Redis. The basic kill / drain /
//! SIGTERM cases are in `rehome_basic.rs`.

#[path = "rehome_edges/cut.rs"]
mod cut;

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tether_kit::{BalancerProcess, Cluster, ClusterLogs, ClusterOptions, NodeProcess, RedisServer};
use tether_tests::{Closed, WsClient};
use tokio::io::AsyncWriteExt;

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

fn id_ranked(prefix: &str, order: &[&str]) -> String {
    tether_tests::id_ranked(&NODES, prefix, order)
}

async fn cluster(balancer: &[&str]) -> Result<Cluster> {
    let mut args: Vec<String> = ["--failover", "rehome"].map(String::from).to_vec();
    args.extend(balancer.iter().map(|s| s.to_string()));
    Cluster::start(ClusterOptions { nodes: 3, logs: ClusterLogs::Null, balancer_args: args, ..Default::default() })
        .await
}

/// Every message frame's text, in order of arrival.
fn texts(c: &WsClient) -> Vec<String> {
    c.seen
        .iter()
        .filter(|m| m["type"] == "message")
        .map(|m| m["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Seqs in order, none twice; no text twice; every one of `expected` there.
fn exactly_once_in_order(who: &str, c: &WsClient, room: &str, expected: &BTreeSet<String>) -> Result<()> {
    let seqs = c.seqs(room);
    ensure!(seqs.windows(2).all(|w| w[0] < w[1]), "{who}: seqs not strictly increasing: {seqs:?}");
    let got = texts(c);
    let unique: BTreeSet<&String> = got.iter().collect();
    ensure!(unique.len() == got.len(), "{who}: a text arrived twice: {got:?}");
    let missing: Vec<&String> = expected.iter().filter(|t| !unique.contains(t)).collect();
    ensure!(missing.is_empty(), "{who}: missed {missing:?}");
    Ok(())
}

/// Reads until `c` has seen every one of `texts` (in whatever order they come).
async fn await_texts(c: &mut WsClient, texts: &BTreeSet<String>) -> Result<()> {
    for t in texts {
        if !self::texts(c).contains(t) {
            c.recv_until(&format!("{t:?}"), |m| m["type"] == "message" && m["text"] == t.as_str()).await?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// One member of the rolling-restart room: says something every few tens of milliseconds and
/// waits for its echo, until told to stop; then says `done` and reads until it has every
/// member's.
async fn member(
    mut c: WsClient,
    me: String,
    stop: tokio_util::sync::CancellationToken,
    total: Arc<AtomicUsize>,
) -> Result<(WsClient, Vec<String>)> {
    let mut said = Vec::new();
    let mut i = 0;
    while !stop.is_cancelled() {
        let text = format!("{me}/{i}");
        c.say("room", text.clone()).await?;
        c.recv_until("own echo", |m| m["type"] == "message" && m["text"] == text.as_str())
            .await
            .with_context(|| me.clone())?;
        said.push(text);
        total.fetch_add(1, Ordering::SeqCst);
        i += 1;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok((c, said))
}

#[tokio::test]
async fn a_rolling_restart_of_every_node_disconnects_nobody_and_loses_nothing() -> Result<()> {
    let mut c = cluster(&["--health-interval-ms", "100"]).await?;
    let base = c.ws_url();
    let mut clients = Vec::new();
    for (k, node) in NODES.iter().enumerate() {
        for j in 0..2 {
            let id = id_ranked(&format!("roll{k}{j}"), &[node]);
            let (mut ws, hello) = WsClient::connect_ready(&format!("{base}?client={id}")).await?;
            ensure!(hello["server"] == *node, "{hello}");
            ws.join("room").await?;
            clients.push((id, ws));
        }
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let total = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> =
        clients.into_iter().map(|(id, ws)| tokio::spawn(member(ws, id, stop.clone(), total.clone()))).collect();
    // Traffic all through: each step waits for this many more messages echoed.
    let traffic = |since: usize| {
        let total = total.clone();
        tether_tests::eventually("messages echoed meanwhile", move || {
            let total = total.clone();
            async move { (total.load(Ordering::SeqCst) >= since + 30).then_some(()) }
        })
    };
    traffic(0).await?;

    for node in NODES {
        let before = total.load(Ordering::SeqCst);
        let n = c.node_mut(node).context("node")?;
        n.terminate()?;
        ensure!(n.wait_exit(std::time::Duration::from_secs(15)).await?.is_some(), "{node} did not exit on SIGTERM");
        n.restart().await?;
        n.wait_ready(tether_tests::DEADLINE).await?;
        tether_tests::until_up(&c, node).await?;
        traffic(before).await?;
    }
    stop.cancel();
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await??);
    }
    let mut everything: BTreeSet<String> = done.iter().flat_map(|(_, said)| said.iter().cloned()).collect();
    let names: Vec<String> = done.iter().map(|(c, _)| c.id_hint().unwrap_or_default()).collect();
    for (c, _) in &mut done {
        let me = c.id_hint().unwrap_or_default();
        c.say("room", format!("done/{me}")).await?;
    }
    everything.extend(names.iter().map(|n| format!("done/{n}")));
    for (c, _) in &mut done {
        await_texts(c, &everything).await?;
    }
    for (c, said) in &done {
        let who = c.id_hint().unwrap_or_default();
        exactly_once_in_order(&who, c, "room", &everything)?;
        let moves = c.seen.iter().filter(|m| m["type"] == "rehomed").count();
        ensure!(moves >= 1, "{who} was never re-homed, yet every node restarted");
        ensure!(!said.is_empty(), "{who} said nothing");
        ensure!(c.seen.iter().filter(|m| m["type"] == "connected").count() == 1, "{who} saw a second connected");
        ensure!(!c.seen.iter().any(|m| m["type"] == "error" || m["type"] == "duplicate"), "{who}: {:?}", c.seen);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// The length of `port`'s accept queue (connections the kernel completed that the listener
/// has not accepted), from `/proc/net/tcp`.
fn accept_queue(port: u16) -> Result<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || f[3] != "0A" {
            continue;
        }
        let local = f[1].rsplit(':').next().context("local address")?;
        if u16::from_str_radix(local, 16)? == port {
            let rx = f[4].split(':').nth(1).context("rx_queue")?;
            return Ok(u64::from_str_radix(rx, 16)?);
        }
    }
    bail!("no listening socket on port {port}")
}

/// The victim's next node is frozen when its own node is killed: `then_kill` kills the frozen
/// one once the switch's connection to it is waiting in its accept queue (it dies during the
/// switch); otherwise it just hangs, and the upgrade's timeout moves on. Either way the client
/// lands on the third node, with nothing lost.
async fn next_node_fails_during_the_switch(then_kill: bool) -> Result<()> {
    // Probes rarely: only the switch itself reaches the frozen node's accept queue.
    let mut c = cluster(&["--health-interval-ms", "60000"]).await?;
    let base = c.ws_url();
    let victim = id_ranked("doomed", &["node-2", "node-3", "node-1"]);
    let (mut v, _) = WsClient::connect_ready(&format!("{base}?client={victim}")).await?;
    v.join("room").await?;
    let talker = id_ranked("talker", &["node-1"]);
    let (mut t, _) = WsClient::connect_ready(&format!("{base}?client={talker}")).await?;
    t.join("room").await?;
    t.say("room", "before").await?;
    v.recv_until("before", |m| m["text"] == "before").await?;

    let port = c.node("node-3").context("node-3")?.addr().port();
    c.node_mut("node-3").context("node-3")?.freeze()?;
    let queued = accept_queue(port)?;
    c.node_mut("node-2").context("node-2")?.kill().await?;
    v.say("room", "sent during the switch").await?;
    t.say("room", "said during the switch").await?;
    if then_kill {
        tether_tests::eventually("the switch's connection queued at node-3", || async {
            (accept_queue(port).ok()? > queued).then_some(())
        })
        .await?;
        c.node_mut("node-3").context("node-3")?.kill().await?;
    }
    let rehomed = v.recv_until("rehomed", |m| m["type"] == "rehomed").await?;
    ensure!(rehomed["from"] == "node-2" && rehomed["server"] == "node-1", "{rehomed}");
    t.say("room", "after").await?;
    v.recv_until("after", |m| m["text"] == "after").await?;
    t.recv_until("the victim's", |m| m["text"] == "sent during the switch").await?;
    let all: BTreeSet<String> =
        ["before", "sent during the switch", "said during the switch", "after"].map(String::from).into();
    await_texts(&mut v, &all).await?;
    exactly_once_in_order("victim", &v, "room", &all)?;
    if !then_kill {
        c.node_mut("node-3").context("node-3")?.thaw()?;
    }
    Ok(())
}

#[tokio::test]
async fn a_next_node_that_dies_during_the_switch_is_skipped() -> Result<()> {
    next_node_fails_during_the_switch(true).await
}

#[tokio::test]
async fn a_next_node_that_hangs_during_the_switch_is_skipped() -> Result<()> {
    next_node_fails_during_the_switch(false).await
}

// ---------------------------------------------------------------------------------------------

const SECRET: &str = "rehome-test-secret-0123456789abcdef";

fn token(sub: &str, ttl_secs: i64) -> Result<String> {
    use tether_proto::token::{mint, Claims, MintKey};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let claims = Claims { sub: sub.into(), exp: (now + ttl_secs) as u64, iat: None, name: None, rooms: None };
    Ok(mint(&claims, &MintKey::hs256(SECRET.as_bytes())?)?)
}

/// Nodes with `[auth]` as given per node (`None`: no auth), behind a re-homing balancer.
struct AuthCluster {
    _redis: RedisServer,
    _dir: tempfile::TempDir,
    nodes: Vec<NodeProcess>,
    balancer: BalancerProcess,
}

impl AuthCluster {
    async fn start(auth: [Option<&str>; 3]) -> Result<Self> {
        let redis = RedisServer::start().await?;
        let dir = tempfile::tempdir()?;
        let mut nodes = Vec::new();
        for (name, auth) in NODES.iter().zip(auth) {
            let mut args = Vec::new();
            if let Some(auth) = auth {
                let file = dir.path().join(format!("{name}.toml"));
                std::fs::write(&file, format!("[auth]\n{auth}\n"))?;
                args = vec!["--config".into(), file.display().to_string()];
            }
            nodes.push(NodeProcess::start(name, &redis.url(), &args).await?);
        }
        let list: Vec<(String, SocketAddr)> = nodes.iter().map(|n| (n.name().to_owned(), n.addr())).collect();
        let args = ["--failover", "rehome", "--health-interval-ms", "100"].map(String::from);
        let balancer = BalancerProcess::start(&list, &args).await?;
        Ok(Self { _redis: redis, _dir: dir, nodes, balancer })
    }

    fn url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.balancer.addr())
    }
}

#[tokio::test]
async fn a_next_node_that_refuses_the_client_closes_it_1008() -> Result<()> {
    // node-2 (an old config) takes anyone; node-1 and node-3 require a token: a rolling change
    // to auth, half done. A client without one cannot be moved.
    let auth = format!("hs256_secret = {SECRET:?}");
    let mut c = AuthCluster::start([Some(&auth), None, Some(&auth)]).await?;
    let anon = id_ranked("anon", &["node-2"]);
    let (mut v, hello) = WsClient::connect_ready(&c.url(&format!("client={anon}"))).await?;
    ensure!(hello["server"] == "node-2", "{hello}");
    v.join("room").await?;
    c.nodes[1].kill().await?;
    match v.closed().await? {
        Closed::Code(1008, reason) => ensure!(reason.contains("refused"), "{reason}"),
        other => bail!("expected a 1008 close, got {other:?}; seen {:?}", v.seen),
    }
    ensure!(!v.seen.iter().any(|m| m["type"] == "rehomed"), "{:?}", v.seen);
    Ok(())
}

#[tokio::test]
async fn a_client_that_refreshed_its_token_is_moved_with_the_new_one() -> Result<()> {
    // The token the client connected with expires; it refreshes on the connection, as
    // docs/JWT.md says. The switch must present the fresh token, not the expired one.
    let auth = format!("hs256_secret = {SECRET:?}\nleeway_secs = 0");
    let mut c = AuthCluster::start([Some(&auth), Some(&auth), Some(&auth)]).await?;
    let id = id_ranked("fresh", &["node-2"]);
    let canary_token = token("canary", 2)?;
    let old = token(&id, 2)?;
    let (mut v, hello) = WsClient::connect_ready(&c.url(&format!("client={id}&token={old}"))).await?;
    ensure!(hello["server"] == "node-2", "{hello}");
    v.join("room").await?;
    v.send(json!({"type": "refresh", "token": token(&id, 600)?})).await?;
    v.recv_type("refreshed").await?;
    // Past the first token's exp (leeway 0) a node refuses it: a canary minted with it shows when.
    let canary = format!("ws://{}/ws?client=canary&token={canary_token}", c.nodes[0].addr());
    tether_tests::eventually("the first token expired", || async {
        WsClient::connect(&canary).await.is_err().then_some(())
    })
    .await?;
    c.nodes[1].kill().await?;
    let rehomed = v.recv_until("rehomed", |m| m["type"] == "rehomed").await?;
    ensure!(rehomed["from"] == "node-2", "{rehomed}");
    v.say("room", "still me").await?;
    v.recv_until("own echo", |m| m["text"] == "still me").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn clients_that_send_nothing_are_moved_too() -> Result<()> {
    let mut c = cluster(&["--health-interval-ms", "100"]).await?;
    let base = c.ws_url();
    // Listeners joined once and then stay silent; idlers never sent a single frame.
    let mut listeners = Vec::new();
    let mut idlers = Vec::new();
    for i in 0..4 {
        let (mut l, _) =
            WsClient::connect_ready(&format!("{base}?client={}", id_ranked(&format!("l{i}"), &["node-2"]))).await?;
        l.join("room").await?;
        listeners.push(l);
        let (d, _) =
            WsClient::connect_ready(&format!("{base}?client={}", id_ranked(&format!("d{i}"), &["node-2"]))).await?;
        idlers.push(d);
    }
    let (mut t, _) = WsClient::connect_ready(&format!("{base}?client={}", id_ranked("speaker", &["node-1"]))).await?;
    t.join("room").await?;
    let mut said = BTreeSet::new();
    for i in 0..5 {
        t.say("room", format!("pre-{i}")).await?;
        said.insert(format!("pre-{i}"));
    }
    for l in &mut listeners {
        l.recv_until("pre-4", |m| m["text"] == "pre-4").await?;
    }
    c.node_mut("node-2").context("node-2")?.kill().await?;
    for i in 0..5 {
        t.say("room", format!("mid-{i}")).await?;
        said.insert(format!("mid-{i}"));
    }
    for (k, l) in listeners.iter_mut().enumerate() {
        let r = l.recv_until("rehomed", |m| m["type"] == "rehomed").await?;
        ensure!(r["rooms"] == json!(["room"]), "listener {k}: {r}");
        await_texts(l, &said).await?;
        exactly_once_in_order(&format!("listener {k}"), l, "room", &said)?;
    }
    for (k, d) in idlers.iter_mut().enumerate() {
        let r = d.recv_until("rehomed", |m| m["type"] == "rehomed").await?;
        ensure!(r["rooms"] == json!([]), "idler {k}: {r}");
        ensure!(r["from"] == "node-2", "idler {k}: {r}");
    }
    // Still there, on the new node: an idler speaks for the first time.
    let d = &mut idlers[0];
    d.join("room").await?;
    d.say("room", "first words").await?;
    t.recv_until("the idler's", |m| m["text"] == "first words").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_node_dying_mid_frame_while_the_client_is_mid_frame_loses_neither_frame() -> Result<()> {
    let redis = RedisServer::start().await?;
    let mut nodes = Vec::new();
    for name in NODES {
        nodes.push(NodeProcess::start(name, &redis.url(), &[]).await?);
    }
    let proxy = cut::CutProxy::start(nodes[1].addr()).await?;
    let list: Vec<(String, SocketAddr)> =
        nodes.iter().map(|n| (n.name().to_owned(), if n.name() == "node-2" { proxy.addr } else { n.addr() })).collect();
    let args = ["--failover", "rehome", "--health-interval-ms", "100"].map(String::from);
    let balancer = BalancerProcess::start(&list, &args).await?;
    let url = |id: &str| format!("ws://{}/ws?client={id}", balancer.addr());

    let victim = id_ranked("halfway", &["node-2"]);
    let (mut v, _) = WsClient::connect_ready(&url(&victim)).await?;
    v.join("room").await?;
    let (mut t, _) = WsClient::connect_ready(&url(&id_ranked("big", &["node-1"]))).await?;
    t.join("room").await?;
    t.say("room", "small").await?;
    v.recv_until("small", |m| m["text"] == "small").await?;

    // The client is half way through a frame of its own...
    let mine = cut::masked_text(
        json!({"type": "message", "room": "room", "text": "split by the client"}).to_string().as_bytes(),
    );
    let (head, tail) = mine.split_at(mine.len() / 2);
    v.tcp_mut().context("a plain socket")?.write_all(head).await?;
    // ... when node-2 gets half of a large frame out and dies.
    proxy.arm();
    let big = "x".repeat(30_000);
    t.say("room", big.clone()).await?;
    proxy.cut_done().await?;
    let rehomed = v.recv_until("rehomed", |m| m["type"] == "rehomed").await?;
    ensure!(rehomed["from"] == "node-2", "{rehomed}");
    v.recv_until("the large message, whole", |m| m["text"] == big.as_str()).await?;
    v.tcp_mut().context("a plain socket")?.write_all(tail).await?;
    v.recv_until("own echo", |m| m["text"] == "split by the client").await?;
    t.recv_until("the split frame", |m| m["text"] == "split by the client").await?;
    let all: BTreeSet<String> = ["small", big.as_str(), "split by the client"].map(String::from).into();
    await_texts(&mut v, &all).await?;
    await_texts(&mut t, &all).await?;
    exactly_once_in_order("victim", &v, "room", &all)?;
    exactly_once_in_order("talker", &t, "room", &all)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_client_flooding_during_a_switch_is_closed_1008_and_others_are_not() -> Result<()> {
    let mut c = cluster(&["--health-interval-ms", "60000", "--rehome-buffer-bytes", "65536"]).await?;
    let base = c.ws_url();
    let flooder = id_ranked("flood", &["node-2"]);
    let (mut f, _) = WsClient::connect_ready(&format!("{base}?client={flooder}")).await?;
    f.join("room").await?;
    let calm = id_ranked("calm", &["node-2"]);
    let (mut q, _) = WsClient::connect_ready(&format!("{base}?client={calm}")).await?;
    q.join("room").await?;
    // No node will answer for a while: the switch lasts.
    c.node_mut("node-1").context("node-1")?.freeze()?;
    c.node_mut("node-3").context("node-3")?.freeze()?;
    c.node_mut("node-2").context("node-2")?.kill().await?;
    let chunk = "y".repeat(1000);
    let mut sent = 0usize;
    let closed = loop {
        match f.send(json!({"type": "message", "room": "room", "text": chunk})).await {
            Ok(()) => sent += 1,
            Err(_) => break f.closed().await?,
        }
        if sent == 200 {
            break f.closed().await?;
        }
    };
    match closed {
        Closed::Code(1008, reason) => ensure!(reason.contains("switch"), "{reason}"),
        other => bail!("expected 1008 after {sent} frames, got {other:?}"),
    }
    q.send(json!({"type": "message", "room": "room", "text": "one small one"})).await?;
    c.node_mut("node-1").context("node-1")?.thaw()?;
    c.node_mut("node-3").context("node-3")?.thaw()?;
    q.recv_until("rehomed", |m| m["type"] == "rehomed").await?;
    q.recv_until("own echo", |m| m["text"] == "one small one").await?;
    Ok(())
}
