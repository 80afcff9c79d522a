//! Failover without loss, end to end through real processes: a node killed with SIGKILL
//! under traffic, its client back through the balancer with everything it had.

use anyhow::{Context, Result};
use serde_json::json;
use std::time::Duration;
use tether_proto::hrw;
use tether_proto::wire::ResumePoint;
use tether_tests::WsClient;

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

fn id_on(node: &str, prefix: &str) -> String {
    tether_tests::id_ranked(&NODES, prefix, &[node])
}

fn seqs(cs: &[&WsClient], room: &str) -> Vec<u64> {
    cs.iter().flat_map(|c| c.seqs(room)).collect()
}

/// Where `c` is in `room`; from the start if it never got a message there.
fn position(c: &WsClient, room: &str) -> ResumePoint {
    c.position(room).unwrap_or(ResumePoint { seq: 0, epoch: None })
}

#[tokio::test]
async fn killed_nodes_client_is_restored_through_the_balancer_with_every_message() -> Result<()> {
    let mut c = tether_tests::test_cluster(3).await?;
    let base = c.ws_url();
    let url = |id: &str| format!("{base}?client={id}");
    let victim = id_on("node-2", "victim");
    let (mut v, hello) = WsClient::connect_ready(&url(&victim)).await?;
    assert_eq!(hello["server"], "node-2");
    v.set_name("Vic").await?;
    v.join("one").await?;
    v.join("two").await?;
    let talker = id_on("node-1", "talker");
    let (mut t, _) = WsClient::connect_ready(&url(&talker)).await?;
    t.join("one").await?;
    t.join("two").await?;
    let listener = id_on("node-3", "listener");
    let (mut l, _) = WsClient::connect_ready(&url(&listener)).await?;
    l.join("two").await?;

    // Others keep talking while node-2 is killed.
    let talk_url = url(&talker);
    let chatter = tokio::spawn(async move {
        let (mut t2, _) = WsClient::connect_ready(&talk_url).await?;
        for i in 0..60 {
            for room in ["one", "two"] {
                t2.say(room, format!("{room}-{i}")).await?;
            }
            t2.recv_until("own echo", |m| m["text"] == format!("two-{i}").as_str()).await?;
        }
        anyhow::Ok(())
    });
    v.recv_until("some traffic before the kill", |m| m["text"] == "two-5").await?;
    c.node_mut("node-2").context("node-2")?.kill().await?;
    v.closed().await?;
    let (pos_one, pos_two) = (position(&v, "one"), position(&v, "two"));

    let mut v2 = WsClient::connect(&url(&victim)).await.context("first reconnect")?;
    let hello = v2.recv_type("connected").await?;
    assert_eq!(hello["session"], "restored");
    assert_eq!(hello["name"], "Vic");
    assert_eq!(hello["rooms"], json!(["one", "two"]));
    let survivors = ["node-1", "node-3"];
    assert_eq!(hello["server"], survivors[hrw::rank(&survivors, &victim)[0]], "its next-ranked node");
    v2.resume([("one", pos_one), ("two", pos_two)]).await?;
    for room in ["one", "two"] {
        let r = v2.recv_until("resumed", |m| m["type"] == "resumed" && m["room"] == room).await?;
        assert_eq!(r["complete"], true, "{r}");
    }
    // Right after the restore, its own message reaches the others.
    v2.say("two", "back from the dead").await?;
    l.recv_until("victim's message", |m| m["text"] == "back from the dead").await?;
    chatter.await??;
    v2.recv_until("end of chatter", |m| m["text"] == "two-59").await?;
    assert!(v2.seen.iter().any(|m| m["text"] == "back from the dead"), "own message came back");
    for room in ["one", "two"] {
        let got = seqs(&[&v, &v2], room);
        let head = *got.last().context("messages")?;
        assert_eq!(got, (1..=head).collect::<Vec<_>>(), "{room}: every seq once, in order");
    }
    t.close().await;
    Ok(())
}

#[tokio::test]
async fn drained_nodes_clients_get_1012_and_are_restored_elsewhere_then_undrain_brings_new_ones_back() -> Result<()> {
    let c = tether_tests::test_cluster(3).await?;
    let base = c.ws_url();
    let url = |id: &str| format!("{base}?client={id}");
    let ids: Vec<String> = (0..4).map(|i| id_on("node-2", &format!("drain{i}"))).collect();
    let mut clients = Vec::new();
    for id in &ids {
        let (mut ws, hello) = WsClient::connect_ready(&url(id)).await?;
        assert_eq!(hello["server"], "node-2");
        ws.join("d").await?;
        clients.push(ws);
    }
    let (mut bystander, hello) = WsClient::connect_ready(&url(&id_on("node-1", "bystander"))).await?;
    assert_eq!(hello["server"], "node-1");
    bystander.join("d").await?;

    let mut admin = tether_tests::HttpConn::connect(c.balancer().admin_addr()).await?;
    let (status, body) = admin.request(http::Method::POST, "/nodes/node-2/drain").await?;
    assert_eq!(status, 200, "{body}");
    for ws in &mut clients {
        assert_eq!(ws.closed().await?, tether_tests::Closed::Code(1012, "node draining".into()));
    }
    let survivors = ["node-1", "node-3"];
    for id in &ids {
        let (mut back, hello) = WsClient::connect_ready(&url(id)).await?;
        assert_eq!(hello["server"], survivors[hrw::rank(&survivors, id)[0]], "{id} moved to its next node");
        assert_eq!((hello["session"].as_str(), &hello["rooms"]), (Some("restored"), &json!(["d"])));
        back.resume([]).await?;
        back.close().await;
    }
    // The bystander never noticed anything but the others' moves.
    bystander.say("d", "still here").await?;
    bystander.recv_until("own message", |v| v["text"] == "still here").await?;

    let (status, _) = admin.request(http::Method::POST, "/nodes/node-2/undrain").await?;
    assert_eq!(status, 200);
    tether_tests::eventually("node-2 routable again", || async {
        let mut a = tether_tests::HttpConn::connect(c.balancer().admin_addr()).await.ok()?;
        let r = a.get_json(&format!("/route?client={}", ids[0])).await.ok()?;
        (r["node"] == "node-2").then_some(())
    })
    .await?;
    let (_again, hello) = WsClient::connect_ready(&url(&ids[0])).await?;
    assert_eq!(hello["server"], "node-2");
    Ok(())
}

#[tokio::test]
async fn sigterm_closes_a_nodes_clients_with_1012_and_they_resume_elsewhere() -> Result<()> {
    let mut c = tether_tests::test_cluster(3).await?;
    let base = c.ws_url();
    let id = id_on("node-3", "term");
    let (mut ws, _) = WsClient::connect_ready(&format!("{base}?client={id}")).await?;
    ws.join("t").await?;
    c.node_mut("node-3").context("node-3")?.terminate()?;
    assert_eq!(ws.closed().await?, tether_tests::Closed::Code(1012, "node shutting down".into()));
    let (_back, hello) = WsClient::connect_ready(&format!("{base}?client={id}")).await?;
    assert_eq!(hello["session"], "restored");
    assert_ne!(hello["server"], "node-3");
    let exit = c.node_mut("node-3").context("node-3")?.wait_exit(Duration::from_secs(10)).await?;
    assert!(exit.is_some_and(|s| s.success()), "node-3 exits 0 after draining: {exit:?}");
    Ok(())
}
