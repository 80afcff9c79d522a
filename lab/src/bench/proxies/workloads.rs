//! The workloads of `tether bench proxies`, each against one running target: (d) idle tunnels,
//! (a) closed-loop echo, (b) echo at a fixed rate, (c) connection setup.

use super::targets::Target;
use super::ProxiesOptions;
use crate::bench::procfs::{self, CpuMeter};
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
use tokio::io::AsyncWriteExt;

/// Source addresses for in-process load (disjoint from the workers' 127.0.10+.x).
pub(super) fn local_sources(slot: usize, n: usize) -> Vec<IpAddr> {
    source_addrs(150 + slot % 50, n)
}

/// (d): RSS growth of the proxy per idle tunnel (the backend's for direct, as a reference).
pub(super) async fn idle<W: Write>(t: &Target, n: usize, out: &mut W) -> Result<(Option<f64>, u64)> {
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
            tokio::time::timeout(
                Duration::from_secs(10),
                wsraw::connect(t.addr, Some(source), &format!("/ws?client={prefix}{i}")),
            )
            .await
            .map_err(|_| anyhow!("upgrade {i} timed out"))?
            .with_context(|| format!("upgrade {i} through {}", t.addr))
        }
    }))
    .await?;
    Ok(conns)
}

/// Reads until one data frame arrived; `Ok(false)` at EOF.
pub(super) async fn read_one(stream: &mut tokio::net::TcpStream, dec: &mut Decoder) -> Result<bool> {
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
                    c.stream.write_all(&frame).await?;
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
                c.stream.write_all(&frame).await?;
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
        tasks.push(tokio::spawn(async move {
            let (mut rd, mut wr) = c.stream.into_split();
            let mut dec = c.decoder;
            // How many the writer sent, once it is done (the reader stops after that many).
            let sent_total = Arc::new(AtomicU64::new(u64::MAX));
            let sent_final = Arc::clone(&sent_total);
            let mask = wsraw::mask_for(i as u64);
            let first = base + interval.mul_f64(i as f64 / n as f64);
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
                    wr.write_all(&frame).await?;
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
            Ok::<_, anyhow::Error>((h, sent, received))
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

/// (c): complete connection cycles per second.
pub(super) async fn setup_rate(
    t: &Target,
    opts: &ProxiesOptions,
    secs: Duration,
    slot: usize,
) -> Result<(f64, Latency, u64)> {
    let end = Instant::now() + secs;
    // Cycles spread over 32 source addresses, so ephemeral ports never run short.
    let sources = local_sources(2 + slot % 40, 32 * crate::bench::CONNECTIONS_PER_SOURCE);
    let mut tasks = Vec::with_capacity(opts.workloads.setup_concurrency);
    for l in 0..opts.workloads.setup_concurrency {
        let sources = sources.clone();
        let addr = t.addr;
        tasks.push(tokio::spawn(async move {
            let mut h: Histogram<u64> = new_histogram();
            let (mut done, mut failed) = (0u64, 0u64);
            let mut k = l;
            let mut close = Vec::new();
            wsraw::encode(&mut close, OP_CLOSE, &1000u16.to_be_bytes(), Some(wsraw::mask_for(l as u64)));
            while Instant::now() < end {
                let source = sources[k % sources.len()];
                k += 7;
                let started = Instant::now();
                let cycle = async {
                    let mut up = wsraw::connect(addr, Some(source), &format!("/ws?client=c-{l}-{k}")).await?;
                    let upgraded = started.elapsed();
                    up.stream.write_all(&close).await?;
                    // Until the close reply and the hang-up (or an error: the cycle is over).
                    while read_one(&mut up.stream, &mut up.decoder).await.unwrap_or(false) {}
                    Ok::<_, anyhow::Error>(upgraded)
                };
                match tokio::time::timeout(Duration::from_secs(5), cycle).await {
                    Ok(Ok(upgraded)) => {
                        h.saturating_record(upgraded.as_micros() as u64);
                        done += 1;
                    }
                    _ => failed += 1,
                }
            }
            Ok::<_, anyhow::Error>((h, done, failed))
        }));
    }
    let started = Instant::now();
    let mut all = new_histogram();
    let (mut done, mut failed) = (0, 0);
    for task in tasks {
        let (h, d, f) = task.await.map_err(|e| anyhow!("setup task: {e}"))??;
        all.add(&h).map_err(|e| anyhow!("histogram: {e}"))?;
        done += d;
        failed += f;
    }
    let elapsed = started.elapsed().max(secs);
    Ok((done as f64 / elapsed.as_secs_f64(), Latency::of(&all), failed))
}
