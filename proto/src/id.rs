//! Client ids: the key the balancer hashes and the node keys sessions by.
//!
//! An id is 1–128 bytes of `[A-Za-z0-9._:-]` (`docs/PROTOCOL.md`, "Connecting"). Anything
//! else is refused before the WebSocket upgrade, so a hostile id can never reach a Redis key
//! or a log line unescaped.

use rand::RngCore;
use std::borrow::Cow;

/// Longest accepted client id, in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// Name of the cookie that carries a minted (or client-chosen) id.
pub const SESSION_COOKIE: &str = "tether_sid";

/// Header the balancer uses to hand the id to a node.
pub const CLIENT_ID_HEADER: &str = "x-client-id";

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidClientId {
    #[error("client id is empty")]
    Empty,
    #[error("client id is {0} bytes long; at most {MAX_CLIENT_ID_LEN} are allowed")]
    TooLong(usize),
    #[error("client id has byte 0x{0:02x} at offset {1}; allowed are A-Z a-z 0-9 . _ : -")]
    BadByte(u8, usize),
}

/// Checks an id against the alphabet and length rules.
pub fn validate_client_id(id: &str) -> Result<(), InvalidClientId> {
    if id.is_empty() {
        return Err(InvalidClientId::Empty);
    }
    if id.len() > MAX_CLIENT_ID_LEN {
        return Err(InvalidClientId::TooLong(id.len()));
    }
    match id.bytes().position(|b| !is_id_byte(b)) {
        Some(pos) => Err(InvalidClientId::BadByte(id.as_bytes()[pos], pos)),
        None => Ok(()),
    }
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

/// A fresh id with 128 bits from the OS-seeded thread RNG, as 32 lowercase hex digits.
pub fn mint_client_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let mut out = String::with_capacity(32);
    for b in bytes {
        out.push(char::from_digit(u32::from(b >> 4), 16).expect("nibble < 16"));
        out.push(char::from_digit(u32::from(b & 0xf), 16).expect("nibble < 16"));
    }
    out
}

/// Where an id was found in a request, in the default lookup order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    Query,
    Header,
    /// The `sub` of a JWT (the `token` query parameter or `Authorization: Bearer`), read
    /// without verification ([`crate::token::unverified_sub`]): for placement only.
    Token,
    Cookie,
}

impl IdSource {
    pub const DEFAULT_ORDER: [IdSource; 4] = [IdSource::Query, IdSource::Header, IdSource::Token, IdSource::Cookie];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "query" => Some(Self::Query),
            "header" => Some(Self::Header),
            "token" => Some(Self::Token),
            "cookie" => Some(Self::Cookie),
            _ => None,
        }
    }

    /// The `hash_keys` name of the source (what [`IdSource::parse`] reads).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Query => "query",
            Self::Header => "header",
            Self::Token => "token",
            Self::Cookie => "cookie",
        }
    }
}

/// Finds the client id of a request: the `client` query parameter, the `X-Client-Id` header,
/// the `sub` of a token (the `token` query parameter or the `Authorization: Bearer` header
/// value in `authorization`), or the `tether_sid` cookie, tried in `order`.
///
/// Returns `Ok(None)` when no source carries an id, and an error naming the first source
/// whose value breaks the rules (a bad id is never skipped in favour of a later source: the
/// client meant it). A token whose `sub` cannot be read at all carries no id here: placement
/// does not judge tokens, the node refuses it with a 401 that says why.
pub fn extract_client_id<'a>(
    query: Option<&'a str>,
    header: Option<&'a [u8]>,
    authorization: Option<&'a [u8]>,
    cookies: impl Iterator<Item = &'a [u8]> + Clone,
    order: &[IdSource],
) -> Result<Option<Cow<'a, str>>, InvalidClientId> {
    for source in order {
        let found = match source {
            IdSource::Query => query.and_then(|q| query_param(q, "client")).map(Cow::Borrowed),
            IdSource::Header => header.map(|h| Cow::Borrowed(std::str::from_utf8(h).unwrap_or("\u{fffd}"))),
            IdSource::Token => crate::token::find_token(query, authorization)
                .and_then(|t| crate::token::unverified_sub(t).ok())
                .map(Cow::Owned),
            IdSource::Cookie => cookies.clone().find_map(|c| cookie_value(c, SESSION_COOKIE)).map(Cow::Borrowed),
        };
        if let Some(id) = found {
            validate_client_id(&id)?;
            return Ok(Some(id));
        }
    }
    Ok(None)
}

pub use crate::query::query_param;

/// The value of cookie `name` in one `Cookie:` header value (`a=1; b=2`).
pub fn cookie_value<'a>(header: &'a [u8], name: &str) -> Option<&'a str> {
    let header = std::str::from_utf8(header).ok()?;
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k.trim() == name).then_some(v.trim().trim_matches('"'))
    })
}

/// The `Set-Cookie` value that hands a minted id to a browser.
pub fn session_cookie(id: &str) -> String {
    format!("{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Lax")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_and_length_rules() {
        assert!(validate_client_id("alice-7f3a").is_ok());
        assert!(validate_client_id("a.b_c:d-E9").is_ok());
        assert_eq!(validate_client_id(""), Err(InvalidClientId::Empty));
        assert_eq!(validate_client_id(&"x".repeat(129)), Err(InvalidClientId::TooLong(129)));
        assert!(validate_client_id(&"x".repeat(128)).is_ok());
        assert_eq!(validate_client_id("a b"), Err(InvalidClientId::BadByte(b' ', 1)));
        assert!(validate_client_id("ünï").is_err());
        assert!(validate_client_id("a%20b").is_err());
    }

    #[test]
    fn minted_ids_are_valid_and_distinct() {
        let a = mint_client_id();
        let b = mint_client_id();
        assert_eq!(a.len(), 32);
        assert!(validate_client_id(&a).is_ok());
        assert_ne!(a, b);
    }

    #[test]
    fn extraction_follows_the_order() {
        let cookies = [b"x=1; tether_sid=fromcookie".as_slice()];
        let order = IdSource::DEFAULT_ORDER;
        let got =
            extract_client_id(Some("a=1&client=fromquery"), Some(b"fromheader"), None, cookies.iter().copied(), &order);
        assert_eq!(got.unwrap().as_deref(), Some("fromquery"));
        let got = extract_client_id(Some("a=1"), Some(b"fromheader"), None, cookies.iter().copied(), &order);
        assert_eq!(got.unwrap().as_deref(), Some("fromheader"));
        let got = extract_client_id(None, None, None, cookies.iter().copied(), &order);
        assert_eq!(got.unwrap().as_deref(), Some("fromcookie"));
        let got = extract_client_id(None, None, None, std::iter::empty(), &order);
        assert_eq!(got, Ok(None));
        let reordered = [IdSource::Cookie, IdSource::Query];
        let got = extract_client_id(Some("client=q"), None, None, cookies.iter().copied(), &reordered);
        assert_eq!(got.unwrap().as_deref(), Some("fromcookie"));
    }

    #[test]
    fn a_bad_id_is_an_error_not_a_fallthrough() {
        let got = extract_client_id(
            Some("client=bad%20id"),
            Some(b"good"),
            None,
            std::iter::empty(),
            &IdSource::DEFAULT_ORDER,
        );
        assert!(got.is_err());
        let got = extract_client_id(None, Some(&[0xff, 0xfe]), None, std::iter::empty(), &IdSource::DEFAULT_ORDER);
        assert!(got.is_err());
    }

    #[test]
    fn a_tokens_sub_is_an_id_source() {
        let secret = crate::token::MintKey::hs256(b"s").unwrap();
        let claims = |sub: &str| crate::token::Claims { sub: sub.into(), exp: 1, iat: None, name: None, rooms: None };
        let token = crate::token::mint(&claims("alice"), &secret).unwrap();
        let query = format!("token={token}");
        let bearer = format!("Bearer {token}");
        let order = IdSource::DEFAULT_ORDER;
        let cookies = [b"tether_sid=fromcookie".as_slice()];
        let got = extract_client_id(Some(&query), None, None, cookies.iter().copied(), &order);
        assert_eq!(got, Ok(Some(Cow::Owned("alice".into()))));
        let got = extract_client_id(None, None, Some(bearer.as_bytes()), cookies.iter().copied(), &order);
        assert_eq!(got.unwrap().as_deref(), Some("alice"));
        // The query's `client` and the header come first by default.
        let both = format!("client=q&{query}");
        let got = extract_client_id(Some(&both), None, None, std::iter::empty(), &order);
        assert_eq!(got.unwrap().as_deref(), Some("q"));
        // An unreadable token carries no id; a readable one with a bad sub is an error.
        let got = extract_client_id(Some("token=garbage"), None, None, cookies.iter().copied(), &order);
        assert_eq!(got.unwrap().as_deref(), Some("fromcookie"));
        let bad = crate::token::mint(&claims("a b"), &secret).unwrap();
        let bad = format!("token={bad}");
        let got = extract_client_id(Some(&bad), None, None, std::iter::empty(), &order);
        assert!(got.is_err());
    }
}
