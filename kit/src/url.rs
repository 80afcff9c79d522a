//! WebSocket URLs of Tether endpoints, checked and given a client id the way the node and the
//! balancer read it (`?client=ID`). Shared by `tether chat` and the benchmarks' clients.

use anyhow::{bail, Context, Result};
use tether_proto::id::validate_client_id;

/// The URL to connect to: `base`, with `client=ID` added to its query if given.
pub fn connect_url(base: &str, client: Option<&str>) -> Result<String> {
    let uri: http::Uri = base.parse().with_context(|| format!("{base:?} is not a valid URL"))?;
    match uri.scheme_str() {
        Some("ws" | "wss") => {}
        _ => bail!("{base}: the URL must start with ws:// or wss:// (e.g. ws://127.0.0.1:8080/ws)"),
    }
    if uri.authority().is_none() {
        bail!("{base}: the URL has no host");
    }
    let Some(id) = client else {
        return Ok(base.to_owned());
    };
    validate_client_id(id).with_context(|| format!("--client {id:?}"))?;
    let sep = match uri.query() {
        Some(q) if !q.is_empty() => "&",
        Some(_) => "",
        None if uri.path() == "/" && !base.ends_with('/') => "/?",
        None => "?",
    };
    Ok(format!("{base}{sep}client={id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_get_the_client_id() {
        assert_eq!(connect_url("ws://h:1/ws", Some("alice")).expect("ok"), "ws://h:1/ws?client=alice");
        assert_eq!(connect_url("ws://h:1/ws?x=1", Some("alice")).expect("ok"), "ws://h:1/ws?x=1&client=alice");
        assert_eq!(connect_url("ws://h:1", Some("a")).expect("ok"), "ws://h:1/?client=a");
        assert_eq!(connect_url("ws://h:1/ws", None).expect("ok"), "ws://h:1/ws");
        assert!(connect_url("http://h:1/ws", None).is_err());
        assert!(connect_url("not a url", None).is_err());
        assert!(connect_url("ws://h:1/ws", Some("bad id")).is_err());
    }
}
