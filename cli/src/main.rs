//! `tether`: parse the command line, set up logging, run the subcommand, exit with its code.
#![forbid(unsafe_code)]

use clap::Parser;
use std::process::ExitCode;
use tether::args::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tether_proto::logging::init(cli.log_format, "warn");
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
