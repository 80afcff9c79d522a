//! What a connection's token allows, and until when: the [`Grant`] its upgrade was admitted
//! with (or a `refresh` replaced it by) and the deadline its expiry puts on the connection.
//!
//! Held by the client state machine ([`super::Client`]); the deadline is an instant on the
//! connection task's clock, computed from the token's `exp` and the [`Now`] it was granted at,
//! so nothing here reads a clock. A connection admitted without a token (JWT off, or not
//! `required`) has no grant: every room, no deadline.

use super::Now;
use crate::auth::Grant;
use std::time::Duration;
use tokio::time::Instant;

/// A connection's grant and the instant it runs out.
#[derive(Debug, Default)]
pub struct Access {
    grant: Option<Grant>,
    /// `exp + leeway`, on the task's clock; `None` without a grant (or past any instant the
    /// clock can hold: an `exp` centuries away).
    deadline: Option<Instant>,
}

impl Access {
    /// Applies `grant` (at connect, or a verified `refresh`), read at `now`.
    pub fn set(&mut self, grant: Grant, now: Now) {
        self.deadline = deadline(grant.exp.saturating_add(grant.leeway), now);
        self.grant = Some(grant);
    }

    /// Whether the token lets this connection into `room` (no token: every room).
    pub fn allows(&self, room: &str) -> bool {
        self.grant.as_ref().is_none_or(|g| g.rooms.allows(room))
    }

    /// The display name the token sets, if any.
    pub fn name(&self) -> Option<&str> {
        self.grant.as_ref().and_then(|g| g.name.as_deref())
    }

    /// When the connection is to be closed 4001 unless a `refresh` comes first.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// The instant `end` (Unix seconds) falls at, seen from `now`; one already past is `now`.
fn deadline(end: u64, now: Now) -> Option<Instant> {
    let left_ms = end.saturating_mul(1000).saturating_sub(now.unix_ms);
    now.at.checked_add(Duration::from_millis(left_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::token::RoomAccess;

    fn grant(exp: u64, rooms: RoomAccess) -> Grant {
        Grant { sub: "a".into(), name: Some("A".into()), rooms, exp, leeway: 1 }
    }

    #[test]
    fn the_deadline_is_exp_plus_leeway_on_the_tasks_clock() {
        let at = Instant::now();
        let now = Now { at, unix_ms: 1_000_000_500 };
        let mut access = Access::default();
        assert!(access.allows("x") && access.deadline().is_none() && access.name().is_none());
        access.set(grant(1_000_010, RoomAccess::Any), now);
        assert_eq!(access.deadline(), Some(at + Duration::from_millis(10_500)));
        assert_eq!(access.name(), Some("A"));
        // Already past: due at once. Absurdly far: no overflow, no panic.
        access.set(grant(10, RoomAccess::Any), now);
        assert_eq!(access.deadline(), Some(at));
        access.set(grant(u64::MAX, RoomAccess::Only(vec!["a:*".into()])), now);
        assert!(access.allows("a:1") && !access.allows("b"));
    }
}
