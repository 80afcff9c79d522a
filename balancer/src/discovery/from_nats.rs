//! Reading the NATS registry ([`NatsRegistry`]): every subject of the stream holds one node's
//! record, and the server expires a record not renewed for `STALE_AFTER` (the stream's
//! `max_age`), so what the stream holds is the node set. No stream yet (no node has
//! announced): an empty set, not an error.

use async_nats::jetstream::{self, context::GetStreamErrorKind, stream::DirectGetErrorKind};
use futures_util::StreamExt;
use tether_proto::backbone::{NatsRegistry, NodeRecord};
use tracing::debug;

/// Most subjects read per round: far more nodes than one cluster has; it bounds the loop.
const MAX_NODES: usize = 10_000;

pub async fn read(js: &jetstream::Context, names: &NatsRegistry) -> Result<Vec<NodeRecord>, String> {
    let stream = match js.get_stream(names.stream()).await {
        Ok(stream) => stream,
        Err(e) => {
            return match e.kind() {
                GetStreamErrorKind::JetStream(j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {
                    Ok(Vec::new())
                }
                _ => Err(format!("registry stream {}: {e}", names.stream())),
            }
        }
    };
    let mut subjects = stream.info_with_subjects(names.subjects()).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(item) = subjects.next().await {
        let (subject, _) = item.map_err(|e| e.to_string())?;
        let message = match stream.direct_get_last_for_subject(subject.as_str()).await {
            Ok(m) => m,
            // Expired or withdrawn between the listing and the read.
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{subject}: {e}")),
        };
        match serde_json::from_slice::<NodeRecord>(&message.payload) {
            Ok(record) if names.subject(&record.name) == subject => out.push(record),
            _ => debug!(%subject, "registry message that is not a node record skipped"),
        }
        if out.len() >= MAX_NODES {
            break;
        }
    }
    Ok(out)
}
