//! `tether chaos --naive`: the balancer's `failover = "rehome"` mode under the same torture as
//! `tether chaos`, with clients that cannot help themselves.
//!
//! The cluster's balancer runs with `--failover rehome` (`--failover reconnect` makes a contrast
//! run: the same clients, closed at every node loss). The `K` clients are plain WebSockets
//! ([`client`]: tokio-tungstenite, no `tether-client`, no reconnect): each connects once as
//! `?client=naive-N`, joins its 1–3 rooms and then writes the `message` frames the publisher
//! hands it — every other one with a `msg_id` of its own, the rest without. The [`schedule`]
//! kills (SIGKILL, restart), drains (drain, undrain) and once rolls a restart over every node
//! (SIGTERM each in turn). A client's connection that ends is never replaced: every close
//! frame and every TCP end is counted, with its code. At the end the clients' deliveries go
//! through the same accounting as `tether chaos` ([`crate::chaos::account`]): each client is
//! owed every message published to its rooms after its own `user_joined`, and the room heads
//! are read from Redis. `docs/CHAOS.md` ("Naive clients") has the rules.

mod client;
mod report;
mod schedule;

pub use report::{CloseSeen, LeakedFrame, NaiveAction, NaiveReport, NaiveSends};

use super::account::{self, ClientLog, Heads, SendLog, Shared};
use super::{plan_rooms, round1, ChaosOptions, HeadStore, RunConfig, UnconfirmedSend};
use super::{HEALTH_INTERVAL_MS, JOIN_TIMEOUT, PUBLISH_TICK};
use anyhow::{anyhow, bail, Context, Result};
use client::{ClientRun, NaiveClient, Outgoing};
use futures_util::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use schedule::{Counts, Schedule};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tether_kit::url::connect_url;
use tether_kit::{Cluster, ClusterLogs, ClusterOptions, Persistence};
use tokio::time::{interval, sleep, sleep_until, timeout, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Sends kept as examples in the report.
const EXAMPLES_KEPT: usize = 200;
/// Leaked frames kept in the report.
const LEAKED_KEPT: usize = 50;

/// `tether chaos --naive` on the command line: runs, prints the table, writes `--json`, and
/// returns 1 when a client saw a close, or anything was lost or duplicated (or another of
/// [`NaiveReport::failures`]).
pub async fn run_cli(opts: ChaosOptions, json: Option<&std::path::Path>) -> Result<i32> {
    let report = run(opts).await?;
    crate::bench::print_report(&format!("{}\n", report.table()), &report, json)?;
    if report.passed() {
        println!("PASS: no client saw a close, nothing lost, nothing duplicated");
        return Ok(0);
    }
    for why in &report.failures {
        println!("FAIL: {why}");
    }
    for c in report.close_log.iter().take(5) {
        println!("  close: {} at t={}ms on {}: {} {:?} {:?}", c.client, c.at_ms, c.server, c.how, c.code, c.reason);
    }
    for m in report.lost_examples.iter().take(5) {
        println!(
            "  lost: {} #{} seq {} {:?} from {:?}; {} joined {}",
            m.client, m.room, m.seq, m.text, m.sender, m.client, m.join
        );
        for line in &m.client_timeline {
            println!("      {line}");
        }
    }
    Ok(1)
}

/// Runs one naive chaos run (`opts.naive` is implied) and returns its figures; the verdict
/// is [`NaiveReport::passed`]. Every process it starts is gone when it returns.
pub async fn run(opts: ChaosOptions) -> Result<NaiveReport> {
    opts.validate()?;
    let say = |line: String| {
        if opts.progress {
            eprintln!("{line}");
        }
    };
    say(format!(
        "tether chaos --naive: {} nodes, {} plain WebSocket clients in {} rooms, {} msg/s, balancer --failover {}, {} for {:.0} s, seed {}",
        opts.nodes,
        opts.clients,
        opts.rooms,
        opts.rate,
        opts.failover,
        if opts.kill_every.is_zero() {
            "no node actions".to_string()
        } else {
            format!(
                "SIGKILL or drain every {:.1} s (back after {} ms), one rolling SIGTERM restart halfway",
                opts.kill_every.as_secs_f64(),
                opts.restart_delay.as_millis()
            )
        },
        opts.duration.as_secs_f64(),
        opts.seed
    ));
    let cluster = Cluster::start(ClusterOptions {
        nodes: opts.nodes,
        logs: opts.logs.clone().map_or(ClusterLogs::Null, ClusterLogs::Dir),
        balancer_args: ["--health-interval-ms", &HEALTH_INTERVAL_MS.to_string(), "--failover", &opts.failover]
            .map(String::from)
            .to_vec(),
        redis_persistence: Persistence::None,
        nats: opts.nats,
        ..ClusterOptions::default()
    })
    .await
    .context("starting the cluster")?;
    let store = match cluster.nats() {
        Some(nats) => HeadStore::Nats(nats.url()),
        None => HeadStore::Redis(cluster.redis().map(|r| r.port()).context("the run needs its private Redis")?),
    };
    say(format!("cluster up: balancer {} (failover {}), backbone {store}", cluster.ws_url(), opts.failover));

    let shared = Arc::new(Shared::new());
    let stop_clients = CancellationToken::new();
    let mut clients = Vec::with_capacity(opts.clients);
    let mut joins = Vec::with_capacity(opts.clients);
    for (i, rooms) in plan_rooms(opts.seed, opts.clients, opts.rooms).into_iter().enumerate() {
        let id = format!("naive-{i}");
        let url = connect_url(&cluster.ws_url(), Some(&id))?;
        let (c, joined) = NaiveClient::start(id, rooms, url, Arc::clone(&shared), stop_clients.clone());
        clients.push(c);
        joins.push(joined);
    }
    for (c, r) in clients.iter().zip(join_all(joins.into_iter().map(|j| timeout(JOIN_TIMEOUT, j))).await) {
        match r {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(why))) => bail!("{} could not join its rooms: {why}", c.id),
            Ok(Err(_)) => bail!("{}'s task ended before joining", c.id),
            Err(_) => bail!("{} did not join its rooms within {JOIN_TIMEOUT:?}", c.id),
        }
    }
    let clients = Arc::new(clients);
    let joined_ms = shared.ms();
    say(format!("{} clients joined in {joined_ms} ms; load starts", opts.clients));

    // Load: the publisher and the schedule run on their own; here, the progress line.
    let load_start = Instant::now();
    let stop_load = CancellationToken::new();
    let publisher = tokio::spawn(publish(Arc::clone(&clients), opts.rate, opts.seed, stop_load.clone()));
    let plan = schedule::plan(opts.duration, opts.kill_every);
    let sched = Schedule::new(plan, opts.seed, opts.restart_delay, Arc::clone(&clients), Arc::clone(&shared));
    let counts = Arc::clone(&sched.counts);
    let mut sched_task = tokio::spawn(sched.run(cluster, stop_load.clone()));
    let end = load_start + opts.duration;
    let mut tick = interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            biased;
            () = sleep_until(end) => break,
            _ = tick.tick() => progress(&opts, "load", load_start.elapsed(), &counts, &clients, &shared),
        }
    }
    let elapsed = load_start.elapsed();
    stop_load.cancel();
    let published_by = publisher.await.context("the publisher task")?;
    // The schedule ends what it is doing (a rolling restart goes round) and brings back what is out.
    let done = loop {
        tokio::select! {
            done = &mut sched_task => break done.context("the schedule task")?,
            _ = tick.tick() => progress(&opts, "restore", load_start.elapsed(), &counts, &clients, &shared),
        }
    };
    let mut cluster = done.cluster;

    // Drain: wait until every client still connected has every room's head and every echo.
    let drain_start = Instant::now();
    let deadline = drain_start + opts.drain_timeout;
    let mut heads: Option<Heads> = None;
    let mut caught_up_before = false;
    let mut last_progress = Instant::now();
    let drained = loop {
        if let Ok(h) = store.room_heads(opts.rooms).await {
            heads = Some(h);
        }
        let caught_up = heads.as_ref().is_some_and(|h| behind_heads(&clients, h) == 0)
            && clients.iter().all(|c| c.live.ended.load(Relaxed) || c.live.unechoed.load(Relaxed) == 0);
        if caught_up && caught_up_before {
            break true;
        }
        caught_up_before = caught_up;
        if Instant::now() >= deadline {
            break false;
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            progress(&opts, "drain", drain_start.elapsed(), &counts, &clients, &shared);
        }
        sleep(Duration::from_millis(200)).await;
    };
    let drain = drain_start.elapsed();
    say(format!(
        "drain {} after {:.1} s; closing {} clients",
        if drained { "complete" } else { "DEADLINE HIT" },
        drain.as_secs_f64(),
        clients.len()
    ));
    stop_clients.cancel();
    let clients = Arc::try_unwrap(clients).map_err(|_| anyhow!("a task still holds the clients"))?;
    let mut runs: Vec<ClientRun> = join_all(clients.into_iter().map(NaiveClient::finish)).await;
    if let Err(e) = cluster.shutdown(Duration::from_secs(2)).await {
        tracing::warn!(error = %e, "stopping the cluster");
    }
    drop(cluster);

    let logs: Vec<ClientLog> = runs.iter_mut().map(|r| std::mem::take(&mut r.log)).collect();
    let mut sends = SendLog::default();
    for r in &runs {
        sends.written.extend(r.written.iter().map(|(t, s)| (t.clone(), s.clone())));
        sends.refused.extend(r.refused.iter().map(|(t, why)| (t.clone(), why.clone())));
    }
    let sightings = std::mem::take(&mut *shared.sightings());
    let tally = account::account(&logs, &sightings, heads.as_ref(), &sends, shared.origin_wall_ms);

    let sum = |f: fn(&ClientRun) -> u64| runs.iter().map(f).sum::<u64>();
    let mut close_log: Vec<CloseSeen> = runs.iter().filter_map(|r| r.close.clone()).collect();
    close_log.sort_by_key(|c| c.at_ms);
    let mut close_codes: BTreeMap<String, u64> = BTreeMap::new();
    for c in &close_log {
        *close_codes.entry(c.code.map_or_else(|| "none".to_string(), |k| k.to_string())).or_default() += 1;
    }
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for (code, n) in runs.iter().flat_map(|r| r.errors.iter()) {
        *errors.entry(code.clone()).or_default() += n;
    }
    let mut no_echo: Vec<UnconfirmedSend> = runs
        .iter()
        .flat_map(|r| r.unechoed.iter())
        .map(|(text, s)| UnconfirmedSend {
            text: text.clone(),
            room: s.room.clone(),
            at_ms: s.at_ms,
            node: s.node.clone(),
        })
        .collect();
    no_echo.sort_by_key(|u| u.at_ms);
    let no_echo_count = no_echo.len() as u64;
    no_echo.truncate(EXAMPLES_KEPT);
    let actions = done.actions;
    let count = |kind: &str| actions.iter().filter(|a| a.kind == kind).count() as u64;
    let mut report = NaiveReport {
        mode: "naive",
        failover: opts.failover.clone(),
        config: RunConfig {
            nodes: opts.nodes,
            clients: opts.clients,
            rooms: opts.rooms,
            rate: opts.rate,
            kill_every_s: opts.kill_every.as_secs_f64(),
            duration_s: opts.duration.as_secs_f64(),
            redis_restart: false,
            backbone: if opts.nats { "nats" } else { "redis" },
            restart_delay_ms: u64::try_from(opts.restart_delay.as_millis()).unwrap_or(u64::MAX),
            drain_timeout_s: opts.drain_timeout.as_secs_f64(),
            seed: opts.seed,
        },
        load_started_at_ms: joined_ms,
        elapsed_s: round1(elapsed.as_secs_f64()),
        drain_s: round1(drain.as_secs_f64()),
        drained,
        kills: count("sigkill"),
        drains: count("drain"),
        sigterms: count("sigterm"),
        action_failures: actions.iter().filter(|a| a.error.is_some()).count() as u64,
        actions,
        closes: close_log.len() as u64,
        close_codes,
        close_log,
        rehomed: sum(|r| r.rehomed),
        clients_rehomed: sum(|r| u64::from(r.rehomed > 0)),
        connected_again: sum(|r| r.connected_again),
        sends: NaiveSends {
            slots: published_by.slots,
            no_client_ready: published_by.no_client_ready,
            attempted: published_by.attempted,
            written: sends.written.len() as u64,
            with_own_msg_id: sum(|r| r.with_own_msg_id),
            echoed: tally.confirmed,
            no_echo: no_echo_count,
            never_published: tally.unconfirmed,
            refused: sends.refused.len() as u64 + published_by.handoff_failed,
            echo_msg_id_changed: sum(|r| r.echo_msg_id_changed),
            echo_without_balancer_msg_id: sum(|r| r.echo_without_balancer_msg_id),
        },
        published: tally.published,
        seqs_assigned: heads.as_ref().map(|_| tally.assigned_by_redis),
        never_observed: tally.never_observed,
        seq_conflicts: tally.seq_conflicts,
        expected: tally.expected,
        delivered: tally.delivered,
        replayed: sum(|r| r.replayed),
        lost: tally.lost,
        lost_distinct: tally.lost_distinct,
        clients_with_loss: tally.clients_with_loss,
        duplicated: tally.app_duplicates + tally.republished,
        duplicated_by_seq: tally.app_duplicates,
        duplicated_by_content: tally.republished,
        out_of_order: logs.iter().map(|l| l.app_out_of_order).sum(),
        gaps: sum(|r| r.gaps),
        resumed_seen: sum(|r| r.resumed_seen),
        incomplete_resumes: sum(|r| r.incomplete_resumes),
        duplicate_answers: sum(|r| r.duplicate_answers),
        bad_frames: sum(|r| r.bad_frames),
        leaked_frames: {
            let mut all: Vec<LeakedFrame> = runs.iter().flat_map(|r| r.leaked.iter().cloned()).collect();
            all.sort_by_key(|f| f.at_ms);
            all.truncate(LEAKED_KEPT);
            all
        },
        joins_missing: tally.joins_missing,
        errors,
        failures: Vec::new(),
        lost_examples: tally.lost_examples,
        no_echo_sends: no_echo,
    };
    report.failures = report.judge();
    Ok(report)
}

/// What the publisher did.
#[derive(Debug, Default)]
struct Published {
    slots: u64,
    no_client_ready: u64,
    attempted: u64,
    /// Handed to a client whose task had just ended.
    handoff_failed: u64,
}

/// `rate` sends per second, round-robin over the clients in sync; each text unique
/// (`naive-7:12`), every even-numbered one with the client's own `msg_id` (`naive-7-12`).
async fn publish(clients: Arc<Vec<NaiveClient>>, rate: f64, seed: u64, stop: CancellationToken) -> Published {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1));
    let mut p = Published::default();
    let mut counters = vec![0u64; clients.len()];
    let mut cursor = 0usize;
    let start = Instant::now();
    let mut tick = interval(PUBLISH_TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while p.slots < due {
            p.slots += 1;
            let pick = (0..clients.len()).map(|k| (cursor + k) % clients.len()).find(|&i| clients[i].live.is_ready());
            let Some(i) = pick else {
                p.no_client_ready += 1;
                continue;
            };
            cursor = (i + 1) % clients.len();
            let c = &clients[i];
            counters[i] += 1;
            let n = counters[i];
            let room = c.rooms[rng.random_range(0..c.rooms.len())].clone();
            let msg_id = n.is_multiple_of(2).then(|| format!("{}-{n}", c.id));
            p.attempted += 1;
            if !c.send(Outgoing { room, text: format!("{}:{n}", c.id), msg_id }) {
                p.handoff_failed += 1;
            }
        }
    }
    p
}

/// Seqs the connected clients lack, summed, against the rooms' heads.
fn behind_heads(clients: &[NaiveClient], heads: &Heads) -> u64 {
    let mut behind = 0;
    for c in clients.iter().filter(|c| !c.live.ended.load(Relaxed)) {
        for room in &c.rooms {
            let Some((Some(epoch), head)) = heads.get(room) else { continue };
            let at = c.live.position(room).filter(|(e, _)| e == epoch).map_or(0, |(_, s)| s);
            behind += head.saturating_sub(at);
        }
    }
    behind
}

/// One line on stderr: where the run stands.
fn progress(opts: &ChaosOptions, phase: &str, t: Duration, counts: &Counts, clients: &[NaiveClient], shared: &Shared) {
    if !opts.progress {
        return;
    }
    let connected = clients.iter().filter(|c| !c.live.ended.load(Relaxed)).count();
    let rehomed: u64 = clients.iter().map(|c| c.live.rehomed.load(Relaxed)).sum();
    let unechoed: u64 = clients.iter().map(|c| c.live.unechoed.load(Relaxed)).sum();
    let behind = {
        let sightings = shared.sightings();
        let mut behind = 0u64;
        for c in clients.iter().filter(|c| c.live.is_ready()) {
            for room in &c.rooms {
                let Some((epoch, head)) = sightings.rooms.get(room).and_then(|r| r.head()) else { continue };
                let at = c.live.position(room).filter(|(e, _)| e == epoch).map_or(0, |(_, s)| s);
                behind += head.saturating_sub(at);
            }
        }
        behind
    };
    eprintln!(
        "[{phase} {:5.1}s] kills {}  drains {}  sigterms {}  connected {connected}/{}  closes {}  rehomed {rehomed}  published {}  delivered {}  behind {behind}  unechoed {unechoed}",
        t.as_secs_f64(),
        counts.kills.load(Relaxed),
        counts.drains.load(Relaxed),
        counts.sigterms.load(Relaxed),
        clients.len(),
        clients.len() - connected,
        shared.published.load(Relaxed),
        shared.delivered.load(Relaxed),
    );
}
