//! The room protocols the load generator speaks over [`wsraw`]: Tether's own JSON frames, and
//! Socket.IO 4 (Engine.IO v4 over a WebSocket), so that `tether bench fanout --steady --vs
//! socketio` drives both systems with the same clients and measures them the same way.
//!
//! Socket.IO, as far as the bench needs it: the upgrade is `GET
//! /socket.io/?EIO=4&transport=websocket`; the server's first frame is the Engine.IO open
//! packet `0{"sid":…}`, the client connects to the default namespace with `40` and the server
//! answers `40{"sid":…}`; events are `42["name",payload]`; the server pings with `2` and
//! expects `3`. The bench's server (`bench/socketio/server.js`) answers `join` with `joined`
//! once the socket is in the room and re-emits `message` to the whole room.
//!
//! Message texts are `t=MICROS;s=SEQ;` padded with `x`: the send time (for latency) and a
//! sequence number over all rooms of one run (message `s` goes to room `s % rooms`), by which
//! every delivery is accounted for.

use super::tls::ClientTls;
use super::wsraw::{self, Upgraded, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use tether_proto::wire;

/// Read size while connecting.
const READ_CHUNK: usize = 8192;

/// Which server a load-generator client talks to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// A Tether node or balancer (`/ws?client=ID`, JSON frames).
    #[default]
    Tether,
    /// A Socket.IO 4 server (Engine.IO v4, WebSocket transport only).
    SocketIo,
}

impl Protocol {
    /// The upgrade request's path for client `id`.
    pub fn path(self, id: &str) -> String {
        match self {
            Self::Tether => format!("/ws?client={id}"),
            Self::SocketIo => "/socket.io/?EIO=4&transport=websocket".to_owned(),
        }
    }

    /// Connects, does the protocol's handshake and, with `room`, joins it; returns once the
    /// server confirmed the join (Tether: the client's own `user_joined`; Socket.IO: `joined`).
    pub async fn open(
        self,
        target: SocketAddr,
        source: Option<IpAddr>,
        id: &str,
        room: Option<&str>,
        i: u64,
    ) -> Result<Upgraded> {
        self.open_with(target, source, id, room, i, None).await
    }

    /// [`Protocol::open`], over TLS when `tls` is given.
    pub async fn open_with(
        self,
        target: SocketAddr,
        source: Option<IpAddr>,
        id: &str,
        room: Option<&str>,
        i: u64,
        tls: Option<&ClientTls>,
    ) -> Result<Upgraded> {
        let (mut up, _) = wsraw::connect_with(target, source, &self.path(id), tls).await?;
        match self {
            Self::Tether => {
                if let Some(room) = room {
                    join_tether(&mut up, id, room, i).await?;
                }
            }
            Self::SocketIo => {
                wait_for(&mut up, i, |p| p.first() == Some(&b'0'), "the Engine.IO open packet").await?;
                send(&mut up, b"40", i).await?;
                wait_for(&mut up, i, |p| p.starts_with(b"40"), "the namespace connect answer").await?;
                if let Some(room) = room {
                    let join = serde_json::to_string(&("join", room))?;
                    send(&mut up, format!("42{join}").as_bytes(), i).await?;
                    let joined = format!("42{}", serde_json::to_string(&("joined", room))?);
                    wait_for(&mut up, i, |p| p == joined.as_bytes(), "`joined`").await?;
                }
            }
        }
        Ok(up)
    }

    /// Whether a text frame is a room message.
    pub fn is_message(self, payload: &[u8]) -> bool {
        match self {
            Self::Tether => wire::frame_type(payload) == Some(&b"message"[..]),
            Self::SocketIo => payload.starts_with(b"42[\"message\","),
        }
    }

    /// What to answer to a text frame that is a protocol-level ping (Engine.IO `2`).
    pub fn pong_for(self, payload: &[u8]) -> Option<&'static [u8]> {
        (self == Self::SocketIo && payload == b"2").then_some(b"3")
    }

    /// The text payload of a frame publishing `text` to `room`.
    pub fn message(self, room: &str, text: &str) -> String {
        match self {
            Self::Tether => wire::ClientMsg::text(room, text).to_json(),
            Self::SocketIo => format!(r#"42["message",{{"room":"{room}","text":"{text}"}}]"#),
        }
    }

    /// The name people read in reports.
    pub fn label(self) -> &'static str {
        match self {
            Self::Tether => "tether",
            Self::SocketIo => "socketio",
        }
    }
}

/// A message text for sequence number `seq` sent at `micros`: `t=MICROS;s=SEQ;` padded with `x`
/// to `len` bytes.
pub fn text(micros: u64, seq: u64, len: usize) -> String {
    let mut s = format!("t={micros};s={seq};");
    while s.len() < len {
        s.push('x');
    }
    s
}

/// Send time and sequence number of a frame carrying `"text":"t=MICROS;s=SEQ;…"` (the sequence
/// number is `None` for texts without one, as `tether bench fanout`'s rising rates send).
pub fn stamp_and_seq(frame: &[u8]) -> Option<(u64, Option<u64>)> {
    let at = wsraw::find(frame, b"\"text\":\"t=")? + 10;
    let (sent, rest) = number(&frame[at..])?;
    let seq = rest.strip_prefix(b";s=").and_then(|r| number(r)).map(|(n, _)| n);
    Some((sent, seq))
}

fn number(b: &[u8]) -> Option<(u64, &[u8])> {
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    let n = std::str::from_utf8(&b[..digits]).ok()?.parse().ok()?;
    Some((n, &b[digits..]))
}

/// Sends `join` and reads until this client's own `user_joined`.
async fn join_tether(up: &mut Upgraded, id: &str, room: &str, i: u64) -> Result<()> {
    let mut out = Vec::with_capacity(64);
    let join = wire::ClientMsg::Join { room: room.to_owned() }.to_json();
    wsraw::encode(&mut out, OP_TEXT, join.as_bytes(), Some(wsraw::mask_for(i)));
    wsraw::send(&mut up.stream, &out).await?;
    let mine = format!("\"id\":\"{id}\"");
    loop {
        while let Some(f) = up.decoder.next_frame()? {
            let p = up.decoder.payload(&f);
            if f.opcode == OP_CLOSE {
                bail!("closed while joining");
            }
            if wire::frame_type(p) == Some(&b"user_joined"[..]) && wsraw::find(p, mine.as_bytes()).is_some() {
                return Ok(());
            }
            if wire::frame_type(p) == Some(&b"error"[..]) {
                bail!("join refused: {}", String::from_utf8_lossy(p));
            }
        }
        if up.decoder.read_from(&mut up.stream, READ_CHUNK).await? == 0 {
            bail!("closed while joining");
        }
    }
}

async fn send(up: &mut Upgraded, payload: &[u8], i: u64) -> Result<()> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    wsraw::encode(&mut out, OP_TEXT, payload, Some(wsraw::mask_for(i)));
    wsraw::send(&mut up.stream, &out).await?;
    Ok(())
}

/// Reads frames (answering pings of both layers) until one whose payload satisfies `done`.
async fn wait_for(up: &mut Upgraded, i: u64, done: impl Fn(&[u8]) -> bool, what: &str) -> Result<()> {
    loop {
        let mut reply = Vec::new();
        while let Some(f) = up.decoder.next_frame()? {
            let p = up.decoder.payload(&f);
            match f.opcode {
                OP_CLOSE => bail!("closed while waiting for {what}"),
                OP_PING => wsraw::encode(&mut reply, OP_PONG, p, Some(wsraw::mask_for(i))),
                OP_TEXT if done(p) => {
                    if !reply.is_empty() {
                        wsraw::send(&mut up.stream, &reply).await?;
                    }
                    return Ok(());
                }
                OP_TEXT if p == b"2" => wsraw::encode(&mut reply, OP_TEXT, b"3", Some(wsraw::mask_for(i))),
                OP_TEXT if p.starts_with(b"44") => bail!("refused: {}", String::from_utf8_lossy(p)),
                _ => {}
            }
        }
        if !reply.is_empty() {
            wsraw::send(&mut up.stream, &reply).await?;
        }
        if up.decoder.read_from(&mut up.stream, READ_CHUNK).await? == 0 {
            bail!("closed while waiting for {what}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_carry_stamp_and_sequence_number() {
        let t = text(1_700_000_000_123_456, 42, 64);
        assert_eq!(t.len(), 64);
        for p in [Protocol::Tether, Protocol::SocketIo] {
            let frame = p.message("room-1", &t);
            assert!(p.is_message(frame.as_bytes()), "{frame}");
            assert_eq!(stamp_and_seq(frame.as_bytes()), Some((1_700_000_000_123_456, Some(42))));
        }
        assert_eq!(stamp_and_seq(br#"{"text":"t=17;xxxx"}"#), Some((17, None)));
        assert_eq!(stamp_and_seq(br#"{"text":"hello"}"#), None);
        assert!(!Protocol::Tether.is_message(b"42[\"message\",{}]"));
        assert_eq!(Protocol::SocketIo.pong_for(b"2"), Some(&b"3"[..]));
        assert_eq!(Protocol::Tether.pong_for(b"2"), None);
    }
}
