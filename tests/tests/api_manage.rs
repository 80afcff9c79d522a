//! The server API acting on clients wherever they are connected: `disconnect` closes a
//! client's connections on another node with the asked code and reason (and `forget` drops
//! its session); `unsubscribe` takes it out of a room everywhere, members hearing `user_left`
//! with reason `removed`, while it stays connected and its session loses the room.

use anyhow::Result;
use serde_json::json;
use tether_kit::ApiClient;
use tether_node::config::ApiKey;
use tether_tests::{Backend, Closed, Kind, WsClient};

const KEY: &str = "test-api-key-0123456789";

fn with_api(cfg: &mut tether_node::Config) {
    cfg.api_key = Some(ApiKey::new(KEY).expect("a valid key"));
}

async fn disconnect_closes_a_client_on_another_node(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let (n1, n2) = (backend.node("node-1", with_api)?, backend.node("node-2", with_api)?);
    let (mut target, _) = WsClient::connect_ready(&n2.ws_url("target")).await?;
    target.join("r").await?;
    let (mut other, _) = WsClient::connect_ready(&n2.ws_url("other")).await?;
    other.join("r").await?;
    let mut c = ApiClient::connect(n1.addr, Some(KEY)).await?;
    let a = c.post("/api/disconnect", &json!({"client": "target", "code": 4003, "reason": "banned"})).await?;
    assert_eq!((a.status, &a.body), (200, &json!({"disconnected": 1})), "{a:?}");
    assert_eq!(target.closed().await?, Closed::Code(4003, "banned".into()));
    other.recv_until("target left", |v| v["type"] == "user_left" && v["id"] == "target").await?;
    // Its session is kept without `forget`...
    let (_back, hello) = WsClient::connect_ready(&n1.ws_url("target")).await?;
    assert_eq!((&hello["session"], &hello["rooms"]), (&json!("restored"), &json!(["r"])));
    // ...and gone with it; the default code and reason apply.
    let mut back = _back;
    let a = c.post("/api/disconnect", &json!({"client": "target", "forget": true})).await?;
    assert_eq!(a.body, json!({"disconnected": 1}));
    assert_eq!(back.closed().await?, Closed::Code(4000, "disconnected by server".into()));
    let (_again, hello) = WsClient::connect_ready(&n2.ws_url("target")).await?;
    assert_eq!(hello["session"], "new", "{hello}");
    // Nobody by that id: 0. A code outside 4000–4999 (or 1000) is refused.
    let a = c.post("/api/disconnect", &json!({"client": "nobody"})).await?;
    assert_eq!(a.body, json!({"disconnected": 0}));
    let a = c.post("/api/disconnect", &json!({"client": "target", "code": 1011})).await?;
    assert_eq!((a.status, &a.body["error"]["code"]), (400, &json!("invalid_field")));
    let a = c.post("/api/disconnect", &json!({"code": 4000})).await?;
    assert_eq!((a.status, &a.body["error"]["code"]), (400, &json!("missing_field")));
    let a = c.post("/api/disconnect", &json!({"client": "bad id!"})).await?;
    assert_eq!((a.status, &a.body["error"]["code"]), (400, &json!("invalid_field")));
    Ok(())
}

tether_tests::on_every_backbone!(disconnect_closes_a_client_on_another_node);

async fn unsubscribe_removes_a_client_from_a_room_everywhere(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let (n1, n2) = (backend.node("node-1", with_api)?, backend.node("node-2", with_api)?);
    let (mut target, _) = WsClient::connect_ready(&n2.ws_url("target")).await?;
    target.join("r").await?;
    target.join("keep").await?;
    let (mut member, _) = WsClient::connect_ready(&n1.ws_url("member")).await?;
    member.join("r").await?;
    let mut c = ApiClient::connect(n1.addr, Some(KEY)).await?;
    let a = c.post("/api/unsubscribe", &json!({"client": "target", "room": "r"})).await?;
    assert_eq!((a.status, &a.body), (200, &json!({"removed": 1})), "{a:?}");
    let left = member.recv_until("user_left", |v| v["type"] == "user_left" && v["id"] == "target").await?;
    assert_eq!(left["reason"], "removed");
    let told = target.recv_until("own user_left", |v| v["type"] == "user_left" && v["room"] == "r").await?;
    assert_eq!(told["reason"], "removed");
    // Still connected, and no longer gets the room's messages.
    c.post("/api/publish", &json!({"room": "r", "text": "after"})).await?;
    member.recv_until("after", |v| v["text"] == "after").await?;
    c.post("/api/publish", &json!({"room": "keep", "text": "kept"})).await?;
    target.recv_until("kept", |v| v["text"] == "kept").await?;
    assert!(!target.seen.iter().any(|v| v["text"] == "after"), "{:?}", target.seen);
    let a = c.get("/api/presence?room=r").await?;
    assert_eq!(a.body["users"].as_array().map(Vec::len), Some(1), "{a:?}");
    // The session lost the room: a reconnect does not bring it back.
    target.close().await;
    let (_back, hello) = WsClient::connect_ready(&n1.ws_url("target")).await?;
    assert_eq!(hello["rooms"], json!(["keep"]), "{hello}");
    let a = c.post("/api/unsubscribe", &json!({"client": "target", "room": "r"})).await?;
    assert_eq!(a.body, json!({"removed": 0}));
    let a = c.post("/api/unsubscribe", &json!({"client": "target"})).await?;
    assert_eq!((a.status, &a.body["error"]["code"]), (400, &json!("missing_field")));
    Ok(())
}

tether_tests::on_every_backbone!(unsubscribe_removes_a_client_from_a_room_everywhere);
