//! The command line of `tether bench`, as clap types: the CLI composes [`BenchArgs`] into its
//! own parser; [`super::run_cli`] acts on it.

use crate::flags::{at_least_one, non_negative, positive};
use clap::builder::TypedValueParser as _;
use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub kind: BenchKind,
}

#[derive(Debug, Subcommand)]
pub enum BenchKind {
    /// Round-trip latency of one client through the balancer vs. straight to a node.
    Rtt(RttArgs),
    /// Memory per idle connection of nodes and balancers, at up to 100,000 clients.
    Idle(IdleArgs),
    /// Fan-out of busy rooms over three nodes: delivered msg/s, latency, who saturates.
    Fanout(FanoutArgs),
    /// tether-balancer against HAProxy and nginx (and direct) on echo workloads.
    Proxies(ProxiesArgs),
    /// The server API: POST /api/publish through the balancer at a steady rate and at
    /// saturation; call latency, throughput, publish → delivery latency.
    Api(ApiArgs),
    /// Webhook events/s: clients connecting, joining and leaving in a loop against a local
    /// receiver; decided and delivered events/s, decision → delivery latency.
    Webhooks(WebhooksArgs),
    /// The balancer's `--failover rehome` against `reconnect`: CPU per proxied frame and
    /// latency at fixed rates, and the switch time of clients when their node is killed or
    /// drained.
    Rehome(RehomeArgs),
    /// A minimal WebSocket echo server (the backend of `bench proxies`).
    EchoBackend(EchoArgs),
    /// A load-generator child of `bench idle`/`fanout` (started by them, not by people).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Calls per second of the steady phase, all connections together.
    #[arg(long, default_value_t = 500.0, value_name = "N", value_parser = positive)]
    pub rate: f64,
    /// Seconds each phase (steady, saturation) runs.
    #[arg(long, default_value_t = 10.0, value_name = "S", value_parser = positive)]
    pub duration: f64,
    /// Keep-alive HTTP/1.1 connections publishing at once.
    #[arg(long, default_value_t = 16, value_name = "C", value_parser = clap::value_parser!(u16).range(1..=1024).map(usize::from))]
    pub concurrency: usize,
    /// Nodes behind the balancer.
    #[arg(long, default_value_t = 3, value_name = "K", value_parser = clap::value_parser!(u16).range(1..=16).map(usize::from))]
    pub nodes: usize,
    /// Write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the servers' logs to DIR.
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct IdleArgs {
    /// Idle clients to open.
    #[arg(long, default_value_t = 19_000, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=200_000).map(|n| n as usize))]
    pub clients: usize,
    /// Connect through the balancer(s) instead of straight to the nodes.
    #[arg(long)]
    pub through_balancer: bool,
    /// Nodes; direct clients go to them round robin.
    #[arg(long, default_value_t = 1, value_name = "K", value_parser = clap::value_parser!(u16).range(1..=64).map(usize::from))]
    pub nodes: usize,
    /// Balancer processes (default: as many as 20,000 descriptors per process require, one
    /// per 9,900 tunnels). They share one port with --reuse-port when the balancer has it.
    #[arg(long, value_name = "B", value_parser = clap::value_parser!(u16).range(1..=64).map(usize::from))]
    pub balancers: Option<usize>,
    /// Give each balancer its own port even if it supports --reuse-port.
    #[arg(long)]
    pub separate_ports: bool,
    /// Connections being set up at once per load generator [default: 64 direct, 8 through the
    /// balancer, whose 1 s connect timeout marks a node down when a connection storm fills the
    /// node's accept queue].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    pub concurrency: Option<usize>,
    /// Seconds to wait after the last connection before reading memory again.
    #[arg(long, default_value_t = 2.0, value_name = "SECS", value_parser = non_negative)]
    pub settle_secs: f64,
    /// Smoke run: 300 clients, one node, done in a few seconds.
    #[arg(long)]
    pub quick: bool,
    /// Write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the servers' logs to DIR.
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Rooms [default: 20; --steady 10].
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..=10_000).map(|n| n as usize))]
    pub rooms: Option<usize>,
    /// Members per room (load-generator clients) [default: 250; --steady 100].
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u32).range(1..=100_000).map(|n| n as usize))]
    pub members: Option<usize>,
    /// Published messages per second, all rooms together, one step per rate.
    #[arg(long, default_value = "100,200,400,800,1600,3200,6400,12800", value_name = "A,B,C", value_delimiter = ',', value_parser = positive, conflicts_with = "steady")]
    pub rates: Vec<f64>,
    /// Steady mode: fixed-rate steps (published msg/s, all rooms together), each measured for
    /// CPU per delivery, exact delivery accounting and tail latency; clients connect straight
    /// to the nodes [default steps: 1000,2000,4000,8000,16000].
    #[arg(long, value_name = "RATE,…", num_args = 0..=1, value_delimiter = ',', value_parser = positive, default_missing_value = "1000,2000,4000,8000,16000")]
    pub steady: Option<Vec<f64>>,
    /// Steady mode: run the same steps against another system too, with the same clients,
    /// rooms and Redis (`socketio`: Socket.IO 4 with @socket.io/redis-adapter on Node.js).
    #[arg(long, value_name = "SYSTEM", requires = "steady")]
    pub vs: Option<Versus>,
    /// Steady mode: Tether's clients connect through its balancer (whose CPU then counts as
    /// Tether's) instead of straight to the nodes.
    #[arg(long, requires = "steady")]
    pub through_balancer: bool,
    /// Steady mode: unmeasured seconds before each step's window (at least 1).
    #[arg(long, default_value_t = 1.0, value_name = "SECS", value_parser = at_least_one, requires = "steady")]
    pub ramp_secs: f64,
    /// Steady mode with --vs socketio: where Socket.IO's npm packages are installed (npm ci)
    /// [default: target/socketio next to the tether binary, else ~/.cache/tether/socketio].
    #[arg(long, value_name = "DIR", requires = "vs")]
    pub socketio_dir: Option<PathBuf>,
    /// Seconds measured per rate, after the ramp [default: 5; --steady 10].
    #[arg(long, value_name = "SECS", value_parser = positive)]
    pub step_secs: Option<f64>,
    /// Nodes [default: 3; --steady 2 (and as many Socket.IO processes)].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u16).range(1..=16).map(usize::from))]
    pub nodes: Option<usize>,
    /// Rate of the backbone-hop measurement (publisher on node-1, member on node-2; 0 skips it).
    #[arg(long, default_value_t = 10_000.0, value_name = "MSG_PER_S", value_parser = non_negative)]
    pub hop_rate: f64,
    /// Members and publishers connect straight to the nodes (round robin) instead of through
    /// the balancer: shows what the balancer's hop costs. (The steady mode always does.)
    #[arg(long, conflicts_with = "steady")]
    pub direct: bool,
    /// Runtime worker threads of each node (its `--threads`). Default: the machine's cores
    /// shared among the nodes, at least one each (1 for 3 nodes on 2 cores); the node's own
    /// default is one per core.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024).map(usize::from))]
    pub node_threads: Option<usize>,
    /// Smoke run: 4 rooms of 10 members, two short steps.
    #[arg(long)]
    pub quick: bool,
    /// Write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the servers' logs to DIR.
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

/// What `tether bench fanout --steady --vs` compares Tether with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Versus {
    /// Socket.IO 4 with @socket.io/redis-adapter, one Node.js process per node.
    Socketio,
}

#[derive(Debug, Args)]
pub struct ProxiesArgs {
    /// Targets, in the order each round visits them (direct = straight to one backend).
    #[arg(long, default_value = "direct,balancer,haproxy,nginx", value_delimiter = ',', value_name = "LIST")]
    pub targets: Vec<String>,
    /// Rounds per workload; targets alternate within each round.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=50))]
    pub rounds: u32,
    /// Seconds each target is measured per round and workload.
    #[arg(long, default_value_t = 4.0, value_name = "SECS", value_parser = positive)]
    pub secs: f64,
    /// (a) closed-loop echo: connections.
    #[arg(long, default_value_t = 200, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=5_000).map(|n| n as usize))]
    pub echo_conns: usize,
    /// (b) fixed rate: connections.
    #[arg(long, default_value_t = 100, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=5_000).map(|n| n as usize))]
    pub rate_conns: usize,
    /// (b) fixed rate: messages per second, all connections together.
    #[arg(long, default_value_t = 5_000.0, value_name = "MSG_PER_S", value_parser = positive)]
    pub rate: f64,
    /// (c) connection setup: connections being set up at once.
    #[arg(long, default_value_t = 50, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000).map(|n| n as usize))]
    pub setup_concurrency: usize,
    /// (d) idle tunnels per proxy (at most 9,900: two descriptors per tunnel, 20,000 per process).
    #[arg(long, default_value_t = 9_500, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=9_900).map(|n| n as usize))]
    pub idle: usize,
    /// Message size in bytes, (a) and (b).
    #[arg(long, default_value_t = 64, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(16..=65_536).map(|n| n as usize))]
    pub message_bytes: usize,
    /// Every proxy terminates TLS on its client side (same ECDSA P-256 certificate for all;
    /// clients offer only TLS 1.3 with TLS_AES_128_GCM_SHA256 and X25519); backends stay
    /// plain, and so does `direct` (the floor).
    #[arg(long)]
    pub tls: bool,
    /// With --tls: clients and proxies keep and resume TLS sessions (otherwise every connect
    /// is a full hand-shake).
    #[arg(long, requires = "tls")]
    pub tls_resume: bool,
    /// (c) connection set-ups per second of the fixed-rate pass (hand-shake latency and proxy
    /// CPU per set-up at a steady rate); 0 skips it [default: 300 with --tls, else 0].
    #[arg(long, value_name = "N", value_parser = non_negative)]
    pub connect_rate: Option<f64>,
    /// Do not apt-get install haproxy/nginx when missing (skip those targets instead).
    #[arg(long)]
    pub no_install: bool,
    /// Smoke run: one short round, 200 idle tunnels.
    #[arg(long)]
    pub quick: bool,
    /// Write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Keep the proxies' configuration and logs in DIR.
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RehomeArgs {
    /// Nodes behind both balancers (2 or 3) [default: 3; --quick 2].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u16).range(2..=3).map(usize::from))]
    pub nodes: Option<usize>,
    /// (a) rooms per balancer [default: 4].
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..=100).map(|n| n as usize))]
    pub rooms: Option<usize>,
    /// (a) clients per room, one of which publishes [default: 25].
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u32).range(1..=500).map(|n| n as usize))]
    pub members: Option<usize>,
    /// (a) room-message deliveries per second of each step, all clients together
    /// [default: 2000,5000].
    #[arg(long, value_name = "A,B", value_delimiter = ',', value_parser = positive)]
    pub rates: Option<Vec<f64>>,
    /// (a) rounds; each measures both modes at every rate, the order alternating [default: 3].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=50))]
    pub rounds: Option<u32>,
    /// (a) seconds measured per mode, rate and round [default: 5].
    #[arg(long, value_name = "SECS", value_parser = positive)]
    pub step_secs: Option<f64>,
    /// (b) clients on the node that is killed or drained [default: 100].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=2000).map(|n| n as usize))]
    pub clients: Option<usize>,
    /// (b) messages per second the publishers send to those clients' rooms [default: 100].
    #[arg(long, value_name = "MSG_PER_S", value_parser = positive)]
    pub switch_rate: Option<f64>,
    /// (b) SIGKILL rounds (the node is restarted between them) [default: 5].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=50))]
    pub kills: Option<u32>,
    /// (b) drain rounds (the node is undrained between them) [default: 3].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=50))]
    pub drains: Option<u32>,
    /// Smoke run: 2 nodes, 10 clients per balancer, one short step, 2 kills and 1 drain.
    #[arg(long)]
    pub quick: bool,
    /// Write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the servers' logs to DIR.
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EchoArgs {
    /// Address to listen on (port 0 = any free port; the ready line says which).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub listen: SocketAddr,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The worker's job, as JSON (see `bench::worker::WorkerSpec`).
    #[arg(long, value_name = "JSON")]
    pub spec: String,
}

#[derive(Debug, Args)]
pub struct WebhooksArgs {
    /// Client loops running at once (each: connect, join, close, with a fresh id).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=5000).map(|n| n as usize))]
    pub clients: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0, value_parser = positive)]
    pub duration: f64,
    /// Nodes (the loops spread over them round robin).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16).map(usize::from))]
    pub nodes: usize,
    /// Rooms the loops join (loop i joins room i mod ROOMS).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    pub rooms: usize,
    /// The offline grace (ms): graced events go out this much later.
    #[arg(long, default_value_t = 200)]
    pub grace_ms: u64,
    /// Run with webhooks off too and show the connect/join/close rate side by side.
    #[arg(long)]
    pub compare_off: bool,
    /// Write the processes' logs to DIR.
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RttArgs {
    /// Messages per round and target.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Rounds per target, alternating direct and balancer.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Unrecorded messages per target before the first round (warms buffers, allocators,
    /// Redis).
    #[arg(long, default_value_t = 200)]
    pub warmup: u32,
    /// Write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Measure an existing cluster: the balancer's WebSocket URL (needs --direct-url).
    #[arg(long, value_name = "WS", requires = "direct_url")]
    pub balancer_url: Option<String>,
    /// Measure an existing cluster: one node's WebSocket URL (needs --balancer-url).
    #[arg(long, value_name = "WS", requires = "balancer_url")]
    pub direct_url: Option<String>,
    /// When starting its own cluster: write the processes' logs to DIR.
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}
