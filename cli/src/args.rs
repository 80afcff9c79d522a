//! The command line of `tether`, as clap types. `main.rs` parses it; [`crate::run`] acts on it.
//!
//! The user commands' arguments (`up`, `chat`) are defined here; the lab tools (`bench`,
//! `chaos`, `compare`) define theirs next to their code in `tether-lab`, and this parser only
//! composes them, so the lab never depends on the CLI.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tether_lab::bench::args::BenchArgs;
use tether_lab::chaos::ChaosArgs;
use tether_lab::compare::CompareArgs;
use tether_proto::logging::LogFormat;

/// Tether operator CLI: local cluster, chat client, benchmarks.
#[derive(Debug, Parser)]
#[command(name = "tether", version, propagate_version = true)]
pub struct Cli {
    /// Format of tether's own log lines on stderr (`RUST_LOG` filters them; default `warn`).
    #[arg(long, global = true, default_value = "text", value_name = "text|json")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local cluster (redis-server, N nodes, one balancer) until Ctrl-C.
    Up(UpArgs),
    /// Interactive line client: commands and messages from stdin, events on stdout.
    Chat(ChatArgs),
    /// Benchmarks.
    Bench(BenchArgs),
    /// Kill and restart nodes under load and check that no message is lost or duplicated.
    Chaos(ChaosArgs),
    /// Compare single node, sticky only, Redis and NATS backbones.
    Compare(CompareArgs),
    /// Mint a JWT for development (HS256 from --secret, RS256/ES256 from --key) and print it.
    Token(TokenArgs),
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of nodes (node-1 … node-N).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub nodes: u16,
    /// Use this Redis instead of starting a private redis-server.
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Balancer address for clients (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Balancer admin address (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:9100", value_name = "ADDR")]
    pub admin: SocketAddr,
    /// Write each process' log to DIR/NAME.log instead of this terminal.
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
    /// Seconds each process gets to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub grace: f64,
    /// Start a private nats-server and run the nodes on the NATS backbone.
    #[arg(long)]
    pub nats: bool,
    /// Serve wss:// and https:// on the balancer's client port, with a development certificate
    /// for localhost / 127.0.0.1 / ::1 signed by a CA made for the purpose (printed: clients
    /// must trust it, e.g. `tether chat --ca DIR/ca.pem`).
    #[arg(long)]
    pub tls: bool,
    /// Where --tls keeps the CA and certificate (ca.pem, cert.pem, key.pem): reused when they
    /// are there, so a browser or client told to trust the CA once keeps trusting it; created
    /// otherwise [default: a fresh temporary directory, removed at exit].
    #[arg(long, value_name = "DIR", requires = "tls")]
    pub tls_dir: Option<PathBuf>,
    /// Extra argument for every node (repeatable), e.g. `--node-arg=--backbone=none`.
    #[arg(long = "node-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
    /// Extra argument for the balancer (repeatable), e.g. `--balancer-arg=--health-interval-ms=100`.
    #[arg(long = "balancer-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub balancer_args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// WebSocket URL of a balancer or node, e.g. ws://127.0.0.1:8080/ws
    pub url: String,
    /// Client id to connect as (sent as ?client=ID; decides the node behind a balancer).
    #[arg(long, value_name = "ID")]
    pub client: Option<String>,
    /// Display name, sent with set_name once connected.
    #[arg(long)]
    pub name: Option<String>,
    /// JWT to connect with (sent as ?token=…; see `tether token`).
    #[arg(long, value_name = "JWT")]
    pub token: Option<String>,
    /// For wss:// URLs: trust the CA certificates in this PEM file (e.g. the one `tether up
    /// --tls` prints) instead of the system's roots.
    #[arg(long, value_name = "PEM")]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("signer").required(true).args(["secret", "key"])))]
pub struct TokenArgs {
    /// HS256 shared secret (the node's `[auth] hs256_secret`).
    #[arg(long, value_name = "S")]
    pub secret: Option<String>,
    /// PEM private key to sign with: RSA (RS256) or EC P-256 (ES256).
    #[arg(long, value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// Algorithm for --key (default: from the key: RSA → RS256, EC → ES256).
    #[arg(long, conflicts_with = "secret", value_parser = ["RS256", "ES256"])]
    pub alg: Option<String>,
    /// The client id (`sub`).
    #[arg(long, value_name = "ID", value_parser = parse_sub)]
    pub sub: String,
    /// Display name (`name`).
    #[arg(long, value_name = "N", value_parser = parse_name)]
    pub name: Option<String>,
    /// Room patterns the client may join (`rooms`), comma-separated; `*` matches any run.
    /// Absent: every room.
    #[arg(long, value_name = "a,b:*", value_delimiter = ',', value_parser = parse_pattern)]
    pub rooms: Option<Vec<String>>,
    /// Lifetime: seconds, or a span such as 1h or 30m.
    #[arg(long, value_name = "1h|SECS", default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
}

/// `--sub`: a client id.
fn parse_sub(s: &str) -> Result<String, String> {
    tether_proto::id::validate_client_id(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// `--name`: a display name.
fn parse_name(s: &str) -> Result<String, String> {
    tether_proto::wire::validate_name(s).map_err(|e| e.message)?;
    Ok(s.to_string())
}

/// One of `--rooms`: a room pattern (`*` matches any run of characters).
fn parse_pattern(s: &str) -> Result<String, String> {
    tether_proto::wire::validate_room(s).map_err(|e| e.message)?;
    Ok(s.to_string())
}

/// `--ttl`: seconds (`3600`) or a humantime span (`1h`, `90s`, `2h 30m`); more than zero.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (use SECS or e.g. 1h, 30m)"))?,
    };
    if d < Duration::from_secs(1) {
        return Err("must be at least one second".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use tether_lab::bench::args::{BenchKind, Versus};

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ttls_parse_as_seconds_or_spans() {
        use std::time::Duration;
        assert_eq!(parse_ttl("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("2m 30s"), Ok(Duration::from_secs(150)));
        assert!(parse_ttl("0").is_err() && parse_ttl("soon").is_err() && parse_ttl("-5").is_err());
    }

    #[test]
    fn token_flags_parse_and_misuse_is_a_usage_error() {
        let ok = Cli::try_parse_from([
            "tether", "token", "--secret", "s", "--sub", "alice", "--rooms", "a,b:*", "--ttl", "2h",
        ]);
        match ok.map(|c| c.command) {
            Ok(Command::Token(t)) => {
                assert_eq!(t.rooms, Some(vec!["a".to_string(), "b:*".to_string()]));
                assert_eq!(t.ttl, std::time::Duration::from_secs(7200));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["tether", "token", "--key", "k.pem", "--alg", "ES256", "--sub", "a"]).is_ok());
        for argv in [
            &["tether", "token", "--sub", "alice"][..],
            &["tether", "token", "--secret", "s"],
            &["tether", "token", "--secret", "s", "--key", "k", "--sub", "a"],
            &["tether", "token", "--secret", "s", "--sub", "bad id"],
            &["tether", "token", "--secret", "s", "--sub", "a", "--rooms", "a b"],
            &["tether", "token", "--secret", "s", "--sub", "a", "--ttl", "0"],
            &["tether", "token", "--secret", "s", "--sub", "a", "--alg", "RS256"],
            &["tether", "token", "--key", "k", "--sub", "a", "--alg", "HS512"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn rtt_targets_come_in_pairs() {
        let only_one = Cli::try_parse_from(["tether", "bench", "rtt", "--balancer-url", "ws://x"]);
        assert!(only_one.is_err());
        let both =
            Cli::try_parse_from(["tether", "bench", "rtt", "--balancer-url", "ws://a/ws", "--direct-url", "ws://b/ws"]);
        assert!(both.is_ok());
    }

    #[test]
    fn chaos_flags_parse_and_bad_numbers_are_usage_errors() {
        let ok = Cli::try_parse_from([
            "tether",
            "chaos",
            "--nodes",
            "3",
            "--clients",
            "300",
            "--rate",
            "200",
            "--kill-every",
            "5",
            "--duration",
            "60",
            "--redis-restart",
            "--json",
            "x",
            "--seed",
            "9",
            "--restart-delay-ms",
            "100",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
        for bad in [["--rate", "0"], ["--duration", "-1"], ["--kill-every", "nan"], ["--clients", "0"]] {
            let argv = ["tether", "chaos", bad[0], bad[1]];
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
        assert!(Cli::try_parse_from(["tether", "chaos", "--kill-every", "0"]).is_ok());
        // Naive mode: its failover flag needs it, takes two values, and excludes a Redis restart.
        assert!(Cli::try_parse_from(["tether", "chaos", "--naive", "--failover", "reconnect"]).is_ok());
        for bad in
            [&["--failover", "rehome"][..], &["--naive", "--failover", "sometimes"], &["--naive", "--redis-restart"]]
        {
            let argv: Vec<&str> = ["tether", "chaos"].iter().chain(bad).copied().collect();
            assert!(Cli::try_parse_from(&argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn compare_flags_parse_and_bad_values_are_usage_errors() {
        assert!(Cli::try_parse_from(["tether", "compare", "--quick", "--out", "d"]).is_ok());
        assert!(Cli::try_parse_from(["tether", "compare", "--modes", "single,redis", "--steps", "100,200"]).is_ok());
        for bad in [["--modes", "kafka"], ["--steps", "100,0"], ["--clients", "0"], ["--p99-bound-ms", "-5"]] {
            let argv = ["tether", "compare", bad[0], bad[1]];
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn steady_fanout_flags_parse_and_misuse_is_a_usage_error() {
        let fanout = |argv: &[&str]| match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Bench(BenchArgs { kind: BenchKind::Fanout(a) })) => Ok(a),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let a = fanout(&["tether", "bench", "fanout", "--steady"]).expect("bare --steady");
        assert_eq!(a.steady.as_deref(), Some(&[1000.0, 2000.0, 4000.0, 8000.0, 16000.0][..]));
        assert_eq!((a.vs, a.rooms, a.step_secs), (None, None, None));
        let a = fanout(&["tether", "bench", "fanout", "--steady", "500,1500", "--vs", "socketio", "--step-secs", "3"])
            .expect("steps and --vs");
        assert_eq!(a.steady.as_deref(), Some(&[500.0, 1500.0][..]));
        assert_eq!(a.vs, Some(Versus::Socketio));
        assert!(fanout(&["tether", "bench", "fanout", "--steady", "--quick", "--vs", "socketio"]).is_ok());
        assert!(fanout(&["tether", "bench", "fanout", "--steady", "--through-balancer"]).is_ok());
        for argv in [
            &["tether", "bench", "fanout", "--vs", "socketio"][..],
            &["tether", "bench", "fanout", "--steady", "--vs", "centrifugo"],
            &["tether", "bench", "fanout", "--steady", "1000,0"],
            &["tether", "bench", "fanout", "--steady", "--rates", "100"],
            &["tether", "bench", "fanout", "--steady", "--direct"],
            &["tether", "bench", "fanout", "--steady", "--ramp-secs", "0.5"],
            &["tether", "bench", "fanout", "--through-balancer"],
        ] {
            assert!(fanout(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn bench_api_flags_parse_and_bad_values_are_usage_errors() {
        let api = |argv: &[&str]| match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Bench(BenchArgs { kind: BenchKind::Api(a) })) => Ok(a),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let a = api(&["tether", "bench", "api"]).expect("defaults");
        assert_eq!((a.rate, a.duration, a.concurrency, a.nodes), (500.0, 10.0, 16, 3));
        let a = api(&["tether", "bench", "api", "--rate", "50", "--duration", "2", "--concurrency", "4"]).expect("set");
        assert_eq!((a.rate, a.duration, a.concurrency), (50.0, 2.0, 4));
        for bad in [["--rate", "0"], ["--duration", "-1"], ["--concurrency", "0"], ["--nodes", "0"]] {
            assert!(api(&["tether", "bench", "api", bad[0], bad[1]]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bench_flags_parse_and_bad_values_are_usage_errors() {
        let fanout = Cli::try_parse_from(["tether", "bench", "fanout", "--rooms", "10", "--rates", "100,200.5,400"]);
        match fanout.map(|c| c.command) {
            Ok(Command::Bench(BenchArgs { kind: BenchKind::Fanout(a) })) => assert_eq!(a.rates, [100.0, 200.5, 400.0]),
            other => panic!("{other:?}"),
        }
        for argv in [
            &[
                "tether",
                "bench",
                "idle",
                "--clients",
                "100000",
                "--through-balancer",
                "--nodes",
                "6",
                "--balancers",
                "12",
            ][..],
            &["tether", "bench", "idle", "--quick"],
            &["tether", "bench", "proxies", "--quick", "--targets", "direct,balancer"],
            &["tether", "bench", "echo-backend", "--listen", "127.0.0.1:0"],
        ] {
            assert!(Cli::try_parse_from(argv).is_ok(), "{argv:?}");
        }
        for argv in [
            &["tether", "bench", "idle", "--clients", "0"][..],
            &["tether", "bench", "fanout", "--rates", "100,0"],
            &["tether", "bench", "proxies", "--idle", "10000"],
            &["tether", "bench", "fanout", "--whatever"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }
}
