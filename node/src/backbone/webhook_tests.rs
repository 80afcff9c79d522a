//! Webhook decisions across nodes, on the in-memory backbone: a dead node's clients are
//! reported once, by a survivor, unless they came back within the grace.

use crate::backbone::memory::Store;
use crate::backbone::Backbone;
use crate::webhooks::{Decided, Kind};
use std::time::Duration;

fn kinds_of(events: &[Decided]) -> Vec<(Kind, String)> {
    events
        .iter()
        .map(|e| {
            let d: serde_json::Value = serde_json::from_str(&e.data).unwrap();
            let who = d["client"].as_str().or(d["room"].as_str()).unwrap_or("").to_string();
            (e.kind, who)
        })
        .collect()
}

#[tokio::test]
async fn a_dead_nodes_clients_are_reported_once_unless_they_return_within_the_grace() {
    let store = Store::with_webhooks(Duration::from_secs(3), Duration::from_secs(5));
    let a = store.add_node("a");
    let b = store.add_node("b");
    a.backbone.heartbeat().await.unwrap();
    b.backbone.heartbeat().await.unwrap();
    a.join(1, "x", "r").await;
    a.join(2, "z", "r").await;
    b.join(1, "y", "r").await;
    assert_eq!(
        kinds_of(&a.backbone.take_decided()),
        [
            (Kind::ClientOnline, "x".into()),
            (Kind::RoomOccupied, "r".into()),
            (Kind::MemberJoined, "x".into()),
            (Kind::ClientOnline, "z".into()),
            (Kind::MemberJoined, "z".into()),
        ]
    );
    assert_eq!(
        kinds_of(&b.backbone.take_decided()),
        [(Kind::ClientOnline, "y".into()), (Kind::MemberJoined, "y".into())]
    );

    // `a` dies; `b` keeps beating and reaps it.
    store.advance(Duration::from_secs(4));
    b.backbone.heartbeat().await.unwrap();
    b.backbone.reap().await.unwrap();
    assert!(b.backbone.take_decided().is_empty(), "graced: nothing yet");
    // x comes back on b within the grace: its pending offline and left are cancelled.
    store.advance(Duration::from_secs(1));
    b.join(2, "x", "r").await;
    assert!(b.backbone.take_decided().is_empty(), "a return within the grace says nothing");
    // After the grace, z (gone for good) is reported once, whoever claims.
    store.advance(Duration::from_secs(5));
    b.backbone.claim_webhooks().await.unwrap();
    a.backbone.claim_webhooks().await.unwrap();
    assert!(a.backbone.take_decided().is_empty(), "claimed once");
    let fired = b.backbone.take_decided();
    assert_eq!(kinds_of(&fired), [(Kind::MemberLeft, "z".into()), (Kind::ClientOffline, "z".into())]);
    assert!(fired.iter().all(|e| e.data.contains("node_down")), "{fired:?}");
}
