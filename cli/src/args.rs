//! The command line of `tether`, as clap types. `main.rs` parses it; [`crate::run`] acts on it.

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use tether_proto::logging::LogFormat;

/// Tether operator CLI: local cluster, chat client, benchmarks.
#[derive(Debug, Parser)]
#[command(name = "tether", version, propagate_version = true)]
pub struct Cli {
    /// Format of tether's own log lines on stderr (`RUST_LOG` filters them; default `warn`).
    #[arg(long, global = true, default_value = "text", value_name = "text|json")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local cluster (redis-server, N nodes, one balancer) until Ctrl-C.
    Up(UpArgs),
    /// Interactive line client: commands and messages from stdin, events on stdout.
    Chat(ChatArgs),
    /// Benchmarks.
    Bench(BenchArgs),
    /// Kill and restart nodes under load and check that no message is lost or duplicated.
    Chaos(ChaosArgs),
    /// Compare single node, sticky only, Redis and NATS backbones.
    Compare(CompareArgs),
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of nodes (node-1 … node-N).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub nodes: u16,
    /// Use this Redis instead of starting a private redis-server.
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Balancer address for clients (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Balancer admin address (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:9100", value_name = "ADDR")]
    pub admin: SocketAddr,
    /// Write each process' log to DIR/NAME.log instead of this terminal.
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
    /// Seconds each process gets to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub grace: f64,
    /// Start a private nats-server and run the nodes on the NATS backbone.
    #[arg(long)]
    pub nats: bool,
    /// Extra argument for every node (repeatable), e.g. `--node-arg=--backbone=none`.
    #[arg(long = "node-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
    /// Extra argument for the balancer (repeatable), e.g. `--balancer-arg=--health-interval-ms=100`.
    #[arg(long = "balancer-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub balancer_args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// WebSocket URL of a balancer or node, e.g. ws://127.0.0.1:8080/ws
    pub url: String,
    /// Client id to connect as (sent as ?client=ID; decides the node behind a balancer).
    #[arg(long, value_name = "ID")]
    pub client: Option<String>,
    /// Display name, sent with set_name once connected.
    #[arg(long)]
    pub name: Option<String>,
}

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
    /// A minimal WebSocket echo server (the backend of `bench proxies`).
    EchoBackend(EchoArgs),
    /// A load-generator child of `bench idle`/`fanout` (started by them, not by people).
    #[command(hide = true)]
    Worker(WorkerArgs),
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

/// Arguments of a subcommand that is not implemented yet: anything is accepted.
#[derive(Debug, Args)]
pub struct LaterArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ChaosArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub nodes: u16,
    /// Number of clients (ids chaos-0 …), each in 1–3 rooms.
    #[arg(long, default_value_t = 60, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub clients: u32,
    /// Number of rooms.
    #[arg(long, default_value_t = 6, value_name = "R", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rooms: u32,
    /// Messages per second, all clients together.
    #[arg(long, default_value_t = 100.0, value_name = "MSG_PER_S", value_parser = positive)]
    pub rate: f64,
    /// Kill a random node with SIGKILL every SECS seconds (0: never).
    #[arg(long, default_value_t = 5.0, value_name = "SECS", value_parser = non_negative)]
    pub kill_every: f64,
    /// Length of the load phase.
    #[arg(long, default_value_t = 30.0, value_name = "SECS", value_parser = positive)]
    pub duration: f64,
    /// Also kill and restart Redis once, halfway (Redis then keeps an fsync'ed append-only file).
    #[arg(long, conflicts_with = "nats")]
    pub redis_restart: bool,
    /// Run the nodes on a private nats-server (the NATS backbone) instead of Redis.
    #[arg(long)]
    pub nats: bool,
    /// Write the final figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Seed of every random choice (rooms, send order, victims); default: from the clock.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Time between a node's SIGKILL and its restart.
    #[arg(long, default_value_t = 500, value_name = "MS")]
    pub restart_delay_ms: u64,
    /// Longest wait after the load for every client to catch up.
    #[arg(long, default_value_t = 15.0, value_name = "SECS", value_parser = positive)]
    pub drain_timeout: f64,
    /// Write each process' log to DIR/NAME.log (silenced otherwise).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

fn at_least_one(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 1.0 => Ok(x),
        _ => Err(format!("{s:?} is not a number ≥ 1")),
    }
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a number ≥ 0")),
    }
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Smoke run for CI: 30 clients in 3 rooms, a 2 s fixed phase, 0.5 s steps (all four modes
    /// in well under a minute).
    #[arg(long)]
    pub quick: bool,
    /// Output directory (created): compare.md, compare.json, latency-cdf.svg, max-rate.svg.
    #[arg(long, default_value = "./compare-out", value_name = "DIR")]
    pub out: PathBuf,
    /// Modes to run (always in the order single, sticky, redis, nats).
    #[arg(long, value_delimiter = ',', default_value = "single,sticky,redis,nats", value_name = "LIST")]
    pub modes: Vec<crate::compare::Mode>,
    /// Clients, each in one room [default: 90; --quick 30].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=5_000).map(|n| n as usize))]
    pub clients: Option<usize>,
    /// Rooms; clients are dealt round robin [default: 6; --quick 3].
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..=5_000).map(|n| n as usize))]
    pub rooms: Option<usize>,
    /// Rate of the fixed phase and of the node loss, all publishers together [default: 200].
    #[arg(long, value_name = "MSG_PER_S", value_parser = positive)]
    pub rate: Option<f64>,
    /// Length of the fixed phase [default: 8; --quick 2].
    #[arg(long, value_name = "SECS", value_parser = positive)]
    pub secs: Option<f64>,
    /// Step-up rates [default: 250,500,1000,2000,4000,8000,16000; --quick 250,500,1000,2000,4000].
    #[arg(long, value_delimiter = ',', value_name = "A,B,C", value_parser = positive)]
    pub steps: Option<Vec<f64>>,
    /// Length of each step [default: 1.5; --quick 0.5].
    #[arg(long, value_name = "SECS", value_parser = positive)]
    pub step_secs: Option<f64>,
    /// A step whose p99 latency exceeds this is not sustained.
    #[arg(long, default_value_t = crate::compare::DEFAULT_P99_BOUND_MS, value_name = "MS", value_parser = positive)]
    pub p99_bound_ms: f64,
    /// Write each mode's process logs to DIR/MODE/ [default: OUT/logs].
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
    /// Seed of the client ids (which node each client lands on); default: from the clock.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn rtt_targets_come_in_pairs() {
        let only_one = Cli::try_parse_from(["tether", "bench", "rtt", "--balancer-url", "ws://x"]);
        assert!(only_one.is_err());
        let both =
            Cli::try_parse_from(["tether", "bench", "rtt", "--balancer-url", "ws://a/ws", "--direct-url", "ws://b/ws"]);
        assert!(both.is_ok());
    }

    #[test]
    fn chaos_flags_parse_and_bad_numbers_are_usage_errors() {
        let ok = Cli::try_parse_from([
            "tether",
            "chaos",
            "--nodes",
            "3",
            "--clients",
            "300",
            "--rate",
            "200",
            "--kill-every",
            "5",
            "--duration",
            "60",
            "--redis-restart",
            "--json",
            "x",
            "--seed",
            "9",
            "--restart-delay-ms",
            "100",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
        for bad in [["--rate", "0"], ["--duration", "-1"], ["--kill-every", "nan"], ["--clients", "0"]] {
            let argv = ["tether", "chaos", bad[0], bad[1]];
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
        assert!(Cli::try_parse_from(["tether", "chaos", "--kill-every", "0"]).is_ok());
    }

    #[test]
    fn compare_flags_parse_and_bad_values_are_usage_errors() {
        assert!(Cli::try_parse_from(["tether", "compare", "--quick", "--out", "d"]).is_ok());
        assert!(Cli::try_parse_from(["tether", "compare", "--modes", "single,redis", "--steps", "100,200"]).is_ok());
        for bad in [["--modes", "kafka"], ["--steps", "100,0"], ["--clients", "0"], ["--p99-bound-ms", "-5"]] {
            let argv = ["tether", "compare", bad[0], bad[1]];
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn steady_fanout_flags_parse_and_misuse_is_a_usage_error() {
        let fanout = |argv: &[&str]| match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Bench(BenchArgs { kind: BenchKind::Fanout(a) })) => Ok(a),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let a = fanout(&["tether", "bench", "fanout", "--steady"]).expect("bare --steady");
        assert_eq!(a.steady.as_deref(), Some(&[1000.0, 2000.0, 4000.0, 8000.0, 16000.0][..]));
        assert_eq!((a.vs, a.rooms, a.step_secs), (None, None, None));
        let a = fanout(&["tether", "bench", "fanout", "--steady", "500,1500", "--vs", "socketio", "--step-secs", "3"])
            .expect("steps and --vs");
        assert_eq!(a.steady.as_deref(), Some(&[500.0, 1500.0][..]));
        assert_eq!(a.vs, Some(Versus::Socketio));
        assert!(fanout(&["tether", "bench", "fanout", "--steady", "--quick", "--vs", "socketio"]).is_ok());
        assert!(fanout(&["tether", "bench", "fanout", "--steady", "--through-balancer"]).is_ok());
        for argv in [
            &["tether", "bench", "fanout", "--vs", "socketio"][..],
            &["tether", "bench", "fanout", "--steady", "--vs", "centrifugo"],
            &["tether", "bench", "fanout", "--steady", "1000,0"],
            &["tether", "bench", "fanout", "--steady", "--rates", "100"],
            &["tether", "bench", "fanout", "--steady", "--direct"],
            &["tether", "bench", "fanout", "--steady", "--ramp-secs", "0.5"],
            &["tether", "bench", "fanout", "--through-balancer"],
        ] {
            assert!(fanout(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn bench_flags_parse_and_bad_values_are_usage_errors() {
        let fanout = Cli::try_parse_from(["tether", "bench", "fanout", "--rooms", "10", "--rates", "100,200.5,400"]);
        match fanout.map(|c| c.command) {
            Ok(Command::Bench(BenchArgs { kind: BenchKind::Fanout(a) })) => assert_eq!(a.rates, [100.0, 200.5, 400.0]),
            other => panic!("{other:?}"),
        }
        for argv in [
            &[
                "tether",
                "bench",
                "idle",
                "--clients",
                "100000",
                "--through-balancer",
                "--nodes",
                "6",
                "--balancers",
                "12",
            ][..],
            &["tether", "bench", "idle", "--quick"],
            &["tether", "bench", "proxies", "--quick", "--targets", "direct,balancer"],
            &["tether", "bench", "echo-backend", "--listen", "127.0.0.1:0"],
        ] {
            assert!(Cli::try_parse_from(argv).is_ok(), "{argv:?}");
        }
        for argv in [
            &["tether", "bench", "idle", "--clients", "0"][..],
            &["tether", "bench", "fanout", "--rates", "100,0"],
            &["tether", "bench", "proxies", "--idle", "10000"],
            &["tether", "bench", "fanout", "--whatever"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }
}
