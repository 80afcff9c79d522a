//! `tether bench api`: the server API's `POST /api/publish` through the balancer — latency
//! of each call, throughput, and the time from the call to the message's delivery to a
//! WebSocket member — at a steady rate and at saturation.
//!
//! A private cluster (redis-server, `--nodes` nodes with an API key, a balancer) is started.
//! One member joins the room through the balancer. `--concurrency` keep-alive HTTP/1.1
//! connections (each its own task, [`tether_kit::ApiClient`]) publish to that room:
//! - steady: each connection sends on a fixed schedule (`--rate` split between them); a call
//!   is timed from its scheduled instant, so a stall shows in the tail instead of hiding
//!   (no coordinated omission);
//! - saturation: each connection sends its next call as soon as the last one is answered, for
//!   the same duration; the figure is answered calls per second.
//!
//! Each message's `text` is the microsecond (on this process' monotonic clock) its call was
//! timed from, so the member computes publish → delivery latency on the same clock.

use super::args::ApiArgs;
use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_kit::hist::Latency;
use tether_kit::url::connect_url;
use tether_kit::{ApiClient, Cluster, ClusterLogs, ClusterOptions};
use tether_proto::wire::{ClientMsg, NodeFrame};
use tokio_tungstenite::tungstenite::Message;

/// The key the bench's nodes are started with.
const BENCH_KEY: &str = "bench-api-key-0123456789abcdef";
const ROOM: &str = "bench-api";
/// How long the member may lag behind the last call before the run stops waiting.
const DRAIN: Duration = Duration::from_secs(5);

/// One phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub phase: &'static str,
    /// Calls per second asked for (steady) or 0 (saturation).
    pub target_rate: f64,
    pub calls: u64,
    pub failed: u64,
    pub calls_per_sec: f64,
    /// `POST /api/publish` through the balancer, call to answer.
    pub call_latency_us: Latency,
    /// Call to delivery at the WebSocket member.
    pub delivery_latency_us: Latency,
    pub delivered: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    nodes: usize,
    concurrency: usize,
    duration_secs: f64,
    phases: Vec<Phase>,
}

/// Samples shared by a phase's tasks.
struct Recorder {
    calls: Mutex<Histogram<u64>>,
    failed: AtomicU64,
}

pub async fn run_cli(args: ApiArgs) -> Result<i32> {
    let mut out = std::io::stdout();
    writeln!(out, "starting a private cluster: redis-server, {} nodes with the API on, balancer", args.nodes)?;
    let logs = match &args.logs {
        Some(dir) => ClusterLogs::Dir(dir.clone()),
        None => ClusterLogs::Null,
    };
    let cluster = Cluster::start(ClusterOptions {
        nodes: args.nodes,
        logs,
        node_args: vec!["--api-key".into(), BENCH_KEY.into()],
        ..ClusterOptions::default()
    })
    .await?;
    let front = cluster.balancer().addr();
    let epoch = Instant::now();
    let (member, deliveries) = member(&cluster.ws_url(), epoch).await?;
    // Warm-up: connections, allocators, the room's subscription on every node.
    run_phase(front, args.concurrency, None, Duration::from_millis(500), epoch, "warmup").await?;
    let duration = Duration::from_secs_f64(args.duration);
    let mut phases = Vec::new();
    for (name, rate) in [("steady", Some(args.rate)), ("saturation", None)] {
        deliveries.lock().expect("not poisoned").1 = true;
        let started = Instant::now();
        let (calls, rec) = run_phase(front, args.concurrency, rate, duration, epoch, name).await?;
        let elapsed = started.elapsed().as_secs_f64();
        // Let the member catch up with what was published, then take its samples.
        let deadline = Instant::now() + DRAIN;
        while deliveries.lock().expect("not poisoned").0.len() < calls && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let delivered = {
            let mut d = deliveries.lock().expect("not poisoned");
            d.1 = false;
            std::mem::replace(&mut d.0, tether_kit::hist::new_histogram())
        };
        let failed = rec.failed.load(Ordering::Relaxed);
        let hist = rec.calls.lock().expect("not poisoned").clone();
        phases.push(Phase {
            phase: name,
            target_rate: rate.unwrap_or(0.0),
            calls: calls - failed,
            failed,
            calls_per_sec: (calls - failed) as f64 / elapsed,
            call_latency_us: Latency::of(&hist),
            delivery_latency_us: Latency::of(&delivered),
            delivered: delivered.len(),
        });
    }
    member.abort();
    writeln!(
        out,
        "\n{:<11} {:>9} {:>9} {:>7} {:>10} | call µs p50/p99/p999 | delivery µs p50/p99/p999",
        "phase", "target/s", "calls/s", "failed", "delivered"
    )?;
    for p in &phases {
        let (c, d) = (&p.call_latency_us, &p.delivery_latency_us);
        writeln!(
            out,
            "{:<11} {:>9.0} {:>9.0} {:>7} {:>10} | {:>6}/{:>6}/{:>7} | {:>6}/{:>6}/{:>7}",
            p.phase,
            p.target_rate,
            p.calls_per_sec,
            p.failed,
            p.delivered,
            c.p50_us,
            c.p99_us,
            c.p999_us,
            d.p50_us,
            d.p99_us,
            d.p999_us
        )?;
    }
    if let Some(path) = &args.json {
        let report = Report {
            nodes: args.nodes,
            concurrency: args.concurrency,
            duration_secs: args.duration,
            phases: phases.clone(),
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let failed: u64 = phases.iter().map(|p| p.failed).sum();
    Ok(if failed > 0 { 1 } else { 0 })
}

/// Delivery samples and whether the current phase records them.
type Deliveries = Arc<Mutex<(Histogram<u64>, bool)>>;

/// The WebSocket member: joins [`ROOM`] through the balancer and records, for each message,
/// now − the µs in its text.
async fn member(ws_url: &str, epoch: Instant) -> Result<(tokio::task::JoinHandle<()>, Deliveries)> {
    let url = connect_url(ws_url, Some("bench-api-member"))?;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(url.as_str()).await.with_context(|| format!("connecting to {url}"))?;
    ws.send(Message::text(ClientMsg::Join { room: ROOM.into() }.to_json())).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.context("joining: no answer")?;
        match msg {
            Some(Ok(Message::Text(t))) if t.as_str().contains("\"user_joined\"") => break,
            Some(Ok(_)) => {}
            _ => bail!("the member's connection ended while joining"),
        }
    }
    let deliveries: Deliveries = Arc::new(Mutex::new((tether_kit::hist::new_histogram(), false)));
    let shared = Arc::clone(&deliveries);
    let task = tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else { continue };
            let now = epoch.elapsed().as_micros() as u64;
            if let Ok(NodeFrame::Message(m)) = tether_proto::wire::decode_node_frame(t.as_str()) {
                if let Ok(sent) = m.text.parse::<u64>() {
                    let mut d = shared.lock().expect("not poisoned");
                    if d.1 {
                        d.0.saturating_record(now.saturating_sub(sent).max(1));
                    }
                }
            }
        }
    });
    Ok((task, deliveries))
}

/// Runs `concurrency` publishing connections for `duration`, at `rate` calls/s in all (steady)
/// or as fast as answered (`None`); returns the calls made and their samples.
async fn run_phase(
    front: std::net::SocketAddr,
    concurrency: usize,
    rate: Option<f64>,
    duration: Duration,
    epoch: Instant,
    name: &'static str,
) -> Result<(u64, Arc<Recorder>)> {
    let rec = Arc::new(Recorder { calls: Mutex::new(tether_kit::hist::new_histogram()), failed: AtomicU64::new(0) });
    let total = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (rec, total) = (Arc::clone(&rec), Arc::clone(&total));
        let interval = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r));
        tasks.push(tokio::spawn(async move {
            let mut client = ApiClient::connect(front, Some(BENCH_KEY)).await?;
            // Each worker's schedule is offset so that the connections' calls interleave.
            let mut next = start + interval.map_or(Duration::ZERO, |i| i.mul_f64(worker as f64 / concurrency as f64));
            loop {
                if let Some(i) = interval {
                    tokio::time::sleep_until(next).await;
                    next += i;
                }
                let scheduled =
                    if interval.is_some() { next - interval.unwrap_or_default() } else { tokio::time::Instant::now() };
                if scheduled >= end {
                    break;
                }
                let t0 = epoch.elapsed().as_micros() as u64 - scheduled.elapsed().as_micros() as u64;
                let body = json!({"room": ROOM, "text": t0.to_string()});
                total.fetch_add(1, Ordering::Relaxed);
                let ok = match client.post("/api/publish", &body).await {
                    Ok(a) => a.status == 200,
                    Err(_) => false,
                };
                let took = (epoch.elapsed().as_micros() as u64).saturating_sub(t0).max(1);
                if ok {
                    rec.calls.lock().expect("not poisoned").saturating_record(took);
                } else {
                    rec.failed.fetch_add(1, Ordering::Relaxed);
                    if !client.is_open() {
                        client = ApiClient::connect(front, Some(BENCH_KEY)).await?;
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await.with_context(|| format!("{name}: a publisher task panicked"))??;
    }
    Ok((total.load(Ordering::Relaxed), rec))
}
