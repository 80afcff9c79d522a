//! Announcing this node in its backbone's node registry, so that balancers started with
//! `--discover` find it (`docs/SCALING.md`, "Node registry and discovery").
//!
//! Nothing is announced before the node is first ready (`/readyz` 200): a balancer must not
//! send clients to a node that cannot serve them yet. From then on the record (name, the
//! address balancers should dial, this process' instance) is renewed every
//! [`ANNOUNCE_INTERVAL`], on the backbone's clock; an entry not renewed for
//! `STALE_AFTER` is a dead node's to every balancer. A node that turns unready later keeps
//! announcing as long as the backbone takes the write: balancers then show it `unready` (their
//! health checks tell), keep its clients and can fall back to it, as with a static node.
//! On a graceful stop the record is withdrawn at once, before the listener closes, so
//! balancers stop sending new clients while this node still answers.

use super::{Backbone, NodeRecord};
use std::sync::Arc;
use std::time::Duration;
use tether_proto::backbone::ANNOUNCE_INTERVAL;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often a node not yet ready looks again: its first announcement follows readiness by
/// at most this.
pub const READY_POLL: Duration = Duration::from_millis(50);

/// Announces `record` through `backbone` from the first moment the backbone is ready, every
/// [`ANNOUNCE_INTERVAL`], until `stop`; then withdraws it (if it was ever announced) and ends.
/// Each call is bounded by `timeout`, so the task ends within `timeout` of `stop`.
pub fn spawn(
    backbone: Arc<dyn Backbone>,
    record: NodeRecord,
    timeout: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(run(backbone, record, timeout, stop))
}

async fn run(backbone: Arc<dyn Backbone>, record: NodeRecord, timeout: Duration, stop: CancellationToken) {
    while !backbone.is_ready() {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(READY_POLL) => {}
        }
    }
    info!(node = %record.name, addr = %record.addr, instance = %record.instance, "ready: announcing in the node registry");
    let mut tick = tokio::time::interval(ANNOUNCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let outcome = match tokio::time::timeout(timeout, backbone.announce(&record)).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        };
        match (outcome, failing) {
            (Ok(()), true) => {
                info!(node = %record.name, "announcing in the node registry again");
                failing = false;
            }
            (Ok(()), false) => {}
            (Err(error), false) => {
                warn!(node = %record.name, %error, "announcing in the node registry failed; retrying every interval");
                failing = true;
            }
            (Err(error), true) => debug!(node = %record.name, %error, "announcing still fails"),
        }
    }
    match tokio::time::timeout(timeout, backbone.withdraw(&record)).await {
        Ok(Ok(())) => info!(node = %record.name, "withdrawn from the node registry"),
        Ok(Err(e)) => warn!(node = %record.name, error = %e, "withdrawing from the node registry failed; it expires"),
        Err(_) => warn!(node = %record.name, "withdrawing from the node registry timed out; it expires"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::memory::Store;

    const TTL: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn announces_once_ready_renews_and_withdraws_on_stop() {
        let store = Store::new(TTL);
        let node = store.add_node("a");
        node.connect(false);
        let record = NodeRecord { name: "a".into(), addr: "127.0.0.1:9001".into(), instance: "a#1".into() };
        let stop = CancellationToken::new();
        let task = spawn(Arc::clone(&node.backbone) as Arc<dyn Backbone>, record.clone(), TTL, stop.clone());
        tokio::time::sleep(ANNOUNCE_INTERVAL * 4).await;
        assert_eq!(store.registry(), vec![], "not ready: not announced");

        node.connect(true);
        tokio::time::sleep(READY_POLL * 2).await;
        assert_eq!(store.registry(), vec![(record.clone(), 1)], "announced once ready");
        tokio::time::sleep(ANNOUNCE_INTERVAL * 3).await;
        let renewals = store.registry()[0].1;
        assert!((3..=4).contains(&renewals), "renewed every interval: {renewals}");

        // Unready again: still announced (balancers see it unready, not gone).
        node.connect(false);
        tokio::time::sleep(ANNOUNCE_INTERVAL * 2).await;
        assert!(store.registry()[0].1 > renewals);

        stop.cancel();
        task.await.unwrap();
        assert_eq!(store.registry(), vec![], "withdrawn on stop");
    }

    #[tokio::test(start_paused = true)]
    async fn a_successors_entry_is_not_withdrawn() {
        let store = Store::new(TTL);
        let node = store.add_node("a");
        let old = NodeRecord { name: "a".into(), addr: "127.0.0.1:9001".into(), instance: "a#old".into() };
        let stop = CancellationToken::new();
        let task = spawn(Arc::clone(&node.backbone) as Arc<dyn Backbone>, old.clone(), TTL, stop.clone());
        tokio::time::sleep(READY_POLL).await;
        let new = NodeRecord { instance: "a#new".into(), ..old };
        node.backbone.announce(&new).await.unwrap();
        stop.cancel();
        task.await.unwrap();
        assert_eq!(store.registry().into_iter().map(|(r, _)| r).collect::<Vec<_>>(), [new]);
    }
}
