//! A decided event: its type, its data, when it happened — and the request body built from
//! it once, with its id and signature, which every retry sends byte for byte.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::{Duration, SystemTime};

/// The event types (`"type"` of a body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    ClientOnline,
    ClientOffline,
    RoomOccupied,
    RoomVacated,
    MemberJoined,
    MemberLeft,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::ClientOnline,
        Kind::ClientOffline,
        Kind::RoomOccupied,
        Kind::RoomVacated,
        Kind::MemberJoined,
        Kind::MemberLeft,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientOnline => "client.online",
            Self::ClientOffline => "client.offline",
            Self::RoomOccupied => "room.occupied",
            Self::RoomVacated => "room.vacated",
            Self::MemberJoined => "member.joined",
            Self::MemberLeft => "member.left",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// An event decided by the backbone (inside the presence step, or claimed when its grace ran
/// out): exactly one node holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub kind: Kind,
    /// The `data` object, as JSON text.
    pub data: String,
    /// When the change happened (for a graced event: when the last connection went, not when
    /// the grace ran out).
    pub at: SystemTime,
}

impl Decided {
    pub fn new(kind: Kind, data: serde_json::Value, at: SystemTime) -> Self {
        Self { kind, data: data.to_string(), at }
    }

    /// Reads the form the Redis scripts store and return: `TYPE AT_MS DATA_JSON` (`AT_MS`
    /// `-` when the script did not read the clock: then it is `now`).
    pub fn from_script(text: &str, now: SystemTime) -> Option<Self> {
        let (kind, rest) = text.split_once(' ')?;
        let (at, data) = rest.split_once(' ')?;
        let kind = Kind::parse(kind)?;
        let at = match at {
            "-" => now,
            ms => SystemTime::UNIX_EPOCH + Duration::from_millis(ms.parse().ok()?),
        };
        // The data must be a JSON object: it is spliced into the body as is.
        let parsed: serde_json::Value = serde_json::from_str(data).ok()?;
        parsed.is_object().then(|| Self { kind, data: data.to_string(), at })
    }
}

/// One event ready to send: the body, its id and its signature header, all fixed.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub id: String,
    pub kind: Kind,
    pub body: bytes::Bytes,
    /// `sha256=<hex>`.
    pub signature: String,
    /// When it was decided on this node (for the decision → delivery latency).
    pub decided: std::time::Instant,
}

/// A fresh event id: 128 random bits in hex.
pub fn event_id() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

/// `sha256=` + hex HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

impl Outgoing {
    /// Builds the body `{"id","type","time","data"}` once, with a new id.
    pub fn build(event: &Decided, secret: &[u8]) -> Self {
        let id = event_id();
        let time = humantime::format_rfc3339_millis(event.at).to_string();
        let body = format!(r#"{{"id":"{id}","type":"{}","time":"{time}","data":{}}}"#, event.kind.as_str(), event.data);
        let signature = signature(secret, body.as_bytes());
        Self { id, kind: event.kind, body: body.into(), signature, decided: std::time::Instant::now() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_json_with_a_stable_shape_and_a_checkable_signature() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let ev =
            Decided::new(Kind::ClientOffline, serde_json::json!({"client":"a","name":"A","reason":"node_down"}), at);
        let out = Outgoing::build(&ev, b"key");
        let v: serde_json::Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(v["id"], out.id.as_str());
        assert_eq!(out.id.len(), 32);
        assert_eq!(v["type"], "client.offline");
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["data"]["reason"], "node_down");
        assert_eq!(out.signature, signature(b"key", &out.body));
        assert_ne!(out.signature, signature(b"other", &out.body));
        assert_ne!(Outgoing::build(&ev, b"key").id, out.id, "a new id per decided event");
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn script_form_is_read_and_bad_forms_are_refused() {
        let now = SystemTime::now();
        let ev = Decided::from_script(r#"room.vacated 1000 {"room":"r"}"#, now).unwrap();
        assert_eq!((ev.kind, ev.at), (Kind::RoomVacated, SystemTime::UNIX_EPOCH + Duration::from_secs(1)));
        assert_eq!(Decided::from_script(r#"member.joined - {"room":"r","client":"c"}"#, now).unwrap().at, now);
        for bad in ["", "room.vacated", "room.gone 1 {}", "room.vacated x {}", "room.vacated 1 [1]", "room.vacated 1 {"]
        {
            assert!(Decided::from_script(bad, now).is_none(), "{bad}");
        }
    }
}
