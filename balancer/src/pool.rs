//! The node pool: each node's state (`up`, `unready`, `down`, `draining`), its counters, and
//! the choice of a node for a client id.
//!
//! The set of nodes is a snapshot behind an `ArcSwap`: static nodes from the config, plus the
//! ones discovery found (`crate::discovery`, applied in `members`). Slots are append-only, so
//! a node's index stays valid for the balancer's life (tunnels and health checks keep one): a
//! node that leaves the registry becomes a *tombstone* (out of routing and of `/status`), and
//! one found again under the same name takes its old slot back. HRW ranks the present nodes
//! only, so a join moves just the clients that now rank the newcomer first, and a departure
//! just the departed node's clients.
//!
//! This is consulted once per client connection, before the upstream connect. Reads are plain
//! atomic loads — no lock on the hot path. State changes (health probes, failed connects,
//! admin drain) are rare and go through a small per-node mutex so that a flip is decided, and
//! logged, exactly once. A flip to `down` also fires the node's *down signal*, which closes
//! every tunnel to that node (a client must notice promptly that its node is gone); an
//! operator's drain fires its *drain signal*, which makes every tunnel to that node send its
//! client a 1012 close frame at the next frame boundary and hang up.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use std::time::Duration;

use arc_swap::ArcSwap;
use tether_proto::hrw;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::balance::{choose as choose_node, Balance, Placing};
mod members;

use crate::config::NodeConfig;
use crate::metrics::{CheckResult, Metrics, NodeMetrics};
use crate::Error;

/// What the health checks (and failed connects) say about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Answers `/readyz` with 200: takes clients.
    Up = 0,
    /// Alive but `/readyz` is not 200 (say, its Redis is away): takes clients only when no node
    /// is `up`, and keeps the ones it has.
    Unready = 1,
    /// Refuses or times out: takes no clients, and its tunnels are closed.
    Down = 2,
}

impl Health {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Up,
            1 => Self::Unready,
            _ => Self::Down,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Unready => "unready",
            Self::Down => "down",
        }
    }
}

/// The outcome of one `/readyz` probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Answered 200.
    Ready,
    /// Answered with another status.
    Unready(u16),
    /// Refused, reset, or did not speak HTTP: the node is gone.
    Failed(String),
    /// No answer within the timeout: the node is gone *or only overloaded*. It goes down for
    /// routing all the same, but its open tunnels are left alone (an overloaded node whose
    /// accept queue is full must not lose its thousands of live clients on top of it).
    TimedOut(String),
}

/// The health state machine, free of clocks and I/O: the state after `probe`, given the
/// current state and the count of consecutive answered probes while `down`.
///
/// A failure takes a node down at once; a `down` node comes back only after `rise`
/// consecutive answered probes (flapping nodes stay out); an alive node simply follows
/// its `/readyz` answer.
pub fn next_health(current: Health, streak: u32, probe: &Probe, rise: u32) -> (Health, u32) {
    let answered = match probe {
        Probe::Failed(_) | Probe::TimedOut(_) => return (Health::Down, 0),
        Probe::Ready => Health::Up,
        Probe::Unready(_) => Health::Unready,
    };
    if current != Health::Down {
        return (answered, 0);
    }
    let streak = streak.saturating_add(1);
    if streak >= rise {
        (answered, 0)
    } else {
        (Health::Down, streak)
    }
}

/// One node and everything the balancer knows about it.
#[derive(Debug)]
pub struct Node {
    /// Stable name: what HRW ranks, the metrics label and the admin handle.
    pub name: String,
    /// `host:port` to connect to (resolved at connect time, so DNS changes are followed).
    pub addr: String,
    /// [`Health`] as a `u8`, read on every routing decision.
    health: AtomicU8,
    /// Set by the admin `drain` and kept until `undrain`, whatever the probes say.
    draining: AtomicBool,
    /// Serialises state changes (health flips, drain and undrain) and holds the count of
    /// consecutive answered probes while down.
    transition: Mutex<u32>,
    /// Cancelled (and replaced by a fresh token) when the node goes down; each tunnel holds the
    /// token current when it connected.
    down_signal: ArcSwap<CancellationToken>,
    /// Whether the current `down` period has fired `down_signal` (a definitive failure); a
    /// down by timeout alone has not, and a later definitive failure still fires it.
    tunnels_cut: AtomicBool,
    /// Set when the node goes down, cleared when it is next `up`: that flip is a *return*,
    /// which may start a paced rebalance onto it ([`crate::rebalance`]).
    was_down: AtomicBool,
    /// Cancelled (and replaced) when an operator drains the node; like `down_signal`, each
    /// tunnel holds the token current when it connected.
    drain_signal: ArcSwap<CancellationToken>,
    /// Counters and gauges; also the source of `/status`'s connection counts.
    pub metrics: NodeMetrics,
    /// The registry instance it was discovered as; `None` for a static node.
    pub instance: Option<String>,
    /// Set when a discovered node left the registry: a tombstone, routed to by no one.
    gone: AtomicBool,
}

impl Node {
    fn new(config: &NodeConfig, metrics: NodeMetrics) -> Self {
        // Nodes start `up`: routing works from the first request, and a node that is in fact
        // dead is found by the first failed connect (which fails over at once) or probe.
        metrics.up.set(1);
        metrics.ready.set(1);
        Self {
            name: config.name.clone(),
            addr: config.addr.clone(),
            health: AtomicU8::new(Health::Up as u8),
            draining: AtomicBool::new(false),
            transition: Mutex::new(0),
            down_signal: ArcSwap::from_pointee(CancellationToken::new()),
            tunnels_cut: AtomicBool::new(false),
            was_down: AtomicBool::new(false),
            drain_signal: ArcSwap::from_pointee(CancellationToken::new()),
            metrics,
            instance: None,
            gone: AtomicBool::new(false),
        }
    }

    /// Whether it left the registry (a tombstone); static nodes never do.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Acquire))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The state shown to operators: `draining` wins over health.
    pub fn state_str(&self) -> &'static str {
        if self.is_draining() {
            "draining"
        } else {
            self.health().as_str()
        }
    }

    /// The token a new tunnel to this node should watch.
    pub fn down_signal(&self) -> CancellationToken {
        CancellationToken::clone(&self.down_signal.load())
    }

    /// The token a new tunnel to this node should watch for a drain. Take it *before*
    /// checking [`Node::is_draining`]: a drain sets the flag before it fires the token, so a
    /// caller that then sees the flag clear holds a token that the next drain will fire.
    pub fn drain_signal(&self) -> CancellationToken {
        CancellationToken::clone(&self.drain_signal.load())
    }

    /// Records a refused or failed connect: the node is down from now on, until probes bring
    /// it back, and its open tunnels are closed.
    pub fn mark_down(&self, reason: &str) {
        let mut streak = self.transition.lock().unwrap_or_else(PoisonError::into_inner);
        *streak = 0;
        self.set_health(Health::Down, reason, true);
    }

    /// Records a connect that timed out: down for routing, but open tunnels are kept — the
    /// node may only be overloaded (see [`Probe::TimedOut`]).
    pub fn mark_suspect(&self, reason: &str) {
        let mut streak = self.transition.lock().unwrap_or_else(PoisonError::into_inner);
        *streak = 0;
        self.set_health(Health::Down, reason, false);
    }

    /// Feeds one probe result into the state machine; `true` when it brought the node back
    /// `up` after it was `down` (a return: see [`crate::rebalance::node_available`]).
    pub fn apply_probe(&self, probe: &Probe, rise: u32) -> bool {
        let result = match probe {
            Probe::Ready => CheckResult::ready,
            Probe::Unready(_) => CheckResult::unready,
            Probe::Failed(_) | Probe::TimedOut(_) => CheckResult::failed,
        };
        self.metrics.checks[result as usize].inc();
        let mut streak = self.transition.lock().unwrap_or_else(PoisonError::into_inner);
        let (next, next_streak) = next_health(self.health(), *streak, probe, rise);
        *streak = next_streak;
        let reason = match probe {
            Probe::Ready => "readyz answered 200".to_owned(),
            Probe::Unready(code) => format!("readyz answered {code}"),
            Probe::Failed(why) | Probe::TimedOut(why) => why.clone(),
        };
        self.set_health(next, &reason, !matches!(probe, Probe::TimedOut(_)));
        next == Health::Up && self.was_down.swap(false, Ordering::AcqRel)
    }

    /// Sets the health; logs only on a flip. A definitive `down` (`cut_tunnels`) fires the
    /// down signal once per down period. Called with `transition` held.
    fn set_health(&self, next: Health, reason: &str, cut_tunnels: bool) {
        let prev = Health::from_u8(self.health.swap(next as u8, Ordering::AcqRel));
        if next == Health::Down {
            self.was_down.store(true, Ordering::Release);
        }
        if next != Health::Down {
            self.tunnels_cut.store(false, Ordering::Release);
        } else if cut_tunnels && !self.tunnels_cut.swap(true, Ordering::AcqRel) {
            let old = self.down_signal.swap(Arc::new(CancellationToken::new()));
            old.cancel();
        }
        if prev == next {
            return;
        }
        self.metrics.state_changes.inc();
        self.metrics.up.set(i64::from(next != Health::Down));
        self.metrics.ready.set(i64::from(next == Health::Up));
        match next {
            Health::Down => {
                let tunnels = if cut_tunnels { "closed" } else { "kept (it may only be slow)" };
                warn!(node = %self.name, addr = %self.addr, from = prev.as_str(), reason, tunnels, "node down");
            }
            Health::Unready => {
                warn!(node = %self.name, from = prev.as_str(), reason, "node unready");
            }
            Health::Up => info!(node = %self.name, from = prev.as_str(), reason, "node up"),
        }
    }

    /// Sets or clears the operator's drain flag; returns whether it changed. Setting it also
    /// fires the drain signal: the node's open tunnels close with 1012.
    pub fn set_draining(&self, on: bool) -> bool {
        // Serialised with health flips so that a drain and an undrain racing each other
        // cannot fire a signal for the wrong one.
        let _transition = self.transition.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = self.draining.swap(on, Ordering::AcqRel) != on;
        if changed {
            self.metrics.draining.set(i64::from(on));
            info!(node = %self.name, draining = on, "drain flag changed by admin");
            if on {
                let old = self.drain_signal.swap(Arc::new(CancellationToken::new()));
                old.cancel();
            }
        }
        changed
    }

    /// The routing tier of this node: `None` when it must not take new clients.
    pub(crate) fn tier(&self) -> Option<Health> {
        match self.health() {
            _ if self.is_draining() || self.is_gone() => None,
            Health::Down => None,
            h => Some(h),
        }
    }
}

/// One snapshot of the node set: every slot, in the order the nodes were first seen (config
/// order, then discovery order), plus their names in the form HRW ranks. Tombstones stay in
/// it, so indexes never move.
#[derive(Debug)]
struct Members {
    nodes: Vec<Arc<Node>>,
    names: Vec<String>,
}

/// All nodes (see the module docs): read through a snapshot, changed only by discovery.
#[derive(Debug)]
pub struct Pool {
    members: ArcSwap<Members>,
    /// Serialises changes of the set, so that two never start from the same snapshot.
    edit: Mutex<()>,
}

impl Pool {
    pub fn new(configs: &[NodeConfig], metrics: &Metrics) -> Self {
        let nodes: Vec<Arc<Node>> = configs.iter().map(|c| Arc::new(Node::new(c, metrics.node(&c.name)))).collect();
        let names = configs.iter().map(|c| c.name.clone()).collect();
        Self { members: ArcSwap::from_pointee(Members { nodes, names }), edit: Mutex::new(()) }
    }

    /// The present nodes (tombstones left out), in slot order.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.members.load().nodes.iter().filter(|n| !n.is_gone()).cloned().collect()
    }

    /// How many slots there are (tombstones included): every index below it is valid.
    pub fn slots(&self) -> usize {
        self.members.load().nodes.len()
    }

    /// The node in slot `index` now (a node found again may have replaced the one there).
    pub fn get(&self, index: usize) -> Arc<Node> {
        Arc::clone(&self.members.load().nodes[index])
    }

    /// The node of that name, tombstone or not.
    pub fn by_name(&self, name: &str) -> Option<Arc<Node>> {
        self.members.load().nodes.iter().find(|n| n.name == name).cloned()
    }

    /// The slot of the node called `name`, if the set has one.
    pub fn slot_index(&self, name: &str) -> Option<usize> {
        self.members.load().nodes.iter().position(|n| n.name == name)
    }

    /// Where `client` goes now: the best-ranked node among the `up` ones, or, when none is
    /// up, among the `unready` ones (alive beats failing), chosen by `balance`
    /// ([`crate::balance`]). `None` when no node is usable.
    ///
    /// Walking the rank by calling this again after each failed connect (which marks the node
    /// down) yields exactly the rank order restricted to usable nodes, without allocating.
    pub fn pick(&self, client: &str, balance: Balance) -> Option<usize> {
        self.choose(client, &[], balance, Placing::New)
    }

    /// [`Pool::pick`] leaving out the nodes in `except` (a re-homing tunnel's node that just
    /// failed it, before a probe has said so). Under `bounded` the bound holds here too: a
    /// re-homing tunnel has let go of its old node before it asks, so it is placed as new.
    pub fn pick_except(&self, client: &str, except: &[usize], balance: Balance) -> Option<usize> {
        self.choose(client, except, balance, Placing::New)
    }

    /// Where `client`, open on node `from`, would go if it were placed again now.
    pub fn pick_moving(&self, client: &str, from: usize, balance: Balance) -> Option<usize> {
        self.choose(client, &[], balance, Placing::Moving(from))
    }

    fn choose(&self, client: &str, except: &[usize], balance: Balance, placing: Placing) -> Option<usize> {
        let set = self.members.load();
        let usable = |i: usize, wanted: Health| !except.contains(&i) && set.nodes[i].tier() == Some(wanted);
        let wanted = if (0..set.nodes.len()).any(|i| usable(i, Health::Up)) { Health::Up } else { Health::Unready };
        let load = |i: usize| u64::try_from(set.nodes[i].metrics.active.get()).unwrap_or(0);
        choose_node(&set.names, client, balance, placing, |i| usable(i, wanted), load)
    }

    /// The nodes to try for a server API request, in order: the `up` ones, starting at
    /// `turn` (round robin), then the `unready` ones likewise (alive beats failing); never a
    /// down or draining one.
    pub fn api_order(&self, turn: usize) -> Vec<usize> {
        let set = self.members.load();
        let n = set.nodes.len();
        let mut order = Vec::with_capacity(n);
        for wanted in [Health::Up, Health::Unready] {
            order.extend((0..n).map(|i| (turn + i) % n.max(1)).filter(|&i| set.nodes[i].tier() == Some(wanted)));
        }
        order
    }

    /// The full preference order of `client` over the present nodes, whatever their state.
    pub fn rank(&self, client: &str) -> Vec<String> {
        let set = self.members.load();
        hrw::rank(&set.names, client)
            .into_iter()
            .filter(|&i| !set.nodes[i].is_gone())
            .map(|i| set.names[i].clone())
            .collect()
    }

    /// Open upstream connections over all nodes.
    pub fn active_connections(&self) -> i64 {
        self.nodes().iter().map(|n| n.metrics.active.get()).sum()
    }
}

/// A TCP connection to `node`, within `timeout` (failures name the node and its address).
pub(crate) async fn connect(node: &Node, timeout: Duration) -> Result<TcpStream, Error> {
    match tokio::time::timeout(timeout, TcpStream::connect(&node.addr)).await {
        Ok(Ok(stream)) => {
            // Chat frames are small and latency-bound.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(source)) => Err(Error::NodeConnect { node: node.name.clone(), addr: node.addr.clone(), source }),
        Err(_) => Err(Error::NodeConnectTimeout {
            node: node.name.clone(),
            addr: node.addr.clone(),
            timeout_ms: timeout.as_millis(),
        }),
    }
}

/// Counts one open upstream connection for as long as it lives (shared, via `Arc`, between
/// the HTTP connection task and a tunnel that outlives it).
#[derive(Debug)]
pub struct ActiveGuard(NodeMetrics);

impl ActiveGuard {
    pub fn new(node: &Node) -> Self {
        let guard = Self::reserve(node);
        guard.opened();
        guard
    }

    /// Counts the connection as open before it is (between the choice of its node and the
    /// connect), so that connections placed at the same moment see each other in the loads
    /// `balance = "bounded"` weighs; dropped if the connect fails. [`ActiveGuard::opened`]
    /// then counts it in the node's total.
    pub fn reserve(node: &Node) -> Self {
        node.metrics.active.inc();
        Self(node.metrics.clone())
    }

    /// The reserved connection is open.
    pub fn opened(&self) {
        self.0.connections.inc();
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Pool {
        let configs: Vec<NodeConfig> = (1..=n)
            .map(|i| NodeConfig { name: format!("node-{i}"), addr: format!("127.0.0.1:{}", 9000 + i) })
            .collect();
        Pool::new(&configs, &Metrics::new())
    }

    #[test]
    fn health_rises_only_after_consecutive_answers() {
        let failed = Probe::Failed("refused".into());
        assert_eq!(next_health(Health::Up, 0, &failed, 2), (Health::Down, 0));
        let (h, s) = next_health(Health::Down, 0, &Probe::Ready, 2);
        assert_eq!((h, s), (Health::Down, 1));
        assert_eq!(next_health(h, s, &Probe::Ready, 2), (Health::Up, 0));
        // An unready answer counts as alive for rising, and lands in `unready`.
        let (h, s) = next_health(Health::Down, 1, &Probe::Unready(503), 2);
        assert_eq!((h, s), (Health::Unready, 0));
        // A failure in the middle restarts the count.
        let (h, s) = next_health(Health::Down, 1, &failed, 3);
        assert_eq!(next_health(h, s, &Probe::Ready, 3), (Health::Down, 1));
        // Alive nodes follow /readyz directly.
        assert_eq!(next_health(Health::Up, 0, &Probe::Unready(500), 2), (Health::Unready, 0));
        assert_eq!(next_health(Health::Unready, 0, &Probe::Ready, 2), (Health::Up, 0));
        assert_eq!(next_health(Health::Down, 0, &Probe::Ready, 1), (Health::Up, 0));
    }

    #[test]
    fn api_requests_go_round_robin_over_up_nodes_then_unready_ones() {
        let p = pool(3);
        assert_eq!(p.api_order(0), [0, 1, 2]);
        assert_eq!(p.api_order(1), [1, 2, 0]);
        assert_eq!(p.api_order(5), [2, 0, 1]);
        p.get(1).mark_down("refused");
        assert_eq!(p.api_order(1), [2, 0]);
        p.get(0).apply_probe(&Probe::Unready(503), 1);
        assert_eq!(p.api_order(0), [2, 0], "up first, then unready");
        p.get(2).set_draining(true);
        assert_eq!(p.api_order(0), [0]);
        p.get(0).mark_down("refused");
        assert!(p.api_order(0).is_empty());
        assert!(pool(0).api_order(3).is_empty());
    }

    #[test]
    fn pick_prefers_up_then_unready_and_never_down_or_draining() {
        let pool = pool(3);
        let id = "client-42";
        let rank = hrw::rank(&pool.members.load().names, id);
        assert_eq!(pool.pick(id, Balance::Hrw), Some(rank[0]));

        pool.get(rank[0]).mark_down("test");
        assert_eq!(pool.pick(id, Balance::Hrw), Some(rank[1]));

        // An unready node loses to any up one, even one ranked below it.
        pool.get(rank[1]).apply_probe(&Probe::Unready(503), 1);
        assert_eq!(pool.pick(id, Balance::Hrw), Some(rank[2]));

        // With no node up, the alive unready one is used rather than failing.
        pool.get(rank[2]).set_draining(true);
        assert_eq!(pool.pick(id, Balance::Hrw), Some(rank[1]));
        assert_eq!(pool.get(rank[2]).state_str(), "draining");

        pool.get(rank[1]).mark_down("test");
        assert_eq!(pool.pick(id, Balance::Hrw), None);

        pool.get(rank[2]).set_draining(false);
        assert_eq!(pool.pick(id, Balance::Hrw), Some(rank[2]));
    }

    #[test]
    fn going_down_fires_the_down_signal_once_and_re_arms_it() {
        let pool = pool(1);
        let node = pool.get(0);
        let first = node.down_signal();
        node.apply_probe(&Probe::Unready(503), 2);
        assert!(!first.is_cancelled(), "unready must not close tunnels");
        node.mark_down("refused");
        assert!(first.is_cancelled());
        let second = node.down_signal();
        assert!(!second.is_cancelled());
        node.mark_down("refused again");
        assert!(!second.is_cancelled(), "no flip, no signal");
        assert_eq!(node.metrics.state_changes.get(), 2);
        assert_eq!(node.metrics.up.get(), 0);
    }

    #[test]
    fn a_timeout_takes_a_node_out_of_routing_but_keeps_its_tunnels() {
        let pool = pool(1);
        let node = pool.get(0);
        let open = node.down_signal();
        node.mark_suspect("connect timed out");
        assert_eq!(node.health(), Health::Down);
        assert_eq!(pool.pick("anyone", Balance::Hrw), None, "no new clients while it does not answer");
        node.apply_probe(&Probe::TimedOut("probe timed out".into()), 2);
        assert!(!open.is_cancelled(), "an overloaded node keeps its live clients");
        // Proof that it is gone (a refused connect) closes them, once.
        node.mark_down("refused");
        assert!(open.is_cancelled());
        let next = node.down_signal();
        node.apply_probe(&Probe::Failed("refused".into()), 2);
        assert!(!next.is_cancelled());
        // Back up, then a timeout again: still no cut.
        node.apply_probe(&Probe::Ready, 1);
        assert_eq!(node.health(), Health::Up);
        node.apply_probe(&Probe::TimedOut("probe timed out".into()), 2);
        assert!(!next.is_cancelled());
    }

    #[test]
    fn draining_fires_the_drain_signal_once_and_undrain_does_not() {
        let pool = pool(1);
        let node = pool.get(0);
        let before = node.drain_signal();
        node.mark_down("refused");
        assert!(!before.is_cancelled(), "down is not drain");
        assert!(node.set_draining(true));
        assert!(before.is_cancelled());
        let during = node.drain_signal();
        assert!(!node.set_draining(true));
        assert!(!during.is_cancelled(), "no change, no signal");
        assert!(node.set_draining(false));
        assert!(!during.is_cancelled());
        let after = node.drain_signal();
        assert!(node.set_draining(true));
        assert!(after.is_cancelled());
    }

    #[test]
    fn draining_is_sticky_across_probes() {
        let pool = pool(1);
        let node = pool.get(0);
        assert!(node.set_draining(true));
        assert!(!node.set_draining(true));
        node.apply_probe(&Probe::Ready, 1);
        assert_eq!(node.state_str(), "draining");
        assert_eq!(pool.pick("x", Balance::Hrw), None);
        node.set_draining(false);
        assert_eq!(node.state_str(), "up");
    }
}
