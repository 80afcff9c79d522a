//! One mode, start to finish: its cluster, its clients, then the phases in order — memory and
//! connections, warm-up, fixed rate, step-up, node loss — each filling its part of the mode's
//! [`ModeReport`] as soon as it is measured, so that a later failure keeps what came before.

use super::account::{cdf_points, judge_step, max_sustained, LatencyUs, StepFigures};
use super::report::{Memory, ModeReport, NodeLoss, PhaseFigures, StepReport};
use super::workload::{warm_clients, StallProbe, Workload, WorkloadSpec};
use super::{CompareOptions, Mode, Progress, JOIN_TIMEOUT, SINGLE_RESTART_DELAY};
use crate::bench::{http_get, procfs};
use anyhow::{anyhow, Context, Result};
use futures_util::future::join_all;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tether_client::Client;
use tether_kit::{Cluster, ClusterLogs};
use tokio::time::{interval, sleep, sleep_until, timeout, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Phase ids (the first number of every message text).
const WARMUP: usize = 0;
const FIXED: usize = 1;
const LOSS: usize = 2;
const FIRST_STEP: usize = 3;
/// A phase is drained when nothing more arrived for this long.
const QUIET: Duration = Duration::from_millis(250);
/// Longest drain after the fixed phase and the warm-up.
const FIXED_DRAIN: Duration = Duration::from_secs(5);
/// Longest drain after a step: what has not arrived by then counts as fallen behind.
const STEP_DRAIN: Duration = Duration::from_secs(2);
const QUICK_STEP_DRAIN: Duration = Duration::from_secs(1);
/// Longest wait, after the step-up, for every client to be in sync and the queues empty.
const SETTLE: Duration = Duration::from_secs(10);
/// Load before the kill, and after the last moved client is back.
const LOSS_LEAD: Duration = Duration::from_millis(500);
const QUICK_LOSS_LEAD: Duration = Duration::from_millis(300);
const LOSS_TAIL: Duration = Duration::from_millis(500);
/// Longest wait, after the node loss, for every client to catch up (resume replays included).
const LOSS_DRAIN: Duration = Duration::from_secs(5);

/// Runs `mode` into `row`. Every process and client it starts is gone when it returns, and
/// also when the future is dropped (the mode's time budget ran out).
pub(super) async fn run_mode(
    mode: Mode,
    o: &CompareOptions,
    logs: ClusterLogs,
    seed: u64,
    row: &mut ModeReport,
    p: &Progress,
) -> Result<()> {
    p.say(format!("starting {} ({}) behind one balancer", mode.processes(), mode.approach()));
    let t0 = Instant::now();
    let log_dir = match &logs {
        ClusterLogs::Dir(dir) => Some(dir.clone()),
        _ => None,
    };
    let balancer_config = match mode.balancer_toml() {
        Some(text) => {
            let dir = log_dir.clone().unwrap_or_else(std::env::temp_dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let file = dir.join(format!("balancer-{}-{}.toml", mode.name(), std::process::id()));
            std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
            Some(file)
        }
        None => None,
    };
    // Declared before the cluster, so dropped after it: the nodes go first.
    let nats_cluster = match mode {
        Mode::NatsCluster => Some(
            tether_kit::NatsCluster::start_with(super::NATS_CLUSTER_SERVERS, log_dir.clone())
                .await
                .context("starting the NATS cluster")?,
        ),
        _ => None,
    };
    let mut cluster = match Cluster::start(mode.cluster_options(
        logs,
        balancer_config.as_deref(),
        nats_cluster.as_ref().map(|n| n.url()),
    ))
    .await
    {
        Ok(c) => c,
        Err(e) => {
            let said = log_dir.as_deref().and_then(last_error_line).map(|l| format!("; {l}")).unwrap_or_default();
            return Err(anyhow!("starting the cluster: {e:#}{said}"));
        }
    };
    p.say(format!("cluster up in {:.1} s; balancer {}", t0.elapsed().as_secs_f64(), cluster.ws_url()));
    let warm =
        warm_clients(&cluster.ws_url(), warm_count(mode, o.clients), o.rooms, mode.by_room(), seed, JOIN_TIMEOUT)
            .await
            .context("connecting the warm-up clients")?;
    let rss_before = nodes_rss(&cluster).context("reading the nodes' memory")?;
    let t0 = Instant::now();
    let spec = WorkloadSpec {
        url: cluster.ws_url(),
        clients: o.clients,
        rooms: o.rooms,
        // One phase per step trial: a first and a possible second.
        phases: FIRST_STEP + 2 * o.steps.len(),
        by_room: mode.by_room(),
        seed,
        join_timeout: JOIN_TIMEOUT,
    };
    let wl = Workload::start(&spec).await.context("connecting and joining the clients")?;
    p.say(format!("{} clients joined {} rooms in {:.1} s", o.clients, o.rooms, t0.elapsed().as_secs_f64()));
    let result = measure(mode, o, row, &mut cluster, &wl, rss_before, warm, p).await;
    wl.close(Duration::from_secs(2)).await;
    drop(wl);
    if let Err(e) = cluster.kill_all().await {
        tracing::warn!(error = %format!("{e:#}"), "stopping the cluster");
    }
    result
}

/// The last line of the first log in `dir` that mentions an error, as `FILE: LINE`: what a
/// process that failed to start said about it.
fn last_error_line(dir: &Path) -> Option<String> {
    let mut logs: Vec<_> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    logs.sort();
    logs.iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        let line = text.lines().rev().find(|l| l.to_ascii_lowercase().contains("error"))?;
        let name = path.file_name()?.to_string_lossy().into_owned();
        Some(format!("{name}: {}", line.trim()))
    })
}

/// `active_connections` per node from the balancer's `/status`.
async fn balancer_connections(cluster: &Cluster) -> Result<BTreeMap<String, u64>> {
    let body = http_get(cluster.balancer().admin_addr(), "/status").await.context("balancer /status")?;
    let status: serde_json::Value = serde_json::from_str(&body).context("balancer /status is not JSON")?;
    let nodes = status["nodes"].as_array().ok_or_else(|| anyhow!("balancer /status has no `nodes`: {body}"))?;
    Ok(nodes.iter().filter_map(|n| Some((n["name"].as_str()?.to_owned(), n["active_connections"].as_u64()?))).collect())
}

/// Warm-up clients: enough to touch every node several times (a third of the workload, at
/// least four per node).
fn warm_count(mode: Mode, clients: usize) -> usize {
    (clients / 3).max(4 * mode.nodes())
}

fn nodes_rss(cluster: &Cluster) -> Result<u64> {
    cluster.nodes().iter().map(|n| procfs::rss_kib(n.pid())).sum()
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn measure(
    mode: Mode,
    o: &CompareOptions,
    row: &mut ModeReport,
    cluster: &mut Cluster,
    wl: &Workload,
    rss_before: u64,
    warm: Vec<Client>,
    p: &Progress,
) -> Result<()> {
    connections_and_memory(cluster, wl, rss_before, warm, row, p).await?;
    let baseline_share = fixed_rate(mode, o, wl, row, p).await?;
    step_up(mode, o, wl, baseline_share, row, p).await?;
    if !wl.settle(QUIET, SETTLE).await {
        p.say(format!(
            "after the step-up: {}/{} clients in sync after {:.0} s; going on",
            wl.run.ready_count(),
            wl.run.members.len(),
            SETTLE.as_secs_f64()
        ));
    }
    node_loss(mode, o, cluster, wl, row, p).await
}

/// The workload's marginal memory (RSS now against `rss_before`, taken with only the warm-up
/// clients connected), then, with those closed, the workload's connections per node.
async fn connections_and_memory(
    cluster: &Cluster,
    wl: &Workload,
    rss_before: u64,
    warm: Vec<Client>,
    row: &mut ModeReport,
    p: &Progress,
) -> Result<()> {
    let rss_after = nodes_rss(cluster).context("reading the nodes' memory")?;
    let connections = wl.run.members.len() as u64;
    let warmup_connections = warm.len() as u64;
    let _ = timeout(Duration::from_secs(2), join_all(warm.iter().map(|c| c.close()))).await;
    drop(warm);
    // The balancer counts a tunnel until both sides have closed: wait for the warm-up
    // clients' to go.
    let deadline = Instant::now() + Duration::from_secs(3);
    let per_node = loop {
        let per_node = balancer_connections(cluster).await?;
        if per_node.values().sum::<u64>() <= connections || Instant::now() >= deadline {
            break per_node;
        }
        sleep(Duration::from_millis(20)).await;
    };
    let memory = Memory {
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        connections,
        warmup_connections,
        per_connection_kib: rss_after.saturating_sub(rss_before) as f64 / connections as f64,
    };
    p.say(format!(
        "connections per node {}; node RSS {} → {} KiB over the warm-up clients, {:.1} KiB per connection",
        per_node.iter().map(|(n, c)| format!("{n}={c}")).collect::<Vec<_>>().join(" "),
        rss_before,
        rss_after,
        memory.per_connection_kib
    ));
    row.connections_per_node = per_node;
    row.memory = Some(memory);
    row.rooms_split = Some(rooms_split(&wl.run.nodes_now(), &wl.run.room_members));
    Ok(())
}

/// Rooms whose members are connected to more than one node, given each client's node now
/// and each room's members: without a backbone, a message in such a room misses the members
/// on the other nodes.
fn rooms_split(nodes: &[Option<String>], room_members: &[Vec<usize>]) -> u64 {
    let split = room_members.iter().filter(|members| {
        let mut on = members.iter().filter_map(|&c| nodes.get(c).and_then(Option::as_deref));
        on.next().is_some_and(|first| on.any(|n| n != first))
    });
    split.count() as u64
}

/// The fixed-rate phase; returns its share of what the mode can deliver (the step-up's
/// baseline).
async fn fixed_rate(mode: Mode, o: &CompareOptions, wl: &Workload, row: &mut ModeReport, p: &Progress) -> Result<f64> {
    let never = CancellationToken::new();
    let warm = wl.publish(WARMUP, o.rate, Some(Instant::now() + o.warmup), never.clone());
    warm.finish(false).await?;
    wl.drain(WARMUP, QUIET, FIXED_DRAIN).await;

    let end = Instant::now() + o.fixed;
    let probe = StallProbe::start();
    let publisher = wl.publish(FIXED, o.rate, Some(end), never);
    let first = publisher.first();
    let mut tick = interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            () = sleep_until(end) => break,
            _ = tick.tick() => p.say(format!(
                "fixed {} msg/s: {} sent, {} of {} deliveries",
                o.rate,
                wl.run.sent_len() - first,
                wl.run.phase_received(FIXED),
                wl.run.phase_owed(FIXED),
            )),
        }
    }
    let (ids, stats) = publisher.finish(false).await?;
    let stall = probe.finish().await;
    let drained = wl.drain(FIXED, QUIET, FIXED_DRAIN).await;
    let t = wl.run.with_delivery_view(&ids, |l| l.tally(ids.clone(), stats.ended_us, true));
    let latency = LatencyUs::of(&t.latency);
    row.delivery_ratio = Some(t.delivery_ratio());
    row.reach_ratio = t.reach_ratio();
    row.latency_us = Some(latency);
    row.latency_cdf = cdf_points(&t.latency);
    row.fixed = Some(PhaseFigures {
        rate: o.rate,
        secs: o.fixed.as_secs_f64(),
        messages: t.written,
        refused: t.refused,
        expected_deliveries: t.expected,
        received: t.received,
        duplicates: t.duplicates,
        drained,
        generator_max_stall_us: stall.as_micros() as u64,
    });
    p.say(format!(
        "fixed done: {} messages, delivery {:.4} (members on the sender's node: {:.4}), p50 {:.2} ms, p99 {:.2} ms, \
         p99.9 {:.2} ms; load generator stalled up to {:.1} ms{}",
        t.written,
        t.delivery_ratio(),
        t.reach_ratio().unwrap_or(0.0),
        latency.p50 as f64 / 1e3,
        latency.p99 as f64 / 1e3,
        latency.p999 as f64 / 1e3,
        stall.as_secs_f64() * 1e3,
        if drained { "" } else { " (drain deadline hit)" }
    ));
    if t.received == 0 {
        return Err(anyhow!("nothing was delivered at {} msg/s", o.rate));
    }
    Ok(t.deliverable_share(mode.cross_node()))
}

/// The step-up. `baseline_share` is the fixed phase's share of what the mode can deliver.
async fn step_up(
    mode: Mode,
    o: &CompareOptions,
    wl: &Workload,
    baseline_share: f64,
    row: &mut ModeReport,
    p: &Progress,
) -> Result<()> {
    let baseline = baseline_share;
    let bound_us = (o.p99_bound_ms * 1e3) as u64;
    let drain_max = if o.quick { QUICK_STEP_DRAIN } else { STEP_DRAIN };
    let started = Instant::now();
    let mut verdicts = Vec::new();
    let mut stop = None;
    for (k, &rate) in o.steps.iter().enumerate() {
        if started.elapsed() >= o.step_budget {
            stop = Some(format!("time budget of {:.0} s spent before {rate:.0} msg/s", o.step_budget.as_secs_f64()));
            break;
        }
        let mut trial = 1;
        let (figures, verdict, t, latency, stall, drained) = loop {
            let phase = if trial == 1 { FIRST_STEP + k } else { FIRST_STEP + o.steps.len() + k };
            let probe = StallProbe::start();
            let publisher = wl.publish(phase, rate, Some(Instant::now() + o.step), CancellationToken::new());
            let (ids, stats) = publisher.finish(false).await?;
            let stall = probe.finish().await;
            let drained = wl.drain(phase, QUIET, drain_max).await;
            let t = wl.run.with_delivery_view(&ids, |l| l.tally(ids.clone(), stats.ended_us, !mode.cross_node()));
            let window = (stats.ended_us.saturating_sub(stats.started_us) as f64 / 1e6).max(1e-3);
            let latency = LatencyUs::of(&t.latency);
            let figures = StepFigures {
                rate,
                achieved_rate: (t.written_in_window as f64 / window * 10.0).round() / 10.0,
                delivered_share: t.deliverable_share(mode.cross_node()),
                p99_us: latency.p99,
                samples: latency.samples,
            };
            let verdict = judge_step(&figures, baseline, bound_us);
            if verdict.is_ok() || trial == 2 {
                break (figures, verdict, t, latency, stall, drained);
            }
            p.say(format!(
                "step {rate:.0} msg/s: {} (p99 {:.2} ms, load generator stalled up to {:.1} ms); once more",
                verdict.as_ref().err().map_or("", String::as_str),
                latency.p99 as f64 / 1e3,
                stall.as_secs_f64() * 1e3
            ));
            trial += 1;
        };
        p.say(format!(
            "step {rate:.0} msg/s: wrote {:.0}/s, delivery {:.4}, p50 {:.2} ms, p99 {:.2} ms, load generator \
             stalled up to {:.1} ms{} → {}",
            figures.achieved_rate,
            t.delivery_ratio(),
            latency.p50 as f64 / 1e3,
            latency.p99 as f64 / 1e3,
            stall.as_secs_f64() * 1e3,
            if drained { "" } else { ", still arriving at the drain deadline" },
            match &verdict {
                Ok(()) => "sustained".to_owned(),
                Err(why) => format!("stop: {why}"),
            }
        ));
        verdicts.push((rate, verdict.is_ok()));
        row.steps.push(StepReport {
            rate,
            achieved_rate: figures.achieved_rate,
            delivery_ratio: t.delivery_ratio(),
            latency_us: latency,
            sustained: verdict.is_ok(),
            reason: verdict.as_ref().err().cloned(),
            generator_max_stall_us: stall.as_micros() as u64,
            trials: trial,
        });
        if let Err(why) = verdict {
            stop = Some(format!("{rate:.0} msg/s: {why}"));
            break;
        }
    }
    let max = max_sustained(&verdicts);
    p.say(format!("max sustained rate: {max:.0} msg/s"));
    row.max_rate = Some(max);
    row.stop_reason = Some(stop.unwrap_or_else(|| "every step was sustained".into()));
    Ok(())
}

async fn node_loss(
    mode: Mode,
    o: &CompareOptions,
    cluster: &mut Cluster,
    wl: &Workload,
    row: &mut ModeReport,
    p: &Progress,
) -> Result<()> {
    let run = &wl.run;
    let stats_before = run.stats();
    let stop = CancellationToken::new();
    let publisher = wl.publish(LOSS, o.rate, None, stop);
    sleep(if o.quick { QUICK_LOSS_LEAD } else { LOSS_LEAD }).await;

    // The node holding the most clients (ties: the first by name).
    let on = run.nodes_now();
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for n in on.iter().flatten() {
        *per_node.entry(n.as_str()).or_default() += 1;
    }
    let victim = per_node
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(n, _)| (*n).to_owned())
        .or_else(|| cluster.nodes().first().map(|n| n.name().to_owned()))
        .context("no node to kill")?;
    let victims: Vec<bool> = on.iter().map(|n| n.as_deref() == Some(victim.as_str())).collect();
    let moved = victims.iter().filter(|v| **v).count() as u64;
    let mut loss = NodeLoss { node: victim.clone(), clients_on_node: moved, ..NodeLoss::default() };

    let kill_us = run.now_us();
    let killed_at = Instant::now();
    let node = cluster.node_mut(&victim).with_context(|| format!("no node called {victim}"))?;
    node.kill().await.with_context(|| format!("killing {victim}"))?;
    if mode.nodes() == 1 {
        p.say(format!(
            "node loss: SIGKILL {victim} with {moved} clients at {} msg/s; it is the only node, so it is restarted \
             after {:.1} s",
            o.rate,
            SINGLE_RESTART_DELAY.as_secs_f64()
        ));
        sleep(SINGLE_RESTART_DELAY).await;
        match node.restart().await {
            Ok(()) => loss.restarted_after_ms = Some(killed_at.elapsed().as_millis() as u64),
            Err(e) => loss.restart_error = Some(format!("{e:#}")),
        }
    } else {
        p.say(format!("node loss: SIGKILL {victim} with {moved} clients at {} msg/s", o.rate));
    }

    // Wait for the moved clients to be back in sync.
    let deadline = killed_at + o.reconnect_timeout;
    let mut last_say = Instant::now();
    loop {
        let timelines = run.timelines();
        let back = (0..victims.len()).filter(|&c| victims[c] && back_after(&timelines[c], kill_us).1.is_some()).count();
        if back as u64 == moved {
            break;
        }
        if Instant::now() >= deadline {
            p.say(format!(
                "node loss: only {back}/{moved} back in sync after {:.0} s",
                o.reconnect_timeout.as_secs_f64()
            ));
            break;
        }
        if last_say.elapsed() >= Duration::from_secs(1) {
            last_say = Instant::now();
            p.say(format!("node loss: {back}/{moved} back in sync"));
        }
        sleep(Duration::from_millis(20)).await;
    }
    sleep(LOSS_TAIL).await;
    let (ids, stats) = publisher.finish(true).await?;
    loss.drained = wl.settle(QUIET, LOSS_DRAIN).await;

    // Reconnects and sessions, from the moved clients' timelines.
    let timelines = run.timelines();
    let mut reconnect_us = Vec::new();
    let mut recover_us = Vec::new();
    for c in (0..victims.len()).filter(|&c| victims[c]) {
        let (up, ready) = back_after(&timelines[c], kill_us);
        if let Some((at, restored)) = up {
            loss.reconnected += 1;
            loss.restored += u64::from(restored);
            reconnect_us.push(at - kill_us);
        }
        if let Some(at) = ready {
            recover_us.push(at - kill_us);
        }
    }
    let all = |v: &[u64]| (v.len() as u64 == moved).then(|| v.iter().copied().max().unwrap_or(0) / 1000);
    loss.reconnect_ms = all(&reconnect_us);
    loss.recovered_ms = all(&recover_us);

    let tally = run.with_delivery_view(&ids, |l| l.node_loss(ids.clone(), mode.cross_node(), &victims));
    loss.set_tally(&tally);
    loss.nobody_ready = stats.nobody_ready;
    let stats_after = run.stats();
    let delta = |f: fn(&tether_client::StatsSnapshot) -> u64| -> u64 {
        stats_after.iter().zip(&stats_before).map(|(a, b)| f(a).saturating_sub(f(b))).sum()
    };
    loss.duplicates_suppressed = delta(|s| s.duplicates_dropped);
    loss.gaps_noticed = delta(|s| s.gaps);
    loss.incomplete_resumes = delta(|s| s.incomplete_resumes);
    p.say(format!(
        "node loss: {}/{moved} reconnected ({}), {} sessions restored, {} of {} owed deliveries lost ({} by moved \
         clients), {} duplicates seen, {} suppressed; {} unconfirmed, {} refused sends{}",
        loss.reconnected,
        loss.recovered_ms.map_or("not all".into(), |ms| format!("all in sync {:.2} s after the kill", ms as f64 / 1e3)),
        loss.restored,
        loss.lost,
        loss.owed,
        loss.lost_by_moved_clients,
        loss.duplicates,
        loss.duplicates_suppressed,
        loss.unconfirmed,
        loss.refused,
        if loss.drained { "" } else { " (drain deadline hit)" }
    ));
    let failure = loss.restart_error.clone();
    row.node_loss = Some(loss);
    match failure {
        Some(e) => Err(anyhow!("node loss: restarting {victim} failed: {e}")),
        None => Ok(()),
    }
}

/// A client's first `connected` after `t` (time, session restored) and first ready after it.
fn back_after(timeline: &[super::account::Transition], t: u64) -> (Option<(u64, bool)>, Option<u64>) {
    use super::account::Transition::{Ready, Up};
    let up = timeline.iter().find_map(|tr| match tr {
        Up { at_us, restored, .. } if *at_us > t => Some((*at_us, *restored)),
        _ => None,
    });
    let ready = timeline.iter().find_map(|tr| match tr {
        Ready { at_us, .. } if *at_us > t => Some(*at_us),
        _ => None,
    });
    (up, ready)
}

#[cfg(test)]
mod tests {
    use super::super::account::Transition;
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_room_is_split_when_its_members_are_on_two_nodes() {
        let on = |n: &[Option<&str>]| n.iter().map(|s| s.map(str::to_owned)).collect::<Vec<_>>();
        let rooms = vec![vec![0, 1], vec![2, 3], vec![4]];
        assert_eq!(rooms_split(&on(&[Some("a"), Some("a"), Some("a"), Some("b"), Some("c")]), &rooms), 1);
        assert_eq!(rooms_split(&on(&[Some("a"), Some("b"), Some("a"), Some("b"), None]), &rooms), 2);
        assert_eq!(rooms_split(&on(&[Some("a"), None, None, Some("b"), None]), &rooms), 0, "unconnected: no node");
    }

    #[test]
    fn the_first_connection_after_the_kill_counts() {
        let n = |s: &str| -> Arc<str> { Arc::from(s) };
        let tl = vec![
            Transition::Up { at_us: 10, server: n("node-1"), restored: false },
            Transition::Ready { at_us: 20, server: n("node-1") },
            Transition::Down { at_us: 105 },
            Transition::Up { at_us: 150, server: n("node-2"), restored: true },
            Transition::Ready { at_us: 170, server: n("node-2") },
            Transition::Up { at_us: 900, server: n("node-3"), restored: false },
        ];
        assert_eq!(back_after(&tl, 100), (Some((150, true)), Some(170)));
        assert_eq!(back_after(&tl, 5), (Some((10, false)), Some(20)));
        assert_eq!(back_after(&tl, 1000), (None, None));
    }
}
