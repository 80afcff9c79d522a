//! Per-source-address limits on the client listener: `max_connections_per_ip` (connections
//! open at once, tunnels included) and `connect_rate_per_ip` (a token bucket refilled at that
//! many per second, holding `connect_burst_per_ip`). Over either, `server` answers 429 with
//! `Retry-After` and closes.
//!
//! Where it sits: after the PROXY header (so the address is the real client's, not our own
//! load balancer's) and before TLS and hyper, so a refused client costs no handshake. A
//! connection that passes holds a [`Guard`] in its `ClientConn` for as long as it lives —
//! through an upgrade, as long as the tunnel — and gives its slot back when dropped.
//!
//! Keys: an IPv4 address by itself (IPv4-mapped IPv6 counts as IPv4); an IPv6 address by its
//! /64, since one host — one customer line, one VM — is routinely given a whole /64 and can
//! pick any address in it.
//!
//! Memory: the table must not grow without bound under an attacker with many addresses. Most
//! entries are worthless: an entry holding no connection whose bucket has refilled says
//! nothing a fresh entry would not, and is dropped at once when its last connection closes
//! or at the next sweep. The table holds at most [`table_cap`] entries; when a new address
//! finds it full, a sweep removes the worthless entries, then — if that freed too little —
//! entries holding no connection whose bucket is still refilling (their addresses get a full
//! bucket back: the cost of being bounded). Entries with open connections are never removed,
//! and there is always room, because there can be no more of them than `max_connections`,
//! which the cap exceeds by [`SPARE_ENTRIES`]. A sweep walks the whole table, but frees at
//! least an eighth of it or every idle entry, so its cost spreads over that many new
//! addresses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::encoding::EncodeLabelValue;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

/// Entries the table holds beyond `max_connections` (see [`table_cap`]).
pub const SPARE_ENTRIES: usize = 65_536;

/// The table's cap: `max_connections` + [`SPARE_ENTRIES`]. At most `max_connections` entries
/// can hold a connection, so at least `SPARE_ENTRIES` can always be evicted.
pub fn table_cap(max_connections: usize) -> usize {
    max_connections.saturating_add(SPARE_ENTRIES)
}

/// The limits in force: read from the `Config` at each check, so that a reloaded config
/// applies to the next connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Connections open at once per key; 0 = no cap.
    pub max_connections: u32,
    /// Tokens added per second; 0 = no rate limit.
    pub rate: f64,
    /// Bucket size (the burst a fresh or rested address may open at once).
    pub burst: u32,
}

impl Limits {
    pub fn from_config(config: &crate::Config) -> Self {
        Self {
            max_connections: config.max_connections_per_ip,
            rate: config.connect_rate_per_ip,
            burst: config.connect_burst_per_ip,
        }
    }

    /// Whether either limit is on; when neither is, the table is not touched at all.
    pub fn any(&self) -> bool {
        self.max_connections > 0 || self.rate > 0.0
    }
}

/// Why a connection was refused; the label of `tether_balancer_per_ip_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the variant names are the label values
pub enum Reason {
    /// `max_connections_per_ip` are open from this address.
    connections,
    /// The address's token bucket is empty.
    rate,
}

/// A refusal and the `Retry-After` it is answered with, in whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub retry_after_secs: u64,
}

/// The table key: an IPv4 address, or the /64 of an IPv6 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    V4(u32),
    V6(u64),
}

impl Key {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Key::V4(u32::from(v4)),
            IpAddr::V6(v6) => Key::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Connections open now from this key.
    open: u32,
    /// Tokens in the bucket as of `at`.
    tokens: f64,
    at: Instant,
}

impl Entry {
    /// The bucket's level at `now` (refilled, capped at the burst).
    fn tokens_at(&self, limits: &Limits, now: Instant) -> f64 {
        let burst = f64::from(limits.burst);
        if limits.rate <= 0.0 {
            return burst;
        }
        (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * limits.rate).min(burst)
    }

    /// Holds nothing a fresh entry would not: no connection, bucket full.
    fn worthless(&self, limits: &Limits, now: Instant) -> bool {
        self.open == 0 && self.tokens_at(limits, now) >= f64::from(limits.burst)
    }
}

/// The per-address table, shared by every connection of the client listener.
#[derive(Debug)]
pub struct PerIp {
    table: Mutex<HashMap<Key, Entry>>,
    cap: usize,
    /// `tether_balancer_per_ip_entries`.
    entries: Gauge,
}

impl PerIp {
    pub fn new(cap: usize, entries: Gauge) -> Self {
        Self { table: Mutex::new(HashMap::new()), cap: cap.max(1), entries }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        // A panic while holding this lock cannot leave an entry half-updated in a way that
        // matters more than losing the limits would: carry on with the data.
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Admits one connection from `ip` or says why not. The guard gives the connection's slot
    /// back when dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limits: Limits, now: Instant) -> Result<Guard, Refusal> {
        let key = Key::of(ip);
        let mut table = self.lock();
        if !table.contains_key(&key) && table.len() >= self.cap {
            sweep(&mut table, self.cap, &limits, now);
        }
        let entry = table.entry(key).or_insert(Entry { open: 0, tokens: f64::from(limits.burst), at: now });
        let result = check(entry, &limits, now);
        if result.is_err() && entry.worthless(&limits, now) {
            // Refused on a fresh entry (a zero burst cannot happen: validation refuses it;
            // but keep the table clean whatever the limits).
            table.remove(&key);
        }
        self.entries.set(i64::try_from(table.len()).unwrap_or(i64::MAX));
        result.map(|()| Guard { table: Arc::clone(self), key, limits })
    }

    /// Counts a connection from `ip` that is already open — a tunnel taken over from the
    /// process this one replaced — without checking either limit or taking a token: it was
    /// admitted once, and an upgrade must not refuse (or bill) what is already there.
    pub fn hold(self: &Arc<Self>, ip: IpAddr, limits: Limits) -> Guard {
        let key = Key::of(ip);
        let now = Instant::now();
        let mut table = self.lock();
        if !table.contains_key(&key) && table.len() >= self.cap {
            sweep(&mut table, self.cap, &limits, now);
        }
        table.entry(key).or_insert(Entry { open: 0, tokens: f64::from(limits.burst), at: now }).open += 1;
        self.entries.set(i64::try_from(table.len()).unwrap_or(i64::MAX));
        Guard { table: Arc::clone(self), key, limits }
    }

    fn release(&self, key: Key, limits: &Limits) {
        let mut table = self.lock();
        let now = Instant::now();
        if let Some(entry) = table.get_mut(&key) {
            entry.open = entry.open.saturating_sub(1);
            if entry.worthless(limits, now) {
                table.remove(&key);
            }
        }
        self.entries.set(i64::try_from(table.len()).unwrap_or(i64::MAX));
    }
}

/// The connection cap first (refusing there costs the address no token), then the bucket.
fn check(entry: &mut Entry, limits: &Limits, now: Instant) -> Result<(), Refusal> {
    if limits.max_connections > 0 && entry.open >= limits.max_connections {
        return Err(Refusal { reason: Reason::connections, retry_after_secs: 1 });
    }
    if limits.rate > 0.0 {
        let tokens = entry.tokens_at(limits, now);
        if tokens < 1.0 {
            // Until the next whole token, rounded up to a second.
            let wait = ((1.0 - tokens) / limits.rate).ceil().max(1.0);
            let retry_after_secs = if wait.is_finite() { wait as u64 } else { u64::MAX };
            return Err(Refusal { reason: Reason::rate, retry_after_secs });
        }
        entry.tokens = tokens - 1.0;
        entry.at = now;
    }
    entry.open += 1;
    Ok(())
}

/// Makes room in a full table: every worthless entry goes; if that freed less than an eighth
/// of the cap, entries holding no connection go too, until an eighth is free or none is left.
fn sweep(table: &mut HashMap<Key, Entry>, cap: usize, limits: &Limits, now: Instant) {
    let target = (cap / 8).max(1);
    let before = table.len();
    table.retain(|_, entry| !entry.worthless(limits, now));
    let mut to_free = target.saturating_sub(before - table.len());
    if to_free > 0 {
        table.retain(|_, entry| {
            if to_free > 0 && entry.open == 0 {
                to_free -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// One admitted connection's hold on its address's entry.
#[derive(Debug)]
pub struct Guard {
    table: Arc<PerIp>,
    key: Key,
    /// The limits it was admitted under: what decides, at release, whether the entry is
    /// still worth keeping.
    limits: Limits,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.table.release(self.key, &self.limits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    fn table(cap: usize) -> Arc<PerIp> {
        Arc::new(PerIp::new(cap, Gauge::default()))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const CAP2: Limits = Limits { max_connections: 2, rate: 0.0, burst: 1 };

    #[test]
    fn a_held_connection_counts_against_the_cap_without_a_refusal_or_a_token() {
        let t = table(100);
        let limits = Limits { max_connections: 1, rate: 1.0, burst: 1 };
        let held = t.hold(ip("192.0.2.9"), limits);
        let again = t.hold(ip("192.0.2.9"), limits);
        // Two held past a cap of one: the cap refuses the next, the bucket was not touched.
        let refused = t.admit(ip("192.0.2.9"), limits, Instant::now()).unwrap_err();
        assert_eq!(refused.reason, Reason::connections);
        drop((held, again));
        assert!(t.admit(ip("192.0.2.9"), limits, Instant::now()).is_ok(), "its token is still there");
    }

    #[test]
    fn ipv6_is_keyed_by_its_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(Key::of(ip("2001:db8:1:2::1")), Key::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(Key::of(ip("2001:db8:1:2::1")), Key::of(ip("2001:db8:1:3::1")));
        assert_eq!(Key::of(ip("::ffff:192.0.2.1")), Key::of(ip("192.0.2.1")));
        assert_ne!(Key::of(ip("192.0.2.1")), Key::of(ip("192.0.2.2")));
    }

    #[test]
    fn connection_cap_refuses_with_retry_after_1_and_a_closed_connection_frees_its_slot() {
        let t = table(100);
        let now = Instant::now();
        let a = t.admit(ip("192.0.2.1"), CAP2, now).unwrap();
        let _b = t.admit(ip("192.0.2.1"), CAP2, now).unwrap();
        let refused = t.admit(ip("192.0.2.1"), CAP2, now).unwrap_err();
        assert_eq!(refused, Refusal { reason: Reason::connections, retry_after_secs: 1 });
        // Another address is not affected; another address of the same /64 is.
        let _c = t.admit(ip("192.0.2.2"), CAP2, now).unwrap();
        let _d = t.admit(ip("2001:db8::1"), CAP2, now).unwrap();
        let _e = t.admit(ip("2001:db8::2"), CAP2, now).unwrap();
        assert!(t.admit(ip("2001:db8::3"), CAP2, now).is_err());
        drop(a);
        let _a = t.admit(ip("192.0.2.1"), CAP2, now).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn rate_refuses_until_the_next_token_rounded_up() {
        let t = table(100);
        // Two per second, a burst of three.
        let limits = Limits { max_connections: 0, rate: 2.0, burst: 3 };
        let start = Instant::now();
        for _ in 0..3 {
            drop(t.admit(ip("198.51.100.1"), limits, start).unwrap());
        }
        let refused = t.admit(ip("198.51.100.1"), limits, start).unwrap_err();
        assert_eq!(refused, Refusal { reason: Reason::rate, retry_after_secs: 1 });
        // A slow rate: the wait is rounded up to whole seconds.
        let slow = Limits { max_connections: 0, rate: 0.25, burst: 1 };
        drop(t.admit(ip("198.51.100.2"), slow, start).unwrap());
        let refused = t.admit(ip("198.51.100.2"), slow, start + Duration::from_millis(500)).unwrap_err();
        assert_eq!(refused.retry_after_secs, 4, "3.5 s to the next token, rounded up");
        // Half a second at 2/s is one token.
        drop(t.admit(ip("198.51.100.1"), limits, start + Duration::from_millis(500)).unwrap());
        assert!(t.admit(ip("198.51.100.1"), limits, start + Duration::from_millis(500)).is_err());
        // Others are unaffected.
        drop(t.admit(ip("198.51.100.3"), limits, start).unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn worthless_entries_go_at_once() {
        let t = table(100);
        let g = t.admit(ip("192.0.2.1"), CAP2, Instant::now()).unwrap();
        assert_eq!(t.len(), 1);
        drop(g);
        assert_eq!(t.len(), 0, "no connection and no rate: nothing to remember");
        let limits = Limits { max_connections: 0, rate: 1.0, burst: 1 };
        drop(t.admit(ip("192.0.2.1"), limits, Instant::now()).unwrap());
        assert_eq!(t.len(), 1, "its bucket is refilling: that is information");
    }

    #[test]
    fn the_table_stays_bounded_under_200k_addresses() {
        let cap = 10_000;
        let t = table(cap);
        let limits = Limits { max_connections: 4, rate: 1.0, burst: 2 };
        let now = Instant::now();
        // Some addresses hold connections throughout; their entries must survive.
        let held: Vec<Guard> =
            (0..500u32).map(|i| t.admit(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), limits, now).unwrap()).collect();
        let mut max_len = 0;
        for i in 0..200_000u32 {
            // Every one a new address, each of which keeps a refilling bucket behind.
            let addr = if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::from(0xc000_0000 + i))
            } else {
                IpAddr::V6(Ipv6Addr::from(u128::from(i) << 64))
            };
            drop(t.admit(addr, limits, now).unwrap());
            max_len = max_len.max(t.len());
        }
        assert!(max_len <= cap, "table reached {max_len} entries, cap {cap}");
        // The held addresses kept their entries: their cap still counts what they hold.
        for i in 0..500u32 {
            let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let key = Key::of(addr);
            assert_eq!(t.lock().get(&key).map(|e| e.open), Some(1), "{addr}");
        }
        drop(held);
    }

    #[test]
    fn a_full_table_of_open_connections_still_admits_within_its_spare() {
        // Every entry but one holds a connection: the sweep finds the one idle entry.
        let t = table(3);
        let limits = Limits { max_connections: 1, rate: 0.0, burst: 1 };
        let now = Instant::now();
        let _a = t.admit(ip("192.0.2.1"), limits, now).unwrap();
        let _b = t.admit(ip("192.0.2.2"), limits, now).unwrap();
        let _c = t.admit(ip("192.0.2.3"), limits, now).unwrap();
        assert_eq!(t.len(), 3);
        // Over the cap only by the connections that are open (never more than max_connections
        // in the balancer, which the real cap exceeds): they are not evicted.
        let _d = t.admit(ip("192.0.2.4"), limits, now).unwrap();
        assert_eq!(t.len(), 4);
        assert!(t.admit(ip("192.0.2.1"), limits, now).is_err(), "the held entry was kept");
    }
}
