//! Load-generator child processes: `tether bench worker` (hidden) and the parent's [`Fleet`].
//!
//! One process may hold at most 20,000 descriptors here, and the servers we measure need
//! tens of thousands of clients, so clients live in child processes of at most
//! [`MAX_PER_WORKER`](super::MAX_PER_WORKER) connections each, every child binding its own
//! 127.0.x.y source addresses. The parent re-runs its own executable as
//! `tether bench worker --spec JSON`; the spec says which ids to connect as, where, from which
//! addresses, and whether to join a room.
//!
//! The protocol is line-based JSON on the child's stdout ([`Report`]) and plain words on its
//! stdin: while connecting it reports `progress` twice a second, then `ready` once every
//! connection was tried; afterwards `stats` asks for the counters and the latency histogram of
//! received room messages (`swap` does the same and zeroes them), and `close` — or EOF, when
//! the parent dies — makes it exit.
//!
//! A client counts as open after its `101` (idle) or once its own `user_joined` came back
//! (rooms): then the room's subscription on its node is live.
//!
//! The steady mode (`tether bench fanout --steady`) accounts for every message: `track BASE
//! CAP FROM TO` starts a [`Tally`] of the receipts of sequence numbers `BASE..BASE + CAP`
//! (latencies only of messages sent in the unix-µs window `FROM..TO`), answered `tracking`;
//! `tally LO HI` answers what was received of `LO..HI` against what this worker's clients
//! should have received ([`TallySummary`]).

use super::args::WorkerArgs;
use super::protocol::{self, Protocol};
use super::tls::{ClientTls, TlsSpec};
use super::wsraw::{self, Decoder, Upgraded, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT};
use super::{tether_exe, AtomicHist};
use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tether_kit::ChildProcess;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

/// Read size of a busy client.
const READ_CHUNK: usize = 8192;
/// Errors a worker quotes in its `ready` report (the rest are only counted).
const ERRORS_KEPT: usize = 5;
/// Most sequence numbers one [`Tally`] tracks (4 bytes each).
pub const MAX_TRACKED: u64 = 20_000_000;
/// Most runs of short-delivered sequence numbers one [`TallySummary`] lists.
const SHORT_RUNS_KEPT: usize = 10_000;

/// What one worker does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Client `i` connects to `targets[i % len]` — with `rooms`, to `targets[(i / rooms) %
    /// len]`, so that each room's members (`i % rooms` equal) are spread over the targets.
    pub targets: Vec<SocketAddr>,
    /// Client `i` binds `sources[i % len]` (empty: the kernel's choice).
    pub sources: Vec<IpAddr>,
    /// Client ids are `{id_prefix}{i}` for `i` in `first..first + count`.
    pub id_prefix: String,
    pub first: u64,
    pub count: u64,
    /// Connections being set up at once.
    pub concurrency: usize,
    /// When set, client `i` joins room `{prefix}{i % count}`.
    pub rooms: Option<RoomSpec>,
    /// Deadline of one connection's upgrade (and join).
    pub connect_timeout_ms: u64,
    /// What the clients speak.
    #[serde(default)]
    pub protocol: Protocol,
    /// Speak `wss`: the CA to trust and whether to resume sessions (`tether bench proxies
    /// --tls`). Absent: plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

impl WorkerSpec {
    /// Which of `targets` client `i` connects to (see [`WorkerSpec::targets`]).
    pub fn target_of(&self, i: u64) -> usize {
        let turn = self.rooms.as_ref().map_or(i, |r| i / r.count.max(1));
        (turn % self.targets.len().max(1) as u64) as usize
    }

    /// How many of this worker's clients are members of room `r` of `rooms`.
    pub fn members_of(&self, r: u64, rooms: u64) -> u64 {
        let rooms = rooms.max(1);
        // Clients `first..first + count`; client `i` is in room `i % rooms`.
        let (a, b) = (self.first, self.first + self.count);
        let below = |n: u64| n / rooms + u64::from(n % rooms > r);
        below(b) - below(a)
    }
}

/// Room membership of a worker's clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomSpec {
    pub prefix: String,
    pub count: u64,
}

/// One line of a worker's stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    Progress {
        open: u64,
        failed: u64,
    },
    Ready {
        open: u64,
        failed: u64,
        errors: Vec<String>,
        elapsed_ms: u64,
    },
    Stats(WorkerStats),
    /// The answer to `track`.
    Tracking,
    /// The answer to `tally`.
    Tally(TallySummary),
}

/// Receipts of one step's messages, by sequence number (the steady mode's accounting).
#[derive(Debug)]
pub struct Tally {
    base: u64,
    counts: Vec<AtomicU32>,
    /// Unix-µs window of send stamps whose latencies are recorded.
    from_us: u64,
    to_us: u64,
    hist: AtomicHist,
    /// Receipts of a sequence number not above the one the same client received before.
    repeats: AtomicU64,
}

impl Tally {
    /// Tracks sequence numbers `base..base + cap` (at most [`MAX_TRACKED`]).
    pub fn new(base: u64, cap: u64, from_us: u64, to_us: u64) -> Self {
        let cap = cap.min(MAX_TRACKED) as usize;
        Self {
            base,
            counts: (0..cap).map(|_| AtomicU32::new(0)).collect(),
            from_us,
            to_us,
            hist: AtomicHist::default(),
            repeats: AtomicU64::new(0),
        }
    }

    /// One client received message `seq`, sent at `sent`, at `now` (unix µs).
    pub fn record(&self, seq: u64, sent: u64, now: u64) {
        let Some(count) = seq.checked_sub(self.base).and_then(|k| self.counts.get(usize::try_from(k).ok()?)) else {
            return;
        };
        count.fetch_add(1, Ordering::Relaxed);
        if (self.from_us..self.to_us).contains(&sent) {
            self.hist.record(now.saturating_sub(sent));
        }
    }

    /// A client received a sequence number not above its previous one.
    pub fn repeat(&self) {
        self.repeats.fetch_add(1, Ordering::Relaxed);
    }

    /// Receipts of `lo..hi` against `expected(seq)` receipts each.
    pub fn summary(&self, lo: u64, hi: u64, expected: impl Fn(u64) -> u64) -> TallySummary {
        let mut s = TallySummary {
            messages: hi.saturating_sub(lo),
            repeats: self.repeats.load(Ordering::Relaxed),
            hist: self.hist.snapshot(false),
            ..TallySummary::default()
        };
        for seq in lo..hi {
            let want = expected(seq);
            let got = seq
                .checked_sub(self.base)
                .and_then(|k| self.counts.get(usize::try_from(k).ok()?))
                .map_or(0, |c| u64::from(c.load(Ordering::Relaxed)));
            s.expected += want;
            s.received += got.min(want);
            s.duplicates += got.saturating_sub(want);
            if got < want {
                let full = s.short.len() >= SHORT_RUNS_KEPT;
                match s.short.last_mut() {
                    Some(run) if run.1 == seq => run.1 = seq + 1,
                    _ if full => s.short_truncated = true,
                    _ => s.short.push((seq, seq + 1)),
                }
                s.short_messages += 1;
            }
        }
        s
    }
}

/// What a worker (or a fleet, or the publishers) received of one step's messages.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TallySummary {
    /// Sequence numbers asked about.
    pub messages: u64,
    /// Deliveries due, and received (at most the due count per message).
    pub expected: u64,
    pub received: u64,
    /// Receipts beyond the due count of their message.
    pub duplicates: u64,
    /// Receipts by a client of a sequence number not above its previous one.
    pub repeats: u64,
    /// Messages received fewer times than due, and as runs `[from, to)` of sequence numbers
    /// (the first [`SHORT_RUNS_KEPT`]; `short_truncated` says more were left out).
    pub short_messages: u64,
    pub short: Vec<(u64, u64)>,
    pub short_truncated: bool,
    /// Latencies of the messages sent in the window, µs, as `(bucket value, count)`.
    pub hist: Vec<(u64, u64)>,
}

impl TallySummary {
    /// Adds another worker's summary of the same sequence numbers.
    pub fn add(&mut self, o: &TallySummary) {
        self.messages = self.messages.max(o.messages);
        self.expected += o.expected;
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.repeats += o.repeats;
        self.short_truncated |= o.short_truncated;
        self.short.extend_from_slice(&o.short);
        self.hist.extend_from_slice(&o.hist);
        // Count the union of the runs: a message short at two workers is one message.
        self.short.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.short.len());
        for &(a, b) in &self.short {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.short_messages = if self.short_truncated {
            self.short_messages.max(o.short_messages)
        } else {
            merged.iter().map(|(a, b)| b - a).sum()
        };
        self.short = merged;
    }
}

/// Counters of one worker (or, summed, of a fleet).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Connections open now.
    pub open: u64,
    /// Connections the server (or a proxy) closed since they opened.
    pub closed: u64,
    /// Data frames received.
    pub frames: u64,
    /// Room `message` frames received.
    pub messages: u64,
    /// End-to-end latency of those messages (send stamp in the text → receipt), µs, as
    /// `(bucket value, count)`.
    pub hist: Vec<(u64, u64)>,
}

impl WorkerStats {
    fn add(&mut self, o: &WorkerStats) {
        self.open += o.open;
        self.closed += o.closed;
        self.frames += o.frames;
        self.messages += o.messages;
        self.hist.extend_from_slice(&o.hist);
    }
}

#[derive(Default)]
struct Shared {
    open: AtomicU64,
    failed: AtomicU64,
    closed: AtomicU64,
    frames: AtomicU64,
    messages: AtomicU64,
    hist: AtomicHist,
    errors: Mutex<Vec<String>>,
    stop: CancellationToken,
    /// The steady mode's current step, if any.
    tally: RwLock<Option<Arc<Tally>>>,
}

impl Shared {
    fn note_error(&self, e: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() < ERRORS_KEPT {
            errors.push(e);
        }
    }

    fn tally(&self) -> Option<Arc<Tally>> {
        self.tally.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn stats(&self, reset: bool) -> WorkerStats {
        let take = |a: &AtomicU64| if reset { a.swap(0, Ordering::Relaxed) } else { a.load(Ordering::Relaxed) };
        WorkerStats {
            open: self.open.load(Ordering::Relaxed),
            closed: self.closed.load(Ordering::Relaxed),
            frames: take(&self.frames),
            messages: take(&self.messages),
            hist: self.hist.snapshot(reset),
        }
    }
}

fn emit(report: &Report) {
    if let Ok(line) = serde_json::to_string(report) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// `tether bench worker --spec JSON`.
pub async fn run_cli(args: WorkerArgs) -> Result<i32> {
    let spec: WorkerSpec = serde_json::from_str(&args.spec).context("--spec is not a worker spec")?;
    run(spec).await
}

/// The worker: connect everything, report, then answer commands until `close` or EOF.
pub async fn run(spec: WorkerSpec) -> Result<i32> {
    if spec.targets.is_empty() {
        bail!("a worker needs at least one target");
    }
    let shared = Arc::new(Shared::default());
    // One client config for all connections (sessions, when resumed, are shared through it).
    let tls = spec.tls.as_ref().map(ClientTls::new).transpose()?;
    let started = Instant::now();
    let opening = {
        let (shared, spec, tls) = (Arc::clone(&shared), spec.clone(), tls.clone());
        async move {
            futures_util::stream::iter(spec.first..spec.first + spec.count)
                .for_each_concurrent(spec.concurrency.max(1), |i| open_one(&spec, i, &shared, tls.as_ref()))
                .await;
        }
    };
    tokio::pin!(opening);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = &mut opening => break,
            _ = tick.tick() => emit(&Report::Progress {
                open: shared.open.load(Ordering::Relaxed),
                failed: shared.failed.load(Ordering::Relaxed),
            }),
        }
    }
    let errors = shared.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    emit(&Report::Ready {
        open: shared.open.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        errors,
        elapsed_ms: started.elapsed().as_millis() as u64,
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let nums: Vec<u64> = words.iter().skip(1).filter_map(|w| w.parse().ok()).collect();
        match (words.first().copied(), nums.as_slice()) {
            (Some("stats"), _) => emit(&Report::Stats(shared.stats(false))),
            (Some("swap"), _) => emit(&Report::Stats(shared.stats(true))),
            (Some("track"), &[base, cap, from, to]) => {
                let tally = Arc::new(Tally::new(base, cap, from, to));
                *shared.tally.write().unwrap_or_else(|p| p.into_inner()) = Some(tally);
                emit(&Report::Tracking);
            }
            (Some("tally"), &[lo, hi]) => {
                let rooms = spec.rooms.as_ref().map_or(1, |r| r.count.max(1));
                let summary = match shared.tally() {
                    Some(t) => t.summary(lo, hi, |seq| spec.members_of(seq % rooms, rooms)),
                    None => TallySummary::default(),
                };
                emit(&Report::Tally(summary));
            }
            (Some("close"), _) => break,
            _ => {}
        }
    }
    shared.stop.cancel();
    Ok(0)
}

async fn open_one(spec: &WorkerSpec, i: u64, shared: &Arc<Shared>, tls: Option<&ClientTls>) {
    let id = format!("{}{i}", spec.id_prefix);
    let target = spec.targets[spec.target_of(i)];
    let source = (!spec.sources.is_empty()).then(|| spec.sources[(i % spec.sources.len() as u64) as usize]);
    let room = spec.rooms.as_ref().map(|r| format!("{}{}", r.prefix, i % r.count.max(1)));
    let attempt = spec.protocol.open_with(target, source, &id, room.as_deref(), i, tls);
    match tokio::time::timeout(Duration::from_millis(spec.connect_timeout_ms), attempt).await {
        Ok(Ok(up)) => {
            shared.open.fetch_add(1, Ordering::Relaxed);
            let parse = room.is_some().then_some(spec.protocol);
            tokio::spawn(hold(up, i, Arc::clone(shared), parse));
        }
        Ok(Err(e)) => shared.note_error(format!("{id} → {target}: {e:#}")),
        Err(_) => shared.note_error(format!("{id} → {target}: no upgrade/join within {} ms", spec.connect_timeout_ms)),
    }
}

/// Holds one connection open: answers pings, counts frames, timestamps room messages (when
/// `parse` says in which protocol they come) and tallies their sequence numbers.
async fn hold(mut up: Upgraded, i: u64, shared: Arc<Shared>, parse: Option<Protocol>) {
    let mut out = Vec::new();
    // The last sequence number this client received (its room's messages come in order).
    let mut last_seq = None;
    let ended = loop {
        let now = super::unix_micros();
        let mut frames = 0;
        let tally = if parse.is_some() { shared.tally() } else { None };
        loop {
            match up.decoder.next_frame() {
                Ok(Some(f)) => match f.opcode {
                    OP_PING => wsraw::encode(&mut out, OP_PONG, up.decoder.payload(&f), Some(wsraw::mask_for(i))),
                    OP_CLOSE => break,
                    OP_PONG => {}
                    OP_CONTINUATION | OP_TEXT | wsraw::OP_BINARY => {
                        frames += 1;
                        let p = up.decoder.payload(&f);
                        let Some(proto) = parse else { continue };
                        if proto.is_message(p) {
                            shared.messages.fetch_add(1, Ordering::Relaxed);
                            if let Some((sent, seq)) = protocol::stamp_and_seq(p) {
                                shared.hist.record(now.saturating_sub(sent));
                                if let (Some(t), Some(seq)) = (&tally, seq) {
                                    if last_seq.is_some_and(|l| seq <= l) {
                                        t.repeat();
                                    }
                                    last_seq = Some(seq);
                                    t.record(seq, sent, now);
                                }
                            }
                        } else if let Some(pong) = proto.pong_for(p) {
                            wsraw::encode(&mut out, OP_TEXT, pong, Some(wsraw::mask_for(i)));
                        }
                    }
                    _ => {}
                },
                Ok(None) => break,
                Err(_) => break,
            }
        }
        if frames > 0 {
            shared.frames.fetch_add(frames, Ordering::Relaxed);
        }
        if !out.is_empty() {
            if wsraw::send(&mut up.stream, &out).await.is_err() {
                break true;
            }
            out.clear();
        }
        if let (0, Either::Left(tcp)) = (up.decoder.pending(), &up.stream) {
            // Idle clients wait without a read buffer: tens of thousands of them per worker.
            // (Not over TLS: the session may hold decrypted bytes the socket no longer shows.)
            up.decoder = Decoder::default();
            tokio::select! {
                _ = shared.stop.cancelled() => break false,
                r = tcp.readable() => if r.is_err() { break true },
            }
        }
        let read = tokio::select! {
            _ = shared.stop.cancelled() => break false,
            r = up.decoder.read_from(&mut up.stream, READ_CHUNK) => r,
        };
        if !matches!(read, Ok(n) if n > 0) {
            break true;
        }
    };
    if ended {
        shared.open.fetch_sub(1, Ordering::Relaxed);
        shared.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a fleet reports once every worker tried all its connections.
#[derive(Debug, Clone, Default)]
pub struct Opened {
    pub open: u64,
    pub failed: u64,
    /// A few of the errors, as the workers quoted them.
    pub errors: Vec<String>,
    pub elapsed: Duration,
}

struct WorkerProc {
    proc: ChildProcess,
    reports: mpsc::UnboundedReceiver<Report>,
    last: (u64, u64),
    ready: bool,
}

/// The parent's handle on a set of workers.
pub struct Fleet {
    workers: Vec<WorkerProc>,
}

impl Fleet {
    /// Starts one worker per spec and waits until each has tried all its connections (at most
    /// `within`), printing aggregated progress to `out` every second.
    pub async fn start<W: Write>(specs: Vec<WorkerSpec>, within: Duration, out: &mut W) -> Result<(Self, Opened)> {
        let exe = tether_exe()?;
        let total: u64 = specs.iter().map(|s| s.count).sum();
        let mut workers = Vec::with_capacity(specs.len());
        for (k, spec) in specs.iter().enumerate() {
            let mut cmd = Command::new(&exe);
            cmd.args(["bench", "worker", "--spec"])
                .arg(serde_json::to_string(spec)?)
                // One runtime thread per worker: there are several, on a machine with few cores.
                .env("TOKIO_WORKER_THREADS", "1")
                .stderr(std::process::Stdio::inherit());
            let mut proc = ChildProcess::spawn_piped(&format!("worker-{}", k + 1), cmd)?;
            let mut lines = proc.take_stdout().ok_or_else(|| anyhow!("worker stdout not piped"))?;
            let (tx, reports) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(report) = serde_json::from_str::<Report>(&line) {
                        if tx.send(report).is_err() {
                            return;
                        }
                    }
                }
            });
            workers.push(WorkerProc { proc, reports, last: (0, 0), ready: false });
        }
        let mut fleet = Self { workers };
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + within;
        let mut errors = Vec::new();
        let mut printed = Instant::now();
        let mut printed_open = 0;
        while fleet.workers.iter().any(|w| !w.ready) {
            let next = async {
                // Poll all workers: whichever reports first.
                let waits = fleet
                    .workers
                    .iter_mut()
                    .enumerate()
                    .filter(|(_, w)| !w.ready)
                    .map(|(k, w)| Box::pin(async move { (k, w.reports.recv().await) }));
                futures_util::future::select_all(waits).await.0
            };
            let (k, report) = tokio::time::timeout_at(deadline, next)
                .await
                .map_err(|_| anyhow!("load generators did not finish connecting within {within:?}"))?;
            let w = &mut fleet.workers[k];
            match report {
                Some(Report::Progress { open, failed }) => w.last = (open, failed),
                Some(Report::Ready { open, failed, errors: e, .. }) => {
                    w.last = (open, failed);
                    w.ready = true;
                    errors.extend(e);
                }
                Some(Report::Stats(_) | Report::Tracking | Report::Tally(_)) => {}
                None => {
                    let status = w.proc.wait().await.map(|s| s.to_string()).unwrap_or_default();
                    bail!("{} exited while connecting ({status})", w.proc.label());
                }
            }
            if printed.elapsed() >= Duration::from_secs(1) {
                let (open, failed) = fleet.totals();
                let rate = (open - printed_open.min(open)) as f64 / printed.elapsed().as_secs_f64();
                writeln!(out, "  connecting: {open}/{total} open, {failed} failed ({rate:.0}/s)")?;
                out.flush()?;
                printed = Instant::now();
                printed_open = open;
            }
        }
        let (open, failed) = fleet.totals();
        errors.truncate(ERRORS_KEPT);
        Ok((fleet, Opened { open, failed, errors, elapsed: started.elapsed() }))
    }

    fn totals(&self) -> (u64, u64) {
        self.workers.iter().fold((0, 0), |(o, f), w| (o + w.last.0, f + w.last.1))
    }

    /// The workers' pids (for their CPU time).
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.proc.pid()).collect()
    }

    /// Counters and latencies summed over the workers; `reset` zeroes frame counts and
    /// histograms afterwards.
    pub async fn stats(&mut self, reset: bool) -> Result<WorkerStats> {
        let word = if reset { "swap" } else { "stats" };
        let mut sum = WorkerStats::default();
        for s in self.ask(word, |r| if let Report::Stats(s) = r { Ok(s) } else { Err(r) }).await? {
            sum.add(&s);
        }
        Ok(sum)
    }

    /// Starts every worker's [`Tally`] of sequence numbers `base..base + cap`, latencies of
    /// messages sent at unix µs `from..to`; returns once all of them track.
    pub async fn track(&mut self, base: u64, cap: u64, from: u64, to: u64) -> Result<()> {
        let word = format!("track {base} {cap} {from} {to}");
        self.ask(&word, |r| if let Report::Tracking = r { Ok(()) } else { Err(r) }).await?;
        Ok(())
    }

    /// What the workers' clients received of sequence numbers `lo..hi`, summed.
    pub async fn tally(&mut self, lo: u64, hi: u64) -> Result<TallySummary> {
        let mut sum = TallySummary { messages: hi.saturating_sub(lo), ..TallySummary::default() };
        let word = format!("tally {lo} {hi}");
        for s in self.ask(&word, |r| if let Report::Tally(s) = r { Ok(s) } else { Err(r) }).await? {
            sum.add(&s);
        }
        Ok(sum)
    }

    /// Sends `word` to every worker, then waits for each one's answer (the first report that
    /// `pick` accepts; others are skipped).
    async fn ask<T>(&mut self, word: &str, pick: impl Fn(Report) -> Result<T, Report>) -> Result<Vec<T>> {
        let line = format!("{word}\n");
        for w in &mut self.workers {
            let label = w.proc.label().to_owned();
            let stdin = w.proc.stdin_mut().ok_or_else(|| anyhow!("{label}: stdin closed"))?;
            stdin.write_all(line.as_bytes()).await.with_context(|| format!("{label}: sending `{word}`"))?;
            stdin.flush().await?;
        }
        let mut answers = Vec::with_capacity(self.workers.len());
        for w in &mut self.workers {
            let answer = tokio::time::timeout(Duration::from_secs(15), async {
                loop {
                    match w.reports.recv().await {
                        Some(r) => {
                            if let Ok(t) = pick(r) {
                                return Ok(t);
                            }
                        }
                        None => bail!("{} exited", w.proc.label()),
                    }
                }
            })
            .await
            .map_err(|_| anyhow!("{}: no answer to `{word}` within 15 s", w.proc.label()))??;
            answers.push(answer);
        }
        Ok(answers)
    }

    /// Tells every worker to close its connections and exit; kills stragglers.
    pub async fn close(mut self) {
        for w in &mut self.workers {
            if let Some(stdin) = w.proc.stdin_mut() {
                let _ = stdin.write_all(b"close\n").await;
            }
        }
        for w in &mut self.workers {
            w.proc.stop(Duration::from_secs(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(first: u64, count: u64, rooms: u64, targets: usize) -> WorkerSpec {
        WorkerSpec {
            targets: (0..targets).map(|k| SocketAddr::from(([127, 0, 0, 1], 9000 + k as u16))).collect(),
            sources: Vec::new(),
            id_prefix: "m".to_owned(),
            first,
            count,
            concurrency: 1,
            rooms: Some(RoomSpec { prefix: "r".to_owned(), count: rooms }),
            connect_timeout_ms: 1,
            protocol: Protocol::SocketIo,
            tls: None,
        }
    }

    #[test]
    fn every_room_has_members_on_every_target() {
        // 10 rooms on 2 nodes: `i % 2` would put all of room r's members on node r % 2.
        let s = spec(0, 1000, 10, 2);
        for room in 0..10 {
            let mut per_target = [0; 2];
            for i in (0..1000).filter(|i| i % 10 == room) {
                per_target[s.target_of(i)] += 1;
            }
            assert_eq!(per_target, [50, 50], "room {room}");
        }
        let idle = WorkerSpec { rooms: None, ..spec(0, 10, 1, 3) };
        assert_eq!((0..6).map(|i| idle.target_of(i)).collect::<Vec<_>>(), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn members_of_counts_a_workers_share_of_each_room() {
        let (a, b) = (spec(0, 503, 10, 1), spec(503, 497, 10, 1));
        for r in 0..10 {
            assert_eq!(a.members_of(r, 10) + b.members_of(r, 10), 100, "room {r}");
        }
        assert_eq!(a.members_of(2, 10), 51);
        assert_eq!(a.members_of(3, 10), 50);
    }

    #[test]
    fn tallies_find_missing_duplicate_and_untracked_messages() {
        let t = Tally::new(100, 10, 1_000, 2_000);
        // Two receipts are due per message; 103 is missed once, 104 twice, 105 got three, and
        // 101 a third one sent outside the latency window.
        for seq in 100..110 {
            let times = match seq {
                103 => 1,
                104 => 0,
                105 => 3,
                _ => 2,
            };
            for _ in 0..times {
                t.record(seq, 1_500, 1_600);
            }
        }
        t.record(99, 1_500, 1_600);
        t.record(110, 1_500, 1_600);
        t.record(101, 2_500, 2_600);
        let s = t.summary(100, 110, |_| 2);
        assert_eq!((s.messages, s.expected, s.received, s.duplicates), (10, 20, 17, 2));
        assert_eq!((s.short_messages, s.short.clone()), (2, vec![(103, 105)]));
        // Latencies: only stamps in 1000..2000 (the 2500 one is outside the window).
        assert_eq!(s.hist.iter().map(|p| p.1).sum::<u64>(), 18);
        // Another worker short on 104..107: the union is 103..107, four messages.
        let mut sum = s.clone();
        sum.add(&TallySummary {
            messages: 10,
            expected: 20,
            received: 17,
            short_messages: 3,
            short: vec![(104, 107)],
            ..TallySummary::default()
        });
        assert_eq!((sum.expected, sum.received, sum.short_messages), (40, 34, 4));
        assert_eq!(sum.short, vec![(103, 107)]);
    }
}
