//! `tether bench`: measurements that guard the hot paths.
//!
//! - [`rtt`]: one client's message round trip (client → node → Redis → node → client),
//!   straight to a node and through the balancer, so the balancer's cost is a ratio.
//! - [`idle`]: memory per idle connection of nodes and balancers, at tens of thousands of
//!   connections spread over load-generator child processes ([`worker`]).
//! - [`fanout`]: rooms spread over three nodes behind the balancer, publishers at rising
//!   rates: delivered frames per second, end-to-end latency, and who runs out of CPU first.
//! - [`steady`]: `fanout --steady`: fixed-rate steps with every delivery accounted for, server
//!   CPU per delivery and tail latency, optionally side by side with Socket.IO 4 and its Redis
//!   adapter ([`socketio`]) driven by the same load generator.
//! - [`api`]: the server API's publish through the balancer: call latency and throughput at a
//!   steady rate and at saturation, and publish → delivery latency to a WebSocket member.
//! - [`webhooks`]: webhook events/s — decided and delivered — and decision → delivery
//!   latency, with clients connecting and leaving in a loop; the presence path's cost with
//!   webhooks on vs off.
//! - [`proxies`]: the balancer against HAProxy and nginx (and a direct connection as the
//!   floor) on the same echo workloads: throughput, latency at a fixed rate, upgrades per
//!   second, memory per idle tunnel.
//! - [`rehome`]: the balancer's `--failover rehome` against `reconnect`: CPU per proxied frame
//!   and latency at fixed rates, and how long clients take to be rehomed when their node is
//!   killed or drained.
//!
//! Support: [`wsraw`] is the minimal WebSocket codec the load side speaks (cheap enough that
//! the load generator is not what gets measured), [`protocol`] what it speaks over it
//! (Tether's frames or Socket.IO's), [`publish`] the fan-out publishers, [`rooms`] a fan-out run's members and publishers together; [`echo`] the echo
//! backend of `proxies`;
//! [`tls`] the certificate the proxies terminate TLS with and the load side's `wss` client;
//! [`procfs`] reads RSS and CPU time of any process from `/proc`; [`worker`] the
//! load-generator child (`tether bench worker`, hidden) and its parent-side [`worker::Fleet`].
//!
//! Every child process here is a [`tether_kit::ChildProcess`] started with its stdin piped: it
//! exits when that pipe closes, is killed on drop, and gets `SIGKILL` if the spawning thread
//! dies: a benchmark that fails or is interrupted leaves nothing behind.

pub mod api;
pub mod args;
pub mod echo;
pub mod fanout;
pub mod idle;
pub mod procfs;
pub mod protocol;
pub mod proxies;
pub mod publish;
pub mod rehome;
pub mod rooms;
pub mod rtt;
pub mod socketio;
pub mod steady;
pub mod tls;
pub mod webhooks;
pub mod worker;
pub mod wsraw;

pub use tether_kit::hist::{add_pairs, new_histogram, AtomicHist, Latency};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

/// The hard limit on open files of one process on the machines we measure on. Every process
/// that holds connections is sized to stay under it.
pub const FD_LIMIT: usize = 20_000;
/// Most connections one load-generator child holds (one descriptor each, plus a few).
pub const MAX_PER_WORKER: usize = 9_000;
/// Most tunnels one proxy process can hold: two descriptors each, plus listeners and logs.
pub const MAX_TUNNELS_PER_PROXY: usize = 9_900;
/// Most clients of `fanout` behind one balancer process (two descriptors per tunnel, 20,000 per
/// process, with room for its listeners and logs).
pub const MAX_CLIENTS: usize = MAX_TUNNELS_PER_PROXY - 100;
/// Size of the texts the fan-out publishers send.
pub const TEXT_BYTES: usize = 64;
/// Connections sharing one 127.0.0.x source address (its ephemeral ports run out near 28,000).
pub const CONNECTIONS_PER_SOURCE: usize = 2_000;

/// The `tether` executable to re-run as a worker or echo backend: this one if it is `tether`,
/// else the one [`tether_kit::bin_path`] finds (tests run from their own binary).
pub fn tether_exe() -> Result<PathBuf> {
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "tether") {
            return Ok(exe);
        }
    }
    tether_kit::bin_path("tether")
}

/// `127.0.0.2 ..`: source addresses for `count` connections of load generator `worker`,
/// disjoint between workers so that their ephemeral ports never collide.
pub fn source_addrs(worker: usize, count: usize) -> Vec<IpAddr> {
    let n = count.div_ceil(CONNECTIONS_PER_SOURCE).max(1);
    (0..n)
        .map(|k| {
            // 127.0.(10 + worker).(1 + k): clear of 127.0.0.1, where the servers listen.
            let third = 10 + (worker % 200) as u8;
            IpAddr::V4(Ipv4Addr::new(127, 0, third, 1 + (k % 250) as u8))
        })
        .collect()
}

/// Splits `total` connections into runs of at most `max` for the workers: `(first, count)`.
pub fn split(total: usize, max: usize) -> Vec<(usize, usize)> {
    let parts = total.div_ceil(max.max(1)).max(1);
    let base = total / parts;
    let extra = total % parts;
    let mut first = 0;
    (0..parts)
        .map(|i| {
            let count = base + usize::from(i < extra);
            let run = (first, count);
            first += count;
            run
        })
        .collect()
}

/// `GET path` over HTTP/1.0 from `addr`; the body, if the status is 200.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let get = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .map_err(|_| anyhow!("GET http://{addr}{path}: no answer within 5 s"))?
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("GET http://{addr}{path}: no header end"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET http://{addr}{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

/// Sum of every sample of metric `name` (all label sets) in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = match rest.as_bytes().first() {
                Some(b'{') => &rest[rest.find('}')? + 1..],
                Some(b' ') => rest,
                _ => return None,
            };
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// The median of `xs` (mean of the middle two for an even count); `None` when empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
}

/// Microseconds since the Unix epoch (the clock every process on the machine shares).
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Prints a run's table to stdout and, with `--json FILE`, writes its figures there: the
/// common ending of every `tether bench` and of `tether chaos`.
pub fn print_report(table: &str, report: &impl Serialize, json: Option<&Path>) -> Result<()> {
    print!("{table}");
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(report).context("encoding the report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

/// Writes a temporary file with `text` into `dir` and returns its path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Whether `program --help` mentions `flag` (how the tools find out what a binary supports).
pub async fn supports_flag(program: &Path, flag: &str) -> bool {
    let out = tokio::time::timeout(Duration::from_secs(5), Command::new(program).arg("--help").output()).await;
    matches!(out, Ok(Ok(o)) if String::from_utf8_lossy(&o.stdout).contains(flag))
}

/// Runs one `tether bench` subcommand and returns the process exit code.
pub async fn run_cli(bench: args::BenchArgs) -> Result<i32> {
    use args::BenchKind;
    match bench.kind {
        BenchKind::Rtt(args) => rtt::run_cli(args).await,
        BenchKind::Api(args) => api::run_cli(args).await,
        BenchKind::Idle(args) => idle::run_cli(args).await,
        BenchKind::Fanout(args) => fanout::run_cli(args).await,
        BenchKind::Proxies(args) => proxies::run_cli(args).await,
        BenchKind::Webhooks(args) => webhooks::run_cli(args).await,
        BenchKind::Rehome(args) => rehome::run_cli(args).await,
        BenchKind::EchoBackend(args) => echo::run_cli(args).await,
        BenchKind::Worker(args) => worker::run_cli(args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_everything_in_fair_runs() {
        assert_eq!(split(19_000, 9_000), vec![(0, 6334), (6334, 6333), (12667, 6333)]);
        assert_eq!(split(10, 9_000), vec![(0, 10)]);
        assert_eq!(split(0, 9_000), vec![(0, 0)]);
        let s = split(100_000, MAX_PER_WORKER);
        assert_eq!(s.iter().map(|r| r.1).sum::<usize>(), 100_000);
        assert!(s.iter().all(|r| r.1 <= MAX_PER_WORKER));
    }

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "# HELP x\nfoo_total{node=\"a\"} 3\nfoo_total{node=\"b\"} 4.5\nfoo_totally 9\nfoo 1\n";
        assert_eq!(metric_sum(text, "foo_total"), 7.5);
        assert_eq!(metric_sum(text, "foo"), 1.0);
    }

    #[test]
    fn stamps_round_trip_through_a_message_frame() {
        let text = protocol::text(unix_micros(), 7, TEXT_BYTES);
        assert_eq!(text.len(), 64);
        let frame = tether_proto::wire::ClientMsg::text("r", text).to_json();
        let (t, seq) = protocol::stamp_and_seq(frame.as_bytes()).expect("stamp");
        assert!(unix_micros() >= t);
        assert_eq!(seq, Some(7));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn workers_get_disjoint_sources() {
        let a = source_addrs(0, 9_000);
        let b = source_addrs(1, 9_000);
        assert_eq!(a.len(), 5);
        assert!(a.iter().all(|x| !b.contains(x)));
    }
}
