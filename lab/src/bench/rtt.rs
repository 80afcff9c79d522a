//! `tether bench rtt`: round-trip latency through the balancer compared with going straight
//! to a node.
//!
//! Two clients, each alone in its own fresh room: D connects directly to a node, B through
//! the balancer. Each sends one `message` at a time and waits for its own echo, which the
//! node delivers only after the message went through Redis and came back on the room's
//! subscription — so one sample is a full client → node → Redis → node → client trip (plus
//! the proxy hop for B). Rounds alternate D, B, D, B, … so that drift on the machine (other
//! work, CPU frequency) hits both targets alike. Samples go into one HDR histogram per target.
//!
//! The clock stops when the echo frame arrives, before it is parsed; the outgoing frame is
//! serialised before the clock starts. Both connections disable Nagle's algorithm.

use super::args::RttArgs;
use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tether_kit::url::connect_url;
use tether_kit::{Cluster, ClusterLogs, ClusterOptions};
use tether_proto::wire::{decode_node_frame, ClientMsg, NodeFrame, NodeFrameError};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Size of each message's `text`, in bytes.
pub const MESSAGE_BYTES: usize = 64;
/// Longest wait for one echo (or for the join) before the run is declared broken.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);
/// Histogram range: 1 µs to 60 s, 3 significant digits.
const HIST_MAX_US: u64 = 60_000_000;

/// Where to measure.
#[derive(Debug, Clone)]
pub struct Targets {
    /// The balancer's WebSocket URL.
    pub balancer: String,
    /// One node's WebSocket URL.
    pub direct: String,
}

/// What `tether bench rtt` runs.
#[derive(Debug, Clone)]
pub struct RttOptions {
    /// Messages per round and target.
    pub count: u32,
    pub rounds: u32,
    /// Unrecorded messages per target before the first round.
    pub warmup: u32,
    /// An existing cluster; `None` starts a private one (Redis, 2 nodes, balancer).
    pub targets: Option<Targets>,
    /// Log directory for the private cluster (silenced otherwise).
    pub logs: Option<PathBuf>,
}

impl From<RttArgs> for RttOptions {
    fn from(a: RttArgs) -> Self {
        let targets = match (a.balancer_url, a.direct_url) {
            (Some(balancer), Some(direct)) => Some(Targets { balancer, direct }),
            _ => None,
        };
        Self { count: a.count, rounds: a.rounds, warmup: a.warmup, targets, logs: a.logs }
    }
}

/// Latency figures of a set of samples, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub samples: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Summary {
    fn of(h: &Histogram<u64>) -> Self {
        Self {
            samples: h.len(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// One round of one target.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    pub elapsed_ms: f64,
    #[serde(flatten)]
    pub summary: Summary,
}

/// All rounds of one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// `direct` or `balancer`.
    pub target: String,
    pub url: String,
    /// The node that served the connection (from its `connected` frame).
    pub server: Option<String>,
    #[serde(flatten)]
    pub summary: Summary,
    pub rounds: Vec<RoundReport>,
}

/// Balancer figure divided by direct figure.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub p50: f64,
    pub p99: f64,
}

/// The whole run, as written by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct RttReport {
    pub bench: &'static str,
    pub count: u32,
    pub rounds: u32,
    pub warmup: u32,
    pub message_bytes: usize,
    pub direct: TargetReport,
    pub balancer: TargetReport,
    /// balancer / direct.
    pub ratio: Ratio,
}

impl RttReport {
    /// The results as a markdown table plus the ratio line.
    pub fn table(&self) -> String {
        let mut s = String::from(
            "| target | samples | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs |\n\
             |:--|--:|--:|--:|--:|--:|--:|\n",
        );
        for t in [&self.direct, &self.balancer] {
            let who = match &t.server {
                Some(server) => format!("{} (→ {server})", t.target),
                None => t.target.clone(),
            };
            let m = &t.summary;
            s.push_str(&format!(
                "| {who} | {} | {} | {} | {} | {} | {} |\n",
                m.samples, m.p50_us, m.p90_us, m.p99_us, m.p999_us, m.max_us
            ));
        }
        s.push_str(&format!("\nbalancer/direct: p50 ×{:.2}, p99 ×{:.2}\n", self.ratio.p50, self.ratio.p99));
        s
    }
}

/// `tether bench rtt`: runs, prints progress and the table, writes `--json`.
pub async fn run_cli(args: RttArgs) -> Result<i32> {
    let json_path = args.json.clone();
    let opts = RttOptions::from(args);
    let mut stdout = std::io::stdout();
    let report = run(&opts, &mut stdout).await?;
    println!();
    super::print_report(&report.table(), &report, json_path.as_deref())?;
    Ok(0)
}

/// Runs the benchmark (starting and stopping a private cluster unless `opts.targets` is
/// set), printing progress lines to `out`.
pub async fn run<W: Write>(opts: &RttOptions, out: &mut W) -> Result<RttReport> {
    if opts.count == 0 || opts.rounds == 0 {
        bail!("--count and --rounds must be at least 1");
    }
    let (cluster, targets) = match &opts.targets {
        Some(t) => (None, t.clone()),
        None => {
            writeln!(out, "starting a private cluster: redis-server, 2 nodes, balancer")?;
            let logs = match &opts.logs {
                Some(dir) => ClusterLogs::Dir(dir.clone()),
                None => ClusterLogs::Null,
            };
            let cluster = Cluster::start(ClusterOptions { nodes: 2, logs, ..ClusterOptions::default() }).await?;
            let targets = Targets { balancer: cluster.ws_url(), direct: cluster.nodes()[0].ws_url() };
            (Some(cluster), targets)
        }
    };
    let result = measure(opts, &targets, out).await;
    if let Some(mut cluster) = cluster {
        cluster.shutdown(Duration::from_secs(5)).await?;
    }
    result
}

async fn measure<W: Write>(opts: &RttOptions, targets: &Targets, out: &mut W) -> Result<RttReport> {
    // Unique per run, so that repeated runs against one Redis never share a room or a session.
    let tag = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
    );
    let mut direct = Client::connect("direct", &targets.direct, &tag).await?;
    let mut balancer = Client::connect("balancer", &targets.balancer, &tag).await?;
    writeln!(
        out,
        "direct   {} (node {})\nbalancer {} (node {})",
        direct.url,
        direct.server.as_deref().unwrap_or("?"),
        balancer.url,
        balancer.server.as_deref().unwrap_or("?")
    )?;
    if opts.warmup > 0 {
        for client in [&mut direct, &mut balancer] {
            for i in 0..opts.warmup {
                client.round_trip(&payload(client.label, 0, i)).await?;
            }
        }
        writeln!(out, "warm-up: {} messages per target", opts.warmup)?;
    }

    let mut totals = [new_histogram(), new_histogram()];
    let mut rounds: [Vec<RoundReport>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=opts.rounds {
        for (k, client) in [&mut direct, &mut balancer].into_iter().enumerate() {
            let mut h = new_histogram();
            let started = Instant::now();
            for i in 0..opts.count {
                let rtt = client.round_trip(&payload(client.label, round, i)).await?;
                let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
                h.saturating_record(us);
            }
            let elapsed = started.elapsed();
            totals[k].add(&h).context("merging histograms")?;
            let summary = Summary::of(&h);
            writeln!(
                out,
                "round {round}/{} {:<8} {} msgs in {:.2} s  p50 {} µs  p99 {} µs  max {} µs",
                opts.rounds,
                client.label,
                opts.count,
                elapsed.as_secs_f64(),
                summary.p50_us,
                summary.p99_us,
                summary.max_us
            )?;
            out.flush()?;
            rounds[k].push(RoundReport {
                round,
                elapsed_ms: (elapsed.as_secs_f64() * 10_000.0).round() / 10.0,
                summary,
            });
        }
    }
    direct.close().await;
    balancer.close().await;

    let [d_rounds, b_rounds] = rounds;
    let direct = direct.report(&totals[0], d_rounds);
    let balancer = balancer.report(&totals[1], b_rounds);
    let ratio = |b: u64, d: u64| ((b as f64 / d.max(1) as f64) * 100.0).round() / 100.0;
    Ok(RttReport {
        bench: "rtt",
        count: opts.count,
        rounds: opts.rounds,
        warmup: opts.warmup,
        message_bytes: MESSAGE_BYTES,
        ratio: Ratio {
            p50: ratio(balancer.summary.p50_us, direct.summary.p50_us),
            p99: ratio(balancer.summary.p99_us, direct.summary.p99_us),
        },
        direct,
        balancer,
    })
}

fn new_histogram() -> Histogram<u64> {
    tether_kit::hist::histogram_up_to(HIST_MAX_US)
}

/// A `MESSAGE_BYTES`-long text that names its target, round and index.
fn payload(label: &str, round: u32, i: u32) -> String {
    let mut text = format!("{label}-r{round}-{i:07}-");
    while text.len() < MESSAGE_BYTES {
        text.push('x');
    }
    text
}

/// One benchmark connection, alone in its own room.
struct Client {
    label: &'static str,
    url: String,
    id: String,
    room: String,
    server: Option<String>,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    /// This target's part of the report: its connection, the figures over all its rounds
    /// (`total`) and each round's.
    fn report(&self, total: &Histogram<u64>, rounds: Vec<RoundReport>) -> TargetReport {
        TargetReport {
            target: self.label.into(),
            url: self.url.clone(),
            server: self.server.clone(),
            summary: Summary::of(total),
            rounds,
        }
    }

    /// Connects as `bench-rtt-LABEL-TAG`, joins room `bench-rtt-TAG-LABEL` and waits for its own
    /// `user_joined`, which says the node's subscription to the room is live.
    async fn connect(label: &'static str, base: &str, tag: &str) -> Result<Self> {
        let id = format!("bench-rtt-{label}-{tag}");
        let url = connect_url(base, Some(&id))?;
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true)
            .await
            .with_context(|| format!("{label}: connecting to {url}"))?;
        let mut client =
            Self { label, url: base.to_owned(), id, room: format!("bench-rtt-{tag}-{label}"), server: None, ws };
        let join = ClientMsg::Join { room: client.room.clone() }.to_json();
        client.ws.send(Message::text(join)).await?;
        let deadline = tokio::time::Instant::now() + ECHO_TIMEOUT;
        loop {
            match client.next_frame(deadline).await? {
                Some(NodeFrame::Connected { server, .. }) => {
                    client.server = (!server.is_empty()).then_some(server);
                }
                Some(NodeFrame::UserJoined { id, .. }) if id == client.id => return Ok(client),
                Some(error @ NodeFrame::Error { .. }) => bail!("{label}: join refused: {}", error.to_json()),
                _ => {}
            }
        }
    }

    /// The next JSON text frame, by `deadline`; `None` for a JSON object that is not a node
    /// frame this version knows.
    async fn next_frame(&mut self, deadline: tokio::time::Instant) -> Result<Option<NodeFrame>> {
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("{}: no answer within {ECHO_TIMEOUT:?}", self.label))?;
            match msg {
                Some(Ok(Message::Text(text))) => return self.decode(&text),
                Some(Ok(Message::Close(frame))) => {
                    bail!("{}: the server closed the connection: {frame:?}", self.label)
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("{}: connection lost: {e}", self.label),
                None => bail!("{}: connection closed", self.label),
            }
        }
    }

    fn decode(&self, text: &str) -> Result<Option<NodeFrame>> {
        match decode_node_frame(text) {
            Ok(frame) => Ok(Some(frame)),
            Err(NodeFrameError::Invalid(why)) => bail!("{}: frame is not JSON: {text}: {why}", self.label),
            Err(NodeFrameError::Unknown(_) | NodeFrameError::Malformed(..)) => Ok(None),
        }
    }

    /// Sends `text` to the room and returns the time until its own echo arrived.
    async fn round_trip(&mut self, text: &str) -> Result<Duration> {
        let frame = Message::text(ClientMsg::text(self.room.clone(), text).to_json());
        let deadline = tokio::time::Instant::now() + ECHO_TIMEOUT;
        let started = Instant::now();
        self.ws.send(frame).await.with_context(|| format!("{}: sending", self.label))?;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("{}: no echo within {ECHO_TIMEOUT:?}", self.label))?;
            let elapsed = started.elapsed();
            let text_frame = match msg {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(frame))) => {
                    bail!("{}: the server closed the connection: {frame:?}", self.label)
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("{}: connection lost: {e}", self.label),
                None => bail!("{}: connection closed", self.label),
            };
            match self.decode(&text_frame)? {
                Some(NodeFrame::Message(m)) if m.id == self.id && m.text == text => return Ok(elapsed),
                Some(error @ NodeFrame::Error { .. }) => {
                    bail!("{}: the node refused a message: {}", self.label, error.to_json())
                }
                _ => {}
            }
        }
    }

    async fn close(&mut self) {
        let _ = self.ws.close(None).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_the_advertised_size() {
        assert_eq!(payload("balancer", 5, 1_999_999).len(), MESSAGE_BYTES);
        assert_eq!(payload("direct", 0, 0).len(), MESSAGE_BYTES);
        assert_ne!(payload("direct", 1, 2), payload("direct", 2, 1));
    }

    #[test]
    fn summaries_read_the_histogram() {
        let mut h = new_histogram();
        for v in 1..=1000 {
            h.saturating_record(v);
        }
        let s = Summary::of(&h);
        assert_eq!(s.samples, 1000);
        assert!((499..=501).contains(&s.p50_us), "{s:?}");
        assert!((989..=991).contains(&s.p99_us), "{s:?}");
        assert_eq!(s.max_us, 1000);
    }
}
