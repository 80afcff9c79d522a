//! `tether`, the operator's CLI, as a library: the binary only parses arguments and calls
//! [`run`].
//!
//! Layout:
//! - [`cluster`]: local clusters as child processes (private `redis-server`, `tether-node`s,
//!   `tether-balancer`), killed on drop; shared by `up`, the benchmarks, `chaos` and the
//!   workspace's end-to-end tests;
//! - [`up`]: `tether up`, a cluster in the foreground until Ctrl-C;
//! - [`chat`]: `tether chat`, a line-oriented WebSocket client for people and scripts;
//! - [`bench`]: `tether bench rtt|idle|fanout|proxies`: round-trip latency, memory per idle
//!   connection, room fan-out (also at steady rates, side by side with Socket.IO), and the
//!   balancer against HAProxy and nginx;
//! - [`chaos`]: `tether chaos`, nodes killed under load, every message accounted for;
//! - [`compare`]: `tether compare`, single node vs sticky sessions vs the Redis and NATS
//!   backbones on one workload: delivery, latency, highest sustained rate, node loss;
//! - [`args`]: the clap definitions.
#![deny(unsafe_code)]

pub mod args;
pub mod bench;
pub mod chaos;
pub mod chat;
pub mod cluster;
pub mod compare;
pub mod up;

use args::{BenchKind, Cli, Command};

/// Runs one parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Up(args) => up::run(up::UpOptions::from(args)).await,
        Command::Chat(args) => chat::run_stdio(chat::ChatOptions::from(args)).await,
        Command::Bench(bench) => match bench.kind {
            BenchKind::Rtt(args) => bench::rtt::run_cli(args).await,
            BenchKind::Idle(args) => bench::idle::run_cli(args).await,
            BenchKind::Fanout(args) => bench::fanout::run_cli(args).await,
            BenchKind::Proxies(args) => bench::proxies::run_cli(args).await,
            BenchKind::EchoBackend(args) => bench::echo::run_cli(args).await,
            BenchKind::Worker(args) => bench::worker::run_cli(args).await,
        },
        Command::Chaos(args) => chaos::run_cli(args).await,
        Command::Compare(args) => compare::run_cli(args).await,
    }
}
