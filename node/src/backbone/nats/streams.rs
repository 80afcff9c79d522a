//! The JetStream streams of the NATS backbone and how they are made sure of: every one
//! (rooms, sessions, presence) is created with `nats_replicas` copies, and one found with
//! another count is scaled to it — or, if JetStream refuses, the log says which stream has
//! how many copies and why it stays so (never a silent mismatch).
//!
//! Reads that must not miss a message also live here. Direct gets (`allow_direct`) are
//! answered by any replica, and on a replicated stream a follower may not yet hold what the
//! leader just acknowledged; so a message a direct get does not find is asked of the stream
//! leader before it counts as gone.

use super::{nats_err, NatsBackbone, StreamState};
use crate::backbone::BackboneError;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::{stream as fstream, StreamExt};
use std::sync::Arc;
use tether_proto::wire::complete_message;
use tracing::{info, warn};

/// Log messages fetched concurrently during a replay.
pub(super) const REPLAY_CONCURRENCY: usize = 32;

/// A stream's replica count as JetStream reports it (0, as an unset field reads, is one copy).
fn replicas_of(info: &stream::Info) -> usize {
    info.config.num_replicas.max(1)
}

impl NatsBackbone {
    /// Looks the stream up, creating it from `config` (with `nats_replicas` copies) if it does
    /// not exist; an existing one with another replica count is scaled to it (logged).
    pub(super) async fn ensure(&self, mut config: stream::Config) -> Result<stream::Stream, BackboneError> {
        config.num_replicas = self.cfg.nats_replicas;
        let name = config.name.clone();
        let stream = self
            .timed(self.js.get_or_create_stream(config))
            .await
            .map_err(|e| BackboneError::Nats(format!("stream {name} ({} replicas): {e}", self.cfg.nats_replicas)))?;
        let have = replicas_of(stream.cached_info());
        if have == self.cfg.nats_replicas {
            return Ok(stream);
        }
        self.rescale(&name, have, stream.cached_info().config.clone()).await;
        Ok(stream)
    }

    /// Asks JetStream to change an existing stream's replica count to `nats_replicas`, keeping
    /// the rest of its configuration; says in the log what came of it.
    async fn rescale(&self, name: &str, have: usize, mut config: stream::Config) {
        let want = self.cfg.nats_replicas;
        warn!(stream = name, replicas = have, nats_replicas = want, "stream has another replica count; updating it");
        config.num_replicas = want;
        match self.timed(self.js.update_stream(&config)).await {
            Ok(info) if replicas_of(&info) == want => {
                info!(stream = name, replicas = want, "stream now has the configured replica count")
            }
            Ok(info) => warn!(
                stream = name,
                replicas = replicas_of(&info),
                nats_replicas = want,
                "stream update answered another replica count; it keeps it"
            ),
            Err(e) => warn!(
                stream = name,
                replicas = have,
                nats_replicas = want,
                error = %e,
                "stream keeps its replica count: JetStream refused to change it (fewer servers than \
                 nats_replicas? set nats_replicas to match the cluster, or re-create the stream)"
            ),
        }
    }

    pub(super) fn state_of(info: &stream::Info) -> StreamState {
        StreamState {
            epoch: Arc::from(info.created.unix_timestamp_nanos().to_string()),
            head: info.state.last_sequence,
            first: info.state.first_sequence,
        }
    }

    /// Creates the room's stream if it does not exist (idempotent across nodes: the same
    /// configuration) and returns its state.
    pub(super) async fn ensure_stream(&self, room: &str) -> Result<StreamState, BackboneError> {
        self.ensure_connected().await?;
        let config = stream::Config {
            name: self.stream_name(room),
            subjects: vec![self.log_subject(room)],
            storage: stream::StorageType::Memory,
            max_messages: i64::try_from(self.cfg.history_len).unwrap_or(i64::MAX),
            max_age: self.cfg.log_ttl,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            // Dedup keys (`Nats-Msg-Id`) are remembered this long; the window may not
            // outlast the messages.
            duplicate_window: self.cfg.idempotency_ttl.min(self.cfg.log_ttl),
            republish: Some(stream::Republish {
                source: self.log_subject(room),
                destination: self.live_subject(room),
                headers_only: false,
            }),
            ..Default::default()
        };
        // The stream comes with the info its lookup (or creation) answered, read just now.
        let stream = self.ensure(config).await?;
        let state = Self::state_of(stream.cached_info());
        self.epochs.insert(room.to_string(), Arc::clone(&state.epoch));
        Ok(state)
    }

    /// The sessions stream: one subject per client id, only its last message kept, each
    /// `session_ttl` old at most. (A stream rather than a KV bucket: the KV API of the
    /// client crate cannot create buckets on the 2.9 servers Debian ships, whose account-info
    /// reply it does not parse; this is the same storage a bucket would use.)
    pub(super) async fn sessions(&self) -> Result<&stream::Stream, BackboneError> {
        self.ensure_connected().await?;
        self.sessions
            .get_or_try_init(|| async {
                let config = stream::Config {
                    name: format!("{}_sessions", self.prefix),
                    subjects: vec![format!("{}.session.*", self.prefix)],
                    storage: stream::StorageType::Memory,
                    max_messages_per_subject: 1,
                    max_age: self.cfg.session_ttl,
                    discard: stream::DiscardPolicy::Old,
                    allow_direct: true,
                    ..Default::default()
                };
                self.ensure(config).await
            })
            .await
    }

    /// Message `seq` of `stream`: from any replica, else from the leader (a follower may lag
    /// behind what was acknowledged); `None` only when the leader does not have it either.
    async fn message_at(
        &self,
        stream: &stream::Stream<()>,
        seq: u64,
    ) -> Result<Option<jetstream::message::StreamMessage>, BackboneError> {
        if let Some(m) = self.direct(stream.direct_get(seq)).await? {
            return Ok(Some(m));
        }
        if self.cfg.nats_replicas == 1 {
            return Ok(None);
        }
        match tokio::time::timeout(self.cfg.redis_timeout, stream.get_raw_message(seq)).await {
            Err(_) => Err(BackboneError::Timeout(self.cfg.redis_timeout)),
            Ok(Ok(m)) => Ok(Some(m)),
            Ok(Err(e)) if no_such_message(&e) => Ok(None),
            Ok(Err(e)) => Err(nats_err(e)),
        }
    }

    /// Logged frames of `room` with seq in `from..=to`, completed with `epoch`, in seq order.
    /// Messages already trimmed are skipped (the caller sees the hole by the seqs).
    pub(super) async fn fetch(
        &self,
        room: &str,
        from: u64,
        to: u64,
        epoch: &str,
    ) -> Result<Vec<(u64, String)>, BackboneError> {
        if from > to {
            return Ok(Vec::new());
        }
        let stream = self.timed(self.js.get_stream_no_info(self.stream_name(room))).await?;
        let stream = &stream;
        let gets = fstream::iter(from..=to)
            .map(|seq| async move { Ok(self.message_at(stream, seq).await?.map(|m| (seq, m.payload))) })
            .buffered(REPLAY_CONCURRENCY);
        let got: Vec<Result<Option<(u64, Bytes)>, BackboneError>> = gets.collect().await;
        let mut frames = Vec::with_capacity(got.len());
        for item in got {
            if let Some((seq, payload)) = item? {
                match std::str::from_utf8(&payload) {
                    Ok(prefix) => frames.push((seq, complete_message(prefix, seq, epoch))),
                    Err(_) => warn!(room, seq, "non-UTF-8 message in the room log; skipped"),
                }
            }
        }
        Ok(frames)
    }
}

/// Whether a leader get failed because the stream has no such message (trimmed or deleted).
fn no_such_message(e: &stream::RawMessageError) -> bool {
    match e.kind() {
        stream::RawMessageErrorKind::NoMessageFound => true,
        stream::RawMessageErrorKind::JetStream(j) => j.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND,
        _ => false,
    }
}
