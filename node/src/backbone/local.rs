//! `--backbone none`: sticky sessions alone. Frames go straight to this node's members;
//! members on other nodes never see them (the comparison's control group). Seqs come from a
//! per-room counter in memory, under an epoch unique to this process.

use super::{Backbone, BackboneError, Published, Replay, SessionRecord};
use crate::hub::Hub;
use crate::metrics::Metrics;
use dashmap::DashMap;
use futures_util::future::{ready, BoxFuture, FutureExt};
use std::sync::Arc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

pub struct LocalBackbone {
    hub: Arc<Hub>,
    metrics: Metrics,
    epoch: String,
    seqs: DashMap<String, u64>,
}

impl LocalBackbone {
    pub fn new(hub: Arc<Hub>, metrics: Metrics) -> Self {
        let epoch = format!("local-{}", tether_proto::id::mint_client_id());
        metrics.backbone_ready.set(1);
        Self {
            hub,
            metrics,
            epoch,
            seqs: DashMap::new(),
        }
    }

    fn deliver(&self, room: &str, json: String) {
        self.metrics.frames_from_backbone.inc();
        self.hub
            .deliver(room, &Utf8Bytes::from(json), &self.metrics);
    }
}

impl Backbone for LocalBackbone {
    fn publish_message<'a>(
        &'a self,
        room: &'a str,
        prefix: String,
    ) -> BoxFuture<'a, Result<Published, BackboneError>> {
        // The counter's shard lock is held across the delivery so that two publishers in one
        // room deliver in seq order.
        let mut seq = self.seqs.entry(room.to_string()).or_insert(0);
        *seq += 1;
        let published = Published {
            seq: *seq,
            epoch: self.epoch.clone(),
        };
        self.deliver(
            room,
            format!(
                "{prefix}{},\"epoch\":\"{}\"}}",
                published.seq, published.epoch
            ),
        );
        drop(seq);
        ready(Ok(published)).boxed()
    }

    fn publish_event<'a>(
        &'a self,
        room: &'a str,
        json: String,
    ) -> BoxFuture<'a, Result<(), BackboneError>> {
        self.deliver(room, json);
        ready(Ok(())).boxed()
    }

    fn subscribe<'a>(&'a self, _room: &'a str) -> BoxFuture<'a, Result<(), BackboneError>> {
        ready(Ok(())).boxed()
    }

    fn release<'a>(&'a self, _room: &'a str) -> BoxFuture<'a, ()> {
        ready(()).boxed()
    }

    /// Sessions cannot outlive a node without a shared store: every connection is new.
    fn load_session<'a>(
        &'a self,
        _id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, BackboneError>> {
        ready(Ok(None)).boxed()
    }

    fn save_session<'a>(
        &'a self,
        _id: &'a str,
        _s: &'a SessionRecord,
    ) -> BoxFuture<'a, Result<(), BackboneError>> {
        ready(Ok(())).boxed()
    }

    fn touch_sessions<'a>(
        &'a self,
        _ids: &'a [Arc<str>],
    ) -> BoxFuture<'a, Result<(), BackboneError>> {
        ready(Ok(())).boxed()
    }

    /// No log is kept: a resume reports what it missed as incomplete.
    fn replay<'a>(
        &'a self,
        room: &'a str,
        _after: u64,
    ) -> BoxFuture<'a, Result<Replay, BackboneError>> {
        let head_seq = self.seqs.get(room).map_or(0, |s| *s);
        ready(Ok(Replay {
            epoch: Some(self.epoch.clone()),
            head_seq,
            frames: Vec::new(),
        }))
        .boxed()
    }

    fn is_ready(&self) -> bool {
        true
    }
}
