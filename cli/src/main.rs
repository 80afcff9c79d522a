//! `tether`: parse the command line, set up logging, run the subcommand, exit with its code.
#![forbid(unsafe_code)]

use clap::Parser;
use std::process::ExitCode;
use tether::args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
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
