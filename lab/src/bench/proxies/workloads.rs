//! The workloads of `tether bench proxies`, each against one running target: (d) idle tunnels,
//! (a) closed-loop echo, (b) echo at a fixed rate, (c) connection setup — at saturation and,
//! when asked (`--connect-rate`, on by default with `--tls`), at a fixed rate, where each
//! set-up's hand-shake latency and the proxy's CPU per set-up are what users size by.
//!
//! Every client goes over the target's [`Target::tls`] when it has one (`wss`), else plain.

use super::targets::{Endpoint, Target};
use super::ProxiesOptions;
use crate::bench::procfs::{self, CpuMeter};
use crate::bench::tls::{self, TlsSpec};
use crate::bench::worker::{Fleet, WorkerSpec};
use crate::bench::wsraw::{self, Decoder, OP_BINARY, OP_CLOSE};
use crate::bench::{new_histogram, source_addrs, split, Latency, MAX_PER_WORKER};
use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::either::Either;

/// Source addresses for in-process load (disjoint from the workers' 127.0.10+.x).
pub(super) fn local_sources(slot: usize, n: usize) -> Vec<IpAddr> {
    source_addrs(150 + slot % 50, n)
}

/// (d): RSS growth of the proxy per idle tunnel (the backend's for direct, as a reference).
pub(super) async fn idle<W: Write>(
    t: &Target,
    n: usize,
    tls: Option<&TlsSpec>,
    out: &mut W,
) -> Result<(Option<f64>, u64)> {
    // The workers speak TLS to a target that has it (never to direct).
    let tls = t.tls.as_ref().and(tls).cloned();
    let pid = t.pid;
    let before = pid.map(procfs::rss_kib).transpose()?;
    let tag = format!("{}-{}", std::process::id(), crate::bench::unix_micros() % 1_000_000_000);
    let specs: Vec<WorkerSpec> = split(n, MAX_PER_WORKER)
        .into_iter()
        .enumerate()
        .map(|(k, (first, count))| WorkerSpec {
            targets: vec![t.addr],
            sources: source_addrs(k, count),
            id_prefix: format!("px-idle-{tag}-"),
            first: first as u64,
            count: count as u64,
            concurrency: 64,
            rooms: None,
            connect_timeout_ms: 30_000,
            protocol: crate::bench::protocol::Protocol::Tether,
            tls: tls.clone(),
        })
        .collect();
    let (fleet, opened) = Fleet::start(specs, Duration::from_secs(300), out).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = pid.map(procfs::rss_kib).transpose()?;
    fleet.close().await;
    // Let the proxy close its side before the next target's turn.
    tokio::time::sleep(Duration::from_secs(1)).await;
    if opened.failed > 0 {
        // Still a valid figure over the tunnels that did open; the table says how many.
        writeln!(out, "  {}: {} of {n} idle connections failed: {:?}", t.kind.label(), opened.failed, opened.errors)?;
    }
    let per = match (before, after) {
        (Some(b), Some(a)) if opened.open > 0 => Some((a as f64 - b as f64) / opened.open as f64),
        _ => None,
    };
    Ok((per, opened.open))
}

/// Opens `n` upgraded connections through `t` as clients `{prefix}{i}`.
pub(super) async fn open_many(t: &Target, n: usize, prefix: &str, slot: usize) -> Result<Vec<wsraw::Upgraded>> {
    let sources = local_sources(slot, n);
    let conns = futures_util::future::try_join_all((0..n).map(|i| {
        let source = sources[i % sources.len()];
        async move {
            let (up, _) = tokio::time::timeout(
                Duration::from_secs(10),
                wsraw::connect_with(t.addr, Some(source), &format!("/ws?client={prefix}{i}"), t.tls.as_ref()),
            )
            .await
            .map_err(|_| anyhow!("upgrade {i} timed out"))?
            .with_context(|| format!("upgrade {i} through {}", t.addr))?;
            Ok::<_, anyhow::Error>(up)
        }
    }))
    .await?;
    Ok(conns)
}

/// Reads until one data frame arrived; `Ok(false)` at EOF.
pub(super) async fn read_one<R: AsyncRead + Unpin>(stream: &mut R, dec: &mut Decoder) -> Result<bool> {
    loop {
        if let Some(f) = dec.next_frame()? {
            if f.opcode == OP_CLOSE {
                return Ok(false);
            }
            if f.opcode == OP_BINARY || f.opcode == wsraw::OP_TEXT {
                return Ok(true);
            }
            continue;
        }
        if dec.read_from(stream, 4096).await? == 0 {
            return Ok(false);
        }
    }
}

pub(super) struct EchoResult {
    pub(super) per_sec: f64,
    pub(super) cpu_us_per_echo: Option<f64>,
    pub(super) cpu_percent: Option<f64>,
}

/// (a): closed-loop echo throughput.
pub(super) async fn echo_closed_loop(t: &Target, opts: &ProxiesOptions, secs: Duration) -> Result<EchoResult> {
    let conns = open_many(t, opts.workloads.echo_conns, "a-", 0).await?;
    let payload = vec![b'e'; opts.workloads.message_bytes];
    let total = Arc::new(AtomicU64::new(0));
    // Two gates: everyone is warm (then the clock and the CPU meter start), everyone goes.
    let warm = Arc::new(tokio::sync::Barrier::new(conns.len() + 1));
    let go = Arc::new(tokio::sync::Barrier::new(conns.len() + 1));
    let deadline = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut tasks = Vec::with_capacity(conns.len());
    for (i, mut c) in conns.into_iter().enumerate() {
        let mut frame = Vec::new();
        wsraw::encode(&mut frame, OP_BINARY, &payload, Some(wsraw::mask_for(i as u64)));
        let (total, warm, go, deadline) =
            (Arc::clone(&total), Arc::clone(&warm), Arc::clone(&go), Arc::clone(&deadline));
        tasks.push(tokio::spawn(async move {
            let mut result = Ok(());
            for _ in 0..5 {
                if result.is_ok() {
                    wsraw::send(&mut c.stream, &frame).await?;
                    if !read_one(&mut c.stream, &mut c.decoder).await? {
                        result = Err(anyhow!("closed during warm-up"));
                    }
                }
            }
            // Reach both gates even after a failure, so the others are not left waiting.
            warm.wait().await;
            go.wait().await;
            result?;
            let end = *deadline.get().ok_or_else(|| anyhow!("no deadline"))?;
            let mut n = 0u64;
            while Instant::now() < end {
                wsraw::send(&mut c.stream, &frame).await?;
                if !read_one(&mut c.stream, &mut c.decoder).await? {
                    bail!("closed by the proxy");
                }
                n += 1;
            }
            total.fetch_add(n, Ordering::Relaxed);
            Ok::<_, anyhow::Error>(())
        }));
    }
    warm.wait().await;
    let meter = t.pid.map(|p| CpuMeter::start(&[p]));
    let started = Instant::now();
    let _ = deadline.set(started + secs);
    go.wait().await;
    let mut first_err = None;
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(e) => first_err = first_err.or(Some(anyhow!("echo task: {e}"))),
        }
    }
    let elapsed = started.elapsed();
    let cpu = meter.map(|m| m.read().0[0]);
    if let Some(e) = first_err {
        return Err(e);
    }
    let echoes = total.load(Ordering::Relaxed);
    if echoes == 0 {
        bail!("no echo at all");
    }
    Ok(EchoResult {
        per_sec: echoes as f64 / elapsed.as_secs_f64(),
        cpu_us_per_echo: cpu.map(|c| c.as_secs_f64() * 1e6 / echoes as f64),
        cpu_percent: cpu.map(|c| 100.0 * c.as_secs_f64() / elapsed.as_secs_f64()),
    })
}

/// (b): open-loop fixed rate; latency from send to echo.
pub(super) async fn fixed_rate(t: &Target, opts: &ProxiesOptions, secs: Duration) -> Result<(Latency, f64)> {
    let conns = open_many(t, opts.workloads.rate_conns, "b-", 1).await?;
    let per_conn = opts.workloads.rate / conns.len() as f64;
    let interval = Duration::from_secs_f64(1.0 / per_conn);
    let warm = Duration::from_millis(500);
    let base = Instant::now() + Duration::from_millis(50);
    let end = base + warm + secs;
    let n = conns.len();
    let mut tasks = Vec::with_capacity(n);
    for (i, c) in conns.into_iter().enumerate() {
        let msg_len = opts.workloads.message_bytes;
        let job = RateJob { base, end, warm, interval, first: base + interval.mul_f64(i as f64 / n as f64), msg_len };
        let mask = wsraw::mask_for(i as u64);
        tasks.push(tokio::spawn(async move {
            // A plain socket splits into its owned halves, as before TLS; a TLS session is one
            // state machine for both directions and splits behind a lock.
            match c.stream {
                Either::Left(tcp) => {
                    let (rd, wr) = tcp.into_split();
                    job.run(rd, wr, c.decoder, mask).await
                }
                Either::Right(s) => {
                    let (rd, wr) = tokio::io::split(s);
                    job.run(rd, wr, c.decoder, mask).await
                }
            }
        }));
    }
    let mut all = new_histogram();
    let mut lost = 0u64;
    for task in tasks {
        let (h, sent, received) = task.await.map_err(|e| anyhow!("rate task: {e}"))??;
        all.add(&h).map_err(|e| anyhow!("histogram: {e}"))?;
        lost += sent.saturating_sub(received);
    }
    if lost > 0 {
        bail!("{lost} echoes never came back");
    }
    let achieved = all.len() as f64 / secs.as_secs_f64();
    Ok((Latency::of(&all), achieved))
}

/// One connection's share of (b).
#[derive(Clone, Copy)]
struct RateJob {
    base: Instant,
    end: Instant,
    warm: Duration,
    interval: Duration,
    first: Instant,
    msg_len: usize,
}

impl RateJob {
    /// Sends at `first`, `first + interval`, … until `end`, and reads the echoes: their
    /// latencies (after the warm-up), how many were sent, how many came back.
    async fn run<R, W>(
        self,
        mut rd: R,
        mut wr: W,
        mut dec: Decoder,
        mask: [u8; 4],
    ) -> Result<(Histogram<u64>, u64, u64)>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let RateJob { base, end, warm, interval, first, msg_len } = self;
        // How many the writer sent, once it is done (the reader stops after that many).
        let sent_total = Arc::new(AtomicU64::new(u64::MAX));
        let sent_final = Arc::clone(&sent_total);
        let writer = async move {
            let mut payload = vec![b'r'; msg_len];
            let mut frame = Vec::with_capacity(msg_len + 16);
            let mut next = first;
            let mut sent = 0u64;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                let stamp = base.elapsed().as_nanos() as u64;
                payload[..8].copy_from_slice(&stamp.to_be_bytes());
                frame.clear();
                wsraw::encode(&mut frame, OP_BINARY, &payload, Some(mask));
                wsraw::send(&mut wr, &frame).await?;
                sent += 1;
                next += interval;
            }
            sent_final.store(sent, Ordering::Release);
            Ok::<_, anyhow::Error>((sent, wr))
        };
        let reader = async move {
            let mut h = new_histogram();
            let mut received = 0u64;
            let stop = end + Duration::from_secs(2);
            loop {
                while let Some(f) = dec.next_frame()? {
                    let p = dec.payload(&f);
                    if f.opcode == OP_BINARY && p.len() >= 8 {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&p[..8]);
                        let sent_at = Duration::from_nanos(u64::from_be_bytes(b));
                        let now = base.elapsed();
                        received += 1;
                        if sent_at >= warm {
                            let us = now.saturating_sub(sent_at).as_micros() as u64;
                            h.saturating_record(us.max(1));
                        }
                    }
                }
                if received >= sent_total.load(Ordering::Acquire) || Instant::now() >= stop {
                    return Ok::<_, anyhow::Error>((h, received));
                }
                // Short reads, so that the end is noticed soon after the writer's last send.
                match tokio::time::timeout(Duration::from_millis(50), dec.read_from(&mut rd, 4096)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Ok((h, received)),
                    Ok(Ok(_)) | Err(_) => {}
                }
            }
        };
        let (w, r) = tokio::join!(writer, reader);
        let (sent, _wr) = w?;
        let (h, received) = r?;
        Ok((h, sent, received))
    }
}

/// One connection set-up and its close: connect (and TLS hand-shake) → upgrade → close
/// handshake → hang-up. Its timings, and whether the TLS session was resumed.
async fn cycle(t: &Endpoint, source: IpAddr, path: &str, close: &[u8]) -> Result<(wsraw::Timings, bool)> {
    let (mut up, timings) = wsraw::connect_with(t.addr, Some(source), path, t.tls.as_ref()).await?;
    let resumed = wsraw::tls_session(&up.stream).is_some_and(tls::resumed);
    wsraw::send(&mut up.stream, close).await?;
    // Until the close reply and the hang-up (or an error: the cycle is over).
    while read_one(&mut up.stream, &mut up.decoder).await.unwrap_or(false) {}
    Ok((timings, resumed))
}

/// What (c) measured at saturation.
pub(super) struct SetupResult {
    pub(super) per_sec: f64,
    pub(super) upgrade: Latency,
    pub(super) failed: u64,
    /// Hand-shakes that resumed a session (0 unless `--tls-resume`).
    pub(super) resumed: u64,
    pub(super) cpu_us_per_cycle: Option<f64>,
    pub(super) cpu_percent: Option<f64>,
}

/// (c): complete connection cycles per second.
pub(super) async fn setup_rate(t: &Target, opts: &ProxiesOptions, secs: Duration, slot: usize) -> Result<SetupResult> {
    let end = Instant::now() + secs;
    // Cycles spread over 32 source addresses, so ephemeral ports never run short.
    let sources = local_sources(2 + slot % 40, 32 * crate::bench::CONNECTIONS_PER_SOURCE);
    let meter = t.pid.map(|p| CpuMeter::start(&[p]));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(opts.workloads.setup_concurrency);
    for l in 0..opts.workloads.setup_concurrency {
        let sources = sources.clone();
        let t = t.endpoint();
        tasks.push(tokio::spawn(async move {
            let mut h: Histogram<u64> = new_histogram();
            let (mut done, mut failed, mut resumed) = (0u64, 0u64, 0u64);
            let mut k = l;
            let mut close = Vec::new();
            wsraw::encode(&mut close, OP_CLOSE, &1000u16.to_be_bytes(), Some(wsraw::mask_for(l as u64)));
            while Instant::now() < end {
                let source = sources[k % sources.len()];
                k += 7;
                let path = format!("/ws?client=c-{l}-{k}");
                match tokio::time::timeout(Duration::from_secs(5), cycle(&t, source, &path, &close)).await {
                    Ok(Ok((timings, r))) => {
                        h.saturating_record(timings.upgraded.as_micros() as u64);
                        done += 1;
                        resumed += u64::from(r);
                    }
                    _ => failed += 1,
                }
            }
            Ok::<_, anyhow::Error>((h, done, failed, resumed))
        }));
    }
    let mut all = new_histogram();
    let (mut done, mut failed, mut resumed) = (0, 0, 0);
    for task in tasks {
        let (h, d, f, r) = task.await.map_err(|e| anyhow!("setup task: {e}"))??;
        all.add(&h).map_err(|e| anyhow!("histogram: {e}"))?;
        done += d;
        failed += f;
        resumed += r;
    }
    let cpu = meter.map(|m| m.read().0[0]);
    let elapsed = started.elapsed().max(secs);
    Ok(SetupResult {
        per_sec: done as f64 / elapsed.as_secs_f64(),
        upgrade: Latency::of(&all),
        failed,
        resumed,
        cpu_us_per_cycle: cpu.filter(|_| done > 0).map(|c| c.as_secs_f64() * 1e6 / done as f64),
        cpu_percent: cpu.map(|c| 100.0 * c.as_secs_f64() / elapsed.as_secs_f64()),
    })
}

/// What (c) measured at a fixed rate.
pub(super) struct ConnectRateResult {
    /// Completed set-ups per second.
    pub(super) achieved: f64,
    /// TCP connect + TLS hand-shake (`None` for a plain target).
    pub(super) handshake: Option<Latency>,
    /// TCP connect (+ TLS) + upgrade, until the `101`.
    pub(super) upgrade: Latency,
    pub(super) failed: u64,
    pub(super) resumed: u64,
    pub(super) cpu_us_per_cycle: Option<f64>,
}

/// (c) at a fixed rate: set-ups started at evenly spaced times (open loop: a slow one does not
/// delay the next), each timed from the start of its TCP connect.
pub(super) async fn connect_fixed_rate(
    t: &Target,
    rate: f64,
    secs: Duration,
    slot: usize,
) -> Result<ConnectRateResult> {
    let sources = local_sources(2 + slot % 40, 32 * crate::bench::CONNECTIONS_PER_SOURCE);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut close = Vec::new();
    wsraw::encode(&mut close, OP_CLOSE, &1000u16.to_be_bytes(), Some(wsraw::mask_for(slot as u64)));
    let close: Arc<[u8]> = close.into();
    let target = Arc::new(t.endpoint());
    let meter = t.pid.map(|p| CpuMeter::start(&[p]));
    let started = Instant::now();
    let end = started + secs;
    let mut next = started;
    let mut set = tokio::task::JoinSet::new();
    let mut k = 0usize;
    while next < end {
        tokio::time::sleep_until(next.into()).await;
        let (t, close, source) = (Arc::clone(&target), Arc::clone(&close), sources[k % sources.len()]);
        let path = format!("/ws?client=r-{slot}-{k}");
        set.spawn(async move { tokio::time::timeout(Duration::from_secs(5), cycle(&t, source, &path, &close)).await });
        k += 1;
        next += interval;
    }
    let (mut hs, mut up) = (new_histogram(), new_histogram());
    let (mut done, mut failed, mut resumed) = (0u64, 0u64, 0u64);
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(Ok((timings, r)))) => {
                if let Some(d) = timings.tls {
                    hs.saturating_record((d.as_micros() as u64).max(1));
                }
                up.saturating_record((timings.upgraded.as_micros() as u64).max(1));
                done += 1;
                resumed += u64::from(r);
            }
            _ => failed += 1,
        }
    }
    // CPU over the whole pass, the last set-ups' closes included, divided by the set-ups.
    let cpu = meter.map(|m| m.read().0[0]);
    if done == 0 {
        bail!("no connection set up at {rate:.0}/s ({failed} failed)");
    }
    Ok(ConnectRateResult {
        achieved: done as f64 / secs.as_secs_f64(),
        handshake: (!hs.is_empty()).then(|| Latency::of(&hs)),
        upgrade: Latency::of(&up),
        failed,
        resumed,
        cpu_us_per_cycle: cpu.map(|c| c.as_secs_f64() * 1e6 / done as f64),
    })
}
