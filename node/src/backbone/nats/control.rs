//! The NATS backbone's control path and session deletion: server API commands on the plain
//! subject `P.control`, which every node subscribes to from its start (the client crate
//! re-subscribes it after each reconnect), and `forget` as a purge of one session subject.
//! Also JetStream's leader-election advisories, subscribed to the same way: a room stream
//! with a new leader makes that room's reader check the log (`nats.rs`, `read_room`).

use super::{room_of_stream, NatsBackbone};
use crate::backbone::inbound::Inbound;
use crate::backbone::BackboneError;
use bytes::Bytes;
use futures_util::StreamExt;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The advisory JetStream sends when a stream elects a leader (the stream's name ends it).
const LEADER_ELECTED: &str = "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.*";

impl NatsBackbone {
    pub(super) fn control_subject(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// Starts the reader of the control subject: each command goes to `inbound` until shutdown.
    pub(super) fn spawn_control_reader(&self, inbound: Arc<dyn Inbound>, shutdown: CancellationToken) {
        let client = self.client.clone();
        let subject = self.control_subject();
        tokio::spawn(async move {
            let mut sub = match client.subscribe(subject.clone()).await {
                Ok(sub) => sub,
                Err(e) => return warn!(subject, error = %e, "cannot subscribe to the control subject"),
            };
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = sub.next() => m,
                };
                let Some(msg) = msg else { return };
                match std::str::from_utf8(&msg.payload) {
                    Ok(command) => inbound.control(command),
                    Err(_) => debug!("non-UTF-8 control command; dropped"),
                }
            }
        });
    }

    /// Starts the watch of stream leader elections: each one of a room stream this node
    /// reads tells that room's reader to check its stream, until shutdown.
    pub(super) fn spawn_leader_watch(&self) {
        let (client, me, shutdown) = (self.client.clone(), self.me.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            let mut sub = match client.subscribe(LEADER_ELECTED).await {
                Ok(sub) => sub,
                Err(e) => return warn!(subject = LEADER_ELECTED, error = %e, "cannot watch stream leader elections"),
            };
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = sub.next() => m,
                };
                let (Some(msg), Some(backbone)) = (msg, me.upgrade()) else { return };
                let stream = msg.subject.rsplit('.').next().unwrap_or_default();
                let Some(room) = room_of_stream(&backbone.prefix, stream) else { continue };
                info!(room, stream, "room stream has a new leader");
                let readers = backbone.readers.lock().await;
                if let Some(reader) = readers.get(&room) {
                    reader.recheck.notify_one();
                }
            }
        });
    }

    /// Publishes a command to every node (core NATS: at most once, like live frames).
    pub(super) async fn publish_control(&self, command: String) -> Result<(), BackboneError> {
        self.ensure_connected().await?;
        self.timed(self.client.publish(self.control_subject(), Bytes::from(command))).await?;
        self.timed(self.client.flush()).await
    }

    /// Deletes a client's session: purges its subject from the sessions stream.
    pub(super) async fn purge_session(&self, id: &str) -> Result<(), BackboneError> {
        let store = self.sessions().await?;
        self.timed(std::future::IntoFuture::into_future(store.purge().filter(self.session_subject(id))))
            .await
            .map(|_| ())
            .map_err(|e| {
                debug!(id, error = %e, "session purge failed");
                e
            })
    }
}
