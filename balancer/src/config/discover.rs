//! `discover` and `discover_prefix`: where discovery (`crate::discovery`) reads the node
//! registry from, checked at start-up.

use std::fmt;

/// The prefix the nodes' keys and subjects are under, when not configured.
pub const DEFAULT_PREFIX: &str = "tether:";

/// What to follow: the registry and the nodes' key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discover {
    pub source: Source,
    /// The nodes' `prefix` (Redis keys; NATS names are derived from it as the nodes do).
    pub prefix: String,
}

/// `discover` and `discover_prefix`: a registry URL ([`Source::parse`]) and
/// a prefix as the nodes accept it (no whitespace or braces).
pub(super) fn validate(url: Option<&str>, prefix: Option<&str>) -> Result<Option<Discover>, crate::Error> {
    let prefix = prefix.unwrap_or(DEFAULT_PREFIX);
    if prefix.chars().any(|c| c.is_whitespace() || c == '{' || c == '}') {
        return Err(super::invalid("discover_prefix", format!("{prefix:?}: no whitespace or braces")));
    }
    let Some(url) = url else { return Ok(None) };
    let source = Source::parse(url).map_err(|reason| super::invalid("discover", reason))?;
    Ok(Some(Discover { source, prefix: prefix.to_owned() }))
}

/// A registry to follow (see [`Source::parse`]).
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    /// `redis://…` or `rediss://…`: one Redis.
    Redis(String),
    /// `redis+cluster://H1:P1,H2:P2,…`: a Redis Cluster, by its seed nodes (each as a
    /// `redis://` URL; the rest of the cluster is found from them).
    RedisCluster(Vec<String>),
    /// `nats://A,nats://B,…` (or `nats://A,B`): NATS servers of one cluster.
    Nats(Vec<String>),
}

impl Source {
    /// Parses a `--discover` URL; the reason when it is not one (the caller names the field).
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        if let Some(seeds) = url.strip_prefix("redis+cluster://") {
            let seeds = list(seeds, "redis+cluster://")?
                .into_iter()
                .map(|seed| {
                    let seed = format!("redis://{seed}");
                    redis::IntoConnectionInfo::into_connection_info(seed.as_str())
                        .map(|_| seed.clone())
                        .map_err(|e| format!("{seed:?}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Self::RedisCluster(seeds));
        }
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| format!("{url:?}: {e}"))?;
            return Ok(Self::Redis(url.to_owned()));
        }
        if let Some(rest) = url.strip_prefix("nats://").or_else(|| url.strip_prefix("tls://")) {
            let scheme = &url[..url.len() - rest.len()];
            let servers = list(rest, scheme)?
                .into_iter()
                .map(|s| {
                    let s = if s.contains("://") { s.to_owned() } else { format!("{scheme}{s}") };
                    s.parse::<async_nats::ServerAddr>().map(|_| s.clone()).map_err(|e| format!("{s:?}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Self::Nats(servers));
        }
        Err(format!("{url:?} is not a redis://, rediss://, redis+cluster:// or nats:// URL"))
    }

    /// The kind, for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Redis(_) => "redis",
            Self::RedisCluster(_) => "redis-cluster",
            Self::Nats(_) => "nats",
        }
    }
}

/// The comma-separated entries after a scheme, none empty.
fn list<'a>(rest: &'a str, scheme: &str) -> Result<Vec<&'a str>, String> {
    let entries: Vec<&str> = rest.split(',').map(str::trim).collect();
    if entries.iter().any(|e| e.is_empty()) {
        return Err(format!("{scheme}{rest:?}: an empty server in the list"));
    }
    Ok(entries)
}

/// Shown without passwords: URLs may carry them.
impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = match self {
            Self::Redis(url) => vec![redact(url)],
            Self::RedisCluster(seeds) | Self::Nats(seeds) => seeds.iter().map(|s| redact(s)).collect(),
        };
        write!(f, "{} {}", self.kind(), urls.join(","))
    }
}

/// `scheme://user:secret@host` → `scheme://user:***@host`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.split_once('@') {
        Some((auth, host)) => {
            let user = auth.split_once(':').map_or(auth, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_of_every_kind_parse() {
        assert_eq!(Source::parse("redis://127.0.0.1:6379/"), Ok(Source::Redis("redis://127.0.0.1:6379/".into())));
        assert_eq!(
            Source::parse("redis+cluster://h1:7000,h2:7001"),
            Ok(Source::RedisCluster(vec!["redis://h1:7000".into(), "redis://h2:7001".into()]))
        );
        let both = Source::Nats(vec!["nats://a:4222".into(), "nats://b:4222".into()]);
        assert_eq!(Source::parse("nats://a:4222,nats://b:4222"), Ok(both.clone()));
        assert_eq!(Source::parse("nats://a:4222,b:4222"), Ok(both));
    }

    #[test]
    fn bad_urls_say_why() {
        for bad in ["http://x", "", "redis+cluster://", "nats://a,,b", "redis+cluster://h1:7000,", "localhost:6379"] {
            assert!(Source::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Source::parse("http://x").unwrap_err().contains("not a redis://"));
    }

    #[test]
    fn passwords_are_not_shown() {
        let s = Source::parse("redis://:hunter2@h:1/").unwrap();
        assert_eq!(s.to_string(), "redis redis://:***@h:1/");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
