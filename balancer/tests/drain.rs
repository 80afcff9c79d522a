//! Draining a node through the admin port closes its clients with 1012 at a frame boundary,
//! and a node that closes its own clients with 1012 (its SIGTERM) is passed through without
//! being taken for dead.

mod common;

use common::*;
use http::{Method, StatusCode};

/// WebSocket close code "service restart": reconnect now.
const CLOSE_RESTART: u16 = 1012;

async fn admin_post(lb: &Balancer, path: &str) -> serde_json::Value {
    let (code, _, body) = http(lb.admin, Method::POST, path, &[]).await;
    assert_eq!(code, StatusCode::OK, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn drain_closes_the_nodes_clients_with_1012_and_leaves_the_others() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;
    let drained = 0;
    let drained_ids = ids_ranking_first(&NAMES, drained, 4);
    let other_ids: Vec<String> = [1, 2].into_iter().flat_map(|n| ids_ranking_first(&NAMES, n, 2)).collect();

    let mut drained_ws = Vec::new();
    for id in &drained_ids {
        let (ws, hello) = ws_for(lb.addr, id).await;
        assert_eq!(hello.server, NAMES[drained]);
        drained_ws.push(ws);
    }
    let mut other_ws = Vec::new();
    for id in &other_ids {
        other_ws.push(ws_for(lb.addr, id).await.0);
    }

    let answer = admin_post(&lb, &format!("/nodes/{}/drain", NAMES[drained])).await;
    assert_eq!(answer["state"], "draining");
    assert_eq!(answer["changed"], true);
    for ws in &mut drained_ws {
        assert_eq!(expect_close_code(ws).await, CLOSE_RESTART);
        // ...and then the connection ends.
        expect_closed(ws).await;
    }
    for ws in &mut other_ws {
        echo(ws, "untouched").await;
    }
    let active = format!("tether_balancer_active_connections{{node=\"{}\"}}", NAMES[drained]);
    eventually("the drained node's tunnels to be gone", || async { lb.metric(&active).await == 0.0 }).await;

    // Reconnecting, each drained client lands on its own next-ranked node.
    let mut moved = Vec::new();
    for id in &drained_ids {
        let (ws, hello) = ws_for(lb.addr, id).await;
        assert_eq!(hello.server, NAMES[tether_proto::hrw::rank(&NAMES, id)[1]]);
        moved.push(ws);
    }

    // After undrain, new connections of those ids go back; the moved ones stay where they are.
    let answer = admin_post(&lb, &format!("/nodes/{}/undrain", NAMES[drained])).await;
    assert_eq!(answer["state"], "up");
    for id in &drained_ids {
        let (_ws, hello) = ws_for(lb.addr, id).await;
        assert_eq!(hello.server, NAMES[drained]);
    }
    for ws in &mut moved {
        echo(ws, "not moved back").await;
    }

    // A second drain closes the tunnels opened since the undrain, too.
    let (mut again, _) = ws_for(lb.addr, &drained_ids[0]).await;
    admin_post(&lb, &format!("/nodes/{}/drain", NAMES[drained])).await;
    assert_eq!(expect_close_code(&mut again).await, CLOSE_RESTART);
    // The state itself is unchanged by all this: no health flip.
    assert_eq!(
        lb.metric(&format!("tether_balancer_node_state_changes_total{{node=\"{}\"}}", NAMES[drained])).await,
        0.0
    );
}

#[tokio::test]
async fn drain_while_streaming_delivers_only_whole_frames_then_1012() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;
    let drained = 1;
    // Several streams at once, each in its own place of its own frame when the drain lands.
    let mut streams = Vec::new();
    for id in ids_ranking_first(&NAMES, drained, 4) {
        let (mut ws, _) = ws_connect(lb.addr, &format!("?client={id}&mode=stream"), &[]).await.unwrap();
        assert_eq!(hello(&mut ws).await.server, NAMES[drained]);
        streams.push(ws);
    }
    // An echo client of the same node, idle when the drain comes.
    let (mut idle, _) = ws_for(lb.addr, &ids_ranking_first(&NAMES, drained, 5)[4]).await;
    let (mut elsewhere, _) = ws_for(lb.addr, &ids_ranking_first(&NAMES, 0, 1)[0]).await;

    // Let every stream get going (past a 64-bit-length frame) before draining.
    for ws in &mut streams {
        for i in 0..4 {
            let msg = within("stream frame", futures_util::StreamExt::next(ws)).await.unwrap().unwrap();
            assert_eq!(msg.to_text().unwrap(), stream_message(i));
        }
    }
    admin_post(&lb, &format!("/nodes/{}/drain", NAMES[drained])).await;

    // The first four frames were read above: the count goes on from there.
    let reads = streams.iter_mut().map(|ws| read_stream_until_close(ws, 4));
    for (_, close) in futures_util::future::join_all(reads).await {
        let close = close.expect("a close frame, not a bare hang-up");
        assert_eq!(u16::from(close.code), CLOSE_RESTART);
        assert_eq!(close.reason.as_str(), "node draining");
    }
    assert_eq!(expect_close_code(&mut idle).await, CLOSE_RESTART);
    echo(&mut elsewhere, "other nodes are untouched").await;
}

#[tokio::test]
async fn a_node_closing_its_clients_with_1012_is_not_marked_down() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;
    let leaving = 2;
    let ids = ids_ranking_first(&NAMES, leaving, 3);
    let mut clients = Vec::new();
    for id in &ids {
        clients.push(ws_for(lb.addr, id).await.0);
    }

    // The node's SIGTERM: its own 1012 to every client, and /readyz down.
    nodes[leaving].shut_down_gracefully();
    for ws in &mut clients {
        assert_eq!(expect_close_code(ws).await, CLOSE_RESTART);
    }
    lb.wait_state(NAMES[leaving], "unready").await;
    // Closed tunnels are not failed connects: the node is alive, just not ready.
    let failures = format!("tether_balancer_upstream_connect_failures_total{{node=\"{}\"}}", NAMES[leaving]);
    assert_eq!(lb.metric(&failures).await, 0.0);
    let up = format!("tether_balancer_node_up{{node=\"{}\"}}", NAMES[leaving]);
    assert_eq!(lb.metric(&up).await, 1.0);

    // Reconnecting, the clients go to their next-ranked node, which is up.
    for id in &ids {
        let (_ws, hello) = ws_for(lb.addr, id).await;
        assert_eq!(hello.server, NAMES[tether_proto::hrw::rank(&NAMES, id)[1]]);
    }
    assert_eq!(lb.node_state(NAMES[leaving]).await, "unready");
}
