//! What a re-homing tunnel knows of its client, learnt from the frames it forwards — and the
//! frames it writes itself on a switch. No I/O here: [`Tracker`] is told of each whole frame
//! and says what to do with it.
//!
//! Reading is kept cheap. Node → client: only text frames are looked at, and a room
//! `message` (nearly all the traffic) is read without a parse: its `type` and `room` from
//! its head, its `seq` and `epoch` from its tail ([`MessageMeta`]); it is parsed only when
//! it may be the echo of one of this client's own messages still awaited. The rarer frames
//! (membership, answers) get a small borrowed parse. Client → node: a `message` frame is
//! unmasked and peeked ([`ClientPeek`]); one without a `msg_id` gets one (the only frame
//! ever re-encoded), so that a resend after a switch is published at most once.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};

use bytes::Bytes;
use serde::Deserialize;
use tether_proto::wire::{
    frame_type, message_room, ClientMsg, ClientPeek, Event, MessageMeta, ResumePoint, CLOSE_RESTART,
};

use super::wsframe::{close_code, encode, unmask, Header, OP_CLOSE, OP_TEXT};

/// Where the client stands in a room: the last message forwarded to it (or the room's head
/// when it joined).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    epoch: Option<Box<str>>,
    seq: u64,
}

/// A client `message` the node has not confirmed yet (no echo, `duplicate` or `error` naming
/// its `msg_id`): resent whole on a switch.
#[derive(Debug)]
struct Unconfirmed {
    /// The client frame's number (frames are numbered as they arrive), to resend in order.
    no: u64,
    msg_id: Box<str>,
    frame: Bytes,
}

/// What to do with a node's frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Down {
    Forward,
    /// Not for the client: a message it already has, or an answer to the balancer's own
    /// frames (the new node's `connected`, `resumed`, `duplicate` of a resend, `user_joined`
    /// of a re-join).
    Drop,
    /// The node closes 1012 (it is shutting down): move, do not forward.
    Switch,
    /// The node closes otherwise (or answers the client's close): forward, and the tunnel
    /// ends when the node hangs up.
    Closing,
    /// The node's `connected`, awaited after a switch: dropped, recorded.
    Connected,
}

/// A client frame as it goes to the node.
#[derive(Debug)]
pub struct Up {
    pub no: u64,
    pub frame: Bytes,
    /// Not taken from the queue again on a switch: a `message` awaiting its confirmation
    /// (resent from the unconfirmed list, if still unconfirmed), or a frame of the balancer's
    /// own (made anew for each node).
    pub tracked: bool,
}

/// The new node's `connected`, as a switch needs it.
#[derive(Debug, Default, Deserialize)]
struct ConnectedPeek {
    #[serde(default)]
    server: String,
    #[serde(default)]
    session: String,
    #[serde(default)]
    rooms: Vec<String>,
}

/// Fields of the rarer node frames that the tracker reads.
#[derive(Debug, Default, Deserialize)]
struct NodePeek<'a> {
    #[serde(default, borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    msg_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reason: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    epoch: Option<Cow<'a, str>>,
    #[serde(default)]
    head_seq: Option<u64>,
    #[serde(default)]
    complete: Option<bool>,
}

/// One tunnel's knowledge of its client.
#[derive(Debug)]
pub struct Tracker {
    client_id: Box<str>,
    /// `,"id":"CLIENT"` as it stands in a node's message head: a message carrying it may be
    /// an echo of this client's.
    id_needle: Box<str>,
    /// Random per tunnel: the balancer's `msg_id`s are `tb-NONCE-N`.
    nonce: Box<str>,
    next_msg_id: u64,
    next_frame: u64,
    /// Masking key of the frames the balancer writes to nodes.
    mask: [u8; 4],
    positions: HashMap<Box<str>, Position>,
    unconfirmed: VecDeque<Unconfirmed>,
    unconfirmed_bytes: usize,
    /// `msg_id`s the balancer resent: their `duplicate` is for it, not for the client.
    resent: HashSet<Box<str>>,
    /// Rooms the balancer resumed: their `resumed` is dropped when complete.
    resuming: HashSet<Box<str>>,
    /// Rooms the balancer joined again (a new node without the session): their own
    /// `user_joined` is dropped.
    rejoining: HashSet<Box<str>>,
    /// Waiting for a new node's `connected` (between a switch's 101 and it).
    awaiting_connected: Option<ConnectedPeek>,
    /// The node serving the client now, by its `connected`.
    pub server: Box<str>,
    /// The client sent a close frame: the node's answer and hang-up end the tunnel.
    pub client_closing: bool,
    /// Tokens of `refresh` frames the node has not answered yet, oldest first.
    refreshes: VecDeque<Box<str>>,
    /// The last token a node accepted in a `refresh`: a switch presents it instead of the one
    /// the client connected with (which may have expired since).
    pub token: Option<Box<str>>,
}

/// Refreshes awaiting their answer that a tracker keeps (a client sending more at once is
/// odd; the oldest are forgotten).
const MAX_PENDING_REFRESHES: usize = 4;

impl Tracker {
    pub fn new(client_id: &str) -> Self {
        let random = tether_proto::id::mint_client_id();
        let nonce: Box<str> = random[..16].into();
        let b = random.as_bytes();
        Self {
            id_needle: format!(",\"id\":{},", serde_json::to_string(client_id).unwrap_or_default()).into(),
            client_id: client_id.into(),
            nonce,
            next_msg_id: 0,
            next_frame: 0,
            mask: [b[16], b[17], b[18], b[19]],
            positions: HashMap::new(),
            unconfirmed: VecDeque::new(),
            unconfirmed_bytes: 0,
            resent: HashSet::new(),
            resuming: HashSet::new(),
            refreshes: VecDeque::new(),
            token: None,
            rejoining: HashSet::new(),
            awaiting_connected: None,
            server: "".into(),
            client_closing: false,
        }
    }

    /// Bytes of messages awaiting confirmation.
    pub fn unconfirmed_bytes(&self) -> usize {
        self.unconfirmed_bytes
    }

    /// A whole node frame (`payload` still as it came: node frames are not masked).
    pub fn on_node_frame(&mut self, h: &Header, payload: &[u8]) -> Down {
        if h.opcode == OP_CLOSE {
            let payload = unmask(payload, h.mask);
            return if close_code(&payload) == Some(CLOSE_RESTART) && !self.client_closing {
                Down::Switch
            } else {
                Down::Closing
            };
        }
        if h.opcode != OP_TEXT || !h.fin {
            return Down::Forward;
        }
        let payload = unmask(payload, h.mask);
        let Ok(text) = std::str::from_utf8(&payload) else { return Down::Forward };
        if self.is_awaiting_connected() {
            return self.on_connected(text);
        }
        match frame_type(text.as_bytes()) {
            Some(b"message") => self.on_message(text),
            Some(b"user_joined") => self.on_joined(text),
            Some(b"user_left") => self.on_left(text),
            Some(b"duplicate") => self.on_duplicate(text),
            Some(b"error") => {
                let p = peek(text);
                if let Some(msg_id) = p.msg_id {
                    self.confirm(&msg_id);
                } else if p.code.as_deref() == Some("unauthorized") {
                    // The answer to the oldest refresh (a refused one), or to something else
                    // when none is pending.
                    self.refreshes.pop_front();
                }
                Down::Forward
            }
            Some(b"refreshed") => {
                if let Some(token) = self.refreshes.pop_front() {
                    self.token = Some(token);
                }
                Down::Forward
            }
            Some(b"resumed") => self.on_resumed(text),
            Some(b"connected") => {
                if let Ok(c) = serde_json::from_str::<ConnectedPeek>(text) {
                    self.server = c.server.into();
                }
                Down::Forward
            }
            _ => Down::Forward,
        }
    }

    fn on_message(&mut self, text: &str) -> Down {
        let (Some(meta), Some(room)) = (MessageMeta::read(text), message_room(text)) else { return Down::Forward };
        let room = unescaped(room);
        match self.positions.get_mut(room.as_ref()) {
            Some(p) if p.epoch.as_deref() == Some(meta.epoch) && meta.seq <= p.seq => return Down::Drop,
            Some(p) => *p = Position { epoch: Some(meta.epoch.into()), seq: meta.seq },
            None => {
                self.positions.insert(room.into(), Position { epoch: Some(meta.epoch.into()), seq: meta.seq });
            }
        }
        if !self.unconfirmed.is_empty() && text.contains(&*self.id_needle) {
            #[derive(Deserialize)]
            struct Echo<'a> {
                #[serde(borrow)]
                id: Cow<'a, str>,
                #[serde(default, borrow)]
                msg_id: Option<Cow<'a, str>>,
            }
            if let Ok(Echo { id, msg_id: Some(msg_id) }) = serde_json::from_str::<Echo>(text) {
                if *id == *self.client_id {
                    // Its `msg_id` stays in `resent`: when the dead node had published it, this
                    // echo comes in the replay and the node's `duplicate` answer to the resend
                    // follows — for the balancer, not the client.
                    self.confirm(&msg_id);
                }
            }
        }
        Down::Forward
    }

    fn on_joined(&mut self, text: &str) -> Down {
        let p = peek(text);
        let (Some(room), true) = (p.room, p.id.as_deref() == Some(&*self.client_id)) else { return Down::Forward };
        let seq = p.head_seq.unwrap_or(0);
        let epoch = p.epoch.map(|e| Box::from(e.as_ref()));
        // A join the balancer made: it knows the room already; the client need not hear.
        let ours = self.rejoining.remove(room.as_ref());
        self.positions.entry(room.as_ref().into()).or_insert(Position { epoch, seq });
        if ours {
            Down::Drop
        } else {
            Down::Forward
        }
    }

    fn on_left(&mut self, text: &str) -> Down {
        let p = peek(text);
        if let (Some(room), true) = (p.room, p.id.as_deref() == Some(&*self.client_id)) {
            // Its own leave (or the API's removal); a `disconnected`/`node_down` is about a
            // connection that is gone, not a membership.
            if matches!(p.reason.as_deref(), Some("left" | "removed")) {
                self.positions.remove(room.as_ref());
            }
        }
        Down::Forward
    }

    fn on_duplicate(&mut self, text: &str) -> Down {
        let Some(msg_id) = peek(text).msg_id else { return Down::Forward };
        self.confirm(&msg_id);
        if self.resent.remove(msg_id.as_ref()) {
            Down::Drop
        } else {
            Down::Forward
        }
    }

    fn on_resumed(&mut self, text: &str) -> Down {
        let p = peek(text);
        match p.room {
            // A gap is reported, never hidden: an incomplete replay reaches the client.
            Some(room) if self.resuming.remove(room.as_ref()) && p.complete != Some(false) => Down::Drop,
            _ => Down::Forward,
        }
    }

    fn on_connected(&mut self, text: &str) -> Down {
        if frame_type(text.as_bytes()) != Some(b"connected") {
            // Whatever a node says before `connected` (nothing, normally) is not dropped.
            return Down::Forward;
        }
        let mut c = serde_json::from_str::<ConnectedPeek>(text).unwrap_or_default();
        if c.session.is_empty() {
            c.session = "new".into();
        }
        self.awaiting_connected = Some(c);
        Down::Connected
    }

    fn confirm(&mut self, msg_id: &str) {
        if let Some(at) = self.unconfirmed.iter().position(|u| &*u.msg_id == msg_id) {
            if let Some(u) = self.unconfirmed.remove(at) {
                self.unconfirmed_bytes -= u.frame.len();
            }
        }
    }

    /// A whole client frame, as it came (masked), numbered and ready for the node. Every frame
    /// but a `message` goes on unchanged and untracked; a `message` is tracked until
    /// confirmed, and gets a `msg_id` when it has none.
    pub fn on_client_frame(&mut self, h: &Header, frame: &[u8]) -> Up {
        let no = self.next_frame;
        self.next_frame += 1;
        if h.opcode == OP_CLOSE {
            self.client_closing = true;
        }
        let plain = |frame: &[u8]| Up { no, frame: Bytes::copy_from_slice(frame), tracked: false };
        if h.opcode != OP_TEXT || !h.fin {
            return plain(frame);
        }
        let payload = unmask(&frame[h.header_len..], h.mask);
        let Ok(text) = std::str::from_utf8(&payload) else { return plain(frame) };
        let Some(peek) = ClientPeek::read(text) else { return plain(frame) };
        if peek.kind == "refresh" {
            self.on_refresh(peek.token.as_deref());
            return plain(frame);
        }
        if peek.kind != "message" {
            return plain(frame);
        }
        let (msg_id, frame) = match (peek.message_msg_id(), &peek.msg_id) {
            (Some(id), _) => (Box::from(id), Bytes::copy_from_slice(frame)),
            // An invalid `msg_id`: the node refuses the message; nothing to track.
            (None, Some(_)) => return plain(frame),
            (None, None) => {
                let Some(close) = text.rfind('}') else { return plain(frame) };
                let id = format!("tb-{}-{}", self.nonce, self.next_msg_id);
                self.next_msg_id += 1;
                // Appended last, so that it is the one a JSON reader keeps.
                let rewritten = format!("{},\"msg_id\":\"{id}\"}}", &text[..close]);
                let mask = h.mask.unwrap_or(self.mask);
                (id.into(), Bytes::from(encode(OP_TEXT, rewritten.as_bytes(), Some(mask))))
            }
        };
        self.unconfirmed_bytes += frame.len();
        self.unconfirmed.push_back(Unconfirmed { no, msg_id, frame: frame.clone() });
        Up { no, frame, tracked: true }
    }

    /// A client's `refresh`: its token awaits the node's answer. Only a token that can stand
    /// in a URL as it is (a JWT's base64url parts and dots) is kept: one that cannot would
    /// not verify anyway.
    fn on_refresh(&mut self, token: Option<&str>) {
        let Some(token) = token else { return };
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=');
        if token.is_empty() || !token.chars().all(plain) {
            return;
        }
        if self.refreshes.len() == MAX_PENDING_REFRESHES {
            self.refreshes.pop_front();
        }
        self.refreshes.push_back(token.into());
    }

    /// A new node answered 101: its `connected` is awaited (an empty `session` marks it
    /// not arrived yet), and what the balancer asked of the node before is forgotten.
    pub fn expect_connected(&mut self) {
        self.awaiting_connected = Some(ConnectedPeek::default());
        self.resent.clear();
        self.resuming.clear();
        self.rejoining.clear();
    }

    /// Whether the awaited `connected` came.
    pub fn take_connected(&mut self) -> Option<(String, bool, Vec<String>)> {
        let c = self.awaiting_connected.take_if(|c| !c.session.is_empty())?;
        Some((c.server, c.session == "restored", c.rooms))
    }

    pub fn is_awaiting_connected(&self) -> bool {
        self.awaiting_connected.as_ref().is_some_and(|c| c.session.is_empty())
    }

    /// The frames that start the new node's conversation, once its `connected` came: joins of
    /// rooms it did not restore, one `resume` of every room, then every unconfirmed message
    /// and every other client frame not yet (wholly) written, in the client's order. `queue`
    /// (the client frames not written to the old node, and those held since) is replaced.
    /// Also returns the `rehomed` frame for the client, and how many messages are resent.
    pub fn restart(&mut self, server: String, restored: &[String], queue: &mut VecDeque<Up>) -> (Vec<u8>, usize) {
        let from = self.server.clone();
        let mut start = Vec::new();
        let mut rooms: Vec<String> = self.positions.keys().map(|r| r.to_string()).collect();
        rooms.sort_unstable();
        for room in &rooms {
            if !restored.contains(room) {
                let join = ClientMsg::Join { room: room.clone() }.to_json();
                start.push(Up { no: 0, frame: self.to_node(&join), tracked: true });
                self.rejoining.insert(room.as_str().into());
            }
        }
        if !rooms.is_empty() {
            let points = rooms
                .iter()
                .map(|r| {
                    let p = &self.positions[r.as_str()];
                    (r.clone(), ResumePoint { seq: p.seq, epoch: p.epoch.as_deref().map(str::to_owned) })
                })
                .collect();
            let resume = ClientMsg::Resume { rooms: points }.to_json();
            start.push(Up { no: 0, frame: self.to_node(&resume), tracked: true });
            self.resuming = rooms.iter().map(|r| Box::from(r.as_str())).collect();
        }
        // Everything the node may not have: unconfirmed messages (written or not) and the
        // untracked frames still queued (a partly written one is sent again whole).
        let mut again: Vec<Up> =
            self.unconfirmed.iter().map(|u| Up { no: u.no, frame: u.frame.clone(), tracked: true }).collect();
        again.extend(queue.drain(..).filter(|u| !u.tracked));
        again.sort_by_key(|u| u.no);
        self.resent = self.unconfirmed.iter().map(|u| u.msg_id.clone()).collect();
        queue.extend(start);
        queue.extend(again);
        let rooms = rooms.iter().map(String::as_str).collect();
        let rehomed = Event::Rehomed { from: &from, server: &server, rooms }.to_json();
        self.server = server.into();
        (encode(OP_TEXT, rehomed.as_bytes(), None), self.resent.len())
    }

    /// A text frame from the balancer to a node, masked.
    fn to_node(&self, text: &str) -> Bytes {
        Bytes::from(encode(OP_TEXT, text.as_bytes(), Some(self.mask)))
    }
}

/// A room name as a message head spells it, with JSON escapes resolved (names with a `"` or
/// `\` are rare; the rest are used as they stand).
fn unescaped(raw: &str) -> Cow<'_, str> {
    if raw.contains('\\') {
        serde_json::from_str::<String>(&format!("\"{raw}\"")).map_or(Cow::Borrowed(raw), Cow::Owned)
    } else {
        Cow::Borrowed(raw)
    }
}

fn peek(text: &str) -> NodePeek<'_> {
    serde_json::from_str(text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::rehome::wsframe::header;

    const MASK: [u8; 4] = [9, 8, 7, 6];

    /// A client's text frame (masked), and its header.
    fn client_frame(text: &str) -> (Header, Vec<u8>) {
        let frame = encode(OP_TEXT, text.as_bytes(), Some(MASK));
        (header(&frame).unwrap(), frame)
    }

    /// What a node frame does to the tracker.
    fn node(t: &mut Tracker, text: &str) -> Down {
        let frame = encode(OP_TEXT, text.as_bytes(), None);
        let h = header(&frame).unwrap();
        t.on_node_frame(&h, &frame[h.header_len..])
    }

    fn message(room: &str, id: &str, msg_id: &str, seq: u64) -> String {
        format!(
            r#"{{"type":"message","room":"{room}","from":"{id}","id":"{id}","text":"t","server":"n1","timestamp":1,"msg_id":"{msg_id}","seq":{seq},"epoch":"E"}}"#
        )
    }

    /// The JSON text of a frame the tracker made for a node.
    fn text_of(frame: &[u8]) -> String {
        let h = header(frame).unwrap();
        String::from_utf8(unmask(&frame[h.header_len..], h.mask).into_owned()).unwrap()
    }

    #[test]
    fn a_message_without_msg_id_gets_one_and_stays_unconfirmed_until_its_echo() {
        let mut t = Tracker::new("alice");
        let (h, frame) = client_frame(r#"{"type":"message","room":"g","text":"hi"} "#);
        let up = t.on_client_frame(&h, &frame);
        assert!(up.tracked);
        let sent: serde_json::Value = serde_json::from_str(&text_of(&up.frame)).unwrap();
        let msg_id = sent["msg_id"].as_str().unwrap().to_string();
        assert!(msg_id.starts_with("tb-"), "{sent}");
        assert_eq!((sent["room"].as_str(), sent["text"].as_str()), (Some("g"), Some("hi")));
        assert!(t.unconfirmed_bytes() > 0);
        // Someone else's message with that msg_id confirms nothing; its own echo does.
        assert_eq!(node(&mut t, &message("g", "bob", &msg_id, 1)), Down::Forward);
        assert!(t.unconfirmed_bytes() > 0);
        assert_eq!(node(&mut t, &message("g", "alice", &msg_id, 2)), Down::Forward);
        assert_eq!(t.unconfirmed_bytes(), 0);
        // A frame with its own valid msg_id goes on unchanged; other frames are untracked.
        let (h, frame) = client_frame(r#"{"type":"message","room":"g","text":"x","msg_id":"m-1"}"#);
        let up = t.on_client_frame(&h, &frame);
        assert!(up.tracked && up.frame[..] == frame[..]);
        let (h, frame) = client_frame(r#"{"type":"join","room":"h"}"#);
        assert!(!t.on_client_frame(&h, &frame).tracked);
        // An error naming it settles it too.
        assert_eq!(
            node(&mut t, r#"{"type":"error","code":"rate_limited","message":"m","msg_id":"m-1"}"#),
            Down::Forward
        );
        assert_eq!(t.unconfirmed_bytes(), 0);
    }

    #[test]
    fn a_refreshed_token_counts_once_a_node_accepted_it() {
        let mut t = Tracker::new("alice");
        let refresh = |t: &mut Tracker, token: &str| {
            let (h, frame) = client_frame(&format!(r#"{{"type":"refresh","token":"{token}"}}"#));
            assert!(!t.on_client_frame(&h, &frame).tracked);
        };
        refresh(&mut t, "first.ok");
        assert_eq!(t.token, None, "not before the answer");
        assert_eq!(node(&mut t, r#"{"type":"refreshed","exp":99}"#), Down::Forward);
        assert_eq!(t.token.as_deref(), Some("first.ok"));
        // A refused refresh changes nothing; answers pair with refreshes in order.
        refresh(&mut t, "bad.sig");
        refresh(&mut t, "second.ok");
        node(&mut t, r#"{"type":"error","code":"unauthorized","message":"signature"}"#);
        assert_eq!(t.token.as_deref(), Some("first.ok"));
        node(&mut t, r#"{"type":"refreshed","exp":100}"#);
        assert_eq!(t.token.as_deref(), Some("second.ok"));
        // A token that could not stand in a URL as it is is not kept.
        refresh(&mut t, "a&b=c");
        node(&mut t, r#"{"type":"refreshed","exp":101}"#);
        assert_eq!(t.token.as_deref(), Some("second.ok"));
    }

    #[test]
    fn messages_at_or_below_a_rooms_position_are_dropped() {
        let mut t = Tracker::new("alice");
        assert_eq!(node(&mut t, &message("g", "bob", "a", 5)), Down::Forward);
        assert_eq!(node(&mut t, &message("g", "bob", "b", 5)), Down::Drop);
        assert_eq!(node(&mut t, &message("g", "bob", "c", 4)), Down::Drop);
        assert_eq!(node(&mut t, &message("g", "bob", "d", 6)), Down::Forward);
        // Another epoch starts over.
        let other = message("g", "bob", "e", 1).replace("\"E\"", "\"F\"");
        assert_eq!(node(&mut t, &other), Down::Forward);
    }

    #[test]
    fn a_switch_resumes_rooms_resends_in_order_and_hides_its_own_answers() {
        let mut t = Tracker::new("alice");
        node(&mut t, r#"{"type":"connected","server":"n1","id":"alice","session":"new","name":null,"rooms":[]}"#);
        node(
            &mut t,
            r#"{"type":"user_joined","room":"quiet","user":"alice","id":"alice","server":"n1","head_seq":3,"epoch":"Q"}"#,
        );
        node(&mut t, &message("g", "bob", "x", 7));
        let mut queue = VecDeque::new();
        for text in [
            r#"{"type":"message","room":"g","text":"one","msg_id":"m-1"}"#,
            r#"{"type":"set_name","name":"Al"}"#,
            r#"{"type":"message","room":"g","text":"two","msg_id":"m-2"}"#,
        ] {
            let (h, frame) = client_frame(text);
            queue.push_back(t.on_client_frame(&h, &frame));
        }
        // The first message was written to the old node; the rest were still queued.
        queue.pop_front();
        t.expect_connected();
        assert!(t.is_awaiting_connected());
        let connected =
            r#"{"type":"connected","server":"n2","id":"alice","session":"restored","name":null,"rooms":["g"]}"#;
        assert_eq!(node(&mut t, connected), Down::Connected);
        let (server, restored, rooms) = t.take_connected().unwrap();
        assert!(restored);
        let (rehomed, resent) = t.restart(server, &rooms, &mut queue);
        assert_eq!(resent, 2);
        let texts: Vec<String> = queue.iter().map(|u| text_of(&u.frame)).collect();
        // "quiet" was not restored: joined again, then every room resumed, then the
        // client's frames in its order.
        assert_eq!(texts[0], r#"{"type":"join","room":"quiet"}"#);
        assert_eq!(texts[1], r#"{"type":"resume","rooms":{"g":{"seq":7,"epoch":"E"},"quiet":{"seq":3,"epoch":"Q"}}}"#);
        assert!(
            texts[2].contains("\"one\"") && texts[3].contains("set_name") && texts[4].contains("\"two\""),
            "{texts:?}"
        );
        assert_eq!(texts.len(), 5);
        assert_eq!(text_of(&rehomed), r#"{"type":"rehomed","from":"n1","server":"n2","rooms":["g","quiet"]}"#);
        // The node's answers to the balancer's own frames stay with it; a gap does not.
        let joined = r#"{"type":"user_joined","room":"quiet","user":"alice","id":"alice","server":"n2","head_seq":3,"epoch":"Q"}"#;
        assert_eq!(node(&mut t, joined), Down::Drop);
        // m-1 had been published by the old node: its echo comes in the replay, then the
        // answer to the resend.
        assert_eq!(node(&mut t, &message("g", "alice", "m-1", 8)), Down::Forward);
        assert_eq!(node(&mut t, r#"{"type":"duplicate","room":"g","msg_id":"m-1","seq":8,"epoch":"E"}"#), Down::Drop);
        assert_eq!(
            node(&mut t, r#"{"type":"resumed","room":"g","from_seq":8,"to_seq":8,"epoch":"E","complete":true}"#),
            Down::Drop
        );
        assert_eq!(
            node(&mut t, r#"{"type":"resumed","room":"quiet","from_seq":4,"to_seq":9,"epoch":"Q","complete":false}"#),
            Down::Forward
        );
        // A second switch resends what is still unconfirmed (m-2), once.
        let mut queue = VecDeque::new();
        t.expect_connected();
        node(&mut t, connected);
        let (server, _, rooms) = t.take_connected().unwrap();
        let (_, resent) = t.restart(server, &rooms, &mut queue);
        assert_eq!(resent, 1);
        assert_eq!(queue.iter().filter(|u| text_of(&u.frame).contains("\"two\"")).count(), 1);
    }

    #[test]
    fn a_nodes_1012_switches_unless_the_client_is_closing() {
        let mut t = Tracker::new("alice");
        let close = encode(OP_CLOSE, &[0x03, 0xf4], None);
        let h = header(&close).unwrap();
        assert_eq!(t.on_node_frame(&h, &close[2..]), Down::Switch);
        let other = encode(OP_CLOSE, &[0x03, 0xf0], None);
        assert_eq!(t.on_node_frame(&header(&other).unwrap(), &other[2..]), Down::Closing);
        let (h, frame) = {
            let f = encode(OP_CLOSE, &[0x03, 0xe8], Some(MASK));
            (header(&f).unwrap(), f)
        };
        t.on_client_frame(&h, &frame);
        assert_eq!(t.on_node_frame(&header(&close).unwrap(), &close[2..]), Down::Closing);
    }
}
