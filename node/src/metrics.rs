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

/// Counters and gauges; cheap to clone (they are `Arc`s inside).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub connections_active: Gauge,
    pub connections_total: Counter,
    pub connections_refused: Counter,
    pub messages_published: Counter,
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
    pub rooms_subscribed: Gauge,
    pub backbone_ready: Gauge,
    pub backbone_reconnects: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut registry = Registry::with_prefix("tether_node");
        registry.register(
            "connections_active",
            "Client WebSocket connections open now",
            self.connections_active.clone(),
        );
        registry.register("connections", "Client WebSocket connections accepted", self.connections_total.clone());
        registry.register(
            "connections_refused",
            "Connections refused because max_connections was reached",
            self.connections_refused.clone(),
        );
        registry.register(
            "messages_published",
            "Room messages published to the backbone",
            self.messages_published.clone(),
        );
        registry.register("backbone_frames", "Frames received from the backbone", self.frames_from_backbone.clone());
        registry.register("frames_delivered", "Frames queued to local clients", self.frames_delivered.clone());
        registry.register(
            "slow_consumers",
            "Clients closed because their send queue was full",
            self.slow_consumers.clone(),
        );
        registry.register(
            "oversized_frames",
            "Connections closed with 1009 for an oversized frame",
            self.oversized_frames.clone(),
        );
        registry.register("client_errors", "Error frames sent to clients, by code", self.client_errors.clone());
        registry.register(
            "rooms_subscribed",
            "Rooms this node is subscribed to on the backbone",
            self.rooms_subscribed.clone(),
        );
        registry.register(
            "backbone_ready",
            "1 while the backbone subscriber is connected",
            self.backbone_ready.clone(),
        );
        registry.register(
            "backbone_reconnects",
            "Reconnections of the backbone subscriber",
            self.backbone_reconnects.clone(),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        encode(&mut out, &registry).expect("encoding into a String");
        out
    }
}
