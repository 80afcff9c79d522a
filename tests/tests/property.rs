//! Property: whatever mix of valid and invalid frames, abrupt disconnects and reconnects
//! clients throw at one or two nodes, once every client has gone nothing of them is left in
//! Redis — no room subscription (`PUBSUB NUMSUB` of the room channel is 0), no presence entry
//! (room and `online` hashes, their `:ids` counters, the instances' bookkeeping sets) — and
//! while they were connected every answer was well-formed, every error carried a known code,
//! the code the frame deserved, and no recoverable error cost the connection.
//!
//! One private `redis-server` and two in-process nodes serve every case; each case names its
//! client ids and rooms after its own number, so no case sees another's state. After each
//! step the client sends a *barrier*: a `presence` request for a room nobody joins. A node
//! handles a connection's frames in order and queues direct answers in order, so everything
//! a step caused directly (its errors, its `user_left`, `presence`, `resumed`) arrives before
//! the barrier's answer: the test waits on that, never on a sleep. A connection also sends
//! one right after `connected`, which goes out *before* the node registers the connection's
//! presence (online, restored rooms): until its first frame is read, others may not see it.
//!
//! A small model of the protocol (decoder field order, membership, the session's rooms and
//! name) says which error codes and answers each step deserves. `PROPTEST_CASES=N` runs more
//! cases than the CI default; `docs/FUZZING.md` describes the design.

use anyhow::{anyhow, bail, ensure, Context, Result};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestError, TestRunner};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tether_kit::RedisServer;
use tether_proto::wire::{ClientMsg, ErrorCode, MAX_NAME_CHARS, MAX_ROOM_LEN, NODE_FRAME_TYPES};
use tether_tests::{eventually, http_get, InProcessNode, WsClient, DEADLINE};
use tokio_tungstenite::tungstenite::Message;

/// Cases per run in CI: about 40 ms each (1–3 clients, up to 25 steps), shrinking aside.
const CASES: u32 = 64;
const MAX_STEPS: usize = 25;
const MAX_CLIENTS: usize = 3;
const NODES: usize = 2;
const PREFIX: &str = tether_node::config::DEFAULT_PREFIX;
/// How long a shrinking run waits for cleanup (cleanup takes milliseconds; the first failure
/// waited the full `DEADLINE`).
const SHRINK_DEADLINE: Duration = Duration::from_secs(2);
/// Shrinking stops after this long with the smallest failing case so far, well inside the
/// nextest timeout.
const SHRINK_TIME_MS: u32 = 60_000;

// ---------------------------------------------------------------------------------------
// The steps, as generated and shrunk. Their `Debug` is what a failure prints.

/// A `room` field.
#[derive(Debug, Clone, Copy)]
enum Room {
    /// One of the case's three valid rooms: plain, non-ASCII with braces (the key hash-tag
    /// characters), exactly `MAX_ROOM_LEN` bytes.
    Valid(u8),
    /// A string that is not a valid room name.
    Bad(BadRoom),
    Number,
    Null,
    Missing,
}

#[derive(Debug, Clone, Copy)]
enum BadRoom {
    Empty,
    Blank,
    Spaced,
    NoBreakSpace,
    Control,
    TooLong,
}

#[derive(Debug, Clone, Copy)]
enum Text {
    Plain,
    Empty,
    Number,
    Missing,
}

#[derive(Debug, Clone, Copy)]
enum Name {
    Plain,
    Unicode,
    Longest,
    Empty,
    TooLong,
    Control,
    Number,
    Missing,
}

/// The `rooms` field of a `resume`.
#[derive(Debug, Clone)]
enum Resume {
    Missing,
    Null,
    Array,
    /// An object; a key repeated in the list is written once, the last point winning.
    Points(Vec<(Key, Point)>),
}

/// A key of the `rooms` object.
#[derive(Debug, Clone, Copy)]
enum Key {
    Valid(u8),
    Bad(BadRoom),
}

#[derive(Debug, Clone, Copy)]
enum Point {
    Seq(u8),
    SeqEpoch(u8),
    Negative,
    Text,
}

#[derive(Debug, Clone, Copy)]
enum Garbage {
    NotJson,
    NotObject,
    EmptyFrame,
    NoType,
    TypeNull,
    TypeNumber,
    UnknownType,
    Binary,
    /// A WebSocket ping: answered by the protocol layer, never an error.
    Ping,
}

#[derive(Debug, Clone)]
enum Step {
    Join {
        client: usize,
        room: Room,
    },
    Leave {
        client: usize,
        room: Room,
    },
    Message {
        client: usize,
        room: Room,
        text: Text,
    },
    SetName {
        client: usize,
        name: Name,
    },
    Presence {
        client: usize,
        room: Room,
    },
    Online {
        client: usize,
    },
    Resume {
        client: usize,
        rooms: Resume,
    },
    Garbage {
        client: usize,
        frame: Garbage,
    },
    /// Drops the TCP connection without a close frame.
    Drop {
        client: usize,
    },
    /// Connects the same id again, to `node`; a connected client is dropped first, so the
    /// new connection races the old one's cleanup.
    Reconnect {
        client: usize,
        node: usize,
    },
}

impl Step {
    /// The same step with its client and node taken modulo the case's counts.
    fn folded(mut self, clients: usize, nodes: usize) -> Self {
        match &mut self {
            Step::Join { client, .. }
            | Step::Leave { client, .. }
            | Step::Message { client, .. }
            | Step::SetName { client, .. }
            | Step::Presence { client, .. }
            | Step::Online { client }
            | Step::Resume { client, .. }
            | Step::Garbage { client, .. }
            | Step::Drop { client } => *client %= clients,
            Step::Reconnect { client, node } => {
                *client %= clients;
                *node %= nodes;
            }
        }
        self
    }

    fn client(&self) -> usize {
        match *self {
            Step::Join { client, .. }
            | Step::Leave { client, .. }
            | Step::Message { client, .. }
            | Step::SetName { client, .. }
            | Step::Presence { client, .. }
            | Step::Online { client }
            | Step::Resume { client, .. }
            | Step::Garbage { client, .. }
            | Step::Drop { client }
            | Step::Reconnect { client, .. } => client,
        }
    }
}

/// One case: how many nodes, each client's first node, and the steps.
#[derive(Clone)]
struct Case {
    nodes: usize,
    homes: Vec<usize>,
    steps: Vec<Step>,
}

/// Readable when shrunk: one line per step, with the frame it sends (case number `N`).
impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = Names::new("N");
        writeln!(f, "{} node(s); clients start on nodes {:?}; steps:", self.nodes, self.homes)?;
        for (i, step) in self.steps.iter().enumerate() {
            write!(f, "  {i:>2}: {step:?}")?;
            if let Some(frame) = frame_of(step, &names) {
                write!(f, "  →  {}", frame.shown())?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

fn room() -> impl Strategy<Value = Room> {
    prop_oneof![
        8 => (0u8..3).prop_map(Room::Valid),
        2 => bad_room().prop_map(Room::Bad),
        1 => Just(Room::Number),
        1 => Just(Room::Null),
        1 => Just(Room::Missing),
    ]
}

fn bad_room() -> impl Strategy<Value = BadRoom> {
    prop_oneof![
        Just(BadRoom::Empty),
        Just(BadRoom::Blank),
        Just(BadRoom::Spaced),
        Just(BadRoom::NoBreakSpace),
        Just(BadRoom::Control),
        Just(BadRoom::TooLong),
    ]
}

fn resume() -> impl Strategy<Value = Resume> {
    let key = prop_oneof![4 => (0u8..3).prop_map(Key::Valid), 1 => bad_room().prop_map(Key::Bad)];
    let point = prop_oneof![
        3 => (0u8..4).prop_map(Point::Seq),
        2 => (0u8..4).prop_map(Point::SeqEpoch),
        1 => Just(Point::Negative),
        1 => Just(Point::Text),
    ];
    prop_oneof![
        6 => proptest::collection::vec((key, point), 0..4).prop_map(Resume::Points),
        1 => Just(Resume::Missing),
        1 => Just(Resume::Null),
        1 => Just(Resume::Array),
    ]
}

fn step(clients: usize, nodes: usize) -> impl Strategy<Value = Step> {
    let c = 0..clients;
    let text = prop_oneof![
        4 => Just(Text::Plain),
        1 => Just(Text::Empty),
        1 => Just(Text::Number),
        1 => Just(Text::Missing),
    ];
    let name = prop_oneof![
        Just(Name::Plain),
        Just(Name::Unicode),
        Just(Name::Longest),
        Just(Name::Empty),
        Just(Name::TooLong),
        Just(Name::Control),
        Just(Name::Number),
        Just(Name::Missing),
    ];
    let garbage = prop_oneof![
        Just(Garbage::NotJson),
        Just(Garbage::NotObject),
        Just(Garbage::EmptyFrame),
        Just(Garbage::NoType),
        Just(Garbage::TypeNull),
        Just(Garbage::TypeNumber),
        Just(Garbage::UnknownType),
        Just(Garbage::Binary),
        Just(Garbage::Ping),
    ];
    prop_oneof![
        5 => (c.clone(), room()).prop_map(|(client, room)| Step::Join { client, room }),
        3 => (c.clone(), room()).prop_map(|(client, room)| Step::Leave { client, room }),
        3 => (c.clone(), room(), text).prop_map(|(client, room, text)| Step::Message { client, room, text }),
        1 => (c.clone(), name).prop_map(|(client, name)| Step::SetName { client, name }),
        2 => (c.clone(), room()).prop_map(|(client, room)| Step::Presence { client, room }),
        1 => c.clone().prop_map(|client| Step::Online { client }),
        2 => (c.clone(), resume()).prop_map(|(client, rooms)| Step::Resume { client, rooms }),
        2 => (c.clone(), garbage).prop_map(|(client, frame)| Step::Garbage { client, frame }),
        1 => c.clone().prop_map(|client| Step::Drop { client }),
        2 => (c, 0..nodes).prop_map(|(client, node)| Step::Reconnect { client, node }),
    ]
}

/// Drawn without `prop_flat_map` (whose shrinking can end on a value that passed): indices
/// are drawn for the largest case and folded into this one's client and node counts, so a
/// shrunk case prints the indices it really uses.
fn case() -> impl Strategy<Value = Case> {
    (
        1..=NODES,
        proptest::collection::vec(0..NODES, 1..=MAX_CLIENTS),
        proptest::collection::vec(step(MAX_CLIENTS, NODES), 0..=MAX_STEPS),
    )
        .prop_map(|(nodes, homes, steps)| {
            let clients = homes.len();
            let homes = homes.into_iter().map(|n| n % nodes).collect();
            let steps = steps.into_iter().map(|s| s.folded(clients, nodes)).collect();
            Case { nodes, homes, steps }
        })
}

// ---------------------------------------------------------------------------------------
// From steps to frames, and what each frame deserves.

/// A case's client ids and room names, all carrying the case's label.
struct Names {
    label: String,
}

impl Names {
    fn new(label: &str) -> Self {
        Self { label: label.to_string() }
    }

    fn client(&self, i: usize) -> String {
        format!("p{}-c{i}", self.label)
    }

    fn room(&self, i: u8) -> String {
        match i % 3 {
            0 => format!("p{}.lobby", self.label),
            1 => format!("p{}.{{ü}}", self.label),
            _ => {
                let mut r = format!("p{}.", self.label);
                while r.len() < MAX_ROOM_LEN {
                    r.push('x');
                }
                r
            }
        }
    }

    fn rooms(&self) -> [String; 3] {
        [self.room(0), self.room(1), self.room(2)]
    }

    /// Asked for after every step; nobody ever joins it.
    fn barrier(&self) -> String {
        format!("p{}.barrier", self.label)
    }
}

fn bad_room_name(b: BadRoom) -> String {
    match b {
        BadRoom::Empty => String::new(),
        BadRoom::Blank => " \t".into(),
        BadRoom::Spaced => "a b".into(),
        BadRoom::NoBreakSpace => "a\u{a0}b".into(),
        BadRoom::Control => "bell\u{7}".into(),
        BadRoom::TooLong => "r".repeat(MAX_ROOM_LEN + 1),
    }
}

/// What the decoder makes of a `room` field: `None` when it is a valid name.
fn room_fault(room: Room) -> Option<&'static str> {
    match room {
        Room::Valid(_) => None,
        Room::Bad(_) => Some("invalid_room"),
        Room::Number => Some("invalid_field"),
        Room::Null | Room::Missing => Some("missing_field"),
    }
}

fn put_room(obj: &mut Map<String, Value>, room: Room, names: &Names) {
    let v = match room {
        Room::Valid(i) => json!(names.room(i)),
        Room::Bad(b) => json!(bad_room_name(b)),
        Room::Number => json!(5),
        Room::Null => Value::Null,
        Room::Missing => return,
    };
    obj.insert("room".into(), v);
}

fn object(kind: &str) -> Map<String, Value> {
    let mut obj = Map::new();
    obj.insert("type".into(), json!(kind));
    obj
}

/// The `rooms` object of a resume, deduplicated as JSON would be (last key wins).
fn resume_points(points: &[(Key, Point)], names: &Names) -> BTreeMap<String, Point> {
    points
        .iter()
        .map(|(key, point)| {
            let name = match *key {
                Key::Valid(i) => names.room(i),
                Key::Bad(b) => bad_room_name(b),
            };
            (name, *point)
        })
        .collect()
}

/// The frame a step sends, if it sends one.
fn frame_of(step: &Step, names: &Names) -> Option<Message> {
    let obj = match step {
        Step::Join { room, .. } | Step::Leave { room, .. } | Step::Presence { room, .. } => {
            let kind = match step {
                Step::Join { .. } => "join",
                Step::Leave { .. } => "leave",
                _ => "presence",
            };
            let mut obj = object(kind);
            put_room(&mut obj, *room, names);
            obj
        }
        Step::Message { room, text, .. } => {
            let mut obj = object("message");
            put_room(&mut obj, *room, names);
            let text = match text {
                Text::Plain => Some(json!("hello \"there\" ✓")),
                Text::Empty => Some(json!("")),
                Text::Number => Some(json!(1.5)),
                Text::Missing => None,
            };
            if let Some(text) = text {
                obj.insert("text".into(), text);
            }
            obj
        }
        Step::SetName { name, .. } => {
            let mut obj = object("set_name");
            let v = match name {
                Name::Plain => json!("Ann"),
                Name::Unicode => json!("Zoë 🐙"),
                Name::Longest => json!("n".repeat(MAX_NAME_CHARS)),
                Name::Empty => json!(""),
                Name::TooLong => json!("é".repeat(MAX_NAME_CHARS + 1)),
                Name::Control => json!("Ann\u{1b}[31m"),
                Name::Number => json!(7),
                Name::Missing => return Some(Message::Text(Value::Object(obj).to_string().into())),
            };
            obj.insert("name".into(), v);
            obj
        }
        Step::Online { .. } => object("online"),
        Step::Resume { rooms, .. } => {
            let mut obj = object("resume");
            let rooms = match rooms {
                Resume::Missing => None,
                Resume::Null => Some(Value::Null),
                Resume::Array => Some(json!([names.room(0)])),
                Resume::Points(points) => {
                    let rooms: Map<String, Value> = resume_points(points, names)
                        .into_iter()
                        .map(|(name, point)| {
                            let v = match point {
                                Point::Seq(n) => json!(n),
                                Point::SeqEpoch(n) => json!({"seq": n, "epoch": "no-such-epoch"}),
                                Point::Negative => json!(-1),
                                Point::Text => json!("3"),
                            };
                            (name, v)
                        })
                        .collect();
                    Some(Value::Object(rooms))
                }
            };
            if let Some(rooms) = rooms {
                obj.insert("rooms".into(), rooms);
            }
            obj
        }
        Step::Garbage { frame, .. } => {
            let text = match frame {
                Garbage::NotJson => "{nope",
                Garbage::NotObject => "[1,2]",
                Garbage::EmptyFrame => "",
                Garbage::NoType => r#"{"room":"x"}"#,
                Garbage::TypeNull => r#"{"type":null}"#,
                Garbage::TypeNumber => r#"{"type":7}"#,
                Garbage::UnknownType => r#"{"type":"dance","room":"x"}"#,
                Garbage::Binary => return Some(Message::Binary(br#"{"type":"online"}"#.to_vec().into())),
                Garbage::Ping => return Some(Message::Ping(b"hi".to_vec().into())),
            };
            return Some(Message::Text(text.into()));
        }
        Step::Drop { .. } | Step::Reconnect { .. } => return None,
    };
    Some(Message::Text(Value::Object(obj).to_string().into()))
}

trait Shown {
    fn shown(&self) -> String;
}

impl Shown for Message {
    fn shown(&self) -> String {
        match self {
            Message::Text(t) => t.to_string(),
            Message::Binary(b) => format!("binary {:?}", String::from_utf8_lossy(b)),
            other => format!("{other:?}"),
        }
    }
}

/// A direct answer a step must produce before the barrier's.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    /// `user_left` for this room, this client, reason `left`.
    Left(String),
    /// `presence` for this room, listing at least these ids and only ids of the case.
    Presence(String, BTreeSet<String>),
    /// `online` listing at least these ids.
    Online(BTreeSet<String>),
    /// `resumed` for this room.
    Resumed(String),
}

/// What a step deserves: its errors in order (each one of the listed codes) and its answers.
#[derive(Debug, Default)]
struct Expect {
    errors: Vec<Vec<&'static str>>,
    answers: Vec<Answer>,
}

impl Expect {
    fn error(code: &'static str) -> Self {
        Self { errors: vec![vec![code]], answers: Vec::new() }
    }
}

// ---------------------------------------------------------------------------------------
// Running a case.

/// One client slot: its connection (if any) and what the model says about its session.
struct Slot {
    id: String,
    ws: Option<WsClient>,
    /// Rooms of the session: the connection is in them while connected, and gets them back
    /// when it reconnects.
    rooms: BTreeSet<String>,
    name: Option<String>,
    /// Whether anything was saved to the id's session (a join, a leave, a name).
    has_session: bool,
}

struct Fixture {
    nodes: Vec<InProcessNode>,
    con: redis::aio::MultiplexedConnection,
    /// Held only to keep the server alive; declared after the nodes, so it dies after them.
    _redis: RedisServer,
    next_case: AtomicUsize,
    /// Set once a case failed: whatever it leaked stays behind, so later cases (shrinking
    /// runs) check only their own keys instead of the whole of `online` and the instances.
    dirty: AtomicBool,
}

impl Fixture {
    async fn start() -> Result<Self> {
        let redis = RedisServer::start().await?;
        let mut nodes = Vec::new();
        for i in 1..=NODES {
            let node = InProcessNode::start(&format!("node-{i}"), &redis.url(), |_| {})?;
            let addr = node.addr;
            eventually("node ready", || async { (http_get(addr, "/readyz").await.ok()?.0 == 200).then_some(()) })
                .await?;
            nodes.push(node);
        }
        let con = redis::Client::open(redis.url())?.get_multiplexed_async_connection().await?;
        Ok(Self { nodes, con, _redis: redis, next_case: AtomicUsize::new(0), dirty: AtomicBool::new(false) })
    }

    fn url(&self, node: usize, id: &str) -> String {
        self.nodes[node].ws_url(id)
    }
}

/// Connects `slot` to `node` and checks the `connected` frame against the model.
async fn connect(fx: &Fixture, slot: &mut Slot, node: usize, names: &Names) -> Result<()> {
    let mut ws = WsClient::connect(&fx.url(node, &slot.id)).await?;
    let hello = ws.recv().await.context("waiting for `connected`")?;
    ensure!(hello["type"] == "connected", "first frame is not `connected`: {hello}");
    ensure!(hello["id"] == slot.id.as_str(), "connected with the wrong id: {hello}");
    let kind = if slot.has_session { "restored" } else { "new" };
    ensure!(hello["session"] == kind, "expected a {kind} session: {hello}");
    let rooms: BTreeSet<String> =
        hello["rooms"].as_array().into_iter().flatten().filter_map(|r| r.as_str().map(String::from)).collect();
    ensure!(rooms == slot.rooms, "session restored rooms {rooms:?}, but the client was in {:?}", slot.rooms);
    ensure!(hello["name"].as_str() == slot.name.as_deref(), "session restored the wrong name: {hello}");
    // `connected` goes out before the connection registers its presence (online, restored
    // rooms); its first frame is read only once that is done, so a barrier answered proves it.
    let window = barrier(&mut ws, names).await?;
    ensure!(!window.iter().any(|v| v["type"] == "error"), "errors on connecting: {window:?}");
    slot.ws = Some(ws);
    Ok(())
}

/// Applies a frame step to the model and says what it deserves.
fn expect(step: &Step, me: usize, slots: &mut [Slot], names: &Names) -> Expect {
    let members = |slots: &[Slot], room: &str| -> BTreeSet<String> {
        slots.iter().filter(|s| s.ws.is_some() && s.rooms.contains(room)).map(|s| s.id.clone()).collect()
    };
    match step {
        Step::Join { room, .. } => match (room_fault(*room), room) {
            (Some(code), _) => Expect::error(code),
            (None, Room::Valid(i)) => {
                let s = &mut slots[me];
                // Joining a room already joined is confirmed and saves nothing.
                if s.rooms.insert(names.room(*i)) {
                    s.has_session = true;
                }
                Expect::default()
            }
            (None, _) => unreachable!("only valid rooms have no fault"),
        },
        Step::Leave { room, .. } => match (room_fault(*room), room) {
            (Some(code), _) => Expect::error(code),
            (None, Room::Valid(i)) => {
                let name = names.room(*i);
                let s = &mut slots[me];
                if !s.rooms.remove(&name) {
                    return Expect::error("not_in_room");
                }
                s.has_session = true;
                Expect { errors: Vec::new(), answers: vec![Answer::Left(name)] }
            }
            (None, _) => unreachable!("only valid rooms have no fault"),
        },
        Step::Message { room, text, .. } => {
            if let Some(code) = room_fault(*room) {
                return Expect::error(code);
            }
            match text {
                Text::Missing => return Expect::error("missing_field"),
                Text::Number => return Expect::error("invalid_field"),
                Text::Plain | Text::Empty => {}
            }
            let Room::Valid(i) = room else { unreachable!("only valid rooms have no fault") };
            if slots[me].rooms.contains(&names.room(*i)) {
                Expect::default()
            } else {
                Expect::error("not_in_room")
            }
        }
        Step::SetName { name, .. } => {
            let value = match name {
                Name::Plain => "Ann".to_string(),
                Name::Unicode => "Zoë 🐙".to_string(),
                Name::Longest => "n".repeat(MAX_NAME_CHARS),
                Name::Empty | Name::TooLong | Name::Control => return Expect::error("invalid_name"),
                Name::Number => return Expect::error("invalid_field"),
                Name::Missing => return Expect::error("missing_field"),
            };
            slots[me].name = Some(value);
            slots[me].has_session = true;
            Expect::default()
        }
        Step::Presence { room, .. } => match (room_fault(*room), room) {
            (Some(code), _) => Expect::error(code),
            (None, Room::Valid(i)) => {
                let name = names.room(*i);
                let ids = members(slots, &name);
                Expect { errors: Vec::new(), answers: vec![Answer::Presence(name, ids)] }
            }
            (None, _) => unreachable!("only valid rooms have no fault"),
        },
        Step::Online { .. } => {
            let ids = slots.iter().filter(|s| s.ws.is_some()).map(|s| s.id.clone()).collect();
            Expect { errors: Vec::new(), answers: vec![Answer::Online(ids)] }
        }
        Step::Resume { rooms, .. } => {
            let points = match rooms {
                Resume::Missing => return Expect::error("missing_field"),
                Resume::Null | Resume::Array => return Expect::error("invalid_field"),
                Resume::Points(points) => resume_points(points, names),
            };
            // The decoder stops at the first fault, in the object's key order.
            let mut faults = BTreeSet::new();
            for (name, point) in &points {
                if tether_proto::wire::validate_room(name).is_err() {
                    faults.insert("invalid_room");
                }
                if matches!(point, Point::Negative | Point::Text) {
                    faults.insert("invalid_field");
                }
            }
            if !faults.is_empty() {
                return Expect { errors: vec![faults.into_iter().collect()], answers: Vec::new() };
            }
            let mut e = Expect::default();
            for name in points.keys() {
                if slots[me].rooms.contains(name) {
                    e.answers.push(Answer::Resumed(name.clone()));
                } else {
                    e.errors.push(vec!["not_in_room"]);
                }
            }
            e
        }
        Step::Garbage { frame, .. } => match frame {
            Garbage::NotJson | Garbage::NotObject | Garbage::EmptyFrame | Garbage::Binary => Expect::error("bad_json"),
            Garbage::NoType => Expect::error("missing_field"),
            Garbage::TypeNull | Garbage::TypeNumber => Expect::error("invalid_field"),
            Garbage::UnknownType => Expect::error("unknown_type"),
            Garbage::Ping => Expect::default(),
        },
        Step::Drop { .. } | Step::Reconnect { .. } => Expect::default(),
    }
}

/// Checks that a frame is well-formed: JSON object of a known type; errors with a known code.
fn well_formed(v: &Value) -> Result<()> {
    let kind = v["type"].as_str().ok_or_else(|| anyhow!("frame without a string `type`: {v}"))?;
    ensure!(NODE_FRAME_TYPES.contains(&kind), "frame of unknown type: {v}");
    if kind == "error" {
        let code = v["code"].as_str().ok_or_else(|| anyhow!("error without a string `code`: {v}"))?;
        ensure!(ErrorCode::parse(code).is_some(), "error with unknown code: {v}");
        ensure!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "error without a message: {v}");
    }
    Ok(())
}

fn ids_of(v: &Value) -> BTreeSet<String> {
    v["users"].as_array().into_iter().flatten().filter_map(|u| u["id"].as_str().map(String::from)).collect()
}

/// Sends the barrier and waits for its answer; returns the frames that came before it (since
/// the last barrier), each checked to be well-formed.
async fn barrier<'w>(ws: &'w mut WsClient, names: &Names) -> Result<&'w [Value]> {
    let room = names.barrier();
    let from = ws.seen.len();
    ws.send_msg(&ClientMsg::Presence { room: room.clone() }).await?;
    let answer =
        ws.recv_until("the barrier's answer", |v| v["type"] == "presence" && v["room"] == room.as_str()).await?;
    ensure!(ids_of(&answer).is_empty(), "somebody is in the barrier room: {answer}");
    let window = &ws.seen[from..ws.seen.len() - 1];
    for v in window {
        well_formed(v)?;
    }
    Ok(window)
}

/// Sends one step's frame and the barrier; checks everything that arrives up to the
/// barrier's answer against what the step deserves.
async fn exchange(ws: &mut WsClient, frame: Message, want: Expect, names: &Names, case_ids: &[String]) -> Result<()> {
    ws.send_raw(frame).await?;
    let window = barrier(ws, names).await.context("the connection did not survive the step")?;
    let errors: Vec<&str> = window.iter().filter(|v| v["type"] == "error").filter_map(|v| v["code"].as_str()).collect();
    let matches =
        errors.len() == want.errors.len() && errors.iter().zip(&want.errors).all(|(got, ok)| ok.contains(got));
    ensure!(matches, "errors {errors:?}, expected {:?}; frames: {window:?}", want.errors);
    for answer in &want.answers {
        let found = window.iter().any(|v| match answer {
            Answer::Left(room) => v["type"] == "user_left" && v["room"] == room.as_str() && v["reason"] == "left",
            Answer::Presence(room, ids) => {
                v["type"] == "presence" && v["room"] == room.as_str() && {
                    let got = ids_of(v);
                    got.is_superset(ids) && got.iter().all(|id| case_ids.contains(id))
                }
            }
            Answer::Online(ids) => v["type"] == "online" && ids_of(v).is_superset(ids),
            Answer::Resumed(room) => v["type"] == "resumed" && v["room"] == room.as_str(),
        });
        ensure!(found, "no answer {answer:?} among {window:?}");
    }
    Ok(())
}

/// What the case left in Redis; empty when nothing.
async fn leftovers(fx: &Fixture, names: &Names, case_ids: &[String]) -> Result<Vec<String>> {
    let mut con = fx.con.clone();
    let mut left = Vec::new();
    let rooms: Vec<String> = names.rooms().into_iter().chain([names.barrier()]).collect();
    for room in &rooms {
        let channel = format!("{PREFIX}room:{{{room}}}");
        let (_, subs): (String, i64) = redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel).query_async(&mut con).await?;
        if subs != 0 {
            left.push(format!("{channel} has {subs} subscriber(s)"));
        }
        for key in [format!("{PREFIX}presence:{{{room}}}"), format!("{PREFIX}presence:{{{room}}}:ids")] {
            let entries: BTreeMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(&mut con).await?;
            if !entries.is_empty() {
                left.push(format!("{key} = {entries:?}"));
            }
        }
    }
    let everything = !fx.dirty.load(Ordering::Relaxed);
    for key in [format!("{PREFIX}online"), format!("{PREFIX}online:ids")] {
        let entries: BTreeMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(&mut con).await?;
        let ours = |(field, value): &(&String, &String)| {
            case_ids.iter().any(|id| *field == id || value.contains(&format!("\"id\":\"{id}\"")))
        };
        let shown: Vec<_> = entries.iter().filter(|e| everything || ours(e)).collect();
        if !shown.is_empty() {
            left.push(format!("{key} = {shown:?}"));
        }
    }
    let sets: Vec<String> = redis::cmd("KEYS").arg(format!("{PREFIX}instance:*")).query_async(&mut con).await?;
    for set in sets {
        let members: Vec<String> = redis::cmd("SMEMBERS").arg(&set).query_async(&mut con).await?;
        let shown: Vec<&String> = members
            .iter()
            .filter(|m| everything || rooms.iter().any(|r| m.split_once('|').is_some_and(|(_, room)| room == r)))
            .collect();
        if !shown.is_empty() {
            left.push(format!("{set} = {shown:?}"));
        }
    }
    Ok(left)
}

async fn run_case(fx: &Fixture, case: &Case) -> Result<()> {
    let names = Names::new(&fx.next_case.fetch_add(1, Ordering::Relaxed).to_string());
    let case_ids: Vec<String> = (0..case.homes.len()).map(|i| names.client(i)).collect();
    let mut slots: Vec<Slot> = case_ids
        .iter()
        .map(|id| Slot { id: id.clone(), ws: None, rooms: BTreeSet::new(), name: None, has_session: false })
        .collect();
    for (slot, &home) in slots.iter_mut().zip(&case.homes) {
        connect(fx, slot, home, &names).await?;
    }
    for (i, step) in case.steps.iter().enumerate() {
        let me = step.client();
        let result = match step {
            Step::Drop { .. } => {
                drop(slots[me].ws.take());
                Ok(())
            }
            Step::Reconnect { node, .. } => {
                drop(slots[me].ws.take());
                connect(fx, &mut slots[me], *node, &names).await
            }
            _ if slots[me].ws.is_none() => Ok(()),
            _ => {
                let frame = frame_of(step, &names).expect("every other step sends a frame");
                let want = expect(step, me, &mut slots, &names);
                let ws = slots[me].ws.as_mut().expect("checked above");
                exchange(ws, frame, want, &names, &case_ids).await
            }
        };
        result.with_context(|| format!("step {i} ({step:?}) of case {}", names.label))?;
    }
    for slot in &mut slots {
        if let Some(ws) = slot.ws.take() {
            ws.close().await;
        }
    }
    // Cleanup runs on the nodes after the close: wait for it, up to the deadline — a short
    // one while shrinking, where every failing run would otherwise cost the full deadline.
    let deadline = if fx.dirty.load(Ordering::Relaxed) { SHRINK_DEADLINE } else { DEADLINE };
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let left = leftovers(fx, &names, &case_ids).await?;
        if left.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= end {
            bail!(
                "case {}: {DEADLINE:?} after every client closed, Redis still holds:\n  {}",
                names.label,
                left.join("\n  ")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn no_frame_sequence_leaks_subscriptions_or_presence() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let fx = rt.block_on(Fixture::start())?;
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(CASES);
    let config = ProptestConfig {
        cases,
        // Each run talks to real nodes: bound the shrinking, which still ends far smaller.
        max_shrink_iters: 400,
        max_shrink_time: SHRINK_TIME_MS,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let outcome = runner.run(&case(), |case| {
        rt.block_on(run_case(&fx, &case)).map_err(|e| {
            fx.dirty.store(true, Ordering::Relaxed);
            // The case goes into the reason: if shrinking never reproduces a failure, the
            // reason is all that is left of the case that failed.
            TestCaseError::fail(format!("{e:#}\nin case:\n{case:?}"))
        })
    });
    rt.block_on(async move { drop(fx) });
    match outcome {
        Ok(()) => Ok(()),
        // `why` holds the smallest case that failed (proptest's own value is not always it:
        // when no smaller case fails, shrinking can end on one that passed).
        Err(TestError::Fail(why, _)) => bail!("{why}"),
        Err(e) => bail!("{e}"),
    }
}
