//! The Redis backbone's sessions: one hash per client id (`name`, `rooms` as a JSON array),
//! expiring `session_ttl` after its last write or touch.

use super::{calls, RedisBackbone};
use crate::backbone::{BackboneError, SessionRecord};
use std::sync::Arc;

impl RedisBackbone {
    pub(super) async fn load_session_record(&self, id: &str) -> Result<Option<SessionRecord>, BackboneError> {
        let mut con = self.commands.clone();
        let fields = self.command(calls::session_read(&self.keys, id).query_async(&mut con)).await?;
        Ok(calls::session_of(id, fields))
    }

    pub(super) async fn save_session_record(&self, id: &str, session: &SessionRecord) -> Result<(), BackboneError> {
        let pipe = calls::session_write(&self.keys, id, session, &self.cfg);
        let mut con = self.commands.clone();
        self.command(pipe.query_async::<()>(&mut con)).await
    }

    pub(super) async fn touch_session_records(&self, ids: &[Arc<str>]) -> Result<(), BackboneError> {
        {
            let ttl = self.cfg.session_ttl.as_millis() as i64;
            for chunk in ids.chunks(1000) {
                let mut pipe = redis::pipe();
                for id in chunk {
                    pipe.pexpire(self.keys.session(id), ttl).ignore();
                }
                let mut con = self.commands.clone();
                self.command(pipe.query_async::<()>(&mut con)).await?;
            }
            Ok(())
        }
    }
}
