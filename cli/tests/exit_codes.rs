//! The `tether` binary's exit codes for what clap decides on its own: 64 (`EX_USAGE`, as
//! `tether-node` and `tether-balancer` use) for a command line it rejects, 0 for the help or
//! version it was asked for. The lab tools' own option checks are in `chat.rs`.

use std::process::Command;

fn tether(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tether")).args(args).output().expect("runs tether")
}

#[test]
fn usage_errors_exit_64_and_say_what_was_wrong() {
    for (args, names) in [
        (&["frobnicate"][..], "frobnicate"),
        (&["--no-such-flag"], "--no-such-flag"),
        (&["up", "--nodes", "many"], "--nodes"),
        (&["bench", "rtt", "--no-such-flag"], "--no-such-flag"),
        (&[], "Usage"),
    ] {
        let out = tether(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?} names {names}: {err}");
    }
}

#[test]
fn help_and_version_exit_0_on_stdout() {
    for args in [&["--help"][..], &["--version"], &["chaos", "--help"]] {
        let out = tether(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!out.stdout.is_empty(), "{args:?} printed nothing");
    }
}

#[test]
fn fanout_options_that_cannot_work_exit_64_before_anything_starts() {
    for (args, names) in [
        (&["bench", "fanout", "--rooms", "0"][..], "--rooms"),
        (&["bench", "fanout", "--steady", "--members", "0"], "--members"),
        (&["bench", "fanout", "--rooms", "100", "--members", "1000"], "exceed"),
    ] {
        let out = tether(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?} names {names}: {err}");
        assert!(!err.contains("starting"), "{args:?} started something: {err}");
    }
}
