//! Tests of [`super`] (`chat.rs`), kept apart so that the module itself stays readable.
use super::*;

fn message(json: &str) -> Event {
    Event::Message(serde_json::from_str(json).expect("a message"))
}

#[test]
fn events_print_as_one_readable_line() {
    let fmt = |ev: Event| format_event(&ev).expect("printed");
    assert_eq!(
        fmt(message(
            r#"{"room":"general","from":"alice","id":"a","text":"hi","server":"node-2","timestamp":1,"seq":7,"epoch":"e"}"#
        )),
        "[node-2] #general alice: hi (seq 7)"
    );
    assert_eq!(
        fmt(message(r#"{"room":"g","from":"a","id":"a","text":"x","server":"n","seq":3,"epoch":"e","replay":true}"#)),
        "[n] #g a: x (seq 3, replay)"
    );
    let joined = Event::UserJoined {
        room: "general".into(),
        user: "bob".into(),
        id: "b".into(),
        server: "node-1".into(),
        head_seq: Some(0),
        epoch: None,
    };
    assert_eq!(fmt(joined), "[node-1] #general + bob joined");
    let left = Event::UserLeft {
        room: "g".into(),
        user: "bob".into(),
        id: "b".into(),
        server: "n".into(),
        reason: LeaveReason::NodeDown,
    };
    assert_eq!(fmt(left), "[n] #g - bob left (node_down)");
    let error = Event::Error { code: "not_in_room".into(), message: "join g first".into() };
    assert_eq!(fmt(error), "! not_in_room: join g first");
    let users = vec![PresenceUser { id: "a".into(), user: "alice".into(), server: "n1".into() }];
    assert_eq!(fmt(Event::Presence { room: "g".into(), users }), "* #g presence: alice@n1 (1)");
    assert_eq!(fmt(Event::Online { users: Vec::new() }), "* online: nobody");
    let connected = Event::Connected {
        server: "node-1".into(),
        id: "x1".into(),
        session: SessionKind::Restored,
        rooms: vec!["a".into(), "b".into()],
        attempt: 1,
        since_disconnect: None,
    };
    assert_eq!(fmt(connected), "[node-1] connected as x1 (session restored), rooms #a #b");
    let raw = serde_json::json!({"type":"surprise","x":1});
    assert_eq!(fmt(Event::Unknown(raw.clone())), raw.to_string());
}

#[test]
fn losses_are_warnings_and_a_complete_resume_is_silent() {
    let resumed =
        |complete| Event::Resumed { room: "g".into(), from_seq: 5, to_seq: 9, complete, epoch: Some("e".into()) };
    assert_eq!(format_event(&resumed(true)), None);
    assert!(format_event(&resumed(false)).is_some_and(|l| l.starts_with("! #g: resume incomplete")));
    let gap = |expected, got| format_event(&Event::Gap { room: "g".into(), expected, got }).expect("printed");
    assert_eq!(gap(4, 5), "! #g: messages seq 4 were lost");
    assert_eq!(gap(4, 7), "! #g: messages seq 4..6 were lost");
    let epoch = Event::EpochChanged { room: "g".into(), old: "a".into(), new: "b".into() };
    assert!(format_event(&epoch).is_some_and(|l| l.starts_with("! #g: the room's log was reset")));
}

#[test]
fn reconnects_are_narrated() {
    let resync = Resync { restored: true, replayed: 4, losses: 0 };
    assert_eq!(
        reconnected_line("node-3", &resync, 2, None),
        "~ reconnected to node-3 (session restored, 2 rooms, 4 missed messages replayed)"
    );
    let resync = Resync { restored: false, replayed: 1, losses: 1 };
    assert_eq!(
        reconnected_line("node-1", &resync, 1, Some(Duration::from_millis(250))),
        "~ reconnected to node-1 (session new, 1 room, 1 missed message replayed) after 0.25 s; \
         some messages were lost (see above)"
    );
    assert_eq!(
        lost_line("node-2", Some(1012), "node shutting down", true),
        "~ node-2 closed the connection (1012 node shutting down); reconnecting"
    );
    assert_eq!(lost_line("node-2", None, "reset", true), "~ connection to node-2 lost: reset; reconnecting");
}

#[test]
fn lines_become_commands_or_messages() {
    assert_eq!(parse_line("/join general"), Input::Join("general".into()));
    assert_eq!(parse_line("/leave"), Input::Leave(None));
    assert_eq!(parse_line("/quit"), Input::Quit);
    assert_eq!(parse_line("   "), Input::Nothing);
    assert!(matches!(parse_line("/join"), Input::Complaint(_)));
    assert!(matches!(parse_line("/join a b"), Input::Complaint(_)));
    assert!(matches!(parse_line("/frobnicate"), Input::Complaint(_)));
    assert_eq!(parse_line("hello there"), Input::Message("hello there".into()));
    assert_eq!(parse_line("//slash"), Input::Message("/slash".into()));
    assert_eq!(parse_line("/name Alice Smith"), Input::Name("Alice Smith".into()));
    assert_eq!(parse_line("/presence g"), Input::Presence(Some("g".into())));
    assert_eq!(parse_line("/online"), Input::Online);
}

/// Nothing listens on port 1: the client stays disconnected, which is what this pins.
#[tokio::test]
async fn lines_typed_while_not_connected_are_refused_not_queued() {
    let (client, _events) = Client::start(ClientConfig::new("ws://127.0.0.1:1/ws")).expect("valid config");
    let mut out = Vec::new();
    let mut chat = Chat {
        client: client.clone(),
        out: &mut out,
        session: Session::default(),
        joins: FuturesUnordered::new(),
        awaiting: BTreeSet::new(),
        ever_connected: true,
        ever_ready: true,
        server: "node-1".into(),
        resync: None,
    };
    for line in ["hi", "/join g", "hi", "/presence", "/online"] {
        assert_eq!(chat.on_line(line).await.expect("handled"), None);
    }
    assert!(chat.awaiting.is_empty(), "an offline join does not hold the input");
    assert_eq!(chat.session.outstanding(), 0);
    assert_eq!(chat.on_line("/quit").await.expect("handled"), Some(ChatEnd::Quit));
    drop(chat);
    let text = String::from_utf8(out).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "! no current room: /join ROOM first",
            "* not connected; #g will be joined once reconnected",
            "! not connected; message not sent",
            "! not connected; /presence not sent",
            "! not connected; /online not sent",
        ]
    );
    client.close().await.expect("closed");
}

#[test]
fn flags_are_checked_before_the_client_is_configured() {
    let opts = |name: &str| ChatOptions {
        url: "ws://h:1/ws".into(),
        client: Some("alice".into()),
        name: Some(name.into()),
        linger: DEFAULT_LINGER,
        ca: None,
    };
    let cfg = client_config(&opts("Alice")).expect("valid");
    assert_eq!((cfg.client_id.as_deref(), cfg.name.as_deref()), (Some("alice"), Some("Alice")));
    assert!(client_config(&opts("")).is_err_and(|e| e.to_string().contains("--name")));
    let bad_id = ChatOptions { client: Some("bad id".into()), ..opts("Alice") };
    assert!(client_config(&bad_id).is_err_and(|e| e.to_string().contains("--client")));
    let not_ws = ChatOptions { url: "http://h:1/ws".into(), ..opts("Alice") };
    assert!(client_config(&not_ws).is_err());
    let no_ca = ChatOptions { url: "wss://h:1/ws".into(), ca: Some("/nonexistent/ca.pem".into()), ..opts("Alice") };
    assert!(client_config(&no_ca).is_err_and(|e| e.to_string().contains("--ca")));
    let tls = ChatOptions { url: "wss://h:1/ws".into(), ..opts("Alice") };
    assert!(client_config(&tls).expect("wss is accepted").tls.is_none(), "system roots by default");
}
