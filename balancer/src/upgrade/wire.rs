//! The hand-off format: what the old and the new process say to each other over the upgrade's
//! Unix socket, and the descriptors that travel with it (`SCM_RIGHTS`).
//!
//! The socket is `SOCK_SEQPACKET`, so every message arrives whole and alone, with exactly the
//! descriptors sent with it. A message is
//!
//! ```text
//! magic "TBHO" (4 bytes) | version u16 BE | kind u8 | 0 u8 | meta_len u32 BE | meta | blob
//! ```
//!
//! `meta` is a JSON object (fields per kind, below; unknown fields are ignored, so a release may
//! add some within one version), `blob` raw bytes that `meta` points into by `[offset, len]`
//! (a tunnel's bytes in flight), and descriptors are referred to by their index in the
//! message's `SCM_RIGHTS` list. A receiver refuses a version it does not know with an error
//! naming both, and so does the old process: release N+1 reads every version up to its own.
//!
//! Kinds (old → new unless said): 1 `hello` {generation, from_pid, draining} with the client
//! and the admin listener (descriptors 0 and 1); 2 `ready` {pid} (new → old: serving, send the
//! tunnels); 3 `tunnels` {batch, tunnels: [{client_fd, node_fd, to_node, to_client, frames,
//! websocket, client_id, node, peer}]}; 4 `ack` {batch, adopted} (new → old); 5 `done`
//! {batches, tunnels}.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use bytes::Bytes;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::frames::FrameState;
use crate::tunnel::park::TunnelRecord;

/// First bytes of every message.
pub const MAGIC: &[u8; 4] = b"TBHO";
/// The format this build writes, and the newest it reads.
pub const VERSION: u16 = 1;
/// The oldest format this build reads.
pub const OLDEST_VERSION: u16 = 1;
/// Fixed header: magic, version, kind, padding, meta length.
const HEADER: usize = 12;
/// The largest message either side sends or accepts. The kernel caps a datagram at the
/// socket's send buffer, which [`tune`] raises past this.
pub const MAX_MESSAGE: usize = 512 * 1024;
/// Descriptors per message: the kernel's `SCM_MAX_FD` is 253; two per tunnel.
pub const MAX_FDS: usize = 252;
/// Bytes in flight carried per batch: a batch is closed before it would pass this, so that
/// `meta` and `blob` together stay far below [`MAX_MESSAGE`].
pub const MAX_BATCH_BLOB: usize = 256 * 1024;

/// One message of the hand-off.
#[derive(Debug)]
pub enum Message {
    Hello { generation: u64, from_pid: u32, draining: Vec<String>, client: OwnedFd, admin: OwnedFd },
    Ready { pid: u32 },
    Tunnels { batch: u64, tunnels: Vec<TunnelRecord> },
    Ack { batch: u64, adopted: usize },
    Done { batches: u64, tunnels: u64 },
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 1,
            Message::Ready { .. } => 2,
            Message::Tunnels { .. } => 3,
            Message::Ack { .. } => 4,
            Message::Done { .. } => 5,
        }
    }

    /// Its name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Ready { .. } => "ready",
            Message::Tunnels { .. } => "tunnels",
            Message::Ack { .. } => "ack",
            Message::Done { .. } => "done",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct HelloMeta {
    generation: u64,
    from_pid: u32,
    #[serde(default)]
    draining: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct ReadyMeta {
    pid: u32,
}

#[derive(Serialize, Deserialize)]
struct TunnelsMeta {
    batch: u64,
    tunnels: Vec<TunnelMeta>,
}

#[derive(Serialize, Deserialize)]
struct TunnelMeta {
    client_fd: usize,
    node_fd: usize,
    /// `[offset, len]` in the blob.
    to_node: [usize; 2],
    to_client: [usize; 2],
    frames: FrameState,
    websocket: bool,
    client_id: String,
    node: String,
    peer: SocketAddr,
}

#[derive(Serialize, Deserialize)]
struct AckMeta {
    batch: u64,
    adopted: usize,
}

#[derive(Serialize, Deserialize)]
struct DoneMeta {
    batches: u64,
    tunnels: u64,
}

/// What went wrong with a message.
fn bad(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("hand-off: {what}"))
}

/// A message as bytes in format `version`, and the descriptors that go with it (borrowed from
/// the message). Every version this build reads ([`OLDEST_VERSION`]`..=`[`VERSION`]) it can
/// also write: the new process answers in the version the old one spoke (see [`recv`]), so
/// that release N+1 can confirm to, and acknowledge, release N.
pub fn encode(message: &Message, version: u16) -> io::Result<(Vec<u8>, Vec<BorrowedFd<'_>>)> {
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(bad(format!(
            "cannot write format version {version} (this build writes {OLDEST_VERSION}..={VERSION})"
        )));
    }
    let mut blob = Vec::new();
    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
    let meta = match message {
        Message::Hello { generation, from_pid, draining, client, admin } => {
            fds.extend([client.as_fd(), admin.as_fd()]);
            serde_json::to_vec(&HelloMeta { generation: *generation, from_pid: *from_pid, draining: draining.clone() })
        }
        Message::Ready { pid } => serde_json::to_vec(&ReadyMeta { pid: *pid }),
        Message::Tunnels { batch, tunnels } => {
            let mut metas = Vec::with_capacity(tunnels.len());
            for t in tunnels {
                let mut span = |bytes: &Bytes| {
                    let at = blob.len();
                    blob.extend_from_slice(bytes);
                    [at, bytes.len()]
                };
                let (to_node, to_client) = (span(&t.to_node), span(&t.to_client));
                metas.push(TunnelMeta {
                    client_fd: fds.len(),
                    node_fd: fds.len() + 1,
                    to_node,
                    to_client,
                    frames: t.frames,
                    websocket: t.websocket,
                    client_id: t.client_id.clone(),
                    node: t.node_name.clone(),
                    peer: t.peer,
                });
                fds.extend([t.client.as_fd(), t.node.as_fd()]);
            }
            serde_json::to_vec(&TunnelsMeta { batch: *batch, tunnels: metas })
        }
        Message::Ack { batch, adopted } => serde_json::to_vec(&AckMeta { batch: *batch, adopted: *adopted }),
        Message::Done { batches, tunnels } => serde_json::to_vec(&DoneMeta { batches: *batches, tunnels: *tunnels }),
    }
    .map_err(bad)?;
    if fds.len() > MAX_FDS {
        return Err(bad(format!("{} descriptors in one message; at most {MAX_FDS}", fds.len())));
    }
    let mut out = Vec::with_capacity(HEADER + meta.len() + blob.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    out.push(message.kind());
    out.push(0);
    out.extend_from_slice(&u32::try_from(meta.len()).map_err(bad)?.to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&blob);
    if out.len() > MAX_MESSAGE {
        return Err(bad(format!("a {}-byte message; at most {MAX_MESSAGE}", out.len())));
    }
    Ok((out, fds))
}

/// A message from its bytes and the descriptors that came with it. Refuses anything that is
/// not exactly a message of a version this build knows, naming what is wrong; descriptors of a
/// refused message are closed.
pub fn decode(bytes: &[u8], fds: Vec<OwnedFd>) -> io::Result<(u16, Message)> {
    if bytes.len() < HEADER || &bytes[..4] != MAGIC {
        return Err(bad("not a hand-off message (bad magic)"));
    }
    let version = u16::from_be_bytes([bytes[4], bytes[5]]);
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(bad(format!(
            "message format version {version} is unknown to this build (it reads versions {OLDEST_VERSION}..={VERSION})"
        )));
    }
    let kind = bytes[6];
    let meta_len = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let meta = bytes.get(HEADER..HEADER + meta_len).ok_or_else(|| bad("meta length past the end"))?;
    let blob = &bytes[HEADER + meta_len..];
    let json = |e: serde_json::Error| bad(format!("kind {kind}: {e}"));
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut take =
        |i: usize| fds.get_mut(i).and_then(Option::take).ok_or_else(|| bad(format!("descriptor {i} missing")));
    let message = match kind {
        1 => {
            let m: HelloMeta = serde_json::from_slice(meta).map_err(json)?;
            Message::Hello {
                generation: m.generation,
                from_pid: m.from_pid,
                draining: m.draining,
                client: take(0)?,
                admin: take(1)?,
            }
        }
        2 => Message::Ready { pid: serde_json::from_slice::<ReadyMeta>(meta).map_err(json)?.pid },
        3 => {
            let m: TunnelsMeta = serde_json::from_slice(meta).map_err(json)?;
            let span = |[at, len]: [usize; 2]| {
                at.checked_add(len)
                    .and_then(|end| blob.get(at..end))
                    .map(Bytes::copy_from_slice)
                    .ok_or_else(|| bad("bytes in flight past the end of the message"))
            };
            let mut tunnels = Vec::with_capacity(m.tunnels.len());
            for t in m.tunnels {
                tunnels.push(TunnelRecord {
                    client: take(t.client_fd)?,
                    node: take(t.node_fd)?,
                    to_node: span(t.to_node)?,
                    to_client: span(t.to_client)?,
                    frames: t.frames,
                    websocket: t.websocket,
                    client_id: t.client_id,
                    node_name: t.node,
                    peer: t.peer,
                });
            }
            Message::Tunnels { batch: m.batch, tunnels }
        }
        4 => {
            let m: AckMeta = serde_json::from_slice(meta).map_err(json)?;
            Message::Ack { batch: m.batch, adopted: m.adopted }
        }
        5 => {
            let m: DoneMeta = serde_json::from_slice(meta).map_err(json)?;
            Message::Done { batches: m.batches, tunnels: m.tunnels }
        }
        other => return Err(bad(format!("unknown message kind {other} (format version {version})"))),
    };
    Ok((version, message))
}

/// Raises the socket's buffers so that a message of [`MAX_MESSAGE`] fits in one datagram.
pub fn tune(fd: BorrowedFd<'_>) {
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(fd, 2 * MAX_MESSAGE);
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(fd, 2 * MAX_MESSAGE);
}

/// A non-blocking `SOCK_SEQPACKET` socket registered with the runtime. Tokio has no type for
/// one; its `UnixStream` only waits for readiness here, every read and write is this module's
/// `recvmsg`/`sendmsg`, so message boundaries hold.
pub fn registered(fd: OwnedFd) -> io::Result<UnixStream> {
    UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
}

/// Sends one message, in format `version`, on a [`registered`] socket.
pub async fn send(socket: &UnixStream, message: &Message, version: u16) -> io::Result<()> {
    let (bytes, fds) = encode(message, version)?;
    let fd = socket.as_fd();
    socket
        .async_io(Interest::WRITABLE, || {
            let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(bad("descriptors do not fit the control buffer"));
            }
            let sent = sendmsg(fd, &[IoSlice::new(&bytes)], &mut control, SendFlags::NOSIGNAL)?;
            if sent != bytes.len() {
                return Err(bad(format!("sent {sent} of {} bytes", bytes.len())));
            }
            Ok(())
        })
        .await
}

/// Receives one message and the format version it came in; an error at end of stream (the
/// other process closed the socket or died).
pub async fn recv(socket: &UnixStream) -> io::Result<(u16, Message)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let fd = socket.as_fd();
    let (len, fds) = socket
        .async_io(Interest::READABLE, || {
            let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let got = recvmsg(fd, &mut [IoSliceMut::new(&mut buf)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
            let mut fds = Vec::new();
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = message {
                    fds.extend(received);
                }
            }
            if got.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) {
                return Err(bad("message or its descriptors truncated"));
            }
            Ok((got.bytes, fds))
        })
        .await?;
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "hand-off: the other process closed the socket"));
    }
    decode(&buf[..len], fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    fn round_trip(message: &Message) -> Message {
        let (bytes, fds) = encode(message, VERSION).unwrap();
        let dups = fds.iter().map(|fd| fd.try_clone_to_owned().unwrap()).collect();
        let (version, message) = decode(&bytes, dups).unwrap();
        assert_eq!(version, VERSION);
        message
    }

    #[test]
    fn every_kind_round_trips() {
        let hello =
            Message::Hello { generation: 3, from_pid: 77, draining: vec!["n2".into()], client: fd(), admin: fd() };
        match round_trip(&hello) {
            Message::Hello { generation: 3, from_pid: 77, draining, client, admin } => {
                assert_eq!(draining, ["n2"]);
                assert_ne!(client.as_raw_fd(), admin.as_raw_fd());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(round_trip(&Message::Ready { pid: 9 }), Message::Ready { pid: 9 }));
        assert!(matches!(round_trip(&Message::Ack { batch: 2, adopted: 5 }), Message::Ack { batch: 2, adopted: 5 }));
        assert!(matches!(
            round_trip(&Message::Done { batches: 2, tunnels: 7 }),
            Message::Done { batches: 2, tunnels: 7 }
        ));
        let frames =
            FrameState { payload_left: 70_000, header_seen: 0, header_len: 10, len_end: 10, payload_len: 70_000 };
        let record = |i: u8| TunnelRecord {
            client: fd(),
            node: fd(),
            to_node: Bytes::from(vec![i; 100 * usize::from(i)]),
            to_client: Bytes::from(vec![i + 100; 7]),
            frames,
            websocket: i.is_multiple_of(2),
            client_id: format!("client-{i}"),
            node_name: "node-1".into(),
            peer: "10.1.2.3:4567".parse().unwrap(),
        };
        let tunnels = Message::Tunnels { batch: 4, tunnels: (0..5).map(record).collect() };
        let Message::Tunnels { batch: 4, tunnels } = round_trip(&tunnels) else { panic!("not tunnels") };
        assert_eq!(tunnels.len(), 5);
        for (i, t) in tunnels.iter().enumerate() {
            let i = i as u8;
            assert_eq!(t.to_node, vec![i; 100 * usize::from(i)]);
            assert_eq!(t.to_client, vec![i + 100; 7]);
            assert_eq!(t.frames, frames);
            assert_eq!(t.websocket, i.is_multiple_of(2));
            assert_eq!(t.client_id, format!("client-{i}"));
            assert_eq!(t.peer.to_string(), "10.1.2.3:4567");
        }
    }

    #[test]
    fn an_unknown_version_or_kind_is_refused_with_a_clear_error() {
        let (mut bytes, _) = encode(&Message::Ready { pid: 1 }, VERSION).unwrap();
        bytes[4..6].copy_from_slice(&2u16.to_be_bytes());
        let e = decode(&bytes, Vec::new()).unwrap_err().to_string();
        assert!(e.contains("version 2 is unknown") && e.contains("1..=1"), "{e}");
        // Nor does this build write a version it does not know.
        let e = encode(&Message::Ready { pid: 1 }, VERSION + 1).unwrap_err().to_string();
        assert!(e.contains("cannot write format version 2"), "{e}");
        let (mut bytes, _) = encode(&Message::Ready { pid: 1 }, VERSION).unwrap();
        bytes[6] = 42;
        let e = decode(&bytes, Vec::new()).unwrap_err().to_string();
        assert!(e.contains("unknown message kind 42"), "{e}");
        let e = decode(b"GET / HTTP/1.1\r\n", Vec::new()).unwrap_err().to_string();
        assert!(e.contains("bad magic"), "{e}");
    }

    #[test]
    fn bad_offsets_and_missing_descriptors_are_refused() {
        let record = TunnelRecord {
            client: fd(),
            node: fd(),
            to_node: Bytes::from_static(b"abc"),
            to_client: Bytes::new(),
            frames: FrameState::default(),
            websocket: true,
            client_id: "c".into(),
            node_name: "n".into(),
            peer: "127.0.0.1:1".parse().unwrap(),
        };
        let (bytes, _) = encode(&Message::Tunnels { batch: 1, tunnels: vec![record] }, VERSION).unwrap();
        // Without its descriptors.
        let e = decode(&bytes, vec![fd()]).unwrap_err().to_string();
        assert!(e.contains("descriptor 1 missing"), "{e}");
        // The blob cut short.
        let e = decode(&bytes[..bytes.len() - 1], vec![fd(), fd()]).unwrap_err().to_string();
        assert!(e.contains("past the end"), "{e}");
    }
}
