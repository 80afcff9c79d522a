//! The byte pump: one direction of a tunnel, copied through the worker thread's scratch buffer
//! so that an idle tunnel holds no buffer of its own.
//!
//! Each step waits until its source is readable, reads into the thread's buffer
//! ([`SCRATCH_BYTES`]) and writes those bytes to the destination within the same poll. Only
//! when the destination cannot take them all does the rest move into a buffer of the tunnel's
//! own ([`Step::Blocked`]), freed once written: that tunnel is not idle, its reader is slow.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Size of the scratch buffer every copy reads into. There is one per worker thread, not one
/// per tunnel, so it can be as large as a proxy's usual buffer (HAProxy's default `bufsize`):
/// bulk streams move in few large reads. It is also the most a tunnel keeps of its own while
/// its destination is blocked.
pub const SCRATCH_BYTES: usize = 16 * 1024;

thread_local! {
    /// The worker thread's read buffer (see [`SCRATCH_BYTES`]). Borrowed only within one poll,
    /// never across an `.await`, so every tunnel on the thread shares it.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

/// A failed copy step: reading from its source or writing to its destination.
#[derive(Debug)]
pub(super) enum Fault {
    Read(io::Error),
    Write(io::Error),
}

/// What one [`poll_step`] did.
#[derive(Debug)]
pub(super) enum Step {
    /// The source hung up.
    Eof,
    /// This many bytes went out whole.
    Copied(usize),
    /// `kept` bytes were to go out, but the destination took only part of them: `rest` must
    /// be written before anything more is read.
    Blocked { kept: usize, rest: Vec<u8> },
}

/// One read from `from` into the thread's scratch buffer, and as much of writing the bytes
/// out to `to` as `to` takes right now. `keep` sees the bytes read and says how many of them
/// go on (the others are dropped). Until `from` has something it is pending having consumed
/// nothing, so a `select!` may drop it at any time.
pub(super) fn poll_step<R, W>(
    cx: &mut Context<'_>,
    from: &mut R,
    to: &mut W,
    keep: impl FnOnce(&[u8]) -> usize,
) -> Poll<Result<Step, Fault>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    with_scratch(|buf| {
        let mut read = ReadBuf::new(&mut *buf);
        ready!(Pin::new(&mut *from).poll_read(cx, &mut read)).map_err(Fault::Read)?;
        let n = read.filled().len();
        if n == 0 {
            return Poll::Ready(Ok(Step::Eof));
        }
        let kept = keep(&buf[..n]).min(n);
        let mut written = 0;
        while written < kept {
            match Pin::new(&mut *to).poll_write(cx, &buf[written..kept]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(Fault::Write(io::ErrorKind::WriteZero.into()))),
                Poll::Ready(Ok(w)) => written += w,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Fault::Write(e))),
                Poll::Pending => break,
            }
        }
        // A socket's flush is a no-op; this is for writers that do buffer.
        if written == kept && Pin::new(&mut *to).poll_flush(cx).map_err(Fault::Write)?.is_ready() {
            return Poll::Ready(Ok(Step::Copied(kept)));
        }
        Poll::Ready(Ok(Step::Blocked { kept, rest: buf[written..kept].to_vec() }))
    })
}

/// Runs `f` on this thread's scratch buffer.
pub(super) fn with_scratch<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    // Polls never run during thread-local destruction, so `with` cannot fail here.
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        // Only if a copy ran inside another on this thread, which none does; a buffer of its
        // own keeps even that correct.
        Err(_) => f(&mut vec![0; SCRATCH_BYTES]),
    })
}

/// Writes and flushes `pending` whole, taking each chunk the destination accepts off its front
/// as it goes. Cancel-safe: dropped at any point, `pending` holds exactly the bytes not yet
/// written (this is what lets an upgrade park a tunnel whose destination is slow). Once all is
/// written `pending` is emptied for good, letting go of its allocation (hyper's read buffer,
/// for a tunnel's first bytes).
pub(super) async fn write_pending<W>(to: &mut W, pending: &mut Bytes) -> Result<(), Fault>
where
    W: AsyncWrite + Unpin,
{
    while !pending.is_empty() {
        let written = poll_fn(|cx| Pin::new(&mut *to).poll_write(cx, pending)).await.map_err(Fault::Write)?;
        if written == 0 {
            return Err(Fault::Write(io::ErrorKind::WriteZero.into()));
        }
        // In the same poll as the write that took them: a cancellation cannot fall in between.
        pending.advance(written);
    }
    *pending = Bytes::new();
    to.flush().await.map_err(Fault::Write)
}

/// Copies `from` into `to` until end of stream, after writing out `pending` (bytes of `from`
/// read but not yet written: hyper's early bytes, or what a parked tunnel had in flight);
/// returns the bytes written. Cancel-safe in the same way as [`write_pending`]: whatever was
/// read and not written when it is dropped is in `pending`.
pub(super) async fn pump<R, W>(pending: &mut Bytes, from: &mut R, to: &mut W) -> Result<u64, Fault>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        if !pending.is_empty() {
            let len = pending.len() as u64;
            Box::pin(write_pending(to, pending)).await?;
            total += len;
        }
        match poll_fn(|cx| poll_step(cx, from, to, <[u8]>::len)).await? {
            Step::Eof => return Ok(total),
            Step::Copied(n) => total += n as u64,
            Step::Blocked { kept, rest } => {
                total += (kept - rest.len()) as u64;
                *pending = Bytes::from(rest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn pump_copies_until_eof() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let (mut c, mut d) = tokio::io::duplex(64);
        let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let writer = {
            let payload = payload.clone();
            tokio::spawn(async move {
                a.write_all(&payload).await.unwrap();
            })
        };
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            d.read_to_end(&mut got).await.unwrap();
            got
        });
        let copied = pump(&mut Bytes::new(), &mut b, &mut c).await.unwrap();
        drop(c);
        writer.await.unwrap();
        assert_eq!(copied, payload.len() as u64);
        assert_eq!(reader.await.unwrap(), payload);
    }

    #[tokio::test]
    async fn bytes_read_before_the_tunnel_go_out_first() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let (mut c, mut d) = tokio::io::duplex(64);
        a.write_all(b" and after").await.unwrap();
        drop(a);
        let copied = pump(&mut Bytes::from_static(b"before"), &mut b, &mut c).await.unwrap();
        drop(c);
        let mut got = Vec::new();
        d.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"before and after");
        assert_eq!(copied, got.len() as u64);
    }
}
