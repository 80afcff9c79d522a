//! `tether`, the operator's CLI, as a library: the binary only parses arguments and calls
//! [`run`].
//!
//! Layout:
//! - [`up`]: `tether up`, a cluster in the foreground until Ctrl-C;
//! - [`chat`]: `tether chat`, a line-oriented WebSocket client for people and scripts;
//! - [`token`]: `tether token`, a development JWT;
//! - [`args`]: the clap definitions; the lab tools' arguments come from `tether-lab`.
//!
//! The lab tools (`tether bench`, `tether chaos`, `tether compare`) live in the `tether-lab`
//! crate and the process supervision they share with `up` and the tests in `tether-kit`;
//! this crate only dispatches to them.
#![deny(unsafe_code)]

pub mod args;
pub mod chat;
pub mod token;
pub mod up;

use args::{Cli, Command};

/// Runs one parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Up(args) => up::run(up::UpOptions::from(args)).await,
        Command::Chat(mut args) => {
            // A token rides in the query (`?token=`); the client library keeps it there.
            args.url = token::with_token_param(&args.url, args.token.take().as_deref());
            chat::run_stdio(chat::ChatOptions::from(args)).await
        }
        Command::Bench(args) => tether_lab::bench::run_cli(args).await,
        Command::Chaos(args) => tether_lab::chaos::run_cli(args).await,
        Command::Compare(args) => tether_lab::compare::run_cli(args).await,
        Command::Token(args) => Ok(token::run(&args)),
    }
}
