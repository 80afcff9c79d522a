//! The client state machine driven without sockets: inputs go in through [`Client`]'s
//! methods, and what it says comes back out of an outbox with no socket behind it.

use super::{Client, Close, Now};
use crate::backbone::inbound::HubInbound;
use crate::backbone::local::LocalBackbone;
use crate::backbone::memory::{MemoryBackbone, Store};
use crate::backbone::{Backbone, BackboneError, SessionRecord};
use crate::config::{BackboneKind, FileConfig};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::outbox::{frame_payload, Outbox};
use crate::state::NodeState;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tether_proto::wire::{ClientMsg, ResumePoint, CLOSE_POLICY, CLOSE_RESTART, CLOSE_TOO_BIG};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A node named `n1` over the `none` backbone (or, `shared`, over the in-memory shared
/// backbone, which adds what `none` lacks: stored sessions and a log per room to replay),
/// configured by `file` otherwise.
fn node_with(file: FileConfig, shared: bool) -> (Arc<NodeState>, Option<Arc<MemoryBackbone>>) {
    let file = FileConfig { name: Some("n1".into()), backbone: Some(BackboneKind::None), ..file };
    let cfg = Arc::new(file.validate().expect("a valid test config"));
    let hub = Arc::new(Hub::new(cfg.send_queue_len));
    let metrics = Metrics::new();
    let (backbone, memory): (Arc<dyn Backbone>, _) = if shared {
        let node = Store::new(Duration::from_secs(30)).add_node_on("n1", Arc::clone(&hub), metrics.clone());
        (Arc::clone(&node.backbone) as Arc<dyn Backbone>, Some(node.backbone))
    } else {
        let inbound = Arc::new(HubInbound::new(Arc::clone(&hub), metrics.clone()));
        (Arc::new(LocalBackbone::new(inbound, metrics.clone(), Duration::from_secs(300), None)), None)
    };
    (Arc::new(NodeState::new(cfg, hub, backbone, metrics)), memory)
}

fn node() -> Arc<NodeState> {
    node_with(FileConfig::default(), false).0
}

/// A client whose outbox has no socket: its frames wait there for [`said`].
fn client(state: &Arc<NodeState>, id: &str, now: Instant) -> Client {
    let out = Outbox::new(None, Arc::clone(&state.limits));
    Client::new(id.into(), state.hub.next_conn_id(), out, Arc::clone(state), now)
}

/// A connected client that has read and dropped its `connected`.
async fn connected(state: &Arc<NodeState>, id: &str, now: Instant) -> Client {
    let mut c = client(state, id, now);
    c.begin(Ok(None), now).await;
    assert_eq!(types(&said(&c)), ["connected"]);
    c
}

/// Everything the client was sent since last asked, oldest first.
fn said(c: &Client) -> Vec<Value> {
    c.outbox().take_all().iter().map(|f| serde_json::from_slice(frame_payload(f)).expect("JSON frames")).collect()
}

fn types(frames: &[Value]) -> Vec<&str> {
    frames.iter().map(|f| f["type"].as_str().unwrap_or("?")).collect()
}

fn at(at: Instant) -> Now {
    Now { at, unix_ms: 1_700_000_000_000 }
}

/// The client sends `texts`, as one batch read at `now`.
async fn send(c: &mut Client, now: Instant, texts: &[&str]) {
    let mut frames = texts.iter().map(|t| Utf8Bytes::from(t.to_string()));
    let first = frames.next().expect("at least one frame");
    c.handle(first, frames.collect(), at(now)).await;
}

fn join(room: &str) -> String {
    ClientMsg::Join { room: room.into() }.to_json()
}

fn message(room: &str, text: &str) -> String {
    ClientMsg::text(room, text).to_json()
}

#[tokio::test]
async fn a_new_client_is_told_connected_first_and_a_failed_load_right_after() {
    let state = node();
    let now = Instant::now();
    let mut c = client(&state, "a1", now);
    c.begin(Ok(None), now).await;
    let frames = said(&c);
    assert_eq!(
        frames,
        [json!({"type": "connected", "server": "n1", "id": "a1", "session": "new", "name": null, "rooms": []})]
    );
    assert_eq!(c.grace_deadline(), None, "nothing to resume");

    let mut c = client(&state, "a2", now);
    c.begin(Err(BackboneError::NotConnected), now).await;
    let frames = said(&c);
    assert_eq!(types(&frames), ["connected", "error"]);
    assert_eq!(frames[1]["code"], "backbone_unavailable");
}

#[tokio::test]
async fn join_is_confirmed_through_the_room_and_leave_directly() {
    let state = node();
    let now = Instant::now();
    let mut c = connected(&state, "a", now).await;
    send(&mut c, now, &[&join("r")]).await;
    let mut frames = said(&c);
    // The room's position when the join took effect (the `none` backbone's epoch is random).
    assert!(frames[0]["epoch"].as_str().is_some_and(|e| e.starts_with("local-")), "{frames:?}");
    frames[0].as_object_mut().unwrap().remove("epoch");
    let joined = json!({"type": "user_joined", "room": "r", "user": "a", "id": "a", "server": "n1", "head_seq": 0});
    assert_eq!(frames, [joined]);
    assert!(state.hub.has_members("r"));
    // A second join of the same room is confirmed to this client alone, and changes nothing.
    send(&mut c, now, &[&join("r")]).await;
    assert_eq!(types(&said(&c)), ["user_joined"]);

    send(&mut c, now, &[&json!({"type": "leave", "room": "r"}).to_string()]).await;
    let frames = said(&c);
    assert_eq!(types(&frames), ["user_left"]);
    assert_eq!(frames[0]["reason"], "left");
    assert!(!state.hub.has_members("r"));
}

#[tokio::test]
async fn leaving_sending_to_or_resuming_a_room_not_joined_is_not_in_room() {
    let state = node();
    let now = Instant::now();
    let mut c = connected(&state, "a", now).await;
    let texts = [
        ClientMsg::Leave { room: "x".into() }.to_json(),
        message("x", "hi"),
        ClientMsg::Resume { rooms: vec![("x".into(), ResumePoint { seq: 3, epoch: None })] }.to_json(),
    ];
    send(&mut c, now, &texts.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let frames = said(&c);
    assert_eq!(types(&frames), ["error", "error", "error"]);
    assert!(frames.iter().all(|f| f["code"] == "not_in_room"), "{frames:?}");
    assert!(state.hub.rooms().is_empty());
}

#[tokio::test]
async fn a_batch_of_messages_reaches_every_member_in_seq_order() {
    let state = node();
    let now = Instant::now();
    let mut a = connected(&state, "a", now).await;
    let mut b = connected(&state, "b", now).await;
    send(&mut a, now, &[&join("r")]).await;
    send(&mut b, now, &[&join("r")]).await;
    said(&a);
    said(&b);
    send(&mut a, now, &[&message("r", "one"), &message("r", "two"), &message("r", "three")]).await;
    for frames in [said(&a), said(&b)] {
        let got: Vec<(u64, &str)> =
            frames.iter().map(|f| (f["seq"].as_u64().unwrap(), f["text"].as_str().unwrap())).collect();
        assert_eq!(got, [(1, "one"), (2, "two"), (3, "three")]);
        assert!(frames.iter().all(|f| f["from"] == "a" && f["timestamp"] == 1_700_000_000_000_u64));
    }
}

#[tokio::test]
async fn frames_past_the_rate_limit_are_answered_rate_limited_and_not_acted_on() {
    let file = FileConfig { rate_limit_per_sec: Some(1), rate_limit_burst: Some(2), ..Default::default() };
    let state = node_with(file, false).0;
    let now = Instant::now();
    let mut c = connected(&state, "a", now).await;
    // The join takes one token, the first message the other; the second message finds none.
    send(&mut c, now, &[&join("r"), &message("r", "one"), &message("r", "two")]).await;
    let frames = said(&c);
    assert_eq!(types(&frames), ["user_joined", "message", "error"]);
    assert_eq!(frames[1]["text"], "one");
    assert_eq!(frames[2]["code"], "rate_limited");
    // A second later one token has come back.
    let later = now + Duration::from_secs(1);
    send(&mut c, later, &[&message("r", "three"), &message("r", "four")]).await;
    let frames = said(&c);
    assert_eq!(types(&frames), ["message", "error"]);
    assert_eq!(frames[0]["text"], "three");
}

#[tokio::test]
async fn bad_frames_are_answered_with_their_code_and_change_nothing() {
    let (state, log) = node_with(FileConfig::default(), true);
    let log = log.unwrap();
    let now = Instant::now();
    let mut c = connected(&state, "a", now).await;
    send(&mut c, now, &[&join("r")]).await;
    said(&c);
    let saved = log.load_session("a").await.unwrap();
    send(
        &mut c,
        now,
        &[
            "not json",
            r#"{"type":"dance"}"#,
            r#"{"type":"join"}"#,
            r#"{"type":"join","room":"a b"}"#,
            r#"{"type":"set_name","name":""}"#,
            r#"{"type":"message","room":"r"}"#,
        ],
    )
    .await;
    c.refuse_binary();
    let frames = said(&c);
    let codes: Vec<&str> = frames.iter().map(|f| f["code"].as_str().unwrap_or("not an error")).collect();
    assert_eq!(
        codes,
        ["bad_json", "unknown_type", "missing_field", "invalid_room", "invalid_name", "missing_field", "bad_json"]
    );
    assert_eq!(state.hub.rooms(), ["r"]);
    assert_eq!(log.load_session("a").await.unwrap(), saved, "the session is as it was");
    assert!(log.replay("r", 0).await.unwrap().frames.is_empty(), "nothing was published");
}

#[tokio::test]
async fn set_name_is_saved_and_shows_in_messages_and_presence() {
    let (state, log) = node_with(FileConfig::default(), true);
    let log = log.unwrap();
    let now = Instant::now();
    let mut c = connected(&state, "a", now).await;
    let mut other = connected(&state, "b", now).await;
    send(&mut other, now, &[&join("r")]).await;
    let set_name = ClientMsg::SetName { name: "Ann".into() }.to_json();
    send(&mut c, now, &[&join("r"), &set_name, &message("r", "hi")]).await;
    assert_eq!(
        log.load_session("a").await.unwrap(),
        Some(SessionRecord { name: Some("Ann".into()), rooms: vec!["r".into()] })
    );
    let frames = said(&c);
    assert_eq!(types(&frames), ["user_joined", "message"]);
    assert_eq!(frames[1]["from"], "Ann");
    send(&mut c, now, &[&ClientMsg::Presence { room: "r".into() }.to_json(), &ClientMsg::Online.to_json()]).await;
    let frames = said(&c);
    let user = |id: &str, user: &str| json!({"id": id, "user": user, "server": "n1"});
    let mut users = frames[0]["users"].as_array().unwrap().clone();
    users.sort_by_key(|u| u["id"].as_str().unwrap().to_string());
    assert_eq!(frames[0]["type"], "presence");
    assert_eq!(users, [user("a", "Ann"), user("b", "b")]);
    assert_eq!(frames[1]["type"], "online");
    assert_eq!(frames[1]["users"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn a_restored_session_holds_its_rooms_until_resume_replays_then_releases() {
    let (state, log) = node_with(FileConfig::default(), true);
    let log = log.unwrap();
    let now = Instant::now();
    let mut b = connected(&state, "b", now).await;
    send(&mut b, now, &[&join("r"), &message("r", "m1"), &message("r", "m2")]).await;
    let epoch = said(&b).iter().find(|f| f["type"] == "message").expect("b hears its messages")["epoch"].clone();
    let stored = SessionRecord { name: Some("ann".into()), rooms: vec!["r".into(), "not a room".into()] };
    log.save_session("a", &stored).await.unwrap();

    let mut a = client(&state, "a", now);
    a.start(now).await;
    assert_eq!(
        said(&a),
        [json!({"type": "connected", "server": "n1", "id": "a", "session": "restored", "name": "ann", "rooms": ["r"]})],
        "its own user_joined waits behind the resume"
    );
    assert_eq!(a.grace_deadline(), Some(now + state.cfg.resume_grace));
    send(&mut b, now, &[&message("r", "m3")]).await;
    assert!(said(&a).is_empty(), "held while the client has not resumed");

    // The client saw m1: m2 and m3 come from the log, the live m3 is not sent again.
    let point = ResumePoint { seq: 1, epoch: epoch.as_str().map(String::from) };
    send(&mut a, now, &[&ClientMsg::Resume { rooms: vec![("r".into(), point)] }.to_json()]).await;
    let frames = said(&a);
    assert_eq!(types(&frames), ["message", "message", "resumed", "user_joined"]);
    assert_eq!((frames[0]["text"].as_str(), frames[0]["replay"].as_bool()), (Some("m2"), Some(true)));
    assert_eq!((frames[1]["text"].as_str(), frames[1]["seq"].as_u64()), (Some("m3"), Some(3)));
    assert_eq!(
        frames[2],
        json!({"type": "resumed", "room": "r", "from_seq": 2, "to_seq": 3, "epoch": epoch, "complete": true})
    );
    assert_eq!(frames[3]["user"], "ann");
    assert_eq!(a.grace_deadline(), None, "nothing holds any more");
    send(&mut b, now, &[&message("r", "m4")]).await;
    assert_eq!(said(&a).iter().map(|f| f["seq"].clone()).collect::<Vec<_>>(), [json!(4)], "live again");
}

#[tokio::test]
async fn a_resume_across_an_epoch_that_kept_its_log_replays_after_the_point_then_the_new_epoch() {
    let (state, log) = node_with(FileConfig::default(), true);
    let log = log.unwrap();
    let now = Instant::now();
    let mut b = connected(&state, "b", now).await;
    send(&mut b, now, &[&join("r"), &message("r", "m1"), &message("r", "m2"), &message("r", "m3")]).await;
    let old = said(&b).iter().find(|f| f["type"] == "message").expect("b hears its messages")["epoch"].clone();
    log.store().new_epoch_keeping_log("r");
    send(&mut b, now, &[&message("r", "m4")]).await;
    let mut a = connected(&state, "a", now).await;
    send(&mut a, now, &[&join("r")]).await;
    said(&a);
    let point = ResumePoint { seq: 1, epoch: old.as_str().map(String::from) };
    send(&mut a, now, &[&ClientMsg::Resume { rooms: vec![("r".into(), point)] }.to_json()]).await;
    let frames = said(&a);
    let replayed: Vec<(&str, u64)> = frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| (f["text"].as_str().unwrap_or_default(), f["seq"].as_u64().unwrap_or_default()))
        .collect();
    assert_eq!(replayed, [("m2", 2), ("m3", 3), ("m4", 4)], "the old epoch after the point, then the new one");
    assert_ne!(frames[2]["epoch"], old, "m4 is in the new epoch");
    let resumed = frames.iter().find(|f| f["type"] == "resumed").expect("resumed");
    assert_eq!(resumed["complete"], false, "{resumed}");
}

#[tokio::test]
async fn the_grace_passing_releases_rooms_not_resumed_as_they_are() {
    let (state, log) = node_with(FileConfig::default(), true);
    let log = log.unwrap();
    let now = Instant::now();
    let mut b = connected(&state, "b", now).await;
    send(&mut b, now, &[&join("r")]).await;
    log.save_session("a", &SessionRecord { name: None, rooms: vec!["r".into()] }).await.unwrap();
    let mut a = client(&state, "a", now);
    a.start(now).await;
    assert_eq!(types(&said(&a)), ["connected"]);
    send(&mut b, now, &[&message("r", "m1")]).await;
    assert!(said(&a).is_empty());
    a.end_grace();
    let frames = said(&a);
    assert_eq!(types(&frames), ["user_joined", "message"]);
    assert_eq!(frames[1]["seq"], 1);
    assert_eq!(a.grace_deadline(), None);
}

#[tokio::test]
async fn a_slow_consumer_is_kicked_and_closed_with_1008_and_on_shutdown_with_1012() {
    let file = FileConfig { send_queue_len: Some(4), ..Default::default() };
    let state = node_with(file, false).0;
    let now = Instant::now();
    let mut slow = connected(&state, "slow", now).await;
    let mut fast = connected(&state, "fast", now).await;
    send(&mut slow, now, &[&join("r")]).await;
    send(&mut fast, now, &[&join("r")]).await;
    for i in 0..3 {
        send(&mut fast, now, &[&message("r", &i.to_string())]).await;
        said(&fast);
    }
    // `slow` never read: its user_joined, fast's and three messages are over its four frames.
    assert!(slow.kick().is_cancelled());
    assert!(!fast.kick().is_cancelled());
    assert_eq!(slow.kicked(), Close::SLOW_CONSUMER);
    assert_eq!(slow.kicked().code, CLOSE_POLICY);
    assert_eq!(state.metrics.slow_consumers.get(), 1);

    state.shutdown.cancel();
    assert!(fast.kick().is_cancelled(), "a shutdown kicks every connection");
    assert_eq!(fast.kicked().code, CLOSE_RESTART);
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let state = node();
    let c = connected(&state, "a", Instant::now()).await;
    assert_eq!(c.oversized().code, CLOSE_TOO_BIG);
    assert_eq!(state.metrics.oversized_frames.get(), 1);
    assert!(said(&c).is_empty(), "the close frame says it all");
}

#[tokio::test]
async fn disconnect_leaves_every_room_and_the_others_hear_it() {
    let state = node();
    let now = Instant::now();
    let mut a = connected(&state, "a", now).await;
    let mut b = connected(&state, "b", now).await;
    send(&mut a, now, &[&join("r"), &join("s")]).await;
    send(&mut b, now, &[&join("r")]).await;
    said(&b);
    a.disconnect().await;
    let frames = said(&b);
    assert_eq!(types(&frames), ["user_left"]);
    assert_eq!((frames[0]["id"].as_str(), frames[0]["reason"].as_str()), (Some("a"), Some("disconnected")));
    assert_eq!(state.hub.rooms(), ["r"]);
    assert_eq!(state.hub.client_ids().iter().map(|id| id.to_string()).collect::<Vec<_>>(), ["b"]);
    send(&mut b, now, &[&ClientMsg::Online.to_json()]).await;
    assert_eq!(said(&b)[0]["users"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn joining_past_max_rooms_per_client_is_invalid_room() {
    let file = FileConfig { max_rooms_per_client: Some(1), ..Default::default() };
    let state = node_with(file, false).0;
    let now = Instant::now();
    let mut c = connected(&state, "a", now).await;
    send(&mut c, now, &[&join("r"), &join("s")]).await;
    let frames = said(&c);
    assert_eq!(types(&frames), ["user_joined", "error"]);
    assert_eq!(frames[1]["code"], "invalid_room");
    assert_eq!(state.hub.rooms(), ["r"]);
}
