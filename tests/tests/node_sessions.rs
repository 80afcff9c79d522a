//! Sessions and resume on real nodes and a real Redis: a client whose node dies comes back on
//! another node with its name, its rooms and every message it missed, once each, in order.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tether_kit::RedisServer;
use tether_proto::wire::ResumePoint;
use tether_tests::{Backend, InProcessNode, Kind, WsClient};

/// Sends `n` messages to `room` and waits until the sender has its own last one back.
async fn publish(c: &mut WsClient, room: &str, n: usize, tag: &str) -> Result<()> {
    for i in 0..n {
        c.say(room, format!("{tag}-{i}")).await?;
    }
    let last = format!("{tag}-{}", n - 1);
    c.recv_until("own last message", |v| v["type"] == "message" && v["text"] == last.as_str()).await?;
    Ok(())
}

/// Where `c` is in `room`, which it has had messages from.
fn position(c: &WsClient, room: &str) -> ResumePoint {
    c.position(room).expect("a message")
}

/// `listener` and `poster` join `room` on `node`; `poster` sends `n` messages (`early-0`…),
/// `listener` receives them all and closes. Returns the poster and where the listener left off.
async fn heard_then_gone(
    node: &InProcessNode,
    room: &str,
    listener: &str,
    poster: &str,
    n: usize,
) -> Result<(WsClient, ResumePoint)> {
    let (mut x, _) = WsClient::connect_ready(&node.ws_url(listener)).await?;
    x.join(room).await?;
    let (mut p, _) = WsClient::connect_ready(&node.ws_url(poster)).await?;
    p.join(room).await?;
    publish(&mut p, room, n, "early").await?;
    let last = format!("early-{}", n - 1);
    x.recv_until("the early messages", |v| v["text"] == last.as_str()).await?;
    let pos = position(&x, room);
    x.close().await;
    Ok((p, pos))
}

async fn a_client_whose_node_died_is_restored_elsewhere_and_misses_nothing(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let mut n1 = backend.node("node-1", |_| {})?;
    let n2 = backend.node("node-2", |_| {})?;
    let (mut x, _) = WsClient::connect_ready(&n1.ws_url("xavier")).await?;
    x.set_name("Xavier").await?;
    x.join("alpha").await?;
    x.join("beta").await?;
    let (mut p, _) = WsClient::connect_ready(&n2.ws_url("pub")).await?;
    p.join("alpha").await?;
    p.join("beta").await?;
    publish(&mut p, "alpha", 5, "a1").await?;
    publish(&mut p, "beta", 3, "b1").await?;
    x.recv_until("x has alpha", |v| v["text"] == "a1-4").await?;
    x.recv_until("x has beta", |v| v["text"] == "b1-2").await?;
    let (pos_a, pos_b) = (position(&x, "alpha"), position(&x, "beta"));

    n1.kill();
    x.closed().await?;
    // The others keep talking while Xavier is away.
    publish(&mut p, "alpha", 7, "a2").await?;
    publish(&mut p, "beta", 4, "b2").await?;

    let mut x2 = WsClient::connect(&n2.ws_url("xavier")).await?;
    let hello = x2.recv_type("connected").await?;
    assert_eq!(hello["session"], "restored", "{hello}");
    assert_eq!(hello["name"], "Xavier");
    assert_eq!(hello["rooms"], json!(["alpha", "beta"]));
    // Live traffic keeps flowing into the held rooms before the resume.
    publish(&mut p, "alpha", 2, "a3").await?;
    x2.resume([("alpha", pos_a), ("beta", pos_b)]).await?;
    for room in ["alpha", "beta"] {
        let r = x2.recv_until("resumed", |v| v["type"] == "resumed" && v["room"] == room).await?;
        assert_eq!(r["complete"], true, "{r}");
    }
    publish(&mut p, "alpha", 1, "a4").await?;
    publish(&mut p, "beta", 1, "b4").await?;
    x2.recv_until("alpha tail", |v| v["text"] == "a4-0").await?;
    x2.recv_until("beta tail", |v| v["text"] == "b4-0").await?;
    // Together, both connections saw every seq of each room exactly once, in order.
    for (room, total) in [("alpha", 15u64), ("beta", 8)] {
        let mut all = x.seqs(room);
        all.extend(x2.seqs(room));
        assert_eq!(all, (1..=total).collect::<Vec<_>>(), "{room}");
    }
    let replayed: Vec<&Value> = x2.seen.iter().filter(|v| v["replay"] == true).collect();
    // The replay covers everything logged after the positions — including the two alpha
    // messages that arrived live while the room was held (those are then not sent again).
    assert_eq!(replayed.len(), 7 + 2 + 4, "only what the client had not seen is a replay");
    // The restored member can talk at once.
    x2.say("beta", "I'm back").await?;
    let m = p.recv_until("xavier's message", |v| v["text"] == "I'm back").await?;
    assert_eq!((m["from"].as_str(), m["server"].as_str()), (Some("Xavier"), Some("node-2")));
    Ok(())
}

async fn replay_racing_live_traffic_has_no_gap_and_no_duplicate(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", |_| {})?;
    let n2 = backend.node("node-2", |_| {})?;
    let (mut x, _) = WsClient::connect_ready(&n1.ws_url("racer")).await?;
    x.join("race").await?;
    let (mut p, _) = WsClient::connect_ready(&n2.ws_url("flood")).await?;
    p.join("race").await?;
    publish(&mut p, "race", 10, "warm").await?;
    x.recv_until("warm", |v| v["text"] == "warm-9").await?;
    let pos = position(&x, "race");
    x.close().await;
    // Reconnected (restored, its room held), the client resumes while a publisher on another
    // node is in the middle of a flood: replay and live frames race.
    let mut x2 = WsClient::connect_ready(&n1.ws_url("racer")).await?.0;
    let url = n2.ws_url("flood2");
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let flood = tokio::spawn(async move {
        let (mut f, _) = WsClient::connect_ready(&url).await?;
        f.join("race").await?;
        publish(&mut f, "race", 100, "live-a").await?;
        let _ = started_tx.send(());
        publish(&mut f, "race", 300, "live-b").await?;
        anyhow::Ok(())
    });
    started_rx.await?;
    x2.resume([("race", pos)]).await?;
    flood.await??;
    let r = x2.recv_type("resumed").await?;
    assert_eq!(r["complete"], true);
    x2.recv_until("the flood's end", |v| v["text"] == "live-b-299").await?;
    let got = x2.seqs("race");
    let expected: Vec<u64> = (11..=410).collect();
    assert_eq!(got, expected, "contiguous after the resume point, once each");
    Ok(())
}
async fn trimmed_history_is_reported_incomplete_not_hidden(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", |cfg| cfg.history_len = 5)?;
    let (mut p, pos) = heard_then_gone(&n1, "busy", "late", "talker", 2).await?;
    publish(&mut p, "busy", 20, "missed").await?;
    let (mut x2, hello) = WsClient::connect_ready(&n1.ws_url("late")).await?;
    assert_eq!(hello["session"], "restored");
    x2.resume([("busy", pos)]).await?;
    let r = x2.recv_type("resumed").await?;
    assert_eq!(r["complete"], false, "{r}");
    assert_eq!((r["from_seq"].as_u64(), r["to_seq"].as_u64()), (Some(18), Some(22)), "{r}");
    assert_eq!(x2.seqs("busy"), vec![18, 19, 20, 21, 22]);
    // Nothing missed: an up-to-date position resumes complete with nothing replayed.
    let pos = position(&x2, "busy");
    x2.resume([("busy", pos)]).await?;
    let r = x2.recv_type("resumed").await?;
    assert_eq!(
        (r["complete"].as_bool(), r["from_seq"].as_u64(), r["to_seq"].as_u64()),
        (Some(true), Some(23), Some(22))
    );
    Ok(())
}

#[tokio::test]
async fn a_new_epoch_is_reported_and_replayed_from_its_start() -> Result<()> {
    let redis = RedisServer::start().await?;
    let n1 = InProcessNode::start("node-1", &redis.url(), |_| {})?;
    let (mut x, _) = WsClient::connect_ready(&n1.ws_url("ep")).await?;
    x.join("e").await?;
    publish(&mut x, "e", 3, "old").await?;
    let pos = position(&x, "e");
    x.close().await;
    // Redis loses the room (as after a restart without persistence).
    let client = redis::Client::open(redis.url())?;
    let mut con = client.get_multiplexed_async_connection().await?;
    redis::cmd("DEL").arg("tether:room:{e}:meta").arg("tether:room:{e}:log").query_async::<()>(&mut con).await?;
    let (mut p, _) = WsClient::connect_ready(&n1.ws_url("p2")).await?;
    p.join("e").await?;
    publish(&mut p, "e", 2, "new").await?;
    let (mut x2, _) = WsClient::connect_ready(&n1.ws_url("ep")).await?;
    x2.resume([("e", pos.clone())]).await?;
    let r = x2.recv_type("resumed").await?;
    assert_eq!(r["complete"], false);
    assert_ne!(r["epoch"].as_str(), pos.epoch.as_deref());
    let texts: Vec<&str> =
        x2.seen.iter().filter(|v| v["type"] == "message").filter_map(|v| v["text"].as_str()).collect();
    assert_eq!(texts, ["new-0", "new-1"]);
    Ok(())
}

async fn held_frames_are_released_after_the_grace_without_a_resume(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", |cfg| cfg.resume_grace = std::time::Duration::from_millis(300))?;
    let (mut x, _) = WsClient::connect_ready(&n1.ws_url("lazy")).await?;
    x.join("g").await?;
    x.close().await;
    let (mut x2, hello) = WsClient::connect_ready(&n1.ws_url("lazy")).await?;
    assert_eq!(hello["rooms"], json!(["g"]));
    let (mut p, _) = WsClient::connect_ready(&n1.ws_url("other")).await?;
    p.join("g").await?;
    publish(&mut p, "g", 1, "hello").await?;
    // No resume: the held message still arrives (after the grace), exactly once.
    x2.recv_until("held message", |v| v["text"] == "hello-0").await?;
    publish(&mut p, "g", 1, "after").await?;
    x2.recv_until("live message", |v| v["text"] == "after-0").await?;
    assert_eq!(x2.seqs("g"), vec![1, 2]);
    Ok(())
}

#[tokio::test]
async fn sessions_expire_after_the_last_connection_and_leave_is_remembered() -> Result<()> {
    let redis = RedisServer::start().await?;
    let n1 = InProcessNode::start("node-1", &redis.url(), |cfg| cfg.session_ttl = std::time::Duration::from_secs(30))?;
    let (mut x, _) = WsClient::connect_ready(&n1.ws_url("ttl")).await?;
    x.join("a").await?;
    x.join("b").await?;
    x.leave("a").await?;
    x.recv_type("user_left").await?;
    x.close().await;
    let client = redis::Client::open(redis.url())?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let ttl: i64 = redis::cmd("PTTL").arg("tether:session:{ttl}").query_async(&mut con).await?;
    assert!((1..=30_000).contains(&ttl), "session expires within session_ttl: {ttl}");
    let (_x2, hello) = WsClient::connect_ready(&n1.ws_url("ttl")).await?;
    assert_eq!(hello["rooms"], json!(["b"]), "the leave was saved");
    // A session that is gone means a new one.
    redis::cmd("DEL").arg("tether:session:{ttl}").query_async::<()>(&mut con).await?;
    let (_x3, hello) = WsClient::connect_ready(&n1.ws_url("ttl")).await?;
    assert_eq!(hello["session"], "new");
    Ok(())
}

async fn resume_of_a_room_not_joined_is_not_in_room(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", |_| {})?;
    let (mut x, _) = WsClient::connect_ready(&n1.ws_url("nr")).await?;
    x.resume([("nowhere", ResumePoint { seq: 3, epoch: None })]).await?;
    assert_eq!(x.recv_type("error").await?["code"], "not_in_room");
    Ok(())
}

async fn with_signing_only_signed_ids_get_in(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let key = tether_proto::sign::SigningKey::new(b"test-signing-key-0123456789".to_vec())?;
    let k = key.clone();
    let n1 = backend.node("node-1", move |cfg| cfg.signing_key = Some(k))?;
    // A minted id with its last signature digit changed (to a digit it is not: always "0"
    // would leave one id in sixteen unchanged, and valid).
    let forged = {
        let id = key.mint();
        let (head, last) = id.split_at(id.len() - 1);
        format!("{head}{}", if last == "0" { "1" } else { "0" })
    };
    for bad in ["alice".to_string(), forged] {
        let err = WsClient::connect(&n1.ws_url(&bad)).await.err().context("refused")?;
        assert!(format!("{err:#}").contains("403"), "{bad}: {err:#}");
    }
    let good = key.mint();
    let (_c, hello) = WsClient::connect_ready(&n1.ws_url(&good)).await?;
    assert_eq!(hello["id"], good.as_str());
    // No id at all: the node mints a signed one.
    let mut minted = WsClient::connect(&format!("ws://{}/ws", n1.addr)).await?;
    let id = minted.recv_type("connected").await?["id"].as_str().unwrap_or_default().to_string();
    assert!(key.verify(&id), "{id}");
    Ok(())
}

#[tokio::test]
async fn a_client_that_rejoins_then_resumes_gets_nothing_twice() -> Result<()> {
    let redis = RedisServer::start().await?;
    let n1 = InProcessNode::start("node-1", &redis.url(), |_| {})?;
    let (mut p, pos) = heard_then_gone(&n1, "r", "rejoiner", "poster", 3).await?;
    publish(&mut p, "r", 2, "missed").await?;
    // The session is gone (say, Redis lost it): the client gets a new one, joins again, and
    // hears a live message before its resume arrives.
    let client = redis::Client::open(redis.url())?;
    let mut con = client.get_multiplexed_async_connection().await?;
    redis::cmd("DEL").arg("tether:session:{rejoiner}").query_async::<()>(&mut con).await?;
    let (mut x2, hello) = WsClient::connect_ready(&n1.ws_url("rejoiner")).await?;
    assert_eq!(hello["session"], "new");
    x2.join("r").await?;
    publish(&mut p, "r", 1, "live").await?;
    x2.recv_until("live", |v| v["text"] == "live-0").await?;
    x2.resume([("r", pos)]).await?;
    let r = x2.recv_type("resumed").await?;
    assert_eq!((r["from_seq"].as_u64(), r["to_seq"].as_u64(), r["complete"].as_bool()), (Some(4), Some(6), Some(true)));
    let got = x2.seqs("r");
    assert_eq!(got, vec![6, 4, 5], "the live one, then only what was missed: nothing twice");
    Ok(())
}

tether_tests::on_every_backbone!(
    a_client_whose_node_died_is_restored_elsewhere_and_misses_nothing,
    replay_racing_live_traffic_has_no_gap_and_no_duplicate,
    trimmed_history_is_reported_incomplete_not_hidden,
    held_frames_are_released_after_the_grace_without_a_resume,
    resume_of_a_room_not_joined_is_not_in_room,
    with_signing_only_signed_ids_get_in,
);
