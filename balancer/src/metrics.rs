//! Prometheus metrics: every metric name the balancer exports is defined in this module, and
//! served as text by the admin listener's `GET /metrics`.
//!
//! Per-node handles are created once at start-up and kept on the node itself, so the proxy's
//! hot path only touches atomics, never the registry's map.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

// Counters are registered without their `_total` suffix: prometheus-client appends it.
/// `tether_balancer_connections_total{node}`: upstream connections opened (tunnels and HTTP).
pub const CONNECTIONS: &str = "tether_balancer_connections";
/// `tether_balancer_active_connections{node}`: upstream connections open now.
pub const ACTIVE_CONNECTIONS: &str = "tether_balancer_active_connections";
/// `tether_balancer_upstream_connect_failures_total{node}`: failed or timed-out connects.
pub const UPSTREAM_CONNECT_FAILURES: &str = "tether_balancer_upstream_connect_failures";
/// `tether_balancer_node_up{node}`: 1 while the node is alive (`up` or `unready`), else 0.
pub const NODE_UP: &str = "tether_balancer_node_up";
/// `tether_balancer_node_ready{node}`: 1 while the node's `/readyz` answers 200, else 0.
pub const NODE_READY: &str = "tether_balancer_node_ready";
/// `tether_balancer_node_draining{node}`: 1 while an operator has the node drained.
pub const NODE_DRAINING: &str = "tether_balancer_node_draining";
/// `tether_balancer_node_state_changes_total{node}`: health flips (up/unready/down).
pub const NODE_STATE_CHANGES: &str = "tether_balancer_node_state_changes";
/// `tether_balancer_health_checks_total{node,result="ready|unready|failed"}`: probes done.
pub const HEALTH_CHECKS: &str = "tether_balancer_health_checks";
/// `tether_balancer_requests_total{kind="ws|http",code}`: answers given to clients.
pub const REQUESTS: &str = "tether_balancer_requests";
/// `tether_balancer_rejected_connections_total`: client connections refused because
/// `max_connections` were open (answered 503 with `Retry-After`, or closed at once when too
/// many such answers were already pending).
pub const REJECTED_CONNECTIONS: &str = "tether_balancer_rejected_connections";
/// `tether_balancer_max_connections`: the `max_connections` in force (from `RLIMIT_NOFILE` less
/// a reserve, halved; or configured).
pub const MAX_CONNECTIONS: &str = "tether_balancer_max_connections";
/// `tether_balancer_accept_errors_total{listener="proxy|admin"}`: accepts that failed for want
/// of resources (EMFILE, ENFILE); each is followed by a pause.
pub const ACCEPT_ERRORS: &str = "tether_balancer_accept_errors";
/// `tether_balancer_tls_handshake_failures_total{reason="error|timeout"}`: client connections
/// on a TLS listener dropped before HTTP because the handshake failed (a plain-HTTP client, a
/// bad ClientHello, no common version or ALPN) or did not finish within `header_read_timeout`.
pub const TLS_HANDSHAKE_FAILURES: &str = "tether_balancer_tls_handshake_failures";
/// `tether_balancer_config_reloads_total{result="ok|failed"}`: SIGHUP reloads attempted.
pub const CONFIG_RELOADS: &str = "tether_balancer_config_reloads";
/// `tether_balancer_proxy_protocol_refused_total{reason="missing|wrong_version|invalid|timeout|closed"}`:
/// client connections closed because they did not start with the PROXY header the listener
/// requires (nothing of them reached a node).
pub const PROXY_PROTOCOL_REFUSED: &str = "tether_balancer_proxy_protocol_refused";
/// `tether_balancer_per_ip_refused_total{reason="connections|rate"}`: client connections
/// answered 429 because their source address had `max_connections_per_ip` open, or had used
/// up its `connect_rate_per_ip` bucket.
pub const PER_IP_REFUSED: &str = "tether_balancer_per_ip_refused";
/// `tether_balancer_per_ip_entries`: source addresses (IPv6: /64s) the per-IP table tracks now.
pub const PER_IP_ENTRIES: &str = "tether_balancer_per_ip_entries";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyRefusedLabels {
    pub reason: crate::proxy_protocol::Refused,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PerIpLabels {
    pub reason: crate::per_ip::Reason,
}

/// `tether_balancer_upgrades_total{result="ok|failed"}`: upgrade attempts this process made.
pub const UPGRADES: &str = "tether_balancer_upgrades";
/// `tether_balancer_upgrade_tunnels_handed_over_total`: tunnels this process handed to its
/// successor (acknowledged).
pub const UPGRADE_HANDED_OVER: &str = "tether_balancer_upgrade_tunnels_handed_over";
/// `tether_balancer_upgrade_tunnels_adopted_total`: tunnels this process took over from the
/// process it replaced.
pub const UPGRADE_ADOPTED: &str = "tether_balancer_upgrade_tunnels_adopted";

/// `tether_balancer_rehomes_total{reason="down|drain|restart",result="ok|failed"}`: switches
/// of re-homing tunnels (`failover = "rehome"`) to another node, by what set them off (the
/// node died or was marked down, was drained, or closed 1012) and how they ended (`failed`:
/// the client was closed after all).
pub const REHOMES: &str = "tether_balancer_rehomes";
/// `tether_balancer_rehome_resent_total`: client messages re-homing tunnels sent again to the
/// new node (unconfirmed by the old one); the node publishes each at most once.
pub const REHOME_RESENT: &str = "tether_balancer_rehome_resent";

/// `tether_balancer_rebalance_moves_total{node}`: clients a paced rebalance moved to this node
/// (turns granted: the tunnel then re-homes, or closes its client 1012 `rebalance`).
pub const REBALANCE_MOVES: &str = "tether_balancer_rebalance_moves";
/// `tether_balancer_rebalance_pending{node}`: clients waiting for their turn to move to this
/// node; above 0 while a rebalance onto it is in progress.
pub const REBALANCE_PENDING: &str = "tether_balancer_rebalance_pending";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RehomeLabels {
    pub reason: &'static str,
    pub result: &'static str,
}

/// `tether_balancer_discovery_reads_total{result="ok|failed"}`: reads of the node registry
/// (`--discover`); a failed one keeps the node set as it was.
pub const DISCOVERY_READS: &str = "tether_balancer_discovery_reads";
/// `tether_balancer_discovery_changes_total{change="joined|left"}`: nodes that joined (new,
/// back, or under a new instance) or left the registry.
pub const DISCOVERY_CHANGES: &str = "tether_balancer_discovery_changes";
/// `tether_balancer_discovered_nodes`: discovered nodes present now (static ones not counted).
pub const DISCOVERED_NODES: &str = "tether_balancer_discovered_nodes";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiscoveryReadLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiscoveryChangeLabels {
    pub change: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpgradeLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

/// What a client asked for: a WebSocket (any upgrade) or a plain HTTP exchange.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the variant names are the label values
pub enum Kind {
    ws,
    http,
    /// The server API (`/api/`), forwarded to any node.
    api,
}

/// Outcome of one health probe.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the variant names are the label values
pub enum CheckResult {
    ready,
    unready,
    failed,
}

/// Why a TLS handshake failed.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the variant names are the label values
pub enum TlsFailure {
    error,
    timeout,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsFailureLabels {
    pub reason: TlsFailure,
}

/// How a reload went.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the variant names are the label values
pub enum ReloadResult {
    ok,
    failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub node: String,
    pub result: CheckResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub kind: Kind,
    pub code: u16,
}

/// The per-node handles, created once and kept on the node (the hot path never looks them up).
#[derive(Debug, Clone, Default)]
pub struct NodeMetrics {
    pub connections: Counter,
    pub active: Gauge,
    pub connect_failures: Counter,
    pub up: Gauge,
    pub ready: Gauge,
    pub draining: Gauge,
    pub state_changes: Counter,
    /// Probes by outcome, indexed by [`CheckResult`] as `usize`.
    pub checks: [Counter; 3],
    /// Clients moved here by a paced rebalance.
    pub rebalance_moves: Counter,
    /// Clients waiting for their turn to move here.
    pub rebalance_pending: Gauge,
}

/// The registry and the handles that are not per node.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    nodes: NodeFamilies,
    requests: Family<RequestLabels, Counter>,
    pub rejected_connections: Counter,
    pub max_connections: Gauge,
    accept_errors: Family<ListenerLabels, Counter>,
    tls_handshake_failures: Family<TlsFailureLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    proxy_protocol_refused: Family<ProxyRefusedLabels, Counter>,
    per_ip_refused: Family<PerIpLabels, Counter>,
    pub per_ip_entries: Gauge,
    upgrades: Family<UpgradeLabels, Counter>,
    pub handed_over: Counter,
    pub adopted: Counter,
    rehomes: Family<RehomeLabels, Counter>,
    pub rehome_resent: Counter,
    discovery_reads: Family<DiscoveryReadLabels, Counter>,
    discovery_changes: Family<DiscoveryChangeLabels, Counter>,
    pub discovered_nodes: Gauge,
}

#[derive(Debug, Default)]
struct NodeFamilies {
    connections: Family<NodeLabels, Counter>,
    active: Family<NodeLabels, Gauge>,
    connect_failures: Family<NodeLabels, Counter>,
    up: Family<NodeLabels, Gauge>,
    ready: Family<NodeLabels, Gauge>,
    draining: Family<NodeLabels, Gauge>,
    state_changes: Family<NodeLabels, Counter>,
    checks: Family<CheckLabels, Counter>,
    rebalance_moves: Family<NodeLabels, Counter>,
    rebalance_pending: Family<NodeLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let nodes = NodeFamilies::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let rejected_connections = Counter::default();
        registry.register(CONNECTIONS, "Upstream connections opened, per node", nodes.connections.clone());
        registry.register(ACTIVE_CONNECTIONS, "Upstream connections open now, per node", nodes.active.clone());
        registry.register(
            UPSTREAM_CONNECT_FAILURES,
            "Failed or timed-out connects to a node",
            nodes.connect_failures.clone(),
        );
        registry.register(NODE_UP, "1 while the node is alive (up or unready)", nodes.up.clone());
        registry.register(NODE_READY, "1 while the node's /readyz answers 200", nodes.ready.clone());
        registry.register(NODE_DRAINING, "1 while the node is drained by an operator", nodes.draining.clone());
        registry.register(NODE_STATE_CHANGES, "Health state flips of a node", nodes.state_changes.clone());
        registry.register(HEALTH_CHECKS, "Health probes of a node, by outcome", nodes.checks.clone());
        registry.register(
            REBALANCE_MOVES,
            "Clients a paced rebalance moved to the node",
            nodes.rebalance_moves.clone(),
        );
        registry.register(
            REBALANCE_PENDING,
            "Clients waiting for their turn to move to the node (a rebalance in progress)",
            nodes.rebalance_pending.clone(),
        );
        registry.register(REQUESTS, "Answers given to clients, by kind and HTTP status", requests.clone());
        registry.register(
            REJECTED_CONNECTIONS,
            "Client connections closed at once because max_connections were open",
            rejected_connections.clone(),
        );
        let max_connections = Gauge::default();
        registry.register(
            MAX_CONNECTIONS,
            "Client connections allowed at once (from RLIMIT_NOFILE less a reserve, halved; or configured)",
            max_connections.clone(),
        );
        let accept_errors = Family::<ListenerLabels, Counter>::default();
        registry.register(
            ACCEPT_ERRORS,
            "Accepts that failed for want of resources (EMFILE, ENFILE), by listener",
            accept_errors.clone(),
        );
        let tls_handshake_failures = Family::<TlsFailureLabels, Counter>::default();
        registry.register(
            TLS_HANDSHAKE_FAILURES,
            "Client connections dropped because the TLS handshake failed or timed out",
            tls_handshake_failures.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(CONFIG_RELOADS, "Configuration reloads (SIGHUP), by result", reloads.clone());
        let proxy_protocol_refused = Family::<ProxyRefusedLabels, Counter>::default();
        registry.register(
            PROXY_PROTOCOL_REFUSED,
            "Client connections closed for a missing, wrong or malformed PROXY protocol header, by reason",
            proxy_protocol_refused.clone(),
        );
        let per_ip_refused = Family::<PerIpLabels, Counter>::default();
        registry.register(
            PER_IP_REFUSED,
            "Client connections answered 429 by a per-IP limit, by reason",
            per_ip_refused.clone(),
        );
        let per_ip_entries = Gauge::default();
        registry.register(
            PER_IP_ENTRIES,
            "Source addresses (IPv6: /64s) the per-IP table tracks now",
            per_ip_entries.clone(),
        );
        let upgrades = Family::<UpgradeLabels, Counter>::default();
        registry.register(UPGRADES, "Upgrade attempts of this process, by result", upgrades.clone());
        let handed_over = Counter::default();
        registry.register(UPGRADE_HANDED_OVER, "Tunnels handed to the next process on upgrade", handed_over.clone());
        let adopted = Counter::default();
        registry.register(UPGRADE_ADOPTED, "Tunnels taken over from the previous process", adopted.clone());
        let rehomes = Family::<RehomeLabels, Counter>::default();
        registry.register(
            REHOMES,
            "Switches of re-homing tunnels to another node, by cause and result",
            rehomes.clone(),
        );
        let rehome_resent = Counter::default();
        registry.register(
            REHOME_RESENT,
            "Client messages resent to a new node by re-homing tunnels",
            rehome_resent.clone(),
        );
        let discovery_reads = Family::<DiscoveryReadLabels, Counter>::default();
        registry.register(DISCOVERY_READS, "Reads of the node registry, by result", discovery_reads.clone());
        let discovery_changes = Family::<DiscoveryChangeLabels, Counter>::default();
        registry.register(DISCOVERY_CHANGES, "Nodes that joined or left the node registry", discovery_changes.clone());
        let discovered_nodes = Gauge::default();
        registry.register(DISCOVERED_NODES, "Discovered nodes present now", discovered_nodes.clone());
        Self {
            discovery_reads,
            discovery_changes,
            discovered_nodes,
            registry,
            nodes,
            requests,
            rejected_connections,
            max_connections,
            accept_errors,
            tls_handshake_failures,
            reloads,
            proxy_protocol_refused,
            per_ip_refused,
            per_ip_entries,
            upgrades,
            handed_over,
            adopted,
            rehomes,
            rehome_resent,
        }
    }

    /// Counts one switch of a re-homing tunnel.
    pub fn rehomed(&self, reason: &'static str, ok: bool) {
        self.rehomes.get_or_create(&RehomeLabels { reason, result: if ok { "ok" } else { "failed" } }).inc();
    }

    /// Counts one read of the node registry.
    pub fn discovery_read(&self, ok: bool) {
        self.discovery_reads.get_or_create(&DiscoveryReadLabels { result: if ok { "ok" } else { "failed" } }).inc();
    }

    /// Counts nodes that joined (`joined`) or left (`left`) the registry.
    pub fn discovery_changed(&self, change: &'static str, by: usize) {
        self.discovery_changes.get_or_create(&DiscoveryChangeLabels { change }).inc_by(by as u64);
    }

    /// Counts one upgrade attempt.
    pub fn upgrade(&self, ok: bool) {
        self.upgrades.get_or_create(&UpgradeLabels { result: if ok { "ok" } else { "failed" } }).inc();
    }

    /// Creates (once, at start-up) the handles for one node.
    pub fn node(&self, name: &str) -> NodeMetrics {
        let l = NodeLabels { node: name.to_owned() };
        NodeMetrics {
            connections: self.nodes.connections.get_or_create(&l).clone(),
            active: self.nodes.active.get_or_create(&l).clone(),
            connect_failures: self.nodes.connect_failures.get_or_create(&l).clone(),
            up: self.nodes.up.get_or_create(&l).clone(),
            ready: self.nodes.ready.get_or_create(&l).clone(),
            draining: self.nodes.draining.get_or_create(&l).clone(),
            state_changes: self.nodes.state_changes.get_or_create(&l).clone(),
            checks: [CheckResult::ready, CheckResult::unready, CheckResult::failed].map(|result| {
                let labels = CheckLabels { node: name.to_owned(), result };
                self.nodes.checks.get_or_create(&labels).clone()
            }),
            rebalance_moves: self.nodes.rebalance_moves.get_or_create(&l).clone(),
            rebalance_pending: self.nodes.rebalance_pending.get_or_create(&l).clone(),
        }
    }

    /// Counts one answer to a client.
    pub fn request(&self, kind: Kind, code: u16) {
        self.requests.get_or_create(&RequestLabels { kind, code }).inc();
    }

    /// Counts one failed accept on `listener`.
    pub fn accept_error(&self, listener: &'static str) {
        self.accept_errors.get_or_create(&ListenerLabels { listener }).inc();
    }

    /// Counts one failed TLS handshake.
    pub fn tls_handshake_failed(&self, reason: TlsFailure) {
        self.tls_handshake_failures.get_or_create(&TlsFailureLabels { reason }).inc();
    }

    /// Counts one reload attempt.
    pub fn reloaded(&self, result: ReloadResult) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// Counts one connection closed for its PROXY header.
    pub fn proxy_protocol_refused(&self, reason: crate::proxy_protocol::Refused) {
        self.proxy_protocol_refused.get_or_create(&ProxyRefusedLabels { reason }).inc();
    }

    /// Counts one connection refused by a per-IP limit.
    pub fn per_ip_refused(&self, reason: crate::per_ip::Reason) {
        self.per_ip_refused.get_or_create(&PerIpLabels { reason }).inc();
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would only come from the writer.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_uses_the_documented_names() {
        let m = Metrics::new();
        let n = m.node("node-1");
        n.connections.inc();
        n.active.set(3);
        n.up.set(1);
        m.request(Kind::ws, 101);
        m.rejected_connections.inc();
        m.max_connections.set(96);
        m.accept_error("proxy");
        m.tls_handshake_failed(TlsFailure::error);
        m.reloaded(ReloadResult::failed);
        m.proxy_protocol_refused(crate::proxy_protocol::Refused::wrong_version);
        m.per_ip_refused(crate::per_ip::Reason::rate);
        m.per_ip_entries.set(7);
        let text = m.encode();
        for needle in [
            "tether_balancer_connections_total{node=\"node-1\"} 1",
            "tether_balancer_active_connections{node=\"node-1\"} 3",
            "tether_balancer_upstream_connect_failures_total{node=\"node-1\"} 0",
            "tether_balancer_node_up{node=\"node-1\"} 1",
            "tether_balancer_requests_total{kind=\"ws\",code=\"101\"} 1",
            "tether_balancer_rejected_connections_total 1",
            "tether_balancer_max_connections 96",
            "tether_balancer_accept_errors_total{listener=\"proxy\"} 1",
            "tether_balancer_tls_handshake_failures_total{reason=\"error\"} 1",
            "tether_balancer_config_reloads_total{result=\"failed\"} 1",
            "tether_balancer_proxy_protocol_refused_total{reason=\"wrong_version\"} 1",
            "tether_balancer_per_ip_refused_total{reason=\"rate\"} 1",
            "tether_balancer_per_ip_entries 7",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
