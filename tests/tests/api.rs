//! The server API on real nodes (in process, over a real Redis or NATS): auth, publish with
//! `data` to members on three nodes exactly once, idempotency across nodes, broadcast,
//! presence/online, history pages, and bad bodies that leave the node serving. Acting on
//! clients cluster-wide is in `api_manage.rs`; the balancer's part in `api_balancer.rs`.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tether_kit::{ApiAnswer, ApiClient};
use tether_node::config::ApiKey;
use tether_tests::{Backend, InProcessNode, Kind, WsClient};

const KEY: &str = "test-api-key-0123456789";

fn with_api(cfg: &mut tether_node::Config) {
    cfg.api_key = Some(ApiKey::new(KEY).expect("a valid key"));
}

async fn api(node: &InProcessNode) -> Result<ApiClient> {
    ApiClient::connect(node.addr, Some(KEY)).await
}

fn error_code(a: &ApiAnswer) -> &str {
    a.body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn the_api_is_off_without_a_key_and_needs_the_right_key() -> Result<()> {
    let backend = Backend::start(Kind::Redis).await?;
    let off = backend.node("off", |_| {})?;
    let a = ApiClient::connect(off.addr, Some(KEY)).await?.get("/api/online").await?;
    assert_eq!((a.status, error_code(&a)), (404, "not_found"), "{a:?}");
    assert!(a.body["error"]["message"].as_str().unwrap().contains("[api] key"), "says how to turn it on: {a:?}");

    let on = backend.node("on", with_api)?;
    let mut none = ApiClient::connect(on.addr, None).await?;
    let a = none.get("/api/online").await?;
    assert_eq!((a.status, error_code(&a)), (401, "unauthorized"), "{a:?}");
    let a = none
        .call_with(
            http::Method::GET,
            "/api/online",
            &[("authorization", "apikey wrong-key-0123456789")],
            Default::default(),
        )
        .await?;
    assert_eq!((a.status, error_code(&a)), (401, "unauthorized"), "wrong key: {a:?}");
    let a = none.call_with(http::Method::GET, "/api/online", &[("x-api-key", "wrong")], Default::default()).await?;
    assert_eq!(a.status, 401, "wrong key in X-API-Key: {a:?}");
    let a = none.call_with(http::Method::GET, "/api/online", &[("x-api-key", KEY)], Default::default()).await?;
    assert_eq!((a.status, &a.body["type"]), (200, &json!("online")), "X-API-Key: {a:?}");
    let auth = format!("apikey {KEY}");
    let a = none.call_with(http::Method::GET, "/api/online", &[("authorization", &auth)], Default::default()).await?;
    assert_eq!(a.status, 200, "Authorization: apikey: {a:?}");

    let mut c = api(&on).await?;
    let a = c.get("/api/nope").await?;
    assert_eq!((a.status, error_code(&a)), (404, "not_found"), "{a:?}");
    let a = c.get("/api/publish").await?;
    assert_eq!((a.status, error_code(&a)), (405, "method_not_allowed"), "{a:?}");
    // The WebSocket side is untouched by the API.
    let (_ws, hello) = WsClient::connect_ready(&on.ws_url("still-ws")).await?;
    assert_eq!(hello["type"], "connected");
    Ok(())
}

async fn members(nodes: &[&InProcessNode], room: &str) -> Result<Vec<WsClient>> {
    let mut out = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let (mut ws, _) = WsClient::connect_ready(&n.ws_url(&format!("member-{i}"))).await?;
        ws.join(room).await?;
        out.push(ws);
    }
    Ok(out)
}

async fn publish_reaches_members_on_three_nodes_once_with_data(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let (n1, n2, n3) =
        (backend.node("node-1", with_api)?, backend.node("node-2", with_api)?, backend.node("node-3", with_api)?);
    let mut ms = members(&[&n1, &n2, &n3], "lobby").await?;
    let data = json!({"order": {"id": 7, "lines": [{"sku": "a", "qty": 2}, null, 1.5, "x"]}, "ok": true});
    let a = api(&n2).await?.post("/api/publish", &json!({"room": "lobby", "data": data})).await?;
    assert_eq!(a.status, 200, "{a:?}");
    let seq = a.body["seq"].as_u64().context("seq")?;
    let epoch = a.body["epoch"].as_str().context("epoch")?.to_string();
    assert_eq!(a.body, json!({"room": "lobby", "seq": seq, "epoch": epoch}));
    let a = api(&n1).await?.post("/api/publish", &json!({"room": "lobby", "text": "marker", "from": "Ops"})).await?;
    assert_eq!(a.body["seq"], seq + 1, "{a:?}");
    for m in &mut ms {
        let marker = m.recv_until("marker", |v| v["text"] == "marker").await?;
        assert_eq!((&marker["from"], &marker["id"]), (&json!("Ops"), &json!("server")));
        let got: Vec<&Value> = m.seen.iter().filter(|v| v["type"] == "message" && v["seq"] == seq).collect();
        assert_eq!(got.len(), 1, "exactly once: {:?}", m.seen);
        let msg = got[0];
        assert_eq!(msg["data"], data, "data intact");
        assert_eq!((&msg["from"], &msg["id"], &msg["server"]), (&json!("server"), &json!("server"), &json!("node-2")));
        assert_eq!((&msg["text"], &msg["epoch"]), (&json!(""), &json!(epoch)));
        assert!(msg["timestamp"].as_u64().unwrap_or(0) > 0);
    }
    Ok(())
}

tether_tests::on_every_backbone!(publish_reaches_members_on_three_nodes_once_with_data);

async fn an_idempotency_key_publishes_once_on_any_node(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let (n1, n2) = (backend.node("node-1", with_api)?, backend.node("node-2", with_api)?);
    let mut ms = members(&[&n1, &n2], "r").await?;
    let body = json!({"room": "r", "data": {"n": 1}, "idempotency_key": "order-7"});
    let first = api(&n1).await?.post("/api/publish", &body).await?;
    assert_eq!(first.status, 200, "{first:?}");
    let (seq, epoch) = (first.body["seq"].clone(), first.body["epoch"].clone());
    let again = api(&n1).await?.post("/api/publish", &body).await?;
    assert_eq!(again.body, json!({"room": "r", "seq": seq, "epoch": epoch, "duplicate": true}), "same node");
    let elsewhere = api(&n2).await?.post("/api/publish", &body).await?;
    assert_eq!(elsewhere.body, json!({"room": "r", "seq": seq, "epoch": epoch, "duplicate": true}), "other node");
    // The key is scoped to the room: another room publishes.
    let other_room =
        api(&n2).await?.post("/api/publish", &json!({"room": "r2", "text": "x", "idempotency_key": "order-7"})).await?;
    assert_eq!(other_room.body.get("duplicate"), None, "{other_room:?}");
    api(&n2).await?.post("/api/publish", &json!({"room": "r", "text": "marker"})).await?;
    for m in &mut ms {
        m.recv_until("marker", |v| v["text"] == "marker").await?;
        let copies = m.seen.iter().filter(|v| v["type"] == "message" && v["data"] == json!({"n": 1})).count();
        assert_eq!(copies, 1, "{:?}", m.seen);
    }
    Ok(())
}

tether_tests::on_every_backbone!(an_idempotency_key_publishes_once_on_any_node);

async fn broadcast_presence_online_and_history(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let (n1, n2) = (backend.node("node-1", with_api)?, backend.node("node-2", with_api)?);
    let (mut alice, _) = WsClient::connect_ready(&n1.ws_url("alice")).await?;
    alice.set_name("Alice").await?;
    alice.join("a").await?;
    let (mut bob, _) = WsClient::connect_ready(&n2.ws_url("bob")).await?;
    bob.join("a").await?;
    bob.join("b").await?;
    let mut c = api(&n1).await?;

    let a = c.post("/api/broadcast", &json!({"rooms": ["a", "b", "bad room"], "data": [1, 2]})).await?;
    assert_eq!(a.status, 200, "{a:?}");
    let results = a.body["results"].as_array().context("results")?;
    assert_eq!(results.len(), 3);
    assert_eq!((&results[0]["room"], results[0]["seq"].is_u64()), (&json!("a"), true));
    assert_eq!((&results[1]["room"], results[1]["seq"].is_u64()), (&json!("b"), true));
    assert_eq!((&results[2]["room"], &results[2]["error"]["code"]), (&json!("bad room"), &json!("invalid_room")));
    bob.recv_until("broadcast in a", |v| v["room"] == "a" && v["data"] == json!([1, 2])).await?;
    bob.recv_until("broadcast in b", |v| v["room"] == "b" && v["data"] == json!([1, 2])).await?;
    let rooms: Vec<String> = (0..101).map(|i| format!("r{i}")).collect();
    let a = c.post("/api/broadcast", &json!({"rooms": rooms, "text": "x"})).await?;
    assert_eq!((a.status, error_code(&a)), (400, "invalid_field"), "over 100 rooms: {a:?}");

    let a = c.get("/api/presence?room=a").await?;
    assert_eq!(a.body["type"], "presence", "{a:?}");
    assert_eq!(a.body["room"], "a");
    let mut users: Vec<(String, String)> = a.body["users"]
        .as_array()
        .context("users")?
        .iter()
        .map(|u| (u["id"].as_str().unwrap().to_string(), u["user"].as_str().unwrap().to_string()))
        .collect();
    users.sort();
    assert_eq!(users, [("alice".into(), "Alice".into()), ("bob".into(), "bob".into())]);
    let a = c.get("/api/presence").await?;
    assert_eq!((a.status, error_code(&a)), (400, "missing_field"));
    let a = c.get("/api/online").await?;
    assert_eq!(a.body["type"], "online");
    assert_eq!(a.body["users"].as_array().map(Vec::len), Some(2), "{a:?}");

    // History: room "h" gets 5 messages; pages by since/limit.
    let mut seqs = Vec::new();
    for i in 0..5 {
        let a = c.post("/api/publish", &json!({"room": "h", "data": {"i": i}})).await?;
        seqs.push(a.body["seq"].as_u64().context("seq")?);
    }
    let page = c.get("/api/history?room=h&limit=2").await?.body;
    assert_eq!(page["room"], "h");
    assert_eq!(page["more"], true);
    let got: Vec<&Value> = page["messages"].as_array().context("messages")?.iter().collect();
    assert_eq!(got.iter().map(|m| m["seq"].as_u64().unwrap()).collect::<Vec<_>>(), &seqs[..2]);
    assert_eq!(got[0]["data"], json!({"i": 0}), "messages are JSON objects as delivered");
    assert_eq!(got[0]["type"], "message");
    let epoch = page["epoch"].clone();
    let page = c.get(&format!("/api/history?room=h&since={}&limit=10", seqs[2])).await?.body;
    assert_eq!(page["more"], false, "{page}");
    assert_eq!(page["epoch"], epoch);
    let rest: Vec<u64> = page["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(rest, &seqs[3..]);
    let page = c.get(&format!("/api/history?room=h&since={}", seqs[4])).await?.body;
    assert_eq!((page["messages"].as_array().map(Vec::len), &page["more"]), (Some(0), &json!(false)));
    let a = c.get("/api/history?room=h&limit=0").await?;
    assert_eq!((a.status, error_code(&a)), (400, "invalid_field"));
    let a = c.get("/api/history?room=h&since=x").await?;
    assert_eq!((a.status, error_code(&a)), (400, "invalid_field"));
    Ok(())
}

tether_tests::on_every_backbone!(broadcast_presence_online_and_history);

#[tokio::test]
async fn bad_bodies_are_refused_and_the_node_keeps_serving() -> Result<()> {
    let backend = Backend::start(Kind::Redis).await?;
    let node = backend.node("node-1", |cfg| {
        with_api(cfg);
        cfg.max_message_bytes = 4096;
    })?;
    let mut c = api(&node).await?;
    let raw = |body: &str| bytes::Bytes::from(body.to_string());
    let cases: [(&str, u16, &str); 9] = [
        ("not json", 400, "bad_json"),
        ("[1,2]", 400, "bad_json"),
        (r#"{"room":"r","data":"#, 400, "bad_json"),
        (r#"{"data":1}"#, 400, "missing_field"),
        (r#"{"room":"r"}"#, 400, "missing_field"),
        (r#"{"room":"has space","data":1}"#, 400, "invalid_room"),
        (r#"{"room":"","data":1}"#, 400, "invalid_room"),
        (r#"{"room":"r","data":1,"from":""}"#, 400, "invalid_name"),
        (r#"{"room":"r","data":1,"colour":"red"}"#, 400, "invalid_field"),
    ];
    for (body, status, code) in cases {
        let a = c.call_with(http::Method::POST, "/api/publish", &[], raw(body)).await?;
        assert_eq!((a.status, error_code(&a)), (status, code), "{body}: {a:?}");
    }
    let big = json!({"room": "r", "data": "x".repeat(5000)}).to_string();
    let a = c.call_with(http::Method::POST, "/api/publish", &[], raw(&big)).await?;
    assert_eq!((a.status, error_code(&a)), (413, "too_large"), "{a:?}");
    let long_key = json!({"room": "r", "data": 1, "idempotency_key": "k".repeat(129)});
    let a = api(&node).await?.post("/api/publish", &long_key).await?;
    assert_eq!((a.status, error_code(&a)), (400, "invalid_field"));
    // Still serving, on a fresh connection and on the WebSocket side.
    let a = api(&node).await?.post("/api/publish", &json!({"room": "r", "data": {"ok": 1}})).await?;
    assert_eq!(a.status, 200, "{a:?}");
    let (_ws, hello) = WsClient::connect_ready(&node.ws_url("after")).await?;
    assert_eq!(hello["type"], "connected");
    let metrics = tether_tests::http_get(node.addr, "/metrics").await?.1;
    assert!(metrics.contains(r#"tether_node_api_requests_total{endpoint="publish",status="400"} 10"#), "{metrics}");
    Ok(())
}
