//! JSON Web Tokens as Tether reads them: the claims, room patterns, minting (for `tether token`
//! and tests), and the *unverified* read of `sub` the balancer places a client by.
//!
//! Verification lives in the node (`tether_node::auth`), the only process that trusts a token.
//! The balancer only routes: it reads `sub` from the payload without checking the signature
//! ([`unverified_sub`]), so a forged token lands on some node, which then refuses it.
//!
//! Claims (`docs/JWT.md`): `sub` is the client id, `exp` (Unix seconds) is required, `name` is
//! the display name, `rooms` a list of room patterns where `*` matches any run of characters
//! (several allowed, anywhere; no `rooms` claim = every room), `iat` optional.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// Longest token any process reads, in bytes. A token travels in a query string or a header;
/// the node's request head is capped at 16 KiB anyway.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Most room patterns one `rooms` claim may list.
pub const MAX_ROOM_PATTERNS: usize = 256;

/// Query parameter that carries a token (`/ws?token=…`).
pub const TOKEN_PARAM: &str = "token";

/// The claims Tether reads; others in a token are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The client id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// The display name, if the app sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Room patterns the client may join; absent = every room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
}

/// Which rooms a token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomAccess {
    /// No `rooms` claim: every room.
    Any,
    /// Only rooms matching one of these patterns (an empty list allows none).
    Only(Vec<String>),
}

/// A `rooms` claim that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRooms {
    #[error("the rooms claim lists {0} patterns; at most {MAX_ROOM_PATTERNS} are allowed")]
    TooMany(usize),
    #[error("room pattern {0:?}: 1–128 bytes, no whitespace or control characters")]
    BadPattern(String),
}

impl RoomAccess {
    /// The access a `rooms` claim gives, its patterns checked by the room-name rules
    /// (a pattern is a room name in which `*` is special).
    pub fn from_claim(rooms: Option<Vec<String>>) -> Result<Self, BadRooms> {
        let Some(patterns) = rooms else { return Ok(Self::Any) };
        if patterns.len() > MAX_ROOM_PATTERNS {
            return Err(BadRooms::TooMany(patterns.len()));
        }
        if let Some(bad) = patterns.iter().find(|p| crate::wire::validate_room(p).is_err()) {
            let shown: String = bad.chars().take(40).collect();
            return Err(BadRooms::BadPattern(shown));
        }
        Ok(Self::Only(patterns))
    }

    /// Whether `room` may be joined.
    pub fn allows(&self, room: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(patterns) => patterns.iter().any(|p| pattern_matches(p, room)),
        }
    }
}

/// Whether `room` matches `pattern`, in which each `*` matches any run of characters (the
/// empty one included) and everything else matches itself.
///
/// Greedy with one backtrack point (the last star): a star that matched too little is widened
/// by one byte and the rest retried, so the cost is at most `pattern.len() × room.len()`
/// byte steps — both are at most 128 bytes. Bytes, not chars: a literal run is whole UTF-8,
/// so it can only match at a character boundary.
pub fn pattern_matches(pattern: &str, room: &str) -> bool {
    let (p, r) = (pattern.as_bytes(), room.as_bytes());
    let (mut pi, mut ri) = (0, 0);
    // After the last star seen: where the pattern resumes, and the room position it matched to.
    let mut star: Option<(usize, usize)> = None;
    while ri < r.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi + 1, ri));
            pi += 1;
        } else if pi < p.len() && p[pi] == r[ri] {
            pi += 1;
            ri += 1;
        } else if let Some((after, matched)) = star {
            pi = after;
            ri = matched + 1;
            star = Some((after, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// What signs a minted token.
pub enum MintKey {
    Hs256(EncodingKey),
    Rs256(EncodingKey),
    Es256(EncodingKey),
}

/// A token that could not be minted, or a key that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("the HS256 secret is empty")]
    EmptySecret,
    #[error("cannot read the {alg} private key: {source}")]
    Key { alg: &'static str, source: jsonwebtoken::errors::Error },
    #[error("cannot sign the token: {0}")]
    Sign(jsonwebtoken::errors::Error),
}

impl MintKey {
    /// An HS256 key from a shared secret (any length but zero; 32 bytes or more is wise).
    pub fn hs256(secret: &[u8]) -> Result<Self, MintError> {
        if secret.is_empty() {
            return Err(MintError::EmptySecret);
        }
        EncodingKey::from_secret(secret).map(Self::Hs256).map_err(MintError::Sign)
    }

    /// An RS256 key from an RSA private key in PEM (PKCS#1 or PKCS#8).
    pub fn rs256_pem(pem: &[u8]) -> Result<Self, MintError> {
        EncodingKey::from_rsa_pem(pem).map(Self::Rs256).map_err(|source| MintError::Key { alg: "RS256", source })
    }

    /// An ES256 key from a P-256 private key in PEM (PKCS#8: `openssl genpkey` writes it).
    pub fn es256_pem(pem: &[u8]) -> Result<Self, MintError> {
        EncodingKey::from_ec_pem(pem).map(Self::Es256).map_err(|source| MintError::Key { alg: "ES256", source })
    }

    fn parts(&self) -> (Algorithm, &EncodingKey) {
        match self {
            Self::Hs256(k) => (Algorithm::HS256, k),
            Self::Rs256(k) => (Algorithm::RS256, k),
            Self::Es256(k) => (Algorithm::ES256, k),
        }
    }
}

/// Signs `claims` into a compact JWT.
pub fn mint(claims: &Claims, key: &MintKey) -> Result<String, MintError> {
    let (alg, key) = key.parts();
    jsonwebtoken::encode(&Header::new(alg), claims, key).map_err(MintError::Sign)
}

/// The token of a request: the `token` query parameter, else an `Authorization: Bearer` value.
/// A token is base64url and dots, so it never needs percent-decoding.
pub fn find_token<'a>(query: Option<&'a str>, authorization: Option<&'a [u8]>) -> Option<&'a str> {
    query.and_then(|q| crate::query::query_param(q, TOKEN_PARAM)).filter(|t| !t.is_empty()).or_else(|| {
        let value = std::str::from_utf8(authorization?).ok()?.trim();
        let (scheme, token) = value.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    })
}

/// Why a token's `sub` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnreadableToken {
    #[error("token is {0} bytes; at most {MAX_TOKEN_BYTES} are read")]
    TooLong(usize),
    #[error("token is not three base64url parts separated by dots")]
    NotAJwt,
    #[error("token payload is not base64url")]
    NotBase64,
    #[error("token payload is not a JSON object with a string `sub`")]
    NoSub,
}

/// `sub` of a token, read **without verifying anything**: for placement only (the balancer),
/// never for trust. Bounded (at most [`MAX_TOKEN_BYTES`] are looked at) and total: garbage
/// gives an error, never a panic.
pub fn unverified_sub(token: &str) -> Result<String, UnreadableToken> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(UnreadableToken::TooLong(token.len()));
    }
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_sig), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(UnreadableToken::NotAJwt);
    };
    let json = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).map_err(|_| UnreadableToken::NotBase64)?;
    #[derive(Deserialize)]
    struct Sub {
        sub: String,
    }
    serde_json::from_slice::<Sub>(&json).map(|s| s.sub).map_err(|_| UnreadableToken::NoSub)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_match_any_run_anywhere() {
        let yes = [
            ("general", "general"),
            ("*", "anything"),
            ("*", ""),
            ("support:*", "support:42"),
            ("support:*", "support:"),
            ("*:ops", "eu:ops"),
            ("a*b*c", "abc"),
            ("a*b*c", "a-x-b-y-c"),
            ("a*b*c", "abbbcbc"),
            ("**", "x"),
            ("t*:*:x", "team:1:x"),
            ("é*", "été"),
        ];
        for (p, r) in yes {
            assert!(pattern_matches(p, r), "{p} should match {r}");
        }
        let no = [
            ("general", "general2"),
            ("general", "genera"),
            ("support:*", "support"),
            ("support:*", "xsupport:1"),
            ("*:ops", "eu:opsx"),
            ("a*b*c", "acb"),
            ("a*b*c", "abcd"),
            ("", "x"),
        ];
        for (p, r) in no {
            assert!(!pattern_matches(p, r), "{p} should not match {r}");
        }
    }

    #[test]
    fn access_from_the_claim() {
        assert_eq!(RoomAccess::from_claim(None), Ok(RoomAccess::Any));
        assert!(RoomAccess::Any.allows("x"));
        let only = RoomAccess::from_claim(Some(vec!["general".into(), "support:*".into()])).unwrap();
        assert!(only.allows("general") && only.allows("support:7"));
        assert!(!only.allows("random"));
        assert!(!RoomAccess::from_claim(Some(vec![])).unwrap().allows("general"));
        assert!(matches!(RoomAccess::from_claim(Some(vec!["a b".into()])), Err(BadRooms::BadPattern(_))));
        assert!(matches!(RoomAccess::from_claim(Some(vec![String::new()])), Err(BadRooms::BadPattern(_))));
        let many = vec!["r".to_string(); MAX_ROOM_PATTERNS + 1];
        assert_eq!(RoomAccess::from_claim(Some(many)), Err(BadRooms::TooMany(MAX_ROOM_PATTERNS + 1)));
    }

    fn claims() -> Claims {
        Claims { sub: "alice".into(), exp: 4_000_000_000, iat: None, name: Some("Alice".into()), rooms: None }
    }

    #[test]
    fn minted_tokens_carry_their_sub_and_claims() {
        let token = mint(&claims(), &MintKey::hs256(b"secret").unwrap()).unwrap();
        assert_eq!(unverified_sub(&token), Ok("alice".to_string()));
        let payload = token.split('.').nth(1).unwrap();
        let json = URL_SAFE_NO_PAD.decode(payload).unwrap();
        assert_eq!(serde_json::from_slice::<Claims>(&json).unwrap(), claims());
        assert!(matches!(MintKey::hs256(b""), Err(MintError::EmptySecret)));
        assert!(matches!(MintKey::rs256_pem(b"not a pem"), Err(MintError::Key { .. })));
        assert!(matches!(MintKey::es256_pem(b"-----BEGIN PRIVATE KEY-----\n"), Err(MintError::Key { .. })));
    }

    #[test]
    fn the_unverified_sub_is_read_from_garbage_without_panicking() {
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        assert_eq!(unverified_sub(&format!("h.{}.s", b64(r#"{"sub":"bob","x":1}"#))), Ok("bob".into()));
        let cases = [
            ("", UnreadableToken::NotAJwt),
            ("abc", UnreadableToken::NotAJwt),
            ("a.b", UnreadableToken::NotAJwt),
            ("a.b.c.d", UnreadableToken::NotAJwt),
            ("a.!!!.c", UnreadableToken::NotBase64),
            ("a.\u{fffd}.c", UnreadableToken::NotBase64),
            (&format!("a.{}.c", b64("[1]")), UnreadableToken::NoSub),
            (&format!("a.{}.c", b64(r#"{"sub":7}"#)), UnreadableToken::NoSub),
            (&format!("a.{}.c", b64("not json")), UnreadableToken::NoSub),
            (&format!("a.{}.c", b64(r#"{"sub":"x""#)), UnreadableToken::NoSub),
        ];
        for (token, want) in cases {
            assert_eq!(unverified_sub(token), Err(want), "{token:?}");
        }
        let long = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(unverified_sub(&long), Err(UnreadableToken::TooLong(MAX_TOKEN_BYTES + 1)));
    }

    #[test]
    fn tokens_come_from_the_query_or_a_bearer_header() {
        assert_eq!(find_token(Some("client=a&token=t1"), Some(b"Bearer t2")), Some("t1"));
        assert_eq!(find_token(Some("client=a"), Some(b"Bearer t2")), Some("t2"));
        assert_eq!(find_token(None, Some(b"bearer  t3 ")), Some("t3"));
        assert_eq!(find_token(Some("token="), Some(b"Basic xyz")), None);
        assert_eq!(find_token(None, Some(b"Bearer")), None);
        assert_eq!(find_token(None, Some(&[0xff, 0x20, 0x41])), None);
        assert_eq!(find_token(None, None), None);
    }

    /// The obvious exponential definition, for small inputs: what [`pattern_matches`] must agree with.
    fn reference(p: &[u8], r: &[u8]) -> bool {
        match p.split_first() {
            None => r.is_empty(),
            Some((b'*', rest)) => (0..=r.len()).any(|i| reference(rest, &r[i..])),
            Some((c, rest)) => r.first() == Some(c) && reference(rest, &r[1..]),
        }
    }

    proptest::proptest! {
        #[test]
        fn matching_agrees_with_the_definition(p in "[ab*]{0,8}", r in "[ab]{0,10}") {
            proptest::prop_assert_eq!(pattern_matches(&p, &r), reference(p.as_bytes(), r.as_bytes()));
        }

        #[test]
        fn starring_any_parts_of_a_room_still_matches_it(r in "[a-z:]{1,20}", cuts in proptest::collection::vec((0usize..20, 0usize..5), 0..4)) {
            let mut p = r.clone();
            for (at, len) in cuts {
                let at = at.min(p.len());
                let end = (at + len).min(p.len());
                p.replace_range(at..end, "*");
            }
            proptest::prop_assert!(pattern_matches(&p, &r), "{} vs {}", p, r);
        }

        #[test]
        fn unverified_sub_never_panics(t in ".{0,200}") {
            let _ = unverified_sub(&t);
        }

        #[test]
        fn unverified_sub_never_panics_on_dotted_base64(a in "[A-Za-z0-9_=-]{0,40}", b in "[A-Za-z0-9_=-]{0,80}") {
            let _ = unverified_sub(&format!("{a}.{b}.sig"));
        }
    }
}
