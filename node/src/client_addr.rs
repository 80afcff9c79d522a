//! Who the client is, as far as the node can tell: the TCP peer, unless that peer is one of
//! `trusted_proxies` (a balancer), in which case the address the proxy passed on in
//! `X-Real-IP` — else the right-most `X-Forwarded-For` entry that is not itself a trusted
//! proxy. Used by [`crate::server`] at the upgrade: it is the `peer` a connection logs.
//!
//! Why only from trusted peers: anyone can send these headers. A client that reaches the node
//! directly (not through a proxy on the list) gets its TCP address, whatever it claims.
//! Why the right-most untrusted `X-Forwarded-For` entry: each proxy appends the address it saw;
//! entries left of the last one our trusted proxies added were written by whoever was before
//! them, possibly the client itself. A header we cannot parse ends the search: the node falls
//! back to the TCP peer rather than guess.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// The defaults of `trusted_proxies`: loopback, where a balancer on the same host connects from.
pub const DEFAULT_TRUSTED_PROXIES: [&str; 2] = ["127.0.0.0/8", "::1/128"];

/// The client's address and how it was learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    /// The TCP peer itself (no proxy, or one the node does not trust).
    Direct(SocketAddr),
    /// Named by a trusted proxy `via`.
    Forwarded { ip: IpAddr, via: SocketAddr },
}

impl ClientAddr {
    pub fn ip(&self) -> IpAddr {
        match self {
            Self::Direct(addr) => addr.ip(),
            Self::Forwarded { ip, .. } => *ip,
        }
    }
}

impl fmt::Display for ClientAddr {
    /// `ip:port` for a direct peer (as the node always logged it), the bare `ip` for a
    /// forwarded one (the proxy passes no port).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Direct(addr) => addr.fmt(f),
            Self::Forwarded { ip, .. } => ip.fmt(f),
        }
    }
}

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    proxies.iter().any(|net| net.contains(&ip))
}

/// The client's address for a request from `peer` carrying `headers`.
pub fn resolve(peer: SocketAddr, headers: &HeaderMap, proxies: &[IpNet]) -> ClientAddr {
    if !trusted(peer.ip(), proxies) {
        return ClientAddr::Direct(peer);
    }
    let forwarded = |ip: IpAddr| ClientAddr::Forwarded { ip: ip.to_canonical(), via: peer };
    // X-Real-IP: exactly one, and an address; anything else is not believed.
    let mut real = headers.get_all("x-real-ip").iter();
    if let (Some(value), None) = (real.next(), real.next()) {
        if let Some(ip) = value.to_str().ok().and_then(|v| v.trim().parse::<IpAddr>().ok()) {
            return forwarded(ip);
        }
    }
    // X-Forwarded-For, all its headers as one list, read from the right.
    let mut entries = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(value) = value.to_str() else {
            return ClientAddr::Direct(peer);
        };
        entries.extend(value.split(',').map(str::trim));
    }
    let mut leftmost = None;
    for entry in entries.iter().rev() {
        let Ok(ip) = entry.parse::<IpAddr>() else {
            return ClientAddr::Direct(peer);
        };
        if !trusted(ip, proxies) {
            return forwarded(ip);
        }
        leftmost = Some(ip);
    }
    // Every entry a trusted proxy: the client is itself in a trusted range (say, on the same
    // host as the balancer), and the first entry is the one it connected from.
    leftmost.map_or(ClientAddr::Direct(peer), forwarded)
}

/// Parses `trusted_proxies` entries: CIDRs, or bare addresses (one host). `Err` carries the
/// index and the reason, for the config error.
pub fn parse_trusted_proxies<S: AsRef<str>>(entries: &[S]) -> Result<Vec<IpNet>, (usize, String)> {
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let entry = entry.as_ref().trim();
            entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| (i, format!("{entry:?} is not a CIDR (like 10.0.0.0/8) or an address")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(list: &[&str]) -> Vec<IpNet> {
        parse_trusted_proxies(list).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        map
    }

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let p = proxies(&DEFAULT_TRUSTED_PROXIES);
        let h = headers(&[("x-real-ip", "1.2.3.4"), ("x-forwarded-for", "1.2.3.4")]);
        let peer = sock("203.0.113.9:5555");
        assert_eq!(resolve(peer, &h, &p), ClientAddr::Direct(peer));
        assert_eq!(resolve(peer, &h, &p).to_string(), "203.0.113.9:5555");
        // An empty list trusts nobody, loopback included.
        assert_eq!(resolve(sock("127.0.0.1:1"), &h, &[]), ClientAddr::Direct(sock("127.0.0.1:1")));
    }

    #[test]
    fn a_trusted_peer_is_believed_real_ip_first() {
        let p = proxies(&["10.0.0.0/8", "::1"]);
        let via = sock("10.1.2.3:4000");
        let h = headers(&[("x-real-ip", " 198.51.100.7 "), ("x-forwarded-for", "192.0.2.1")]);
        assert_eq!(resolve(via, &h, &p), ClientAddr::Forwarded { ip: ip("198.51.100.7"), via });
        assert_eq!(resolve(via, &h, &p).to_string(), "198.51.100.7");
        // Over IPv6 loopback, an IPv4-mapped client reads as IPv4.
        let v6 = sock("[::1]:4000");
        let h = headers(&[("x-real-ip", "::ffff:192.0.2.8")]);
        assert_eq!(resolve(v6, &h, &p).ip(), ip("192.0.2.8"));
        // A peer as IPv4-mapped IPv6 is trusted as its IPv4.
        let mapped = sock("[::ffff:10.0.0.1]:1");
        assert_eq!(resolve(mapped, &headers(&[("x-real-ip", "192.0.2.9")]), &p).ip(), ip("192.0.2.9"));
    }

    #[test]
    fn forwarded_for_is_read_from_the_right_past_trusted_proxies() {
        let p = proxies(&["10.0.0.0/8", "127.0.0.0/8"]);
        let via = sock("127.0.0.1:1");
        let chain = |xff: &[&str]| {
            let pairs: Vec<_> = xff.iter().map(|v| ("x-forwarded-for", *v)).collect();
            resolve(via, &headers(&pairs), &p)
        };
        // The client spoofed the left part; the right-most untrusted entry is the truth.
        assert_eq!(chain(&["6.6.6.6, 198.51.100.1, 10.0.0.5"]).ip(), ip("198.51.100.1"));
        // Several headers are one list.
        assert_eq!(chain(&["6.6.6.6", "198.51.100.2", "10.0.0.5, 10.0.0.6"]).ip(), ip("198.51.100.2"));
        assert_eq!(chain(&["2001:db8::5"]).ip(), ip("2001:db8::5"));
        // All trusted: the left-most.
        assert_eq!(chain(&["10.0.0.7, 127.0.0.1"]).ip(), ip("10.0.0.7"));
        // Nothing to go on: the peer.
        assert_eq!(chain(&[]), ClientAddr::Direct(via));
    }

    #[test]
    fn garbage_headers_fall_back_to_the_peer() {
        let p = proxies(&DEFAULT_TRUSTED_PROXIES);
        let via = sock("127.0.0.1:9");
        for pairs in [
            vec![("x-forwarded-for", "not-an-ip")],
            vec![("x-forwarded-for", "198.51.100.1, 1.2.3.4:80")],
            vec![("x-forwarded-for", "198.51.100.1,,")],
            vec![("x-real-ip", "1.2.3"), ("x-forwarded-for", "junk")],
            vec![("x-real-ip", "1.1.1.1"), ("x-real-ip", "2.2.2.2")],
        ] {
            assert_eq!(resolve(via, &headers(&pairs), &p), ClientAddr::Direct(via), "{pairs:?}");
        }
        // A bad X-Real-IP is passed over for a good X-Forwarded-For.
        let h = headers(&[("x-real-ip", "garbage"), ("x-forwarded-for", "198.51.100.3")]);
        assert_eq!(resolve(via, &h, &p).ip(), ip("198.51.100.3"));
        // Bytes that are not text.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", http::HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        assert_eq!(resolve(via, &h, &p), ClientAddr::Direct(via));
    }

    #[test]
    fn trusted_proxies_parse_cidrs_and_addresses_naming_the_bad_entry() {
        let nets = proxies(&["10.1.2.3/8", "192.0.2.1", "2001:db8::/32"]);
        assert_eq!(nets[0].to_string(), "10.0.0.0/8", "host bits dropped");
        assert_eq!(nets[1].to_string(), "192.0.2.1/32");
        assert_eq!(parse_trusted_proxies(&["10.0.0.0/8", "10.0.0.0/33"]).unwrap_err().0, 1);
        assert_eq!(parse_trusted_proxies(&["localhost"]).unwrap_err().0, 0);
    }
}
