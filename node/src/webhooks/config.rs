//! The `[webhooks]` table of the node's TOML file and its validation into [`WebhooksConfig`].
//!
//! Lives here rather than in [`crate::config`] so that the webhook settings, their defaults
//! and their checks sit next to the code that uses them; `config.rs` only holds the table.

use super::event::Kind;
use serde::Deserialize;
use std::time::Duration;

pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_MAX_RETRY_SECS: u64 = 3_600;
pub const DEFAULT_OFFLINE_GRACE_MS: u64 = 5_000;
pub const DEFAULT_QUEUE_LEN: usize = 10_000;
pub const DEFAULT_WORKERS: usize = 4;
/// The longest a grace may be: a pending event is a Redis entry waiting that long.
pub const MAX_OFFLINE_GRACE_MS: u64 = 24 * 3600 * 1000;

/// `[webhooks]` as written; every field optional, unknown fields refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWebhooks {
    pub url: Option<String>,
    pub secret: Option<String>,
    pub events: Option<Vec<String>>,
    pub timeout_ms: Option<u64>,
    pub max_retry_secs: Option<u64>,
    pub offline_grace_ms: Option<u64>,
    pub queue_len: Option<usize>,
    pub workers: Option<usize>,
    /// Backoff between attempts: the first wait, doubling up to `retry_max_ms`.
    pub retry_min_ms: Option<u64>,
    pub retry_max_ms: Option<u64>,
}

/// Validated webhook settings.
#[derive(Debug, Clone)]
pub struct WebhooksConfig {
    /// Where every event is POSTed (`http://` only for now).
    pub url: http::Uri,
    /// The HMAC-SHA256 key of `X-Tether-Signature`.
    pub secret: Vec<u8>,
    /// The event types delivered (all by default). The others are still decided — a pending
    /// `client.offline` must exist to cancel a `client.online` — but never queued.
    pub events: Vec<Kind>,
    /// Deadline of one POST (connect, send, answer).
    pub timeout: Duration,
    /// An event not delivered this long after its first attempt is dropped (and counted).
    pub max_retry: Duration,
    /// How long an id's (or a room member's, or a room's) absence must last before it is
    /// reported: a failover reconnect within it reports nothing.
    pub offline_grace: Duration,
    /// Events waiting for delivery on this node, at most; past it new ones are dropped.
    pub queue_len: usize,
    /// Concurrent deliveries (each keeps its own keep-alive connection).
    pub workers: usize,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Fraction of each backoff wait left to chance (0 in tests: exact waits).
    pub jitter: f64,
}

impl WebhooksConfig {
    /// Whether events of `kind` are delivered.
    pub fn wants(&self, kind: Kind) -> bool {
        self.events.contains(&kind)
    }

    /// Settings for tests and embedding: every default, delivering to `url`.
    pub fn for_url(url: &str, secret: &str) -> Self {
        FileWebhooks { url: Some(url.into()), secret: Some(secret.into()), ..Default::default() }
            .validate()
            .expect("valid defaults")
            .expect("a url is set")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("field `webhooks.{field}`: {reason}")]
pub struct WebhooksError {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> WebhooksError {
    WebhooksError { field, reason: reason.into() }
}

impl FileWebhooks {
    /// `Ok(None)` when no `url` is set: webhooks are off (the other fields must then be absent
    /// too, so that a commented-out url is not mistaken for a working setup).
    pub fn validate(self) -> Result<Option<WebhooksConfig>, WebhooksError> {
        let Some(url) = self.url else {
            if self.secret.is_some() || self.events.is_some() {
                return Err(invalid("url", "required when [webhooks] sets anything else"));
            }
            return Ok(None);
        };
        let uri: http::Uri = url.parse().map_err(|e| invalid("url", format!("{url:?}: {e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(invalid("url", "https:// is not supported yet (TLS comes later); use http://"))
            }
            _ => return Err(invalid("url", format!("{url:?} is not an http:// URL"))),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(invalid("url", format!("{url:?} has no host")));
        }
        let secret = match self.secret {
            Some(s) if !s.is_empty() => s.into_bytes(),
            _ => return Err(invalid("secret", "required (and non-empty) when url is set")),
        };
        let events = match self.events {
            None => Kind::ALL.to_vec(),
            Some(names) => {
                let mut kinds = Vec::new();
                for name in &names {
                    let kind = Kind::parse(name).ok_or_else(|| {
                        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                        invalid("events", format!("unknown event {name:?}; known: {}", known.join(", ")))
                    })?;
                    if !kinds.contains(&kind) {
                        kinds.push(kind);
                    }
                }
                if kinds.is_empty() {
                    return Err(invalid("events", "empty: remove [webhooks] to turn them off"));
                }
                kinds
            }
        };
        let nonzero = |field: &'static str, v: Option<u64>, default: u64| match v.unwrap_or(default) {
            0 => Err(invalid(field, "must be greater than zero")),
            v => Ok(v),
        };
        let offline_grace_ms = self.offline_grace_ms.unwrap_or(DEFAULT_OFFLINE_GRACE_MS);
        if offline_grace_ms > MAX_OFFLINE_GRACE_MS {
            return Err(invalid("offline_grace_ms", format!("at most {MAX_OFFLINE_GRACE_MS} (a day)")));
        }
        let queue_len = match self.queue_len.unwrap_or(DEFAULT_QUEUE_LEN) {
            0 => return Err(invalid("queue_len", "must be greater than zero")),
            n => n,
        };
        let workers = match self.workers.unwrap_or(DEFAULT_WORKERS) {
            n @ 1..=256 => n,
            n => return Err(invalid("workers", format!("{n} is outside 1..=256"))),
        };
        let retry_min = nonzero("retry_min_ms", self.retry_min_ms, 500)?;
        let retry_max = nonzero("retry_max_ms", self.retry_max_ms, 60_000)?;
        if retry_max < retry_min {
            return Err(invalid("retry_max_ms", "must not be below retry_min_ms"));
        }
        Ok(Some(WebhooksConfig {
            url: uri,
            secret,
            events,
            timeout: Duration::from_millis(nonzero("timeout_ms", self.timeout_ms, DEFAULT_TIMEOUT_MS)?),
            max_retry: Duration::from_secs(nonzero("max_retry_secs", self.max_retry_secs, DEFAULT_MAX_RETRY_SECS)?),
            offline_grace: Duration::from_millis(offline_grace_ms),
            queue_len,
            workers,
            retry_min: Duration::from_millis(retry_min),
            retry_max: Duration::from_millis(retry_max),
            jitter: 0.5,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<WebhooksConfig>, String> {
        let file: FileWebhooks = toml::from_str(text).map_err(|e| e.to_string())?;
        file.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_event_names() {
        let cfg = parse("url = \"http://127.0.0.1:9/hook\"\nsecret = \"s\"").unwrap().unwrap();
        assert_eq!(cfg.events, Kind::ALL);
        assert_eq!(cfg.offline_grace, Duration::from_millis(DEFAULT_OFFLINE_GRACE_MS));
        assert_eq!(cfg.queue_len, DEFAULT_QUEUE_LEN);
        let cfg = parse("url = \"http://h/\"\nsecret = \"s\"\nevents = [\"client.offline\"]").unwrap().unwrap();
        assert_eq!(cfg.events, [Kind::ClientOffline]);
        assert!(parse("").unwrap().is_none());
    }

    #[test]
    fn bad_settings_name_their_field() {
        for (text, field) in [
            ("url = \"https://h/\"\nsecret = \"s\"", "webhooks.url"),
            ("url = \"ftp://h/\"\nsecret = \"s\"", "webhooks.url"),
            ("url = \"http://h/\"", "webhooks.secret"),
            ("url = \"http://h/\"\nsecret = \"\"", "webhooks.secret"),
            ("url = \"http://h/\"\nsecret = \"s\"\nevents = [\"client.gone\"]", "webhooks.events"),
            ("url = \"http://h/\"\nsecret = \"s\"\nevents = []", "webhooks.events"),
            ("url = \"http://h/\"\nsecret = \"s\"\ntimeout_ms = 0", "webhooks.timeout_ms"),
            ("url = \"http://h/\"\nsecret = \"s\"\nqueue_len = 0", "webhooks.queue_len"),
            ("url = \"http://h/\"\nsecret = \"s\"\nmax_retry_secs = 0", "webhooks.max_retry_secs"),
            ("secret = \"s\"", "webhooks.url"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(field), "{text}: {err}");
        }
        assert!(parse("url = \"http://h/\"\nsecret = \"s\"\nsecrte = 1").unwrap_err().contains("secrte"));
    }
}
