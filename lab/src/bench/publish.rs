//! The publishers of `tether bench fanout`: one client per room, in the bench's own process,
//! each a member of its room too (a Tether client must be to publish; on Socket.IO they join
//! as well, so both systems do the same work).
//!
//! Messages are numbered over all rooms of a run: message `s` goes to room `s % rooms`, and its
//! text is [`protocol::text`]'s `t=SEND_MICROS;s=SEQ;…`. The publishers' own copies of their
//! messages are counted, and tallied by sequence number like the members' (see
//! [`Tally`](super::worker::Tally)).

use super::protocol::{self, Protocol};
use super::worker::{Tally, TallySummary};
use super::wsraw::{self, OP_PING, OP_PONG, OP_TEXT};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// What one call of [`Publishers::publish`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Published {
    /// Messages sent.
    pub sent: u64,
    /// Sequence numbers of the messages whose send stamp fell in the window asked for.
    pub window: (u64, u64),
    /// Largest delay between a message's due time at the asked rate and its sending.
    pub max_lag: Duration,
}

/// One publishing client per room.
pub struct Publishers {
    protocol: Protocol,
    /// Shared with each reader, which answers the server's pings through it.
    writers: Vec<(Arc<Mutex<OwnedWriteHalf>>, String)>,
    /// Room messages the publishers received (they are members of their rooms too).
    pub received: Arc<AtomicU64>,
    tally: Arc<RwLock<Option<Arc<Tally>>>>,
    next_seq: u64,
    stop: CancellationToken,
}

impl Publishers {
    /// One publisher per room, room `k`'s on `targets[k % len]`.
    pub async fn connect(
        protocol: Protocol,
        targets: &[SocketAddr],
        id_prefix: &str,
        rooms: &[String],
    ) -> Result<Self> {
        let received = Arc::new(AtomicU64::new(0));
        let tally: Arc<RwLock<Option<Arc<Tally>>>> = Arc::default();
        let stop = CancellationToken::new();
        let mut writers = Vec::with_capacity(rooms.len());
        for (k, room) in rooms.iter().enumerate() {
            let id = format!("{id_prefix}{k}");
            let target = targets[k % targets.len()];
            let up =
                tokio::time::timeout(Duration::from_secs(30), protocol.open(target, None, &id, Some(room), k as u64))
                    .await
                    .with_context(|| format!("publisher {id}: no join within 30 s"))??;
            let mut dec = up.decoder;
            let (mut read, write) = wsraw::into_tcp(up.stream)?.into_split();
            let write = Arc::new(Mutex::new(write));
            let (received, tally, stop, writer) =
                (Arc::clone(&received), Arc::clone(&tally), stop.clone(), Arc::clone(&write));
            let mask = wsraw::mask_for(k as u64);
            tokio::spawn(async move {
                let mut last_seq = None;
                let mut reply = Vec::new();
                loop {
                    let now = super::unix_micros();
                    let t = tally.read().unwrap_or_else(|p| p.into_inner()).clone();
                    while let Ok(Some(f)) = dec.next_frame() {
                        let p = dec.payload(&f);
                        if f.opcode == OP_PING {
                            wsraw::encode(&mut reply, OP_PONG, p, Some(mask));
                        } else if protocol.is_message(p) {
                            received.fetch_add(1, Ordering::Relaxed);
                            if let (Some(t), Some((sent, Some(seq)))) = (&t, protocol::stamp_and_seq(p)) {
                                if last_seq.is_some_and(|l| seq <= l) {
                                    t.repeat();
                                }
                                last_seq = Some(seq);
                                t.record(seq, sent, now);
                            }
                        } else if let Some(pong) = protocol.pong_for(p) {
                            wsraw::encode(&mut reply, OP_TEXT, pong, Some(mask));
                        }
                    }
                    if !reply.is_empty() {
                        if writer.lock().await.write_all(&reply).await.is_err() {
                            return;
                        }
                        reply.clear();
                    }
                    let n = tokio::select! {
                        _ = stop.cancelled() => return,
                        n = dec.read_from(&mut read, 16 * 1024) => n,
                    };
                    if !matches!(n, Ok(n) if n > 0) {
                        return;
                    }
                }
            });
            writers.push((write, room.clone()));
        }
        Ok(Self { protocol, writers, received, tally, next_seq: 0, stop })
    }

    /// The sequence number of the next message.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Starts tallying the publishers' own copies of `base..base + cap` (see [`Tally::new`]).
    pub fn track(&self, base: u64, cap: u64, from_us: u64, to_us: u64) {
        let t = Arc::new(Tally::new(base, cap, from_us, to_us));
        *self.tally.write().unwrap_or_else(|p| p.into_inner()) = Some(t);
    }

    /// What the publishers received of their own messages `lo..hi` (one copy each is due).
    pub fn tally(&self, lo: u64, hi: u64) -> TallySummary {
        match self.tally.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(t) => t.summary(lo, hi, |_| 1),
            None => TallySummary { messages: hi.saturating_sub(lo), ..TallySummary::default() },
        }
    }

    /// Sends `rate` messages per second for `dur`, round robin over the rooms, in 1 ms batches.
    /// `window` (unix µs, `from..to`) picks out the sequence numbers sent in it.
    pub async fn publish(&mut self, rate: f64, dur: Duration, window: Option<(u64, u64)>) -> Result<Published> {
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let n = self.writers.len() as u64;
        let mut out = Published { window: (self.next_seq, self.next_seq), ..Published::default() };
        let (mut lo, mut hi) = (None, None);
        let mut frame = Vec::with_capacity(256);
        loop {
            tick.tick().await;
            let elapsed = started.elapsed();
            if elapsed >= dur {
                break;
            }
            let due = (elapsed.as_secs_f64() * rate) as u64;
            while out.sent < due {
                let seq = self.next_seq;
                let (w, room) = &self.writers[(seq % n) as usize];
                let now = super::unix_micros();
                if let Some((from, to)) = window {
                    if now >= from && lo.is_none() {
                        lo = Some(seq);
                    }
                    if now >= to && hi.is_none() {
                        hi = Some(seq);
                    }
                }
                let due_at = Duration::from_secs_f64(out.sent as f64 / rate);
                out.max_lag = out.max_lag.max(started.elapsed().saturating_sub(due_at));
                let text = protocol::text(now, seq, super::TEXT_BYTES);
                frame.clear();
                let payload = self.protocol.message(room, &text);
                wsraw::encode(&mut frame, OP_TEXT, payload.as_bytes(), Some(wsraw::mask_for(seq)));
                w.lock().await.write_all(&frame).await.context("publishing")?;
                out.sent += 1;
                self.next_seq += 1;
            }
        }
        let end = self.next_seq;
        out.window = (lo.unwrap_or(end), hi.unwrap_or(end));
        Ok(out)
    }

    pub fn close(self) {
        self.stop.cancel();
    }
}
