//! Bounded load (`balance = "bounded"`) and paced return (`rebalance = "paced"`) through a real
//! balancer in front of real nodes and a private Redis.
//!
//! One cluster (Redis and three nodes) serves every scenario, in sequence; each scenario starts
//! its own balancer with the settings it needs (the cluster's own one stays the default:
//! `hrw`, `rebalance = "off"`), and its own ids and rooms.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tether_kit::{BalancerProcess, Cluster, ClusterLogs, ClusterOptions, LogTarget, SpawnOptions};
use tether_tests::{id_ranked, Closed, HttpConn, WsClient};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
/// Clients that rank node-2 first, in the paced scenarios.
const FANS: usize = 20;
/// Moves per second the paced scenarios allow.
const RATE: usize = 5;
/// How long a paced scenario may take to move everyone back (at `RATE`, 20 take 4 s).
const MOVE_DEADLINE: Duration = Duration::from_secs(40);

#[tokio::test]
async fn bounded_load_and_paced_return() -> Result<()> {
    let started = Instant::now();
    let mut c = Cluster::start(ClusterOptions {
        nodes: 3,
        logs: ClusterLogs::Null,
        balancer_args: ["--health-interval-ms", "100"].map(String::from).to_vec(),
        ..Default::default()
    })
    .await?;
    bounded_never_passes_its_factor_and_route_agrees(&c).await.context("bounded")?;
    off_gives_a_returning_node_new_connections_only(&mut c).await.context("off")?;
    paced_moves_exactly_its_clients_back_at_its_rate(&mut c).await.context("paced, reconnect")?;
    paced_rehomes_exactly_its_clients_back_without_loss(&mut c).await.context("paced, rehome")?;
    eprintln!("balance scenarios took {:?}", started.elapsed());
    Ok(())
}

#[test]
fn bad_balance_settings_are_refused_naming_the_field() -> Result<()> {
    let bin = tether_kit::bin_path(tether_kit::BALANCER_BIN)?;
    for (args, field) in [
        (&["--balance", "bounded", "--load-factor", "0.5"][..], "load_factor"),
        (&["--rebalance", "paced", "--rebalance-per-sec", "0"], "rebalance_per_sec"),
        (&["--balance", "ring"], "balance"),
        (&["--rebalance", "eager"], "rebalance"),
    ] {
        let out = std::process::Command::new(&bin)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--node", "n=127.0.0.1:1"])
            .args(args)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(field), "{args:?}: the error names {field}: {stderr}");
    }
    Ok(())
}

/// A balancer of its own in front of the cluster's nodes (probing every 100 ms).
async fn balancer(c: &Cluster, args: &[&str]) -> Result<BalancerProcess> {
    let nodes: Vec<(String, std::net::SocketAddr)> =
        c.nodes().iter().map(|n| (n.name().to_owned(), n.addr())).collect();
    let mut all = vec!["--health-interval-ms".to_owned(), "100".to_owned()];
    all.extend(args.iter().map(|a| a.to_string()));
    let stderr = if std::env::var_os("TETHER_TEST_LOGS").is_some() { LogTarget::Inherit } else { LogTarget::Null };
    BalancerProcess::start_with(&nodes, &all, &SpawnOptions { stderr, ..Default::default() }).await
}

fn fan(prefix: &str, i: usize, first: &str) -> String {
    id_ranked(&NODES, &format!("{prefix}{i}"), &[first])
}

/// Per node name: (state, active connections, rebalance moves).
async fn nodes_status(admin: &mut HttpConn) -> Result<BTreeMap<String, (String, u64, u64)>> {
    let status = admin.get_json("/status").await?;
    let mut out = BTreeMap::new();
    for n in status["nodes"].as_array().context("nodes")? {
        let name = n["name"].as_str().context("name")?.to_owned();
        let state = n["state"].as_str().unwrap_or_default().to_owned();
        let active = n["active_connections"].as_u64().context("active_connections")?;
        let moves = n["rebalance_moves"].as_u64().context("rebalance_moves")?;
        out.insert(name, (state, active, moves));
    }
    Ok(out)
}

async fn until_state(b: &BalancerProcess, node: &str, state: &str) -> Result<()> {
    let addr = b.admin_addr();
    tether_kit::eventually(MOVE_DEADLINE, &format!("{node} {state}"), || async move {
        let mut admin = HttpConn::connect(addr).await.ok()?;
        (nodes_status(&mut admin).await.ok()?.get(node)?.0 == state).then_some(())
    })
    .await?;
    Ok(())
}

/// 60 ids that all rank node-1 first: under `bounded` no node ever holds more than
/// ceil(1.25 × mean), and every connection lands where `/route` said just before; under `hrw`
/// the same ids all go to node-1.
async fn bounded_never_passes_its_factor_and_route_agrees(c: &Cluster) -> Result<()> {
    let b = balancer(c, &["--balance", "bounded", "--load-factor", "1.25"]).await?;
    let mut admin = HttpConn::connect(b.admin_addr()).await?;
    let ids: Vec<String> = (0..60).map(|i| fan("bnd", i, "node-1")).collect();
    let mut open = Vec::new();
    let mut landed = BTreeMap::<String, usize>::new();
    for (k, id) in ids.iter().enumerate() {
        let route = admin.get_json(&format!("/route?client={id}")).await?;
        let (ws, hello) = WsClient::connect_ready(&format!("{}?client={id}", b.ws_url())).await?;
        let server = hello["server"].as_str().context("server")?.to_owned();
        assert_eq!(route["node"], server.as_str(), "{id}: /route said {route}, landed on {server}");
        *landed.entry(server).or_default() += 1;
        open.push(ws);
        let placed = k as u64 + 1;
        let cap = (1250 * placed).div_ceil(3000);
        let status = nodes_status(&mut admin).await?;
        let total: u64 = status.values().map(|s| s.1).sum();
        assert_eq!(total, placed, "{status:?}");
        for (name, (_, active, _)) in &status {
            assert!(*active <= cap, "after {placed}: {name} holds {active} > ceil(1.25 × mean) = {cap}");
        }
    }
    assert_eq!(landed.get("node-1"), Some(&25), "the preferred node filled to its bound: {landed:?}");
    assert_eq!(landed.values().sum::<usize>(), 60);
    assert!(landed.len() == 3, "the overflow spread over the others: {landed:?}");
    drop(open);
    // The contrast: plain HRW sends every one of them to node-1.
    for id in &ids[..20] {
        let (_ws, hello) = WsClient::connect_ready(&format!("{}?client={id}", c.ws_url())).await?;
        assert_eq!(hello["server"], "node-1", "{id} under hrw");
    }
    Ok(())
}

/// `rebalance = "off"` (the cluster's own balancer): clients that moved off node-2 while it was
/// down stay where they are when it returns; only a new connection goes to it.
async fn off_gives_a_returning_node_new_connections_only(c: &mut Cluster) -> Result<()> {
    let url = c.ws_url();
    let room = "off-room";
    let mut clients = Vec::new();
    for i in 0..6 {
        let id = fan("off", i, "node-2");
        let (mut ws, hello) = WsClient::connect_ready(&format!("{url}?client={id}")).await?;
        assert_eq!(hello["server"], "node-2");
        ws.join(room).await?;
        clients.push((id, ws));
    }
    c.node_mut("node-2").context("node-2")?.kill().await?;
    let mut moved = Vec::new();
    for (id, mut ws) in clients {
        ws.closed().await?;
        let (mut ws, hello) = WsClient::connect_ready(&format!("{url}?client={id}")).await?;
        assert_ne!(hello["server"], "node-2", "{id}");
        ws.join(room).await?;
        moved.push(ws);
    }
    c.node_mut("node-2").context("node-2")?.restart().await?;
    tether_tests::until_up(c, "node-2").await?;
    let newcomer = fan("off-new", 0, "node-2");
    let (_new, hello) = WsClient::connect_ready(&format!("{url}?client={newcomer}")).await?;
    assert_eq!(hello["server"], "node-2", "a new connection goes to the returning node");
    // Everyone who moved is still connected where it was: each one's message reaches it.
    for (i, ws) in moved.iter_mut().enumerate() {
        let text = format!("still-{i}");
        ws.say(room, text.clone()).await?;
        ws.recv_until("own echo", |m| m["text"] == text.as_str()).await?;
    }
    let mut admin = HttpConn::connect(c.balancer().admin_addr()).await?;
    let status = nodes_status(&mut admin).await?;
    assert!(status.values().all(|s| s.2 == 0), "no rebalance moves with rebalance = off: {status:?}");
    Ok(())
}

/// What a client task saw, with when.
#[derive(Debug)]
enum Seen {
    Connected { id: String, server: String, at: Instant },
    Closed { id: String, how: Closed, at: Instant },
    Rehomed { id: String, from: String, server: String, at: Instant },
}

impl Seen {
    fn id(&self) -> &str {
        match self {
            Self::Connected { id, .. } | Self::Closed { id, .. } | Self::Rehomed { id, .. } => id,
        }
    }
    fn at(&self) -> Instant {
        match self {
            Self::Connected { at, .. } | Self::Closed { at, .. } | Self::Rehomed { at, .. } => *at,
        }
    }
}

/// Everything the client tasks reported so far.
struct Journal {
    rx: mpsc::UnboundedReceiver<Seen>,
    seen: Vec<Seen>,
}

impl Journal {
    /// Waits until `done` holds over what was seen, within `MOVE_DEADLINE`.
    async fn until(&mut self, what: &str, done: impl Fn(&[Seen]) -> bool) -> Result<()> {
        let end = Instant::now() + MOVE_DEADLINE;
        while !done(&self.seen) {
            match tokio::time::timeout_at(end, self.rx.recv()).await {
                Ok(Some(seen)) => self.seen.push(seen),
                Ok(None) => bail!("{what}: every client task ended"),
                Err(_) => bail!("{what}: not within {MOVE_DEADLINE:?}; seen: {:#?}", self.seen),
            }
        }
        Ok(())
    }
}

/// A client that reconnects whenever its connection ends (at most 10 times), reporting each
/// connect and each close.
async fn reconnecting(url: String, id: String, tx: mpsc::UnboundedSender<Seen>, stop: CancellationToken) -> Result<()> {
    for _ in 0..10 {
        let (mut ws, hello) = WsClient::connect_ready(&format!("{url}?client={id}")).await?;
        let server = hello["server"].as_str().unwrap_or_default().to_owned();
        let _ = tx.send(Seen::Connected { id: id.clone(), server, at: Instant::now() });
        let how = tokio::select! {
            how = ws.closed_within(MOVE_DEADLINE * 4) => how?,
            _ = stop.cancelled() => return Ok(()),
        };
        let _ = tx.send(Seen::Closed { id: id.clone(), how, at: Instant::now() });
    }
    bail!("{id} reconnected 10 times")
}

/// Checks that no window of one second holds more than `RATE` moves (+1 for the edges).
fn assert_paced(times: &mut [Instant]) {
    times.sort();
    for (i, t) in times.iter().enumerate() {
        let within = times[i..].iter().take_while(|u| u.duration_since(*t) < Duration::from_secs(1)).count();
        assert!(within <= RATE + 1, "{within} moves within one second (rate {RATE}): {times:?}");
    }
}

/// `rebalance = "paced"`, `failover = "reconnect"`: node-2 is killed, its clients reconnect
/// elsewhere; it comes back, and exactly those clients are closed 1012 `rebalance`, at most
/// `RATE` a second, and reconnect onto it; nobody else is touched.
async fn paced_moves_exactly_its_clients_back_at_its_rate(c: &mut Cluster) -> Result<()> {
    let rate = RATE.to_string();
    let b = balancer(c, &["--rebalance", "paced", "--rebalance-per-sec", &rate]).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut journal = Journal { rx, seen: Vec::new() };
    let stop = CancellationToken::new();
    let fans: BTreeSet<String> = (0..FANS).map(|i| fan("pr", i, "node-2")).collect();
    let others: BTreeSet<String> =
        (0..5).map(|i| fan("pr-a", i, "node-1")).chain((0..5).map(|i| fan("pr-b", i, "node-3"))).collect();
    let mut tasks = Vec::new();
    for id in fans.iter().chain(&others) {
        tasks.push(tokio::spawn(reconnecting(b.ws_url(), id.clone(), tx.clone(), stop.clone())));
    }
    let everyone = fans.len() + others.len();
    journal.until("everyone connected", |s| s.len() >= everyone).await?;
    for s in &journal.seen {
        if let Seen::Connected { id, server, .. } = s {
            assert_eq!(server == "node-2", fans.contains(id), "{id} on {server}");
        }
    }

    let killed = Instant::now();
    c.node_mut("node-2").context("node-2")?.kill().await?;
    let moved_off = |s: &[Seen]| {
        fans.iter().all(|f| {
            s.iter().any(
                |e| matches!(e, Seen::Connected { id, server, at } if id == f && server != "node-2" && *at > killed),
            )
        })
    };
    journal.until("node-2's clients reconnected elsewhere", moved_off).await?;
    until_state(&b, "node-2", "down").await?;

    c.node_mut("node-2").context("node-2")?.restart().await?;
    let back = Instant::now();
    let moved_back = |s: &[Seen]| {
        fans.iter().all(|f| {
            s.iter()
                .any(|e| matches!(e, Seen::Connected { id, server, at } if id == f && server == "node-2" && *at > back))
        })
    };
    journal.until("node-2's clients back on node-2", moved_back).await?;
    until_state(&b, "node-2", "up").await?;

    let mut times = Vec::new();
    for s in journal.seen.iter().filter(|s| s.at() > back) {
        match s {
            Seen::Closed { id, how, at } => {
                assert!(fans.contains(id), "{id} does not rank node-2 first, yet was closed: {how:?}");
                assert_eq!(how, &Closed::Code(1012, "rebalance".into()), "{id}");
                times.push(*at);
            }
            Seen::Connected { id, server, .. } => assert_eq!(server, "node-2", "{id} reconnected elsewhere"),
            Seen::Rehomed { .. } => bail!("a rehomed frame in reconnect mode: {s:?}"),
        }
    }
    assert_eq!(times.len(), FANS, "each of node-2's clients moved back exactly once");
    assert!(
        journal.seen.iter().all(|s| !matches!(s, Seen::Closed { .. }) || fans.contains(s.id())),
        "others untouched"
    );
    assert_paced(&mut times);
    let mut admin = HttpConn::connect(b.admin_addr()).await?;
    let status = nodes_status(&mut admin).await?;
    assert_eq!(status["node-2"].2, FANS as u64, "rebalance_moves: {status:?}");
    stop.cancel();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// A client under `failover = "rehome"`: never reconnects, reports each `rehomed` frame, and
/// is handed back when `stop` fires.
async fn staying(
    mut ws: WsClient,
    id: String,
    tx: mpsc::UnboundedSender<Seen>,
    stop: CancellationToken,
) -> Result<WsClient> {
    loop {
        let frame = tokio::select! {
            frame = ws.recv_within(MOVE_DEADLINE * 4) => frame.with_context(|| id.clone())?,
            _ = stop.cancelled() => return Ok(ws),
        };
        if frame["type"] == "rehomed" {
            let text = |k: &str| frame[k].as_str().unwrap_or_default().to_owned();
            let _ = tx.send(Seen::Rehomed {
                id: id.clone(),
                from: text("from"),
                server: text("server"),
                at: Instant::now(),
            });
        }
    }
}

/// `rebalance = "paced"`, `failover = "rehome"`: the same return, but the clients are re-homed
/// without a close, and none of them misses or repeats a room message through both switches.
async fn paced_rehomes_exactly_its_clients_back_without_loss(c: &mut Cluster) -> Result<()> {
    let rate = RATE.to_string();
    let b = balancer(c, &["--rebalance", "paced", "--rebalance-per-sec", &rate, "--failover", "rehome"]).await?;
    let url = |id: &str| format!("{}?client={id}", b.ws_url());
    let room = "rh-room";
    let (tx, rx) = mpsc::unbounded_channel();
    let mut journal = Journal { rx, seen: Vec::new() };
    let stop = CancellationToken::new();
    let fans: BTreeSet<String> = (0..FANS).map(|i| fan("rh", i, "node-2")).collect();
    let others: BTreeSet<String> =
        (0..4).map(|i| fan("rh-a", i, "node-1")).chain((0..4).map(|i| fan("rh-b", i, "node-3"))).collect();
    let mut tasks = Vec::new();
    for id in fans.iter().chain(&others) {
        let (mut ws, hello) = WsClient::connect_ready(&url(id)).await?;
        assert_eq!(hello["server"] == "node-2", fans.contains(id), "{id}: {hello}");
        ws.join(room).await?;
        tasks.push((id.clone(), tokio::spawn(staying(ws, id.clone(), tx.clone(), stop.clone()))));
    }
    // A talker on node-1 sends 50 messages a second through both switches.
    let talker_id = fan("rh-talker", 0, "node-1");
    let (mut talker, _) = WsClient::connect_ready(&url(&talker_id)).await?;
    talker.join(room).await?;
    let talking = CancellationToken::new();
    let sender = {
        let talking = talking.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut sent = 0usize;
            // Bounded: at 50 a second, far past any scenario's length.
            while sent < 20_000 && !talking.is_cancelled() {
                // Reading meanwhile: a talker that never reads would become a slow consumer.
                tokio::select! {
                    _ = tick.tick() => {
                        talker.say(room, format!("m-{sent}")).await?;
                        sent += 1;
                    }
                    frame = talker.recv_within(MOVE_DEADLINE) => {
                        frame?;
                        // Only the reading matters; keep memory flat.
                        talker.seen.clear();
                    }
                }
            }
            talker.say(room, "end").await?;
            // Kept open until the node has it: a tunnel closed right after a frame may drop it.
            talker.recv_until("own end", |m| m["text"] == "end").await?;
            anyhow::Ok(sent)
        })
    };

    c.node_mut("node-2").context("node-2")?.kill().await?;
    let first = |s: &[Seen]| {
        fans.iter()
            .all(|f| s.iter().any(|e| matches!(e, Seen::Rehomed { id, from, .. } if id == f && from == "node-2")))
    };
    journal.until("node-2's clients re-homed off it", first).await?;
    // Its return is a return only once the balancer saw it gone.
    until_state(&b, "node-2", "down").await?;
    c.node_mut("node-2").context("node-2")?.restart().await?;
    let back = Instant::now();
    let second = |s: &[Seen]| {
        fans.iter().all(|f| {
            s.iter().any(
                |e| matches!(e, Seen::Rehomed { id, server, at, .. } if id == f && server == "node-2" && *at > back),
            )
        })
    };
    journal.until("node-2's clients re-homed back onto it", second).await?;
    let mut times = Vec::new();
    for s in &journal.seen {
        let Seen::Rehomed { id, from, server, at } = s else { bail!("{s:?}") };
        assert!(fans.contains(id), "{id} does not rank node-2 first, yet was re-homed: {s:?}");
        if *at > back {
            assert_eq!((from != "node-2", server.as_str()), (true, "node-2"), "{s:?}");
            times.push(*at);
        }
    }
    assert_eq!(times.len(), FANS, "each of node-2's clients moved back exactly once: {:#?}", journal.seen);
    assert_paced(&mut times);

    talking.cancel();
    let sent = sender.await??;
    ensure!(sent > 0, "the talker sent nothing");
    stop.cancel();
    for (id, task) in tasks {
        let mut ws = task.await??;
        if !ws.seen.iter().any(|m| m["text"] == "end") {
            ws.recv_until("the end marker", |m| m["text"] == "end").await?;
        }
        let messages: Vec<&Value> = ws.seen.iter().filter(|m| m["type"] == "message").collect();
        let seqs: Vec<u64> = messages.iter().filter_map(|m| m["seq"].as_u64()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{id}: seqs in order, none twice");
        let texts: BTreeSet<&str> = messages.iter().filter_map(|m| m["text"].as_str()).collect();
        assert_eq!(texts.len(), messages.len(), "{id}: no message twice");
        for i in 0..sent {
            assert!(texts.contains(format!("m-{i}").as_str()), "{id} missed m-{i} of {sent}");
        }
    }
    Ok(())
}
