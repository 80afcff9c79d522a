//! Tunnel benchmark: what one idle proxied WebSocket costs the proxy in memory, and what one
//! proxied message costs it in CPU, measured from outside through `/proc/PID`.
//!
//! It runs a trivial WebSocket backend (answers the handshake, then echoes raw bytes) and the
//! clients in this process, on one thread, and points them at a proxy in another process:
//! either a `tether-balancer` it starts itself, or any proxy already running (HAProxy, nginx)
//! that forwards to the backend's address.
//!
//! ```text
//! cargo build --release -p tether-balancer --bins --examples
//! target/release/examples/tunnel_bench --balancer target/release/tether-balancer -- --threads 1
//! # the same against a proxy already listening on :18080 and forwarding to :18081
//! target/release/examples/tunnel_bench --proxy 127.0.0.1:18080 --pid PID --backend 127.0.0.1:18081
//! ```
//!
//! Phases: `--idle` tunnels opened and left idle (RSS before and after, per tunnel; again after
//! one echo on each, which is when lazily allocated buffers would show), then `--conns`
//! closed-loop echo connections for `--secs` seconds with `--size`-byte messages (echoes per
//! second and the proxy's CPU time per echo), then the same connections paced at `--rate`
//! messages per second in all (round-trip percentiles). `--hold SECS` keeps the idle tunnels
//! open a while longer, to look at the proxy meanwhile. Every loop is bounded by a deadline.
//! All traffic stays on 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::stream::{self, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Any phase that takes longer than this is abandoned (a stuck proxy must not hang the run).
const PHASE_LIMIT: Duration = Duration::from_secs(120);
/// Handshakes in flight at once while opening the idle tunnels.
const OPEN_CONCURRENCY: usize = 64;
/// What the RSS is left to settle for after a phase.
const SETTLE: Duration = Duration::from_millis(500);
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

struct Args {
    balancer: Option<String>,
    proxy: Option<SocketAddr>,
    pid: Option<u32>,
    backend: SocketAddr,
    idle: usize,
    conns: usize,
    secs: u64,
    size: usize,
    rate: u64,
    /// Seconds the idle tunnels are held open after the measurement (to look at the proxy
    /// meanwhile, say with a heap profiler's snapshot).
    hold: u64,
    extra: Vec<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        balancer: None,
        proxy: None,
        pid: None,
        backend: "127.0.0.1:0".parse()?,
        idle: 5000,
        conns: 200,
        secs: 5,
        size: 64,
        rate: 5000,
        hold: 0,
        extra: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--" {
            args.extra.extend(it.by_ref());
            break;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--balancer" => args.balancer = Some(value),
            "--proxy" => args.proxy = Some(value.parse()?),
            "--pid" => args.pid = Some(value.parse()?),
            "--backend" => args.backend = value.parse()?,
            "--idle" => args.idle = value.parse()?,
            "--conns" => args.conns = value.parse()?,
            "--secs" => args.secs = value.parse()?,
            "--size" => args.size = value.parse()?,
            "--rate" => args.rate = value.parse()?,
            "--hold" => args.hold = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    if args.balancer.is_none() && (args.proxy.is_none() || args.pid.is_none()) {
        bail!("give --balancer BIN, or --proxy ADDR --pid PID");
    }
    if !(1..=125).contains(&args.size) {
        bail!("--size must be 1..=125 (one short frame)");
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // One thread for the backend and every client: the other core is the proxy's.
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let backend = TcpListener::bind(args.backend).await?;
    let backend_addr = backend.local_addr()?;
    tokio::spawn(serve_backend(backend));

    let mut child: Option<Child> = None;
    let (proxy, pid) = match &args.balancer {
        Some(bin) => {
            let (c, addr) = start_balancer(bin, backend_addr, &args.extra)?;
            let pid = c.id();
            child = Some(c);
            (addr, pid)
        }
        None => (args.proxy.context("--proxy")?, args.pid.context("--pid")?),
    };
    let result = phases(&args, proxy, pid).await;
    if let Some(c) = child {
        stop(c).await;
    }
    result
}

async fn phases(args: &Args, proxy: SocketAddr, pid: u32) -> anyhow::Result<()> {
    println!("loadavg {}", std::fs::read_to_string("/proc/loadavg")?.trim());
    // Warm up: the first connections allocate the proxy's one-off structures.
    let mut warm = open_tunnels(proxy, 50).await?;
    echo_all(&mut warm, args.size).await?;
    drop(warm);
    tokio::time::sleep(SETTLE).await;

    if args.idle > 0 {
        // Opened in two halves: the second half's growth is the marginal cost of a tunnel,
        // free of what the first half's handshakes left behind in the allocator.
        let half = args.idle / 2;
        let before = Rss::of(pid)?;
        let mut tunnels = open_tunnels(proxy, half).await?;
        tokio::time::sleep(SETTLE).await;
        let at_half = Rss::of(pid)?;
        tunnels.extend(open_tunnels(proxy, args.idle - half).await?);
        tokio::time::sleep(SETTLE).await;
        let opened = Rss::of(pid)?;
        echo_all(&mut tunnels, args.size).await?;
        tokio::time::sleep(SETTLE).await;
        let used = Rss::of(pid)?;
        let n = tunnels.len() as f64;
        let per = |from: u64, to: u64, count: f64| to.saturating_sub(from) as f64 * 1024.0 / count;
        println!(
            "idle {}: rss {} -> {} kB; per tunnel: {:.0} B after the handshake, {:.0} B after one echo; \
             second half alone {:.0} B (anon: {:.0} B, {:.0} B, {:.0} B)",
            tunnels.len(),
            before.rss_kb,
            used.rss_kb,
            per(before.rss_kb, opened.rss_kb, n),
            per(before.rss_kb, used.rss_kb, n),
            per(at_half.rss_kb, opened.rss_kb, (args.idle - half) as f64),
            per(before.anon_kb, opened.anon_kb, n),
            per(before.anon_kb, used.anon_kb, n),
            per(at_half.anon_kb, opened.anon_kb, (args.idle - half) as f64),
        );
        if args.hold > 0 {
            println!("holding the idle tunnels for {} s", args.hold);
            tokio::time::sleep(Duration::from_secs(args.hold)).await;
        }
        drop(tunnels);
        tokio::time::sleep(SETTLE).await;
        println!("idle closed: rss {} kB", Rss::of(pid)?.rss_kb);
    }

    if args.conns > 0 && args.secs > 0 {
        let conns = open_tunnels(proxy, args.conns).await?;
        let ticks_before = cpu_ticks(pid)?;
        let start = Instant::now();
        let count = closed_loop(conns, args.size, Duration::from_secs(args.secs)).await?;
        let elapsed = start.elapsed().as_secs_f64();
        let cpu_s = (cpu_ticks(pid)? - ticks_before) as f64 / clock_ticks();
        println!(
            "echo {} conns x {} B, {:.1} s: {:.0} echoes/s; proxy cpu {:.2} s = {:.0}% of a core, {:.2} us per echo",
            args.conns,
            args.size,
            elapsed,
            count as f64 / elapsed,
            cpu_s,
            100.0 * cpu_s / elapsed,
            cpu_s * 1e6 / count as f64,
        );
    }

    if args.conns > 0 && args.rate > 0 {
        let conns = open_tunnels(proxy, args.conns).await?;
        let ticks_before = cpu_ticks(pid)?;
        let mut rtts = paced(conns, args.size, args.rate, Duration::from_secs(args.secs.max(1))).await?;
        let cpu_s = (cpu_ticks(pid)? - ticks_before) as f64 / clock_ticks();
        rtts.sort_unstable();
        let at = |q: f64| rtts.get(((rtts.len() as f64 * q) as usize).min(rtts.len().saturating_sub(1))).copied();
        println!(
            "paced {} msg/s over {} conns: {} echoes; rtt p50 {:?} us, p99 {:?} us, p99.9 {:?} us, max {:?} us; \
             proxy cpu {:.2} us per echo",
            args.rate,
            args.conns,
            rtts.len(),
            at(0.5).unwrap_or(0),
            at(0.99).unwrap_or(0),
            at(0.999).unwrap_or(0),
            rtts.last().copied().unwrap_or(0),
            cpu_s * 1e6 / rtts.len().max(1) as f64,
        );
    }
    Ok(())
}

/// SIGTERM (a profiler around the balancer then writes its report), SIGKILL if it lingers.
async fn stop(mut child: Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    for _ in 0..200 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn start_balancer(bin: &str, backend: SocketAddr, extra: &[String]) -> anyhow::Result<(Child, SocketAddr)> {
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--health-interval-ms", "1000"])
        .args(["--node", &format!("bench={backend}")])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen="))
        .with_context(|| format!("no ready line: {line:?}"))?
        .parse()?;
    Ok((child, addr))
}

/// The backend: answers any WebSocket handshake with a 101, then echoes raw bytes (masked
/// client frames come back as they are; the clients here do not mind).
async fn serve_backend(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let Ok(head) = read_head(&mut stream).await else { return };
            let key = head
                .lines()
                .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-key")))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default();
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            );
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            let mut buf = [0u8; 2048];
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Reads an HTTP head up to its blank line (byte by byte: nothing may follow it yet).
async fn read_head(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::with_capacity(512);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            bail!("head too long");
        }
        head.push(stream.read_u8().await?);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

async fn open_tunnel(proxy: SocketAddr, i: usize) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(proxy).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /ws?client=bench-{i} HTTP/1.1\r\nHost: {proxy}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let head = read_head(&mut stream).await?;
    if !head.starts_with("HTTP/1.1 101") {
        bail!("handshake {i}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(stream)
}

async fn open_tunnels(proxy: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let opening = stream::iter(0..n).map(|i| open_tunnel(proxy, i)).buffer_unordered(OPEN_CONCURRENCY);
    let all: Vec<_> = tokio::time::timeout(PHASE_LIMIT, opening.collect()).await.context("opening tunnels")?;
    all.into_iter().collect()
}

/// A masked text frame of `size` payload bytes, as a client sends it.
fn client_frame(size: usize) -> Vec<u8> {
    let mut frame = vec![0x81, 0x80 | size as u8, 1, 2, 3, 4];
    frame.extend((0..size).map(|i| b'a' ^ [1, 2, 3, 4][i % 4]));
    frame
}

async fn echo_once(stream: &mut TcpStream, frame: &[u8], back: &mut [u8]) -> anyhow::Result<()> {
    stream.write_all(frame).await?;
    stream.read_exact(back).await?;
    if back != frame {
        bail!("echo differs");
    }
    Ok(())
}

async fn echo_all(tunnels: &mut [TcpStream], size: usize) -> anyhow::Result<()> {
    let frame = client_frame(size);
    let work = stream::iter(tunnels)
        .map(|t| {
            let frame = &frame;
            async move {
                let mut back = vec![0u8; frame.len()];
                echo_once(t, frame, &mut back).await
            }
        })
        .buffer_unordered(OPEN_CONCURRENCY);
    let done: Vec<anyhow::Result<()>> = tokio::time::timeout(PHASE_LIMIT, work.collect()).await.context("echo all")?;
    done.into_iter().collect()
}

async fn closed_loop(conns: Vec<TcpStream>, size: usize, run_for: Duration) -> anyhow::Result<u64> {
    let frame = client_frame(size);
    let deadline = tokio::time::Instant::now() + run_for;
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in conns {
        let frame = frame.clone();
        tasks.spawn(async move {
            let mut back = vec![0u8; frame.len()];
            let mut count = 0u64;
            while tokio::time::Instant::now() < deadline {
                echo_once(&mut stream, &frame, &mut back).await?;
                count += 1;
            }
            anyhow::Ok(count)
        });
    }
    let mut total = 0;
    while let Some(done) = tokio::time::timeout(PHASE_LIMIT, tasks.join_next()).await.context("echo loop")? {
        total += done??;
    }
    Ok(total)
}

/// Each connection sends at `rate / conns` per second, waiting for each echo; returns every
/// round trip in microseconds.
async fn paced(conns: Vec<TcpStream>, size: usize, rate: u64, run_for: Duration) -> anyhow::Result<Vec<u32>> {
    let frame = client_frame(size);
    let n = conns.len();
    let period = Duration::from_secs_f64(n as f64 / rate as f64);
    let start = tokio::time::Instant::now();
    let deadline = start + run_for;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut stream) in conns.into_iter().enumerate() {
        let frame = frame.clone();
        // Spread the connections' sends evenly over one period.
        let offset = period.mul_f64(i as f64 / n as f64);
        tasks.spawn(async move {
            let mut back = vec![0u8; frame.len()];
            let mut rtts = Vec::new();
            let mut ticks = tokio::time::interval_at(start + offset, period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                let sent = Instant::now();
                echo_once(&mut stream, &frame, &mut back).await?;
                rtts.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            anyhow::Ok(rtts)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tokio::time::timeout(PHASE_LIMIT, tasks.join_next()).await.context("paced loop")? {
        all.extend(done??);
    }
    Ok(all)
}

struct Rss {
    rss_kb: u64,
    anon_kb: u64,
}

impl Rss {
    fn of(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("{name} missing"))?;
            Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
        };
        Ok(Self { rss_kb: field("VmRSS:")?, anon_kb: field("RssAnon:")? })
    }
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces, hence the last ')'): state is
    // field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
