//! `tether-balancer` binary: parse flags, load and validate the config (exit 64 on a bad one),
//! set up logging, start the runtime with the configured threads, and hand over to
//! [`tether_balancer::cli::serve`] (exit 1 when it fails). The rest is in
//! [`tether_balancer::cli`].

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tether_balancer::cli::{self, Args, EXIT_USAGE};
use tether_proto::logging;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS // --help, --version
            };
        }
    };
    // Before the config is validated: the default max_connections is derived from the raised
    // limit. Logged once logging is set up.
    let raised = tether_proto::limits::raise_nofile_limit();
    let config = match cli::load_config(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tether-balancer: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    logging::init(args.log_format, "info");
    cli::log_limits(raised, &config);
    let served = cli::runtime(config.threads)
        .context("starting the runtime")
        // Spawned rather than run by `block_on`, so that with N threads all the work (accepting
        // included) is on those N, not on this one besides.
        .and_then(|runtime| runtime.block_on(async { tokio::spawn(cli::serve(args, config)).await })?);
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-balancer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
