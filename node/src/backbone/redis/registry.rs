//! The node registry on Redis (`docs/SCALING.md`, "Node registry and discovery"): one hash,
//! `{prefix}nodes`, field = node name, value = its record with the time of its last
//! announcement on Redis' clock (`tether_proto::backbone::{NodeRecord, Announced}`).
//!
//! Free functions over any [`ConnectionLike`], so a single Redis and a Redis Cluster
//! connection share them: each is one script on one key, routed to that key's shard.

use super::scripts::{ANNOUNCE_LUA, WITHDRAW_LUA};
use redis::aio::ConnectionLike;
use redis::RedisResult;
use std::sync::LazyLock;
use tether_proto::backbone::{NodeRecord, RedisKeys, PRUNE_AFTER};

static ANNOUNCE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ANNOUNCE_LUA));
static WITHDRAW: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(WITHDRAW_LUA));

/// Writes (or renews) `record` with Redis' time, and prunes entries older than
/// [`PRUNE_AFTER`]. Returns that time (ms).
pub async fn announce<C: ConnectionLike>(con: &mut C, keys: &RedisKeys, record: &NodeRecord) -> RedisResult<u64> {
    ANNOUNCE
        .key(keys.nodes())
        .arg(&record.name)
        .arg(record.redis_value())
        .arg(PRUNE_AFTER.as_millis() as u64)
        .invoke_async(con)
        .await
}

/// Removes `record`'s entry if it is still this instance's; `true` if it was removed.
pub async fn withdraw<C: ConnectionLike>(con: &mut C, keys: &RedisKeys, record: &NodeRecord) -> RedisResult<bool> {
    // A string always serialises; as JSON it is escaped exactly as in the stored record.
    let member = format!("\"instance\":{}", serde_json::to_string(&record.instance).expect("strings serialise"));
    let removed: i64 = WITHDRAW.key(keys.nodes()).arg(&record.name).arg(member).invoke_async(con).await?;
    Ok(removed == 1)
}
