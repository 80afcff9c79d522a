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
    let (child, listen, admin) = start_ready(&[
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
    ]);
    assert_ne!(listen.port(), 0);
    assert_ne!(admin.port(), 0);

    let reply = get(admin, "/status");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"node-1\""), "{reply}");

    stop(child);
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
        (&["--node", "a=127.0.0.1:1", "--threads", "0"], "threads"),
        (&["--node", "a=127.0.0.1:1", "--tls-cert", "cert.pem"], "--tls-cert"),
        (&["--node", "a=127.0.0.1:1", "--tls-key", "key.pem"], "--tls-key"),
        (
            &["--node", "a=127.0.0.1:1", "--tls-cert", "/no/such/cert.pem", "--tls-key", "/no/such/key.pem"],
            "/no/such/cert.pem",
        ),
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

/// Starts the binary with `args` and waits for its ready line; returns it with the bound
/// client and admin addresses.
fn start_ready(args: &[&str]) -> (std::process::Child, std::net::SocketAddr, std::net::SocketAddr) {
    let mut child = Command::new(BIN)
        .env_remove(SIGNING_KEY_ENV)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // `k=v` pairs after the prefix (a generation follows the addresses).
    let field = |key: &str| {
        line.trim_end()
            .strip_prefix("tether-balancer ready ")?
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    };
    let (Some(listen), Some(admin)) = (field("listen"), field("admin")) else {
        let _ = child.kill();
        panic!("no ready line from {args:?}: {line:?}");
    };
    (child, listen.parse().unwrap(), admin.parse().unwrap())
}

/// One `GET` with `Connection: close`; returns the whole reply.
fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut stream, &mut reply).unwrap();
    reply
}

fn stop(mut child: std::process::Child) {
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    assert_eq!(wait_with_deadline(&mut child).code(), Some(0));
}

#[test]
fn reuse_port_lets_two_balancers_share_the_client_port() {
    // No node answers: every request gets a 503, counted by whichever process took it.
    let common = ["--admin", "127.0.0.1:0", "--node", "node-1=127.0.0.1:1", "--reuse-port"];
    let (first, port, first_admin) =
        start_ready(&[&["--listen", "127.0.0.1:0", "--threads", "1"], &common[..]].concat());
    let shared = port.to_string();
    let (second, again, second_admin) = start_ready(&[&["--listen", &shared, "--threads", "2"], &common[..]].concat());
    assert_eq!(again, port);

    // Without the option the port is taken.
    let (code, stderr) = run_to_exit(&["--listen", &shared, "--admin", "127.0.0.1:0", "--node", "node-1=127.0.0.1:1"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("binding listen address"), "{stderr}");

    // The kernel spreads connections over both by their addresses: 40 connections all landing
    // on one of two processes would take odds of one in 2^39.
    for _ in 0..40 {
        let reply = get(port, "/api?client=alice");
        assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    }
    let served = |admin| {
        let metrics = get(admin, "/metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("tether_balancer_requests_total{kind=\"http\",code=\"503\"} "))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    let (a, b) = (served(first_admin), served(second_admin));
    assert_eq!(a + b, 40.0);
    assert!(a > 0.0 && b > 0.0, "one process took everything: {a} / {b}");
    stop(first);
    stop(second);
}
