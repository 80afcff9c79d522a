//! The client against a scripted node: resume after reconnects, de-duplication, gaps,
//! epochs, close codes, backoff, id adoption, hostile input and backpressure.

mod support;

use std::time::Duration;
use support::*;
use tether_client::{Client, Error, Event, Session, Status};
use tokio::time::Instant;

#[tokio::test]
async fn restored_session_gets_one_resume_with_every_position_and_no_join() {
    let mut node = MockNode::start().await;
    let (client, mut events, mut c) = ready_client(&mut node, None).await;
    join(&client, &mut c, "a").await;
    join(&client, &mut c, "b").await;
    for f in [msg("a", 1, "e1"), msg("a", 2, "e1"), msg("a", 3, "e1"), msg("b", 7, "e2")] {
        c.send(f).await;
    }
    c.send(barrier()).await;
    let seen = until_barrier(&mut events).await;
    assert_eq!(seqs(&seen).len(), 4);

    c.drop_abruptly();
    assert!(matches!(wait_disconnected(&mut events).await, Event::Disconnected { code: None, will_retry: true, .. }));
    let mut c = node.accept().await;
    assert_eq!(c.client.as_deref(), Some("c1"), "same id after reconnect");
    c.send(connected("c1", "restored", &["a", "b"])).await;
    let resume = c.recv().await;
    assert_eq!(
        resume,
        support::resume(&[("a", 3, Some("e1")), ("b", 7, Some("e2"))]),
        "the first frame after a restore is the one resume"
    );
    c.send(replay("a", 4, "e1")).await;
    c.send(resumed("a", 4, 4, "e1", true)).await;
    c.send(resumed("b", 8, 7, "e2", true)).await;
    c.send(msg("a", 5, "e1")).await;
    c.send(barrier()).await;
    let seen = until_barrier(&mut events).await;
    assert!(matches!(seen[0], Event::Connected { session: Session::Restored, since_disconnect: Some(_), .. }));
    assert_eq!(seqs(&seen), [("a".into(), 4, true), ("a".into(), 5, false)]);
    assert_eq!(seen.iter().filter(|e| matches!(e, Event::Resumed { complete: true, .. })).count(), 2);
    assert_eq!(client.status(), Status::Ready { server: "mock-1".into() });
    let stats = client.stats();
    assert_eq!((stats.connects, stats.reconnects), (2, 1));
    assert_eq!((stats.duplicates_dropped, stats.gaps), (0, 0));
    assert_eq!(stats.messages_delivered, 6);
    assert!(stats.last_reconnect.is_some() && stats.last_recovery.is_some());
    assert_eq!(client.position("a").map(|p| p.seq), Some(5));
}

#[tokio::test]
async fn new_session_rejoins_then_resumes_and_live_frames_wait_for_the_replay() {
    let mut node = MockNode::start().await;
    let mut cfg = config(&node.url);
    cfg.name = Some("Ann".into());
    let (client, mut events) = Client::start(cfg).expect("config");
    let mut c = node.accept().await;
    c.send(connected("c1", "new", &[])).await;
    assert_eq!(c.recv().await, set_name_frame("Ann"));
    join(&client, &mut c, "a").await;
    c.send(msg("a", 1, "e1")).await;
    c.send(msg("a", 2, "e1")).await;
    c.send(barrier()).await;
    until_barrier(&mut events).await;
    c.drop_abruptly();
    wait_disconnected(&mut events).await;

    let mut c = node.accept().await;
    c.send(connected("c1", "new", &[])).await;
    assert_eq!(c.recv().await, set_name_frame("Ann"));
    assert_eq!(c.recv().await, join_frame("a"));
    // Barrier: the app has seen everything up to here, and a command sent now is written
    // after anything the client wrote so far. No resume may come before it.
    c.send(barrier()).await;
    until_barrier(&mut events).await;
    assert_eq!(client.status(), Status::Syncing { server: "mock-1".into() });
    assert!(matches!(client.send("a", "early").await, Err(Error::NotConnected)));
    client.set_name("Bea").await.expect("set_name");
    assert_eq!(c.recv().await, set_name_frame("Bea"));

    c.send(user_joined("a", "c1")).await;
    c.send(msg("a", 5, "e1")).await; // live, ahead of the replay: must be held back
    let resume = c.expect("resume").await;
    assert_eq!(resume, support::resume(&[("a", 2, Some("e1"))]));
    c.send(replay("a", 3, "e1")).await;
    c.send(replay("a", 4, "e1")).await;
    c.send(resumed("a", 3, 4, "e1", true)).await;
    c.send(msg("a", 6, "e1")).await;
    c.send(barrier()).await;
    let seen = until_barrier(&mut events).await;
    assert_eq!(
        seqs(&seen),
        [("a".into(), 3, true), ("a".into(), 4, true), ("a".into(), 5, false), ("a".into(), 6, false)]
    );
    let resumed_at = seen.iter().position(|e| matches!(e, Event::Resumed { .. })).expect("resumed reported");
    let live_at = seen.iter().position(|e| matches!(e, Event::Message(m) if m.seq == 5)).expect("5 delivered");
    assert!(resumed_at < live_at, "held live frame follows the replay");
    assert_eq!(client.stats().gaps, 0);
    client.send("a", "now").await.expect("ready again");
    assert_eq!(c.recv_message().await.0, message_frame("a", "now"));
}

#[tokio::test]
async fn duplicates_are_dropped_and_counted() {
    let mut node = MockNode::start().await;
    let (client, mut events, mut c) = ready_client(&mut node, None).await;
    join(&client, &mut c, "a").await;
    for f in
        [msg("a", 1, "e"), msg("a", 2, "e"), msg("a", 2, "e"), msg("a", 1, "e"), replay("a", 2, "e"), msg("a", 3, "e")]
    {
        c.send(f).await;
    }
    c.send(barrier()).await;
    let seen = until_barrier(&mut events).await;
    assert_eq!(seqs(&seen), [("a".into(), 1, false), ("a".into(), 2, false), ("a".into(), 3, false)]);
    let stats = client.stats();
    assert_eq!(stats.duplicates_dropped, 3);
    assert_eq!(stats.messages_delivered, 3);
    assert_eq!(stats.gaps, 0);
}

#[tokio::test]
async fn gap_in_live_messages_is_reported_but_not_in_a_replay() {
    let mut node = MockNode::start().await;
    let (client, mut events, mut c) = ready_client(&mut node, None).await;
    join(&client, &mut c, "a").await;
    for f in [msg("a", 1, "e"), msg("a", 2, "e"), msg("a", 5, "e"), replay("a", 9, "e")] {
        c.send(f).await;
    }
    c.send(barrier()).await;
    let seen = until_barrier(&mut events).await;
    let gaps: Vec<_> = seen.iter().filter(|e| matches!(e, Event::Gap { .. })).collect();
    assert_eq!(gaps, [&Event::Gap { room: "a".into(), expected: 3, got: 5 }]);
    assert_eq!(seqs(&seen).len(), 4, "a gap never holds a message back");
    let stats = client.stats();
    assert_eq!((stats.gaps, stats.gap_messages), (1, 2));
}

#[tokio::test]
async fn epoch_change_is_reported_and_the_old_epoch_is_stale() {
    let mut node = MockNode::start().await;
    let (client, mut events, mut c) = ready_client(&mut node, None).await;
    join(&client, &mut c, "a").await;
    for f in [msg("a", 1, "e1"), msg("a", 2, "e1"), msg("a", 1, "e2"), msg("a", 3, "e1"), msg("a", 2, "e2")] {
        c.send(f).await;
    }
    c.send(barrier()).await;
    let seen = until_barrier(&mut events).await;
    assert!(seen.contains(&Event::EpochChanged { room: "a".into(), old: "e1".into(), new: "e2".into() }));
    assert_eq!(
        seqs(&seen),
        [("a".into(), 1, false), ("a".into(), 2, false), ("a".into(), 1, false), ("a".into(), 2, false)]
    );
    let stats = client.stats();
    assert_eq!((stats.epoch_changes, stats.stale_epoch_dropped), (1, 1));
    assert_eq!((stats.gaps, stats.duplicates_dropped), (0, 0));
    assert_eq!(client.position("a").map(|p| p.epoch), Some("e2".into()));
}

#[tokio::test(start_paused = true)]
async fn close_1012_reconnects_at_once_but_a_flapping_drop_backs_off() {
    let mut node = MockNode::start().await;
    let mut cfg = config(&node.url);
    cfg.backoff_min = Duration::from_secs(10);
    cfg.backoff_max = Duration::from_secs(60);
    let (client, mut events, c) = ready_client(&mut node, Some(cfg)).await;
    // Stable for longer than backoff_min, then drained.
    tokio::time::advance(Duration::from_secs(30)).await;

    let t0 = Instant::now();
    c.close(1012, "node shutting down").await;
    let mut c = node.accept().await;
    assert!(t0.elapsed() < Duration::from_secs(1), "1012 → no backoff");
    let ev = wait_disconnected(&mut events).await;
    assert!(matches!(ev, Event::Disconnected { code: Some(1012), will_retry: true, .. }), "{ev:?}");
    c.send(connected("c1", "new", &[])).await;
    tokio::time::timeout(DEADLINE, client.wait_ready()).await.expect("ready in time").expect("ready");

    // Dropped right after getting in sync: a failed attempt, so it waits backoff_min.
    let t1 = Instant::now();
    c.drop_abruptly();
    let c = node.accept().await;
    assert!(t1.elapsed() >= Duration::from_secs(10), "flapping → backoff");

    // A node that accepts and dies before `connected`: the next delay doubles.
    let t2 = Instant::now();
    c.drop_abruptly();
    let mut c = node.accept().await;
    assert!(t2.elapsed() >= Duration::from_secs(20), "second failure → 2 × backoff_min");
    c.send(connected("c1", "new", &[])).await;
    client.wait_ready().await.expect("ready");
    tokio::time::advance(Duration::from_secs(30)).await;

    // Stable, then killed without a close frame: the first attempt is immediate.
    let t3 = Instant::now();
    c.drop_abruptly();
    let _c = node.accept().await;
    assert!(t3.elapsed() < Duration::from_secs(1), "loss after a stable connection → at once");
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_to_the_cap_and_gives_up_after_max_attempts() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut cfg = config(&format!("ws://127.0.0.1:{port}/ws"));
    cfg.backoff_min = Duration::from_millis(100);
    cfg.backoff_max = Duration::from_millis(400);
    cfg.max_attempts = Some(5);
    let (client, mut events) = Client::start(cfg).expect("config");
    let mut failed = Vec::new();
    let mut last = Instant::now();
    loop {
        match next_event(&mut events).await {
            Event::ConnectFailed { attempt, retry_in, .. } => {
                let now = Instant::now();
                failed.push((attempt, retry_in, now.duration_since(last)));
                last = now;
            }
            Event::Closed => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let ms = Duration::from_millis;
    let attempts: Vec<_> = failed.iter().map(|(a, r, _)| (*a, *r)).collect();
    assert_eq!(attempts, [(1, Some(ms(100))), (2, Some(ms(200))), (3, Some(ms(400))), (4, Some(ms(400))), (5, None)]);
    // Each attempt really waited the announced delay (virtual clock).
    for pair in failed.windows(2) {
        assert!(pair[1].2 >= pair[0].1.unwrap_or_default(), "{pair:?}");
    }
    assert_eq!(client.stats().connect_failures, 5);
    assert_eq!(client.status(), Status::Closed);
    assert_eq!(client.wait_ready().await, Err(Error::Closed));
    assert_eq!(client.send("a", "x").await, Err(Error::Closed));
}

#[tokio::test]
async fn server_minted_id_is_adopted_and_reused() {
    let mut node = MockNode::start().await;
    let mut cfg = config(&node.url);
    cfg.client_id = None;
    let (client, mut events) = Client::start(cfg).expect("config");
    let mut c = node.accept().await;
    assert_eq!(c.client, None, "no id to send yet");
    assert_eq!(c.uri, "/ws");
    c.send(connected("minted-42", "new", &[])).await;
    let ev = next_event(&mut events).await;
    assert!(matches!(ev, Event::Connected { ref id, .. } if id == "minted-42"), "{ev:?}");
    assert_eq!(client.id().as_deref(), Some("minted-42"));
    // Own user_joined is recognised by the adopted id.
    let node_side = async {
        c.expect("join").await;
        c.send(user_joined("a", "minted-42")).await;
    };
    let (joined, ()) = tokio::join!(client.join("a"), node_side);
    joined.expect("join");
    c.drop_abruptly();
    let c = node.accept().await;
    assert_eq!(c.client.as_deref(), Some("minted-42"));
    assert_eq!(c.uri, "/ws?client=minted-42");
}

#[tokio::test]
async fn bad_frames_from_the_server_do_not_kill_the_client() {
    let mut node = MockNode::start().await;
    let (client, mut events, mut c) = ready_client(&mut node, None).await;
    join(&client, &mut c, "a").await;
    c.send_raw("{nope").await;
    c.send_raw("[1,2,3]").await;
    c.send_binary(&[0xff, 0x00]).await;
    // Raw on purpose: an unknown type and two known ones whose fields do not fit.
    c.send_raw(r#"{"type":"dance","steps":3}"#).await;
    c.send_raw(r#"{"type":"message","room":"a","seq":"seven"}"#).await;
    c.send_raw(r#"{"type":"resumed","room":7}"#).await;
    c.send(msg("a", 1, "e")).await;
    c.send(barrier()).await;
    let seen = until_barrier(&mut events).await;
    assert!(!seen.iter().any(|e| matches!(e, Event::Disconnected { .. })));
    let unknown = seen.iter().filter(|e| matches!(e, Event::Unknown(_))).count();
    assert_eq!(unknown, 3, "unknown and malformed frames are handed over: {seen:?}");
    assert_eq!(seqs(&seen), [("a".into(), 1, false)]);
    let stats = client.stats();
    assert_eq!((stats.invalid_frames, stats.unknown_frames, stats.malformed_frames), (3, 1, 2));
    client.send("a", "still here").await.expect("send");
    assert_eq!(c.recv_message().await.0, message_frame("a", "still here"));
}

#[tokio::test]
async fn left_rooms_are_not_resumed_and_unwanted_restored_rooms_are_left() {
    let mut node = MockNode::start().await;
    let (client, mut events, mut c) = ready_client(&mut node, None).await;
    join(&client, &mut c, "a").await;
    join(&client, &mut c, "b").await;
    join(&client, &mut c, "c").await;
    c.send(msg("a", 1, "e")).await;
    c.send(msg("b", 1, "e")).await;
    c.send(msg("c", 1, "e")).await;
    c.send(barrier()).await;
    until_barrier(&mut events).await;
    client.leave("b").await.expect("leave");
    assert_eq!(c.recv().await, leave_frame("b"));
    c.drop_abruptly();
    wait_disconnected(&mut events).await;
    // Left while disconnected: nothing to send now, but the restored session still has it.
    client.leave("c").await.expect("leave offline");
    assert_eq!(client.rooms().keys().collect::<Vec<_>>(), ["a"]);

    let mut c = node.accept().await;
    c.send(connected("c1", "restored", &["a", "c"])).await;
    assert_eq!(c.recv().await, leave_frame("c"));
    let resume = c.expect("resume").await;
    assert_eq!(resume, support::resume(&[("a", 1, Some("e"))]));
    c.send(resumed("a", 2, 1, "e", true)).await;
    c.send(msg("c", 2, "e")).await; // in flight before the node processed the leave
    c.send(barrier()).await;
    let seen = until_barrier(&mut events).await;
    assert!(seqs(&seen).is_empty());
    assert_eq!(client.stats().stray_messages, 1);
    tokio::time::timeout(DEADLINE, client.wait_ready()).await.expect("ready in time").expect("ready");
}

#[tokio::test]
async fn send_while_disconnected_is_refused_not_buffered() {
    let mut node = MockNode::start().await;
    let (client, mut events, mut c) = ready_client(&mut node, None).await;
    assert_eq!(client.send("a", "x").await, Err(Error::NotJoined("a".into())));
    join(&client, &mut c, "a").await;
    c.drop_abruptly();
    wait_disconnected(&mut events).await;
    assert_eq!(client.send("a", "lost?").await, Err(Error::NotConnected));
    assert_eq!(client.online().await, Err(Error::NotConnected));
    let mut c = node.accept().await;
    c.send(connected("c1", "restored", &["a"])).await;
    // No position in "a" yet: nothing to resume, but a restored node waits for one.
    assert_eq!(c.expect("resume").await, support::resume(&[]));
    client.wait_ready().await.expect("ready");
    client.send("a", "after").await.expect("send");
    assert_eq!(c.recv_message().await.0, message_frame("a", "after"), "the refused send was not buffered");
}

#[tokio::test]
async fn join_fails_with_the_nodes_error() {
    let mut node = MockNode::start().await;
    let (client, _events, mut c) = ready_client(&mut node, None).await;
    let node_side = async {
        c.expect("join").await;
        c.send(error("backbone_unavailable", "redis down")).await;
    };
    let (joined, ()) = tokio::join!(client.join("x"), node_side);
    assert_eq!(joined, Err(Error::Server { code: "backbone_unavailable".into(), message: "redis down".into() }));
    assert!(client.rooms().is_empty());
    assert!(matches!(client.join("bad room").await, Err(Error::InvalidRoom { .. })));
}

#[tokio::test]
async fn a_slow_reader_loses_nothing_and_commands_still_work() {
    let mut node = MockNode::start().await;
    let mut cfg = config(&node.url);
    cfg.event_buffer = 4;
    let (client, mut events) = Client::start(cfg).expect("config");
    let mut c = node.accept().await;
    c.send(connected("c1", "new", &[])).await;
    let node_side = async {
        c.expect("join").await;
        c.send(user_joined("a", "c1")).await;
    };
    // Read concurrently while joining (the join needs its user_joined read).
    let (joined, ()) = tokio::join!(client.join("a"), node_side);
    joined.expect("join");
    for seq in 1..=300 {
        c.send(msg("a", seq, "e")).await;
    }
    c.send(barrier()).await;
    // Nobody reads events now; the client must still take commands.
    client.send("a", "while blocked").await.expect("send");
    assert_eq!(c.recv_message().await.0, message_frame("a", "while blocked"));
    let seen = until_barrier(&mut events).await;
    let got: Vec<u64> = seqs(&seen).into_iter().map(|(_, s, _)| s).collect();
    assert_eq!(got, (1..=300).collect::<Vec<_>>());
    assert_eq!(client.stats().events_discarded, 0);
}

#[tokio::test(start_paused = true)]
async fn a_silent_node_is_detected_by_ping_timeout() {
    let mut node = MockNode::start().await;
    let mut cfg = config(&node.url);
    cfg.ping_interval = Some(Duration::from_secs(5));
    let (_client, mut events) = Client::start(cfg).expect("config");
    let mut c = node.accept().await;
    c.send(connected("c1", "new", &[])).await;
    let _silent = c.go_silent();
    let ev = wait_disconnected(&mut events).await;
    let Event::Disconnected { reason, will_retry, .. } = ev else { unreachable!() };
    assert!(reason.contains("nothing from the node"), "{reason}");
    assert!(will_retry);
    let _again = node.accept().await;
}

#[tokio::test]
async fn close_says_goodbye_and_ends_the_stream() {
    let mut node = MockNode::start().await;
    let (client, mut events, c) = ready_client(&mut node, None).await;
    let (closed, code) = tokio::join!(client.close(), c.expect_close());
    closed.expect("close");
    assert_eq!(code, Some(1000));
    let rest = events_until(&mut events, |e| matches!(e, Event::Closed)).await;
    assert!(!rest.iter().any(|e| matches!(e, Event::Disconnected { .. })));
    assert!(events.recv().await.is_none(), "Closed is the last event");
    assert_eq!(client.join("a").await, Err(Error::Closed));
}

/// Joins `room` through the mock, whose `user_joined` reports the room's head at the join.
async fn join_at(client: &Client, conn: &mut MockConn, room: &str, head_seq: u64, epoch: Option<&str>) {
    let node_side = async {
        assert_eq!(conn.recv().await, join_frame(room));
        conn.send(user_joined_at(room, "c1", head_seq, epoch)).await;
    };
    let (joined, ()) = tokio::join!(client.join(room), node_side);
    joined.expect("join");
}

#[tokio::test]
async fn a_room_joined_but_never_talked_in_is_resumed_from_its_join() {
    let mut node = MockNode::start().await;
    let (client, mut events, mut c) = ready_client(&mut node, None).await;
    // "a" had messages before we joined; "b" had none (no epoch yet).
    join_at(&client, &mut c, "a", 5, Some("e1")).await;
    join_at(&client, &mut c, "b", 0, None).await;
    c.send(barrier()).await;
    let seen = until_barrier(&mut events).await;
    assert!(
        seen.iter().any(|e| matches!(e, Event::UserJoined { room, head_seq: Some(5), epoch: Some(ep), .. }
            if room == "a" && ep == "e1")),
        "the position at the join is handed to the app: {seen:?}"
    );
    assert_eq!(client.position("a").map(|p| (p.epoch, p.seq)), Some(("e1".into(), 5)));
    assert_eq!(client.position("b"), None, "no epoch yet: no position to show");

    c.drop_abruptly();
    wait_disconnected(&mut events).await;
    let mut c = node.accept().await;
    c.send(connected("c1", "restored", &["a", "b"])).await;
    let resume = c.expect("resume").await;
    assert_eq!(
        resume,
        support::resume(&[("a", 5, Some("e1")), ("b", 0, None)]),
        "both rooms are resumed although no message was ever delivered in them"
    );
    for f in [replay("a", 6, "e1"), replay("a", 7, "e1"), resumed("a", 6, 7, "e1", true)] {
        c.send(f).await;
    }
    for f in [replay("b", 1, "e9"), replay("b", 2, "e9"), resumed("b", 1, 2, "e9", true)] {
        c.send(f).await;
    }
    // The node's own user_joined for a restored room comes after the resume, with the
    // head of now: it must not move the position back or forward.
    c.send(user_joined_at("a", "c1", 7, Some("e1"))).await;
    c.send(user_joined_at("b", "c1", 2, Some("e9"))).await;
    c.send(msg("a", 8, "e1")).await;
    c.send(msg("b", 3, "e9")).await;
    c.send(barrier()).await;
    let seen = until_barrier(&mut events).await;
    assert_eq!(
        seqs(&seen),
        [
            ("a".into(), 6, true),
            ("a".into(), 7, true),
            ("b".into(), 1, true),
            ("b".into(), 2, true),
            ("a".into(), 8, false),
            ("b".into(), 3, false)
        ]
    );
    let ready_at = seen.iter().position(|e| matches!(e, Event::Ready { since_disconnect: Some(_), .. }));
    let live_at = seen.iter().position(|e| matches!(e, Event::Message(m) if !m.replay));
    assert!(ready_at.is_some() && ready_at < live_at, "Ready follows the replays: {seen:?}");
    let stats = client.stats();
    assert_eq!((stats.gaps, stats.duplicates_dropped, stats.epoch_changes), (0, 0, 0));
}

#[tokio::test]
async fn a_live_gap_right_after_the_join_is_reported() {
    let mut node = MockNode::start().await;
    let (client, mut events, mut c) = ready_client(&mut node, None).await;
    join_at(&client, &mut c, "a", 5, Some("e1")).await;
    join_at(&client, &mut c, "b", 0, None).await;
    c.send(msg("a", 7, "e1")).await; // 6 never came
    c.send(msg("b", 2, "e2")).await; // the room's first epoch: 1 never came
    c.send(barrier()).await;
    let seen = until_barrier(&mut events).await;
    let gaps: Vec<_> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Gap { room, expected, got } => Some((room.as_str(), *expected, *got)),
            _ => None,
        })
        .collect();
    assert_eq!(gaps, [("a", 6, 7), ("b", 1, 2)]);
    assert_eq!(client.stats().gap_messages, 2);
}

/// A server that answers every upgrade with `status`, counting the attempts.
async fn refusing_server(status: &'static str) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let body = "id not allowed";
            let resp =
                format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    (format!("ws://{addr}/ws"), count)
}

#[tokio::test]
async fn an_upgrade_refused_with_400_401_or_403_is_not_retried() {
    use std::sync::atomic::Ordering;
    for status in ["400 Bad Request", "401 Unauthorized", "403 Forbidden"] {
        let (url, attempts) = refusing_server(status).await;
        let (client, mut events) = Client::start(config(&url)).expect("config");
        let seen = events_until(&mut events, |e| matches!(e, Event::Closed)).await;
        let code = &status[..3];
        assert!(
            matches!(&seen[0], Event::Error { code: c, message } if c == tether_client::UPGRADE_REFUSED
                && message.contains(code) && message.contains("id not allowed")),
            "{status}: {seen:?}"
        );
        assert!(matches!(seen[1], Event::ConnectFailed { attempt: 1, retry_in: None, .. }), "{seen:?}");
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(attempts.load(Ordering::SeqCst), 1, "{status}: one attempt only");
        assert_eq!(client.status(), Status::Closed);
        assert_eq!(client.wait_ready().await, Err(Error::Closed));
    }
}

#[tokio::test]
async fn an_upgrade_answered_503_is_retried() {
    use std::sync::atomic::Ordering;
    let (url, attempts) = refusing_server("503 Service Unavailable").await;
    let (client, mut events) = Client::start(config(&url)).expect("config");
    let seen = events_until(&mut events, |e| matches!(e, Event::ConnectFailed { attempt: 3, .. })).await;
    assert!(seen.iter().all(|e| matches!(e, Event::ConnectFailed { retry_in: Some(_), .. })), "{seen:?}");
    assert!(attempts.load(Ordering::SeqCst) >= 3);
    client.close().await.expect("close");
}
