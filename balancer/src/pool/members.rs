//! Changing the node set from what discovery read (`crate::discovery`): one new snapshot per
//! change, slots never removed (see the parent module's docs).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use tether_proto::backbone::NodeRecord;
use tracing::info;

use super::{Members, Node, Pool};
use crate::config::NodeConfig;
use crate::metrics::Metrics;

/// What one [`Pool::apply_discovered`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// New slots, whose health checks the caller starts.
    pub added: Vec<usize>,
    /// Nodes that joined (new, back, or under a new instance or address), by name.
    pub joined: Vec<String>,
    /// Nodes that left the registry, now tombstones.
    pub left: Vec<String>,
}

impl Pool {
    /// Makes the discovered part of the set what the registry says: `found` is every fresh
    /// entry read. A static node's name in it is ignored (the static entry wins); a name seen
    /// for the first time gets a new slot; one found under a new instance or address, or again
    /// after it left, gets a fresh node (state `up`, an operator's drain kept) in its old slot;
    /// a discovered node missing from `found` becomes a tombstone. Unchanged entries change
    /// nothing (health state included).
    pub fn apply_discovered(&self, found: &[NodeRecord], metrics: &Metrics) -> Changes {
        let _edit = self.edit.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.members.load_full();
        let mut nodes = current.nodes.clone();
        let mut names = current.names.clone();
        let mut changes = Changes::default();
        let mut seen: HashSet<&str> = HashSet::new();
        for record in found {
            if !seen.insert(record.name.as_str()) {
                continue;
            }
            let slot = names.iter().position(|n| *n == record.name);
            if let Some(i) = slot {
                let old = &nodes[i];
                let same = old.instance.as_deref() == Some(record.instance.as_str()) && old.addr == record.addr;
                if old.instance.is_none() || (same && !old.is_gone()) {
                    continue;
                }
            }
            let fresh = Arc::new(Node::discovered(record, metrics));
            match slot {
                Some(i) => {
                    if nodes[i].is_draining() {
                        fresh.draining.store(true, Ordering::Release);
                        fresh.metrics.draining.set(1);
                    }
                    nodes[i] = fresh;
                }
                None => {
                    changes.added.push(nodes.len());
                    nodes.push(fresh);
                    names.push(record.name.clone());
                }
            }
            info!(node = %record.name, addr = %record.addr, instance = %record.instance, "node discovered");
            changes.joined.push(record.name.clone());
        }
        for node in &nodes {
            if node.instance.is_some() && !node.is_gone() && !seen.contains(node.name.as_str()) {
                node.gone.store(true, Ordering::Release);
                node.metrics.up.set(0);
                node.metrics.ready.set(0);
                info!(node = %node.name, addr = %node.addr, "node left the registry; no longer routed to");
                changes.left.push(node.name.clone());
            }
        }
        if !changes.joined.is_empty() {
            self.members.store(Arc::new(Members { nodes, names }));
        }
        changes
    }

    /// How many discovered nodes are present.
    pub fn discovered(&self) -> usize {
        self.members.load().nodes.iter().filter(|n| n.instance.is_some() && !n.is_gone()).count()
    }
}

impl Node {
    /// A node as the registry describes it: `up` (it announces itself only once ready).
    fn discovered(record: &NodeRecord, metrics: &Metrics) -> Self {
        let config = NodeConfig { name: record.name.clone(), addr: record.addr.clone() };
        let mut node = Self::new(&config, metrics.node(&record.name));
        node.instance = Some(record.instance.clone());
        node
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, port: u16, instance: &str) -> NodeRecord {
        NodeRecord { name: name.into(), addr: format!("127.0.0.1:{port}"), instance: instance.into() }
    }

    fn present(pool: &Pool) -> Vec<(String, String)> {
        pool.nodes().iter().map(|n| (n.name.clone(), n.addr.clone())).collect()
    }

    #[test]
    fn joins_append_slots_and_leaves_keep_them_as_tombstones() {
        let metrics = Metrics::new();
        let pool = Pool::new(&[], &metrics);
        let (a, b) = (record("a", 1, "a#1"), record("b", 2, "b#1"));
        let changes = pool.apply_discovered(&[a.clone(), b.clone()], &metrics);
        assert_eq!((changes.added, changes.joined), (vec![0, 1], vec!["a".to_string(), "b".to_string()]));
        assert_eq!(pool.apply_discovered(&[b.clone(), a.clone()], &metrics), Changes::default(), "unchanged");

        pool.get(0).mark_down("refused");
        let changes = pool.apply_discovered(std::slice::from_ref(&b), &metrics);
        assert_eq!(changes.left, ["a"]);
        assert_eq!(present(&pool), [("b".to_string(), "127.0.0.1:2".to_string())]);
        assert_eq!(pool.slots(), 2, "slots stay");
        assert!(pool.rank("x").iter().all(|n| n == "b"), "a tombstone is not ranked");
        assert_eq!(pool.pick("anyone", crate::balance::Balance::Hrw), Some(1));

        // Back under a new instance and address: its old slot, fresh state.
        let a2 = record("a", 3, "a#2");
        let changes = pool.apply_discovered(&[a2, b], &metrics);
        assert_eq!((changes.added, changes.joined), (vec![], vec!["a".to_string()]));
        let back = pool.get(0);
        assert_eq!((back.addr.as_str(), back.state_str(), back.is_gone()), ("127.0.0.1:3", "up", false));
        assert_eq!(pool.discovered(), 2);
    }

    #[test]
    fn a_static_node_wins_over_a_discovered_one_of_the_same_name() {
        let metrics = Metrics::new();
        let pool = Pool::new(&[NodeConfig { name: "a".into(), addr: "10.0.0.1:9".into() }], &metrics);
        let changes = pool.apply_discovered(&[record("a", 1, "a#1")], &metrics);
        assert_eq!(changes, Changes::default());
        assert_eq!(present(&pool), [("a".to_string(), "10.0.0.1:9".to_string())]);
        assert_eq!(pool.apply_discovered(&[], &metrics).left, Vec::<String>::new(), "static nodes never leave");
    }

    #[test]
    fn an_operators_drain_survives_a_restart_under_a_new_instance() {
        let metrics = Metrics::new();
        let pool = Pool::new(&[], &metrics);
        pool.apply_discovered(&[record("a", 1, "a#1")], &metrics);
        pool.get(0).set_draining(true);
        pool.apply_discovered(&[record("a", 1, "a#2")], &metrics);
        assert_eq!(pool.get(0).state_str(), "draining");
    }
}
