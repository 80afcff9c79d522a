//! Every text frame a client sends goes through `wire::decode` before anything else looks at
//! it, so it must take any input without panicking, and whatever it accepts must already obey
//! the rules the rest of the node relies on (room names become Redis keys and channel names,
//! display names end up in every member's frames).
//!
//! Asserted, for any input that is UTF-8 (a WebSocket text frame always is):
//! - `decode` returns instead of panicking;
//! - an `Ok` message re-validates: every room passes `validate_room`, a name `validate_name`;
//! - an `Ok` message survives a round trip: encoded back to JSON with `ClientMsg::to_json` (what
//!   clients send), it decodes to the same value (catches a decoder that accepts a field it
//!   then reads differently, and an encoder that writes what the decoder reads otherwise);
//! - an `Err` carries a message for humans.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::wire::{decode, validate_name, validate_room, ClientMsg};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let msg = match decode(text) {
        Ok(msg) => msg,
        Err(e) => {
            assert!(!e.message.is_empty(), "error {:?} without a message for {text:?}", e.code);
            return;
        }
    };
    for room in rooms_of(&msg) {
        if let Err(e) = validate_room(room) {
            panic!("decode accepted room {room:?} that validate_room refuses ({e}); input {text:?}");
        }
    }
    if let ClientMsg::SetName { name } = &msg {
        if let Err(e) = validate_name(name) {
            panic!("decode accepted name {name:?} that validate_name refuses ({e}); input {text:?}");
        }
    }
    let again = msg.to_json();
    match decode(&again) {
        Ok(back) => assert_eq!(sorted(back), sorted(msg.clone()), "round trip of {text:?} via {again:?}"),
        Err(e) => panic!("{msg:?} decoded from {text:?} does not decode again from {again:?}: {e}"),
    }
});

fn rooms_of(msg: &ClientMsg) -> Vec<&str> {
    match msg {
        ClientMsg::Join { room }
        | ClientMsg::Leave { room }
        | ClientMsg::Presence { room }
        | ClientMsg::Message { room, .. } => vec![room.as_str()],
        ClientMsg::Resume { rooms } => rooms.iter().map(|(r, _)| r.as_str()).collect(),
        ClientMsg::SetName { .. } | ClientMsg::Online | ClientMsg::Refresh { .. } => Vec::new(),
    }
}

/// Resume points in a canonical order: the decoder's order follows the JSON map's.
fn sorted(msg: ClientMsg) -> ClientMsg {
    match msg {
        ClientMsg::Resume { mut rooms } => {
            rooms.sort_by(|a, b| a.0.cmp(&b.0));
            ClientMsg::Resume { rooms }
        }
        other => other,
    }
}
