//! The Redis backbone's publish step: one call of the publish script (`PUBLISH_LUA`) for one
//! client's consecutive messages to one room, with or without dedup keys.

use super::RedisBackbone;
use crate::backbone::{BackboneError, Published};

impl RedisBackbone {
    /// Publishes `prefixes` in `room` in one atomic step; with `dedup` (one key per prefix)
    /// each only if its key is not remembered yet. One answer per message.
    pub(super) async fn publish_step(
        &self,
        room: &str,
        dedup: Vec<String>,
        prefixes: Vec<String>,
    ) -> Result<Vec<Published>, BackboneError> {
        if prefixes.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.publish.prepare_invoke();
        let keys = self.keys.room(room);
        invocation.key(keys.meta).key(keys.log).key(keys.channel);
        for key in dedup {
            invocation.key(self.keys.dedup(room, &key));
        }
        invocation
            .arg(tether_proto::id::mint_client_id())
            .arg(self.cfg.history_len)
            .arg(self.cfg.log_ttl.as_millis() as u64)
            .arg(self.cfg.idempotency_ttl.as_millis() as u64);
        for prefix in prefixes {
            invocation.arg(prefix);
        }
        let mut con = self.commands.clone();
        let answers: Vec<(u64, String, u8)> = self.command(invocation.invoke_async(&mut con)).await?;
        let published = answers.iter().filter(|(_, _, dup)| *dup == 0).count();
        self.metrics.messages_published.inc_by(published as u64);
        Ok(answers.into_iter().map(|(seq, epoch, dup)| Published { seq, epoch, duplicate: dup != 0 }).collect())
    }
}
