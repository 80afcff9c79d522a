//! What Tether stores in, or sends through, its backbone (Redis or NATS) that more than one
//! process reads: nodes of different releases, the `tether chaos` tool, the end-to-end tests.
//! The bytes are pinned by the golden tests below — running clusters read them.
//!
//! - Frame completion (a message's `seq`/`epoch`, a `user_joined`'s position) is wire format:
//!   [`crate::wire::complete_message`] and [`crate::wire::complete_joined`]. The Redis
//!   backbone does both inside its Lua scripts (they must be atomic with the publish); every
//!   Rust-side completion goes through those two functions.
//! - The stored records: [`SessionRecord`] (a NATS session's JSON; in Redis, the fields of a
//!   hash), [`PresenceEntry`] (one connection's presence, the value of a Redis presence hash).
//! - Node instances: [`instance_id`], and the names derived from it ([`conn_field`],
//!   [`instance_member`]).
//! - [`RedisKeys`]: the Redis key and channel layout (`docs/PROTOCOL.md` describes it).
//! - The node registry, which balancers started with `--discover` read: [`NodeRecord`] (what
//!   a node announces), its timing ([`ANNOUNCE_INTERVAL`], [`STALE_AFTER`]), its Redis hash
//!   ([`RedisKeys::nodes`]) and its NATS stream ([`NatsRegistry`]); and the NATS name parts
//!   ([`nats_prefix`], [`nats_token`]) every NATS name is built from.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What a client's session keeps between connections: written on every change, so that a
/// node killed without warning loses nothing of it. Under NATS it is stored as this JSON;
/// under Redis as the hash fields `name` (absent when `None`) and `rooms` (a JSON array).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub name: Option<String>,
    pub rooms: Vec<String>,
}

/// One connection's presence entry, stored as this JSON (`{"id","user","server"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub id: String,
    pub user: String,
    pub server: String,
}

/// A command for every node, sent by the server API through the backbone's control channel
/// (Redis: [`RedisKeys::control`]; NATS: subject `P.control`): each node acts on its own
/// connections of `client`. Stored as this JSON (`{"cmd":"disconnect",…}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ControlCommand {
    /// Close every connection of `client` with this close code and reason.
    Disconnect { client: String, code: u16, reason: String },
    /// Take every connection of `client` out of `room` (members hear `user_left`, reason
    /// `removed`); the connections stay open.
    Unsubscribe { client: String, room: String },
}

impl ControlCommand {
    pub fn to_json(&self) -> String {
        // An enum of strings and a number always serialises.
        serde_json::to_string(self).expect("control commands serialise")
    }
}

/// A node process' presence instance, `NAME#RANDOM`: new at every start, so a node restarted
/// under the same name is a new instance (its predecessor's entries are reaped, not adopted).
pub fn instance_id(node_name: &str) -> String {
    format!("{node_name}#{}", &crate::id::mint_client_id()[..12])
}

/// The field one connection's presence entry is stored under: `INSTANCE/CONN`. The reaper
/// finds a dead instance's entries by the part before the first `/`.
pub fn conn_field(instance: &str, conn: u64) -> String {
    format!("{instance}/{conn}")
}

/// What an instance's bookkeeping set lists for one entry: `CONN|ROOM` (`CONN|` for `online`).
pub fn instance_member(conn: u64, room: Option<&str>) -> String {
    format!("{conn}|{}", room.unwrap_or(""))
}

/// The Redis key layout under a key prefix (braces literal: a Redis Cluster hash tag, so a
/// room's keys share one slot). The reaper's Lua script builds the same names from the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisKeys {
    prefix: String,
}

impl RedisKeys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_string() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// What every room channel starts with: `{prefix}room:{`.
    pub fn channel_head(&self) -> String {
        format!("{}room:{{", self.prefix)
    }

    /// The room's pub/sub channel, `{prefix}room:{ROOM}`.
    pub fn channel(&self, room: &str) -> String {
        format!("{}room:{{{room}}}", self.prefix)
    }

    /// The room's counter hash (fields `seq`, `epoch`).
    pub fn meta(&self, room: &str) -> String {
        format!("{}room:{{{room}}}:meta", self.prefix)
    }

    /// The room's log stream (entry ids `SEQ-0`, field `f`).
    pub fn log(&self, room: &str) -> String {
        format!("{}room:{{{room}}}:log", self.prefix)
    }

    /// A room's counter, log and channel together, as the publish step needs them (the
    /// channel's name built once).
    pub fn room(&self, room: &str) -> RoomKeys {
        let channel = self.channel(room);
        RoomKeys { meta: format!("{channel}:meta"), log: format!("{channel}:log"), channel }
    }

    /// Where a dedup key of an idempotent publish to `room` remembers the first message's
    /// `seq|epoch`: in the room's hash slot, so the publish step stays one atomic script on
    /// a Redis Cluster too.
    pub fn dedup(&self, room: &str, key: &str) -> String {
        format!("{}:dedup:{key}", self.channel(room))
    }

    /// A client's session hash.
    pub fn session(&self, id: &str) -> String {
        format!("{}session:{{{id}}}", self.prefix)
    }

    /// A room's presence entries hash (`None`: the cluster-wide `online` list).
    pub fn presence(&self, room: Option<&str>) -> String {
        match room {
            Some(room) => format!("{}presence:{{{room}}}", self.prefix),
            None => format!("{}online", self.prefix),
        }
    }

    /// The cluster-wide `online` list on a Redis Cluster backbone: `{prefix}{online}`,
    /// hash-tagged so that its `:ids` and `:meta` ([`RedisKeys::presence_ids`], the position
    /// hash) share its slot and each presence step stays one script in one slot.
    pub fn sharded_online(&self) -> String {
        format!("{}{{online}}", self.prefix)
    }

    /// Its per-client-id connection counts: the presence hash's name + `:ids` (the presence
    /// scripts derive it the same way).
    pub fn presence_ids(presence: &str) -> String {
        format!("{presence}:ids")
    }

    /// The position hash a `user_joined` in `room` is completed from (`online` has none,
    /// but the script reads a key all the same).
    pub fn position(&self, room: Option<&str>) -> String {
        match room {
            Some(room) => self.meta(room),
            None => format!("{}online:meta", self.prefix),
        }
    }

    /// The sorted set of live instances (score: last heartbeat, on Redis' clock).
    pub fn instances(&self) -> String {
        format!("{}instances", self.prefix)
    }

    /// What an instance registered (members from [`instance_member`]).
    pub fn instance_set(&self, instance: &str) -> String {
        format!("{}instance:{{{instance}}}", self.prefix)
    }

    /// Pending webhook events: a sorted set of event keys scored by due time (ms, Redis'
    /// clock). Hash-tagged `{pending}` with [`RedisKeys::webhooks_pending_data`], so the claim
    /// script touches one slot.
    pub fn webhooks_pending(&self) -> String {
        format!("{}webhooks:{{pending}}", self.prefix)
    }

    /// Each pending webhook event's stored form (`TYPE AT_MS DATA_JSON`), by event key.
    pub fn webhooks_pending_data(&self) -> String {
        format!("{}webhooks:{{pending}}:data", self.prefix)
    }

    /// The channel an instance probes its own subscription on.
    pub fn probe(&self, instance: &str) -> String {
        format!("{}probe:{{{instance}}}", self.prefix)
    }

    /// The channel every node subscribes to for cluster-wide commands ([`ControlCommand`]).
    pub fn control(&self) -> String {
        format!("{}control", self.prefix)
    }
}

impl RedisKeys {
    /// The node registry: a hash, field = node name, value = [`NodeRecord::redis_value`]
    /// completed by the announce script with the time of the announcement on Redis' clock.
    /// One key, so the registry works unchanged on a Redis Cluster.
    pub fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }
}

/// How often a node renews its registry entry.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(500);

/// An entry not renewed for this long (on the backbone's clock) is a dead node's: balancers
/// drop it. Three announce intervals: one late announcement is not a death.
pub const STALE_AFTER: Duration = Duration::from_millis(1500);

/// A Redis registry entry this old is deleted by the next announcement of any node, so the
/// hash does not keep the names of nodes long gone.
pub const PRUNE_AFTER: Duration = Duration::from_secs(60);

/// What a node announces in the registry: who it is, where balancers should dial it, and its
/// instance (new at every start; a restart under the same name is the same node to balancers,
/// with fresh health). Stored as this JSON (`{"name","addr","instance"}`); in Redis with
/// `"at"` (ms, Redis' clock) appended by the announce script.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub addr: String,
    pub instance: String,
}

/// A registry entry as read back from Redis: the record and when it was last announced.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Announced {
    #[serde(flatten)]
    pub record: NodeRecord,
    /// Milliseconds since the epoch on Redis' clock.
    pub at: u64,
}

impl NodeRecord {
    pub fn to_json(&self) -> String {
        // Three strings always serialise.
        serde_json::to_string(self).expect("node records serialise")
    }

    /// The record's JSON without its closing brace, ending in `,"at":`: the announce script
    /// appends the time and the brace (as the publish script completes a frame's seq).
    pub fn redis_value(&self) -> String {
        let mut json = self.to_json();
        json.pop();
        json.push_str(",\"at\":");
        json
    }
}

impl Announced {
    /// Parses a registry hash value; `None` for one that is not a record.
    pub fn parse(value: &str) -> Option<Self> {
        serde_json::from_str(value).ok()
    }

    /// Whether it was renewed within [`STALE_AFTER`] of `now_ms` (the same clock).
    pub fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.at) <= STALE_AFTER.as_millis() as u64
    }
}

/// Whether `addr` is a `HOST:PORT` a balancer can dial: a non-zero port, and a host that is
/// an IPv4 address, a bracketed IPv6 address or a DNS name (resolved at connect time). The
/// reason, when it is not. Used for the balancer's nodes, static or discovered, and for the
/// address a node announces.
pub fn check_host_port(addr: &str) -> Result<(), String> {
    if let Ok(sock) = addr.parse::<std::net::SocketAddr>() {
        return if sock.port() == 0 { Err(format!("{addr:?} has port 0")) } else { Ok(()) };
    }
    let bad = || format!("{addr:?} is not HOST:PORT");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(format!("{addr:?} has port 0"));
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if host_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// A configured key prefix as a name part NATS accepts everywhere (subjects, streams):
/// anything but letters, digits, `-` and `_` becomes `_`; trailing `:`/`.` dropped;
/// `tether` when nothing is left.
pub fn nats_prefix(prefix: &str) -> String {
    let p: String = prefix
        .trim_end_matches([':', '.'])
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    if p.is_empty() {
        "tether".to_string()
    } else {
        p
    }
}

/// Any string (a room, a client id, a node name) as one valid NATS subject token: unpadded
/// base64url.
pub fn nats_token(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s.as_bytes())
}

/// The NATS registry: a stream (memory, one message per subject, messages older than
/// [`STALE_AFTER`] expired by the server, on its clock) with one subject per node holding its
/// [`NodeRecord`] JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsRegistry {
    /// `P` of [`nats_prefix`].
    prefix: String,
}

impl NatsRegistry {
    /// The registry under a configured key prefix (made NATS-safe here).
    pub fn new(prefix: &str) -> Self {
        Self { prefix: nats_prefix(prefix) }
    }

    /// `P_nodes`.
    pub fn stream(&self) -> String {
        format!("{}_nodes", self.prefix)
    }

    /// `P.node.*`: every node's subject.
    pub fn subjects(&self) -> String {
        format!("{}.node.*", self.prefix)
    }

    /// `P.node.TOKEN`: node `name`'s subject.
    pub fn subject(&self, name: &str) -> String {
        format!("{}.node.{}", self.prefix, nats_token(name))
    }
}

/// One room's keys: see [`RedisKeys::room`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomKeys {
    pub meta: String,
    pub log: String,
    pub channel: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_records_are_pinned() {
        let entry = PresenceEntry { id: "i".into(), user: "u".into(), server: "n".into() };
        assert_eq!(serde_json::to_string(&entry).unwrap(), r#"{"id":"i","user":"u","server":"n"}"#);
        let session = SessionRecord { name: None, rooms: vec!["a".into(), "b".into()] };
        assert_eq!(serde_json::to_string(&session).unwrap(), r#"{"name":null,"rooms":["a","b"]}"#);
        let named = SessionRecord { name: Some("x".into()), rooms: vec![] };
        assert_eq!(serde_json::to_string(&named).unwrap(), r#"{"name":"x","rooms":[]}"#);
        assert_eq!(serde_json::from_str::<SessionRecord>(r#"{"name":"x","rooms":[]}"#).unwrap(), named);
    }

    #[test]
    fn instance_names_are_pinned() {
        let inst = instance_id("node-1");
        let (name, random) = inst.split_once('#').unwrap();
        assert_eq!((name, random.len()), ("node-1", 12));
        assert_ne!(inst, instance_id("node-1"), "a new instance at every start");
        assert_eq!(conn_field("n#abc", 4), "n#abc/4");
        assert_eq!(instance_member(4, Some("r")), "4|r");
        assert_eq!(instance_member(4, None), "4|");
    }

    #[test]
    fn redis_keys_are_pinned() {
        let k = RedisKeys::new("tether:");
        assert_eq!(k.channel("r"), "tether:room:{r}");
        assert_eq!(k.channel_head(), "tether:room:{");
        assert_eq!(k.meta("r"), "tether:room:{r}:meta");
        assert_eq!(k.log("r"), "tether:room:{r}:log");
        assert_eq!(k.session("c"), "tether:session:{c}");
        assert_eq!(k.presence(Some("r")), "tether:presence:{r}");
        assert_eq!(k.presence(None), "tether:online");
        assert_eq!(k.sharded_online(), "tether:{online}");
        assert_eq!(RedisKeys::presence_ids(&k.presence(Some("r"))), "tether:presence:{r}:ids");
        let room = k.room("r");
        assert_eq!((room.meta, room.log, room.channel), (k.meta("r"), k.log("r"), k.channel("r")));
        assert_eq!(k.position(Some("r")), "tether:room:{r}:meta");
        assert_eq!(k.position(None), "tether:online:meta");
        assert_eq!(k.instances(), "tether:instances");
        assert_eq!(k.instance_set("n#a"), "tether:instance:{n#a}");
        assert_eq!(k.probe("n#a"), "tether:probe:{n#a}");
        assert_eq!(k.control(), "tether:control");
        assert_eq!(k.webhooks_pending(), "tether:webhooks:{pending}");
        assert_eq!(k.webhooks_pending_data(), "tether:webhooks:{pending}:data");
        assert_eq!(k.nodes(), "tether:nodes");
    }

    #[test]
    fn registry_records_are_pinned() {
        let r = NodeRecord { name: "n1".into(), addr: "10.0.0.5:9001".into(), instance: "n1#abc".into() };
        assert_eq!(r.to_json(), r#"{"name":"n1","addr":"10.0.0.5:9001","instance":"n1#abc"}"#);
        assert_eq!(r.redis_value(), r#"{"name":"n1","addr":"10.0.0.5:9001","instance":"n1#abc","at":"#);
        let stored = format!("{}1700000000123}}", r.redis_value());
        let read = Announced::parse(&stored).unwrap();
        assert_eq!((read.record.clone(), read.at), (r, 1_700_000_000_123));
        assert!(read.is_fresh(1_700_000_000_123 + 1500) && !read.is_fresh(1_700_000_000_123 + 1501));
        assert!(read.is_fresh(0), "a clock behind the entry: fresh, not an underflow");
        assert_eq!(Announced::parse("garbage"), None);
        let nats = NatsRegistry::new("tether:");
        assert_eq!((nats.stream(), nats.subjects()), ("tether_nodes".to_string(), "tether.node.*".to_string()));
        assert_eq!(nats.subject("n1"), "tether.node.bjE");
    }

    #[test]
    fn dialable_addresses() {
        for ok in ["127.0.0.1:9001", "[::1]:9001", "node-1.internal:80", "n_1:1"] {
            assert_eq!(check_host_port(ok), Ok(()), "{ok}");
        }
        for bad in ["127.0.0.1:0", "host:0", "host", ":9001", "ho st:1", "host:99999", "[::1]:0"] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn any_name_is_one_valid_nats_token() {
        for room in ["general", "a.b", "x>*", "ünï", "a/b\\c"] {
            let t = nats_token(room);
            assert!(t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{room} → {t}");
        }
        assert_ne!(nats_token("a.b"), nats_token("a_b"));
    }

    #[test]
    fn prefix_becomes_a_safe_nats_name_part() {
        assert_eq!(nats_prefix("tether:"), "tether");
        assert_eq!(nats_prefix("app.one:"), "app_one");
        assert_eq!(nats_prefix(":"), "tether");
    }

    #[test]
    fn control_commands_are_pinned() {
        let d = ControlCommand::Disconnect { client: "a".into(), code: 4000, reason: "bye".into() };
        assert_eq!(d.to_json(), r#"{"cmd":"disconnect","client":"a","code":4000,"reason":"bye"}"#);
        let u = ControlCommand::Unsubscribe { client: "a".into(), room: "r".into() };
        assert_eq!(u.to_json(), r#"{"cmd":"unsubscribe","client":"a","room":"r"}"#);
        assert_eq!(serde_json::from_str::<ControlCommand>(&d.to_json()).unwrap(), d);
    }
}
