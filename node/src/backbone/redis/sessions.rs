//! The Redis backbone's sessions: one hash per client id (`name`, `rooms` as a JSON array),
//! expiring `session_ttl` after its last write or touch.

use super::RedisBackbone;
use crate::backbone::{BackboneError, SessionRecord};
use std::sync::Arc;
use tracing::warn;

impl RedisBackbone {
    pub(super) async fn load_session_record(&self, id: &str) -> Result<Option<SessionRecord>, BackboneError> {
        {
            let mut con = self.commands.clone();
            let (name, rooms): (Option<String>, Option<String>) = self
                .command(redis::cmd("HMGET").arg(self.keys.session(id)).arg("name").arg("rooms").query_async(&mut con))
                .await?;
            let Some(rooms) = rooms else {
                return Ok(None);
            };
            // A record we cannot read is treated as no record (and logged): the client then
            // starts a new session instead of failing to connect.
            let rooms: Vec<String> = match serde_json::from_str(&rooms) {
                Ok(r) => r,
                Err(e) => {
                    warn!(id, error = %e, "unreadable session record; starting a new session");
                    return Ok(None);
                }
            };
            Ok(Some(SessionRecord { name, rooms }))
        }
    }

    pub(super) async fn save_session_record(&self, id: &str, session: &SessionRecord) -> Result<(), BackboneError> {
        {
            let key = self.keys.session(id);
            // Vec<String> always serialises.
            let rooms = serde_json::to_string(&session.rooms).expect("room names serialise");
            let mut pipe = redis::pipe();
            pipe.atomic().del(&key).ignore().hset(&key, "rooms", rooms).ignore();
            if let Some(name) = &session.name {
                pipe.hset(&key, "name", name).ignore();
            }
            pipe.pexpire(&key, self.cfg.session_ttl.as_millis() as i64).ignore();
            let mut con = self.commands.clone();
            self.command(pipe.query_async::<()>(&mut con)).await
        }
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
