//! The command line of `tether chaos`, as a clap type the CLI composes into its parser.

use crate::flags::{non_negative, positive};
use clap::Args;
use std::path::PathBuf;

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
    /// Plain WebSocket clients (no reconnect) through a balancer with --failover rehome;
    /// the schedule adds drains and one rolling SIGTERM restart; any close a client sees fails the run.
    #[arg(long, conflicts_with = "redis_restart")]
    pub naive: bool,
    /// With --naive: the balancer's failover mode; reconnect is the contrast run (clients closed).
    #[arg(long, default_value = "rehome", value_name = "MODE", requires = "naive",
          value_parser = clap::builder::PossibleValuesParser::new(["rehome", "reconnect"]))]
    pub failover: String,
    /// Write each process' log to DIR/NAME.log (silenced otherwise).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}
