//! `tether`: parse the command line, set up logging, run the subcommand, exit with its code:
//! 0 success, 1 a runtime failure (or what the subcommand returns, e.g. `chaos`'s 1 for a lost
//! or duplicated message), [`tether_lab::EXIT_USAGE`] (64) for bad flags or an unknown
//! subcommand, like `tether-node` and `tether-balancer`.
#![forbid(unsafe_code)]

use clap::Parser;
use std::process::ExitCode;
use tether::args::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(tether_lab::EXIT_USAGE)
            } else {
                ExitCode::SUCCESS // --help, --version
            };
        }
    };
    // `compare` provokes gaps and lost resumes on purpose and counts them itself; the client
    // library's warnings about each would bury its progress lines. `RUST_LOG` still wins.
    let default_filter = match cli.command {
        Command::Compare(_) => "warn,tether_client=error",
        _ => "warn",
    };
    tether_proto::logging::init(cli.log_format, default_filter);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tether: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tether::run(cli)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("tether: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
