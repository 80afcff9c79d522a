//! One connection's way out to its client: a bounded queue of ready WebSocket frames in front
//! of the client's socket.
//!
//! Whoever has a frame for the client — the backbone reader fanning a room message out, the
//! connection's own task answering its client, tungstenite answering a ping — pushes it here
//! and, if the queue was empty, wakes the connection's task; the task writes everything that
//! has gathered meanwhile in one vectored write (up to 64 frames), as much as the socket takes,
//! and the rest once the socket is writable again. On an idle node the task runs at once and a
//! frame leaves within microseconds; on a busy one several frames have gathered by the time it
//! runs, and they leave in one write. (Writing each frame straight into the socket from the
//! fan-out, without waking the task, was measured and lost: it never batches, and on this
//! machine a loopback write costs ~10 µs whatever it carries — `docs/PERFORMANCE.md`.)
//!
//! The frames are complete WebSocket frames ([`text_frame`]): a room message is framed once and
//! the same bytes go to every member.
//!
//! **Slow consumers.** What counts is time, not one burst: a client whose queue has stayed over
//! the low-water mark ([`Limits::low_water`]) for [`Limits::slow_after`], or whose queue would
//! pass the hard caps ([`Limits::max_bytes`], [`Limits::max_frames`]), is refused the next frame
//! ([`Pushed::Full`]); the caller then closes it as a slow consumer. A reader that pauses and
//! catches up is never cut; one that has stopped pins at most the hard cap.

use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Most frames one vectored write carries.
const MAX_SLICES: usize = 64;

/// Largest queue buffer (in frames) kept once the queue is empty again; a burst's larger one is
/// freed, so a connection that is idle again holds no queue memory to speak of.
const KEEP_SLOTS: usize = 8;

/// Where an [`Outbox`] writes: a client's socket, or a test's stand-in. Both calls must not
/// block: a write that cannot go at once is `WouldBlock`, and readiness says when to retry.
pub trait Wire: Send + Sync + 'static {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Wire for TcpStream {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }
}

/// A connection's queue bounds (one copy per node, shared by every connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Frames waiting at once; more make the client a slow consumer at once.
    pub max_frames: usize,
    /// Bytes waiting at once; more make the client a slow consumer at once.
    pub max_bytes: usize,
    /// Bytes waiting under which a client counts as keeping up.
    pub low_water: usize,
    /// How long a client's queue may stay over `low_water` before it is a slow consumer.
    pub slow_after: Duration,
}

impl Limits {
    /// Bounds for tests and benchmarks: generous, as the node's defaults are.
    pub fn generous() -> Arc<Self> {
        Arc::new(Self {
            max_frames: 1 << 16,
            max_bytes: 8 << 20,
            low_water: 1 << 20,
            slow_after: Duration::from_secs(5),
        })
    }
}

/// What [`Outbox::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; the connection's task writes it.
    Queued,
    /// Refused: the client is a slow consumer (see the module docs).
    Full,
    /// The connection is closing: room frames are no longer taken.
    Closed,
}

/// One connection's send queue in front of its socket; see the module docs.
pub struct Outbox {
    state: Mutex<State>,
    /// Woken when frames start waiting in an empty queue (a permit is kept if nobody waits).
    backlog: tokio::sync::Notify,
    limits: Arc<Limits>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let q = self.lock();
        f.debug_struct("Outbox")
            .field("frames", &q.frames.len())
            .field("bytes", &q.bytes)
            .field("sealed", &q.sealed)
            .field("closed", &q.closed)
            .finish()
    }
}

/// What one [`Outbox::write_some`] did.
enum Written {
    /// Nothing waits.
    Empty,
    /// Some bytes went out.
    Some,
    /// The socket takes nothing now: wait for it to be writable.
    Blocked(Arc<dyn Wire>),
}

struct State {
    /// The socket; `None` once closed (or, in tests, for a queue with nothing behind it).
    wire: Option<Arc<dyn Wire>>,
    /// Frames waiting, oldest first; the first may be partly written already.
    frames: VecDeque<Bytes>,
    /// Bytes of the first frame already in the socket.
    offset: usize,
    /// Bytes waiting (the first frame's rest and all the others).
    bytes: usize,
    /// Since when `bytes` has been over the low-water mark.
    above_since: Option<Instant>,
    /// The connection is closing: room frames are refused, its own last frames still go.
    sealed: bool,
    /// Gone: nothing is taken any more.
    closed: bool,
}

impl Outbox {
    /// A queue in front of `wire` (`None`: frames only queue, for tests of the queue itself).
    pub fn new(wire: Option<Arc<dyn Wire>>, limits: Arc<Limits>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                wire,
                frames: VecDeque::new(),
                offset: 0,
                bytes: 0,
                above_since: None,
                sealed: false,
                closed: false,
            }),
            backlog: tokio::sync::Notify::new(),
            limits,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned queue is still a consistent queue.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers one complete WebSocket frame: a room's, or one of the connection's own.
    pub fn push(&self, frame: Bytes) -> Pushed {
        let mut q = self.lock();
        if q.closed || q.sealed {
            return Pushed::Closed;
        }
        self.push_locked(&mut q, frame, true)
    }

    /// Bytes the connection's WebSocket writes itself (the answer to a ping, a close frame),
    /// also once the connection is sealed. They are whole frames (tungstenite hands over its
    /// buffer of whole frames) and queue behind everything else.
    pub fn push_own(&self, frame: Bytes) -> Pushed {
        let mut q = self.lock();
        if q.closed {
            return Pushed::Closed;
        }
        self.push_locked(&mut q, frame, false)
    }

    fn push_locked(&self, q: &mut State, frame: Bytes, slow_check: bool) -> Pushed {
        if q.frames.is_empty() {
            // Always taken, however large: a client is never refused its first frame.
            q.bytes = frame.len();
            q.frames.push_back(frame);
            q.above_since = (q.bytes > self.limits.low_water).then(Instant::now);
            self.backlog.notify_one();
            return Pushed::Queued;
        }
        let bytes = q.bytes + frame.len();
        if q.frames.len() >= self.limits.max_frames || bytes > self.limits.max_bytes {
            return Pushed::Full;
        }
        if bytes > self.limits.low_water {
            let now = Instant::now();
            let since = *q.above_since.get_or_insert(now);
            if slow_check && now.duration_since(since) >= self.limits.slow_after {
                return Pushed::Full;
            }
        }
        q.bytes = bytes;
        q.frames.push_back(frame);
        Pushed::Queued
    }

    /// Waits until frames wait, then writes them all out (see [`Outbox::flush`]).
    /// Cancel-safe: dropped halfway, nothing is lost or written twice.
    pub async fn write_backlog(&self) -> io::Result<()> {
        loop {
            if !self.lock().frames.is_empty() {
                return self.flush().await;
            }
            self.backlog.notified().await;
        }
    }

    /// Writes out everything waiting, as the socket takes it; returns once the queue is empty
    /// (at once if it is), or with the socket's error. Cancel-safe.
    pub async fn flush(&self) -> io::Result<()> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.write_some()? {
                Written::Empty => return Poll::Ready(Ok(())),
                Written::Some => {}
                Written::Blocked(wire) => ready!(wire.poll_write_ready(cx))?,
            }
        }
    }

    /// Writes what the socket takes now, without waiting; `true` when nothing waits any more.
    pub fn write_now(&self) -> bool {
        loop {
            match self.write_some() {
                Ok(Written::Empty) => return true,
                Ok(Written::Some) => {}
                Ok(Written::Blocked(_)) | Err(_) => return false,
            }
        }
    }

    /// One vectored write of the frames at the front of the queue.
    fn write_some(&self) -> io::Result<Written> {
        let mut q = self.lock();
        if q.frames.is_empty() {
            return Ok(Written::Empty);
        }
        let Some(wire) = q.wire.clone() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut n = 0;
        for (i, frame) in q.frames.iter().take(MAX_SLICES).enumerate() {
            slices[i] = IoSlice::new(if i == 0 { &frame[q.offset..] } else { frame });
            n += 1;
        }
        match wire.try_write_vectored(&slices[..n]) {
            Ok(0) => Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => {
                self.advance(&mut q, written);
                Ok(Written::Some)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Written::Blocked(wire)),
            Err(e) => Err(e),
        }
    }

    /// `written` bytes from the front went into the socket.
    fn advance(&self, q: &mut State, mut written: usize) {
        q.bytes -= written;
        while written > 0 {
            let Some(front) = q.frames.front() else { break };
            let rest = front.len() - q.offset;
            if written < rest {
                q.offset += written;
                break;
            }
            written -= rest;
            q.offset = 0;
            q.frames.pop_front();
        }
        if q.bytes <= self.limits.low_water {
            q.above_since = None;
        }
        if q.frames.is_empty() && q.frames.capacity() > KEEP_SLOTS {
            q.frames = VecDeque::new();
        }
    }

    /// The connection is closing: room frames are refused from now on; what waits still goes.
    pub fn seal(&self) {
        self.lock().sealed = true;
    }

    /// Drops everything waiting (a slow consumer's backlog); returns whether the socket's byte
    /// stream is at a frame boundary, so that a close frame may still follow.
    pub fn discard(&self) -> bool {
        let mut q = self.lock();
        let boundary = q.offset == 0;
        q.frames = VecDeque::new();
        q.offset = 0;
        q.bytes = 0;
        q.above_since = None;
        q.sealed = true;
        boundary
    }

    /// The connection is gone: drops what waits, refuses what comes, lets go of the socket.
    pub fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        q.frames = VecDeque::new();
        q.bytes = 0;
        q.wire = None;
    }

    /// Bytes waiting to go into the socket.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Frames waiting (the first perhaps partly written).
    pub fn queued_frames(&self) -> usize {
        self.lock().frames.len()
    }

    /// Takes every waiting frame out of the queue, as if written (tests and benchmarks that
    /// stand in for the socket).
    pub fn take_all(&self) -> Vec<Bytes> {
        let mut q = self.lock();
        q.bytes = 0;
        q.offset = 0;
        q.above_since = None;
        std::mem::take(&mut q.frames).into()
    }
}

/// A server's text frame (unmasked, final) around `payload`.
pub fn text_frame(payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut out = BytesMut::with_capacity(len + 10);
    out.put_u8(0x81);
    match len {
        0..=125 => out.put_u8(len as u8),
        126..=0xffff => {
            out.put_u8(126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
    }
    out.put_slice(payload);
    out.freeze()
}

/// The payload of a frame made by [`text_frame`].
pub fn frame_payload(frame: &[u8]) -> &[u8] {
    let head = match frame.get(1) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(head..).unwrap_or_default()
}

/// The client's socket as the connection's WebSocket sees it: reads come straight from the
/// socket; writes (tungstenite's answers to pings and its close frames) go through the
/// connection's [`Outbox`], behind the frames already waiting, so nothing interleaves.
pub struct ClientIo {
    pub sock: Arc<TcpStream>,
    pub out: Arc<Outbox>,
}

impl AsyncRead for ClientIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.sock.poll_read_ready(cx))?;
            match self.sock.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale; `poll_read_ready` now waits for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.out.push_own(Bytes::copy_from_slice(buf)) {
            Pushed::Queued => Poll::Ready(Ok(buf.len())),
            Pushed::Full => Poll::Ready(Err(io::Error::other("send queue full"))),
            Pushed::Closed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    /// The outbox writes on its own; what waits is the connection task's to write out.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A socket stand-in that takes `room` more bytes, then blocks until given more room.
    #[derive(Default)]
    struct Pipe {
        got: Mutex<Vec<u8>>,
        room: AtomicUsize,
        waker: Mutex<Option<std::task::Waker>>,
        writes: AtomicUsize,
    }

    impl Pipe {
        fn with_room(room: usize) -> Arc<Self> {
            Arc::new(Self { room: AtomicUsize::new(room), ..Default::default() })
        }

        fn open(&self, more: usize) {
            self.room.fetch_add(more, Ordering::SeqCst);
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }

        fn got(&self) -> Vec<u8> {
            self.got.lock().unwrap().clone()
        }
    }

    impl Wire for Pipe {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut room = self.room.load(Ordering::SeqCst);
            if room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut got = self.got.lock().unwrap();
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(room);
                got.extend_from_slice(&b[..take]);
                room -= take;
                n += take;
                if room == 0 {
                    break;
                }
            }
            self.room.fetch_sub(n, Ordering::SeqCst);
            self.writes.fetch_add(1, Ordering::SeqCst);
            Ok(n)
        }

        fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.room.load(Ordering::SeqCst) > 0 {
                return Poll::Ready(Ok(()));
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    fn limits(max_frames: usize, max_bytes: usize, low_water: usize, slow_ms: u64) -> Arc<Limits> {
        Arc::new(Limits { max_frames, max_bytes, low_water, slow_after: Duration::from_millis(slow_ms) })
    }

    fn frames(n: usize, len: usize) -> Vec<Bytes> {
        (0..n).map(|i| text_frame(&vec![b'a' + (i % 26) as u8; len])).collect()
    }

    #[test]
    fn text_frames_have_the_right_header_for_every_length_class() {
        for len in [0usize, 125, 126, 65_535, 65_536] {
            let f = text_frame(&vec![b'x'; len]);
            assert_eq!(f[0], 0x81);
            assert_eq!(frame_payload(&f).len(), len, "len {len}");
        }
        assert_eq!(text_frame(b"hi")[..], [0x81, 2, b'h', b'i']);
        assert_eq!(text_frame(&[b'x'; 126])[1..4], [126, 0, 126]);
    }

    #[tokio::test]
    async fn frames_that_gathered_leave_in_one_write() {
        let pipe = Pipe::with_room(1 << 20);
        let out = Outbox::new(Some(pipe.clone()), Limits::generous());
        let fs = frames(3, 5);
        for f in &fs {
            assert_eq!(out.push(f.clone()), Pushed::Queued);
        }
        tokio::time::timeout(Duration::from_secs(5), out.write_backlog()).await.expect("written").unwrap();
        assert_eq!(pipe.got(), fs.concat());
        assert_eq!(pipe.writes.load(Ordering::SeqCst), 1, "one vectored write for the three");
    }

    #[tokio::test]
    async fn what_the_socket_does_not_take_waits_and_goes_out_in_order() {
        let pipe = Pipe::with_room(10);
        let out = Outbox::new(Some(pipe.clone()), Limits::generous());
        let fs = frames(5, 20);
        for f in &fs {
            assert_eq!(out.push(f.clone()), Pushed::Queued);
        }
        assert!(!out.write_now(), "only 10 of 110 bytes fit");
        assert_eq!(out.queued_bytes(), 5 * 22 - 10);
        let writer = tokio::spawn({
            let out = Arc::clone(&out);
            async move { out.write_backlog().await }
        });
        for _ in 0..20 {
            pipe.open(7);
            tokio::task::yield_now().await;
        }
        pipe.open(1000);
        tokio::time::timeout(Duration::from_secs(5), writer).await.expect("written").unwrap().unwrap();
        assert_eq!(pipe.got(), fs.concat());
        assert_eq!(out.queued_bytes(), 0);
    }

    #[test]
    fn the_hard_caps_refuse_at_once() {
        let pipe = Pipe::with_room(0);
        let out = Outbox::new(Some(pipe.clone()), limits(3, 1000, 1000, 60_000));
        let fs = frames(4, 10);
        for f in &fs[..3] {
            assert_eq!(out.push(f.clone()), Pushed::Queued);
        }
        assert_eq!(out.push(fs[3].clone()), Pushed::Full, "three frames at most");
        let out = Outbox::new(Some(pipe), limits(100, 30, 30, 60_000));
        assert_eq!(out.push(fs[0].clone()), Pushed::Queued);
        assert_eq!(out.push(fs[1].clone()), Pushed::Queued);
        assert_eq!(out.push(fs[2].clone()), Pushed::Full, "over 30 bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_low_water_mark_for_too_long_is_slow_and_a_pause_is_not() {
        let pipe = Pipe::with_room(0);
        let out = Outbox::new(Some(pipe.clone()), limits(1 << 20, 1 << 20, 100, 5_000));
        let f = text_frame(&[b'x'; 48]);
        for _ in 0..4 {
            assert_eq!(out.push(f.clone()), Pushed::Queued);
        }
        // Over the mark; a pause shorter than the limit costs nothing.
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(out.push(f.clone()), Pushed::Queued);
        // The reader catches up: below the mark, the clock starts again.
        pipe.open(1 << 20);
        out.flush().await.unwrap();
        pipe.room.store(0, Ordering::SeqCst);
        for _ in 0..4 {
            assert_eq!(out.push(f.clone()), Pushed::Queued);
        }
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(out.push(f.clone()), Pushed::Queued, "4 s over the mark, not 8");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(out.push(f.clone()), Pushed::Full, "5 s over the mark: slow");
    }

    #[test]
    fn a_sealed_queue_refuses_room_frames_but_takes_its_own_and_a_closed_one_nothing() {
        let pipe = Pipe::with_room(1 << 20);
        let out = Outbox::new(Some(pipe.clone()), Limits::generous());
        out.seal();
        assert_eq!(out.push(text_frame(b"room")), Pushed::Closed);
        assert_eq!(out.push_own(text_frame(b"bye")), Pushed::Queued);
        assert!(out.write_now());
        out.close();
        assert_eq!(out.push_own(text_frame(b"late")), Pushed::Closed);
        assert_eq!(pipe.got(), text_frame(b"bye").to_vec());
    }

    #[test]
    fn discarding_a_backlog_says_whether_a_frame_was_cut() {
        let pipe = Pipe::with_room(3);
        let out = Outbox::new(Some(pipe.clone()), Limits::generous());
        out.push(text_frame(b"hello"));
        assert!(!out.write_now());
        assert!(!out.discard(), "3 bytes of a 7-byte frame are out");
        let out = Outbox::new(Some(Pipe::with_room(0)), Limits::generous());
        out.push(text_frame(b"hello"));
        assert!(out.discard());
        assert_eq!(out.queued_bytes(), 0);
    }
}
