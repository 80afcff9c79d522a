//! The `tether-node` binary's exit codes: 64 for bad flags or config, 1 for a failure once
//! running, 0 for `--help`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tether-node");
const DEADLINE: Duration = Duration::from_secs(10);

/// Runs the binary to completion; returns its exit code and stderr.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("TETHER_SIGNING_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("tether-node {args:?} did not exit within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}

#[test]
fn bad_flags_exit_64() {
    for args in [&["--no-such-flag"][..], &["--backbone", "carrier-pigeon"], &["--threads", "many"]] {
        let (code, stderr) = run_to_exit(args);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains("error"), "{args:?}: clap says what is wrong: {stderr}");
    }
}

#[test]
fn a_bad_config_exits_64_naming_the_field() {
    let (code, stderr) = run_to_exit(&["--backbone", "none", "--listen", "nowhere"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("tether-node: configuration:") && stderr.contains("listen"), "{stderr}");
    let missing = std::env::temp_dir().join("tether-node-cli-test-no-such-file.toml");
    let (code, stderr) = run_to_exit(&["--config", missing.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("reading"), "{stderr}");
}

#[test]
fn a_bad_webhooks_table_exits_64_naming_the_field() {
    let dir = tempfile_dir();
    for (i, (table, field)) in [
        ("url = \"https://example.com/hook\"\nsecret = \"s\"", "webhooks.url"),
        ("url = \"http://127.0.0.1:9/hook\"", "webhooks.secret"),
        ("url = \"http://127.0.0.1:9/hook\"\nsecret = \"s\"\nevents = [\"client.gone\"]", "webhooks.events"),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.join(format!("hooks-{i}.toml"));
        std::fs::write(&path, format!("[webhooks]\n{table}\n")).unwrap();
        let (code, stderr) = run_to_exit(&["--backbone", "none", "--config", path.to_str().unwrap()]);
        assert_eq!(code, Some(64), "{table}: {stderr}");
        assert!(stderr.contains(field), "{table}: names {field}: {stderr}");
    }
    let path = dir.join("hooks-nats.toml");
    std::fs::write(&path, "[webhooks]\nurl = \"http://127.0.0.1:9/\"\nsecret = \"s\"\n").unwrap();
    let (code, stderr) = run_to_exit(&["--backbone", "nats", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("webhooks") && stderr.contains("nats"), "{stderr}");
}

/// A fresh directory for this process' config files.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-node-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn an_address_in_use_is_a_runtime_failure_exiting_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_to_exit(&["--backbone", "none", "--listen", &addr]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
}

#[test]
fn help_and_version_exit_0() {
    for flag in ["--help", "--version"] {
        let (code, stderr) = run_to_exit(&[flag]);
        assert_eq!(code, Some(0), "{flag}: {stderr}");
    }
}
