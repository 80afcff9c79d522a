//! Rooms across nodes on a real Redis: the seed lesson's scenario, subscriptions, and
//! every error code of the protocol.

use anyhow::Result;
use serde_json::{json, Value};
use tether_kit::RedisServer;
use tether_proto::wire::ClientMsg;
use tether_tests::{eventually, http_get, numsub, Backend, InProcessNode, Kind, WsClient};
use tokio_tungstenite::tungstenite::Message;

fn messages(c: &WsClient) -> Vec<&Value> {
    c.seen.iter().filter(|v| v["type"] == "message").collect()
}

async fn two_nodes_share_a_room_exactly_once_in_seq_order(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", |_| {})?;
    let n2 = backend.node("node-2", |_| {})?;
    let (mut alice, hello) = WsClient::connect_ready(&n1.ws_url("alice")).await?;
    assert_eq!(hello["server"], "node-1");
    assert_eq!(hello["id"], "alice");
    assert_eq!(hello["session"], "new");
    let (mut bob, _) = WsClient::connect_ready(&n2.ws_url("bob")).await?;
    alice.set_name("Alice").await?;
    bob.set_name("Bob").await?;
    alice.join("general").await?;
    bob.join("general").await?;
    // Alice hears Bob join across nodes.
    alice.recv_until("bob joined", |v| v["type"] == "user_joined" && v["id"] == "bob").await?;

    alice.say("general", "Hello from Server-1!").await?;
    for c in [&mut alice, &mut bob] {
        c.recv_until("alice's message", |v| v["type"] == "message" && v["id"] == "alice").await?;
    }
    bob.say("general", "Hello from Server-2!").await?;
    for c in [&mut alice, &mut bob] {
        c.recv_until("bob's message", |v| v["type"] == "message" && v["id"] == "bob").await?;
    }
    // A marker after both messages proves nothing else (no duplicate) was in flight.
    alice.say("general", "end").await?;
    for c in [&mut alice, &mut bob] {
        c.recv_until("marker", |v| v["type"] == "message" && v["text"] == "end").await?;
        let got = messages(c);
        assert_eq!(got.len(), 3, "exactly once each: {got:?}");
        assert_eq!(got[0]["from"], "Alice");
        assert_eq!(got[0]["server"], "node-1");
        assert_eq!(got[0]["text"], "Hello from Server-1!");
        assert_eq!(got[1]["from"], "Bob");
        assert_eq!(got[1]["server"], "node-2");
        let seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().expect("seq")).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seqs strictly increase: {seqs:?}");
        assert!(got.iter().all(|m| m["epoch"] == got[0]["epoch"] && m["epoch"].is_string()));
        assert!(got.iter().all(|m| m["timestamp"].as_u64().is_some()));
    }
    // Both saw the same seqs: one order for the room.
    let a: Vec<&Value> = messages(&alice).iter().map(|m| &m["seq"]).collect();
    let b: Vec<&Value> = messages(&bob).iter().map(|m| &m["seq"]).collect();
    assert_eq!(a, b);
    Ok(())
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// One client's burst of messages, all in the node's socket at once, is published in a few
/// backbone calls (consecutive messages to one room together), in order and each once; frames
/// that are not messages to a joined room split the runs and get their own answers.
async fn a_burst_of_messages_is_published_in_runs_in_order_exactly_once(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", |_| {})?;
    let n2 = backend.node("node-2", |_| {})?;
    let (mut alice, _) = WsClient::connect_ready(&n1.ws_url("alice")).await?;
    let (mut bob, _) = WsClient::connect_ready(&n2.ws_url("bob")).await?;
    alice.join("burst").await?;
    bob.join("burst").await?;
    const COUNT: usize = 300;
    let say = |room: &str, text: String| ClientMsg::text(room, text).to_json();
    let frames = (0..COUNT).map(|i| match i {
        100 => say("elsewhere", "not joined".into()),
        // Deliberately a type no client sends.
        200 => json!({"type":"no_such_type"}).to_string(),
        _ => say("burst", format!("m{i}")),
    });
    alice.send_burst(frames).await?;
    let last = format!("m{}", COUNT - 1);
    for c in [&mut alice, &mut bob] {
        c.recv_until("the burst's last message", |v| v["text"] == last.as_str()).await?;
        let got = messages(c);
        let texts: Vec<&str> = got.iter().filter_map(|m| m["text"].as_str()).collect();
        let sent: Vec<String> = (0..COUNT).filter(|i| *i != 100 && *i != 200).map(|i| format!("m{i}")).collect();
        assert_eq!(texts, sent, "every message once, in the order sent");
        let seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().expect("seq")).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "consecutive seqs: {seqs:?}");
    }
    let errors: Vec<&Value> = alice.seen.iter().filter(|v| v["type"] == "error").collect();
    let codes: Vec<&str> = errors.iter().filter_map(|e| e["code"].as_str()).collect();
    assert_eq!(codes, ["not_in_room", "unknown_type"], "{errors:?}");
    let (_, text) = http_get(n1.addr, "/metrics").await?;
    let (published, batches) =
        (metric(&text, "tether_node_messages_published_total"), metric(&text, "tether_node_publish_batches_total"));
    assert_eq!(published, (COUNT - 2) as u64);
    assert!(batches >= 3, "the two odd frames split the burst into at least three runs: {batches}");
    assert!(batches * 4 <= published, "{published} messages in {batches} publish calls: not gathered");
    Ok(())
}

#[tokio::test]
async fn one_subscription_per_node_with_members_and_none_after_the_last_leaves() -> Result<()> {
    let redis = RedisServer::start().await?;
    let url = redis.url();
    let n1 = InProcessNode::start("node-1", &url, |_| {})?;
    let n2 = InProcessNode::start("node-2", &url, |_| {})?;
    let channel = "tether:room:{lobby}";
    let (mut a1, _) = WsClient::connect_ready(&n1.ws_url("a1")).await?;
    let (mut a2, _) = WsClient::connect_ready(&n1.ws_url("a2")).await?;
    let (mut b1, _) = WsClient::connect_ready(&n2.ws_url("b1")).await?;
    a1.join("lobby").await?;
    assert_eq!(numsub(&url, channel).await?, 1);
    a2.join("lobby").await?;
    assert_eq!(numsub(&url, channel).await?, 1, "a second local member adds no subscription");
    b1.join("lobby").await?;
    assert_eq!(numsub(&url, channel).await?, 2, "one per node");

    // Leaving: node-1 keeps its subscription while a2 is still there.
    a1.leave("lobby").await?;
    a1.recv_until("own user_left", |v| v["type"] == "user_left" && v["id"] == "a1" && v["reason"] == "left").await?;
    b1.recv_until("a1 left", |v| v["type"] == "user_left" && v["id"] == "a1").await?;
    assert_eq!(numsub(&url, channel).await?, 2);
    // Disconnecting the last member of node-1 drops node-1's subscription.
    a2.close().await;
    b1.recv_until("a2 disconnected", |v| v["type"] == "user_left" && v["id"] == "a2" && v["reason"] == "disconnected")
        .await?;
    eventually("node-1 unsubscribed", || async { (numsub(&url, channel).await.ok()? == 1).then_some(()) }).await?;
    b1.leave("lobby").await?;
    b1.recv_type("user_left").await?;
    eventually("no subscription left", || async { (numsub(&url, channel).await.ok()? == 0).then_some(()) }).await?;
    // And the room works again after being emptied.
    b1.join("lobby").await?;
    assert_eq!(numsub(&url, channel).await?, 1);
    Ok(())
}

async fn expect_error(c: &mut WsClient, frame: &str, code: &str) -> Result<()> {
    c.send_text(frame.to_string()).await?;
    let e = c.recv_type("error").await?;
    assert_eq!(e["code"], code, "for {frame}: {e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    Ok(())
}

async fn each_bad_input_gets_its_error_code_and_the_connection_keeps_working(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", |_| {})?;
    let (mut c, _) = WsClient::connect_ready(&n1.ws_url("carol")).await?;
    // Malformed frames, spelt by hand on purpose: no client library can build them.
    expect_error(&mut c, "{not json", "bad_json").await?;
    expect_error(&mut c, "[1,2,3]", "bad_json").await?;
    expect_error(&mut c, r#"{"type":"dance"}"#, "unknown_type").await?;
    expect_error(&mut c, r#"{"room":"general"}"#, "missing_field").await?;
    expect_error(&mut c, r#"{"type":"join"}"#, "missing_field").await?;
    expect_error(&mut c, r#"{"type":"message","room":"general"}"#, "missing_field").await?;
    expect_error(&mut c, r#"{"type":"join","room":42}"#, "invalid_field").await?;
    expect_error(&mut c, r#"{"type":"join","room":"has space"}"#, "invalid_room").await?;
    expect_error(&mut c, r#"{"type":"join","room":""}"#, "invalid_room").await?;
    expect_error(&mut c, r#"{"type":"set_name","name":""}"#, "invalid_name").await?;
    let hi = ClientMsg::text("general", "hi");
    expect_error(&mut c, &hi.to_json(), "not_in_room").await?;
    expect_error(&mut c, &ClientMsg::Leave { room: "general".into() }.to_json(), "not_in_room").await?;
    c.send_raw(Message::Binary(vec![0xde, 0xad, 0xbe, 0xef].into())).await?;
    assert_eq!(c.recv_type("error").await?["code"], "bad_json");
    // Still fully usable.
    c.join("general").await?;
    c.say("general", "still here").await?;
    c.recv_until("own message", |v| v["type"] == "message" && v["text"] == "still here").await?;
    Ok(())
}

async fn an_oversized_frame_closes_with_1009_and_costs_nobody_else(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", |cfg| cfg.max_message_bytes = 1024)?;
    let (mut big, _) = WsClient::connect_ready(&n1.ws_url("big")).await?;
    let (mut other, _) = WsClient::connect_ready(&n1.ws_url("other")).await?;
    other.join("r").await?;
    let text = "x".repeat(2000);
    big.say("r", text).await?;
    assert_eq!(big.closed().await?, tether_tests::Closed::Code(1009, "message too big".into()));
    other.say("r", "fine").await?;
    other.recv_until("own message", |v| v["type"] == "message" && v["text"] == "fine").await?;
    Ok(())
}

async fn node_answers_health_readiness_and_refuses_bad_ids(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", |_| {})?;
    let addr = n1.addr;
    eventually("ready", || async { (http_get(addr, "/readyz").await.ok()?.0 == 200).then_some(()) }).await?;
    assert_eq!(http_get(addr, "/healthz").await?.0, 200);
    let (code, body) = http_get(addr, "/metrics").await?;
    assert_eq!(code, 200);
    assert!(body.contains("tether_node_connections_active"), "{body}");
    let err = WsClient::connect(&format!("ws://{}/ws?client=bad%20id", n1.addr)).await.err().expect("refused");
    assert!(format!("{err:#}").contains("400"), "{err:#}");
    // No id at all: the node mints one and sets the cookie.
    let c = WsClient::connect(&format!("ws://{}/ws", n1.addr)).await?;
    let cookie = c.headers.get("set-cookie").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(cookie.starts_with("tether_sid=") && cookie.contains("HttpOnly"), "{cookie}");
    Ok(())
}

async fn readyz_is_503_while_the_backbone_is_down(kind: Kind) -> Result<()> {
    let mut backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", |_| {})?;
    let addr = n1.addr;
    eventually("ready", || async { (http_get(addr, "/readyz").await.ok()?.0 == 200).then_some(()) }).await?;
    backend.kill().await?;
    eventually("unready", || async { (http_get(addr, "/readyz").await.ok()?.0 == 503).then_some(()) }).await?;
    assert_eq!(http_get(addr, "/healthz").await?.0, 200, "alive while unready");
    backend.restart().await?;
    eventually("ready again", || async { (http_get(addr, "/readyz").await.ok()?.0 == 200).then_some(()) }).await?;
    Ok(())
}

tether_tests::on_every_backbone!(
    two_nodes_share_a_room_exactly_once_in_seq_order,
    each_bad_input_gets_its_error_code_and_the_connection_keeps_working,
    an_oversized_frame_closes_with_1009_and_costs_nobody_else,
    node_answers_health_readiness_and_refuses_bad_ids,
    readyz_is_503_while_the_backbone_is_down,
    a_burst_of_messages_is_published_in_runs_in_order_exactly_once,
);
