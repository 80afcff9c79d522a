//! Paced rebalance (`rebalance = "paced"`): when a node becomes available — back `up` after
//! being `down`, undrained, or added to the node set — the clients that rank it first and sit
//! on other nodes move to it, one at a time, at most `rebalance_per_sec` per second, spread
//! evenly; nobody else moves. Under `balance = "bounded"` a client moves only while the node
//! stays within the bound ([`crate::balance`]). `off` (the default) keeps the rule that a node
//! coming back takes no live connection away from anyone: it gets new connections only.
//!
//! How a move finds its tunnels: the same way a drain does. No list of tunnels is kept; each
//! tunnel holds a token (here one for the whole balancer, [`Rebalancer::signal`]), and
//! [`node_available`] fires it (and puts a fresh one in its place). Every tunnel then asks, in
//! its own task and once, where its client would be placed now ([`crate::pool::Pool::pick_moving`]).
//! Those whose answer is a node being rebalanced onto ask the one dispatcher task
//! ([`dispatch`]) for their turn; it grants turns one at a time, `1 / rebalance_per_sec` apart,
//! checking again at each turn that the move is still wanted (the node is still `up`, still
//! being rebalanced onto, still the client's placement, the bound still holds), so a node that
//! goes down again stops its rebalance at once, and a second node returning meanwhile only
//! adds its clients to the queue. The rate is the balancer's as a whole, over every node being
//! rebalanced onto.
//!
//! A granted tunnel moves: a re-homing one (`failover = "rehome"`) switches to the node without
//! a close (`tunnel::rehome`); any other closes its client with 1012, reason `rebalance`, at a
//! frame boundary (as a drain does), and the client's reconnect lands on the node.
//!
//! The token is polled only when it fires ([`crate::quiet`]), so an idle tunnel pays nothing
//! per message for it; with `rebalance = "off"` a tunnel holds nothing of this at all.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use crate::balance::{Rebalance, DEFAULT_REBALANCE_PER_SEC, MAX_REBALANCE_PER_SEC};
use crate::pool::Health;
use crate::Shared;

/// Reason of the close frame sent to a client moved back by a rebalance (reconnect mode).
pub const REBALANCE_REASON: &str = "rebalance";

/// The balancer's rebalance state: the token every tunnel holds, the nodes being rebalanced
/// onto, and the dispatcher's queue.
#[derive(Debug)]
pub(crate) struct Rebalancer {
    /// Fired, and replaced by a fresh one, whenever a node becomes available.
    signal: ArcSwap<CancellationToken>,
    /// Names of the nodes being rebalanced onto: from [`node_available`] until the node is
    /// next found not `up` (down, unready or drained).
    returning: Mutex<Vec<Box<str>>>,
    /// Tunnels asking for their turn, in order.
    queue: mpsc::UnboundedSender<Mover>,
    /// The queue's other end, until [`dispatch`] takes it.
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Mover>>>,
}

/// A tunnel waiting for its turn to move.
#[derive(Debug)]
struct Mover {
    id: Box<str>,
    from: usize,
    target: usize,
    /// Answered when the turn comes; dropped when the move is no longer wanted.
    go: oneshot::Sender<()>,
}

/// What a tunnel needs to take part: what its client is ranked by (the client id, or its
/// placement key under `hash_keys = ["query:NAME"]`, so a room's members move with the room)
/// and the token as it was before its upstream connect (so that a node returning meanwhile is not missed). Only made when
/// `rebalance = "paced"`.
#[derive(Debug)]
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    id: Box<str>,
    /// The node the tunnel was opened to (a plain tunnel stays there).
    pub node: usize,
    signal: CancellationToken,
}

impl Default for Rebalancer {
    fn default() -> Self {
        let (queue, inbox) = mpsc::unbounded_channel();
        Self {
            signal: ArcSwap::from_pointee(CancellationToken::new()),
            returning: Mutex::new(Vec::new()),
            queue,
            inbox: Mutex::new(Some(inbox)),
        }
    }
}

impl Rebalancer {
    /// The token a new tunnel should hold (take it before connecting: see [`Ticket`]).
    pub fn signal(&self) -> CancellationToken {
        CancellationToken::clone(&self.signal.load())
    }

    /// Names of the nodes being rebalanced onto now (for `/status`).
    pub fn returning(&self) -> Vec<String> {
        self.returning.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|n| n.to_string()).collect()
    }

    fn is_returning(&self, name: &str) -> bool {
        self.returning.lock().unwrap_or_else(PoisonError::into_inner).iter().any(|n| &**n == name)
    }

    fn forget(&self, name: &str) {
        self.returning.lock().unwrap_or_else(PoisonError::into_inner).retain(|n| &**n != name);
    }
}

impl Ticket {
    /// A ticket for a tunnel of client `id` on node `node`, holding `signal` (from
    /// [`Ticket::signal_if_paced`]: `None` when not paced, and then no ticket).
    pub fn new(shared: &Arc<Shared>, id: &str, node: usize, signal: Option<CancellationToken>) -> Option<Self> {
        Some(Self { shared: Arc::clone(shared), id: id.into(), node, signal: signal? })
    }

    /// The token to take before connecting, when the live config says `paced`.
    pub fn signal_if_paced(shared: &Shared) -> Option<CancellationToken> {
        matches!(shared.config().rebalance, Rebalance::Paced { .. }).then(|| shared.rebalancer.signal())
    }
}

/// Node `index` became available (back up after being down, undrained, or newly added): with
/// `rebalance = "paced"`, its clients on other nodes start moving to it. The one entry point
/// for every such event (the health checks, the admin's undrain, discovery).
pub(crate) fn node_available(shared: &Shared, index: usize) {
    if !matches!(shared.config().rebalance, Rebalance::Paced { .. }) {
        return;
    }
    let node = shared.pool.get(index);
    {
        let mut returning = shared.rebalancer.returning.lock().unwrap_or_else(PoisonError::into_inner);
        if !returning.iter().any(|n| **n == *node.name) {
            returning.push(node.name.as_str().into());
        }
    }
    info!(node = %node.name, "node available: moving the clients that rank it first back to it, paced");
    let old = shared.rebalancer.signal.swap(Arc::new(CancellationToken::new()));
    old.cancel();
}

/// Where the client of a tunnel on node `current` should move now, if anywhere: the node it
/// would be placed on, when that is a node being rebalanced onto and `up`.
fn target(shared: &Shared, id: &str, current: usize) -> Option<usize> {
    if !matches!(shared.config().rebalance, Rebalance::Paced { .. }) {
        return None;
    }
    let balance = shared.config().balance;
    let to = shared.pool.pick_moving(id, current, balance).filter(|&to| to != current)?;
    let node = shared.pool.get(to);
    if !shared.rebalancer.is_returning(&node.name) {
        return None;
    }
    if node.tier() != Some(Health::Up) {
        // Down (or unready, or drained) again: its rebalance is over.
        shared.rebalancer.forget(&node.name);
        return None;
    }
    Some(to)
}

/// Resolves, with the node to move to, once the tunnel of `ticket`'s client, on node
/// `current`, has its turn; pending for as long as no move is wanted.
pub(crate) async fn wanted(ticket: &Ticket, current: usize) -> usize {
    let shared = &*ticket.shared;
    let mut signal = ticket.signal.clone();
    // Each turn of the loop follows one firing of the token: as many as nodes became available.
    loop {
        signal.cancelled().await;
        // The fresh token first: a node available while this one checks is not missed.
        signal = shared.rebalancer.signal();
        let Some(to) = target(shared, &ticket.id, current) else { continue };
        let (go, turn) = oneshot::channel();
        let mover = Mover { id: ticket.id.clone(), from: current, target: to, go };
        let pending = &shared.pool.get(to).metrics.rebalance_pending;
        pending.inc();
        if shared.rebalancer.queue.send(mover).is_err() {
            // No dispatcher (shutting down): no move.
            pending.dec();
            continue;
        }
        if turn.await.is_ok() {
            return to;
        }
    }
}

/// The dispatcher: grants moves one at a time, `1 / rebalance_per_sec` apart, each one checked
/// again when its turn comes; runs until `stop`.
pub(crate) async fn dispatch(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(mut inbox) = shared.rebalancer.inbox.lock().unwrap_or_else(PoisonError::into_inner).take() else {
        return;
    };
    loop {
        let mover = tokio::select! {
            _ = stop.cancelled() => return,
            mover = inbox.recv() => match mover {
                Some(mover) => mover,
                None => return,
            },
        };
        let node = shared.pool.get(mover.target);
        node.metrics.rebalance_pending.dec();
        // Gone (the client left, or moved for another reason), or no longer wanted: no turn
        // used, the next one is looked at at once.
        if mover.go.is_closed() || target(&shared, &mover.id, mover.from) != Some(mover.target) {
            debug!(client = %mover.id, node = %node.name, "rebalance: move no longer wanted");
            continue;
        }
        if mover.go.send(()).is_err() {
            continue;
        }
        node.metrics.rebalance_moves.inc();
        debug!(client = %mover.id, node = %node.name, "rebalance: moving");
        let per_sec = match shared.config().rebalance {
            Rebalance::Paced { per_sec } => per_sec,
            Rebalance::Off => DEFAULT_REBALANCE_PER_SEC,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs_f64(1.0 / per_sec)) => {}
        }
    }
}
