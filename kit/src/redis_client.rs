//! A Redis client for tools that read what the nodes wrote (room counters, stream heads): one
//! multiplexed connection from the `redis` crate, every call bounded by a deadline so that a
//! Redis that is down or restarting is an error, not a hang.

use anyhow::{anyhow, Context, Result};
use redis::aio::MultiplexedConnection;
use std::time::Duration;
use tokio::time::timeout;

/// A connection to one Redis.
pub struct RedisClient {
    url: String,
    con: MultiplexedConnection,
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient").field("url", &self.url).finish_non_exhaustive()
    }
}

impl RedisClient {
    /// Connects to `url` (`redis://HOST:PORT/`), failing after `within`.
    pub async fn connect(url: &str, within: Duration) -> Result<Self> {
        let client = redis::Client::open(url).with_context(|| format!("{url} is not a Redis URL"))?;
        let con = timeout(within, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| anyhow!("{url}: no connection within {within:?}"))?
            .with_context(|| format!("connecting to {url}"))?;
        Ok(Self { url: url.to_owned(), con })
    }

    /// The connection, for commands this type has no helper for.
    pub fn connection(&mut self) -> &mut MultiplexedConnection {
        &mut self.con
    }

    /// `HMGET key fields…` for every key, pipelined in one round trip: per key, the fields'
    /// values in order (`None` where a field or the key is missing).
    pub async fn hmget_each(&mut self, keys: &[String], fields: &[&str]) -> Result<Vec<Vec<Option<String>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HMGET").arg(key).arg(fields);
        }
        pipe.query_async(&mut self.con).await.with_context(|| format!("HMGET on {}", self.url))
    }
}
