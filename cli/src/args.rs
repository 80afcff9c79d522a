//! The command line of `tether`, as clap types. `main.rs` parses it; [`crate::run`] acts on it.

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
    /// Memory and CPU of many idle connections (planned).
    Idle(LaterArgs),
    /// Fan-out throughput of busy rooms (planned).
    Fanout(LaterArgs),
    /// Proxy overhead compared with other proxies (planned).
    Proxies(LaterArgs),
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
    #[arg(long)]
    pub redis_restart: bool,
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

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a number ≥ 0")),
    }
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Shorter runs, for CI.
    #[arg(long)]
    pub quick: bool,
    /// Output directory.
    #[arg(long, default_value = "./compare-out", value_name = "DIR")]
    pub out: PathBuf,
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
    fn planned_subcommands_accept_their_flags() {
        for argv in [
            &["tether", "compare", "--quick", "--out", "d"][..],
            &["tether", "bench", "fanout", "--rooms", "10", "--whatever"],
        ] {
            assert!(Cli::try_parse_from(argv).is_ok(), "{argv:?}");
        }
    }
}
