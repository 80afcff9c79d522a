//! `tether token`: mints a JWT for development and tests — HS256 from a shared secret, or
//! RS256 / ES256 from a PEM private key — and prints it on stdout (`docs/JWT.md`).
//!
//! Every input is checked before anything is signed, by the rules the node applies to the
//! claims (`sub` a client id, `name` a display name, `rooms` room patterns), so a token this
//! prints is one a node with the matching key accepts until it expires.

use crate::args::TokenArgs;
use anyhow::{Context, Result};
use std::time::{SystemTime, UNIX_EPOCH};
use tether_proto::token::{mint, Claims, MintKey};

/// The signing key `args` name: the secret, or the PEM file (its algorithm from `--alg`, else
/// from the key itself: RSA → RS256, EC → ES256).
fn key(args: &TokenArgs) -> Result<MintKey> {
    if let Some(secret) = &args.secret {
        return MintKey::hs256(secret.as_bytes()).context("--secret");
    }
    let path = args.key.as_ref().context("--secret or --key is required")?;
    let pem = std::fs::read(path).with_context(|| format!("--key {}", path.display()))?;
    let key = match args.alg.as_deref() {
        Some("RS256") => MintKey::rs256_pem(&pem),
        Some("ES256") => MintKey::es256_pem(&pem),
        Some(other) => anyhow::bail!("--alg {other}: use RS256 or ES256"),
        None => MintKey::rs256_pem(&pem).or_else(|_| MintKey::es256_pem(&pem)),
    };
    key.with_context(|| format!("--key {}", path.display()))
}

/// The token `args` describe, valid from now for `--ttl`.
pub fn token(args: &TokenArgs) -> Result<String> {
    let key = key(args)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).context("the clock is before 1970")?.as_secs();
    let claims = Claims {
        sub: args.sub.clone(),
        exp: now.saturating_add(args.ttl.as_secs()),
        iat: Some(now),
        name: args.name.clone(),
        rooms: args.rooms.clone(),
    };
    Ok(mint(&claims, &key)?)
}

/// Runs `tether token`: the token on stdout, 0; a key or input that cannot be used, on stderr,
/// [`tether_lab::EXIT_USAGE`].
pub fn run(args: &TokenArgs) -> i32 {
    match token(args) {
        Ok(t) => {
            println!("{t}");
            0
        }
        Err(e) => {
            eprintln!("tether token: {e:#}");
            i32::from(tether_lab::EXIT_USAGE)
        }
    }
}

/// `url` with `token=TOKEN` added to its query (a JWT is base64url and dots: no escaping).
pub fn with_token_param(url: &str, token: Option<&str>) -> String {
    let Some(token) = token else { return url.to_string() };
    let sep = match url.split_once('?') {
        Some((_, q)) if !q.is_empty() => "&",
        Some(_) => "",
        None => "?",
    };
    format!("{url}{sep}token={token}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_into_the_query() {
        assert_eq!(with_token_param("ws://h:1/ws", Some("a.b.c")), "ws://h:1/ws?token=a.b.c");
        assert_eq!(with_token_param("ws://h:1/ws?client=x", Some("t")), "ws://h:1/ws?client=x&token=t");
        assert_eq!(with_token_param("ws://h:1/ws?", Some("t")), "ws://h:1/ws?token=t");
        assert_eq!(with_token_param("ws://h:1/ws", None), "ws://h:1/ws");
    }
}
