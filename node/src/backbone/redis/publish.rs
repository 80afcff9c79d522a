//! The Redis backbone's publish step: one call of the publish script (`PUBLISH_LUA`) for one
//! client's consecutive messages to one room, with or without dedup keys.

use super::{calls, RedisBackbone};
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
        let call = calls::publish_call(&self.publish, &self.keys, &self.cfg, room, dedup, &[], prefixes);
        let mut con = self.commands.clone();
        calls::run_publish(call, &mut con, &self.readiness, &self.metrics).await
    }
}
