//! `tether-lab`: the measuring and torture tools behind `tether bench`, `tether chaos` and
//! `tether compare`, as a library. The `tether` binary composes their clap arguments and
//! dispatches to their `run_cli`; tests call their `run` functions with options directly.
//!
//! - [`bench`]: round-trip latency, memory per idle connection, room fan-out (also at steady
//!   rates, side by side with Socket.IO), and the balancer against HAProxy and nginx;
//! - [`chaos`]: nodes killed under load, every message accounted for;
//! - [`compare`]: single node vs sticky sessions vs the Redis and NATS backbones on one
//!   workload: delivery, latency, highest sustained rate, node loss.
//!
//! The clusters they run come from `tether-kit`.
#![deny(unsafe_code)]

/// Exit code for bad flags or an unknown subcommand (sysexits' `EX_USAGE`), as `tether-node` and
/// `tether-balancer` use: the lab tools return it when their options do not validate, and the
/// `tether` binary when clap rejects the command line.
pub const EXIT_USAGE: u8 = 64;

pub mod bench;
pub mod chaos;
pub mod compare;
mod flags;
