//! Dedup keys of idempotent publishes for the backbones that keep them in this process (the
//! `none` backbone and the test-only memory one); Redis and NATS keep theirs in the backbone,
//! so that a repeat reaching another node is caught as well.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys seen within `ttl`, with the position of the message first published under each.
/// Expired keys are dropped whenever the map has doubled since the last sweep, so memory is
/// bounded by the keys of one `ttl` (twice over).
pub struct DedupCache {
    ttl: Duration,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    keys: HashMap<String, ((u64, String), Instant)>,
    swept_at_len: usize,
}

impl DedupCache {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, seen: Mutex::new(Seen::default()) }
    }

    /// The position first published under `key`, if that was within the ttl.
    pub fn get(&self, key: &str, now: Instant) -> Option<(u64, String)> {
        let seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.keys.get(key).filter(|(_, at)| now.duration_since(*at) < self.ttl).map(|(pos, _)| pos.clone())
    }

    /// Remembers that `key` was published at `position`.
    pub fn insert(&self, key: String, position: (u64, String), now: Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.keys.insert(key, (position, now));
        if seen.keys.len() >= 2 * seen.swept_at_len.max(512) {
            let ttl = self.ttl;
            seen.keys.retain(|_, (_, at)| now.duration_since(*at) < ttl);
            seen.swept_at_len = seen.keys.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_remembered_for_its_ttl_and_expired_keys_are_swept() {
        let cache = DedupCache::new(Duration::from_secs(10));
        let t0 = Instant::now();
        cache.insert("k".into(), (3, "e".into()), t0);
        assert_eq!(cache.get("k", t0 + Duration::from_secs(9)), Some((3, "e".into())));
        assert_eq!(cache.get("k", t0 + Duration::from_secs(10)), None);
        let later = t0 + Duration::from_secs(11);
        for i in 0..2000 {
            cache.insert(format!("n{i}"), (i, "e".into()), later);
        }
        assert!(cache.seen.lock().unwrap().keys.len() <= 2000, "the expired key was swept");
        assert!(!cache.seen.lock().unwrap().keys.contains_key("k"));
    }
}
