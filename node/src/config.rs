//! Node configuration: the TOML file (`configs/node.toml`), validated into [`Config`].
//!
//! `FileConfig` mirrors the file with every field optional and unknown fields refused;
//! [`crate::cli`] lays the binary's flags over it; [`FileConfig::validate`] turns the result into a
//! [`Config`] with every default filled in, or an error naming the offending field.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9001";
pub const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379/";
pub const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_PREFIX: &str = "tether:";
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
pub const DEFAULT_SEND_QUEUE_LEN: usize = 65_536;
pub const DEFAULT_SEND_QUEUE_BYTES: usize = 8 * 1024 * 1024;
pub const DEFAULT_SEND_QUEUE_LOW_WATER_BYTES: usize = 1024 * 1024;
pub const DEFAULT_SLOW_CONSUMER_MS: u64 = 5_000;
pub const DEFAULT_RATE_LIMIT_BURST: u32 = 50;
pub const DEFAULT_HISTORY_LEN: u64 = 1000;
pub const DEFAULT_LOG_TTL_SECS: u64 = 24 * 3600;
pub const DEFAULT_READ_BUFFER_BYTES: usize = 512;
/// Upper bound of `threads`: far more than any machine has cores; it catches a typo before
/// tokio tries to start that many threads.
pub const MAX_THREADS: usize = 1024;
/// Descriptors one client connection holds on a node (its socket); `max_connections`
/// defaults to what `RLIMIT_NOFILE` allows less a reserve (see `tether_proto::limits`).
pub const FDS_PER_CONNECTION: u64 = 1;
/// Seconds a client refused at `max_connections` is told to wait (`Retry-After`).
pub const RETRY_AFTER_SECS: u64 = 5;
pub const DEFAULT_MAX_ROOMS_PER_CLIENT: usize = 100;
pub const DEFAULT_GRACE_PERIOD_MS: u64 = 5_000;
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 2_000;
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_RECONNECT_MIN_MS: u64 = 50;
pub const DEFAULT_RECONNECT_MAX_MS: u64 = 250;
pub const DEFAULT_SESSION_TTL_SECS: u64 = 3600;
pub const DEFAULT_RESUME_GRACE_MS: u64 = 1_000;
pub const DEFAULT_IDEMPOTENCY_TTL_SECS: u64 = 300;
pub const DEFAULT_PRESENCE_TTL_MS: u64 = 3_000;
pub const DEFAULT_PROBE_INTERVAL_MS: u64 = 2_000;
/// JetStream replicas when `nats` lists at least this many servers (a cluster that can lose
/// one and keep a majority of every stream)...
pub const NATS_CLUSTER_REPLICAS: usize = 3;
/// ...and below that: one copy, as on a single server.
pub const NATS_SINGLE_REPLICAS: usize = 1;
/// JetStream's own ceiling on a stream's replicas.
pub const MAX_NATS_REPLICAS: usize = 5;
/// Environment variable holding the signing key when no file is configured.
pub const SIGNING_KEY_ENV: &str = "TETHER_SIGNING_KEY";
/// Environment variable holding the server API key when neither the flag nor the file sets one.
pub const API_KEY_ENV: &str = "TETHER_API_KEY";
/// Longest API key accepted (a key is a secret string, not a file).
pub const MAX_API_KEY_BYTES: usize = 1024;
/// Shortest API key accepted: a guessable key is worse than none.
pub const MIN_API_KEY_BYTES: usize = 16;

/// Which backbone carries rooms between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackboneKind {
    /// Redis pub/sub, with seq, logs, sessions and presence in Redis.
    Redis,
    /// NATS: a JetStream stream per room (seq, log, republished live), sessions in a KV bucket.
    Nats,
    /// Sticky sessions alone: a room reaches only the members on the same node.
    None,
}

impl std::str::FromStr for BackboneKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "redis" => Ok(Self::Redis),
            "none" => Ok(Self::None),
            "nats" => Ok(Self::Nats),
            other => Err(format!("unknown backbone {other:?}; use redis, nats or none")),
        }
    }
}

/// The file as written; every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    /// `HOST:PORT` announced in the node registry (default: the listen address).
    pub advertise: Option<String>,
    /// Whether to announce this node in the node registry (default true).
    pub announce: Option<bool>,
    pub name: Option<String>,
    pub redis: Option<String>,
    pub nats: Option<String>,
    /// Copies of every JetStream stream the NATS backbone creates (1–5; default 3 when
    /// `nats` lists 3+ servers, else 1).
    pub nats_replicas: Option<usize>,
    pub backbone: Option<BackboneKind>,
    pub prefix: Option<String>,
    pub max_message_bytes: Option<usize>,
    pub send_queue_len: Option<usize>,
    pub send_queue_bytes: Option<usize>,
    pub send_queue_low_water_bytes: Option<usize>,
    pub slow_consumer_ms: Option<u64>,
    /// No longer used (frames gather in the send queue and leave in one vectored write);
    /// accepted with a warning so that an older config still starts.
    pub write_buffer_bytes: Option<usize>,
    pub rate_limit_per_sec: Option<u32>,
    pub rate_limit_burst: Option<u32>,
    pub history_len: Option<u64>,
    pub log_ttl_secs: Option<u64>,
    pub read_buffer_bytes: Option<usize>,
    pub threads: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_rooms_per_client: Option<usize>,
    pub grace_period_ms: Option<u64>,
    pub redis_timeout_ms: Option<u64>,
    pub header_read_timeout_ms: Option<u64>,
    pub reconnect_min_ms: Option<u64>,
    pub reconnect_max_ms: Option<u64>,
    pub session_ttl_secs: Option<u64>,
    pub resume_grace_ms: Option<u64>,
    pub idempotency_ttl_secs: Option<u64>,
    pub signing_key_file: Option<std::path::PathBuf>,
    pub presence_ttl_ms: Option<u64>,
    pub probe_interval_ms: Option<u64>,
    /// Peers (CIDRs or addresses) whose `X-Real-IP`/`X-Forwarded-For` name the client;
    /// absent = loopback (`127.0.0.0/8`, `::1/128`), `[]` = nobody.
    pub trusted_proxies: Option<Vec<String>>,
    /// `[auth]`: JWT keys and policy (see [`crate::auth::config`]).
    pub auth: Option<crate::auth::config::FileAuth>,
    /// The server API (`docs/API.md`); off without a key.
    pub api: Option<ApiFileConfig>,
    /// `[webhooks]` (see `crate::webhooks::config`).
    pub webhooks: Option<crate::webhooks::FileWebhooks>,
}

/// The `[api]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiFileConfig {
    /// The key every `/api/` request must present.
    pub key: Option<String>,
}

/// The server API's key. Its `Debug` hides it, so a logged `Config` never shows it; requests'
/// keys are compared with it in constant time ([`ApiKey::matches`]).
#[derive(Clone)]
pub struct ApiKey {
    /// SHA-256 of the key: comparing digests takes the same time whatever the lengths.
    digest: [u8; 32],
}

impl ApiKey {
    pub fn new(key: &str) -> Result<Self, String> {
        if key.len() < MIN_API_KEY_BYTES || key.len() > MAX_API_KEY_BYTES {
            return Err(format!("{}–{} bytes", MIN_API_KEY_BYTES, MAX_API_KEY_BYTES));
        }
        if key.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
            return Err("printable ASCII without spaces (it travels in an HTTP header)".into());
        }
        Ok(Self { digest: Self::digest(key.as_bytes()) })
    }

    fn digest(key: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(key).into()
    }

    /// Whether `given` is the key, in time that does not depend on where they differ.
    pub fn matches(&self, given: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(Self::digest(given).ct_eq(&self.digest))
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(…)")
    }
}

/// A validated configuration with every default applied.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind (the binary binds it; `run` takes a bound listener).
    pub listen: SocketAddr,
    /// The `HOST:PORT` balancers should dial, announced in the node registry; `None`: the
    /// address actually bound (so port 0 announces the port it got).
    pub advertise: Option<String>,
    /// Whether this node announces itself in its backbone's node registry (never with the
    /// `none` backbone: it has none).
    pub announce: bool,
    /// This node's name, shown to clients as `server`.
    pub name: String,
    /// Redis URL (used by the `redis` backbone).
    pub redis: String,
    /// With `redis = "redis+cluster://h1:p1,h2:p2,…"`: the seed nodes' `redis://h:p/` URLs,
    /// and the `redis` backbone is a Redis Cluster (the rest of it discovered).
    pub redis_cluster: Option<Vec<String>>,
    /// NATS server URLs, comma-separated: one server or several of a cluster (used by the
    /// `nats` backbone; see [`nats_servers`]).
    pub nats: String,
    /// Replicas of every stream the NATS backbone creates (rooms, sessions, presence).
    pub nats_replicas: usize,
    pub backbone: BackboneKind,
    /// Prefix of every Redis key and channel.
    pub prefix: String,
    /// Largest accepted frame or message; larger closes with 1009.
    pub max_message_bytes: usize,
    /// Hard cap on the frames waiting for one client: past it, it is a slow consumer at once.
    pub send_queue_len: usize,
    /// Hard cap on the bytes waiting for one client: past it, it is a slow consumer at once.
    pub send_queue_bytes: usize,
    /// A client whose waiting bytes stay over this for `slow_consumer` is a slow consumer.
    pub send_queue_low_water_bytes: usize,
    pub slow_consumer: Duration,
    /// Frames per second one connection may send (token bucket; 0 = no limit). Frames over
    /// it are answered `rate_limited` and not acted on.
    pub rate_limit_per_sec: u32,
    pub rate_limit_burst: u32,
    /// Messages kept in each room's log for resume.
    pub history_len: u64,
    /// How long a room's log and counter outlive its last message.
    pub log_ttl: Duration,
    /// WebSocket read buffer per connection; decides most of an idle client's memory.
    pub read_buffer_bytes: usize,
    /// Worker threads of the runtime the binary starts. Default: one per core.
    pub threads: usize,
    /// Client WebSocket connections open at once; past it upgrades get 503 with `Retry-After`.
    /// Default: what the soft `RLIMIT_NOFILE` allows less a reserve (see `connection_limit`).
    pub max_connections: usize,
    /// `max_connections` and where it came from (derived or configured), for the start-up
    /// log line and its warning when an explicit value is above what the descriptors allow.
    pub connection_limit: tether_proto::limits::ConnectionLimit,
    pub max_rooms_per_client: usize,
    /// How long a shutdown waits for clients to be told and cleaned up.
    pub grace_period: Duration,
    /// Deadline of each Redis command; past it the client gets `backbone_unavailable`.
    pub redis_timeout: Duration,
    pub header_read_timeout: Duration,
    /// Backoff bounds (doubling, 50–100% jitter) of the backbone's reconnect loops: the Redis
    /// subscriber, the probe of the Redis command connection, the NATS client. The cap is
    /// what a node may lag behind a backbone that has come back.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How long a session (name, rooms) outlives its client's last connection.
    pub session_ttl: Duration,
    /// How long restored rooms hold live frames waiting for the client's `resume`.
    pub resume_grace: Duration,
    /// How long a message's dedup key (a client's `msg_id`, an API `idempotency_key`) is
    /// remembered: a repeat within it is answered with the first one's seq, not published.
    pub idempotency_ttl: Duration,
    /// When set, only ids signed with this key are accepted (see `tether_proto::sign`).
    pub signing_key: Option<tether_proto::sign::SigningKey>,
    /// A node instance silent this long is dead: its members are announced `node_down`.
    /// Heartbeats go out every third of it.
    pub presence_ttl: Duration,
    /// How often the subscriber checks itself end to end (a silent subscription is
    /// re-established after three missed probes).
    pub probe_interval: Duration,
    /// TCP peers believed when they say who the client is (`X-Real-IP`, else
    /// `X-Forwarded-For`): a balancer in front of the node. Anyone else is the client itself.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The server API's key (`[api] key`, `--api-key`, `TETHER_API_KEY`); `None`: the API is off.
    pub api_key: Option<ApiKey>,
    /// When set, upgrades are checked for a JWT (see [`crate::auth`]).
    pub auth: Option<std::sync::Arc<crate::auth::Verifier>>,
    /// Signed webhooks, when `[webhooks] url` is set (Redis and `none` backbones only).
    pub webhooks: Option<crate::webhooks::WebhooksConfig>,
}

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: String, source: Box<toml::de::Error> },
    #[error("field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Webhooks(#[from] crate::webhooks::config::WebhooksError),
}

/// The scheme of a Redis Cluster backbone's URL.
pub const REDIS_CLUSTER_SCHEME: &str = "redis+cluster://";

/// `redis+cluster://h1:p1,h2:p2,…` → the seeds as `redis://h:p/` (`None` for another scheme).
/// Every entry must be `HOST:PORT` with a port in 1..=65535; no user, path or query.
fn cluster_seeds(url: &str) -> Result<Option<Vec<String>>, String> {
    let Some(list) = url.strip_prefix(REDIS_CLUSTER_SCHEME) else { return Ok(None) };
    let list = list.strip_suffix('/').unwrap_or(list);
    let mut seeds = Vec::new();
    for (i, entry) in list.split(',').enumerate() {
        let entry = entry.trim();
        let bad = |why: &str| {
            format!("{url:?}: seed {} ({entry:?}) {why}; expected redis+cluster://HOST:PORT,HOST:PORT,…", i + 1)
        };
        let Some((host, port)) = entry.rsplit_once(':') else { return Err(bad("has no port")) };
        if host.is_empty() || host.contains(['/', '@', '?', ' ']) {
            return Err(bad("is not a host name or address"));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => seeds.push(format!("redis://{host}:{p}/")),
            _ => return Err(bad("has a bad port")),
        }
    }
    Ok(Some(seeds))
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, reason: reason.into() }
}

/// The `advertise` address: checked when given; required when the listen address is every
/// interface (0.0.0.0 or [::] is no address to dial) and the node announces itself.
fn advertise(value: Option<String>, listen: SocketAddr, announce: bool) -> Result<Option<String>, ConfigError> {
    let Some(addr) = value else {
        if announce && listen.ip().is_unspecified() {
            return Err(invalid(
                "advertise",
                format!(
                    "required when listening on {listen} (every interface): the HOST:PORT balancers should dial \
                     (--advertise), or announce = false"
                ),
            ));
        }
        return Ok(None);
    };
    tether_proto::backbone::check_host_port(&addr).map_err(|reason| invalid("advertise", reason))?;
    let host = addr.rsplit_once(':').map_or("", |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
        return Err(invalid("advertise", format!("{addr:?} is every interface, not an address to dial")));
    }
    Ok(Some(addr))
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_string(), source: Box::new(e) })
    }

    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen_text = self.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr =
            listen_text.parse().map_err(|e| invalid("listen", format!("{listen_text:?} is not IP:PORT ({e})")))?;
        let name = match self.name {
            Some(n) => n,
            None => format!("{}:{}", hostname(), listen.port()),
        };
        if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("name", format!("{name:?}: 1–64 bytes, no whitespace or control characters")));
        }
        let redis = self.redis.unwrap_or_else(|| DEFAULT_REDIS.to_string());
        let redis_cluster = cluster_seeds(&redis).map_err(|reason| invalid("redis", reason))?;
        if redis_cluster.is_none()
            && !(redis.starts_with("redis://") || redis.starts_with("rediss://") || redis.starts_with("unix://"))
        {
            return Err(invalid("redis", format!("{redis:?} is not a redis:// or redis+cluster:// URL")));
        }
        let nats = self.nats.unwrap_or_else(|| DEFAULT_NATS.to_string());
        let servers = nats_servers(&nats);
        if servers.is_empty() {
            return Err(invalid("nats", "no server URL given"));
        }
        for (i, url) in servers.iter().enumerate() {
            let scheme_ok = url.starts_with("nats://") || url.starts_with("tls://");
            if let Some(reason) = match url.parse::<async_nats::ServerAddr>() {
                _ if !scheme_ok => Some("not a nats:// or tls:// URL".to_string()),
                Err(e) => Some(e.to_string()),
                Ok(_) => None,
            } {
                return Err(invalid("nats", format!("server {} of {} ({url:?}): {reason}", i + 1, servers.len())));
            }
        }
        let nats_replicas = self.nats_replicas.unwrap_or(if servers.len() >= NATS_CLUSTER_REPLICAS {
            NATS_CLUSTER_REPLICAS
        } else {
            NATS_SINGLE_REPLICAS
        });
        if !(1..=MAX_NATS_REPLICAS).contains(&nats_replicas) {
            return Err(invalid("nats_replicas", format!("{nats_replicas} is outside 1..={MAX_NATS_REPLICAS}")));
        }
        let backbone = self.backbone.unwrap_or(BackboneKind::Redis);
        let announce = self.announce.unwrap_or(true) && backbone != BackboneKind::None;
        let advertise = advertise(self.advertise, listen, announce)?;
        let prefix = self.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        if prefix.chars().any(|c| c.is_whitespace() || c == '{' || c == '}') {
            return Err(invalid("prefix", "no whitespace or braces (braces are the room hash tag)"));
        }
        let nonzero = |field: &'static str, v: Option<u64>, default: u64| -> Result<u64, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(invalid(field, "must be greater than zero")),
                v => Ok(v),
            }
        };
        let nonzero_usize = |field: &'static str, v: Option<usize>, default: usize| -> Result<usize, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(invalid(field, "must be greater than zero")),
                v => Ok(v),
            }
        };
        let max_message_bytes = nonzero_usize("max_message_bytes", self.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES)?;
        if max_message_bytes > 16 * 1024 * 1024 {
            return Err(invalid("max_message_bytes", "at most 16 MiB"));
        }
        let read_buffer_bytes = nonzero_usize("read_buffer_bytes", self.read_buffer_bytes, DEFAULT_READ_BUFFER_BYTES)?;
        if read_buffer_bytes < 256 {
            return Err(invalid("read_buffer_bytes", "at least 256"));
        }
        if self.write_buffer_bytes.is_some() {
            tracing::warn!(
                "write_buffer_bytes is no longer used and is ignored (queued frames leave in one vectored write)"
            );
        }
        let send_queue_bytes = nonzero_usize("send_queue_bytes", self.send_queue_bytes, DEFAULT_SEND_QUEUE_BYTES)?;
        if send_queue_bytes < max_message_bytes {
            return Err(invalid("send_queue_bytes", "must be at least max_message_bytes"));
        }
        let send_queue_low_water_bytes = self.send_queue_low_water_bytes.unwrap_or(
            // A smaller hard cap than the default brings the default mark down with it.
            DEFAULT_SEND_QUEUE_LOW_WATER_BYTES.min(send_queue_bytes / 2),
        );
        if send_queue_low_water_bytes >= send_queue_bytes {
            return Err(invalid("send_queue_low_water_bytes", "must be below send_queue_bytes"));
        }
        let threads = match self.threads {
            Some(n) => n,
            // One per core, as tokio does by default.
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if !(1..=MAX_THREADS).contains(&threads) {
            return Err(invalid("threads", format!("{threads} is outside 1..={MAX_THREADS}")));
        }
        let reconnect_min = nonzero("reconnect_min_ms", self.reconnect_min_ms, DEFAULT_RECONNECT_MIN_MS)?;
        let reconnect_max = nonzero("reconnect_max_ms", self.reconnect_max_ms, DEFAULT_RECONNECT_MAX_MS)?;
        if reconnect_max < reconnect_min {
            return Err(invalid("reconnect_max_ms", "must not be below reconnect_min_ms"));
        }
        let signing_key = match (&self.signing_key_file, std::env::var(SIGNING_KEY_ENV)) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| invalid("signing_key_file", format!("{}: {e}", path.display())))?;
                Some(
                    tether_proto::sign::SigningKey::new(text.trim().as_bytes().to_vec())
                        .map_err(|e| invalid("signing_key_file", e.to_string()))?,
                )
            }
            (None, Ok(key)) if !key.is_empty() => Some(
                tether_proto::sign::SigningKey::new(key.into_bytes())
                    .map_err(|e| invalid("signing_key_file", format!("{SIGNING_KEY_ENV}: {e}")))?,
            ),
            (None, _) => None,
        };
        let api_key = match self.api.and_then(|a| a.key) {
            Some(key) => Some(ApiKey::new(&key).map_err(|e| invalid("api.key", e))?),
            None => match std::env::var(API_KEY_ENV) {
                Ok(key) if !key.is_empty() => {
                    Some(ApiKey::new(&key).map_err(|e| invalid("api.key", format!("{API_KEY_ENV}: {e}")))?)
                }
                _ => None,
            },
        };
        if let Some(n) = self.max_connections {
            let ceiling = tether_proto::limits::MAX_CONNECTIONS_CEILING;
            if !(1..=ceiling).contains(&n) {
                return Err(invalid("max_connections", format!("{n} is outside 1..={ceiling}")));
            }
        }
        let trusted_proxies = match &self.trusted_proxies {
            Some(list) => crate::client_addr::parse_trusted_proxies(list),
            None => crate::client_addr::parse_trusted_proxies(&crate::client_addr::DEFAULT_TRUSTED_PROXIES),
        }
        .map_err(|(i, reason)| invalid("trusted_proxies", format!("entry {i}: {reason}")))?;
        let webhooks = self.webhooks.map(|w| w.validate()).transpose()?.flatten();
        if webhooks.is_some() && backbone == BackboneKind::Nats {
            return Err(invalid(
                "webhooks",
                "not supported with backbone = \"nats\" yet (its presence has no atomic step to decide \
                 events in); use the redis backbone, or remove [webhooks]",
            ));
        }
        if webhooks.is_some() && backbone == BackboneKind::Redis && redis_cluster.is_some() {
            return Err(invalid(
                "webhooks",
                "not supported on a Redis Cluster backbone yet (a webhook event is decided in the same \
                 atomic step as the presence change, and the pending events live in another slot than \
                 the room's); use a single Redis, or remove [webhooks]",
            ));
        }
        // Read at validation time: the binary raises the soft limit before it validates.
        let connection_limit = tether_proto::limits::ConnectionLimit::resolve(
            self.max_connections,
            tether_proto::limits::current_nofile(),
            FDS_PER_CONNECTION,
        );
        let auth = self
            .auth
            .unwrap_or_default()
            .validate(std::env::var(crate::auth::config::JWT_SECRET_ENV).ok())
            .map_err(|(field, reason)| invalid(field, reason))?
            .map(std::sync::Arc::new);
        Ok(Config {
            trusted_proxies,
            auth,
            listen,
            advertise,
            announce,
            name,
            redis,
            redis_cluster,
            nats,
            nats_replicas,
            backbone,
            prefix,
            max_message_bytes,
            send_queue_len: nonzero_usize("send_queue_len", self.send_queue_len, DEFAULT_SEND_QUEUE_LEN)?,
            send_queue_bytes,
            send_queue_low_water_bytes,
            slow_consumer: Duration::from_millis(nonzero(
                "slow_consumer_ms",
                self.slow_consumer_ms,
                DEFAULT_SLOW_CONSUMER_MS,
            )?),
            rate_limit_per_sec: self.rate_limit_per_sec.unwrap_or(0),
            rate_limit_burst: match self.rate_limit_burst.unwrap_or(DEFAULT_RATE_LIMIT_BURST) {
                0 => return Err(invalid("rate_limit_burst", "must be greater than zero")),
                b => b,
            },
            history_len: nonzero("history_len", self.history_len, DEFAULT_HISTORY_LEN)?,
            log_ttl: Duration::from_secs(nonzero("log_ttl_secs", self.log_ttl_secs, DEFAULT_LOG_TTL_SECS)?),
            read_buffer_bytes,
            threads,
            max_connections: connection_limit.max_connections,
            connection_limit,
            max_rooms_per_client: nonzero_usize(
                "max_rooms_per_client",
                self.max_rooms_per_client,
                DEFAULT_MAX_ROOMS_PER_CLIENT,
            )?,
            grace_period: Duration::from_millis(nonzero(
                "grace_period_ms",
                self.grace_period_ms,
                DEFAULT_GRACE_PERIOD_MS,
            )?),
            redis_timeout: Duration::from_millis(nonzero(
                "redis_timeout_ms",
                self.redis_timeout_ms,
                DEFAULT_REDIS_TIMEOUT_MS,
            )?),
            header_read_timeout: Duration::from_millis(nonzero(
                "header_read_timeout_ms",
                self.header_read_timeout_ms,
                DEFAULT_HEADER_READ_TIMEOUT_MS,
            )?),
            reconnect_min: Duration::from_millis(reconnect_min),
            reconnect_max: Duration::from_millis(reconnect_max),
            session_ttl: Duration::from_secs(nonzero(
                "session_ttl_secs",
                self.session_ttl_secs,
                DEFAULT_SESSION_TTL_SECS,
            )?),
            resume_grace: Duration::from_millis(nonzero(
                "resume_grace_ms",
                self.resume_grace_ms,
                DEFAULT_RESUME_GRACE_MS,
            )?),
            idempotency_ttl: Duration::from_secs(nonzero(
                "idempotency_ttl_secs",
                self.idempotency_ttl_secs,
                DEFAULT_IDEMPOTENCY_TTL_SECS,
            )?),
            signing_key,
            presence_ttl: {
                let ms = nonzero("presence_ttl_ms", self.presence_ttl_ms, DEFAULT_PRESENCE_TTL_MS)?;
                if ms < 300 {
                    return Err(invalid("presence_ttl_ms", "at least 300 (heartbeats go out every third of it)"));
                }
                Duration::from_millis(ms)
            },
            probe_interval: Duration::from_millis(nonzero(
                "probe_interval_ms",
                self.probe_interval_ms,
                DEFAULT_PROBE_INTERVAL_MS,
            )?),
            api_key,
            webhooks,
        })
    }
}

impl Config {
    /// A configuration with every default, for tests and embedding.
    pub fn with_defaults(name: &str, redis: &str) -> Self {
        FileConfig { name: Some(name.into()), redis: Some(redis.into()), ..Default::default() }
            .validate()
            .expect("defaults are valid")
    }
}

/// The server URLs of a `nats` value: comma-separated, blanks around them ignored.
pub fn nats_servers(list: &str) -> Vec<&str> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".to_string())
}

#[cfg(test)]
mod tests;
