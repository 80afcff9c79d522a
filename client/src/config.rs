//! What a [`Client`](crate::Client) connects to, as whom, and how patiently it reconnects.
//!
//! [`ClientConfig`] is plain data with defaults in the range Centrifugo's client uses (0.5 s →
//! 20 s backoff); [`ClientConfig::validate`] runs inside [`Client::start`](crate::Client::start)
//! before anything is spawned, so a bad URL or id is an error at once rather than an endless
//! reconnect loop.

use std::sync::Arc;
use std::time::Duration;
use tether_proto::id::validate_client_id;
use tether_proto::wire::validate_name;

/// Default of [`ClientConfig::backoff_min`].
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Default of [`ClientConfig::backoff_max`].
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(20);
/// Default of [`ClientConfig::jitter`].
pub const DEFAULT_JITTER: f64 = 0.5;
/// Default of [`ClientConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ClientConfig::ping_interval`].
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(15);
/// Default of [`ClientConfig::event_buffer`].
pub const DEFAULT_EVENT_BUFFER: usize = 1024;
/// Default of [`ClientConfig::max_unconfirmed`].
pub const DEFAULT_MAX_UNCONFIRMED: usize = 1000;
/// Default of [`ClientConfig::max_unconfirmed_bytes`].
pub const DEFAULT_MAX_UNCONFIRMED_BYTES: usize = 4 << 20;
/// Default of [`ClientConfig::max_message_bytes`]: the node's own default.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 10;

/// Everything a client needs to know before its first connection.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `ws://` or `wss://HOST[:PORT]/PATH[?QUERY]` of a balancer or a node. The client adds
    /// `client=ID` to the query itself; a `client` parameter already in the URL is taken as
    /// [`client_id`](Self::client_id) when that is unset.
    pub url: String,
    /// The id to connect as. `None`: connect without one, adopt the id the server announces
    /// in `connected`, and use that id on every later connection.
    pub client_id: Option<String>,
    /// Display name, sent with `set_name` on every new session.
    pub name: Option<String>,
    /// Delay before the second attempt after a loss (the first is immediate).
    pub backoff_min: Duration,
    /// Ceiling of the doubling delay.
    pub backoff_max: Duration,
    /// Fraction (0.0–1.0) of each delay that is random: a delay `d` becomes uniform in
    /// `[d·(1−jitter), d]`, so clients cut off together do not come back together. 0 in tests.
    pub jitter: f64,
    /// Limit for the TCP + WebSocket handshake, for the `connected` frame, and for the
    /// re-sync after it (re-joins and replays) to make progress; past it the connection is
    /// abandoned and counts as a failed attempt.
    pub connect_timeout: Duration,
    /// Consecutive failed attempts after which the client gives up (emits `Closed`).
    /// `None`: never give up.
    pub max_attempts: Option<u32>,
    /// Send a WebSocket ping this often; a connection that has received nothing for two
    /// intervals is considered dead. `None`: no pings (rely on TCP and the balancer).
    pub ping_interval: Option<Duration>,
    /// Capacity of the event channel. When it is full the client stops reading the socket
    /// (backpressure towards the node) instead of dropping anything.
    pub event_buffer: usize,
    /// Messages sent and not yet confirmed (echoed back, or answered `duplicate`) that the
    /// client keeps for a resend after a reconnect. A `send` past it fails with
    /// [`Error::TooManyUnconfirmed`](crate::Error::TooManyUnconfirmed).
    pub max_unconfirmed: usize,
    /// The same bound in bytes (room, text, data and msg_id of every waiting message).
    pub max_unconfirmed_bytes: usize,
    /// Largest `message` frame `send` accepts (the node's `max_message_bytes`: a frame
    /// over it would close the connection with 1009 and, resent, close the next one too).
    pub max_message_bytes: usize,
    /// TLS settings of `wss://` connections (which CAs to trust; ALPN). `None`: rustls with
    /// the system's root certificates. Ignored for `ws://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl ClientConfig {
    /// A configuration with every default and no id or name.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            client_id: None,
            name: None,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            jitter: DEFAULT_JITTER,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_attempts: None,
            ping_interval: Some(DEFAULT_PING_INTERVAL),
            event_buffer: DEFAULT_EVENT_BUFFER,
            max_unconfirmed: DEFAULT_MAX_UNCONFIRMED,
            max_unconfirmed_bytes: DEFAULT_MAX_UNCONFIRMED_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            tls: None,
        }
    }

    /// Checks every field; the error names the field and the value that was wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        base_url(&self.url)?;
        if let Some(id) = &self.client_id {
            validate_client_id(id).map_err(|e| ConfigError::ClientId(id.clone(), e.to_string()))?;
        }
        if let Some(name) = &self.name {
            validate_name(name).map_err(|e| ConfigError::Name(name.clone(), e.message))?;
        }
        if self.backoff_min.is_zero() {
            return Err(ConfigError::Zero("backoff_min"));
        }
        if self.backoff_max < self.backoff_min {
            return Err(ConfigError::BackoffOrder { min: self.backoff_min, max: self.backoff_max });
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ConfigError::Jitter(self.jitter));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::Zero("connect_timeout"));
        }
        if self.max_attempts == Some(0) {
            return Err(ConfigError::Zero("max_attempts"));
        }
        if self.ping_interval.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::Zero("ping_interval"));
        }
        if self.event_buffer == 0 {
            return Err(ConfigError::Zero("event_buffer"));
        }
        if self.max_unconfirmed == 0 {
            return Err(ConfigError::Zero("max_unconfirmed"));
        }
        if self.max_unconfirmed_bytes == 0 {
            return Err(ConfigError::Zero("max_unconfirmed_bytes"));
        }
        if self.max_message_bytes == 0 {
            return Err(ConfigError::Zero("max_message_bytes"));
        }
        Ok(())
    }

    /// Moves a `client=` query parameter of the URL into `client_id` (when that is unset)
    /// and returns the URL without it; a conflicting pair is an error.
    pub(crate) fn normalise(mut self) -> Result<Self, ConfigError> {
        let (base, from_url) = base_url(&self.url)?;
        match (&self.client_id, from_url) {
            (Some(ours), Some(theirs)) if *ours != theirs => {
                return Err(ConfigError::ConflictingId { config: ours.clone(), url: theirs });
            }
            (None, Some(theirs)) => self.client_id = Some(theirs),
            _ => {}
        }
        self.url = base;
        self.validate()?;
        Ok(self)
    }
}

/// Why a [`ClientConfig`] was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("url {0:?}: {1}")]
    Url(String, &'static str),
    #[error("client_id {0:?}: {1}")]
    ClientId(String, String),
    #[error("client_id {config:?} differs from the url's client={url:?}")]
    ConflictingId { config: String, url: String },
    #[error("name {0:?}: {1}")]
    Name(String, String),
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("backoff_max ({max:?}) must not be less than backoff_min ({min:?})")]
    BackoffOrder { min: Duration, max: Duration },
    #[error("jitter must be within 0.0–1.0; got {0}")]
    Jitter(f64),
}

/// Splits `url` into the URL without its `client` query parameter and that parameter's
/// value, checking the scheme and that it parses.
fn base_url(url: &str) -> Result<(String, Option<String>), ConfigError> {
    let bad = |why| ConfigError::Url(url.to_string(), why);
    let uri: http::Uri = url.parse().map_err(|_| bad("not a valid URL"))?;
    match uri.scheme_str() {
        Some("ws" | "wss") => {}
        _ => return Err(bad("the scheme must be ws:// or wss://")),
    }
    if uri.host().is_none() {
        return Err(bad("no host"));
    }
    if url.contains('#') {
        return Err(bad("WebSocket URLs have no fragment"));
    }
    let Some((path, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None));
    };
    let mut id = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("client=") {
            Some(value) => {
                id = Some(value.to_string());
                false
            }
            None => !pair.is_empty(),
        })
        .collect();
    let base = if kept.is_empty() { path.to_string() } else { format!("{path}?{}", kept.join("&")) };
    Ok((base, id))
}

/// The URL of one connection attempt: `base` plus `client=ID` when an id is known. Ids are
/// `[A-Za-z0-9._:-]`, none of which needs percent-encoding in a query.
pub(crate) fn connect_url(base: &str, id: Option<&str>) -> String {
    match id {
        None => base.to_string(),
        Some(id) if base.contains('?') => format!("{base}&client={id}"),
        Some(id) => format!("{base}?client={id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_is_appended_to_the_query() {
        assert_eq!(connect_url("ws://h/ws", Some("a")), "ws://h/ws?client=a");
        assert_eq!(connect_url("ws://h/ws?x=1", Some("a")), "ws://h/ws?x=1&client=a");
        assert_eq!(connect_url("ws://h/ws", None), "ws://h/ws");
    }

    #[test]
    fn client_in_the_url_becomes_the_configured_id() {
        let cfg = ClientConfig::new("ws://h:1/ws?x=1&client=alice-7").normalise().expect("valid");
        assert_eq!(cfg.client_id.as_deref(), Some("alice-7"));
        assert_eq!(cfg.url, "ws://h:1/ws?x=1");
        let mut cfg = ClientConfig::new("ws://h/ws?client=bob");
        cfg.client_id = Some("alice".into());
        assert!(matches!(cfg.normalise(), Err(ConfigError::ConflictingId { .. })));
    }

    #[test]
    fn validate_names_the_field() {
        let ok = ClientConfig::new("ws://127.0.0.1:1/ws");
        assert_eq!(ok.validate(), Ok(()));
        let mut c = ok.clone();
        c.backoff_min = Duration::ZERO;
        assert_eq!(c.validate(), Err(ConfigError::Zero("backoff_min")));
        let mut c = ok.clone();
        c.jitter = 1.5;
        assert_eq!(c.validate(), Err(ConfigError::Jitter(1.5)));
        let mut c = ok.clone();
        c.client_id = Some("no spaces".into());
        assert!(matches!(c.validate(), Err(ConfigError::ClientId(..))));
        let mut c = ok.clone();
        c.url = "http://h/ws".into();
        assert!(matches!(c.validate(), Err(ConfigError::Url(..))));
        c.url = "wss://h/ws".into();
        assert_eq!(c.validate(), Ok(()));
        let mut c = ok;
        c.backoff_max = Duration::from_millis(1);
        assert!(matches!(c.validate(), Err(ConfigError::BackoffOrder { .. })));
    }
}
