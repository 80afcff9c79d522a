//! The command line of `tether compare`, as a clap type the CLI composes into its parser.

use crate::flags::positive;
use clap::builder::TypedValueParser as _;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Smoke run for CI: 30 clients in 3 rooms, a 2 s fixed phase, 0.5 s steps (all five modes
    /// in about a minute).
    #[arg(long)]
    pub quick: bool,
    /// Output directory (created): compare.md, compare.json, latency-cdf.svg, max-rate.svg.
    #[arg(long, default_value = "./compare-out", value_name = "DIR")]
    pub out: PathBuf,
    /// Modes to run (always in the order single, sticky, routed, redis, nats, nats-cluster).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "single,sticky,routed,redis,nats,nats-cluster",
        value_name = "LIST"
    )]
    pub modes: Vec<super::Mode>,
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
    #[arg(long, default_value_t = super::DEFAULT_P99_BOUND_MS, value_name = "MS", value_parser = positive)]
    pub p99_bound_ms: f64,
    /// Write each mode's process logs to DIR/MODE/ [default: OUT/logs].
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
    /// Seed of the client ids (which node each client lands on); default: from the clock.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
}
