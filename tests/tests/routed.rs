//! Placement by room (`hash_keys = ["query:room"]`): the value of the `room` query parameter,
//! not the client id, is what the balancer ranks nodes by, so every member of a room lands on
//! one node — with no backbone at all, a room's messages still reach all its members. The
//! client id still comes from the usual sources and reaches the node in `X-Client-Id`;
//! `/route?room=R` answers for a room; when the room's node dies its members follow the
//! room to its next node, reconnecting or re-homed.

use anyhow::{Context, Result};
use serde_json::Value;
use tether_kit::{Cluster, ClusterLogs, ClusterOptions};
use tether_tests::{http_get, id_ranked, until_up, HttpConn, WsClient};

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

/// Three real nodes (`node_args`) behind a balancer placing by room, with `extra` TOML.
async fn routed_cluster(node_args: &[&str], extra: &str) -> Result<(Cluster, tempfile::TempDir)> {
    let dir = tempfile::Builder::new().prefix("tether-routed-").tempdir()?;
    let config = dir.path().join("balancer.toml");
    std::fs::write(&config, format!("hash_keys = [\"query:room\"]\n{extra}"))?;
    let cluster = Cluster::start(ClusterOptions {
        nodes: 3,
        node_args: node_args.iter().map(|a| (*a).to_owned()).collect(),
        balancer_args: vec![
            "--config".into(),
            config.display().to_string(),
            "--health-interval-ms".into(),
            "100".into(),
        ],
        logs: ClusterLogs::Null,
        ..ClusterOptions::default()
    })
    .await?;
    Ok((cluster, dir))
}

fn url(c: &Cluster, query: &str) -> String {
    format!("{}?{query}", c.ws_url())
}

/// The `message` frames with this text a client has seen.
fn copies(c: &WsClient, text: &str) -> usize {
    c.seen.iter().filter(|v| v["type"] == "message" && v["text"] == text).count()
}

#[tokio::test]
async fn a_rooms_members_share_one_node_and_reach_each_other_without_a_backbone() -> Result<()> {
    let (c, _dir) = routed_cluster(&["--backbone", "none"], "").await?;
    // A room whose key ranks node-2 first, and two clients whose ids rank other nodes first:
    // placed by id they would never meet.
    let room = id_ranked(&NODES, "room", &["node-2"]);
    let alice_id = id_ranked(&NODES, "alice", &["node-1"]);
    let bob_id = id_ranked(&NODES, "bob", &["node-3"]);

    let (mut alice, hello) = WsClient::connect_ready(&url(&c, &format!("room={room}&client={alice_id}"))).await?;
    assert_eq!((hello["server"].as_str(), hello["id"].as_str()), (Some("node-2"), Some(alice_id.as_str())));
    // The id may come from the header as usual; the room still places the connection.
    let mut bob = WsClient::connect_with(&url(&c, &format!("room={room}")), &[("X-Client-Id", &bob_id)]).await?;
    let hello = bob.recv_type("connected").await?;
    assert_eq!((hello["server"].as_str(), hello["id"].as_str()), (Some("node-2"), Some(bob_id.as_str())));

    alice.join(&room).await?;
    bob.join(&room).await?;
    bob.say(&room, "no backbone needed").await?;
    for cl in [&mut alice, &mut bob] {
        cl.recv_until("bob's message", |v| v["type"] == "message" && v["text"] == "no backbone needed").await?;
        assert_eq!(copies(cl, "no backbone needed"), 1);
    }

    // Without the parameter, a request is placed by its id.
    let (_carol, hello) = WsClient::connect_ready(&url(&c, &format!("client={alice_id}"))).await?;
    assert_eq!(hello["server"], "node-1");

    // `/route` answers for a room, for a room and a client (the room wins, as for a
    // connection), and for a client alone.
    let mut admin = HttpConn::connect(c.balancer().admin_addr()).await?;
    let r = admin.get_json(&format!("/route?room={room}")).await?;
    assert_eq!(
        (r["node"].as_str(), r["placed_by"].as_str(), r["key"].as_str()),
        (Some("node-2"), Some("query:room"), Some(room.as_str())),
        "{r}"
    );
    assert!(r.get("client").is_none(), "{r}");
    assert_eq!(r["rank"][0], "node-2");
    let r = admin.get_json(&format!("/route?client={alice_id}&room={room}")).await?;
    assert_eq!((r["node"].as_str(), r["client"].as_str()), (Some("node-2"), Some(alice_id.as_str())), "{r}");
    let r = admin.get_json(&format!("/route?client={alice_id}")).await?;
    assert_eq!(r["node"], "node-1", "{r}");
    assert!(r.get("placed_by").is_none(), "{r}");

    // A room parameter that is there but unusable is refused, not ignored.
    let (code, body) = admin.get("/route?room=").await?;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("room"), "{body}");
    let (code, body) = admin.get("/route").await?;
    assert!(code == 400 && body.contains("client or room"), "{code} {body}");
    let (code, body) = http_get(c.balancer().addr(), &format!("/healthz?room=&client={alice_id}")).await?;
    assert_eq!(code, 400, "{body}");
    assert!(WsClient::connect(&url(&c, "room=")).await.is_err(), "an empty room is a bad request");
    Ok(())
}

#[tokio::test]
async fn a_rooms_members_follow_it_to_its_next_node_reconnecting_or_rehomed() -> Result<()> {
    // The Redis backbone here, so that re-homed clients keep their room: placement by room
    // works with a backbone too (it only saves cross-node fan-out then).
    let (mut c, _dir) = routed_cluster(&[], "failover = \"rehome\"\n").await?;
    let room = id_ranked(&NODES, "room", &["node-2", "node-3"]);
    // Ranked by their ids, both would go to node-1 once node-2 is gone.
    let ids = [id_ranked(&NODES, "ann", &["node-2", "node-1"]), id_ranked(&NODES, "ben", &["node-1"])];
    let mut members = Vec::new();
    for id in &ids {
        let (mut m, hello) = WsClient::connect_ready(&url(&c, &format!("client={id}&room={room}"))).await?;
        assert_eq!(hello["server"], "node-2", "{id}");
        m.join(&room).await?;
        members.push(m);
    }

    c.node_mut("node-2").context("node-2")?.kill().await?;
    for m in &mut members {
        let rehomed = m.recv_type("rehomed").await?;
        assert_eq!(rehomed["server"], "node-3", "the room's next node, not the id's: {rehomed}");
    }
    members[0].say(&room, "after the move").await?;
    for m in &mut members {
        m.recv_until("the message after the move", |v| v["type"] == "message" && v["text"] == "after the move").await?;
    }
    // A new connection to the room (a client that reconnects by itself) goes there too, and
    // `/route` says so.
    let (_late, hello) = WsClient::connect_ready(&url(&c, &format!("room={room}"))).await?;
    assert_eq!(hello["server"], "node-3");
    let mut admin = HttpConn::connect(c.balancer().admin_addr()).await?;
    let r: Value = admin.get_json(&format!("/route?room={room}")).await?;
    assert_eq!(r["node"], "node-3", "{r}");

    // Back up, node-2 takes the room's new connections again.
    c.node_mut("node-2").context("node-2")?.restart().await?;
    until_up(&c, "node-2").await?;
    let (_again, hello) = WsClient::connect_ready(&url(&c, &format!("room={room}"))).await?;
    assert_eq!(hello["server"], "node-2");
    Ok(())
}
