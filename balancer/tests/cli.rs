//! The `tether-balancer` binary: the ready line other tools parse, exit code 64 on bad
//! config, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tether-balancer");
const DEADLINE: Duration = Duration::from_secs(10);
const SIGNING_KEY_ENV: &str = "TETHER_SIGNING_KEY";

fn wait_with_deadline(child: &mut std::process::Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("tether-balancer did not exit within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the binary to completion; returns its exit code and stderr.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    run_to_exit_with_env(args, &[])
}

/// [`run_to_exit`] with extra environment variables (and none inherited that matter here).
fn run_to_exit_with_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove(SIGNING_KEY_ENV)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_deadline(&mut child);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}

#[test]
fn prints_the_ready_line_serves_and_exits_zero_on_sigterm() {
    let mut child = Command::new(BIN)
        .env_remove(SIGNING_KEY_ENV)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--node",
            "node-1=127.0.0.1:1",
            "--health-interval-ms",
            "100",
            "--log-format",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let rest = line
        .trim_end()
        .strip_prefix("tether-balancer ready listen=")
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"));
    let (listen, admin) = rest.split_once(" admin=").unwrap();
    let listen: std::net::SocketAddr = listen.parse().unwrap();
    let admin: std::net::SocketAddr = admin.parse().unwrap();
    assert_ne!(listen.port(), 0);
    assert_ne!(admin.port(), 0);

    let mut stream = std::net::TcpStream::connect(admin).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(b"GET /status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut stream, &mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"node-1\""), "{reply}");

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = wait_with_deadline(&mut child);
    assert_eq!(status.code(), Some(0));
}

#[test]
fn bad_flags_and_config_exit_64_naming_the_field() {
    let cases: &[(&[&str], &str)] = &[
        (&["--node", "a=127.0.0.1:1", "--health-interval-ms", "0"], "health_interval_ms"),
        (&["--listen", "127.0.0.1:0"], "nodes"),
        (&["--node", "nonsense"], "--node"),
        (&["--node", "a=127.0.0.1:1", "--node", "a=127.0.0.1:2"], "nodes[1].name"),
        (&["--node", "a=no-port"], "nodes[0].addr"),
        (&["--node", "a=127.0.0.1:1", "--listen", "somewhere"], "listen"),
        (&["--node", "a=127.0.0.1:1", "--log-format", "xml"], "log-format"),
        (&["--no-such-flag"], "--no-such-flag"),
    ];
    for (args, field) in cases {
        let (code, stderr) = run_to_exit(args);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(field), "{args:?}: {field} not in {stderr}");
    }

    let dir = std::env::temp_dir().join(format!("tether-balancer-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "rise = 0\n[[nodes]]\nname = \"a\"\naddr = \"127.0.0.1:1\"\n").unwrap();
    let (code, stderr) = run_to_exit(&["--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("rise"), "{stderr}");
    std::fs::write(&file, "lisen = \"127.0.0.1:1\"\n").unwrap();
    let (code, stderr) = run_to_exit(&["--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("lisen"), "{stderr}");
    let (code, _) = run_to_exit(&["--config", dir.join("missing.toml").to_str().unwrap()]);
    assert_eq!(code, Some(64));
    std::fs::remove_dir_all(&dir).unwrap();

    let (code, _) = run_to_exit(&["--help"]);
    assert_eq!(code, Some(0));
}

#[test]
fn a_short_signing_key_exits_64_naming_its_source_and_never_shows_it() {
    let dir = std::env::temp_dir().join(format!("tether-balancer-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let short = dir.join("short.key");
    std::fs::write(&short, "tiny-secret\n").unwrap();
    let good = dir.join("good.key");
    std::fs::write(&good, "a-long-enough-secret-key\n").unwrap();
    let node = ["--node", "a=127.0.0.1:1"];

    let mut args = node.to_vec();
    args.extend(["--signing-key-file", short.to_str().unwrap()]);
    let (code, stderr) = run_to_exit(&args);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("signing_key_file"), "{stderr}");
    assert!(!stderr.contains("tiny-secret"), "the key leaked: {stderr}");

    // From the config file, the same.
    let file = dir.join("balancer.toml");
    std::fs::write(
        &file,
        format!("signing_key_file = {:?}\n[[nodes]]\nname = \"a\"\naddr = \"127.0.0.1:1\"\n", short.to_str().unwrap()),
    )
    .unwrap();
    let (code, stderr) = run_to_exit(&["--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("signing_key_file"), "{stderr}");

    // From the environment: the variable is named.
    let (code, stderr) = run_to_exit_with_env(&node, &[(SIGNING_KEY_ENV, "tiny-secret")]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains(SIGNING_KEY_ENV), "{stderr}");
    assert!(!stderr.contains("tiny-secret"), "the key leaked: {stderr}");

    // The file wins over the environment: with a good file, a short variable is not looked at
    // (the key is checked before the nodes, so the error is about the node's missing port).
    let (code, stderr) = run_to_exit_with_env(
        &["--node", "a=no-port", "--signing-key-file", good.to_str().unwrap()],
        &[(SIGNING_KEY_ENV, "tiny-secret")],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("nodes[0].addr"), "{stderr}");
    assert!(!stderr.contains(SIGNING_KEY_ENV), "{stderr}");

    let missing = dir.join("missing.key");
    let mut args = node.to_vec();
    args.extend(["--signing-key-file", missing.to_str().unwrap()]);
    let (code, stderr) = run_to_exit(&args);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("signing_key_file"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
