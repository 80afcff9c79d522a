//! Configuration: the TOML file ([`FileConfig`]), command-line overrides ([`Overrides`]) and
//! the validated [`Config`] that [`crate::run`] takes.
//!
//! Everything is checked here, before a port is bound: a zero interval, an empty or duplicated
//! node list or an unparsable address is refused with an error naming the field, so a bad
//! deployment fails at start-up rather than at the first client.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tether_proto::backbone::check_host_port;
use tether_proto::placement::HashKeys;
use tether_proto::sign::SigningKey;

pub use crate::balance::Balance;
pub use crate::balance::Rebalance;
pub use crate::proxy_protocol::ProxyProtocol;
use crate::Error;

/// Client-facing listener when neither the file nor `--listen` names one.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Admin listener (status, route, metrics, drain) when neither the file nor `--admin` names one.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9100";
/// Time between two `GET /readyz` probes of one node.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 500;
/// How long one probe (connect, request, response head) may take before it counts as failed.
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 1000;
/// How long a proxied connection may wait for a node's TCP connect before failing over.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1000;
/// Consecutive answered probes a `down` node needs before it takes clients again.
pub const DEFAULT_RISE: u32 = 2;
/// How long open tunnels may run on after a shutdown signal before they are cut.
pub const DEFAULT_GRACE_PERIOD_MS: u64 = 10_000;
/// Descriptors one client connection may hold: its own socket and, once it is a tunnel (or
/// while a plain request is forwarded), the node's. `max_connections` defaults to what the soft
/// `RLIMIT_NOFILE` allows less a reserve, halved (see `tether_proto::limits`).
pub const FDS_PER_CONNECTION: u64 = 2;
/// How long an upgrade's new process may take to start, take the listeners and confirm, and
/// then to acknowledge each batch of tunnels, before the upgrade is abandoned.
pub const DEFAULT_UPGRADE_TIMEOUT_SECS: u64 = 10;
/// After an upgrade, how long what could not move (TLS tunnels, keep-alive requests) may stay
/// in the old process before its tunnels are closed 1012 at a frame boundary.
pub const DEFAULT_UPGRADE_DRAIN_SECS: u64 = 600;
/// Upper bound of both upgrade durations: a day.
pub const MAX_UPGRADE_SECS: u64 = 86_400;
/// Seconds a client refused at `max_connections` is told to wait (`Retry-After`).
pub const RETRY_AFTER_SECS: u64 = 5;
/// Upper bound of `max_connections` (far above what one process's file descriptors allow; it
/// only keeps the value in the range tokio's semaphore accepts).
pub const MAX_CONNECTIONS_LIMIT: usize = tether_proto::limits::MAX_CONNECTIONS_CEILING;
/// How long a client may take to send a complete request head (also the keep-alive idle limit).
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// Largest accepted request head, in bytes.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16_384;
/// Bounds of `max_header_bytes`: below the lower one no browser request fits, above the upper
/// one a slow client can pin a lot of memory per connection.
pub const MAX_HEADER_BYTES_RANGE: std::ops::RangeInclusive<usize> = 1024..=1024 * 1024;
/// Longest node name. Names are hashed, used as metric labels and in admin URLs.
pub const MAX_NODE_NAME_LEN: usize = 64;
/// Upper bound of `threads`: far more than any machine this runs on has cores; it catches a
/// typo before tokio tries to start that many threads.
pub const MAX_THREADS: usize = 1024;
/// Upper bound of `connect_rate_per_ip` (per second) and of `connect_burst_per_ip`: far above
/// what one address should ever open; it catches a typo (and keeps the bucket arithmetic exact).
pub const MAX_PER_IP_RATE: f64 = 1_000_000.0;
/// Bytes of client frames a re-homing tunnel may hold while it switches nodes (and of frames it
/// keeps whole while reading them); past it the client is closed 1008 (see [`Failover`]).
pub const DEFAULT_REHOME_BUFFER_BYTES: usize = 1024 * 1024;
/// Bounds of `rehome_buffer_bytes`: below the lower one a default-sized message (64 KiB) may not
/// fit; above the upper one one client could pin a lot of memory.
pub const REHOME_BUFFER_RANGE: std::ops::RangeInclusive<usize> = 64 * 1024..=64 * 1024 * 1024;
/// How long one switch of a re-homing tunnel may take, over every node it tries, before the
/// client is closed 1012 after all (it then reconnects by itself, if it can).
pub const DEFAULT_REHOME_TIMEOUT_MS: u64 = 10_000;

/// What a tunnel does when its node dies, is drained, or closes 1012.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Failover {
    /// The client's connection closes (1012 on a drain), and the client reconnects.
    #[default]
    Reconnect,
    /// The balancer keeps the client's connection open and moves it to the next node in its
    /// rank: resumes its rooms, resends what it had in flight (see `tunnel::rehome`).
    Rehome,
}

impl Failover {
    pub const NAMES: [&'static str; 2] = ["reconnect", "rehome"];

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "reconnect" => Some(Self::Reconnect),
            "rehome" => Some(Self::Rehome),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reconnect => "reconnect",
            Self::Rehome => "rehome",
        }
    }
}

/// Environment variable holding the id-signing key itself (the nodes read the same one). A
/// `signing_key_file` (file or flag) wins over it; an empty value counts as unset.
pub const SIGNING_KEY_ENV: &str = "TETHER_SIGNING_KEY";

/// Key material on its way to a [`SigningKey`]; its `Debug` never shows the value, so a logged
/// or printed config cannot leak it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The TOML file as written by an operator. Every field is optional; see the `DEFAULT_*`
/// constants for what an absent one means.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub admin: Option<String>,
    pub health_interval_ms: Option<u64>,
    pub health_timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub rise: Option<u32>,
    pub hash_keys: Option<Vec<String>>,
    pub grace_period_ms: Option<u64>,
    pub max_connections: Option<usize>,
    pub header_read_timeout_ms: Option<u64>,
    pub max_header_bytes: Option<usize>,
    /// Bind the client listener with `SO_REUSEPORT`, so that several balancer processes can
    /// share one port (the kernel spreads connections over them).
    pub reuse_port: Option<bool>,
    /// Tokio worker threads; absent = one per core.
    pub threads: Option<usize>,
    /// File whose content, trimmed, is the key that signs client ids (relative paths are
    /// relative to the working directory).
    pub signing_key_file: Option<PathBuf>,
    /// Seconds the new process of an upgrade has to confirm (and to acknowledge each batch).
    pub upgrade_timeout_secs: Option<u64>,
    /// Seconds unmovable tunnels may stay in the old process after an upgrade.
    pub upgrade_drain_secs: Option<u64>,
    /// The key itself, from [`SIGNING_KEY_ENV`]; used when no `signing_key_file` is set. Never
    /// read from the file (a key does not belong in a config that gets checked in), hence
    /// skipped by serde.
    #[serde(skip)]
    pub signing_key_env: Option<Secret>,
    /// `[tls]`: certificate and key files; present (with both) = the client listener is
    /// wss/https only.
    pub tls: Option<FileTls>,
    /// `off` (default), `v1`, `v2` or `any`: the PROXY protocol header every client
    /// connection must start with (see `proxy_protocol`).
    pub proxy_protocol: Option<String>,
    /// Client connections open at once per source address (IPv6: per /64); 0 or absent = no cap.
    pub max_connections_per_ip: Option<u32>,
    /// New client connections per second per source address (a token bucket's refill); 0 or
    /// absent = no limit.
    pub connect_rate_per_ip: Option<f64>,
    /// The bucket's size: connections an address may open at once after a rest; default
    /// max(1, `connect_rate_per_ip` rounded up).
    pub connect_burst_per_ip: Option<u32>,
    /// `reconnect` (default) or `rehome` (see [`Failover`]).
    pub failover: Option<String>,
    /// Bytes a re-homing tunnel may hold of a client's frames (see [`DEFAULT_REHOME_BUFFER_BYTES`]).
    pub rehome_buffer_bytes: Option<usize>,
    /// Milliseconds one switch may take (see [`DEFAULT_REHOME_TIMEOUT_MS`]).
    pub rehome_timeout_ms: Option<u64>,
    /// `hrw` (default) or `bounded` (see [`Balance`]).
    pub balance: Option<String>,
    /// Under `bounded`: no node above `ceil(load_factor × mean)`; at least 1.0, default 1.25.
    pub load_factor: Option<f64>,
    /// `off` (default) or `paced` (see [`Rebalance`]).
    pub rebalance: Option<String>,
    /// Under `paced`: clients moved per second at most; default 10.
    pub rebalance_per_sec: Option<f64>,
    /// The node registry to follow (see `crate::discovery`): `redis://…`,
    /// `redis+cluster://…` or `nats://…`.
    pub discover: Option<String>,
    /// The nodes' `prefix`, for `discover` (default `tether:`).
    pub discover_prefix: Option<String>,
    #[serde(default)]
    pub nodes: Vec<FileNode>,
}

/// The `[tls]` table: PEM files for the client listener. Both or neither.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// The certificate chain, leaf first (PEM; relative paths are relative to the working
    /// directory).
    pub cert: Option<PathBuf>,
    /// The leaf's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

/// One `[[nodes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNode {
    /// The node's stable name: what the rendezvous hash ranks, so renaming a node moves its
    /// clients while moving it to another address does not.
    pub name: String,
    /// `host:port` of the node's HTTP/WebSocket listener.
    pub addr: String,
}

/// Command-line flags that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin: Option<String>,
    /// When non-empty, replaces the file's node list (the flags describe the whole cluster).
    pub nodes: Vec<FileNode>,
    pub health_interval_ms: Option<u64>,
    /// `--reuse-port`: `true` turns it on whatever the file says; `false` leaves the file's.
    pub reuse_port: bool,
    /// `--threads`.
    pub threads: Option<usize>,
    /// `--max-connections`.
    pub max_connections: Option<usize>,
    /// `--signing-key-file`: replaces the file's `signing_key_file`.
    pub signing_key_file: Option<PathBuf>,
    /// The value of [`SIGNING_KEY_ENV`] (see [`signing_key_from_env`]).
    pub signing_key_env: Option<Secret>,
    /// `--tls-cert FILE --tls-key FILE` (the CLI refuses one without the other): replace the
    /// file's `[tls]`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `--proxy-protocol`.
    pub proxy_protocol: Option<String>,
    /// `--max-connections-per-ip`.
    pub max_connections_per_ip: Option<u32>,
    /// `--connect-rate-per-ip`.
    pub connect_rate_per_ip: Option<f64>,
    /// `--connect-burst-per-ip`.
    pub connect_burst_per_ip: Option<u32>,
    /// `--failover`.
    pub failover: Option<String>,
    /// `--rehome-buffer-bytes`.
    pub rehome_buffer_bytes: Option<usize>,
    /// `--balance`.
    pub balance: Option<String>,
    /// `--load-factor`.
    pub load_factor: Option<f64>,
    /// `--rebalance`.
    pub rebalance: Option<String>,
    /// `--rebalance-per-sec`.
    pub rebalance_per_sec: Option<f64>,
    /// `--discover`.
    pub discover: Option<String>,
    /// `--discover-prefix`.
    pub discover_prefix: Option<String>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where `main` binds the client-facing listener ([`crate::run`] takes it already bound).
    pub listen: SocketAddr,
    /// Where `main` binds the admin listener.
    pub admin: SocketAddr,
    /// Time between two probes of one node.
    pub health_interval: Duration,
    /// Deadline of one probe; past it the node counts as dead.
    pub health_timeout: Duration,
    /// Deadline of a proxied TCP connect; past it the node is marked down and the next one tried.
    pub connect_timeout: Duration,
    /// Consecutive answered probes that bring a `down` node back.
    pub rise: u32,
    /// Where the client id is looked for (first match wins), and the query parameters whose
    /// value, when a request carries one, is the key its node is ranked by instead of the id.
    pub hash_keys: HashKeys,
    /// How long tunnels may run on after shutdown starts.
    pub grace_period: Duration,
    /// Cap on open client connections, tunnels included; past it clients get 503 with
    /// `Retry-After`. Default: what the soft `RLIMIT_NOFILE` allows less a reserve, halved.
    pub max_connections: usize,
    /// `max_connections` and where it came from (derived or configured): the start-up log
    /// line, `/status`, and the warning when an explicit value is above what the descriptors
    /// allow.
    pub connection_limit: tether_proto::limits::ConnectionLimit,
    /// Deadline for a complete request head (and for an idle keep-alive connection).
    pub header_read_timeout: Duration,
    /// Largest accepted request head.
    pub max_header_bytes: usize,
    /// Whether `main` binds the client listener with `SO_REUSEPORT`. Routing keeps no state,
    /// so processes sharing a port route every client alike.
    pub reuse_port: bool,
    /// How many threads `main` gives the runtime; 1 = everything on one thread.
    pub threads: usize,
    /// When set, client ids must carry its signature (unsigned or forged ones get 403) and
    /// minted ids are signed with it. Its `Debug` is redacted.
    pub signing_key: Option<SigningKey>,
    /// When set, the client listener speaks TLS only (wss/https): the files it came from and
    /// the rustls config made from them (read again on every reload).
    pub tls: Option<TlsSettings>,
    /// The PROXY protocol header required at the start of every client connection (`Off`:
    /// none is read). The address it names is the client's for logs, per-IP limits and the
    /// forwarded headers.
    pub proxy_protocol: ProxyProtocol,
    /// Cap on client connections open at once per source address (IPv6: per /64); 0 = none.
    /// Past it: 429 with `Retry-After: 1`.
    pub max_connections_per_ip: u32,
    /// Token-bucket refill, new connections per second per source address; 0 = no limit. An
    /// empty bucket: 429 with `Retry-After` until the next token.
    pub connect_rate_per_ip: f64,
    /// The bucket's size (at least 1).
    pub connect_burst_per_ip: u32,
    /// How long an upgrade's new process has to confirm, and to acknowledge each batch.
    pub upgrade_timeout: Duration,
    /// How long unmovable tunnels stay in the old process after an upgrade.
    pub upgrade_drain: Duration,
    /// What a tunnel does when its node goes away (new tunnels take the setting in force
    /// when they open).
    pub failover: Failover,
    /// Bytes of client frames a re-homing tunnel holds at most (during a switch, and of one
    /// frame while reading it).
    pub rehome_buffer_bytes: usize,
    /// Longest one switch may take before the client is closed 1012.
    pub rehome_timeout: Duration,
    /// How a new connection's node is chosen: plain HRW, or HRW within a load bound.
    pub balance: Balance,
    /// Whether a node that returns takes back, gradually, the clients that rank it first.
    pub rebalance: Rebalance,
    /// The static nodes, in file order (order does not affect routing: ranking is by name).
    pub nodes: Vec<NodeConfig>,
    /// The node registry followed for more nodes, if any.
    pub discover: Option<Discover>,
}

/// The client listener's TLS: where the certificate and key came from, and the server config
/// built from them at validation ([`crate::tls::server_config`]).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Shared by every handshake made while this config is live; a reload builds a new one.
    pub server: std::sync::Arc<rustls::ServerConfig>,
}

/// A validated node entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    pub addr: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Config { field: field.into(), reason: reason.into() }
}

impl FileConfig {
    /// Reads and parses a TOML file (without validating it).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::ConfigRead { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|e| match e {
            Error::ConfigParse { source, .. } => Error::ConfigParse { path: path.to_owned(), source },
            other => other,
        })
    }

    /// Parses TOML text (without validating it).
    pub fn parse(text: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|source| Error::ConfigParse { path: "<inline>".into(), source: Box::new(source) })
    }

    /// Applies command-line flags on top of the file.
    pub fn apply(&mut self, o: Overrides) {
        if o.listen.is_some() {
            self.listen = o.listen;
        }
        if o.admin.is_some() {
            self.admin = o.admin;
        }
        if o.health_interval_ms.is_some() {
            self.health_interval_ms = o.health_interval_ms;
        }
        if !o.nodes.is_empty() {
            self.nodes = o.nodes;
        }
        if o.reuse_port {
            self.reuse_port = Some(true);
        }
        if o.threads.is_some() {
            self.threads = o.threads;
        }
        if o.max_connections.is_some() {
            self.max_connections = o.max_connections;
        }
        if o.signing_key_file.is_some() {
            self.signing_key_file = o.signing_key_file;
        }
        if o.signing_key_env.is_some() {
            self.signing_key_env = o.signing_key_env;
        }
        if let Some((cert, key)) = o.tls {
            self.tls = Some(FileTls { cert: Some(cert), key: Some(key) });
        }
        if o.proxy_protocol.is_some() {
            self.proxy_protocol = o.proxy_protocol;
        }
        if o.max_connections_per_ip.is_some() {
            self.max_connections_per_ip = o.max_connections_per_ip;
        }
        if o.connect_rate_per_ip.is_some() {
            self.connect_rate_per_ip = o.connect_rate_per_ip;
        }
        if o.connect_burst_per_ip.is_some() {
            self.connect_burst_per_ip = o.connect_burst_per_ip;
        }
        if o.failover.is_some() {
            self.failover = o.failover;
        }
        if o.rehome_buffer_bytes.is_some() {
            self.rehome_buffer_bytes = o.rehome_buffer_bytes;
        }
        if o.balance.is_some() {
            self.balance = o.balance;
        }
        if o.load_factor.is_some() {
            self.load_factor = o.load_factor;
        }
        if o.rebalance.is_some() {
            self.rebalance = o.rebalance;
        }
        if o.rebalance_per_sec.is_some() {
            self.rebalance_per_sec = o.rebalance_per_sec;
        }
        if o.discover.is_some() {
            self.discover = o.discover;
        }
        if o.discover_prefix.is_some() {
            self.discover_prefix = o.discover_prefix;
        }
    }

    /// Checks every field and fills in defaults.
    pub fn validate(&self) -> Result<Config, Error> {
        let listen = socket_addr("listen", self.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
        let admin = socket_addr("admin", self.admin.as_deref().unwrap_or(DEFAULT_ADMIN))?;
        let hash_keys = match &self.hash_keys {
            None => HashKeys::default(),
            Some(keys) => hash_keys(keys)?,
        };
        // Read at validation time: the binary raises the soft limit before it validates.
        let connection_limit = tether_proto::limits::ConnectionLimit::resolve(
            self.max_connections,
            tether_proto::limits::current_nofile(),
            FDS_PER_CONNECTION,
        );
        let max_connections = connection_limit.max_connections;
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&max_connections) {
            return Err(invalid(
                "max_connections",
                format!("{max_connections} is outside 1..={MAX_CONNECTIONS_LIMIT}"),
            ));
        }
        let discover = discover::validate(self.discover.as_deref(), self.discover_prefix.as_deref())?;
        let rise = self.rise.unwrap_or(DEFAULT_RISE);
        if rise == 0 {
            return Err(invalid("rise", "must be greater than 0"));
        }
        let max_header_bytes = self.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
        if !MAX_HEADER_BYTES_RANGE.contains(&max_header_bytes) {
            return Err(invalid(
                "max_header_bytes",
                format!(
                    "{max_header_bytes} is outside {}..={}",
                    MAX_HEADER_BYTES_RANGE.start(),
                    MAX_HEADER_BYTES_RANGE.end()
                ),
            ));
        }
        let threads = match self.threads {
            Some(n) => n,
            // One per core, as tokio does by default.
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if !(1..=MAX_THREADS).contains(&threads) {
            return Err(invalid("threads", format!("{threads} is outside 1..={MAX_THREADS}")));
        }
        let proxy_protocol = match self.proxy_protocol.as_deref() {
            None => ProxyProtocol::Off,
            Some(value) => ProxyProtocol::parse(value).ok_or_else(|| {
                invalid("proxy_protocol", format!("{value:?} is not one of {}", ProxyProtocol::NAMES.join(", ")))
            })?,
        };
        let connect_rate_per_ip = self.connect_rate_per_ip.unwrap_or(0.0);
        if !(0.0..=MAX_PER_IP_RATE).contains(&connect_rate_per_ip) {
            return Err(invalid(
                "connect_rate_per_ip",
                format!("{connect_rate_per_ip} is outside 0..={MAX_PER_IP_RATE} (per second)"),
            ));
        }
        // In range, so the cast is exact.
        let default_burst = (connect_rate_per_ip.ceil() as u32).max(1);
        let connect_burst_per_ip = self.connect_burst_per_ip.unwrap_or(default_burst);
        if !(1..=MAX_PER_IP_RATE as u32).contains(&connect_burst_per_ip) {
            return Err(invalid(
                "connect_burst_per_ip",
                format!("{connect_burst_per_ip} is outside 1..={}", MAX_PER_IP_RATE as u32),
            ));
        }
        let failover = match self.failover.as_deref() {
            None => Failover::Reconnect,
            Some(value) => Failover::parse(value).ok_or_else(|| {
                invalid("failover", format!("{value:?} is not one of {}", Failover::NAMES.join(", ")))
            })?,
        };
        let rehome_buffer_bytes = self.rehome_buffer_bytes.unwrap_or(DEFAULT_REHOME_BUFFER_BYTES);
        if !REHOME_BUFFER_RANGE.contains(&rehome_buffer_bytes) {
            return Err(invalid(
                "rehome_buffer_bytes",
                format!(
                    "{rehome_buffer_bytes} is outside {}..={}",
                    REHOME_BUFFER_RANGE.start(),
                    REHOME_BUFFER_RANGE.end()
                ),
            ));
        }
        let balance =
            Balance::from_settings(self.balance.as_deref(), self.load_factor).map_err(|(f, r)| invalid(f, r))?;
        let rebalance = Rebalance::from_settings(self.rebalance.as_deref(), self.rebalance_per_sec)
            .map_err(|(f, r)| invalid(f, r))?;
        Ok(Config {
            listen,
            admin,
            health_interval: nonzero_ms("health_interval_ms", self.health_interval_ms, DEFAULT_HEALTH_INTERVAL_MS)?,
            health_timeout: nonzero_ms("health_timeout_ms", self.health_timeout_ms, DEFAULT_HEALTH_TIMEOUT_MS)?,
            connect_timeout: nonzero_ms("connect_timeout_ms", self.connect_timeout_ms, DEFAULT_CONNECT_TIMEOUT_MS)?,
            rise,
            hash_keys,
            // Zero is meaningful here: cut every tunnel at once on shutdown.
            grace_period: Duration::from_millis(self.grace_period_ms.unwrap_or(DEFAULT_GRACE_PERIOD_MS)),
            max_connections,
            connection_limit,
            header_read_timeout: nonzero_ms(
                "header_read_timeout_ms",
                self.header_read_timeout_ms,
                DEFAULT_HEADER_READ_TIMEOUT_MS,
            )?,
            max_header_bytes,
            reuse_port: self.reuse_port.unwrap_or(false),
            threads,
            signing_key: signing_key(self.signing_key_file.as_deref(), self.signing_key_env.as_ref())?,
            tls: tls(self.tls.as_ref())?,
            proxy_protocol,
            max_connections_per_ip: self.max_connections_per_ip.unwrap_or(0),
            connect_rate_per_ip,
            connect_burst_per_ip,
            upgrade_timeout: upgrade_secs(
                "upgrade_timeout_secs",
                self.upgrade_timeout_secs,
                DEFAULT_UPGRADE_TIMEOUT_SECS,
                1,
            )?,
            upgrade_drain: upgrade_secs("upgrade_drain_secs", self.upgrade_drain_secs, DEFAULT_UPGRADE_DRAIN_SECS, 0)?,
            failover,
            rehome_buffer_bytes,
            rehome_timeout: nonzero_ms("rehome_timeout_ms", self.rehome_timeout_ms, DEFAULT_REHOME_TIMEOUT_MS)?,
            balance,
            rebalance,
            nodes: nodes(&self.nodes, discover.is_some())?,
            discover,
        })
    }
}

/// Parses one `--node NAME=HOST:PORT` flag (checked further by [`FileConfig::validate`]).
pub fn parse_node_flag(flag: &str) -> Result<FileNode, Error> {
    let (name, addr) =
        flag.split_once('=').ok_or_else(|| invalid("--node", format!("{flag:?} is not NAME=HOST:PORT")))?;
    Ok(FileNode { name: name.to_owned(), addr: addr.to_owned() })
}

/// Reads [`SIGNING_KEY_ENV`] for [`Overrides::signing_key_env`]; a value that is not UTF-8 is
/// a config error (the nodes could not read it either).
pub fn signing_key_from_env() -> Result<Option<Secret>, Error> {
    match std::env::var(SIGNING_KEY_ENV) {
        Ok(key) => Ok(Some(Secret(key))),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(invalid(SIGNING_KEY_ENV, "is not valid UTF-8")),
    }
}

/// The id-signing key: the file's content, trimmed (the way the nodes read it), or else the
/// environment's value as is. The error never shows the key, only its length.
fn signing_key(file: Option<&Path>, env: Option<&Secret>) -> Result<Option<SigningKey>, Error> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid("signing_key_file", format!("{}: {e}", path.display())))?;
        return SigningKey::new(text.trim().as_bytes().to_vec())
            .map(Some)
            .map_err(|e| invalid("signing_key_file", format!("{}: {e}", path.display())));
    }
    match env {
        Some(Secret(key)) if !key.is_empty() => {
            SigningKey::new(key.as_bytes().to_vec()).map(Some).map_err(|e| invalid(SIGNING_KEY_ENV, e.to_string()))
        }
        _ => Ok(None),
    }
}

/// `[tls]`: both files or neither; the files are read and checked (PEM, a key that matches
/// the certificate) here, so a bad one fails at start-up, or fails a reload, naming it.
fn tls(file: Option<&FileTls>) -> Result<Option<TlsSettings>, Error> {
    let Some(file) = file else { return Ok(None) };
    let (cert, key) = match (&file.cert, &file.key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => return Err(invalid("tls.key", "missing: tls.cert needs a key (set both or neither)")),
        (None, Some(_)) => {
            return Err(invalid("tls.cert", "missing: tls.key needs a certificate (set both or neither)"))
        }
    };
    let server = crate::tls::server_config(cert, key)?;
    Ok(Some(TlsSettings { cert: cert.clone(), key: key.clone(), server }))
}

fn socket_addr(field: &str, value: &str) -> Result<SocketAddr, Error> {
    value.parse().map_err(|_| invalid(field, format!("{value:?} is not IP:PORT")))
}

fn nonzero_ms(field: &str, value: Option<u64>, default: u64) -> Result<Duration, Error> {
    match value.unwrap_or(default) {
        0 => Err(invalid(field, "must be greater than 0")),
        ms => Ok(Duration::from_millis(ms)),
    }
}

/// An upgrade duration in whole seconds, within `min..=`[`MAX_UPGRADE_SECS`].
fn upgrade_secs(field: &str, value: Option<u64>, default: u64, min: u64) -> Result<Duration, Error> {
    let secs = value.unwrap_or(default);
    if !(min..=MAX_UPGRADE_SECS).contains(&secs) {
        return Err(invalid(field, format!("{secs} is outside {min}..={MAX_UPGRADE_SECS}")));
    }
    Ok(Duration::from_secs(secs))
}

fn hash_keys(keys: &[String]) -> Result<HashKeys, Error> {
    HashKeys::parse(keys).map_err(|e| invalid("hash_keys", e.to_string()))
}

/// The static nodes; none is fine when a registry is followed.
fn nodes(entries: &[FileNode], discovering: bool) -> Result<Vec<NodeConfig>, Error> {
    if entries.is_empty() && !discovering {
        return Err(invalid(
            "nodes",
            "no nodes configured (add [[nodes]] entries, --node NAME=HOST:PORT, or --discover URL)",
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for (i, node) in entries.iter().enumerate() {
        check_node_name(&node.name).map_err(|r| invalid(format!("nodes[{i}].name"), r))?;
        if !seen.insert(node.name.as_str()) {
            return Err(invalid(format!("nodes[{i}].name"), format!("duplicate node name {:?}", node.name)));
        }
        check_host_port(&node.addr).map_err(|r| invalid(format!("nodes[{i}].addr"), r))?;
        out.push(NodeConfig { name: node.name.clone(), addr: node.addr.clone() });
    }
    Ok(out)
}

/// Node names go into metric labels, admin URLs and the HTML page, so they keep to a small,
/// URL- and label-safe alphabet (`:` included: a node's default name is `HOSTNAME:PORT`).
/// Discovered names are held to it too.
pub(crate) fn check_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NODE_NAME_LEN {
        return Err(format!("{name:?} must be 1-{MAX_NODE_NAME_LEN} bytes"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))) {
        return Err(format!("{name:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ - :"));
    }
    Ok(())
}

mod discover;

pub use discover::{Discover, Source};

#[cfg(test)]
mod tests;
