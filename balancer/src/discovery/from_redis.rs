//! Reading the Redis registry (`tether_proto::backbone::RedisKeys::nodes`): one script returns
//! Redis' time and the whole hash together, so freshness is judged on the clock the nodes'
//! announcements were timed with — never ours. Over any [`ConnectionLike`]: a single Redis
//! and a Redis Cluster (the hash is one key, on one shard) read alike.

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::RedisResult;
use tether_proto::backbone::{Announced, NodeRecord, RedisKeys};
use tracing::debug;

/// KEYS: the registry hash. Returns {now in ms on Redis' clock, HGETALL of the hash}.
const READ_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {now, redis.call('HGETALL', KEYS[1])}
"#;

static READ: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(READ_LUA));

/// The registry's fresh entries (renewed within `STALE_AFTER` of Redis' now). Entries that
/// are not records, or whose field is not their record's name, are skipped.
pub async fn read<C: ConnectionLike>(con: &mut C, keys: &RedisKeys) -> RedisResult<Vec<NodeRecord>> {
    let (now, flat): (u64, Vec<String>) = READ.key(keys.nodes()).invoke_async(con).await?;
    Ok(fresh(now, &flat))
}

/// The fresh records of a flat `HGETALL` answer (field, value, field, value, …).
fn fresh(now: u64, flat: &[String]) -> Vec<NodeRecord> {
    flat.chunks_exact(2)
        .filter_map(|pair| match Announced::parse(&pair[1]) {
            Some(a) if a.record.name == pair[0] => a.is_fresh(now).then_some(a.record),
            _ => {
                debug!(field = %pair[0], "registry entry that is not a node record skipped");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_and_foreign_entries_are_left_out() {
        let r = |name: &str| NodeRecord { name: name.into(), addr: "h:1".into(), instance: format!("{name}#1") };
        let value = |name: &str, at: u64| format!("{}{at}}}", r(name).redis_value());
        let flat = vec![
            "a".into(),
            value("a", 10_000),
            "b".into(),
            value("b", 8_400),
            "c".into(),
            "junk".into(),
            "d".into(),
            value("x", 10_000),
        ];
        assert_eq!(fresh(10_000, &flat), [r("a")]);
        assert_eq!(fresh(9_900, &flat), [r("a"), r("b")]);
    }
}
