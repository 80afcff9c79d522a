//! The NATS backbone on a 3-server JetStream cluster (`--nats` listing all three, R3 streams),
//! with real processes: two nodes behind a balancer, real WebSocket clients. The cluster is
//! started once for this binary, so the scenarios run in sequence in one test, each in rooms
//! of its own:
//!
//! 1. streams an older node made with one copy are scaled to three, and every stream the
//!    backbone creates (rooms, sessions, presence) has three;
//! 2. cross-node delivery, presence, and a session restored with a resume by `(epoch, seq)`;
//! 3. under steady traffic from both nodes: the NATS server node-1 is connected to is
//!    SIGKILLed (node-1 moves to another, both nodes are ready again within a bound), then
//!    restarted (it rejoins, every replica current), then the room stream's leader steps
//!    down; at the end every client holds every message once, in seq order, in one epoch.
//!
//! Figures (time unready, time until traffic flowed again) are printed, not asserted beyond
//! generous bounds.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_kit::{Cluster, ClusterLogs, ClusterOptions, LogTarget, NatsCluster, NodeProcess, SpawnOptions};
use tether_proto::wire::ClientMsg;
use tether_tests::{id_ranked, HttpConn, WsClient};
use tokio_util::sync::CancellationToken;

const NODES: [&str; 2] = ["node-1", "node-2"];
/// The nodes use no Redis; this one is never dialled.
const NO_REDIS: &str = "redis://127.0.0.1:1/";
/// The nodes' key prefix (the default), as the stream names carry it.
const PREFIX: &str = "tether:";
/// Messages per second each of the two senders aims at.
const RATE_PER_SENDER: u64 = 25;
/// Acknowledged messages each sender must get through in each phase before the next one.
const PER_PHASE: u64 = 40;
/// How long JetStream may take to elect leaders again after losing a server, and a node to be
/// ready again (measured here: see the printed figures).
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
/// Resends of one refused message before a sender gives up.
const RESEND_ATTEMPTS: usize = 600;

fn nats_args(nats: &NatsCluster, replicas: Option<usize>) -> Vec<String> {
    let mut args: Vec<String> = ["--backbone", "nats", "--nats"].map(String::from).into();
    args.push(nats.url());
    if let Some(r) = replicas {
        args.extend(["--nats-replicas".to_owned(), r.to_string()]);
    }
    args
}

fn url(c: &Cluster, id: &str) -> String {
    format!("{}?client={id}", c.ws_url())
}

/// A client homed on `node` (by HRW over the two nodes), connected through the balancer.
async fn client_on(c: &Cluster, node: &str, prefix: &str) -> Result<(WsClient, String)> {
    let id = id_ranked(&NODES, prefix, &[node]);
    let (ws, hello) = WsClient::connect_ready(&url(c, &id)).await?;
    if hello["server"] != node {
        bail!("{id} reached {} instead of {node}", hello["server"]);
    }
    Ok((ws, id))
}

/// The sorted ids of a `presence` answer for `room`.
async fn present(c: &mut WsClient, room: &str) -> Result<Vec<String>> {
    c.send_msg(&ClientMsg::Presence { room: room.into() }).await?;
    let answer = c.recv_type("presence").await?;
    let mut ids: Vec<String> =
        answer["users"].as_array().into_iter().flatten().filter_map(|u| u["id"].as_str().map(String::from)).collect();
    ids.sort();
    Ok(ids)
}

fn is_text(v: &Value, room: &str, text: &str) -> bool {
    v["type"] == "message" && v["room"] == room && v["text"] == text
}

#[tokio::test]
async fn nats_cluster_backbone_replicates_delivers_and_survives_losing_a_server() -> Result<()> {
    let started = Instant::now();
    let mut nats = NatsCluster::start(3).await?;
    println!("NATS cluster of 3 up in {:?}", started.elapsed());
    let replicas = older_streams_are_scaled_up(&nats).await.context("scenario 1: replicas")?;
    let mut c = Cluster::start(ClusterOptions {
        nodes: 2,
        redis: Some(NO_REDIS.into()),
        node_args: nats_args(&nats, None),
        logs: ClusterLogs::Null,
        balancer_args: vec!["--health-interval-ms".into(), "100".into()],
        ..Default::default()
    })
    .await?;
    replicas.check(&c, &nats).await.context("scenario 1: replicas")?;
    cross_node_delivery_presence_and_resume(&c).await.context("scenario 2: delivery and resume")?;
    server_loss_and_leader_move_under_traffic(&mut c, &mut nats).await.context("scenario 3: server loss")?;
    println!("nats_cluster test: {:?} in all", started.elapsed());
    Ok(())
}

/// What scenario 1 set up before the R3 nodes started.
struct OlderStreams {
    room: &'static str,
    id: String,
}

/// A node with `--nats-replicas 1` (as an older deployment) creates a room stream, the
/// sessions and the presence streams with one copy each; then it stops.
async fn older_streams_are_scaled_up(nats: &NatsCluster) -> Result<OlderStreams> {
    let quiet = SpawnOptions { stderr: LogTarget::Null, ..Default::default() };
    let node = NodeProcess::start_with("node-old", NO_REDIS, &nats_args(nats, Some(1)), &quiet).await?;
    let room = "legacy";
    let id = "legacy-1".to_owned();
    let (mut ws, _) = WsClient::connect_ready(&format!("ws://{}/ws?client={id}", node.addr())).await?;
    ws.join(room).await?;
    ws.say(room, "from before").await?;
    ws.recv_until("own echo", |v| is_text(v, room, "from before")).await?;
    let stream = tether_node::backbone::nats::room_stream(PREFIX, room);
    assert_eq!(nats.stream_peers(&stream).await?.replicas, 1, "the old node's nats_replicas");
    ws.close().await;
    drop(node);
    Ok(OlderStreams { room, id })
}

impl OlderStreams {
    /// The R3 nodes scaled what the old one made, kept its message, and every stream of the
    /// backbone has three copies on three servers.
    async fn check(&self, c: &Cluster, nats: &NatsCluster) -> Result<()> {
        let (mut ws, hello) = WsClient::connect_ready(&url(c, &self.id)).await?;
        assert_eq!(hello["session"], "restored", "the session stream survived its rescale: {hello}");
        ws.resume([(self.room, tether_proto::wire::ResumePoint { seq: 0, epoch: None })]).await?;
        ws.recv_until("the old message, replayed", |v| is_text(v, self.room, "from before")).await?;
        let resumed = ws.recv_type("resumed").await?;
        assert_eq!(resumed["complete"], true, "{resumed}");
        ws.close().await;
        let names = nats.stream_names().await?;
        let ours: Vec<&String> = names.iter().filter(|n| n.starts_with("tether_")).collect();
        for kind in ["tether_sessions", "tether_presence", &tether_node::backbone::nats::room_stream(PREFIX, self.room)]
        {
            assert!(names.iter().any(|n| n == kind), "{kind} among {names:?}");
        }
        for name in ours {
            let peers = tether_tests::eventually(&format!("{name} on three servers"), || async {
                nats.stream_peers(name).await.ok().filter(|p| p.replicas == 3 && p.followers.len() == 2)
            })
            .await?;
            assert!(peers.leader.is_some(), "{name}: {peers:?}");
        }
        Ok(())
    }
}

async fn cross_node_delivery_presence_and_resume(c: &Cluster) -> Result<()> {
    let room = "s2";
    let (mut a, a_id) = client_on(c, "node-1", "s2a").await?;
    let (mut b, b_id) = client_on(c, "node-2", "s2b").await?;
    a.set_name("Ann").await?;
    b.set_name("Ben").await?;
    a.join(room).await?;
    b.join(room).await?;
    for (from, text) in [(0, "a1"), (1, "b1")] {
        [&mut a, &mut b][from].say(room, text).await?;
        for cl in [&mut a, &mut b] {
            cl.recv_until(text, |v| is_text(v, room, text)).await?;
        }
    }
    let mut both = vec![a_id.clone(), b_id.clone()];
    both.sort();
    for cl in [&mut a, &mut b] {
        assert_eq!(present(cl, room).await?, both);
    }
    // Ben goes away; Ann goes on talking; Ben comes back to his node with his session and
    // resumes from where he was.
    let point = b.position(room).context("b's position")?;
    b.close().await;
    for text in ["a2", "a3", "a4"] {
        a.say(room, text).await?;
        a.recv_until(text, |v| is_text(v, room, text)).await?;
    }
    let (mut b2, hello) = WsClient::connect_ready(&url(c, &b_id)).await?;
    assert_eq!(
        (hello["session"].as_str(), hello["name"].as_str(), hello["server"].as_str()),
        (Some("restored"), Some("Ben"), Some("node-2")),
        "{hello}"
    );
    assert_eq!(hello["rooms"], serde_json::json!([room]));
    b2.resume([(room, point.clone())]).await?;
    let resumed = b2.recv_until("resumed", |v| v["type"] == "resumed" && v["room"] == room).await?;
    assert_eq!(resumed["complete"], true, "{resumed}");
    let texts: Vec<&str> =
        b2.seen.iter().filter(|v| v["type"] == "message").filter_map(|v| v["text"].as_str()).collect();
    assert_eq!(texts, ["a2", "a3", "a4"], "what Ben missed, once, in order");
    let seqs = b2.seqs(room);
    assert_eq!(seqs, (point.seq + 1..=point.seq + 3).collect::<Vec<_>>());
    assert!(b2.seen.iter().filter(|v| v["type"] == "message").all(|v| v["epoch"].as_str() == point.epoch.as_deref()));
    b2.say(room, "b2").await?;
    a.recv_until("b2", |v| is_text(v, room, "b2")).await?;
    assert_eq!(present(&mut a, room).await?, both, "Ben is back in the presence list");
    Ok(())
}

/// One sender's side of the traffic: acknowledged messages so far.
#[derive(Default)]
struct Progress {
    acked: AtomicU64,
    refused: AtomicU64,
}

/// Sends `{me}-{i}` (text and `msg_id` alike) into `room` at [`RATE_PER_SENDER`], one at a
/// time: each waits for its echo (or `duplicate`, a resend of one that was logged after all);
/// one refused (`backbone_unavailable`) is sent again with the same `msg_id`. After `stop`,
/// sends `{me}-end` the same way and returns the client with everything it received.
async fn send_steadily(
    mut c: WsClient,
    me: String,
    room: &'static str,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> Result<WsClient> {
    let pace = Duration::from_millis(1000 / RATE_PER_SENDER);
    for i in 0..100_000u64 {
        let done = stop.is_cancelled();
        let id = if done { format!("{me}-end") } else { format!("{me}-{i}") };
        let frame = serde_json::json!({"type": "message", "room": room, "text": id, "msg_id": id});
        let at = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            if attempts > RESEND_ATTEMPTS {
                bail!("{id}: refused {RESEND_ATTEMPTS} times");
            }
            c.send(frame.clone()).await?;
            let answer = c
                .recv_until(&format!("the answer to {id}"), |v| {
                    v["msg_id"] == id.as_str()
                        && (v["type"] == "message" || v["type"] == "duplicate" || v["type"] == "error")
                })
                .await?;
            if answer["type"] != "error" {
                break;
            }
            if answer["code"] != "backbone_unavailable" {
                bail!("{id}: {answer}");
            }
            progress.refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if done {
            return Ok(c);
        }
        progress.acked.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(pace.saturating_sub(at.elapsed())).await;
    }
    bail!("{me}: sent for too long")
}

/// Reads until both senders' end markers arrived; returns the client with all it received.
async fn listen(mut c: WsClient, room: &'static str, ends: [String; 2]) -> Result<WsClient> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !ends.iter().all(|e| c.seen.iter().any(|v| is_text(v, room, e))) {
        if Instant::now() > deadline {
            bail!("listened for too long");
        }
        c.recv_within(RECOVERY_BOUND).await?;
    }
    Ok(c)
}

/// Samples both nodes' `/readyz` every ~20 ms until `stop`: (when, node index, status).
type Samples = Arc<Mutex<Vec<(Instant, usize, u16)>>>;

async fn watch_ready(addrs: Vec<SocketAddr>, samples: Samples, stop: CancellationToken) -> Result<()> {
    let mut conns = Vec::new();
    for a in &addrs {
        conns.push(HttpConn::connect(*a).await?);
    }
    for _ in 0..100_000 {
        if stop.is_cancelled() {
            return Ok(());
        }
        for (n, conn) in conns.iter_mut().enumerate() {
            let status = match conn.get("/readyz").await {
                Ok((status, _)) => status,
                Err(_) => {
                    *conn = HttpConn::connect(addrs[n]).await?;
                    0
                }
            };
            samples.lock().unwrap().push((Instant::now(), n, status));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("watched for too long")
}

/// Per node, from `since` on: the longest stretch not ready, and whether it is ready at the end.
fn readiness_since(samples: &Samples, since: Instant, nodes: usize) -> Vec<(Duration, bool)> {
    let s = samples.lock().unwrap();
    (0..nodes)
        .map(|n| {
            let mine: Vec<(Instant, u16)> =
                s.iter().filter(|&&(t, m, _)| m == n && t >= since).map(|&(t, _, st)| (t, st)).collect();
            let (mut longest, mut down_from) = (Duration::ZERO, None);
            for &(t, st) in &mine {
                match (st == 200, down_from) {
                    (false, None) => down_from = Some(t),
                    (true, Some(from)) => {
                        longest = longest.max(t - from);
                        down_from = None;
                    }
                    _ => {}
                }
            }
            if let (Some(from), Some(&(t, _))) = (down_from, mine.last()) {
                longest = longest.max(t - from);
            }
            (longest, mine.last().is_some_and(|&(_, st)| st == 200))
        })
        .collect()
}

/// Waits until each sender has `PER_PHASE` more messages acknowledged than at `base`.
async fn until_flowing(progress: &[Arc<Progress>; 2], what: &str) -> Result<Duration> {
    let at = Instant::now();
    let base: Vec<u64> = progress.iter().map(|p| p.acked.load(Ordering::Relaxed)).collect();
    tether_kit::eventually(RECOVERY_BOUND, what, || async {
        progress.iter().zip(&base).all(|(p, &b)| p.acked.load(Ordering::Relaxed) >= b + PER_PHASE).then_some(())
    })
    .await?;
    Ok(at.elapsed())
}

async fn server_loss_and_leader_move_under_traffic(c: &mut Cluster, nats: &mut NatsCluster) -> Result<()> {
    let room = "load";
    let stream = tether_node::backbone::nats::room_stream(PREFIX, room);
    let (mut sa, sa_id) = client_on(c, "node-1", "s3a").await?;
    let (mut sb, sb_id) = client_on(c, "node-2", "s3b").await?;
    let (mut la, _) = client_on(c, "node-1", "s3la").await?;
    let (mut lb, _) = client_on(c, "node-2", "s3lb").await?;
    for cl in [&mut sa, &mut sb, &mut la, &mut lb] {
        cl.join(room).await?;
    }
    let stop = CancellationToken::new();
    let progress = [Arc::new(Progress::default()), Arc::new(Progress::default())];
    let ends = [format!("{sa_id}-end"), format!("{sb_id}-end")];
    let senders = [
        tokio::spawn(send_steadily(sa, sa_id.clone(), room, progress[0].clone(), stop.clone())),
        tokio::spawn(send_steadily(sb, sb_id.clone(), room, progress[1].clone(), stop.clone())),
    ];
    let listeners = [tokio::spawn(listen(la, room, ends.clone())), tokio::spawn(listen(lb, room, ends.clone()))];
    let samples: Samples = Arc::default();
    let addrs: Vec<SocketAddr> = c.nodes().iter().map(|n| n.addr()).collect();
    let watcher = tokio::spawn(watch_ready(addrs, samples.clone(), stop.clone()));
    until_flowing(&progress, "steady traffic").await?;

    // The server node-1 is connected to dies.
    let victim = nats.server_of("tether-node node-1").await?.context("node-1 is connected to some server")?;
    let leader_before = nats.stream_peers(&stream).await?.leader;
    println!("killing NATS server {victim} ({}); {stream} led by {leader_before:?}", nats.server_name(victim));
    let killed = Instant::now();
    nats.kill(victim).await?;
    let moved = tether_kit::eventually(RECOVERY_BOUND, "node-1 on another server", || async {
        nats.server_of("tether-node node-1").await.ok().flatten().filter(|&i| i != victim)
    })
    .await?;
    let reconnected = killed.elapsed();
    let flowing = until_flowing(&progress, "traffic after the kill").await? + reconnected;
    let ready = tether_kit::eventually(RECOVERY_BOUND, "both nodes ready after the kill", || async {
        let r = readiness_since(&samples, killed, 2);
        r.iter().all(|&(_, ready_now)| ready_now).then_some(r)
    })
    .await?;
    println!(
        "after the kill: node-1 on server {moved} after {reconnected:?}; traffic flowing again within {flowing:?}; \
         longest unready stretch per node {:?}; refused so far {:?}",
        ready.iter().map(|r| r.0).collect::<Vec<_>>(),
        progress.iter().map(|p| p.refused.load(Ordering::Relaxed)).collect::<Vec<_>>(),
    );
    for (n, (longest, _)) in ready.iter().enumerate() {
        assert!(*longest < RECOVERY_BOUND, "node {n} unready for {longest:?}");
    }

    // It comes back and rejoins: every replica of the room stream current again.
    nats.restart(victim).await?;
    let rejoined = tether_kit::eventually(RECOVERY_BOUND, "every replica current", || async {
        nats.stream_peers(&stream).await.ok().filter(|p| p.current == 2 && p.leader.is_some())
    })
    .await?;
    println!("server {victim} restarted and rejoined: {rejoined:?}");
    until_flowing(&progress, "traffic after the restart").await?;

    // The room stream's leader moves while both nodes stay connected.
    let before = rejoined.leader.clone();
    nats.step_down(&stream).await?;
    let after = tether_kit::eventually(RECOVERY_BOUND, "a new leader", || async {
        nats.stream_peers(&stream).await.ok().and_then(|p| p.leader).filter(|l| Some(l) != before.as_ref())
    })
    .await?;
    println!("{stream}: leader moved from {before:?} to {after}");
    until_flowing(&progress, "traffic after the leader moved").await?;

    stop.cancel();
    let mut clients = Vec::new();
    for s in senders {
        clients.push(s.await??);
    }
    for l in listeners {
        clients.push(l.await??);
    }
    watcher.await??;
    // Each sender's markers reach every client (a sender's own come back as echoes).
    let mut all = Vec::new();
    for mut cl in clients {
        let cl = listen_rest(&mut cl, room, &ends).await.map(|()| cl)?;
        all.push(cl);
    }
    let sent: Vec<u64> = progress.iter().map(|p| p.acked.load(Ordering::Relaxed)).collect();
    let refused: Vec<u64> = progress.iter().map(|p| p.refused.load(Ordering::Relaxed)).collect();
    for (k, cl) in all.iter().enumerate() {
        check_everything_once_in_order(cl, room, [(&sa_id, sent[0]), (&sb_id, sent[1])])
            .with_context(|| format!("client {k}"))?;
    }
    println!("acknowledged {sent:?} messages, refused (then resent) {refused:?}: each client got all once, in order");
    Ok(())
}

/// Reads on until both end markers are in `c.seen`.
async fn listen_rest(c: &mut WsClient, room: &str, ends: &[String; 2]) -> Result<()> {
    for _ in 0..100_000 {
        if ends.iter().all(|e| c.seen.iter().any(|v| is_text(v, room, e))) {
            return Ok(());
        }
        c.recv_within(RECOVERY_BOUND).await?;
    }
    bail!("the end markers never came")
}

/// Every message of `room` in `c.seen`: seqs consecutive, one epoch, and each sender's
/// `{id}-0 … {id}-{n-1}, {id}-end` exactly so, in order.
fn check_everything_once_in_order(c: &WsClient, room: &str, senders: [(&String, u64); 2]) -> Result<()> {
    let msgs: Vec<&Value> = c.seen.iter().filter(|v| v["type"] == "message" && v["room"] == room).collect();
    let seqs: Vec<u64> = msgs.iter().filter_map(|v| v["seq"].as_u64()).collect();
    let first = *seqs.first().context("no messages")?;
    if seqs != (first..first + seqs.len() as u64).collect::<Vec<_>>() {
        let gaps: Vec<(u64, u64)> = seqs.windows(2).filter(|w| w[1] != w[0] + 1).map(|w| (w[0], w[1])).collect();
        bail!("seqs not consecutive: jumps {gaps:?}");
    }
    let epochs: std::collections::BTreeSet<&str> = msgs.iter().filter_map(|v| v["epoch"].as_str()).collect();
    if epochs.len() != 1 {
        bail!("epochs {epochs:?}");
    }
    for (id, n) in senders {
        let got: Vec<&str> = msgs
            .iter()
            .filter_map(|v| v["text"].as_str())
            .filter(|t| t.strip_prefix(id.as_str()).is_some_and(|r| r.starts_with('-')))
            .collect();
        let want: Vec<String> = (0..n).map(|i| format!("{id}-{i}")).chain([format!("{id}-end")]).collect();
        if got != want {
            let missing: Vec<&String> = want.iter().filter(|w| !got.contains(&w.as_str())).collect();
            bail!("{id}: {} received, {} sent; missing {missing:?}", got.len(), want.len());
        }
    }
    Ok(())
}
