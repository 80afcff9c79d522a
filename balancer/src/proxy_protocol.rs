//! The PROXY protocol (HAProxy's, v1 text and v2 binary) on the client listener: when a load
//! balancer in front of us opens each connection with a header naming the real client, this
//! module reads that header — and not one byte more — before anything else sees the stream.
//!
//! Where it sits: `server` accepts a connection, takes its `max_connections` slot, then calls
//! [`read_header`] (bounded by `header_read_timeout`); what it returns is the client's real
//! address, which the per-IP limits, the logs and the `X-Forwarded-*`/`X-Real-IP` headers use.
//! TLS (when configured) and hyper come after, on the same untouched stream.
//!
//! Why "not one byte more": the bytes after the header are the client's TLS ClientHello or
//! HTTP request, and hyper or rustls must see them from their first byte. A socket read could
//! return the header and the start of the request together, so the header is found with
//! `peek` (which leaves the bytes in the kernel) and only its own bytes are read off: the v1
//! text line up to its CRLF, the v2 16-byte preamble and then exactly its length field's worth.
//! Bytes known to be header (a partial line without its CRLF yet) are consumed as they come,
//! so a header split over several TCP segments neither spins on `peek` nor is misread.
//!
//! Parsing itself is the `ppp` crate's. v1 `UNKNOWN` and v2 `LOCAL` (a health check of the
//! proxy itself) and address families that are not IP mean "no client address": the socket's
//! peer is used.

use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelValue;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// `proxy_protocol`: which header the client listener requires on every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyProtocol {
    /// No header is read: the stream is HTTP (or TLS) from its first byte.
    #[default]
    Off,
    /// The text header (`PROXY TCP4 1.2.3.4 5.6.7.8 1234 443\r\n`).
    V1,
    /// The binary header.
    V2,
    /// Either of them.
    Any,
}

impl ProxyProtocol {
    /// The config and flag spellings.
    pub const NAMES: [&'static str; 4] = ["off", "v1", "v2", "any"];

    /// Parses the config/flag value (`off`, `v1`, `v2`, `any`).
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "off" => Some(Self::Off),
            "v1" => Some(Self::V1),
            "v2" => Some(Self::V2),
            "any" => Some(Self::Any),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::V1 => "v1",
            Self::V2 => "v2",
            Self::Any => "any",
        }
    }

    fn allows(self, version: Version) -> bool {
        matches!((self, version), (Self::Any, _) | (Self::V1, Version::V1) | (Self::V2, Version::V2))
    }
}

/// Longest v1 header, CRLF included (the spec's own bound: a TCP6 line with both ports).
pub const V1_MAX_LEN: usize = 107;
/// Longest v2 header accepted, preamble included. The spec lets the length field reach 64 KiB
/// of TLVs; real senders (HAProxy, AWS NLB, GCP) stay within a few hundred bytes, and a
/// connection that has not yet proven anything should not make us buffer 64 KiB.
pub const V2_MAX_LEN: usize = 16 + 2048;
/// The v2 preamble's fixed part: signature (12), version/command (1), family (1), length (2).
const V2_FIXED_LEN: usize = 16;
const V1_PREFIX: &[u8] = b"PROXY ";
const V2_PREFIX: &[u8] = ppp::v2::PROTOCOL_PREFIX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// Why a connection was closed before its header was complete; the label of
/// `tether_balancer_proxy_protocol_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the variant names are the label values
pub enum Refused {
    /// The stream does not start with any PROXY header (e.g. a client talking straight HTTP).
    missing,
    /// A header of the version the listener does not take (`v1` sent to a `v2` listener...).
    wrong_version,
    /// It starts like a header but is malformed or too long.
    invalid,
    /// `header_read_timeout` passed before the header was complete.
    timeout,
    /// The client hung up (or the socket failed) before the header was complete.
    closed,
}

/// Reads the PROXY header `mode` requires from the start of `stream`, within `timeout`.
/// `Ok(Some(addr))`: the client address it names; `Ok(None)`: a valid header that names none
/// (v1 `UNKNOWN`, v2 `LOCAL`, a non-IP family) — use the socket's peer. With
/// [`ProxyProtocol::Off`] nothing is read and the answer is `Ok(None)`.
pub async fn read_header(
    stream: &mut TcpStream,
    mode: ProxyProtocol,
    timeout: Duration,
) -> Result<Option<SocketAddr>, Refused> {
    if mode == ProxyProtocol::Off {
        return Ok(None);
    }
    match tokio::time::timeout(timeout, read_raw(stream, mode)).await {
        Ok(Ok((version, header))) => parse(version, &header),
        Ok(Err(refused)) => Err(refused),
        Err(_) => Err(Refused::timeout),
    }
}

/// Takes the header's bytes off the stream, and only those.
async fn read_raw(stream: &mut TcpStream, mode: ProxyProtocol) -> Result<(Version, Vec<u8>), Refused> {
    // Bytes of the header consumed so far; `peeked` is what the kernel holds after them.
    let mut header = Vec::with_capacity(V1_MAX_LEN);
    let mut peeked = [0u8; 512];
    loop {
        let n = stream.peek(&mut peeked).await.map_err(|_| Refused::closed)?;
        if n == 0 {
            return Err(Refused::closed);
        }
        let (take, done) = {
            let seen = Seen { header: &header, more: &peeked[..n] };
            let version = seen.version(mode)?;
            match version {
                Version::V1 => seen.v1_take()?,
                Version::V2 => seen.v2_take()?,
            }
        };
        let start = header.len();
        header.resize(start + take, 0);
        // The bytes are in the kernel's buffer (we just peeked them): this returns at once.
        stream.read_exact(&mut header[start..]).await.map_err(|_| Refused::closed)?;
        if done {
            let version = if header.starts_with(V1_PREFIX) { Version::V1 } else { Version::V2 };
            return Ok((version, header));
        }
    }
}

/// The bytes of a header read so far (`header`) and those waiting after them (`more`).
struct Seen<'a> {
    header: &'a [u8],
    more: &'a [u8],
}

impl Seen<'_> {
    fn byte(&self, i: usize) -> Option<u8> {
        self.header.get(i).or_else(|| self.more.get(i - self.header.len())).copied()
    }

    fn len(&self) -> usize {
        self.header.len() + self.more.len()
    }

    /// Which header this is, from the bytes so far, or why the connection is refused: a
    /// prefix is checked as far as it has arrived, so garbage is refused at its first byte.
    fn version(&self, mode: ProxyProtocol) -> Result<Version, Refused> {
        let matches = |prefix: &[u8]| (0..prefix.len().min(self.len())).all(|i| self.byte(i) == Some(prefix[i]));
        let version = if matches(V1_PREFIX) {
            Version::V1
        } else if matches(V2_PREFIX) {
            Version::V2
        } else {
            return Err(Refused::missing);
        };
        if mode.allows(version) {
            Ok(version)
        } else {
            Err(Refused::wrong_version)
        }
    }

    /// How many of `more` belong to a v1 header, and whether that completes it: up to and
    /// including the first `\n` (which must follow a `\r`), or all of it when none has come.
    fn v1_take(&self) -> Result<(usize, bool), Refused> {
        match self.more.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let total = self.header.len() + i + 1;
                if total > V1_MAX_LEN {
                    return Err(Refused::invalid);
                }
                Ok((i + 1, true))
            }
            None if self.len() >= V1_MAX_LEN => Err(Refused::invalid),
            None => Ok((self.more.len(), false)),
        }
    }

    /// How many of `more` belong to a v2 header, and whether that completes it: the fixed
    /// 16 bytes first, then as many as their length field says.
    fn v2_take(&self) -> Result<(usize, bool), Refused> {
        let have = self.header.len();
        if self.len() < V2_FIXED_LEN {
            // Still inside the fixed part, which is all header.
            return Ok((self.more.len(), false));
        }
        let length = u16::from_be_bytes([self.byte(14).unwrap_or(0), self.byte(15).unwrap_or(0)]);
        let total = V2_FIXED_LEN + usize::from(length);
        if total > V2_MAX_LEN {
            return Err(Refused::invalid);
        }
        let take = (total - have).min(self.more.len());
        Ok((take, have + take == total))
    }
}

/// The client address a complete header names.
fn parse(version: Version, header: &[u8]) -> Result<Option<SocketAddr>, Refused> {
    match version {
        Version::V1 => {
            let parsed = ppp::v1::Header::try_from(header).map_err(|_| Refused::invalid)?;
            // `ppp` stops at the first CRLF; the header we read ends there, so nothing of it
            // is left over — but check, rather than trust that.
            if parsed.header.len() != header.len() {
                return Err(Refused::invalid);
            }
            Ok(match parsed.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                ppp::v1::Addresses::Unknown => None,
            })
        }
        Version::V2 => {
            let parsed = ppp::v2::Header::try_from(header).map_err(|_| Refused::invalid)?;
            if parsed.len() != header.len() {
                return Err(Refused::invalid);
            }
            if parsed.command == ppp::v2::Command::Local {
                return Ok(None);
            }
            Ok(match parsed.addresses {
                ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(src: &str, dst: &str) -> Vec<u8> {
        let addresses: ppp::v2::Addresses =
            (src.parse::<SocketAddr>().unwrap(), dst.parse::<SocketAddr>().unwrap()).into();
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            addresses,
        )
        .build()
        .unwrap()
    }

    /// Runs `read_header` on a server socket whose client writes `chunks` one by one, then
    /// `after`, and returns the result and the bytes left on the stream.
    async fn read(
        mode: ProxyProtocol,
        chunks: Vec<Vec<u8>>,
        after: &[u8],
    ) -> (Result<Option<SocketAddr>, Refused>, Vec<u8>) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let after = after.to_vec();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.set_nodelay(true).unwrap();
            // Separate writes, each its own segment on loopback most of the time; that the
            // split path is taken every time is pinned by the `Seen` tests below.
            for chunk in chunks {
                c.write_all(&chunk).await.unwrap();
                c.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            c.write_all(&after).await.unwrap();
            c.shutdown().await.unwrap();
            // Keep the socket until the server has read everything.
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink).await;
        });
        let (mut server, _) = listener.accept().await.unwrap();
        let result = read_header(&mut server, mode, Duration::from_secs(5)).await;
        let mut rest = Vec::new();
        if result.is_ok() {
            server.read_to_end(&mut rest).await.unwrap();
        }
        drop(server);
        let _ = client.await;
        (result, rest)
    }

    #[tokio::test]
    async fn v1_header_is_read_exactly_and_names_the_client() {
        let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n".to_vec();
        let (result, rest) = read(ProxyProtocol::V1, vec![header], b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(result, Ok(Some("203.0.113.7:51234".parse().unwrap())));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn v1_tcp6_and_unknown() {
        let header = b"PROXY TCP6 2001:db8::1 2001:db8::2 1000 443\r\n".to_vec();
        let (result, _) = read(ProxyProtocol::Any, vec![header], b"x").await;
        assert_eq!(result, Ok(Some("[2001:db8::1]:1000".parse().unwrap())));
        let (result, rest) = read(ProxyProtocol::V1, vec![b"PROXY UNKNOWN\r\n".to_vec()], b"x").await;
        assert_eq!((result, rest), (Ok(None), b"x".to_vec()));
    }

    #[tokio::test]
    async fn v2_header_is_read_exactly_and_local_means_the_peer() {
        let header = v2("198.51.100.4:4000", "10.0.0.1:443");
        let (result, rest) = read(ProxyProtocol::V2, vec![header], b"\x16\x03\x01hello").await;
        assert_eq!(result, Ok(Some("198.51.100.4:4000".parse().unwrap())));
        assert_eq!(rest, b"\x16\x03\x01hello");
        let local = ppp::v2::Builder::new(0x20, 0x00).build().unwrap();
        let (result, rest) = read(ProxyProtocol::Any, vec![local], b"GET").await;
        assert_eq!((result, rest), (Ok(None), b"GET".to_vec()));
        let v6 = v2("[2001:db8::9]:7", "[2001:db8::1]:443");
        assert_eq!(read(ProxyProtocol::V2, vec![v6], b"").await.0, Ok(Some("[2001:db8::9]:7".parse().unwrap())));
    }

    #[tokio::test]
    async fn headers_split_across_writes_are_assembled() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n";
        let chunks =
            vec![v1[..3].to_vec(), v1[3..20].to_vec(), v1[20..v1.len() - 1].to_vec(), v1[v1.len() - 1..].to_vec()];
        let (result, rest) = read(ProxyProtocol::V1, chunks, b"GET /").await;
        assert_eq!((result, rest), (Ok(Some("203.0.113.7:51234".parse().unwrap())), b"GET /".to_vec()));

        let header = v2("198.51.100.4:4000", "10.0.0.1:443");
        let chunks = vec![header[..5].to_vec(), header[5..15].to_vec(), header[15..20].to_vec(), header[20..].to_vec()];
        let (result, rest) = read(ProxyProtocol::V2, chunks, b"GET /").await;
        assert_eq!((result, rest), (Ok(Some("198.51.100.4:4000".parse().unwrap())), b"GET /".to_vec()));
    }

    #[tokio::test]
    async fn missing_garbage_wrong_version_and_overlong_headers_are_refused() {
        let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(read(ProxyProtocol::Any, vec![http.clone()], b"").await.0, Err(Refused::missing));
        assert_eq!(
            read(ProxyProtocol::V1, vec![b"PROXY TCP4 nonsense\r\n".to_vec()], b"").await.0,
            Err(Refused::invalid)
        );
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n".to_vec();
        assert_eq!(read(ProxyProtocol::V2, vec![v1], b"").await.0, Err(Refused::wrong_version));
        let v2h = v2("198.51.100.4:4000", "10.0.0.1:443");
        assert_eq!(read(ProxyProtocol::V1, vec![v2h.clone()], b"").await.0, Err(Refused::wrong_version));
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(read(ProxyProtocol::V1, vec![long], b"").await.0, Err(Refused::invalid));
        // A v2 length field past the cap is refused without reading the body.
        let mut huge = v2h[..14].to_vec();
        huge.extend_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(read(ProxyProtocol::V2, vec![huge], b"").await.0, Err(Refused::invalid));
        // A header cut short by the client's hang-up.
        assert_eq!(read(ProxyProtocol::V1, vec![b"PROXY TCP4 1.2".to_vec()], b"").await.0, Err(Refused::closed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let result = read_header(&mut server, ProxyProtocol::Any, Duration::from_secs(5)).await;
        assert_eq!(result, Err(Refused::timeout));
    }

    #[test]
    fn partial_headers_consume_only_header_bytes() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n";
        // No CRLF yet: all of it is header, consume it.
        let seen = Seen { header: b"PROXY TC", more: &v1[8..20] };
        assert_eq!(seen.version(ProxyProtocol::V1), Ok(Version::V1));
        assert_eq!(seen.v1_take(), Ok((12, false)));
        // The CRLF split between two reads.
        let seen = Seen { header: &v1[..v1.len() - 1], more: b"\nGET / HTTP/1.1" };
        assert_eq!(seen.v1_take(), Ok((1, true)));
        // The end of the line and the request behind it: only up to the LF.
        let seen = Seen { header: &v1[..10], more: &[&v1[10..], b"GET /".as_slice()].concat() };
        assert_eq!(seen.v1_take(), Ok((v1.len() - 10, true)));
        // A prefix that has not yet diverged is not refused early...
        assert_eq!(Seen { header: b"", more: b"PRO" }.version(ProxyProtocol::Any), Ok(Version::V1));
        assert_eq!(Seen { header: b"", more: b"\r\n\r" }.version(ProxyProtocol::V2), Ok(Version::V2));
        // ...and one that has is, at its first wrong byte.
        assert_eq!(Seen { header: b"", more: b"PRX" }.version(ProxyProtocol::Any), Err(Refused::missing));

        let header = v2("198.51.100.4:4000", "10.0.0.1:443");
        let seen = Seen { header: &header[..4], more: &header[4..10] };
        assert_eq!(seen.v2_take(), Ok((6, false)));
        let seen = Seen { header: &header[..10], more: &[&header[10..], b"GET".as_slice()].concat() };
        assert_eq!(seen.v2_take(), Ok((header.len() - 10, true)));
        let seen = Seen { header: &header[..18], more: &header[18..20] };
        assert_eq!(seen.v2_take(), Ok((2, false)));
    }

    #[test]
    fn off_reads_nothing_and_names_parse() {
        for name in ProxyProtocol::NAMES {
            assert_eq!(ProxyProtocol::parse(name).unwrap().as_str(), name);
        }
        assert!(ProxyProtocol::parse("V1").is_none());
    }
}
