//! Whole WebSocket frames, as a re-homing tunnel reads them (RFC 6455 §5.2): where a frame
//! ends, what kind it is, and its payload unmasked when someone needs to read it. A
//! [`FrameTracker`](crate::frames::FrameTracker) only follows boundaries byte by byte; a
//! re-homing tunnel forwards whole frames only (so that a switch never leaves half a frame on
//! either side), and so looks at each header once, with the frame's bytes at hand.

/// Opcodes (RFC 6455 §5.2).
pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;

/// One frame's header, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    /// The masking key, when the frame is masked (client → server frames are).
    pub mask: Option<[u8; 4]>,
    /// Bytes of the header itself.
    pub header_len: usize,
    pub payload_len: u64,
}

impl Header {
    /// The frame's whole length, header included (saturating: a 64-bit length no buffer holds).
    pub fn frame_len(&self) -> u64 {
        (self.header_len as u64).saturating_add(self.payload_len)
    }
}

/// The header at the start of `bytes`; `None` while it is not all there.
pub fn header(bytes: &[u8]) -> Option<Header> {
    let (&b0, &b1) = (bytes.first()?, bytes.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (len_bytes, mut payload_len) = match b1 & 0x7f {
        126 => (2, 0),
        127 => (8, 0),
        n => (0, u64::from(n)),
    };
    let header_len = 2 + len_bytes + if masked { 4 } else { 0 };
    if bytes.len() < header_len {
        return None;
    }
    for &b in &bytes[2..2 + len_bytes] {
        payload_len = (payload_len << 8) | u64::from(b);
    }
    let mask = masked.then(|| {
        let at = 2 + len_bytes;
        [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]
    });
    Some(Header { fin: b0 & 0x80 != 0, opcode: b0 & 0x0f, mask, header_len, payload_len })
}

/// `payload` unmasked with `mask` (a copy; `None` = not masked, the bytes as they are).
pub fn unmask(payload: &[u8], mask: Option<[u8; 4]>) -> std::borrow::Cow<'_, [u8]> {
    match mask {
        None => std::borrow::Cow::Borrowed(payload),
        Some(key) => std::borrow::Cow::Owned(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect()),
    }
}

/// A whole frame: FIN set, `opcode`, `payload` — masked with `mask` when one is given (a
/// frame to a node), plain otherwise (a frame to a client).
pub fn encode(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        None => out.extend_from_slice(payload),
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
    }
    out
}

/// The status code of a close frame's (unmasked) payload; `None` for an empty one.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_of_every_length_form_round_trip_masked_and_plain() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for mask in [None, Some([1, 2, 3, 4])] {
                let frame = encode(OP_TEXT, &payload, mask);
                let h = header(&frame).unwrap();
                assert_eq!((h.fin, h.opcode, h.mask, h.payload_len), (true, OP_TEXT, mask, len as u64));
                assert_eq!(h.frame_len(), frame.len() as u64);
                assert_eq!(unmask(&frame[h.header_len..], h.mask).as_ref(), &payload[..]);
                // Any strict prefix of the header is "not yet".
                for cut in 0..h.header_len {
                    assert_eq!(header(&frame[..cut]), None, "len {len} cut {cut}");
                }
            }
        }
    }

    #[test]
    fn close_codes_are_read() {
        let close = encode(OP_CLOSE, &[0x03, 0xf4, b'x'], None);
        let h = header(&close).unwrap();
        assert_eq!((h.opcode, h.fin), (OP_CLOSE, true));
        assert_eq!(close_code(&close[h.header_len..]), Some(1012));
        assert_eq!(close_code(&[]), None);
    }
}
