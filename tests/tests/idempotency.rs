//! Idempotent client messages: a `message` with a `msg_id` is published once per
//! `(client, msg_id)`, whichever node the repeat reaches; the repeat is answered `duplicate`
//! naming the first one, and `data` reaches every member byte for byte.

use anyhow::Result;
use serde_json::{json, Value};
use tether_tests::{Backend, Kind, WsClient};

fn keyed(room: &str, text: &str, msg_id: &str, data: Value) -> Value {
    json!({"type": "message", "room": room, "text": text, "msg_id": msg_id, "data": data})
}

async fn a_resent_msg_id_is_published_once_on_any_node(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", |_| {})?;
    let n2 = backend.node("node-2", |_| {})?;
    let (mut watcher, _) = WsClient::connect_ready(&n2.ws_url("watcher")).await?;
    watcher.join("r").await?;
    let (mut sender, _) = WsClient::connect_ready(&n1.ws_url("sender")).await?;
    sender.join("r").await?;

    // Sent raw, so the data's key order and number forms are the sender's own.
    let data = r#"{"z":1,"nested":{"list":[1.50,"x",null]},"a":true}"#;
    let frame = format!(r#"{{"type":"message","room":"r","msg_id":"m-1","data":{data}}}"#);
    sender.send_text(frame.clone()).await?;
    let first = sender.recv_until("own echo", |v| v["msg_id"] == "m-1").await?;
    let (seq, epoch) = (first["seq"].as_u64().unwrap(), first["epoch"].as_str().unwrap().to_string());
    let seen = watcher.recv_until("the message", |v| v["msg_id"] == "m-1").await?;
    assert_eq!(seen["data"], serde_json::from_str::<Value>(data)?, "data reaches other nodes intact");
    assert_eq!(seen["text"], "", "a data-only message has empty text");

    // The same id again on the same node: not published, the sender is told which it was.
    sender.send_text(frame.clone()).await?;
    let dup = sender.recv_type("duplicate").await?;
    assert_eq!(dup, json!({"type":"duplicate","room":"r","msg_id":"m-1","seq":seq,"epoch":epoch}));

    // A reconnect to the other node resends it: still once.
    sender.close().await;
    let (mut again, _) = WsClient::connect_ready(&n2.ws_url("sender")).await?;
    again.send(keyed("r", "", "m-1", json!({"z": 1}))).await?;
    let dup = again.recv_type("duplicate").await?;
    assert_eq!((dup["seq"].as_u64(), dup["epoch"].as_str()), (Some(seq), Some(epoch.as_str())));
    // Another client may use the same msg_id: keys are per client.
    let (mut other, _) = WsClient::connect_ready(&n1.ws_url("other")).await?;
    other.join("r").await?;
    other.send(keyed("r", "mine", "m-1", json!(null))).await?;
    let mine = other.recv_until("other's message", |v| v["text"] == "mine").await?;
    assert_eq!(mine["seq"].as_u64(), Some(seq + 1));
    assert_eq!(mine["data"], Value::Null);
    assert!(mine.as_object().unwrap().contains_key("data"), "data: null is kept");
    // A marker after everything: the watcher got m-1 exactly once.
    again.say("r", "marker").await?;
    watcher.recv_until("marker", |v| v["text"] == "marker").await?;
    let copies = watcher.seen.iter().filter(|v| v["type"] == "message" && v["msg_id"] == "m-1").count();
    assert_eq!(copies, 2, "m-1 once from `sender`, once from `other`: {:?}", watcher.seen);
    Ok(())
}

/// A burst of keyed messages (published together in one atomic step where the backbone can)
/// with a repeat inside it and repeats of earlier ones: each id once, in order, and one
/// `duplicate` per repeat.
async fn a_burst_with_repeats_publishes_each_msg_id_once_in_order(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", |_| {})?;
    let (mut c, _) = WsClient::connect_ready(&n1.ws_url("burst")).await?;
    c.join("b").await?;
    let frame = |id: &str| keyed("b", id, id, json!({"id": id}));
    c.send_burst(["k1", "k2", "k1", "k3"].map(|id| frame(id).to_string())).await?;
    c.send_burst(["k2", "k4", "k3"].map(|id| frame(id).to_string())).await?;
    c.recv_until("k4", |v| v["type"] == "message" && v["msg_id"] == "k4").await?;
    while c_dups(&c.seen).len() < 3 {
        c.recv_type("duplicate").await?;
    }
    let got: Vec<&str> =
        c.seen.iter().filter(|v| v["type"] == "message").filter_map(|v| v["msg_id"].as_str()).collect();
    assert_eq!(got, ["k1", "k2", "k3", "k4"], "each once, in order");
    let seqs: Vec<u64> = c.seen.iter().filter(|v| v["type"] == "message").filter_map(|v| v["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "repeats take no seq: {seqs:?}");
    let mut dups = c_dups(&c.seen);
    dups.sort();
    assert_eq!(dups, ["k1", "k2", "k3"]);
    Ok(())
}

fn c_dups(seen: &[Value]) -> Vec<String> {
    seen.iter().filter(|v| v["type"] == "duplicate").filter_map(|v| v["msg_id"].as_str().map(String::from)).collect()
}

tether_tests::on_every_backbone!(
    a_resent_msg_id_is_published_once_on_any_node,
    a_burst_with_repeats_publishes_each_msg_id_once_in_order
);
