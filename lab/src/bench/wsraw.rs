//! A deliberately small RFC 6455 codec for the load generators and the echo backend.
//!
//! The benchmarks open tens of thousands of connections and push hundreds of thousands of
//! frames a second from a machine that also runs the servers being measured, so the load
//! side must cost as little as possible: no per-frame allocation, no message reassembly, no
//! UTF-8 validation, a fixed handshake key. This is *not* a general WebSocket library: it
//! speaks exactly what the benchmarks need (single-frame messages, close, ping/pong) and
//! trusts the peer to be one of ours or a proxy in front of one of ours.
//!
//! [`connect`] does the client side of the upgrade (from a chosen 127.0.0.x source
//! address, so one load generator is not limited to one address' ephemeral ports), over
//! plain TCP or — [`connect_with`] and a [`ClientTls`] — over TLS (`wss`, for `tether bench
//! proxies --tls`); [`Decoder`] cuts frames out of a read buffer, unmasking in place;
//! [`encode`] writes one. A [`Stream`] is either kind of connection: the plain one is the bare
//! `TcpStream`, exactly as before TLS existed here.

use super::tls::ClientTls;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::either::Either;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest frame the decoder accepts; far above anything the benchmarks send, low enough that
/// a corrupted length cannot make us allocate gigabytes.
pub const MAX_FRAME_BYTES: usize = 1 << 24;
/// Largest HTTP response head we wait for during the handshake.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The handshake key. Servers only echo it back hashed; a fixed one saves a random draw and a
/// base64 encode per connection.
pub const HANDSHAKE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Appends one frame to `out`: FIN set, masked with `mask` when given (client → server frames
/// must be masked, server → client frames must not be).
pub fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    out.push(0x80 | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        // `len < 126` fits in the 7-bit field.
        out.push(mask_bit | len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
        }
        None => out.extend_from_slice(payload),
    }
}

/// One decoded frame: its opcode, FIN bit, and where its (unmasked) payload sits in the
/// decoder's buffer — valid until the decoder's next read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub opcode: u8,
    pub fin: bool,
    pub payload: Range<usize>,
}

/// Frames out of a byte stream. Bytes are read into one growing buffer; [`Decoder::next_frame`]
/// hands out payload ranges into it without copying.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the first byte not yet consumed by `next_frame`.
    pos: usize,
}

impl Decoder {
    /// A decoder that starts with `already` (bytes that arrived with the handshake response).
    pub fn with_bytes(already: &[u8]) -> Self {
        Self { buf: already.to_vec(), pos: 0 }
    }

    /// Reads once from `r` into at least `chunk` bytes of free space, after dropping consumed
    /// bytes; `Ok(0)` at EOF. Cancel-safe: nothing is appended unless the read completes.
    pub async fn read_from<R: AsyncRead + Unpin>(&mut self, r: &mut R, chunk: usize) -> io::Result<usize> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.is_empty() && self.buf.capacity() > 4 * chunk {
            // A burst grew the buffer; a quiet connection should not keep it.
            self.buf = Vec::new();
        }
        self.buf.reserve(chunk);
        r.read_buf(&mut self.buf).await
    }

    /// Bytes buffered and not yet consumed.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The payload of a frame returned by [`Decoder::next_frame`].
    pub fn payload(&self, frame: &Frame) -> &[u8] {
        &self.buf[frame.payload.clone()]
    }

    /// The next complete frame, if the buffer holds one; masked payloads are unmasked in place.
    pub fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        let b = &self.buf[self.pos..];
        if b.len() < 2 {
            return Ok(None);
        }
        let (fin, opcode) = (b[0] & 0x80 != 0, b[0] & 0x0f);
        let masked = b[1] & 0x80 != 0;
        let (len, mut head) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(n), 10)
            }
            126 | 127 => return Ok(None),
            n => (u64::from(n), 2),
        };
        let len = usize::try_from(len).ok().filter(|&l| l <= MAX_FRAME_BYTES).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes is over {MAX_FRAME_BYTES}"))
        })?;
        let mut key = None;
        if masked {
            if b.len() < head + 4 {
                return Ok(None);
            }
            key = Some([b[head], b[head + 1], b[head + 2], b[head + 3]]);
            head += 4;
        }
        if b.len() < head + len {
            return Ok(None);
        }
        let start = self.pos + head;
        let payload = start..start + len;
        if let Some(key) = key {
            for (i, byte) in self.buf[payload.clone()].iter_mut().enumerate() {
                *byte ^= key[i & 3];
            }
        }
        self.pos = payload.end;
        Ok(Some(Frame { opcode, fin, payload }))
    }
}

/// A client connection: plain TCP (`Left`), or TLS over TCP (`Right`; boxed: a TLS session
/// is large, and most connections of most benches are plain). tokio-util's `Either` passes
/// reads and writes to whichever it is.
pub type Stream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// The TCP connection of a plain stream; an error for TLS (for code that only speaks plain
/// WebSocket and splits the socket itself).
pub fn into_tcp(stream: Stream) -> io::Result<TcpStream> {
    match stream {
        Either::Left(s) => Ok(s),
        Either::Right(_) => {
            Err(io::Error::new(io::ErrorKind::Unsupported, "a TLS stream where plain TCP was expected"))
        }
    }
}

/// The TLS session of a TLS stream.
pub fn tls_session(stream: &Stream) -> Option<&rustls::ClientConnection> {
    match stream {
        Either::Left(_) => None,
        Either::Right(s) => Some(s.get_ref().1),
    }
}

/// Writes all of `bytes` and flushes. Over TLS the flush matters: tokio-rustls may accept
/// the last bytes into its session buffer when the socket is full and send them only on the
/// next write or flush (on a `TcpStream` the flush is a no-op).
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// A client connection right after a successful upgrade.
pub struct Upgraded {
    pub stream: Stream,
    /// Bytes that followed the 101 response in the same reads (a node's first frame often does).
    pub decoder: Decoder,
}

/// How long the steps of one [`connect_with`] took, from the start of the TCP connect.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// Until the TLS hand-shake was complete (`None` for plain TCP).
    pub tls: Option<Duration>,
    /// Until the `101`.
    pub upgraded: Duration,
}

/// Connects to `target` from `source` (port chosen by the kernel), sends the upgrade request
/// for `path` (which may carry a query), and waits for `101`. Anything else is an error that
/// quotes the response's status line.
pub async fn connect(target: SocketAddr, source: Option<IpAddr>, path: &str) -> io::Result<Upgraded> {
    Ok(connect_with(target, source, path, None).await?.0)
}

/// [`connect`], over TLS when `tls` is given (the hand-shake completes before the upgrade
/// request is sent); also says how long the steps took.
pub async fn connect_with(
    target: SocketAddr,
    source: Option<IpAddr>,
    path: &str,
    tls: Option<&ClientTls>,
) -> io::Result<(Upgraded, Timings)> {
    let started = Instant::now();
    let tcp = tcp_connect(target, source).await?;
    let (mut stream, tls_time) = match tls {
        None => (Either::Left(tcp), None),
        Some(tls) => {
            let s = tls.handshake(tcp).await?;
            (Either::Right(Box::new(s)), Some(started.elapsed()))
        }
    };
    let decoder = upgrade(&mut stream, target, path).await?;
    Ok((Upgraded { stream, decoder }, Timings { tls: tls_time, upgraded: started.elapsed() }))
}

async fn tcp_connect(target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = source {
        // Without this, `bind(ip, 0)` reserves a port number for the socket's whole life, and
        // ports reserved by bind() are off limits to every connect() on the machine whatever
        // the addresses — tens of thousands of load-generator sockets would starve the
        // balancer's own connects to its nodes (EADDRNOTAVAIL). With it, the port is chosen at
        // connect time and only the 4-tuple must be unique.
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
            .map_err(io::Error::from)?;
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends the upgrade request and reads the response head; the decoder holds what followed it.
async fn upgrade(stream: &mut Stream, target: SocketAddr, path: &str) -> io::Result<Decoder> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {HANDSHAKE_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    send(stream, request.as_bytes()).await?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed during the upgrade"));
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(at) = find(&head, b"\r\n\r\n") {
            break at + 4;
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "upgrade response head too long"));
        }
    };
    let status = head.split(|&b| b == b'\r').next().unwrap_or_default();
    if !status.starts_with(b"HTTP/1.1 101") {
        return Err(io::Error::other(format!("upgrade refused: {}", String::from_utf8_lossy(status))));
    }
    Ok(Decoder::with_bytes(&head[end..]))
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A cheap, varied masking key for connection number `n` (servers accept any key).
pub fn mask_for(n: u64) -> [u8; 4] {
    let x = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32 | 0x0101_0101;
    x.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_for_every_length_class() {
        for len in [0usize, 1, 64, 125, 126, 127, 65_535, 65_536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut wire = Vec::new();
                encode(&mut wire, OP_BINARY, &payload, mask);
                let mut d = Decoder::with_bytes(&wire);
                let f = d.next_frame().expect("valid").expect("complete");
                assert_eq!((f.opcode, f.fin), (OP_BINARY, true));
                assert_eq!(d.payload(&f), &payload[..], "len {len} mask {mask:?}");
                assert_eq!(d.pending(), 0);
            }
        }
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut wire = Vec::new();
        encode(&mut wire, OP_TEXT, b"hello", Some([9, 8, 7, 6]));
        encode(&mut wire, OP_PING, b"", None);
        for cut in 0..wire.len() {
            let mut d = Decoder::with_bytes(&wire[..cut]);
            let mut seen = 0;
            while d.next_frame().expect("valid").is_some() {
                seen += 1;
            }
            assert!(seen < 2, "cut at {cut}");
        }
        let mut d = Decoder::with_bytes(&wire);
        let f = d.next_frame().expect("valid").expect("first");
        assert_eq!(d.payload(&f), b"hello");
        assert_eq!(d.next_frame().expect("valid").map(|f| f.opcode), Some(OP_PING));
    }

    #[test]
    fn absurd_lengths_are_refused() {
        let wire = [0x82, 127, 0xff, 0, 0, 0, 0, 0, 0, 0];
        assert!(Decoder::with_bytes(&wire).next_frame().is_err());
    }
}
