//! JWT authentication: who a connection is, and what its token allows.
//!
//! Where it sits in a connection's life: [`admit`] runs on the upgrade request (called from
//! [`crate::server`]), before any WebSocket exists; a refused request gets HTTP 401 with the
//! reason ([`unauthorized`]). An admitted connection carries its [`Grant`] into its state
//! machine ([`crate::connection::Client::authorize`]): the display name, the rooms it may
//! join, and its expiry, which the connection's task turns into a deadline (4001 `token
//! expired`). A `refresh` frame is checked by the same [`Verifier`].
//!
//! Keys (`[auth]` in the node's TOML, [`config`]): an HS256 secret, a PEM public key (RS256
//! or ES256, told apart by the key), or both; the token's `alg` picks the key, and an `alg`
//! without a configured key — `none` above all — is refused.

pub mod config;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tether_proto::id::{self, CLIENT_ID_HEADER};
use tether_proto::token::{self, Claims, RoomAccess, MAX_TOKEN_BYTES};
use tether_proto::wire;

/// What a verified token grants a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The client id (`sub`).
    pub sub: String,
    /// The display name (`name`), which wins over a stored or `set_name` one.
    pub name: Option<String>,
    /// The rooms it may join (`rooms`).
    pub rooms: RoomAccess,
    /// Expiry, Unix seconds (`exp`), as signed.
    pub exp: u64,
    /// Seconds of clock skew allowed past `exp` (the node's `leeway_secs`): the connection is
    /// closed at `exp + leeway`, the last moment the token would still have been accepted.
    pub leeway: u64,
}

/// Why a token, or a request, was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required (query parameter `token` or `Authorization: Bearer`)")]
    Missing,
    #[error("token is {0} bytes; at most {MAX_TOKEN_BYTES} are accepted")]
    TooLong(usize),
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("alg \"none\" is never accepted")]
    AlgNone,
    #[error("alg {0} is not accepted here (no key configured for it)")]
    Algorithm(String),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token claims: {0}")]
    Claims(String),
    #[error("client id {id:?} is not the token's sub {sub:?}")]
    SubMismatch { id: String, sub: String },
    #[error("this node does not verify tokens")]
    NotConfigured,
}

/// The node's token verifier, built from `[auth]`.
pub struct Verifier {
    hs256: Option<(DecodingKey, Validation)>,
    /// RS256 or ES256, as the configured public key decided.
    public: Option<(Algorithm, DecodingKey, Validation)>,
    /// Whether an upgrade without a token is refused.
    pub required: bool,
    pub leeway: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hs256", &self.hs256.is_some())
            .field("public", &self.public.as_ref().map(|(alg, ..)| *alg))
            .field("required", &self.required)
            .field("leeway", &self.leeway)
            .finish()
    }
}

fn validation(alg: Algorithm, leeway: u64) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = leeway;
    v.set_required_spec_claims(&["exp", "sub"]);
    v.validate_exp = true;
    v.validate_nbf = true;
    // Tether has no audience of its own; an `aud` claim is the issuer's business.
    v.validate_aud = false;
    v
}

impl Verifier {
    /// A verifier with an HS256 secret and/or a public key (`alg` RS256 or ES256).
    pub fn new(
        hs256: Option<&[u8]>,
        public: Option<(Algorithm, DecodingKey)>,
        required: bool,
        leeway: u64,
    ) -> Result<Self, String> {
        let hs256 = match hs256 {
            Some(secret) => Some((
                DecodingKey::from_secret(secret).map_err(|e| e.to_string())?,
                validation(Algorithm::HS256, leeway),
            )),
            None => None,
        };
        let public = public.map(|(alg, key)| (alg, key, validation(alg, leeway)));
        Ok(Self { hs256, public, required, leeway })
    }

    /// Verifies `token`: its `alg` has a configured key, the signature holds, `exp` has not
    /// passed (give or take the leeway), `sub` is a valid client id, `name` a valid display
    /// name and `rooms` valid patterns.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLong(token.len()));
        }
        let header = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            Err(_) if says_alg_none(token) => return Err(AuthError::AlgNone),
            Err(e) => return Err(AuthError::Malformed(e.to_string())),
        };
        let (key, validation) = match (header.alg, &self.hs256, &self.public) {
            (Algorithm::HS256, Some((key, v)), _) => (key, v),
            (alg, _, Some((public, key, v))) if alg == *public => (key, v),
            (alg, ..) => return Err(AuthError::Algorithm(format!("{alg:?}"))),
        };
        let claims: Claims = match jsonwebtoken::decode(token, key, validation) {
            Ok(data) => data.claims,
            Err(e) => {
                return Err(match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    ErrorKind::ImmatureSignature => AuthError::Claims("not valid yet (nbf)".into()),
                    ErrorKind::MissingRequiredClaim(c) => AuthError::Claims(format!("`{c}` is required")),
                    ErrorKind::Json(e) => AuthError::Claims(e.to_string()),
                    _ => AuthError::Malformed(e.to_string()),
                })
            }
        };
        id::validate_client_id(&claims.sub).map_err(|e| AuthError::Claims(format!("sub: {e}")))?;
        if let Some(name) = &claims.name {
            wire::validate_name(name).map_err(|e| AuthError::Claims(format!("name: {}", e.message)))?;
        }
        let rooms = RoomAccess::from_claim(claims.rooms).map_err(|e| AuthError::Claims(e.to_string()))?;
        Ok(Grant { sub: claims.sub, name: claims.name, rooms, exp: claims.exp, leeway: self.leeway })
    }
}

/// Whether a token that would not parse says `"alg":"none"` (to say so, rather than
/// "malformed"); bounded by the caller's length check.
fn says_alg_none(token: &str) -> bool {
    use base64::Engine as _;
    let Some(head) = token.split('.').next() else { return false };
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head.trim_end_matches('=')) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&json)
        .ok()
        .and_then(|v| v.get("alg").and_then(|a| a.as_str()).map(|a| a.eq_ignore_ascii_case("none")))
        .unwrap_or(false)
}

/// Admits (or refuses) an upgrade request: with no verifier, everything passes as before.
/// With one, a request's token (`token` query parameter, else `Authorization: Bearer`) must
/// verify — and must be there when tokens are `required` — and a client id it also names (the
/// `client` query parameter, or `X-Client-Id`, which the balancer sets to the id it hashed)
/// must be the token's `sub`. A `tether_sid` cookie is not an id claim here: the token names
/// the client.
pub fn admit(
    verifier: Option<&Verifier>,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Option<Grant>, AuthError> {
    let Some(verifier) = verifier else { return Ok(None) };
    let authorization = headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    let Some(token) = token::find_token(query, authorization) else {
        return if verifier.required { Err(AuthError::Missing) } else { Ok(None) };
    };
    let grant = verifier.verify(token)?;
    let claimed = query
        .and_then(|q| id::query_param(q, "client"))
        .into_iter()
        .chain(headers.get(CLIENT_ID_HEADER).map(|h| std::str::from_utf8(h.as_bytes()).unwrap_or("\u{fffd}")));
    for id in claimed {
        if id != grant.sub {
            return Err(AuthError::SubMismatch { id: id.chars().take(128).collect(), sub: grant.sub });
        }
    }
    Ok(Some(grant))
}

/// The 401 answer to a refused upgrade: plain text saying why, and `WWW-Authenticate`.
pub fn unauthorized(e: &AuthError) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("unauthorized: {e}\n"))));
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    let challenge = match e {
        AuthError::Missing => "Bearer",
        _ => "Bearer error=\"invalid_token\"",
    };
    h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::token::{mint, MintKey};

    const SECRET: &[u8] = b"unit-test-secret-0123456789";

    fn verifier(required: bool) -> Verifier {
        Verifier::new(Some(SECRET), None, required, 0).unwrap()
    }

    fn token(sub: &str, exp_in: i64) -> String {
        let exp = (jsonwebtoken::get_current_timestamp() as i64 + exp_in) as u64;
        let claims = Claims { sub: sub.into(), exp, iat: None, name: None, rooms: Some(vec!["a:*".into()]) };
        mint(&claims, &MintKey::hs256(SECRET).unwrap()).unwrap()
    }

    #[test]
    fn a_good_token_grants_its_claims() {
        let g = verifier(true).verify(&token("alice", 60)).unwrap();
        assert_eq!(g.sub, "alice");
        assert!(g.rooms.allows("a:1") && !g.rooms.allows("b"));
    }

    #[test]
    fn bad_tokens_say_why() {
        let v = verifier(true);
        assert_eq!(v.verify(&token("alice", -10)), Err(AuthError::Expired));
        let other = mint(
            &Claims { sub: "a".into(), exp: u64::MAX / 2, iat: None, name: None, rooms: None },
            &MintKey::hs256(b"another-secret-entirely").unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&other), Err(AuthError::BadSignature));
        assert!(matches!(v.verify("garbage"), Err(AuthError::Malformed(_))));
        assert!(matches!(v.verify(&token("a b", 60)), Err(AuthError::Claims(_))));
        // {"alg":"none","typ":"JWT"} . {"sub":"a","exp":9999999999} . (no signature)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert_eq!(v.verify(none), Err(AuthError::AlgNone));
        assert!(matches!(v.verify(&"x".repeat(MAX_TOKEN_BYTES + 1)), Err(AuthError::TooLong(_))));
    }

    #[test]
    fn admission_checks_presence_and_the_claimed_id() {
        let v = verifier(true);
        let empty = HeaderMap::new();
        assert_eq!(admit(Some(&v), None, &empty), Err(AuthError::Missing));
        assert_eq!(admit(Some(&verifier(false)), None, &empty), Ok(None));
        assert_eq!(admit(None, Some("token=junk"), &empty), Ok(None));
        let t = token("alice", 60);
        assert!(admit(Some(&v), Some(&format!("token={t}&client=alice")), &empty).unwrap().is_some());
        let e = admit(Some(&v), Some(&format!("token={t}&client=bob")), &empty).unwrap_err();
        assert!(matches!(e, AuthError::SubMismatch { .. }), "{e}");
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {t}")).unwrap());
        h.insert(CLIENT_ID_HEADER, HeaderValue::from_static("mallory"));
        assert!(matches!(admit(Some(&v), None, &h), Err(AuthError::SubMismatch { .. })));
        h.insert(CLIENT_ID_HEADER, HeaderValue::from_static("alice"));
        assert_eq!(admit(Some(&v), None, &h).unwrap().map(|g| g.sub), Some("alice".into()));
    }
}
