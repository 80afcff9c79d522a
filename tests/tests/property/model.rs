//! The model of the protocol a property case checks against: a case's names, the frame each
//! step sends (malformed ones included), and which errors and answers each step deserves
//! given the clients' sessions (decoder field order, membership, the session's rooms and
//! name).

use super::steps::*;
use super::{MAX_CLIENTS, MAX_STEPS, NODES};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use tether_proto::wire::{MAX_NAME_CHARS, MAX_ROOM_LEN};
use tether_tests::WsClient;
use tokio_tungstenite::tungstenite::Message;

/// One case: how many nodes, each client's first node, and the steps.
#[derive(Clone)]
pub struct Case {
    pub nodes: usize,
    pub homes: Vec<usize>,
    pub steps: Vec<Step>,
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

/// Drawn without `prop_flat_map` (whose shrinking can end on a value that passed): indices
/// are drawn for the largest case and folded into this one's client and node counts, so a
/// shrunk case prints the indices it really uses.
pub fn case() -> impl Strategy<Value = Case> {
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

/// A case's client ids and room names, all carrying the case's label.
pub struct Names {
    pub label: String,
}

impl Names {
    pub fn new(label: &str) -> Self {
        Self { label: label.to_string() }
    }

    pub fn client(&self, i: usize) -> String {
        format!("p{}-c{i}", self.label)
    }

    pub fn room(&self, i: u8) -> String {
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

    pub fn rooms(&self) -> [String; 3] {
        [self.room(0), self.room(1), self.room(2)]
    }

    /// Asked for after every step; nobody ever joins it.
    pub fn barrier(&self) -> String {
        format!("p{}.barrier", self.label)
    }
}

pub fn bad_room_name(b: BadRoom) -> String {
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
pub fn room_fault(room: Room) -> Option<&'static str> {
    match room {
        Room::Valid(_) => None,
        Room::Bad(_) => Some("invalid_room"),
        Room::Number => Some("invalid_field"),
        Room::Null | Room::Missing => Some("missing_field"),
    }
}

pub fn put_room(obj: &mut Map<String, Value>, room: Room, names: &Names) {
    let v = match room {
        Room::Valid(i) => json!(names.room(i)),
        Room::Bad(b) => json!(bad_room_name(b)),
        Room::Number => json!(5),
        Room::Null => Value::Null,
        Room::Missing => return,
    };
    obj.insert("room".into(), v);
}

pub fn object(kind: &str) -> Map<String, Value> {
    let mut obj = Map::new();
    obj.insert("type".into(), json!(kind));
    obj
}

/// The `rooms` object of a resume, deduplicated as JSON would be (last key wins).
pub fn resume_points(points: &[(Key, Point)], names: &Names) -> BTreeMap<String, Point> {
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

/// The frame a step sends, if it sends one. Built field by field as JSON on purpose, not
/// through `ClientMsg`: a step's fields may be missing, mistyped or invalid, which no client
/// library can encode.
pub fn frame_of(step: &Step, names: &Names) -> Option<Message> {
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
pub enum Answer {
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
pub struct Expect {
    pub errors: Vec<Vec<&'static str>>,
    pub answers: Vec<Answer>,
}

impl Expect {
    pub fn error(code: &'static str) -> Self {
        Self { errors: vec![vec![code]], answers: Vec::new() }
    }
}

/// One client slot: its connection (if any) and what the model says about its session.
pub struct Slot {
    pub id: String,
    pub ws: Option<WsClient>,
    /// Rooms of the session: the connection is in them while connected, and gets them back
    /// when it reconnects.
    pub rooms: BTreeSet<String>,
    pub name: Option<String>,
    /// Whether anything was saved to the id's session (a join, a leave, a name).
    pub has_session: bool,
}

/// Applies a frame step to the model and says what it deserves.
pub fn expect(step: &Step, me: usize, slots: &mut [Slot], names: &Names) -> Expect {
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
