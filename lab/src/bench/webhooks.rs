//! `tether bench webhooks`: clients connect, join a room and close in a loop (a fresh id
//! each time, so every cycle decides four events: `client.online` and `member.joined` at
//! once, `member.left` and `client.offline` after the grace, plus a room's occupied/vacated
//! now and then) against nodes on a private Redis, delivering to an in-process receiver.
//!
//! Reports cycles/s, events decided/s (the nodes' `tether_webhook_decided_total`), events
//! delivered/s (what the receiver got), and the decision → delivery latency of the events
//! decided at once (the receiver's clock less the body's `time`, which the node stamps when
//! it builds the body: millisecond resolution). `--compare-off` runs the same load with
//! webhooks off first, for the presence path's cost.

use super::args::WebhooksArgs;
use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_kit::wait::eventually;
use tether_kit::{LogTarget, NodeProcess, RedisServer, SpawnOptions, WebhookReceiver};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "bench-secret";

/// What one run measured.
#[derive(Debug, Clone, Default)]
struct Run {
    cycles: u64,
    secs: f64,
    decided: u64,
    delivered: u64,
    /// p50, p99, max of decision → delivery, ms (events decided at once).
    latency_ms: Option<(u64, u64, u64)>,
    /// Seconds from the end of the load until every decided event was delivered.
    drain_secs: f64,
}

pub async fn run_cli(args: WebhooksArgs) -> Result<i32> {
    let off = if args.compare_off { Some(run(&args, false).await?) } else { None };
    let on = run(&args, true).await?;
    println!(
        "tether bench webhooks: {} loops, {} node(s), {} rooms, grace {} ms, {:.0} s",
        args.clients, args.nodes, args.rooms, args.grace_ms, args.duration
    );
    if let Some(off) = &off {
        println!("  webhooks off: {:>8.0} connect+join+close cycles/s", off.cycles as f64 / off.secs);
    }
    println!("  webhooks on:  {:>8.0} connect+join+close cycles/s", on.cycles as f64 / on.secs);
    println!("  decided:      {:>8.0} events/s ({} events)", on.decided as f64 / on.secs, on.decided);
    println!(
        "  delivered:    {:>8.0} events/s ({} events; the last {:.2} s after the load stopped)",
        on.delivered as f64 / (on.secs + on.drain_secs),
        on.delivered,
        on.drain_secs
    );
    if let Some((p50, p99, max)) = on.latency_ms {
        println!("  decision -> delivery (immediate events): p50 {p50} ms, p99 {p99} ms, max {max} ms");
    }
    Ok(0)
}

async fn run(args: &WebhooksArgs, hooks: bool) -> Result<Run> {
    let redis = RedisServer::start().await?;
    let receiver = WebhookReceiver::start(SECRET.as_bytes()).await?;
    let mut text = String::from("presence_ttl_ms = 3000\n");
    if hooks {
        text.push_str(&format!(
            "[webhooks]\nurl = \"{}\"\nsecret = \"{SECRET}\"\noffline_grace_ms = {}\nqueue_len = 100000\n",
            receiver.url(),
            args.grace_ms
        ));
    }
    let cfg = tempfile::NamedTempFile::new()?;
    std::fs::write(cfg.path(), text)?;
    let mut nodes = Vec::new();
    for i in 0..args.nodes {
        let name = format!("node-{}", i + 1);
        let stderr = match &args.logs {
            Some(dir) => LogTarget::File(dir.join(format!("{name}-{}.log", if hooks { "on" } else { "off" }))),
            None => LogTarget::Null,
        };
        let opts = SpawnOptions { stderr, ..SpawnOptions::default() };
        let cfg_arg = ["--config".to_string(), cfg.path().display().to_string()];
        nodes.push(NodeProcess::start_with(&name, &redis.url(), &cfg_arg, &opts).await?);
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.ws_url()).collect();
    let cycles = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let mut loops = Vec::new();
    for i in 0..args.clients {
        let url = urls[i % urls.len()].clone();
        let room = format!("bench-{}", i % args.rooms);
        let cycles = Arc::clone(&cycles);
        loops.push(tokio::spawn(async move {
            let mut k = 0u64;
            while Instant::now() < end {
                k += 1;
                if cycle(&url, &format!("b{i}-{k}"), &room).await.is_ok() {
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for l in loops {
        let _ = l.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let cycles = cycles.load(Ordering::Relaxed);
    let mut out = Run { cycles, secs, ..Run::default() };
    if !hooks {
        return Ok(out);
    }
    // Everything decided (graced ones included) must arrive: wait until the nodes have
    // decided and the receiver has got as many as each cycle makes.
    let load_end = Instant::now();
    let want = cycles * 4;
    let _ = eventually(Duration::from_secs(60), "every event delivered", || async {
        receiver.delivered().len() as u64 >= want
    })
    .await;
    out.drain_secs = load_end.elapsed().as_secs_f64();
    for n in &nodes {
        let metrics = super::http_get(n.addr(), "/metrics").await.context("reading /metrics")?;
        out.decided += metrics
            .lines()
            .filter(|l| l.starts_with("tether_webhook_decided_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    let delivered = receiver.delivered();
    out.delivered = delivered.len() as u64;
    let mut lat: Vec<u64> = delivered
        .iter()
        .filter(|r| matches!(r.json["type"].as_str(), Some("client.online" | "member.joined")))
        .filter_map(|r| {
            let t = humantime::parse_rfc3339(r.json["time"].as_str()?).ok()?;
            Some(r.at.duration_since(t).unwrap_or_default().as_millis() as u64)
        })
        .collect();
    lat.sort_unstable();
    if !lat.is_empty() {
        let pick = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
        out.latency_ms = Some((pick(0.5), pick(0.99), lat[lat.len() - 1]));
    }
    Ok(out)
}

/// Connect as `id`, join `room`, wait for the own `user_joined`, close.
async fn cycle(url: &str, id: &str, room: &str) -> Result<()> {
    let deadline = Duration::from_secs(10);
    let (mut ws, _) = tokio::time::timeout(deadline, tokio_tungstenite::connect_async(format!("{url}?client={id}")))
        .await
        .context("connect timed out")??;
    let join = tether_proto::wire::ClientMsg::Join { room: room.to_string() }.to_json();
    ws.send(Message::Text(join.into())).await?;
    let joined = tokio::time::timeout(deadline, async {
        while let Some(msg) = ws.next().await {
            if let Message::Text(t) = msg? {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                if v["type"] == "user_joined" && v["id"] == id {
                    return Ok::<_, anyhow::Error>(());
                }
            }
        }
        anyhow::bail!("closed before the join completed")
    })
    .await;
    joined.context("join timed out")??;
    ws.close(None).await?;
    // Read until the server's close, so the disconnect is done before the next cycle.
    let _ = tokio::time::timeout(deadline, async { while ws.next().await.is_some() {} }).await;
    Ok(())
}
