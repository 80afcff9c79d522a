//! Every metric the node exports on `GET /metrics`, named in one place.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

/// The server API's calls: by endpoint (`unknown` for a path that is none) and HTTP status.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabel {
    pub endpoint: &'static str,
    pub status: u16,
}

/// Counters and gauges; cheap to clone (they are `Arc`s inside).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub connections_active: Gauge,
    pub connections_total: Counter,
    pub connections_refused: Counter,
    /// The `max_connections` in force (set once at start).
    pub max_connections: Gauge,
    /// Accepts that failed for want of resources (EMFILE, ENFILE, ...), answered by a pause.
    pub accept_errors: Counter,
    pub messages_published: Counter,
    pub publish_batches: Counter,
    pub frames_from_backbone: Counter,
    pub frames_delivered: Counter,
    pub slow_consumers: Counter,
    pub duplicates_suppressed: Counter,
    pub sessions_restored: Counter,
    pub replayed_messages: Counter,
    pub instances_reaped: Counter,
    pub caught_up_messages: Counter,
    pub catch_up_gaps: Counter,
    pub probe_failures: Counter,
    pub oversized_frames: Counter,
    pub client_errors: Family<CodeLabel, Counter>,
    pub api_requests: Family<ApiLabel, Counter>,
    pub rooms_subscribed: Gauge,
    pub backbone_ready: Gauge,
    pub backbone_reconnects: Counter,
    /// `tether_webhook_*` (see `crate::webhooks`).
    pub webhooks: crate::webhooks::WebhookMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut root = Registry::default();
        // The webhook metrics are `tether_webhook_*`, beside the node's `tether_node_*`.
        self.webhooks.register(root.sub_registry_with_prefix("tether"));
        let r = root.sub_registry_with_prefix("tether_node");
        let counters: [(&str, &str, &Counter); 17] = [
            ("connections", "Client WebSocket connections accepted", &self.connections_total),
            (
                "connections_refused",
                "WebSocket upgrades refused with 503 because max_connections were open",
                &self.connections_refused,
            ),
            (
                "accept_errors",
                "Accepts that failed for want of resources (EMFILE, ENFILE); each is followed by a pause",
                &self.accept_errors,
            ),
            ("messages_published", "Room messages published to the backbone", &self.messages_published),
            (
                "publish_batches",
                "Backbone publish calls for room messages (one per run of a client's consecutive messages to one room)",
                &self.publish_batches,
            ),
            ("backbone_frames", "Frames received live from the backbone", &self.frames_from_backbone),
            ("frames_delivered", "Frames queued to local clients", &self.frames_delivered),
            ("slow_consumers", "Clients closed because their send queue was full", &self.slow_consumers),
            (
                "duplicates_suppressed",
                "Messages not sent to a member because a replay or catch-up had already sent that seq",
                &self.duplicates_suppressed,
            ),
            ("sessions_restored", "Connections that found their session in Redis", &self.sessions_restored),
            ("replayed_messages", "Messages sent from room logs by resume", &self.replayed_messages),
            ("instances_reaped", "Dead node instances whose presence this node cleaned up", &self.instances_reaped),
            (
                "caught_up_messages",
                "Messages delivered from room logs after the backbone subscriber reconnected",
                &self.caught_up_messages,
            ),
            (
                "catch_up_gaps",
                "Rooms whose log no longer held everything missed during a backbone outage",
                &self.catch_up_gaps,
            ),
            (
                "probe_failures",
                "Subscriptions re-established because the end-to-end probe stopped coming back",
                &self.probe_failures,
            ),
            ("oversized_frames", "Connections closed with 1009 for an oversized frame", &self.oversized_frames),
            ("backbone_reconnects", "Reconnections of the backbone subscriber", &self.backbone_reconnects),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
        r.register("client_errors", "Error frames sent to clients, by code", self.client_errors.clone());
        r.register("api_requests", "Server API calls answered, by endpoint and HTTP status", self.api_requests.clone());
        r.register("connections_active", "Client WebSocket connections open now", self.connections_active.clone());
        r.register(
            "max_connections",
            "Client WebSocket connections allowed at once (from RLIMIT_NOFILE less a reserve, or configured)",
            self.max_connections.clone(),
        );
        r.register(
            "rooms_subscribed",
            "Rooms this node is subscribed to on the backbone",
            self.rooms_subscribed.clone(),
        );
        r.register(
            "backbone_ready",
            "1 while the node is ready: backbone subscribed (and caught up) and answering commands",
            self.backbone_ready.clone(),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        encode(&mut out, &root).expect("encoding into a String");
        out
    }
}
