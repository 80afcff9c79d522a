//! The `[auth]` table of the node's TOML, validated into a [`Verifier`].
//!
//! ```toml
//! [auth]
//! hs256_secret = "…"            # or hs256_secret_file = "/etc/tether/jwt.secret"
//! public_key = "/etc/tether/jwt.pub.pem"  # RSA → RS256, EC P-256 → ES256
//! required = true               # default: true once a key is set
//! leeway_secs = 2
//! ```
//! With no `[auth]` secret, `TETHER_JWT_SECRET` (environment) stands for `hs256_secret`.

use super::Verifier;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Environment variable holding the HS256 secret when the file sets none.
pub const JWT_SECRET_ENV: &str = "TETHER_JWT_SECRET";
/// Shortest HS256 secret accepted, in bytes: a short one can be brute-forced off one token.
pub const MIN_SECRET_BYTES: usize = 16;
pub const DEFAULT_LEEWAY_SECS: u64 = 2;
pub const MAX_LEEWAY_SECS: u64 = 300;

/// `[auth]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    pub hs256_secret: Option<String>,
    pub hs256_secret_file: Option<PathBuf>,
    pub public_key: Option<PathBuf>,
    pub required: Option<bool>,
    pub leeway_secs: Option<u64>,
}

/// A field of `[auth]` that cannot be used: the field's name and why.
pub type Invalid = (&'static str, String);

impl FileAuth {
    /// The verifier this table (and `env_secret`, from [`JWT_SECRET_ENV`]) describes; `None`
    /// when no key is configured (JWT off).
    pub fn validate(self, env_secret: Option<String>) -> Result<Option<Verifier>, Invalid> {
        let secret = match (self.hs256_secret, &self.hs256_secret_file) {
            (Some(_), Some(_)) => {
                return Err(("auth.hs256_secret_file", "set hs256_secret or hs256_secret_file, not both".into()))
            }
            (Some(s), None) => Some(("auth.hs256_secret", s)),
            (None, Some(path)) => Some(("auth.hs256_secret_file", read(path, "auth.hs256_secret_file")?.trim().into())),
            (None, None) => env_secret.filter(|s| !s.is_empty()).map(|s| ("auth.hs256_secret", s)),
        };
        if let Some((field, s)) = &secret {
            if s.len() < MIN_SECRET_BYTES {
                return Err((field, format!("{} bytes; at least {MIN_SECRET_BYTES} are required", s.len())));
            }
        }
        let public = match &self.public_key {
            Some(path) => Some(public_key(read(path, "auth.public_key")?.as_bytes())?),
            None => None,
        };
        let leeway = self.leeway_secs.unwrap_or(DEFAULT_LEEWAY_SECS);
        if leeway > MAX_LEEWAY_SECS {
            return Err(("auth.leeway_secs", format!("{leeway} is above {MAX_LEEWAY_SECS}")));
        }
        if secret.is_none() && public.is_none() {
            return match self.required {
                Some(true) => Err(("auth.required", "no key configured (hs256_secret or public_key)".into())),
                _ => Ok(None),
            };
        }
        let verifier =
            Verifier::new(secret.as_ref().map(|(_, s)| s.as_bytes()), public, self.required.unwrap_or(true), leeway)
                .map_err(|e| ("auth.hs256_secret", e))?;
        Ok(Some(verifier))
    }
}

fn read(path: &Path, field: &'static str) -> Result<String, Invalid> {
    std::fs::read_to_string(path).map_err(|e| (field, format!("{}: {e}", path.display())))
}

/// DER of the named-curve OID of P-256 (prime256v1, 1.2.840.10045.3.1.7), as it appears in a
/// `PUBLIC KEY` (SubjectPublicKeyInfo) of an EC key on that curve.
const P256_OID: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the id-ecPublicKey OID (1.2.840.10045.2.1): an EC key on some curve.
const EC_OID: [u8; 9] = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// The algorithm and key of a PEM public key: RSA → RS256, EC on P-256 → ES256; an EC key on
/// another curve is refused by name rather than accepted and failing every token.
fn public_key(pem: &[u8]) -> Result<(Algorithm, DecodingKey), Invalid> {
    let der = pem_body(pem).ok_or(("auth.public_key", "not a PEM file".to_string()))?;
    let has = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
    if has(&EC_OID) {
        if !has(&P256_OID) {
            return Err(("auth.public_key", "an EC key on a curve other than P-256 (ES256 needs P-256)".into()));
        }
        let key = DecodingKey::from_ec_pem(pem).map_err(|e| ("auth.public_key", format!("EC P-256 key: {e}")))?;
        return Ok((Algorithm::ES256, key));
    }
    let key = DecodingKey::from_rsa_pem(pem)
        .map_err(|e| ("auth.public_key", format!("neither an RSA nor an EC P-256 public key: {e}")))?;
    Ok((Algorithm::RS256, key))
}

/// The DER under a PEM's first armor block.
fn pem_body(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let mut lines = text.lines().map(str::trim).skip_while(|l| !l.starts_with("-----BEGIN "));
    lines.next()?;
    let body: String = lines.take_while(|l| !l.starts_with("-----END ")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<Verifier>, Invalid> {
        #[derive(Deserialize)]
        struct File {
            auth: FileAuth,
        }
        toml::from_str::<File>(text).unwrap().auth.validate(None)
    }

    #[test]
    fn keys_required_and_leeway() {
        let v = parse("[auth]\nhs256_secret = \"0123456789abcdef\"").unwrap().unwrap();
        assert!(v.required);
        assert_eq!(v.leeway, DEFAULT_LEEWAY_SECS);
        let v =
            parse("[auth]\nhs256_secret = \"0123456789abcdef\"\nrequired = false\nleeway_secs = 0").unwrap().unwrap();
        assert!(!v.required);
        assert_eq!(parse("[auth]\nrequired = false").unwrap().map(|_| ()), None);
        assert_eq!(parse("[auth]\nrequired = true").unwrap_err().0, "auth.required");
        assert_eq!(parse("[auth]\nhs256_secret = \"short\"").unwrap_err().0, "auth.hs256_secret");
        assert_eq!(
            parse("[auth]\nhs256_secret = \"0123456789abcdef\"\nleeway_secs = 9999").unwrap_err().0,
            "auth.leeway_secs"
        );
        assert_eq!(parse("[auth]\npublic_key = \"/nonexistent.pem\"").unwrap_err().0, "auth.public_key");
        let env = FileAuth::default().validate(Some("from-the-environment".into())).unwrap();
        assert!(env.is_some_and(|v| v.required));
        assert!(FileAuth::default().validate(Some(String::new())).unwrap().is_none());
    }

    #[test]
    fn a_non_pem_public_key_is_refused_by_name() {
        assert_eq!(public_key(b"hello").unwrap_err().0, "auth.public_key");
        assert_eq!(
            public_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").unwrap_err().0,
            "auth.public_key"
        );
    }
}
