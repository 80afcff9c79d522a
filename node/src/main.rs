//! `tether-node` binary: flags → config → runtime → [`tether_node::cli::serve`] (which binds
//! and calls [`tether_node::run`]). Exit codes: 64 for bad flags or config, 1 for a failure
//! once running, 0 after a clean shutdown (see [`tether_node::cli`]).

use std::process::ExitCode;
use tether_node::cli::{self, Failure};
use tether_proto::logging;

/// jemalloc rather than glibc's malloc: at 19,000 idle clients it held a node at 6.27–6.35 KiB
/// per client in three runs, where glibc gave 6.61–8.57 (its per-thread arenas fragment after
/// a connection burst); see docs/PERFORMANCE.md.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args = match cli::parse_args() {
        Ok(args) => args,
        Err(code) => return code,
    };
    logging::init(args.log_format, "info");
    let served = args.into_config().and_then(|startup| {
        let runtime = cli::runtime(startup.config.threads)?;
        runtime.block_on(cli::serve(startup))
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &Failure) -> ExitCode {
    eprintln!("tether-node: {e}");
    e.exit_code()
}
