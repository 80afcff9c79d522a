//! The crate's error type. Each variant says whose fault it is — the operator's config, the
//! client, a node, or the balancer's own environment — and carries the value that was wrong.

use std::path::PathBuf;

use tether_proto::id::InvalidClientId;
use tether_proto::placement::InvalidPlacementKey;

/// Everything that can go wrong in the balancer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Operator: a config field (or the flag that overrides it) has a bad value.
    #[error("config: {field}: {reason}")]
    Config { field: String, reason: String },

    /// Operator: the config file cannot be read.
    #[error("config file {}: {source}", path.display())]
    ConfigRead { path: PathBuf, source: std::io::Error },

    /// Operator: the config file is not valid TOML or has an unknown or mistyped key.
    #[error("config file {}: {source}", path.display())]
    ConfigParse { path: PathBuf, source: Box<toml::de::Error> },

    /// Client: the request carries a client id that breaks the alphabet or length rules.
    #[error("bad client id: {0}")]
    ClientId(#[from] InvalidClientId),

    /// Client: a `query:NAME` placement parameter of `hash_keys` is present but unusable
    /// (empty, too long).
    #[error("bad placement key: {0}")]
    PlacementKey(#[from] InvalidPlacementKey),

    /// Client: a `signing_key` is set and the request's id does not carry its signature
    /// (answered with 403; the message is what the client reads, so it does not echo the id).
    #[error("unsigned or forged client id")]
    UnsignedClientId { id: String },

    /// Node: the TCP connect to a node failed.
    #[error("node {node} ({addr}): connect failed: {source}")]
    NodeConnect { node: String, addr: String, source: std::io::Error },

    /// Node: the TCP connect to a node did not finish within `connect_timeout_ms`.
    #[error("node {node} ({addr}): connect timed out after {timeout_ms} ms")]
    NodeConnectTimeout { node: String, addr: String, timeout_ms: u128 },

    /// Node: the node accepted the connection but broke the HTTP exchange.
    #[error("node {node}: {source}")]
    NodeHttp { node: String, source: hyper::Error },

    /// Us: taking over from the process this one replaces failed at `step` (connecting to
    /// its hand-off socket, reading its `hello`, using the listeners it sent).
    #[error("upgrade hand-off ({step}): {source}")]
    Handoff { step: &'static str, source: std::io::Error },

    /// Us: a listener handed to [`crate::run`] is unusable.
    #[error("listener: {0}")]
    Listener(std::io::Error),
}
