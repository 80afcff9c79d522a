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

use super::wsraw::{self, Decoder, Upgraded, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT};
use super::{tether_exe, AtomicHist, ChildProc};
use crate::args::WorkerArgs;
use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Read size of a busy client.
const READ_CHUNK: usize = 8192;
/// Errors a worker quotes in its `ready` report (the rest are only counted).
const ERRORS_KEPT: usize = 5;

/// What one worker does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Client `i` connects to `targets[i % len]`.
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
    Progress { open: u64, failed: u64 },
    Ready { open: u64, failed: u64, errors: Vec<String>, elapsed_ms: u64 },
    Stats(WorkerStats),
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
}

impl Shared {
    fn note_error(&self, e: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() < ERRORS_KEPT {
            errors.push(e);
        }
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
    let started = Instant::now();
    let opening = {
        let (shared, spec) = (Arc::clone(&shared), spec.clone());
        async move {
            futures_util::stream::iter(spec.first..spec.first + spec.count)
                .for_each_concurrent(spec.concurrency.max(1), |i| open_one(&spec, i, &shared))
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
        match line.trim() {
            "stats" => emit(&Report::Stats(shared.stats(false))),
            "swap" => emit(&Report::Stats(shared.stats(true))),
            "close" => break,
            _ => {}
        }
    }
    shared.stop.cancel();
    Ok(0)
}

async fn open_one(spec: &WorkerSpec, i: u64, shared: &Arc<Shared>) {
    let id = format!("{}{i}", spec.id_prefix);
    let target = spec.targets[(i % spec.targets.len() as u64) as usize];
    let source = (!spec.sources.is_empty()).then(|| spec.sources[(i % spec.sources.len() as u64) as usize]);
    let room = spec.rooms.as_ref().map(|r| format!("{}{}", r.prefix, i % r.count.max(1)));
    let attempt = async {
        let mut up = wsraw::connect(target, source, &format!("/ws?client={id}")).await?;
        if let Some(room) = &room {
            join(&mut up, &id, room, i).await?;
        }
        Ok::<_, anyhow::Error>(up)
    };
    match tokio::time::timeout(Duration::from_millis(spec.connect_timeout_ms), attempt).await {
        Ok(Ok(up)) => {
            shared.open.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(hold(up, i, Arc::clone(shared), room.is_some()));
        }
        Ok(Err(e)) => shared.note_error(format!("{id} → {target}: {e:#}")),
        Err(_) => shared.note_error(format!("{id} → {target}: no upgrade/join within {} ms", spec.connect_timeout_ms)),
    }
}

/// Sends `join` and reads until this client's own `user_joined`.
pub(crate) async fn join(up: &mut Upgraded, id: &str, room: &str, i: u64) -> Result<()> {
    let mut out = Vec::with_capacity(64);
    let join = format!(r#"{{"type":"join","room":"{room}"}}"#);
    wsraw::encode(&mut out, OP_TEXT, join.as_bytes(), Some(wsraw::mask_for(i)));
    up.stream.write_all(&out).await?;
    let mine = format!("\"id\":\"{id}\"");
    loop {
        while let Some(f) = up.decoder.next_frame()? {
            let p = up.decoder.payload(&f);
            if f.opcode == OP_CLOSE {
                bail!("closed while joining");
            }
            if p.starts_with(b"{\"type\":\"user_joined\"") && wsraw::find(p, mine.as_bytes()).is_some() {
                return Ok(());
            }
            if p.starts_with(b"{\"type\":\"error\"") {
                bail!("join refused: {}", String::from_utf8_lossy(p));
            }
        }
        if up.decoder.read_from(&mut up.stream, READ_CHUNK).await? == 0 {
            bail!("closed while joining");
        }
    }
}

/// Holds one connection open: answers pings, counts frames, timestamps room messages.
async fn hold(mut up: Upgraded, i: u64, shared: Arc<Shared>, parse: bool) {
    let mut out = Vec::new();
    let ended = loop {
        let now = super::unix_micros();
        let mut frames = 0;
        loop {
            match up.decoder.next_frame() {
                Ok(Some(f)) => match f.opcode {
                    OP_PING => wsraw::encode(&mut out, OP_PONG, up.decoder.payload(&f), Some(wsraw::mask_for(i))),
                    OP_CLOSE => break,
                    OP_PONG => {}
                    OP_CONTINUATION | OP_TEXT | wsraw::OP_BINARY => {
                        frames += 1;
                        let p = up.decoder.payload(&f);
                        if parse && p.starts_with(b"{\"type\":\"message\"") {
                            shared.messages.fetch_add(1, Ordering::Relaxed);
                            if let Some(sent) = super::stamp_in(p) {
                                shared.hist.record(now.saturating_sub(sent));
                            }
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
            if up.stream.write_all(&out).await.is_err() {
                break true;
            }
            out.clear();
        }
        if up.decoder.pending() == 0 {
            // Idle clients wait without a read buffer: tens of thousands of them per worker.
            up.decoder = Decoder::default();
            tokio::select! {
                _ = shared.stop.cancelled() => break false,
                r = up.stream.readable() => if r.is_err() { break true },
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
    proc: ChildProc,
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
            let mut proc = ChildProc::spawn(&format!("worker-{}", k + 1), cmd)?;
            let mut lines = proc.stdout.take().ok_or_else(|| anyhow!("worker stdout not piped"))?;
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
                Some(Report::Stats(_)) => {}
                None => {
                    let status = w.proc.child.wait().await.map(|s| s.to_string()).unwrap_or_default();
                    bail!("{} exited while connecting ({status})", w.proc.label);
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
        self.workers.iter().map(|w| w.proc.pid).collect()
    }

    /// Counters and latencies summed over the workers; `reset` zeroes frame counts and
    /// histograms afterwards.
    pub async fn stats(&mut self, reset: bool) -> Result<WorkerStats> {
        let word: &[u8] = if reset { b"swap\n" } else { b"stats\n" };
        for w in &mut self.workers {
            let stdin = w.proc.stdin.as_mut().ok_or_else(|| anyhow!("{}: stdin closed", w.proc.label))?;
            stdin.write_all(word).await.with_context(|| format!("{}: asking for stats", w.proc.label))?;
            stdin.flush().await?;
        }
        let mut sum = WorkerStats::default();
        for w in &mut self.workers {
            let stats = tokio::time::timeout(Duration::from_secs(15), async {
                loop {
                    match w.reports.recv().await {
                        Some(Report::Stats(s)) => return Ok(s),
                        Some(_) => {}
                        None => bail!("{} exited", w.proc.label),
                    }
                }
            })
            .await
            .map_err(|_| anyhow!("{}: no stats within 15 s", w.proc.label))??;
            sum.add(&stats);
        }
        Ok(sum)
    }

    /// Tells every worker to close its connections and exit; kills stragglers.
    pub async fn close(mut self) {
        for w in &mut self.workers {
            if let Some(stdin) = w.proc.stdin.as_mut() {
                let _ = stdin.write_all(b"close\n").await;
            }
        }
        for w in &mut self.workers {
            w.proc.stop(Duration::from_secs(10)).await;
        }
    }
}
