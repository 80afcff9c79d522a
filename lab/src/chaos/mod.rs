//! `tether chaos`: kill nodes under load and prove that no message was lost or duplicated.
//!
//! A run starts its own cluster ([`Cluster`]: a private Redis, `node-1..node-N`, one
//! balancer) and `K` [`tether_client`] clients with fixed ids (`chaos-0` …), each in 1–3 of
//! `R` rooms, all through the balancer. Then, for `--duration`:
//! - a publisher sends at the total `--rate`, round-robin over the clients that are in sync,
//!   each text unique (`chaos-7:12`);
//! - every `--kill-every` seconds a random node gets `SIGKILL` and is restarted after
//!   `--restart-delay-ms`; with `--redis-restart` Redis (append-only, fsync always) is
//!   killed and restarted once, halfway;
//! - a progress line goes to stderr each second.
//!
//! Then the drain: publishing stops, nodes still down come back, and the run waits (up to
//! `--drain-timeout`) until every client is in sync and holds each of its rooms' last seq in
//! Redis. The accounting ([`account`]) compares what each client was owed — every message
//! published after its own join — with what its app was handed. `docs/CHAOS.md` has the
//! rules and a real result.

mod account;
mod args;
mod in_flight;
pub mod naive;
mod report;
mod schedule;

pub use account::{LostMessage, UnconfirmedSend};
pub use args::ChaosArgs;
pub use in_flight::InFlightFate;
pub use report::{ChaosReport, KillRecord, RunConfig, Sends, Spread};

use account::{Heads, SendLog, Sent, Shared};
use anyhow::{bail, Context, Result};
use futures_util::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use schedule::Chaos;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tether_client::{Client, ClientConfig, Error as ClientError, Outgoing, Status};
use tether_kit::redis_client::RedisClient;
use tether_kit::{Cluster, ClusterLogs, ClusterOptions, Persistence};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{interval, sleep, sleep_until, timeout, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

pub const DEFAULT_NODES: usize = 3;
pub const DEFAULT_CLIENTS: usize = 60;
pub const DEFAULT_ROOMS: usize = 6;
pub const DEFAULT_RATE: f64 = 100.0;
pub const DEFAULT_KILL_EVERY: Duration = Duration::from_secs(5);
pub const DEFAULT_DURATION: Duration = Duration::from_secs(30);
pub const DEFAULT_RESTART_DELAY: Duration = Duration::from_millis(500);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Most rooms one client joins.
const MAX_ROOMS_PER_CLIENT: usize = 3;
/// Time for every client to connect and join before the clock starts.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The balancer's health-check period: a restarted node is taken back within it.
const HEALTH_INTERVAL_MS: u64 = 200;
/// Default Redis key prefix of the nodes.
const KEY_PREFIX: &str = "tether:";
/// How often the publisher wakes up to send what is due.
const PUBLISH_TICK: Duration = Duration::from_millis(5);

/// What a chaos run does.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub nodes: usize,
    pub clients: usize,
    pub rooms: usize,
    /// Messages per second, all clients together.
    pub rate: f64,
    /// Period of the node kills; zero disables them (a control run).
    pub kill_every: Duration,
    /// Length of the load phase.
    pub duration: Duration,
    /// Kill and restart Redis once, halfway (Redis then runs with an fsync'ed AOF).
    pub redis_restart: bool,
    /// Run the nodes on the NATS backbone (a private nats-server) instead of Redis.
    pub nats: bool,
    /// Time between a node's `SIGKILL` and its restart.
    pub restart_delay: Duration,
    /// Longest wait after the load for every client to catch up.
    pub drain_timeout: Duration,
    /// Seed of every random choice (rooms per client, send order, victims).
    pub seed: u64,
    /// Write the processes' logs to this directory (silenced otherwise).
    pub logs: Option<PathBuf>,
    /// Print the start-up lines and one progress line per second on stderr.
    pub progress: bool,
    /// Plain WebSocket clients without reconnect logic, the balancer in `failover = "rehome"`
    /// mode, drains and a rolling restart beside the kills ([`naive`]).
    pub naive: bool,
    /// The balancer's `--failover` in naive mode: `rehome` (the point of the run) or
    /// `reconnect` (a contrast run: what naive clients suffer without it).
    pub failover: String,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        Self {
            nodes: DEFAULT_NODES,
            clients: DEFAULT_CLIENTS,
            rooms: DEFAULT_ROOMS,
            rate: DEFAULT_RATE,
            kill_every: DEFAULT_KILL_EVERY,
            duration: DEFAULT_DURATION,
            redis_restart: false,
            nats: false,
            restart_delay: DEFAULT_RESTART_DELAY,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            seed: 1,
            logs: None,
            progress: true,
            naive: false,
            failover: "rehome".into(),
        }
    }
}

impl ChaosOptions {
    /// Rejects values no run can use; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        if self.nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        if self.clients == 0 {
            bail!("--clients must be at least 1");
        }
        if self.rooms == 0 {
            bail!("--rooms must be at least 1");
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            bail!("--rate must be a positive number of messages per second, not {}", self.rate);
        }
        if self.duration.is_zero() {
            bail!("--duration must be positive");
        }
        if self.drain_timeout.is_zero() {
            bail!("--drain-timeout must be positive");
        }
        if self.nats && self.redis_restart {
            bail!("--redis-restart does not apply with --nats");
        }
        if !["rehome", "reconnect"].contains(&self.failover.as_str()) {
            bail!("--failover must be rehome or reconnect, not {:?}", self.failover);
        }
        if self.naive && self.redis_restart {
            bail!("--redis-restart does not apply with --naive (its clients never retry a refused send)");
        }
        Ok(())
    }
}

impl From<ChaosArgs> for ChaosOptions {
    fn from(a: ChaosArgs) -> Self {
        let seed = a.seed.unwrap_or_else(|| account::wall_ms() ^ u64::from(std::process::id()));
        Self {
            nodes: usize::from(a.nodes),
            clients: a.clients as usize,
            rooms: a.rooms as usize,
            rate: a.rate,
            kill_every: Duration::from_secs_f64(a.kill_every),
            duration: Duration::from_secs_f64(a.duration),
            redis_restart: a.redis_restart,
            nats: a.nats,
            restart_delay: Duration::from_millis(a.restart_delay_ms),
            drain_timeout: Duration::from_secs_f64(a.drain_timeout),
            seed,
            logs: a.logs,
            progress: true,
            naive: a.naive,
            failover: a.failover,
        }
    }
}

/// `tether chaos` on the command line: runs, prints the table, writes `--json`, and returns
/// 1 when anything was lost or duplicated, [`crate::EXIT_USAGE`] (64) for options that do not
/// validate.
pub async fn run_cli(args: ChaosArgs) -> Result<i32> {
    let json = args.json.clone();
    let opts = ChaosOptions::from(args);
    if let Err(e) = opts.validate() {
        eprintln!("tether chaos: {e}");
        return Ok(crate::EXIT_USAGE.into());
    }
    if opts.naive {
        return naive::run_cli(opts, json.as_deref()).await;
    }
    let report = run(opts).await?;
    crate::bench::print_report(&format!("{}\n", report.table()), &report, json.as_deref())?;
    if report.passed() {
        println!("PASS: nothing lost, nothing duplicated");
        Ok(0)
    } else {
        for why in &report.failures {
            println!("FAIL: {why}");
        }
        print_lost(&report);
        Ok(1)
    }
}

fn print_lost(report: &ChaosReport) {
    for m in report.lost_examples.iter().take(5) {
        println!(
            "  lost: {} #{} epoch {} seq {} {:?} from {:?} via {:?}, published at {:?} ms; {} joined {}",
            m.client, m.room, m.epoch, m.seq, m.text, m.sender, m.sender_node, m.published_ms, m.client, m.join
        );
        for line in &m.client_timeline {
            println!("      {line}");
        }
    }
}

/// One client of the run.
struct Member {
    id: String,
    rooms: Vec<String>,
    client: Client,
}

/// The rooms each client joins: 1–3 distinct ones, from the seed.
fn plan_rooms(seed: u64, clients: usize, rooms: usize) -> Vec<Vec<String>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..clients)
        .map(|_| {
            let n = rng.random_range(1..=MAX_ROOMS_PER_CLIENT.min(rooms));
            let mut picked: Vec<usize> = rand::seq::index::sample(&mut rng, rooms, n).into_iter().collect();
            picked.sort_unstable();
            picked.into_iter().map(room_name).collect()
        })
        .collect()
}

fn room_name(i: usize) -> String {
    format!("chaos-room-{i}")
}

/// Runs one chaos run and returns its figures (the verdict is [`ChaosReport::passed`]).
/// Every process it starts is gone when it returns, error or not.
pub async fn run(opts: ChaosOptions) -> Result<ChaosReport> {
    opts.validate()?;
    let say = |line: String| {
        if opts.progress {
            eprintln!("{line}");
        }
    };
    say(format!(
        "tether chaos: {} nodes, {} clients in {} rooms, {} msg/s, {} for {:.0} s, seed {}",
        opts.nodes,
        opts.clients,
        opts.rooms,
        opts.rate,
        if opts.kill_every.is_zero() {
            "no kills".to_string()
        } else {
            format!(
                "SIGKILL every {:.1} s (restart after {} ms)",
                opts.kill_every.as_secs_f64(),
                opts.restart_delay.as_millis()
            )
        },
        opts.duration.as_secs_f64(),
        opts.seed
    ));
    let logs = match &opts.logs {
        Some(dir) => ClusterLogs::Dir(dir.clone()),
        None => ClusterLogs::Null,
    };
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: opts.nodes,
        logs,
        balancer_args: vec!["--health-interval-ms".into(), HEALTH_INTERVAL_MS.to_string()],
        redis_persistence: if opts.redis_restart { Persistence::AppendOnly } else { Persistence::None },
        nats: opts.nats,
        ..ClusterOptions::default()
    })
    .await
    .context("starting the cluster")?;
    let store = match cluster.nats() {
        Some(nats) => HeadStore::Nats(nats.url()),
        None => HeadStore::Redis(cluster.redis().map(|r| r.port()).context("the run needs its private Redis")?),
    };
    say(format!("cluster up: balancer {}, backbone {}", cluster.ws_url(), store));

    let shared = Arc::new(Shared::new());
    let plan = plan_rooms(opts.seed, opts.clients, opts.rooms);
    let mut members = Vec::with_capacity(opts.clients);
    let mut watchers: Vec<JoinHandle<account::ClientLog>> = Vec::with_capacity(opts.clients);
    for (i, rooms) in plan.into_iter().enumerate() {
        let id = format!("chaos-{i}");
        let mut cfg = ClientConfig::new(cluster.ws_url());
        cfg.client_id = Some(id.clone());
        cfg.name = Some(format!("c{i}"));
        let (client, events) = Client::start(cfg).context("client configuration")?;
        watchers.push(tokio::spawn(account::watch(id.clone(), rooms.clone(), events, Arc::clone(&shared))));
        members.push(Member { id, rooms, client });
    }
    let joins = members.iter().map(|m| async move {
        for room in &m.rooms {
            match timeout(JOIN_TIMEOUT, m.client.join(room)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("{} could not join {room}: {e}", m.id),
                Err(_) => bail!("{} did not join {room} within {JOIN_TIMEOUT:?}", m.id),
            }
        }
        Ok(())
    });
    for r in join_all(joins).await {
        r?;
    }
    let members = Arc::new(members);
    let joined_ms = shared.ms();
    say(format!("{} clients joined in {joined_ms} ms; load starts", opts.clients));

    // Load phase.
    let load_start = Instant::now();
    let stop_sending = CancellationToken::new();
    let publisher =
        tokio::spawn(publish(Arc::clone(&members), opts.rate, opts.seed, stop_sending.clone(), Arc::clone(&shared)));
    let mut chaos = Chaos::new(&opts, load_start);
    let end = load_start + opts.duration;
    let mut tick = interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            // The end first: a kill due at the very end is not made.
            biased;
            () = sleep_until(end) => break,
            _ = tick.tick() => progress(&opts, "load", load_start.elapsed(), &chaos, &members, &shared),
            () = chaos.next_action() => chaos.act(&mut cluster, &members, &shared).await?,
        }
    }
    let elapsed = load_start.elapsed();
    stop_sending.cancel();
    let sends = publisher.await.context("the publisher task")?;

    // Drain: bring back whatever is down, then wait for everyone to catch up.
    chaos.finish(&mut cluster, &shared).await?;
    let drain_start = Instant::now();
    let deadline = drain_start + opts.drain_timeout;
    let mut heads: Option<Heads> = None;
    let mut caught_up_before = false;
    let mut last_progress = Instant::now();
    let drained = loop {
        if let Ok(h) = store.room_heads(opts.rooms).await {
            heads = Some(h);
        }
        let (ready, behind) = drain_state(&members, heads.as_ref());
        // Unconfirmed messages are still being resent: not done until each is confirmed.
        let unconfirmed: usize = members.iter().map(|m| m.client.unconfirmed()).sum();
        let caught_up = ready == members.len() && behind == 0 && unconfirmed == 0 && heads.is_some();
        if caught_up && caught_up_before {
            break true;
        }
        caught_up_before = caught_up;
        if Instant::now() >= deadline {
            break false;
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            progress(&opts, "drain", drain_start.elapsed(), &chaos, &members, &shared);
        }
        sleep(Duration::from_millis(200)).await;
    };
    let drain = drain_start.elapsed();
    let not_ready = members.iter().filter(|m| !matches!(m.client.status(), Status::Ready { .. })).count() as u64;
    say(format!(
        "drain {} after {:.1} s; closing {} clients",
        if drained { "complete" } else { "DEADLINE HIT" },
        drain.as_secs_f64(),
        members.len()
    ));

    // Close the clients; their event tasks hand back what they saw.
    let stats: Vec<_> = members.iter().map(|m| m.client.stats()).collect();
    join_all(members.iter().map(|m| m.client.close())).await;
    let mut logs = Vec::with_capacity(watchers.len());
    for w in watchers {
        logs.push(w.await.context("a client's event task")?);
    }
    if let Err(e) = cluster.shutdown(Duration::from_secs(2)).await {
        tracing::warn!(error = %e, "stopping the cluster");
    }
    drop(cluster);

    let sightings = std::mem::take(&mut *shared.sightings());
    let tally = account::account(&logs, &sightings, heads.as_ref(), &sends, shared.origin_wall_ms);
    let kills: Vec<(u64, &str)> = chaos.log.iter().map(|k| (k.at_ms, k.target.as_str())).collect();
    let flight = in_flight::follow(&logs, &kills, &sends, &tally);
    let mut kill_log = std::mem::take(&mut chaos.log);
    for (k, fate) in kill_log.iter_mut().zip(flight.per_kill) {
        k.in_flight = fate;
    }
    let sum = |f: fn(&tether_client::StatsSnapshot) -> u64| stats.iter().map(f).sum::<u64>();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for l in &logs {
        for (code, n) in &l.errors {
            *errors.entry(code.clone()).or_default() += n;
        }
    }
    let duplicates_dropped = sum(|s| s.duplicates_dropped);
    let mut report = ChaosReport {
        config: RunConfig {
            nodes: opts.nodes,
            clients: opts.clients,
            rooms: opts.rooms,
            rate: opts.rate,
            kill_every_s: opts.kill_every.as_secs_f64(),
            duration_s: opts.duration.as_secs_f64(),
            redis_restart: opts.redis_restart,
            backbone: if opts.nats { "nats" } else { "redis" },
            restart_delay_ms: u64::try_from(opts.restart_delay.as_millis()).unwrap_or(u64::MAX),
            drain_timeout_s: opts.drain_timeout.as_secs_f64(),
            seed: opts.seed,
        },
        load_started_at_ms: joined_ms,
        elapsed_s: round1(elapsed.as_secs_f64()),
        drain_s: round1(drain.as_secs_f64()),
        drained,
        clients_not_ready_at_end: not_ready,
        kills: chaos.kills,
        restart_failures: chaos.restart_failures,
        redis_restarts: chaos.redis_restarts,
        kill_log,
        in_flight_at_kills: flight.at_kills,
        in_flight_at_other_losses: flight.at_other_losses,
        reconnects: sum(|s| s.reconnects),
        disconnects: sum(|s| s.disconnects),
        connect_failures: sum(|s| s.connect_failures),
        sessions_restored: logs.iter().map(|l| l.restored).sum(),
        sessions_new_on_reconnect: logs.iter().map(|l| l.new_sessions_on_reconnect).sum(),
        reconnect_to_restored: Spread::of(logs.iter().flat_map(|l| l.restore_us.iter().copied())),
        reconnect_to_resumed: Spread::of(logs.iter().flat_map(|l| l.ready_us.iter().copied())),
        sends: Sends {
            slots: sends.slots,
            no_client_ready: sends.no_client_ready,
            attempted: sends.attempted,
            written: sends.written.len() as u64,
            refused_not_connected: sends.refused.len() as u64,
            rejected_by_node: logs.iter().map(|l| l.rejected_by_node).sum(),
            confirmed: tally.confirmed,
            unconfirmed: tally.unconfirmed,
            unconfirmed_at_end: sum(|s| s.unconfirmed),
            resent: sum(|s| s.messages_resent),
            confirmed_by_duplicate: sum(|s| s.confirmed_by_duplicate),
            refused_but_published: tally.refused_but_published,
        },
        published: tally.published,
        seqs_assigned_by_redis: heads.as_ref().map(|_| tally.assigned_by_redis),
        never_observed: tally.never_observed,
        seq_conflicts: tally.seq_conflicts,
        expected: tally.expected,
        delivered: tally.delivered,
        replayed: sum(|s| s.replayed_delivered),
        lost: tally.lost,
        lost_distinct: tally.lost_distinct,
        clients_with_loss: tally.clients_with_loss,
        duplicated: duplicates_dropped + tally.app_duplicates + tally.republished,
        duplicates_dropped,
        app_duplicates: tally.app_duplicates,
        republished: tally.republished,
        out_of_order: sum(|s| s.gaps),
        gap_messages: sum(|s| s.gap_messages),
        app_out_of_order: logs.iter().map(|l| l.app_out_of_order).sum(),
        incomplete_resumes: sum(|s| s.incomplete_resumes),
        epoch_changes: sum(|s| s.epoch_changes),
        stale_epoch_dropped: sum(|s| s.stale_epoch_dropped),
        joins_missing: tally.joins_missing,
        joins_without_head: tally.joins_without_head,
        foreign_texts: tally.foreign_texts,
        errors,
        failures: Vec::new(),
        lost_examples: tally.lost_examples,
        unconfirmed_sends: tally.unconfirmed_examples,
    };
    report.failures = failures(&report);
    Ok(report)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Why the run fails, if it does.
fn failures(r: &ChaosReport) -> Vec<String> {
    let mut why = Vec::new();
    if r.lost > 0 {
        why.push(format!(
            "{} owed messages never delivered ({} distinct messages, {} clients; {} never received by anyone)",
            r.lost, r.lost_distinct, r.clients_with_loss, r.never_observed
        ));
    }
    if r.duplicated > 0 {
        why.push(format!(
            "{} duplicates: {} frames the node sent twice, {} handed to an app twice, {} sends published twice",
            r.duplicated, r.duplicates_dropped, r.app_duplicates, r.republished
        ));
    }
    if r.sends.unconfirmed > 0 {
        why.push(format!(
            "{} sends the library accepted were never published ({} still unconfirmed at the end)",
            r.sends.unconfirmed, r.sends.unconfirmed_at_end
        ));
    }
    for (what, f) in [("kills", &r.in_flight_at_kills), ("other connection losses", &r.in_flight_at_other_losses)] {
        if f.lost > 0 || f.duplicated > 0 {
            why.push(format!(
                "of {} messages in flight at {what}, {} lost and {} duplicated",
                f.messages, f.lost, f.duplicated
            ));
        }
    }
    if r.seq_conflicts > 0 {
        why.push(format!("{} seqs carried two different messages", r.seq_conflicts));
    }
    if r.app_out_of_order > 0 {
        why.push(format!("{} messages reached an app out of order", r.app_out_of_order));
    }
    if r.published == 0 {
        why.push("nothing was published: nothing to judge".into());
    }
    if r.joins_missing > 0 {
        why.push(format!("{} joins never confirmed", r.joins_missing));
    }
    why
}

/// The publisher: `rate` sends per second, round-robin over the clients that are in sync.
async fn publish(
    members: Arc<Vec<Member>>,
    rate: f64,
    seed: u64,
    stop: CancellationToken,
    shared: Arc<Shared>,
) -> SendLog {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1));
    let mut log = SendLog::default();
    let mut counters = vec![0u64; members.len()];
    let mut cursor = 0usize;
    let mut inflight: JoinSet<SendOutcome> = JoinSet::new();
    let start = Instant::now();
    let mut tick = interval(PUBLISH_TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while log.slots < due {
            log.slots += 1;
            // The next client in sync, starting at the cursor.
            let pick = (0..members.len()).map(|k| (cursor + k) % members.len()).find_map(|i| {
                match members[i].client.status() {
                    Status::Ready { server } => Some((i, server)),
                    _ => None,
                }
            });
            let Some((i, node)) = pick else {
                log.no_client_ready += 1;
                continue;
            };
            cursor = (i + 1) % members.len();
            let m = &members[i];
            let room = m.rooms[rng.random_range(0..m.rooms.len())].clone();
            counters[i] += 1;
            let text = format!("{}:{}", m.id, counters[i]);
            let client = m.client.clone();
            let at = shared.ms();
            log.attempted += 1;
            inflight.spawn(async move {
                let result = client.send_message(&room, Outgoing::text(text.clone())).await;
                SendOutcome { text, room, at, node, result }
            });
        }
        while let Some(done) = inflight.try_join_next() {
            record_send(&mut log, done);
        }
    }
    while let Some(done) = inflight.join_next().await {
        record_send(&mut log, done);
    }
    log
}

/// How one `send` ended.
struct SendOutcome {
    text: String,
    room: String,
    /// ms since the run's origin.
    at: u64,
    /// The sender's node when it sent.
    node: String,
    /// The `msg_id` the library gave the message.
    result: Result<String, ClientError>,
}

fn record_send(log: &mut SendLog, done: Result<SendOutcome, tokio::task::JoinError>) {
    match done {
        Ok(SendOutcome { text, room, at, node, result: Ok(msg_id) }) => {
            log.written.insert(text, Sent { room, at_ms: at, node, msg_id });
        }
        Ok(SendOutcome { text, result: Err(e), .. }) => {
            log.refused.insert(text, e.to_string());
        }
        Err(e) => tracing::warn!(error = %e, "a send task failed"),
    }
}

/// One line on stderr: where the run stands.
fn progress(opts: &ChaosOptions, phase: &str, t: Duration, chaos: &Chaos, members: &[Member], shared: &Shared) {
    if !opts.progress {
        return;
    }
    let ready = members.iter().filter(|m| matches!(m.client.status(), Status::Ready { .. })).count();
    let behind = {
        let sightings = shared.sightings();
        let mut behind = 0u64;
        for m in members.iter().filter(|m| matches!(m.client.status(), Status::Ready { .. })) {
            for room in &m.rooms {
                let Some((epoch, head)) = sightings.rooms.get(room).and_then(|r| r.head()) else { continue };
                let at = m.client.position(room).filter(|p| p.epoch == epoch).map_or(0, |p| p.seq);
                behind += head.saturating_sub(at);
            }
        }
        behind
    };
    let unconfirmed: usize = members.iter().map(|m| m.client.unconfirmed()).sum();
    eprintln!(
        "[{phase} {:5.1}s] kills {}  ready {ready}/{}  published {}  delivered {}  behind {behind}  unconfirmed {unconfirmed}  gaps {}  reconnects {}  rejected {}",
        t.as_secs_f64(),
        chaos.kills,
        members.len(),
        shared.published.load(Relaxed),
        shared.delivered.load(Relaxed),
        shared.gaps.load(Relaxed),
        shared.reconnects.load(Relaxed),
        shared.rejected_by_node.load(Relaxed),
    );
}

/// How many clients are in sync, and how many seqs they lack, summed, against the heads.
fn drain_state(members: &[Member], heads: Option<&Heads>) -> (usize, u64) {
    let mut ready = 0;
    let mut behind = 0u64;
    for m in members {
        if matches!(m.client.status(), Status::Ready { .. }) {
            ready += 1;
        }
        let Some(heads) = heads else { continue };
        for room in &m.rooms {
            let Some((Some(epoch), head)) = heads.get(room) else { continue };
            let at = m.client.position(room).filter(|p| &p.epoch == epoch).map_or(0, |p| p.seq);
            behind += head.saturating_sub(at);
        }
    }
    (ready, behind)
}

/// Where the rooms' heads (last seq assigned, epoch) are read from.
enum HeadStore {
    /// The private Redis' port.
    Redis(u16),
    /// The private NATS server's URL.
    Nats(String),
}

impl std::fmt::Display for HeadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Redis(port) => write!(f, "Redis redis://127.0.0.1:{port}/"),
            Self::Nats(url) => write!(f, "NATS {url}"),
        }
    }
}

impl HeadStore {
    async fn room_heads(&self, rooms: usize) -> Result<Heads> {
        match self {
            Self::Redis(port) => room_heads(*port, rooms).await,
            Self::Nats(url) => {
                let names: Vec<String> = (0..rooms).map(room_name).collect();
                let heads =
                    timeout(Duration::from_secs(2), tether_node::backbone::nats::room_heads(url, KEY_PREFIX, &names))
                        .await
                        .context("NATS did not answer within 2 s")??;
                Ok(heads.into_iter().collect())
            }
        }
    }
}

/// Each room's `(epoch, seq)` counter in Redis: `HMGET tether:room:{ROOM}:meta seq epoch`,
/// pipelined over one connection.
async fn room_heads(port: u16, rooms: usize) -> Result<Heads> {
    let ask = async {
        let mut redis = RedisClient::connect(&format!("redis://127.0.0.1:{port}/"), Duration::from_secs(2)).await?;
        let layout = tether_proto::backbone::RedisKeys::new(KEY_PREFIX);
        let keys: Vec<String> = (0..rooms).map(|i| layout.meta(&room_name(i))).collect();
        let replies = redis.hmget_each(&keys, &["seq", "epoch"]).await?;
        let mut heads = HashMap::new();
        for (i, fields) in replies.into_iter().enumerate() {
            let seq = fields.first().cloned().flatten().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            let epoch = fields.get(1).cloned().flatten();
            heads.insert(room_name(i), (epoch, seq));
        }
        anyhow::Ok(heads)
    };
    timeout(Duration::from_secs(2), ask).await.context("Redis did not answer within 2 s")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_plan_is_deterministic_and_bounded() {
        let a = plan_rooms(7, 50, 4);
        assert_eq!(a, plan_rooms(7, 50, 4));
        assert_ne!(a, plan_rooms(8, 50, 4));
        for rooms in &a {
            assert!((1..=3).contains(&rooms.len()), "{rooms:?}");
            let mut d = rooms.clone();
            d.dedup();
            assert_eq!(&d, rooms, "distinct and sorted");
        }
        assert!(plan_rooms(1, 10, 1).iter().all(|r| r == &["chaos-room-0"]));
    }

    #[test]
    fn bad_options_name_the_flag() {
        let bad = ChaosOptions { rate: 0.0, ..ChaosOptions::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("--rate"));
        let bad = ChaosOptions { clients: 0, ..ChaosOptions::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("--clients"));
        assert!(ChaosOptions { kill_every: Duration::ZERO, ..ChaosOptions::default() }.validate().is_ok());
    }
}
