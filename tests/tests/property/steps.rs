//! The steps of a property case, as proptest generates and shrinks them: each field a frame
//! can carry, in its valid and invalid shapes, and the strategies drawing them. Their `Debug`
//! is what a failure prints.

use proptest::prelude::*;

/// A `room` field.
#[derive(Debug, Clone, Copy)]
pub enum Room {
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
pub enum BadRoom {
    Empty,
    Blank,
    Spaced,
    NoBreakSpace,
    Control,
    TooLong,
}

#[derive(Debug, Clone, Copy)]
pub enum Text {
    Plain,
    Empty,
    Number,
    Missing,
}

#[derive(Debug, Clone, Copy)]
pub enum Name {
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
pub enum Resume {
    Missing,
    Null,
    Array,
    /// An object; a key repeated in the list is written once, the last point winning.
    Points(Vec<(Key, Point)>),
}

/// A key of the `rooms` object.
#[derive(Debug, Clone, Copy)]
pub enum Key {
    Valid(u8),
    Bad(BadRoom),
}

#[derive(Debug, Clone, Copy)]
pub enum Point {
    Seq(u8),
    SeqEpoch(u8),
    Negative,
    Text,
}

#[derive(Debug, Clone, Copy)]
pub enum Garbage {
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
pub enum Step {
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
    pub fn folded(mut self, clients: usize, nodes: usize) -> Self {
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

    pub fn client(&self) -> usize {
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

pub fn room() -> impl Strategy<Value = Room> {
    prop_oneof![
        8 => (0u8..3).prop_map(Room::Valid),
        2 => bad_room().prop_map(Room::Bad),
        1 => Just(Room::Number),
        1 => Just(Room::Null),
        1 => Just(Room::Missing),
    ]
}

pub fn bad_room() -> impl Strategy<Value = BadRoom> {
    proptest::sample::select(vec![
        BadRoom::Empty,
        BadRoom::Blank,
        BadRoom::Spaced,
        BadRoom::NoBreakSpace,
        BadRoom::Control,
        BadRoom::TooLong,
    ])
}

pub fn resume() -> impl Strategy<Value = Resume> {
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

pub fn step(clients: usize, nodes: usize) -> impl Strategy<Value = Step> {
    let c = 0..clients;
    let text = prop_oneof![
        4 => Just(Text::Plain),
        1 => Just(Text::Empty),
        1 => Just(Text::Number),
        1 => Just(Text::Missing),
    ];
    let name = proptest::sample::select(vec![
        Name::Plain,
        Name::Unicode,
        Name::Longest,
        Name::Empty,
        Name::TooLong,
        Name::Control,
        Name::Number,
        Name::Missing,
    ]);
    let garbage = proptest::sample::select(vec![
        Garbage::NotJson,
        Garbage::NotObject,
        Garbage::EmptyFrame,
        Garbage::NoType,
        Garbage::TypeNull,
        Garbage::TypeNumber,
        Garbage::UnknownType,
        Garbage::Binary,
        Garbage::Ping,
    ]);
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
