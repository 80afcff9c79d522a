//! Presence across nodes: who is in a room and who is online is true cluster-wide, and stays
//! true when a node dies without a word.

use anyhow::Result;
use serde_json::Value;
use std::time::{Duration, Instant};
use tether_proto::wire::ClientMsg;
use tether_tests::{Backend, Kind, WsClient};

/// Presence TTL of these tests: 900 ms unless `TETHER_TEST_PRESENCE_TTL_MS` says otherwise
/// (set it to 3000, the default, to measure convergence as deployed).
fn presence_ttl() -> Duration {
    let ms = std::env::var("TETHER_TEST_PRESENCE_TTL_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(900);
    Duration::from_millis(ms)
}

fn presence(room: &str) -> ClientMsg {
    ClientMsg::Presence { room: room.into() }
}

fn fast(cfg: &mut tether_node::Config) {
    cfg.presence_ttl = presence_ttl();
}

/// Sends a `presence` or `online` request and returns the sorted ids of its answer (a frame
/// of the request's own type).
async fn ids_in(c: &mut WsClient, request: ClientMsg) -> Result<Vec<String>> {
    c.send_msg(&request).await?;
    let answer = c.recv_type(request.kind()).await?;
    let mut ids: Vec<String> =
        answer["users"].as_array().into_iter().flatten().filter_map(|u| u["id"].as_str().map(String::from)).collect();
    ids.sort();
    Ok(ids)
}

async fn presence_and_online_span_every_node_and_two_tabs_are_one(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", fast)?;
    let n2 = backend.node("node-2", fast)?;
    let (mut a, _) = WsClient::connect_ready(&n1.ws_url("ann")).await?;
    let (mut b, _) = WsClient::connect_ready(&n2.ws_url("ben")).await?;
    let (mut b_tab, _) = WsClient::connect_ready(&n1.ws_url("ben")).await?;
    a.set_name("Ann").await?;
    a.join("lobby").await?;
    b.join("lobby").await?;
    b_tab.join("lobby").await?;
    for c in [&mut a, &mut b] {
        assert_eq!(ids_in(c, presence("lobby")).await?, ["ann", "ben"]);
        assert_eq!(ids_in(c, ClientMsg::Online).await?, ["ann", "ben"]);
    }
    a.send_msg(&ClientMsg::Presence { room: "lobby".into() }).await?;
    let p = a.recv_type("presence").await?;
    let ann = p["users"].as_array().and_then(|u| u.iter().find(|u| u["id"] == "ann")).cloned().unwrap_or_default();
    assert_eq!((ann["user"].as_str(), ann["server"].as_str()), (Some("Ann"), Some("node-1")));
    // Closing one tab announces nothing: Ben is still there.
    b_tab.close().await;
    a.say("lobby", "marker").await?;
    a.recv_until("marker", |v| v["text"] == "marker").await?;
    assert!(!a.seen.iter().any(|v| v["type"] == "user_left"), "{:?}", a.seen);
    assert_eq!(ids_in(&mut a, presence("lobby")).await?, ["ann", "ben"]);
    // The last tab going is announced at once, as `disconnected`.
    b.close().await;
    let left = a.recv_type("user_left").await?;
    assert_eq!((left["id"].as_str(), left["reason"].as_str()), (Some("ben"), Some("disconnected")));
    assert_eq!(ids_in(&mut a, presence("lobby")).await?, ["ann"]);
    // The online entry goes right after the rooms' (a disconnect leaves its rooms first, each
    // announced): polled, with a deadline, not read once.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let online = ids_in(&mut a, ClientMsg::Online).await?;
        if online == ["ann"] {
            break;
        }
        assert!(Instant::now() < deadline, "ben still online 5 s after leaving: {online:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn a_dead_nodes_members_are_announced_once_cluster_wide_unless_they_came_back(kind: Kind) -> Result<()> {
    let backend = Backend::start(kind).await?;
    let n1 = backend.node("node-1", fast)?;
    let mut n2 = backend.node("node-2", fast)?;
    let n3 = backend.node("node-3", fast)?;
    let (mut a, _) = WsClient::connect_ready(&n1.ws_url("a1")).await?;
    let (mut c, _) = WsClient::connect_ready(&n3.ws_url("c1")).await?;
    let (mut gone, _) = WsClient::connect_ready(&n2.ws_url("gone")).await?;
    let (mut back, _) = WsClient::connect_ready(&n2.ws_url("back")).await?;
    for cl in [&mut a, &mut c, &mut gone, &mut back] {
        cl.join("room").await?;
    }
    a.recv_until("back joined", |v| v["type"] == "user_joined" && v["id"] == "back").await?;
    c.recv_until("back joined", |v| v["type"] == "user_joined" && v["id"] == "back").await?;

    let killed = Instant::now();
    n2.kill();
    // `back` returns to another node before the dead one is noticed.
    let (mut back2, hello) = WsClient::connect_ready(&n3.ws_url("back")).await?;
    assert_eq!(hello["session"], "restored");

    for cl in [&mut a, &mut c] {
        let left = cl.recv_until("node_down", |v| v["type"] == "user_left" && v["reason"] == "node_down").await?;
        assert_eq!(left["id"], "gone", "{left}");
        assert_eq!(left["server"], "node-2");
    }
    let noticed = killed.elapsed();
    assert!(noticed < presence_ttl() + Duration::from_secs(3), "noticed after {noticed:?}");
    // Pub/sub keeps a channel's order: a marker published after the announcement arrives
    // after any duplicate of it would have.
    back2.say("room", "after").await?;
    for cl in [&mut a, &mut c] {
        cl.recv_until("marker", |v| v["text"] == "after").await?;
        let downs: Vec<&Value> = cl.seen.iter().filter(|v| v["type"] == "user_left").collect();
        assert_eq!(downs.len(), 1, "exactly one announcement, for `gone` only: {downs:?}");
    }
    assert_eq!(ids_in(&mut c, presence("room")).await?, ["a1", "back", "c1"]);
    assert_eq!(ids_in(&mut a, ClientMsg::Online).await?, ["a1", "back", "c1"]);
    // `gone` coming back later is announced as joined again.
    let (_gone2, _) = WsClient::connect_ready(&n1.ws_url("gone")).await?;
    let j = c.recv_until("gone rejoined", |v| v["type"] == "user_joined" && v["id"] == "gone").await?;
    assert_eq!(j["server"], "node-1");
    eprintln!("node_down noticed {noticed:?} after the kill (presence_ttl {:?})", presence_ttl());
    gone.close().await;
    back.close().await;
    Ok(())
}

tether_tests::on_every_backbone!(
    presence_and_online_span_every_node_and_two_tabs_are_one,
    a_dead_nodes_members_are_announced_once_cluster_wide_unless_they_came_back,
);
