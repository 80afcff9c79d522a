//! The node registry on NATS (`docs/SCALING.md`, "Node registry and discovery"): one stream,
//! `P_nodes` ([`NatsRegistry`]), memory storage, one message kept per subject, each node's
//! record on its own subject. The stream's `max_age` is [`STALE_AFTER`]: the server itself
//! expires a node that stopped announcing, on its own clock, so balancers need no clock of
//! theirs to judge it — what is in the stream is the node set.

use super::{nats_err, NatsBackbone};
use crate::backbone::BackboneError;
use async_nats::jetstream::stream;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use tether_proto::backbone::{NatsRegistry, NodeRecord, STALE_AFTER};

impl NatsBackbone {
    /// Makes sure the registry stream exists with `nats_replicas` copies (the same
    /// configuration from every node, so creating it is idempotent) and returns it.
    async fn registry_stream(&self, names: &NatsRegistry) -> Result<stream::Stream, BackboneError> {
        self.ensure_connected().await?;
        let config = stream::Config {
            name: names.stream(),
            subjects: vec![names.subjects()],
            storage: stream::StorageType::Memory,
            max_messages_per_subject: 1,
            max_age: STALE_AFTER,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        };
        let stream = self.ensure(config).await?;
        self.registry_checked.store(true, Ordering::Release);
        Ok(stream)
    }

    /// Writes this node's record. The stream is made sure of at the first announcement (so
    /// one an older deployment made with fewer copies is scaled) and again whenever the write
    /// is refused (NATS lost it): one publish per announcement otherwise.
    pub(super) async fn announce_record(&self, record: &NodeRecord) -> Result<(), BackboneError> {
        let names = NatsRegistry::new(&self.cfg.prefix);
        if !self.registry_checked.load(Ordering::Acquire) {
            self.registry_stream(&names).await?;
        }
        let subject = names.subject(&record.name);
        let payload = Bytes::from(record.to_json());
        if self.publish_acked(subject.clone(), None, payload.clone()).await?.is_ok() {
            return Ok(());
        }
        self.registry_stream(&names).await?;
        self.publish_acked(subject, None, payload).await?.map(|_| ()).map_err(nats_err)
    }

    /// Removes this node's record — only if it is still this instance's (a successor started
    /// under the same name may have announced already).
    pub(super) async fn withdraw_record(&self, record: &NodeRecord) -> Result<(), BackboneError> {
        let names = NatsRegistry::new(&self.cfg.prefix);
        let stream = self.registry_stream(&names).await?;
        let Some(last) = self.direct(stream.direct_get_last_for_subject(names.subject(&record.name))).await? else {
            return Ok(());
        };
        let current: Option<NodeRecord> = serde_json::from_slice(&last.payload).ok();
        if current.is_some_and(|c| c.instance == record.instance) {
            self.timed(stream.delete_message(last.sequence)).await?;
        }
        Ok(())
    }
}
