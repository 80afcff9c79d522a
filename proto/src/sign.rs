//! Signed client ids.
//!
//! Without signing, a client id is a bearer token: whoever knows it can connect as that client
//! and take over its session (name, rooms, missed messages). With a `signing_key` shared by the
//! balancer and the nodes, the balancer mints ids of the form
//!
//! ```text
//! <32 hex digits of randomness>.<32 hex digits of HMAC-SHA256(key, randomness), truncated to 128 bits>
//! ```
//!
//! and every process holding the key refuses an id that does not verify. Knowing someone's id
//! still lets you *be* them (it is still a bearer token, as a session cookie is), but ids can no
//! longer be guessed or chosen: a client cannot pick `alice` and walk into Alice's session.
//! The key must be at least [`MIN_KEY_BYTES`] long.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest accepted signing key, in bytes.
pub const MIN_KEY_BYTES: usize = 16;

/// Hex digits of the signature part (128 bits).
const SIG_HEX: usize = 32;

/// A key for signing and verifying ids.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

/// Why a key could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("signing key is {0} bytes; at least {MIN_KEY_BYTES} are required")]
pub struct KeyTooShort(pub usize);

impl SigningKey {
    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, KeyTooShort> {
        let key = key.into();
        if key.len() < MIN_KEY_BYTES {
            return Err(KeyTooShort(key.len()));
        }
        Ok(Self(key))
    }

    fn mac(&self, random: &str) -> Hmac<Sha256> {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(random.as_bytes());
        mac
    }

    /// A fresh signed id.
    pub fn mint(&self) -> String {
        let random = crate::id::mint_client_id();
        let tag = self.mac(&random).finalize().into_bytes();
        let mut id = random;
        id.push('.');
        for b in &tag[..SIG_HEX / 2] {
            id.push_str(&format!("{b:02x}"));
        }
        id
    }

    /// Whether `id` was minted with this key. Constant-time in the signature.
    pub fn verify(&self, id: &str) -> bool {
        let Some((random, sig)) = id.rsplit_once('.') else {
            return false;
        };
        if sig.len() != SIG_HEX || random.is_empty() {
            return false;
        }
        let Some(sig) = decode_hex(sig) else {
            return false;
        };
        self.mac(random).verify_truncated_left(&sig).is_ok()
    }
}

/// Lowercase hex only: an id has exactly one valid spelling (an uppercase variant would be a
/// different id — another node, another session — that still verified).
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_verify_and_are_valid_ids() {
        let key = SigningKey::new(b"0123456789abcdef-test".to_vec()).unwrap();
        let id = key.mint();
        assert_eq!(id.len(), 65);
        assert!(crate::id::validate_client_id(&id).is_ok());
        assert!(key.verify(&id));
    }

    #[test]
    fn unsigned_forged_and_other_key_ids_fail() {
        let key = SigningKey::new(b"0123456789abcdef-test".to_vec()).unwrap();
        let other = SigningKey::new(b"another-key-of-16+bytes".to_vec()).unwrap();
        let id = key.mint();
        assert!(!key.verify("alice"));
        assert!(!key.verify(""));
        assert!(!key.verify(&other.mint()));
        let (random, sig) = id.rsplit_once('.').unwrap();
        let mut flipped = sig.to_string();
        let last = if flipped.ends_with('0') { '1' } else { '0' };
        flipped.pop();
        flipped.push(last);
        assert!(!key.verify(&format!("{random}.{flipped}")));
        assert!(!key.verify(&format!("x{random}.{sig}")));
        assert!(!key.verify(&format!("{random}.{}", &sig[..30])));
        assert!(!key.verify(&format!("{random}.{}zz", &sig[..30])));
        assert!(!key.verify(&format!("{random}.{}", sig.to_uppercase())), "one spelling per id");
    }

    #[test]
    fn short_keys_are_refused() {
        assert_eq!(SigningKey::new(b"short".to_vec()).unwrap_err(), KeyTooShort(5));
    }
}
