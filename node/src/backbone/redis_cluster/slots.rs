//! Where a key lives in a Redis Cluster: its hash slot (CRC16-XMODEM of the key's hash tag,
//! modulo 16384, as the cluster specification defines it) and the slot map (`CLUSTER SLOTS`:
//! which master serves which slot range). redis-rs computes slots too, but does not expose
//! the number, which the subscription side needs to pick the shard connection of a channel.

use redis::Value;

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC16-XMODEM (polynomial 0x1021, initial value 0), the cluster's key hash.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for b in bytes {
        crc ^= u16::from(*b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The slot of `key`: of its hash tag (the part between the first `{` and the next `}`,
/// when not empty), else of the whole key.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tag = bytes.iter().position(|b| *b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16(tag.unwrap_or(bytes)) % SLOTS
}

/// One master's share of the slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub start: u16,
    pub end: u16,
    /// `HOST:PORT` of the master serving it.
    pub master: String,
}

/// The cluster's slot map, as one node answered `CLUSTER SLOTS`, sorted by range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotMap {
    ranges: Vec<Range>,
}

impl SlotMap {
    /// Parses a `CLUSTER SLOTS` answer: `[[start, end, [host, port, id, …], replicas…], …]`.
    /// `None` when it is not one, or leaves a slot uncovered (the cluster is not whole yet:
    /// a failover in progress).
    pub fn parse(answer: &Value) -> Option<Self> {
        let Value::Array(entries) = answer else { return None };
        let mut ranges = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(fields) = entry else { return None };
            let (start, end) = (int(fields.first()?)?, int(fields.get(1)?)?);
            let Value::Array(node) = fields.get(2)? else { return None };
            let host = text(node.first()?)?;
            let port = int(node.get(1)?)?;
            ranges.push(Range { start, end, master: format!("{host}:{port}") });
        }
        ranges.sort_by_key(|r| r.start);
        let mut next = 0u32;
        for r in &ranges {
            if u32::from(r.start) != next || r.end < r.start {
                return None;
            }
            next = u32::from(r.end) + 1;
        }
        (next == u32::from(SLOTS)).then_some(Self { ranges })
    }

    /// The master serving `slot`.
    pub fn master_of(&self, slot: u16) -> Option<&str> {
        let i = self.ranges.partition_point(|r| r.end < slot);
        self.ranges.get(i).filter(|r| r.start <= slot).map(|r| r.master.as_str())
    }

    /// Every master, each once, in slot order.
    pub fn masters(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.ranges {
            if !out.contains(&r.master) {
                out.push(r.master.clone());
            }
        }
        out
    }
}

fn int(v: &Value) -> Option<u16> {
    match v {
        Value::Int(n) => u16::try_from(*n).ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_specification() {
        // The specification's test vector, and slots `CLUSTER KEYSLOT` answers.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("tether:room:{general}:log"), slot("general"));
        assert_eq!(slot("a{}b"), crc16(b"a{}b") % SLOTS, "an empty tag hashes the whole key");
        assert_eq!(slot("a{b"), crc16(b"a{b") % SLOTS, "an unclosed tag too");
    }

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![Value::BulkString(host.into()), Value::Int(port), Value::BulkString(b"id".to_vec())])
    }

    #[test]
    fn a_slot_map_covers_every_slot_or_is_refused() {
        let entry =
            |s: i64, e: i64, port: i64| Value::Array(vec![Value::Int(s), Value::Int(e), node("127.0.0.1", port)]);
        let whole = Value::Array(vec![entry(8192, 16383, 2), entry(0, 8191, 1)]);
        let map = SlotMap::parse(&whole).unwrap();
        assert_eq!(map.master_of(0), Some("127.0.0.1:1"));
        assert_eq!(map.master_of(8191), Some("127.0.0.1:1"));
        assert_eq!(map.master_of(8192), Some("127.0.0.1:2"));
        assert_eq!(map.master_of(16383), Some("127.0.0.1:2"));
        assert_eq!(map.masters(), vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()]);
        let holed = Value::Array(vec![entry(0, 8000, 1), entry(8192, 16383, 2)]);
        assert!(SlotMap::parse(&holed).is_none());
        assert!(SlotMap::parse(&Value::Int(3)).is_none());
    }
}
