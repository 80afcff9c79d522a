//! Part (a) of `tether bench rehome`: the balancer's CPU per proxied message, plain
//! (`--failover reconnect`) against rehome (`--failover rehome`), at fixed delivery rates.
//!
//! Each mode has its own balancer in front of the same nodes and its own clients: `rooms ×
//! members` clients through it, one per room publishing (a member of its room too). A step
//! publishes `rate ÷ members` messages per second (so that the clients receive `rate` room
//! messages per second) for an unmeasured ramp, then for the measured window, over which the
//! balancer's CPU (`utime + stime` from `/proc/PID/stat`) is divided by the frames it proxied:
//! the clients' sends (client → node) plus every text frame they received (node → client).
//! Rounds alternate the order of the modes, so that neither always runs on a warmer machine.

use super::super::procfs::CpuMeter;
use super::super::{add_pairs, new_histogram, Latency};
use super::client::{publish, Client, Counters};
use super::RehomeOptions;
use anyhow::Result;
use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Pause between steps.
const PAUSE: Duration = Duration::from_millis(300);

/// One mode's balancer and clients.
pub struct ModeLoad {
    pub mode: &'static str,
    pub balancer_pid: u32,
    pub clients: Vec<Arc<Client>>,
    /// Member 0 of each room.
    pub publishers: Vec<Arc<Client>>,
    pub counters: Arc<Counters>,
    next: AtomicU64,
}

impl ModeLoad {
    /// Connects `rooms × members` clients through `balancer`.
    pub async fn connect<W: Write>(
        mode: &'static str,
        balancer: SocketAddr,
        balancer_pid: u32,
        opts: &RehomeOptions,
        tag: &str,
        out: &mut W,
    ) -> Result<Self> {
        let counters = Arc::new(Counters::default());
        let mut clients = Vec::new();
        let mut publishers = Vec::new();
        for r in 0..opts.rooms {
            let room = format!("rc-{tag}-{mode}-{r}");
            let opens = (0..opts.members).map(|m| {
                let id = format!("rc-{tag}-{mode}-{r}-{m}");
                let (room, counters) = (room.clone(), Arc::clone(&counters));
                async move { Client::open(balancer, &id, &room, counters).await }
            });
            let room_clients: Vec<Arc<Client>> =
                futures_util::future::try_join_all(opens).await?.into_iter().map(Arc::new).collect();
            publishers.push(Arc::clone(&room_clients[0]));
            clients.extend(room_clients);
        }
        writeln!(out, "  {mode}: {} clients joined {} rooms through its balancer", clients.len(), opts.rooms)?;
        Ok(Self { mode, balancer_pid, clients, publishers, counters, next: AtomicU64::new(0) })
    }

    /// Clients whose connection ended.
    pub fn closed(&self) -> usize {
        self.clients.iter().filter(|c| c.with(|s| s.closed.is_some())).count()
    }

    pub async fn close(self) {
        drop(self.publishers);
        for c in self.clients {
            if let Ok(c) = Arc::try_unwrap(c) {
                c.close().await;
            }
        }
    }
}

/// One measured window.
#[derive(Debug, Clone, Serialize)]
pub struct CostStep {
    pub mode: &'static str,
    pub round: u32,
    /// Room-message deliveries per second asked for.
    pub rate: f64,
    /// Frames the balancer proxied in the window, both directions, and per second.
    pub frames: u64,
    pub frames_per_sec: f64,
    /// Balancer CPU over the window, ms, and per proxied frame, µs.
    pub cpu_ms: f64,
    pub cpu_us_per_frame: Option<f64>,
    pub latency: Latency,
    #[serde(skip)]
    pub hist: Vec<(u64, u64)>,
}

/// A mode at a rate over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct CostSummary {
    pub mode: &'static str,
    pub rate: f64,
    pub rounds: usize,
    pub frames: u64,
    pub frames_per_sec: f64,
    pub cpu_ms: f64,
    pub cpu_us_per_frame: Option<f64>,
    /// Live room messages of every window together.
    pub latency: Latency,
}

/// rehome ÷ reconnect at one rate.
#[derive(Debug, Clone, Serialize)]
pub struct CostRatio {
    pub rate: f64,
    pub cpu_ratio: Option<f64>,
    pub p99_reconnect_ms: f64,
    pub p99_rehome_ms: f64,
}

/// Runs the rounds over both modes' loads.
pub async fn measure<W: Write>(opts: &RehomeOptions, loads: &[ModeLoad], out: &mut W) -> Result<Vec<CostStep>> {
    let mut steps = Vec::new();
    for round in 1..=opts.rounds {
        let order: Vec<&ModeLoad> = if round % 2 == 1 { loads.iter().collect() } else { loads.iter().rev().collect() };
        for load in order {
            for &rate in &opts.rates {
                let st = step(opts, load, round, rate).await?;
                writeln!(
                    out,
                    "  round {round} {:<9} {rate:>6.0} deliveries/s: {:.0} frames/s proxied, balancer CPU {:.0} ms = {} µs/frame, \
                     p50 {:.2} ms p99 {:.2} ms",
                    st.mode,
                    st.frames_per_sec,
                    st.cpu_ms,
                    st.cpu_us_per_frame.map_or("–".to_owned(), |c| format!("{c:.2}")),
                    st.latency.p50_us as f64 / 1e3,
                    st.latency.p99_us as f64 / 1e3,
                )?;
                out.flush()?;
                steps.push(st);
                tokio::time::sleep(PAUSE).await;
            }
        }
    }
    Ok(steps)
}

async fn step(opts: &RehomeOptions, load: &ModeLoad, round: u32, rate: f64) -> Result<CostStep> {
    let pub_rate = rate / opts.members.max(1) as f64;
    publish(&load.publishers, pub_rate, opts.ramp, &load.next).await?;
    load.counters.latency.snapshot(true);
    let frames0 = load.counters.frames();
    let cpu = CpuMeter::start(&[load.balancer_pid]);
    publish(&load.publishers, pub_rate, opts.step, &load.next).await?;
    let (used, wall) = cpu.read();
    let frames = load.counters.frames() - frames0;
    let hist = load.counters.latency.snapshot(true);
    let mut h = new_histogram();
    add_pairs(&mut h, &hist);
    let cpu_ms = used[0].as_secs_f64() * 1e3;
    Ok(CostStep {
        mode: load.mode,
        round,
        rate,
        frames,
        frames_per_sec: (frames as f64 / wall.as_secs_f64().max(1e-9)).round(),
        cpu_ms,
        cpu_us_per_frame: (frames > 0 && cpu_ms > 0.0).then(|| round2(cpu_ms * 1e3 / frames as f64)),
        latency: Latency::of(&h),
        hist,
    })
}

/// Per mode and rate, over all rounds: CPU summed and divided by the frames summed.
pub fn summarise(steps: &[CostStep], opts: &RehomeOptions) -> Vec<CostSummary> {
    let mut out = Vec::new();
    for mode in super::MODES {
        for &rate in &opts.rates {
            let of: Vec<&CostStep> = steps.iter().filter(|s| s.mode == mode && s.rate == rate).collect();
            if of.is_empty() {
                continue;
            }
            let frames: u64 = of.iter().map(|s| s.frames).sum();
            let cpu_ms: f64 = of.iter().map(|s| s.cpu_ms).sum();
            let mut h = new_histogram();
            for s in &of {
                add_pairs(&mut h, &s.hist);
            }
            let secs = opts.step.as_secs_f64() * of.len() as f64;
            out.push(CostSummary {
                mode,
                rate,
                rounds: of.len(),
                frames,
                frames_per_sec: (frames as f64 / secs.max(1e-9)).round(),
                cpu_ms: round2(cpu_ms),
                cpu_us_per_frame: (frames > 0 && cpu_ms > 0.0).then(|| round2(cpu_ms * 1e3 / frames as f64)),
                latency: Latency::of(&h),
            });
        }
    }
    out
}

/// rehome ÷ reconnect per rate.
pub fn ratios(summary: &[CostSummary], opts: &RehomeOptions) -> Vec<CostRatio> {
    opts.rates
        .iter()
        .filter_map(|&rate| {
            let find = |mode: &str| summary.iter().find(|s| s.mode == mode && s.rate == rate);
            let (plain, rehome) = (find("reconnect")?, find("rehome")?);
            let cpu_ratio = match (plain.cpu_us_per_frame, rehome.cpu_us_per_frame) {
                (Some(a), Some(b)) if a > 0.0 => Some((b / a * 1000.0).round() / 1000.0),
                _ => None,
            };
            Some(CostRatio {
                rate,
                cpu_ratio,
                p99_reconnect_ms: plain.latency.p99_us as f64 / 1e3,
                p99_rehome_ms: rehome.latency.p99_us as f64 / 1e3,
            })
        })
        .collect()
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(mode: &'static str, frames: u64, cpu_ms: f64) -> CostStep {
        CostStep {
            mode,
            round: 1,
            rate: 100.0,
            frames,
            frames_per_sec: 0.0,
            cpu_ms,
            cpu_us_per_frame: None,
            latency: Latency::default(),
            hist: vec![(1000, 1)],
        }
    }

    #[test]
    fn the_ratio_divides_summed_cpu_by_summed_frames() {
        let opts = RehomeOptions { rates: vec![100.0], ..RehomeOptions::quick() };
        let steps = [st("reconnect", 1000, 10.0), st("reconnect", 1000, 30.0), st("rehome", 2000, 50.0)];
        let sum = summarise(&steps, &opts);
        assert_eq!(sum[0].cpu_us_per_frame, Some(20.0));
        assert_eq!(sum[1].cpu_us_per_frame, Some(25.0));
        assert_eq!(ratios(&sum, &opts)[0].cpu_ratio, Some(1.25));
    }
}
