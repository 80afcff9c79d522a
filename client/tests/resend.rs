//! The client's resend queue against a scripted node: every message carries a `msg_id`,
//! stays unconfirmed until its echo or a `duplicate` names it, and is written again — in
//! order, after the re-sync — on the next connection; the queue is bounded.

mod support;

use support::*;
use tether_client::{Error, Event, Outgoing};
use tether_proto::wire::ClientMsg;

/// The `msg_id` and the frame less it, for the next message the client writes.
async fn sent(c: &mut MockConn) -> (String, String) {
    let (frame, id) = c.recv_message().await;
    let ClientMsg::Message { text, .. } = frame else { unreachable!("recv_message returns messages") };
    (text, id)
}

#[tokio::test]
async fn unconfirmed_messages_are_resent_in_order_after_the_resume_with_the_same_msg_id() {
    let mut node = MockNode::start().await;
    let (client, mut events, mut c) = ready_client(&mut node, None).await;
    join(&client, &mut c, "a").await;
    let mut ids = Vec::new();
    for text in ["one", "two", "three", "four"] {
        let id = client.send_message("a", Outgoing::text(text)).await.expect("send");
        assert_eq!(sent(&mut c).await, (text.to_string(), id.clone()));
        ids.push(id);
    }
    assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), 4, "distinct ids: {ids:?}");
    c.send(echo("a", 1, "e", "one", &ids[0], false)).await;
    c.send(barrier()).await;
    until_barrier(&mut events).await;
    assert_eq!(client.unconfirmed(), 3);
    c.drop_abruptly();
    let Event::Disconnected { unconfirmed, .. } = wait_disconnected(&mut events).await else { unreachable!() };
    assert_eq!(unconfirmed, ids[1..], "the loss lists what was in flight, oldest first");

    // The restored connection: nothing is resent before the replay is over. The replay
    // brings "two" back (it was published; only its echo was lost).
    let mut c = node.accept().await;
    c.send(connected("c1", "restored", &["a"])).await;
    assert_eq!(c.expect("resume").await, resume(&[("a", 1, Some("e"))]));
    c.send(echo("a", 2, "e", "two", &ids[1], true)).await;
    c.send(barrier()).await;
    assert_eq!(seqs(&until_barrier(&mut events).await), [("a".into(), 2, true)]);
    // A command now is written after whatever the client wrote so far: no resend yet.
    client.set_name("Zed").await.expect("set_name");
    assert_eq!(c.recv().await, set_name_frame("Zed"), "nothing resent before `resumed`");
    c.send(resumed("a", 2, 2, "e", true)).await;
    assert_eq!(sent(&mut c).await, ("three".to_string(), ids[2].clone()));
    assert_eq!(sent(&mut c).await, ("four".to_string(), ids[3].clone()));
    // "three" had landed after all: the node says so; "four" is published now.
    c.send(duplicate("a", &ids[2], 3, "e")).await;
    c.send(echo("a", 3, "e", "three", &ids[2], false)).await;
    c.send(echo("a", 4, "e", "four", &ids[3], false)).await;
    c.send(barrier()).await;
    let seen = until_barrier(&mut events).await;
    assert!(seen.iter().any(|e| matches!(e, Event::Duplicate { msg_id, seq: 3, .. } if *msg_id == ids[2])));
    assert_eq!(seqs(&seen), [("a".into(), 3, false), ("a".into(), 4, false)]);
    let s = client.stats();
    assert_eq!((s.messages_sent, s.messages_resent), (4, 2));
    assert_eq!((s.confirmed_by_echo, s.confirmed_by_duplicate, s.unconfirmed), (3, 1, 0));
    assert_eq!(client.unconfirmed(), 0);
    // A new send comes after the resends, with a fresh id.
    let id = client.send_message("a", Outgoing::text("five")).await.expect("send");
    assert!(!ids.contains(&id));
    assert_eq!(sent(&mut c).await, ("five".to_string(), id));
}

#[tokio::test]
async fn the_unconfirmed_queue_is_bounded_and_a_send_past_it_fails_clearly() {
    let mut node = MockNode::start().await;
    let mut cfg = config(&node.url);
    cfg.max_unconfirmed = 2;
    let (client, _events, mut c) = ready_client(&mut node, Some(cfg)).await;
    join(&client, &mut c, "a").await;
    let first = client.send_message("a", Outgoing::text("1")).await.expect("send");
    client.send("a", "2").await.expect("send");
    let refused = client.send("a", "3").await;
    assert!(matches!(refused, Err(Error::TooManyUnconfirmed { count: 2, .. })), "{refused:?}");
    assert!(refused.unwrap_err().to_string().contains("await confirmation"));
    sent(&mut c).await;
    sent(&mut c).await;
    c.send(echo("a", 1, "e", "1", &first, false)).await;
    tokio::time::timeout(DEADLINE, async {
        while client.unconfirmed() != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the echo confirms");
    client.send("a", "3").await.expect("room again after a confirmation");
    assert_eq!(sent(&mut c).await.0, "3");
}

#[tokio::test]
async fn data_goes_out_as_written_and_bad_or_oversized_messages_are_refused_locally() {
    let mut node = MockNode::start().await;
    let mut cfg = config(&node.url);
    cfg.max_message_bytes = 200;
    let (client, _events, mut c) = ready_client(&mut node, Some(cfg)).await;
    join(&client, &mut c, "a").await;
    let raw = r#"{"z":1,"a":[1.50,true]}"#;
    client.send_message("a", Outgoing::raw_data(raw).expect("valid JSON")).await.expect("send");
    let (frame, _) = c.recv_message().await;
    let ClientMsg::Message { text, data: Some(data), .. } = frame else { panic!("data expected: {frame:?}") };
    assert_eq!((text.as_str(), data.get()), ("", raw), "key order and number forms kept");
    let value = serde_json::json!({"n": 2});
    client.send_message("a", Outgoing::text("hi").with_data(&value)).await.expect("send");
    let (frame, _) = c.recv_message().await;
    let ClientMsg::Message { text, data: Some(data), .. } = frame else { panic!("data expected: {frame:?}") };
    assert_eq!((text.as_str(), data.get()), ("hi", r#"{"n":2}"#));

    assert!(matches!(Outgoing::raw_data("{nope"), Err(Error::InvalidData(_))));
    let big = client.send("a", &"x".repeat(300)).await;
    assert!(matches!(big, Err(Error::TooLarge { limit: 200, .. })), "{big:?}");
    assert_eq!(client.unconfirmed(), 2, "the refused one was not queued");
}

#[tokio::test]
async fn leaving_a_room_abandons_its_unconfirmed_messages() {
    let mut node = MockNode::start().await;
    let (client, mut events, mut c) = ready_client(&mut node, None).await;
    join(&client, &mut c, "a").await;
    join(&client, &mut c, "b").await;
    client.send("a", "to a").await.expect("send");
    let to_b = client.send_message("b", Outgoing::text("to b")).await.expect("send");
    sent(&mut c).await;
    sent(&mut c).await;
    client.leave("a").await.expect("leave");
    assert_eq!(c.recv().await, leave_frame("a"));
    assert_eq!(client.stats().unconfirmed_abandoned, 1);
    c.drop_abruptly();
    wait_disconnected(&mut events).await;
    let mut c = node.accept().await;
    c.send(connected("c1", "restored", &["b"])).await;
    c.expect("resume").await;
    assert_eq!(sent(&mut c).await, ("to b".to_string(), to_b), "only the room still joined");
}

#[tokio::test]
async fn backbone_unavailable_makes_the_client_resend_what_is_unconfirmed() {
    let mut node = MockNode::start().await;
    let (client, mut events, mut c) = ready_client(&mut node, None).await;
    join(&client, &mut c, "a").await;
    let id = client.send_message("a", Outgoing::text("x")).await.expect("send");
    sent(&mut c).await;
    c.send(error("backbone_unavailable", "redis down")).await;
    // After backoff_min (20 ms in tests) the same message goes out again, same id.
    assert_eq!(sent(&mut c).await, ("x".to_string(), id.clone()));
    c.send(echo("a", 1, "e", "x", &id, false)).await;
    c.send(barrier()).await;
    until_barrier(&mut events).await;
    let s = client.stats();
    assert_eq!((s.messages_resent, s.confirmed_by_echo, s.unconfirmed), (1, 1, 0));
}
