//! Golden tests: the exact bytes of every frame, both ways, as the code produced them before
//! the wire had one home (node frames by `Event`/`MessageHead`, appended positions by the
//! backbones). A change here is a change of the protocol, not a refactor.

use super::*;
use serde_json::Value;

fn msg(replay: bool) -> RoomMessage {
    RoomMessage {
        room: "general".into(),
        from: "Alice".into(),
        id: "alice".into(),
        text: "hi \"you\"\n".into(),
        server: "node-1".into(),
        timestamp: 1_700_000_000_000,
        data: None,
        msg_id: None,
        seq: 42,
        epoch: "e1".into(),
        replay,
    }
}

const MESSAGE: &str = r#"{"type":"message","room":"general","from":"Alice","id":"alice","text":"hi \"you\"\n","server":"node-1","timestamp":1700000000000,"seq":42,"epoch":"e1"}"#;
const REPLAYED: &str = r#"{"type":"message","room":"general","from":"Alice","id":"alice","text":"hi \"you\"\n","server":"node-1","timestamp":1700000000000,"seq":42,"epoch":"e1","replay":true}"#;

/// Client frames: each encodes to its golden text and decodes back to itself.
#[test]
fn client_frames_encode_to_their_golden_bytes_and_back() {
    let resume = ClientMsg::Resume {
        rooms: vec![
            ("a".into(), ResumePoint { seq: 41, epoch: None }),
            ("b".into(), ResumePoint { seq: 3, epoch: Some("e1".into()) }),
        ],
    };
    let cases = [
        (ClientMsg::SetName { name: "Alice".into() }, r#"{"type":"set_name","name":"Alice"}"#),
        (ClientMsg::Join { room: "general".into() }, r#"{"type":"join","room":"general"}"#),
        (ClientMsg::Leave { room: "general".into() }, r#"{"type":"leave","room":"general"}"#),
        (ClientMsg::text("general", "hi \"x\""), r#"{"type":"message","room":"general","text":"hi \"x\""}"#),
        (
            ClientMsg::Message {
                room: "general".into(),
                text: "hi".into(),
                data: Some(RawJson::parse(r#"{"b":1,"a":[1.50,"x"]}"#).unwrap()),
                msg_id: Some("m-1".into()),
            },
            r#"{"type":"message","room":"general","text":"hi","data":{"b":1,"a":[1.50,"x"]},"msg_id":"m-1"}"#,
        ),
        (
            ClientMsg::Message {
                room: "general".into(),
                text: String::new(),
                data: Some(RawJson::parse("null").unwrap()),
                msg_id: None,
            },
            r#"{"type":"message","room":"general","data":null}"#,
        ),
        (resume, r#"{"type":"resume","rooms":{"a":{"seq":41},"b":{"seq":3,"epoch":"e1"}}}"#),
        (ClientMsg::Presence { room: "general".into() }, r#"{"type":"presence","room":"general"}"#),
        (ClientMsg::Online, r#"{"type":"online"}"#),
        (ClientMsg::Refresh { token: "h.p.s".into() }, r#"{"type":"refresh","token":"h.p.s"}"#),
    ];
    for (msg, golden) in cases {
        assert_eq!(msg.to_json(), golden);
        assert_eq!(decode(golden), Ok(msg), "{golden}");
    }
}

#[test]
fn the_bare_seq_resume_form_still_decodes() {
    let Ok(ClientMsg::Resume { rooms }) = decode(r#"{"type":"resume","rooms":{"a":41,"b":{"seq":3,"epoch":"e1"}}}"#)
    else {
        panic!("resume did not decode");
    };
    assert!(rooms.contains(&("a".into(), ResumePoint { seq: 41, epoch: None })));
    assert!(rooms.contains(&("b".into(), ResumePoint { seq: 3, epoch: Some("e1".into()) })));
}

#[test]
fn extra_fields_are_ignored() {
    assert_eq!(
        decode(r#"{"type":"message","room":"general","text":"hi","extra":1}"#),
        Ok(ClientMsg::text("general", "hi"))
    );
    assert_eq!(decode(r#"{"room":"g","type":"join"}"#), Ok(ClientMsg::Join { room: "g".into() }));
}

/// The decoder's answers to bad input: code and message, as the node sends them back.
#[test]
fn the_decoder_names_the_fault() {
    let long_room = format!(r#"{{"type":"join","room":"{}"}}"#, "r".repeat(129));
    let long_name = format!(r#"{{"type":"set_name","name":"{}"}}"#, "n".repeat(65));
    let cases: &[(&str, ErrorCode, &str)] = &[
        ("[1,2]", ErrorCode::BadJson, "a frame must be a JSON object"),
        (r#"{"room":"x"}"#, ErrorCode::MissingField, "field `type` is required"),
        (r#"{"type":7}"#, ErrorCode::InvalidField, "field `type` must be a string"),
        (r#"{"type":"dance"}"#, ErrorCode::UnknownType, r#"unknown message type "dance""#),
        (r#"{"type":"join"}"#, ErrorCode::MissingField, "`join` needs field `room`"),
        (r#"{"type":"join","room":null}"#, ErrorCode::MissingField, "`join` needs field `room`"),
        (r#"{"type":"join","room":5}"#, ErrorCode::InvalidField, "field `room` must be a string"),
        (r#"{"type":"join","room":""}"#, ErrorCode::InvalidRoom, "room names are 1–128 bytes; got 0"),
        (&long_room, ErrorCode::InvalidRoom, "room names are 1–128 bytes; got 129"),
        (
            r#"{"type":"join","room":"a b"}"#,
            ErrorCode::InvalidRoom,
            "room names may not contain whitespace or control characters",
        ),
        (
            r#"{"type":"leave","room":"a b"}"#,
            ErrorCode::InvalidRoom,
            "room names may not contain whitespace or control characters",
        ),
        (r#"{"type":"presence"}"#, ErrorCode::MissingField, "`presence` needs field `room`"),
        (r#"{"type":"message","room":"g"}"#, ErrorCode::MissingField, "`message` needs field `text`"),
        (r#"{"type":"message","room":"g","text":1}"#, ErrorCode::InvalidField, "field `text` must be a string"),
        (r#"{"type":"set_name","name":""}"#, ErrorCode::InvalidName, "display names are 1–64 characters; got 0"),
        (&long_name, ErrorCode::InvalidName, "display names are 1–64 characters; got 65"),
        (
            r#"{"type":"set_name","name":"a\u0007"}"#,
            ErrorCode::InvalidName,
            "display names may not contain control characters",
        ),
        (r#"{"type":"resume"}"#, ErrorCode::MissingField, "`resume` needs field `rooms`"),
        (r#"{"type":"refresh"}"#, ErrorCode::MissingField, "`refresh` needs field `token`"),
        (r#"{"type":"refresh","token":1}"#, ErrorCode::InvalidField, "field `token` must be a string"),
        (r#"{"type":"resume","rooms":[]}"#, ErrorCode::InvalidField, "field `rooms` must be an object"),
        (
            r#"{"type":"resume","rooms":{"a":-1}}"#,
            ErrorCode::InvalidField,
            r#"rooms.a must be a seq (integer ≥ 0) or {"seq":N,"epoch":"…"}"#,
        ),
        (
            r#"{"type":"resume","rooms":{"a":{"seq":1,"epoch":2}}}"#,
            ErrorCode::InvalidField,
            r#"rooms.a must be a seq (integer ≥ 0) or {"seq":N,"epoch":"…"}"#,
        ),
        (
            r#"{"type":"resume","rooms":{"a b":1}}"#,
            ErrorCode::InvalidRoom,
            "room names may not contain whitespace or control characters",
        ),
    ];
    for (text, code, message) in cases {
        assert_eq!(decode(text), Err(ProtocolError::new(*code, *message)), "{text}");
    }
    let e = decode("{nope").unwrap_err();
    assert_eq!(e.code, ErrorCode::BadJson);
    assert!(e.message.starts_with("not valid JSON: "), "{e}");
    let e = decode(&format!(r#"{{"type":"{}"}}"#, "x".repeat(50))).unwrap_err();
    assert_eq!(e.message, format!("unknown message type \"{}…\"", "x".repeat(40)));
}

#[test]
fn error_codes_are_spelled_as_documented() {
    let spelled: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        spelled,
        [
            "bad_json",
            "unknown_type",
            "missing_field",
            "invalid_field",
            "invalid_room",
            "invalid_name",
            "not_in_room",
            "rate_limited",
            "backbone_unavailable",
            "too_large",
            "unauthorized",
            "forbidden",
            "not_found",
            "method_not_allowed"
        ]
    );
    for code in ErrorCode::ALL {
        assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{code}\""));
        assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
    }
    assert_eq!(ErrorCode::parse("no_such_code"), None);
    assert_eq!((CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_RESTART, CLOSE_TOKEN_EXPIRED), (1008, 1009, 1012, 4001));
}

/// Node frames as the node builds them ([`Event`]), each decoded to the owned form whose
/// encoding gives the same bytes back.
#[test]
fn node_events_have_their_golden_bytes_and_round_trip() {
    let alice = [PresenceEntry { id: "alice", user: "Alice", server: "node-1" }];
    let cases = [
        (
            Event::Connected { server: "node-1", id: "alice", session: SessionKind::New, name: None, rooms: vec![] },
            r#"{"type":"connected","server":"node-1","id":"alice","session":"new","name":null,"rooms":[]}"#,
        ),
        (
            Event::Connected {
                server: "node-1",
                id: "alice",
                session: SessionKind::Restored,
                name: Some("Alice"),
                rooms: vec!["general", "ops"],
            },
            r#"{"type":"connected","server":"node-1","id":"alice","session":"restored","name":"Alice","rooms":["general","ops"]}"#,
        ),
        (
            Event::UserJoined { room: "general", user: "Alice", id: "alice", server: "node-1" },
            r#"{"type":"user_joined","room":"general","user":"Alice","id":"alice","server":"node-1"}"#,
        ),
        (
            Event::UserLeft {
                room: "general",
                user: "Alice",
                id: "alice",
                server: "node-1",
                reason: LeaveReason::Left,
            },
            r#"{"type":"user_left","room":"general","user":"Alice","id":"alice","server":"node-1","reason":"left"}"#,
        ),
        (
            Event::UserLeft {
                room: "general",
                user: "Alice",
                id: "alice",
                server: "node-1",
                reason: LeaveReason::Disconnected,
            },
            r#"{"type":"user_left","room":"general","user":"Alice","id":"alice","server":"node-1","reason":"disconnected"}"#,
        ),
        (
            Event::UserLeft {
                room: "general",
                user: "Alice",
                id: "alice",
                server: "node-1",
                reason: LeaveReason::NodeDown,
            },
            r#"{"type":"user_left","room":"general","user":"Alice","id":"alice","server":"node-1","reason":"node_down"}"#,
        ),
        (
            Event::Resumed { room: "general", from_seq: 42, to_seq: 41, epoch: Some("e1"), complete: true },
            r#"{"type":"resumed","room":"general","from_seq":42,"to_seq":41,"epoch":"e1","complete":true}"#,
        ),
        (
            Event::Resumed { room: "general", from_seq: 1, to_seq: 0, epoch: None, complete: false },
            r#"{"type":"resumed","room":"general","from_seq":1,"to_seq":0,"epoch":null,"complete":false}"#,
        ),
        (
            Event::Presence { room: "general", users: alice.to_vec() },
            r#"{"type":"presence","room":"general","users":[{"id":"alice","user":"Alice","server":"node-1"}]}"#,
        ),
        (Event::Online { users: vec![] }, r#"{"type":"online","users":[]}"#),
        (
            Event::Online { users: alice.to_vec() },
            r#"{"type":"online","users":[{"id":"alice","user":"Alice","server":"node-1"}]}"#,
        ),
        (
            Event::Error { code: ErrorCode::NotInRoom, message: "not in room general", msg_id: None },
            r#"{"type":"error","code":"not_in_room","message":"not in room general"}"#,
        ),
        (
            Event::Error { code: ErrorCode::RateLimited, message: "slow down", msg_id: Some("m-1") },
            r#"{"type":"error","code":"rate_limited","message":"slow down","msg_id":"m-1"}"#,
        ),
        (
            Event::Rehomed { from: "node-1", server: "node-2", rooms: vec!["general", "ops"] },
            r#"{"type":"rehomed","from":"node-1","server":"node-2","rooms":["general","ops"]}"#,
        ),
        (
            Event::Error { code: ErrorCode::Forbidden, message: "your token does not allow room ops", msg_id: None },
            r#"{"type":"error","code":"forbidden","message":"your token does not allow room ops"}"#,
        ),
        (Event::Refreshed { exp: 1_700_000_600 }, r#"{"type":"refreshed","exp":1700000600}"#),
    ];
    for (event, golden) in cases {
        assert_eq!(event.to_json(), golden);
        let frame = decode_node_frame(golden).unwrap_or_else(|e| panic!("{golden}: {e}"));
        assert_eq!(frame.to_json(), golden);
    }
}

/// `user_joined` as delivered, with the room's position the backbone appended.
#[test]
fn delivered_joins_carry_the_rooms_position() {
    let joined = |head_seq, epoch: Option<&str>| NodeFrame::UserJoined {
        room: "general".into(),
        user: "Alice".into(),
        id: "alice".into(),
        server: "node-1".into(),
        head_seq,
        epoch: epoch.map(String::from),
    };
    let cases = [
        (
            joined(Some(4), Some("e1")),
            r#"{"type":"user_joined","room":"general","user":"Alice","id":"alice","server":"node-1","head_seq":4,"epoch":"e1"}"#,
        ),
        // A room without a log yet (NATS): no epoch.
        (
            joined(Some(0), None),
            r#"{"type":"user_joined","room":"general","user":"Alice","id":"alice","server":"node-1","head_seq":0}"#,
        ),
        // As the node builds it, before a backbone appends anything.
        (
            joined(None, None),
            r#"{"type":"user_joined","room":"general","user":"Alice","id":"alice","server":"node-1"}"#,
        ),
    ];
    for (frame, golden) in cases {
        assert_eq!(decode_node_frame(golden), Ok(frame.clone()), "{golden}");
        assert_eq!(frame.to_json(), golden);
    }
}

/// The message frame: head prefix + seq + epoch, then replay marking; decoded and re-encoded
/// to the same bytes.
#[test]
fn message_frames_have_their_golden_bytes_and_round_trip() {
    let head = MessageHead {
        kind: "message",
        room: "general",
        from: "Alice",
        id: "alice",
        text: "hi \"you\"\n",
        server: "node-1",
        timestamp: 1_700_000_000_000,
        data: None,
        msg_id: None,
    };
    let prefix = head.json_prefix();
    assert_eq!(
        prefix,
        r#"{"type":"message","room":"general","from":"Alice","id":"alice","text":"hi \"you\"\n","server":"node-1","timestamp":1700000000000,"seq":"#
    );
    // What the backbones append (the local one's `format!`, the Lua's concatenation).
    assert_eq!(format!("{prefix}{},\"epoch\":\"{}\"}}", 42, "e1"), MESSAGE);
    assert_eq!(complete_message(&prefix, 42, "e1"), MESSAGE);
    assert_eq!(mark_replay(MESSAGE), REPLAYED);
    for (frame, golden) in [(msg(false), MESSAGE), (msg(true), REPLAYED)] {
        assert_eq!(decode_node_frame(golden), Ok(NodeFrame::Message(frame.clone())));
        assert_eq!(frame.to_json(), golden);
        assert_eq!(NodeFrame::Message(frame).to_json(), golden);
    }
    let v: Value = serde_json::from_str(REPLAYED).expect("valid json");
    assert_eq!((v["seq"].as_u64(), v["replay"].as_bool()), (Some(42), Some(true)));
}

#[test]
fn the_cheap_readers_find_type_room_seq_and_epoch() {
    // A text that looks like the fields it must not be mistaken for.
    let tricky = RoomMessage { text: r#"","seq":99,"epoch":"x"#.into(), room: r#"a"b\c"#.into(), ..msg(false) };
    for frame in [MESSAGE.to_string(), mark_replay(MESSAGE), tricky.to_json()] {
        assert_eq!(frame_type(frame.as_bytes()), Some(&b"message"[..]));
        assert_eq!(MessageMeta::read(&frame), Some(MessageMeta { seq: 42, epoch: "e1" }), "{frame}");
    }
    assert_eq!(message_room(MESSAGE), Some("general"));
    assert_eq!(message_room(&tricky.to_json()), Some(r#"a\"b\\c"#));
    let joined = r#"{"type":"user_joined","room":"r","user":"A","id":"a","server":"n","head_seq":4,"epoch":"e"}"#;
    assert_eq!(frame_type(joined.as_bytes()), Some(&b"user_joined"[..]));
    assert_eq!(MessageMeta::read(joined), None);
    assert_eq!(message_room(joined), None);
    assert_eq!(frame_type(b"[1]"), None);
}

#[test]
fn node_frames_are_read_leniently() {
    // Fields a reader can live without have defaults; extra fields are ignored.
    assert_eq!(
        decode_node_frame(r#"{"type":"connected","id":"a","session":"new","extra":[1]}"#),
        Ok(NodeFrame::Connected {
            server: String::new(),
            id: "a".into(),
            session: SessionKind::New,
            name: None,
            rooms: vec![]
        })
    );
    assert_eq!(
        decode_node_frame(r#"{"type":"user_left","room":"g","id":"a"}"#),
        Ok(NodeFrame::UserLeft {
            room: "g".into(),
            user: String::new(),
            id: "a".into(),
            server: String::new(),
            reason: "left".into()
        })
    );
    assert_eq!(
        decode_node_frame(r#"{"type":"resumed","room":"g","from_seq":1,"to_seq":0}"#),
        Ok(NodeFrame::Resumed { room: "g".into(), from_seq: 1, to_seq: 0, epoch: None, complete: true })
    );
    assert_eq!(
        decode_node_frame(r#"{"type":"error","code":"from_the_future"}"#),
        Ok(NodeFrame::Error { code: "from_the_future".into(), message: String::new(), msg_id: None })
    );
    let Ok(NodeFrame::Message(m)) = decode_node_frame(
        r#"{"type":"message","room":"g","from":"A","id":"a","text":"t","server":"n","seq":7,"epoch":"e","new":1}"#,
    ) else {
        panic!("message without timestamp did not decode");
    };
    assert_eq!((m.timestamp, m.replay), (0, false));
}

#[test]
fn node_frames_that_do_not_fit_are_handed_over() {
    assert!(matches!(decode_node_frame("{nope"), Err(NodeFrameError::Invalid(_))));
    assert!(matches!(decode_node_frame("[1]"), Err(NodeFrameError::Invalid(_))));
    assert!(matches!(decode_node_frame(r#"{"type":"dance"}"#), Err(NodeFrameError::Unknown(_))));
    assert!(matches!(decode_node_frame(r#"{"no":"type"}"#), Err(NodeFrameError::Unknown(_))));
    assert!(matches!(decode_node_frame(r#"{"type":7}"#), Err(NodeFrameError::Unknown(_))));
    assert!(matches!(
        decode_node_frame(r#"{"type":"message","room":"g","seq":"x"}"#),
        Err(NodeFrameError::Malformed(..))
    ));
    assert!(matches!(
        decode_node_frame(
            r#"{"type":"message","room":"g","from":"A","id":"a","text":"t","server":"n","seq":-1,"epoch":"e"}"#
        ),
        Err(NodeFrameError::Malformed(..))
    ));
    assert!(matches!(
        decode_node_frame(r#"{"type":"connected","id":"a","session":"sideways"}"#),
        Err(NodeFrameError::Malformed(..))
    ));
}

#[test]
fn joined_completion_is_pinned_with_and_without_an_epoch() {
    let joined = r#"{"type":"user_joined","room":"r","user":"u","id":"i","server":"n"}"#;
    assert_eq!(
        complete_joined(joined, 12, Some("e")),
        r#"{"type":"user_joined","room":"r","user":"u","id":"i","server":"n","head_seq":12,"epoch":"e"}"#
    );
    assert_eq!(
        complete_joined(joined, 0, None),
        r#"{"type":"user_joined","room":"r","user":"u","id":"i","server":"n","head_seq":0}"#
    );
}

/// A message with `data` and `msg_id`: both after `timestamp`, the data's bytes as the sender
/// wrote them (key order, number forms), and the whole frame round-trips.
#[test]
fn data_and_msg_id_keep_their_bytes_through_decode_and_publish() {
    let sent = r#"{"type":"message","room":"r","data":{"z":1,"a":{"n":[1e3,2.50]}},"msg_id":"k1"}"#;
    let Ok(ClientMsg::Message { room, text, data, msg_id }) = decode(sent) else { panic!("did not decode") };
    assert_eq!(text, "");
    let data = data.expect("data");
    assert_eq!(data.get(), r#"{"z":1,"a":{"n":[1e3,2.50]}}"#);
    let head = MessageHead {
        kind: "message",
        room: &room,
        from: "A",
        id: "a",
        text: &text,
        server: "n1",
        timestamp: 5,
        data: Some(&data),
        msg_id: msg_id.as_deref(),
    };
    let frame = complete_message(&head.json_prefix(), 7, "e1");
    let golden = r#"{"type":"message","room":"r","from":"A","id":"a","text":"","server":"n1","timestamp":5,"data":{"z":1,"a":{"n":[1e3,2.50]}},"msg_id":"k1","seq":7,"epoch":"e1"}"#;
    assert_eq!(frame, golden);
    assert_eq!(MessageMeta::read(&frame), Some(MessageMeta { seq: 7, epoch: "e1" }));
    let Ok(NodeFrame::Message(m)) = decode_node_frame(&frame) else { panic!("frame did not decode") };
    assert_eq!(m.msg_id.as_deref(), Some("k1"));
    assert_eq!(m.to_json(), golden);
    let dup = Event::Duplicate { room: "r", msg_id: "k1", seq: 7, epoch: "e1" }.to_json();
    assert_eq!(dup, r#"{"type":"duplicate","room":"r","msg_id":"k1","seq":7,"epoch":"e1"}"#);
    assert_eq!(
        decode_node_frame(&dup),
        Ok(NodeFrame::Duplicate { room: "r".into(), msg_id: "k1".into(), seq: 7, epoch: "e1".into() })
    );
}

#[test]
fn bad_data_and_msg_id_are_named() {
    let long = format!(r#"{{"type":"message","room":"r","text":"x","msg_id":"{}"}}"#, "m".repeat(65));
    let cases: &[(&str, ErrorCode)] = &[
        (r#"{"type":"message","room":"r"}"#, ErrorCode::MissingField),
        (r#"{"type":"message","room":"r","text":"x","msg_id":""}"#, ErrorCode::InvalidField),
        (r#"{"type":"message","room":"r","text":"x","msg_id":7}"#, ErrorCode::InvalidField),
        (&long, ErrorCode::InvalidField),
        (r#"{"type":"message","room":"r","text":1,"data":{}}"#, ErrorCode::InvalidField),
    ];
    for (frame, code) in cases {
        assert_eq!(decode(frame).map_err(|e| e.code), Err(*code), "{frame}");
    }
}

#[test]
fn rehomed_decodes_and_a_peek_reads_type_room_and_msg_id() {
    let frame = r#"{"type":"rehomed","from":"node-1","server":"node-2","rooms":["general"]}"#;
    assert_eq!(
        decode_node_frame(frame),
        Ok(NodeFrame::Rehomed { from: "node-1".into(), server: "node-2".into(), rooms: vec!["general".into()] })
    );
    let error = r#"{"type":"error","code":"rate_limited","message":"m","msg_id":"x-1"}"#;
    let Ok(NodeFrame::Error { msg_id, .. }) = decode_node_frame(error) else { panic!("error did not decode") };
    assert_eq!(msg_id.as_deref(), Some("x-1"));

    let peek = ClientPeek::read(r#"{"type":"message","room":"g\"1","text":"hi","msg_id":"m-1"}"#).unwrap();
    assert_eq!((peek.kind.as_ref(), peek.room.as_deref()), ("message", Some("g\"1")));
    assert_eq!(peek.message_msg_id(), Some("m-1"));
    // Not a string, empty, or on another kind of frame: no msg_id to name.
    for frame in [
        r#"{"type":"message","room":"g","msg_id":7}"#,
        r#"{"type":"message","room":"g","msg_id":""}"#,
        r#"{"type":"join","room":"g","msg_id":"m"}"#,
    ] {
        assert_eq!(ClientPeek::read(frame).and_then(|p| p.message_msg_id().map(str::to_owned)), None, "{frame}");
    }
    assert!(ClientPeek::read("[1]").is_none());
    assert!(ClientPeek::read(r#"{"room":"g"}"#).is_none());
}
