//! Discovery (`--discover URL`): following the node registry the nodes announce themselves in
//! (Redis, Redis Cluster or NATS; `docs/SCALING.md`, "Node registry and discovery").
//!
//! Every [`POLL_INTERVAL`] the registry is read whole, and the pool's discovered part is made
//! what it says ([`crate::pool::Pool::apply_discovered`]): nodes join and leave without a
//! restart. Freshness is judged on the backbone's clock (Redis: its `TIME`; NATS: the stream's
//! `max_age`), so balancers whose clocks disagree still agree on the set; and HRW depends on
//! the set alone, so balancers that read the same registry route every client alike. A read
//! that fails changes nothing: a registry outage freezes the set, it does not empty it (health
//! checks still follow each node). Discovered nodes are health-checked like static ones; the
//! checks of new slots are started here.
//!
//! Layout: `from_redis` and `from_nats`, one read of each registry; the URL is parsed in
//! `config::discover`.

mod from_nats;
mod from_redis;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use tether_proto::backbone::{NatsRegistry, NodeRecord, RedisKeys};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{check_node_name, Discover, Source};
use crate::Shared;

/// Time between two reads of the registry. With the nodes' 500 ms announcements and 1.5 s
/// staleness, a join is seen within ~0.3 s of the node's first announcement and a death
/// within ~1.8 s of its last one (health checks mark it `down` sooner).
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Deadline of one read, connecting included: a registry that does not answer is an
/// outage, and the set stays as it is.
pub const READ_TIMEOUT: Duration = Duration::from_secs(1);

/// A live connection to the registry.
enum Conn {
    Redis(MultiplexedConnection),
    Cluster(ClusterConnection),
    Nats(async_nats::jetstream::Context),
}

/// Reads the registry, (re)connecting as needed.
struct Reader {
    discover: Discover,
    conn: Option<Conn>,
}

impl Reader {
    async fn connect(&self) -> Result<Conn, String> {
        Ok(match &self.discover.source {
            Source::Redis(url) => {
                let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(READ_TIMEOUT))
                    .set_response_timeout(Some(READ_TIMEOUT));
                Conn::Redis(
                    client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| e.to_string())?,
                )
            }
            Source::RedisCluster(seeds) => {
                let client = redis::cluster::ClusterClient::builder(seeds.clone())
                    .connection_timeout(READ_TIMEOUT)
                    .response_timeout(READ_TIMEOUT)
                    .build()
                    .map_err(|e| e.to_string())?;
                Conn::Cluster(client.get_async_connection().await.map_err(|e| e.to_string())?)
            }
            Source::Nats(servers) => {
                let addrs = servers
                    .iter()
                    .map(|s| s.parse::<async_nats::ServerAddr>().map_err(|e| format!("{s}: {e}")))
                    .collect::<Result<Vec<_>, _>>()?;
                let client = async_nats::ConnectOptions::new()
                    .name("tether-balancer discovery")
                    .connection_timeout(READ_TIMEOUT)
                    .request_timeout(Some(READ_TIMEOUT))
                    .connect(addrs)
                    .await
                    .map_err(|e| e.to_string())?;
                Conn::Nats(async_nats::jetstream::new(client))
            }
        })
    }

    /// One read of every fresh record. A failed Redis connection is dropped (redis-rs does
    /// not reconnect a multiplexed one by itself); the NATS client reconnects on its own.
    async fn read(&mut self) -> Result<Vec<NodeRecord>, String> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        let keys = RedisKeys::new(&self.discover.prefix);
        let (conn, result) = match conn {
            Conn::Redis(mut c) => {
                let r = read_redis(&mut c, &keys).await;
                (r.is_ok().then_some(Conn::Redis(c)), r)
            }
            Conn::Cluster(mut c) => {
                let r = read_redis(&mut c, &keys).await;
                (r.is_ok().then_some(Conn::Cluster(c)), r)
            }
            Conn::Nats(js) => {
                let r = from_nats::read(&js, &NatsRegistry::new(&self.discover.prefix)).await;
                (Some(Conn::Nats(js)), r)
            }
        };
        self.conn = conn;
        result
    }
}

async fn read_redis<C: ConnectionLike>(con: &mut C, keys: &RedisKeys) -> Result<Vec<NodeRecord>, String> {
    from_redis::read(con, keys).await.map_err(|e| e.to_string())
}

/// Follows the registry until `stop`.
pub(crate) struct Follower {
    shared: Arc<Shared>,
    reader: Reader,
    /// Health checks of the slots discovery added.
    checks: JoinSet<()>,
    /// Whether the last read failed (logged on the flip only).
    failing: bool,
    /// Registry entries refused (bad name or address), each warned about once.
    refused: std::collections::HashSet<NodeRecord>,
    stop: CancellationToken,
}

impl Follower {
    pub(crate) fn new(shared: Arc<Shared>, discover: Discover, stop: CancellationToken) -> Self {
        let reader = Reader { discover, conn: None };
        Self { shared, reader, checks: JoinSet::new(), failing: false, refused: Default::default(), stop }
    }

    /// One read and its application, within [`READ_TIMEOUT`].
    pub(crate) async fn round(&mut self) {
        let read = match tokio::time::timeout(READ_TIMEOUT, self.reader.read()).await {
            Ok(read) => read,
            Err(_) => {
                // A connection that does not answer is not reused.
                self.reader.conn = None;
                Err(format!("no answer within {} ms", READ_TIMEOUT.as_millis()))
            }
        };
        let shared = Arc::clone(&self.shared);
        let metrics = &shared.metrics;
        metrics.discovery_read(read.is_ok());
        let found = match read {
            Ok(found) => found,
            Err(error) => {
                if !std::mem::replace(&mut self.failing, true) {
                    warn!(registry = %self.reader.discover.source, %error, "reading the node registry failed; keeping the node set as it is");
                } else {
                    debug!(%error, "reading the node registry still fails");
                }
                return;
            }
        };
        if std::mem::replace(&mut self.failing, false) {
            info!(registry = %self.reader.discover.source, "node registry readable again");
        }
        let valid: Vec<NodeRecord> = found.into_iter().filter(|r| self.usable(r)).collect();
        let changes = shared.pool.apply_discovered(&valid, metrics);
        for &index in &changes.added {
            self.checks.spawn(crate::health::check_loop(Arc::clone(&shared), index, self.stop.clone()));
        }
        // A node that joins is one that comes back: under `rebalance = "paced"` the clients
        // that rank it first move to it (a return after `down` also fires from its health
        // check; firing twice only re-asks the tunnels).
        for name in &changes.joined {
            if let Some(index) = shared.pool.slot_index(name) {
                crate::rebalance::node_available(&shared, index);
            }
        }
        metrics.discovery_changed("joined", changes.joined.len());
        metrics.discovery_changed("left", changes.left.len());
        metrics.discovered_nodes.set(shared.pool.discovered() as i64);
    }

    /// Whether a record can be routed to: a name and an address the balancer accepts of
    /// static nodes too. Anything else is skipped (with one warning per entry): a
    /// misconfigured node must not stop the others from being followed.
    fn usable(&mut self, record: &NodeRecord) -> bool {
        let check = check_node_name(&record.name).and_then(|()| tether_proto::backbone::check_host_port(&record.addr));
        if let Err(reason) = &check {
            if self.refused.len() < 1024 && self.refused.insert(record.clone()) {
                warn!(node = %record.name, addr = %record.addr, %reason, "registry entry refused: not routed to");
            }
        }
        check.is_ok()
    }

    /// Rounds every [`POLL_INTERVAL`] until `stop`; then its health checks end too.
    pub(crate) async fn run(mut self) {
        let stop = self.stop.clone();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + POLL_INTERVAL, POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.round() => {}
            }
        }
        self.checks.shutdown().await;
    }
}
