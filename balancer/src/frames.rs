//! WebSocket frame boundaries in the node→client byte stream, and the close frame the balancer
//! injects there when an operator drains a node.
//!
//! A tunnel is a byte copy ([`crate::tunnel`]): it never decodes frames. But to tell a client
//! "this node is draining, reconnect now" it must put a close frame *between* two of the
//! node's frames, never inside one. [`FrameTracker`] follows the frame headers as the bytes go
//! by (RFC 6455 §5.2) and knows, after any chunk, whether the stream sits at a boundary and
//! how many bytes are left of the frame in progress. It keeps a handful of integers and no
//! buffer, so an idle tunnel pays nothing for it, and a header split across reads (even byte
//! by byte) is followed just the same.
//!
//! FIN bits and opcodes are ignored on purpose: RFC 6455 §5.4 lets a control frame (our close)
//! sit between the fragments of a fragmented message, so every frame end is a valid place.

/// Longest header: 2 fixed bytes, an 8-byte extended length, a 4-byte masking key.
const MAX_HEADER_BYTES: u8 = 14;
/// The 7-bit length values that announce a 16- or 64-bit extended length.
const LEN_16: u8 = 126;
const LEN_64: u8 = 127;
/// Opcode of a close frame, with FIN set.
const FIN_CLOSE: u8 = 0x88;
/// Largest payload of a control frame (RFC 6455 §5.5): 2 bytes of code plus the reason.
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Follows frame boundaries in one direction of a WebSocket byte stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrameTracker {
    /// Payload bytes still to come of the frame in progress (0 while in, or before, a header).
    payload_left: u64,
    /// Header bytes seen so far of the header in progress; 0 = at a frame boundary (when
    /// `payload_left` is 0 too).
    header_seen: u8,
    /// Full length of the header in progress; known once its second byte has been seen.
    header_len: u8,
    /// Where the extended length ends within the header (2, 4 or 10); the masking key, if
    /// any, follows it.
    len_end: u8,
    /// The payload length, accumulated from the header's length bytes.
    payload_len: u64,
}

/// A [`FrameTracker`]'s whole state, as the upgrade hand-off carries it to the new process
/// (so that it can still close a handed-over tunnel at a frame boundary).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrameState {
    pub payload_left: u64,
    pub header_seen: u8,
    pub header_len: u8,
    pub len_end: u8,
    pub payload_len: u64,
}

impl FrameTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state to carry over to another process.
    pub fn state(&self) -> FrameState {
        FrameState {
            payload_left: self.payload_left,
            header_seen: self.header_seen,
            header_len: self.header_len,
            len_end: self.len_end,
            payload_len: self.payload_len,
        }
    }

    /// A tracker resuming from `state`; `None` when the state is inconsistent (a header
    /// position past the header's end, an impossible header length), so that a corrupt
    /// hand-off cannot make the tracker misbehave.
    pub fn from_state(state: FrameState) -> Option<Self> {
        let header_ok = match state.header_seen {
            0 => true,
            1 => state.header_len == 2,
            seen => {
                matches!(state.len_end, 2 | 4 | 10)
                    && (state.header_len == state.len_end || state.header_len == state.len_end + 4)
                    && seen < state.header_len
            }
        };
        (header_ok && (state.header_seen == 0 || state.payload_left == 0)).then_some(Self {
            payload_left: state.payload_left,
            header_seen: state.header_seen,
            header_len: state.header_len,
            len_end: state.len_end,
            payload_len: state.payload_len,
        })
    }

    /// Whether the bytes seen so far end exactly at the end of a frame (or nothing was seen).
    pub fn at_boundary(&self) -> bool {
        self.header_seen == 0 && self.payload_left == 0
    }

    /// Payload bytes left of the frame in progress (0 while a header is being read).
    #[cfg(test)]
    pub fn payload_left(&self) -> u64 {
        self.payload_left
    }

    /// Follows `bytes`, which come straight after everything seen before.
    pub fn advance(&mut self, bytes: &[u8]) {
        self.consume(bytes, false);
    }

    /// Follows `bytes` only up to the end of the frame in progress. Returns how many of them
    /// finish that frame when they do (`Some(0)` when already at a boundary), or `None` when
    /// all of them were consumed and the frame is still not over.
    pub fn finish_frame(&mut self, bytes: &[u8]) -> Option<usize> {
        let used = self.consume(bytes, true);
        self.at_boundary().then_some(used)
    }

    /// Consumes bytes (stopping at a boundary when `stop_at_boundary`); returns how many.
    fn consume(&mut self, bytes: &[u8], stop_at_boundary: bool) -> usize {
        let mut used = 0;
        while used < bytes.len() {
            if self.payload_left > 0 {
                let rest = (bytes.len() - used) as u64;
                let take = self.payload_left.min(rest);
                self.payload_left -= take;
                // `take` <= `rest`, which came from a usize.
                used += take as usize;
                continue;
            }
            if stop_at_boundary && self.at_boundary() {
                break;
            }
            self.header_byte(bytes[used]);
            used += 1;
        }
        used
    }

    /// One byte of a frame header.
    fn header_byte(&mut self, b: u8) {
        match self.header_seen {
            // FIN, RSV and opcode: irrelevant to where the frame ends.
            0 => self.header_len = 2,
            1 => {
                let masked = b & 0x80 != 0;
                let len7 = b & 0x7f;
                self.len_end = match len7 {
                    LEN_16 => 4,
                    LEN_64 => 10,
                    _ => 2,
                };
                self.payload_len = if len7 < LEN_16 { u64::from(len7) } else { 0 };
                self.header_len = self.len_end + if masked { 4 } else { 0 };
                debug_assert!(self.header_len <= MAX_HEADER_BYTES);
            }
            seen if seen < self.len_end => {
                // Network byte order. A 64-bit length with its top bit set is invalid (RFC
                // 6455 §5.2); shifting keeps the low 64 bits and the peer will be cut off by
                // the client anyway.
                self.payload_len = (self.payload_len << 8) | u64::from(b);
            }
            // Masking key: skipped.
            _ => {}
        }
        self.header_seen += 1;
        if self.header_seen == self.header_len {
            self.header_seen = 0;
            self.payload_left = self.payload_len;
        }
    }
}

/// An unmasked (server-to-client) close frame with `code` and `reason`; the reason is cut to
/// fit a control frame.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    // The reason must stay valid UTF-8 (RFC 6455 §5.5.1).
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let reason = &reason.as_bytes()[..cut];
    let mut frame = Vec::with_capacity(4 + reason.len());
    frame.push(FIN_CLOSE);
    // Fits in 7 bits: at most 125.
    frame.push((2 + reason.len()) as u8);
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One frame as a peer would send it: `payload_len` bytes (filled with a pattern), masked
    /// with a fixed key when `mask`.
    fn frame(opcode: u8, fin: bool, payload_len: usize, mask: bool) -> Vec<u8> {
        let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
        let mask_bit = if mask { 0x80 } else { 0 };
        match payload_len {
            0..=125 => out.push(mask_bit | payload_len as u8),
            126..=0xffff => {
                out.push(mask_bit | LEN_16);
                out.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                out.push(mask_bit | LEN_64);
                out.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        if mask {
            out.extend_from_slice(&[0x12, 0x34, 0x56, 0x78]);
        }
        // The payload pattern includes bytes that look like headers (0x81, 0x7e, 0x7f, 0xff),
        // so a tracker that lost its place would likely go wrong.
        out.extend((0..payload_len).map(|i| [0x81, 0x7e, 0x7f, 0xff, 0x00][i % 5]));
        out
    }

    /// A stream of frames covering every length encoding, masks, fragments and empty frames;
    /// returns the bytes and the offsets at which each frame ends.
    fn stream() -> (Vec<u8>, Vec<usize>) {
        let frames = [
            frame(0x1, true, 5, false),
            frame(0x1, true, 0, false),
            frame(0x2, true, 125, false),
            frame(0x2, true, 126, false),
            frame(0x1, false, 300, false), // first fragment
            frame(0x9, true, 4, false),    // ping between fragments
            frame(0x0, true, 65_535, true),
            frame(0x2, true, 65_536, false),
            frame(0x1, true, 70_001, true),
            frame(0xa, true, 0, true),
            frame(0x1, true, 1, false),
        ];
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for f in frames {
            bytes.extend_from_slice(&f);
            ends.push(bytes.len());
        }
        (bytes, ends)
    }

    /// A tiny deterministic PRNG (xorshift) so the chunkings are reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn boundaries_are_found_feeding_byte_by_byte() {
        let (bytes, ends) = stream();
        let mut t = FrameTracker::new();
        assert!(t.at_boundary());
        let mut found = Vec::new();
        for (i, b) in bytes.iter().enumerate() {
            t.advance(std::slice::from_ref(b));
            if t.at_boundary() {
                found.push(i + 1);
            }
        }
        assert_eq!(found, ends);
    }

    #[test]
    fn boundaries_are_found_in_random_chunkings() {
        let (bytes, ends) = stream();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..70 {
            // Small chunks split headers; large ones span several frames.
            let max_chunk = [1, 3, 7, 20, 200, 5000, 100_000][round % 7];
            let mut t = FrameTracker::new();
            let mut at = 0;
            while at < bytes.len() {
                let len = (1 + rng.next() as usize % max_chunk).min(bytes.len() - at);
                t.advance(&bytes[at..at + len]);
                at += len;
                assert_eq!(t.at_boundary(), ends.contains(&at), "round {round} at {at}");
            }
            assert!(t.at_boundary());
        }
    }

    #[test]
    fn finish_frame_stops_exactly_at_the_end_of_the_frame_in_progress() {
        let (bytes, ends) = stream();
        let mut rng = Rng(42);
        for _ in 0..300 {
            // Feed a random prefix, then finish the frame in progress in random chunks.
            let cut = rng.next() as usize % bytes.len();
            let mut t = FrameTracker::new();
            t.advance(&bytes[..cut]);
            let expected_end = if t.at_boundary() { cut } else { *ends.iter().find(|&&e| e > cut).unwrap() };
            let mut at = cut;
            loop {
                let len = (1 + rng.next() as usize % 9000).min(bytes.len() - at);
                match t.finish_frame(&bytes[at..at + len]) {
                    Some(used) => {
                        at += used;
                        break;
                    }
                    None => at += len,
                }
            }
            assert_eq!(at, expected_end, "cut at {cut}");
            assert!(t.at_boundary());
            assert_eq!(t.finish_frame(&bytes[at..]), Some(0));
        }
    }

    #[test]
    fn payload_left_counts_down_through_a_64_bit_length() {
        let f = frame(0x2, true, 70_000, false);
        let mut t = FrameTracker::new();
        t.advance(&f[..10]); // the whole header
        assert_eq!(t.payload_left(), 70_000);
        t.advance(&f[10..100]);
        assert_eq!(t.payload_left(), 70_000 - 90);
        t.advance(&f[100..]);
        assert!(t.at_boundary());
    }

    #[test]
    fn a_trackers_state_carries_over_at_every_cut() {
        let (bytes, ends) = stream();
        for cut in (0..bytes.len()).step_by(4999).chain(1..24) {
            let mut t = FrameTracker::new();
            t.advance(&bytes[..cut]);
            let mut resumed = FrameTracker::from_state(t.state()).expect("a real state is accepted");
            assert_eq!(resumed, t);
            let mut found = Vec::new();
            for (i, b) in bytes[cut..].iter().enumerate() {
                resumed.advance(std::slice::from_ref(b));
                if resumed.at_boundary() {
                    found.push(cut + i + 1);
                }
            }
            let expected: Vec<usize> = ends.iter().copied().filter(|&e| e > cut).collect();
            assert_eq!(found, expected, "cut at {cut}");
        }
        // Inconsistent states are refused.
        let bad = FrameState { header_seen: 7, header_len: 4, len_end: 4, ..FrameState::default() };
        assert!(FrameTracker::from_state(bad).is_none());
        let bad = FrameState { header_seen: 1, header_len: 9, ..FrameState::default() };
        assert!(FrameTracker::from_state(bad).is_none());
    }

    #[test]
    fn close_frame_is_unmasked_with_code_and_reason() {
        assert_eq!(close_frame(1012, "node draining"), [&[0x88, 15, 0x03, 0xf4][..], b"node draining"].concat());
        let long = close_frame(1012, &"x".repeat(500));
        assert_eq!(long.len(), 2 + 125);
        assert_eq!(long[1], 125);
        // Never cut inside a character.
        let accents = close_frame(1012, &"é".repeat(100));
        assert_eq!(accents.len(), 2 + 2 + 122);
        assert!(std::str::from_utf8(&accents[4..]).is_ok());
        // A tracker sees it as one whole frame.
        let mut t = FrameTracker::new();
        t.advance(&long[..1]);
        assert!(!t.at_boundary());
        t.advance(&long[1..]);
        assert!(t.at_boundary());
    }
}
