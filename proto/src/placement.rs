//! Placement keys: what the balancer's rendezvous hash ranks nodes by.
//!
//! By default that is the client id ([`crate::id`]). The balancer's `hash_keys` may also name
//! `query:NAME` entries: when a request carries query parameter NAME, its value is the
//! placement key instead, so every request with the same value lands on the same node — a
//! balancer that pins by room (`hash_keys = ["query:room"]`, clients on `/ws?room=R`) puts
//! every member of a room on one node, and a room needs no backbone to reach them all. The
//! client id is still found (and forwarded in `X-Client-Id`) from the plain sources as before;
//! a request without the parameter is placed by its id.
//!
//! `query:NAME` entries come first in `hash_keys`: every request has an id (one is minted when
//! none is sent), so an entry after an id source would never be reached, and the list is read
//! in order. With no id source listed the default id order applies.

use crate::id::IdSource;
use crate::query::query_param;

/// The `hash_keys` prefix of a placement entry: `query:NAME`.
pub const QUERY_PREFIX: &str = "query:";

/// Longest query parameter name a `query:NAME` entry may give.
pub const MAX_PARAM_NAME_LEN: usize = 64;

/// Longest placement key, in bytes as sent (percent-encoding included): a 128-byte room name
/// with every byte encoded.
pub const MAX_PLACEMENT_KEY_LEN: usize = 3 * 128;

/// The balancer's `hash_keys`, read: where the client id is looked for, and which query
/// parameters carry a placement key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashKeys {
    /// Id sources, first match wins ([`crate::id::extract_client_id`]).
    pub id_order: Vec<IdSource>,
    /// Query parameter names, in order: the first one a request carries is its placement key.
    pub place_by: Vec<String>,
}

impl Default for HashKeys {
    fn default() -> Self {
        Self { id_order: IdSource::DEFAULT_ORDER.to_vec(), place_by: Vec::new() }
    }
}

/// Why a `hash_keys` list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadHashKeys {
    #[error("must name at least one source")]
    Empty,
    #[error("unknown source {0:?}: use query, header, token, cookie or query:NAME")]
    Unknown(String),
    #[error("{0:?} is listed twice")]
    Repeated(String),
    #[error("{entry:?}: {reason}")]
    BadParam { entry: String, reason: String },
    #[error(
        "{entry:?} comes after the id source {after:?}, which always yields a key (an id is minted when none \
         is sent): list query:NAME entries first"
    )]
    PlacementAfterId { entry: String, after: String },
}

impl HashKeys {
    /// Reads a `hash_keys` list: `query`, `header`, `token`, `cookie` (id sources) and
    /// `query:NAME` (placement parameters, before any id source), none twice.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, BadHashKeys> {
        if entries.is_empty() {
            return Err(BadHashKeys::Empty);
        }
        let mut id_order: Vec<IdSource> = Vec::new();
        let mut place_by: Vec<String> = Vec::new();
        for entry in entries.iter().map(AsRef::as_ref) {
            if let Some(name) = entry.strip_prefix(QUERY_PREFIX) {
                check_param_name(name).map_err(|reason| BadHashKeys::BadParam { entry: entry.to_owned(), reason })?;
                if let Some(first) = id_order.first() {
                    return Err(BadHashKeys::PlacementAfterId {
                        entry: entry.to_owned(),
                        after: first.as_str().to_owned(),
                    });
                }
                if place_by.iter().any(|p| p == name) {
                    return Err(BadHashKeys::Repeated(entry.to_owned()));
                }
                place_by.push(name.to_owned());
                continue;
            }
            let source = IdSource::parse(entry).ok_or_else(|| BadHashKeys::Unknown(entry.to_owned()))?;
            if id_order.contains(&source) {
                return Err(BadHashKeys::Repeated(entry.to_owned()));
            }
            id_order.push(source);
        }
        if id_order.is_empty() {
            id_order = IdSource::DEFAULT_ORDER.to_vec();
        }
        Ok(Self { id_order, place_by })
    }

    /// The placement key a request's query carries: the first of [`HashKeys::place_by`]
    /// present, as `(parameter name, value)`. `Ok(None)` when none is there (the request is
    /// placed by its client id). A parameter that is there but empty or too long is an error,
    /// not a reason to fall back to the id: the client meant it.
    pub fn placement_key<'q>(&self, query: Option<&'q str>) -> Result<Option<(&str, &'q str)>, InvalidPlacementKey> {
        let Some(query) = query else { return Ok(None) };
        for name in &self.place_by {
            if let Some(value) = query_param(query, name) {
                check_placement_key(name, value)?;
                return Ok(Some((name, value)));
            }
        }
        Ok(None)
    }
}

/// Why a request's placement key was refused (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPlacementKey {
    #[error("query parameter {0} is empty")]
    Empty(String),
    #[error("query parameter {name} is {len} bytes long; at most {MAX_PLACEMENT_KEY_LEN} are allowed")]
    TooLong { name: String, len: usize },
}

fn check_placement_key(name: &str, value: &str) -> Result<(), InvalidPlacementKey> {
    if value.is_empty() {
        return Err(InvalidPlacementKey::Empty(name.to_owned()));
    }
    if value.len() > MAX_PLACEMENT_KEY_LEN {
        return Err(InvalidPlacementKey::TooLong { name: name.to_owned(), len: value.len() });
    }
    Ok(())
}

/// A `query:NAME` parameter name: 1–64 bytes of `[A-Za-z0-9._-]` (matched as sent, so nothing
/// that would need percent-encoding), and not a parameter that already means something.
fn check_param_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the parameter name after \"query:\" is empty".into());
    }
    if name.len() > MAX_PARAM_NAME_LEN {
        return Err(format!("the parameter name is {} bytes long; at most {MAX_PARAM_NAME_LEN}", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("the parameter name contains {c:?}; allowed are A-Z a-z 0-9 . _ -"));
    }
    match name {
        "client" => Err("the client parameter is the id source \"query\"; list that instead".into()),
        // A token changes on every refresh: placing by it would move the client each time.
        "token" => Err("a token is no placement key (it changes when refreshed); use the source \"token\"".into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_sources_keep_their_order_and_placement_entries_are_collected() {
        let k = HashKeys::parse(&["header", "cookie"]).unwrap();
        assert_eq!(k, HashKeys { id_order: vec![IdSource::Header, IdSource::Cookie], place_by: vec![] });
        let k = HashKeys::parse(&["query:room"]).unwrap();
        assert_eq!(k.id_order, IdSource::DEFAULT_ORDER, "no id source listed: the default order");
        assert_eq!(k.place_by, ["room"]);
        let k = HashKeys::parse(&["query:room", "query:topic", "cookie"]).unwrap();
        assert_eq!((k.id_order, k.place_by), (vec![IdSource::Cookie], vec!["room".to_owned(), "topic".into()]));
        assert_eq!(HashKeys::parse(&["query", "header", "token", "cookie"]).unwrap(), HashKeys::default());
    }

    #[test]
    fn bad_lists_are_refused_with_a_reason() {
        let err = |entries: &[&str]| HashKeys::parse(entries).unwrap_err();
        assert_eq!(err(&[]), BadHashKeys::Empty);
        assert_eq!(err(&["body"]), BadHashKeys::Unknown("body".into()));
        assert_eq!(err(&["query", "query"]), BadHashKeys::Repeated("query".into()));
        assert_eq!(err(&["query:room", "query:room"]), BadHashKeys::Repeated("query:room".into()));
        for bad in ["query:", "query:a b", "query:r%6fom", "query:é", "query:client", "query:token"] {
            assert!(matches!(err(&[bad]), BadHashKeys::BadParam { .. }), "{bad}");
        }
        let long = format!("query:{}", "n".repeat(MAX_PARAM_NAME_LEN + 1));
        assert!(matches!(err(&[long.as_str()]), BadHashKeys::BadParam { .. }));
        let ok = format!("query:{}", "n".repeat(MAX_PARAM_NAME_LEN));
        assert!(HashKeys::parse(&[ok.as_str()]).is_ok());
        assert_eq!(
            err(&["header", "query:room"]),
            BadHashKeys::PlacementAfterId { entry: "query:room".into(), after: "header".into() }
        );
        let text = err(&["query:"]).to_string();
        assert!(text.contains("\"query:\"") && text.contains("empty"), "{text}");
    }

    #[test]
    fn the_first_placement_parameter_present_is_the_key() {
        let k = HashKeys::parse(&["query:room", "query:topic"]).unwrap();
        assert_eq!(k.placement_key(Some("client=a&room=general")), Ok(Some(("room", "general"))));
        assert_eq!(k.placement_key(Some("topic=t&room=r")), Ok(Some(("room", "r"))), "list order, not query order");
        assert_eq!(k.placement_key(Some("topic=t")), Ok(Some(("topic", "t"))));
        assert_eq!(k.placement_key(Some("client=a")), Ok(None));
        assert_eq!(k.placement_key(None), Ok(None));
        assert_eq!(k.placement_key(Some("rooms=x&aroom=y")), Ok(None), "whole names only");
        assert_eq!(k.placement_key(Some("room=")), Err(InvalidPlacementKey::Empty("room".into())));
        assert_eq!(k.placement_key(Some("room")), Err(InvalidPlacementKey::Empty("room".into())));
        let long = format!("room={}", "x".repeat(MAX_PLACEMENT_KEY_LEN + 1));
        assert!(matches!(k.placement_key(Some(&long)), Err(InvalidPlacementKey::TooLong { .. })));
        assert_eq!(HashKeys::default().placement_key(Some("room=r")), Ok(None), "nothing to place by");
    }
}
