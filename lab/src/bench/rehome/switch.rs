//! Part (b) of `tether bench rehome`: how long a rehome takes, per client, when the node under
//! it is SIGKILLed or drained.
//!
//! Per round: K clients whose id the rehome balancer routes to the victim (asked at its admin
//! `/route`, checked against their `connected` frame) join a few rooms; one publisher per room,
//! connected straight to another node, sends steadily to them. Once every client has had a
//! live message, the victim is killed (or drained at `POST /nodes/NAME/drain`) and per client
//! two times are taken from that instant: to its `rehomed` frame, and to its first room
//! message after it (a replay or a live one). After the publishers stop, every client must
//! catch up with its room's last seq; what it never got counts as lost, what came twice as
//! duplicated. Then the victim is restarted (or undrained) and the balancer waits for it to be
//! ready again before the next round.

use super::super::{http_get, metric_sum, unix_micros};
use super::client::{publish, Client, Counters};
use super::RehomeOptions;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_kit::{eventually, BalancerProcess, Cluster};

/// Failover margin past the balancer's `rehome_timeout_ms` before a round gives up waiting.
const MARGIN: Duration = Duration::from_secs(5);
/// Longest wait for the clients to catch up with the publishers after they stop.
const CATCH_UP: Duration = Duration::from_secs(5);

/// How a round takes the victim away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum How {
    Kill,
    Drain,
}

impl How {
    pub fn label(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::Drain => "drain",
        }
    }
}

/// One round's per-client figures.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchRound {
    pub how: How,
    pub round: u32,
    pub clients: usize,
    /// Clients that got a `rehomed` frame, and clients whose connection was closed instead.
    pub rehomed: usize,
    pub closed: usize,
    /// Close codes of the closed clients and how many had each (`None`: no close frame).
    pub close_codes: Vec<(Option<u16>, usize)>,
    /// Clients that saw a second `connected` (a rehome must swallow it).
    pub connected_again: usize,
    /// Kill → `rehomed`, ms, per rehomed client.
    pub to_rehomed_ms: Vec<f64>,
    /// Kill → first room message after `rehomed`, ms, and how many of those were replays.
    pub to_first_message_ms: Vec<f64>,
    pub first_was_replay: usize,
    /// Messages rehomed clients never got, and got twice.
    pub lost: u64,
    pub duplicates: u64,
    pub replayed: u64,
}

/// p50/p99/max of a set of times.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Dist {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Dist {
    pub fn of(xs: &[f64]) -> Self {
        let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self { samples: v.len(), p50_ms: at(0.50), p99_ms: at(0.99), max_ms: v[v.len() - 1] }
    }
}

/// Every round of one kind together.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchSummary {
    pub how: How,
    pub rounds: usize,
    pub clients: usize,
    pub rehomed: usize,
    pub closed: usize,
    pub close_codes: Vec<(Option<u16>, usize)>,
    pub connected_again: usize,
    pub to_rehomed: Dist,
    pub to_first_message: Dist,
    pub first_was_replay: usize,
    pub lost: u64,
    pub duplicates: u64,
}

/// `1012 ×3, none ×1`.
pub fn codes(codes: &[(Option<u16>, usize)]) -> String {
    let one = |(c, n): &(Option<u16>, usize)| format!("{} ×{n}", c.map_or("none".to_owned(), |c| c.to_string()));
    codes.iter().map(one).collect::<Vec<_>>().join(", ")
}

pub fn summarise(rounds: &[SwitchRound], how: How) -> Option<SwitchSummary> {
    let of: Vec<&SwitchRound> = rounds.iter().filter(|r| r.how == how).collect();
    if of.is_empty() {
        return None;
    }
    let all = |f: fn(&SwitchRound) -> &Vec<f64>| of.iter().flat_map(|r| f(r).iter().copied()).collect::<Vec<_>>();
    Some(SwitchSummary {
        how,
        rounds: of.len(),
        clients: of.iter().map(|r| r.clients).sum(),
        rehomed: of.iter().map(|r| r.rehomed).sum(),
        closed: of.iter().map(|r| r.closed).sum(),
        close_codes: of.iter().fold(Vec::new(), |mut acc: Vec<(Option<u16>, usize)>, r| {
            for &(code, n) in &r.close_codes {
                match acc.iter_mut().find(|c| c.0 == code) {
                    Some(c) => c.1 += n,
                    None => acc.push((code, n)),
                }
            }
            acc
        }),
        connected_again: of.iter().map(|r| r.connected_again).sum(),
        to_rehomed: Dist::of(&all(|r| &r.to_rehomed_ms)),
        to_first_message: Dist::of(&all(|r| &r.to_first_message_ms)),
        first_was_replay: of.iter().map(|r| r.first_was_replay).sum(),
        lost: of.iter().map(|r| r.lost).sum(),
        duplicates: of.iter().map(|r| r.duplicates).sum(),
    })
}

/// Runs `opts.kills` kill rounds then `opts.drains` drain rounds against node-1.
pub async fn measure<W: Write>(
    opts: &RehomeOptions,
    cluster: &mut Cluster,
    balancer: &BalancerProcess,
    tag: &str,
    out: &mut W,
) -> Result<Vec<SwitchRound>> {
    let plan = std::iter::repeat_n(How::Kill, opts.kills as usize)
        .chain(std::iter::repeat_n(How::Drain, opts.drains as usize));
    let mut rounds = Vec::new();
    for (k, how) in plan.enumerate() {
        let r = round(opts, cluster, balancer, how, k as u32 + 1, &format!("{tag}-{k}"), out).await?;
        let (a, b) = (Dist::of(&r.to_rehomed_ms), Dist::of(&r.to_first_message_ms));
        writeln!(
            out,
            "  {} round {}: {}/{} rehomed, {} closed; to rehomed p50 {:.1} ms max {:.1} ms; to first message p50 {:.1} ms \
             max {:.1} ms; {} lost, {} duplicated, {} replayed{}",
            how.label(),
            r.round,
            r.rehomed,
            r.clients,
            r.closed,
            a.p50_ms,
            a.max_ms,
            b.p50_ms,
            b.max_ms,
            r.lost,
            r.duplicates,
            r.replayed,
            if r.close_codes.is_empty() { String::new() } else { format!("; close codes {}", codes(&r.close_codes)) },
        )?;
        out.flush()?;
        rounds.push(r);
    }
    Ok(rounds)
}

#[allow(clippy::too_many_arguments)]
async fn round<W: Write>(
    opts: &RehomeOptions,
    cluster: &mut Cluster,
    balancer: &BalancerProcess,
    how: How,
    number: u32,
    tag: &str,
    out: &mut W,
) -> Result<SwitchRound> {
    let victim = cluster.nodes()[0].name().to_owned();
    let other = cluster.nodes()[1].addr();
    let admin = balancer.admin_addr();
    let counters = Arc::new(Counters::default());
    let rooms: Vec<String> = (0..opts.switch_rooms).map(|r| format!("rs-{tag}-{r}")).collect();
    let mut pubs = Vec::new();
    for (r, room) in rooms.iter().enumerate() {
        pubs.push(Arc::new(Client::open(other, &format!("rs-{tag}-p{r}"), room, Arc::clone(&counters)).await?));
    }
    let ids = ids_on(admin, &victim, opts.clients, tag).await?;
    let opens = ids.iter().enumerate().map(|(i, id)| {
        let (room, counters) = (&rooms[i % rooms.len()], Arc::clone(&counters));
        async move { Client::open(balancer.addr(), id, room, counters).await }
    });
    let clients = futures_util::future::try_join_all(opens).await?;
    if let Some(c) = clients.iter().find(|c| c.server != victim) {
        bail!("client {} landed on {} although the balancer routes it to {victim}", c.id, c.server);
    }
    let next = AtomicU64::new(0);
    let stop = tokio_util::sync::CancellationToken::new();
    let publishing = async {
        let run = publish(&pubs, opts.switch_rate, opts.round_limit(), &next);
        tokio::select! {
            r = run => r.map(|_| ()),
            () = stop.cancelled() => Ok(()),
        }
    };
    let driven = async {
        let r = drive(opts, cluster, admin, how, &victim, &clients).await;
        stop.cancel();
        r
    };
    let (published, driven) = tokio::join!(publishing, driven);
    published.context("the publishers")?;
    let (t0, deadline_hit) = driven?;
    // Everyone still connected catches up with the last seq of its room.
    let heads: Vec<Option<(String, u64)>> = pubs.iter().map(|p| p.with(|s| s.last.clone())).collect();
    let behind = |c: &Client| {
        let head = &heads[rooms.iter().position(|r| *r == c.room).unwrap_or(0)];
        c.with(|s| {
            s.closed.is_none() && head.as_ref().is_some_and(|h| s.last.as_ref().is_none_or(|l| l.0 == h.0 && l.1 < h.1))
        })
    };
    let _ = eventually(CATCH_UP, "every rehomed client has its room's last message", || async {
        !clients.iter().any(&behind)
    })
    .await;
    let mut r = SwitchRound {
        how,
        round: number,
        clients: clients.len(),
        rehomed: 0,
        closed: 0,
        close_codes: Vec::new(),
        connected_again: 0,
        to_rehomed_ms: Vec::new(),
        to_first_message_ms: Vec::new(),
        first_was_replay: 0,
        lost: 0,
        duplicates: 0,
        replayed: 0,
    };
    let ms = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1e3;
    for c in &clients {
        let head = &heads[rooms.iter().position(|x| *x == c.room).unwrap_or(0)];
        c.with(|s| {
            r.connected_again += usize::from(s.connected_again);
            match (&s.rehomed, s.closed) {
                (Some((at, _)), _) => {
                    r.rehomed += 1;
                    r.to_rehomed_ms.push(ms(*at));
                    if let Some((at, replay)) = s.first_message {
                        r.to_first_message_ms.push(ms(at));
                        r.first_was_replay += usize::from(replay);
                    }
                    let tail = match (head, &s.last) {
                        (Some(h), Some(l)) if h.0 == l.0 => h.1.saturating_sub(l.1),
                        _ => 0,
                    };
                    r.lost += s.gaps + tail;
                    r.duplicates += s.duplicates;
                    r.replayed += s.replayed;
                }
                (None, Some((_, code))) => {
                    r.closed += 1;
                    match r.close_codes.iter_mut().find(|c| c.0 == code) {
                        Some(c) => c.1 += 1,
                        None => r.close_codes.push((code, 1)),
                    }
                }
                (None, None) => {}
            }
        });
    }
    if deadline_hit {
        writeln!(out, "  {} round {number}: not every client had moved by the deadline", how.label())?;
    }
    for c in clients {
        c.close().await;
    }
    for p in pubs {
        if let Ok(p) = Arc::try_unwrap(p) {
            p.close().await;
        }
    }
    restore(cluster, admin, how, &victim).await?;
    Ok(r)
}

/// Waits for every client's first live message, takes the victim away, waits for every client
/// to be rehomed (or closed) and to get a message after it. Returns the instant of the kill
/// and whether the wait gave up.
async fn drive(
    opts: &RehomeOptions,
    cluster: &mut Cluster,
    admin: SocketAddr,
    how: How,
    victim: &str,
    clients: &[Client],
) -> Result<(Instant, bool)> {
    eventually(Duration::from_secs(15), "every client has a live message before the failover", || async {
        clients.iter().all(|c| c.with(|s| s.live > 0))
    })
    .await
    .context("the publishers' messages did not reach every client")?;
    let t0 = Instant::now();
    for c in clients {
        c.watch(t0);
    }
    match how {
        How::Kill => {
            cluster.node_mut(victim).context("no victim node")?.kill().await?;
        }
        How::Drain => {
            super::http_post(admin, &format!("/nodes/{victim}/drain")).await?;
        }
    }
    let limit = opts.rehome_timeout + MARGIN;
    let moved = eventually(limit, "every client rehomed or closed, with a message after the rehome", || async {
        clients.iter().all(|c| c.with(|s| s.closed.is_some() || s.first_message.is_some()))
    })
    .await;
    Ok((t0, moved.is_err()))
}

/// Restarts the killed node (or undrains it) and waits until the balancer routes to it.
async fn restore(cluster: &mut Cluster, admin: SocketAddr, how: How, victim: &str) -> Result<()> {
    match how {
        How::Kill => cluster.node_mut(victim).context("no victim node")?.restart().await?,
        How::Drain => {
            super::http_post(admin, &format!("/nodes/{victim}/undrain")).await?;
        }
    }
    let nodes = cluster.nodes().len();
    eventually(Duration::from_secs(20), "every node ready at the rehome balancer", || async {
        metric_sum(&http_get(admin, "/metrics").await.unwrap_or_default(), "tether_balancer_node_ready") as usize
            == nodes
    })
    .await
    .context("the balancer did not see the victim ready again")?;
    Ok(())
}

/// `count` fresh client ids that the balancer at `admin` routes to `node`.
async fn ids_on(admin: SocketAddr, node: &str, count: usize, tag: &str) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(count);
    let started = Instant::now();
    let salt = unix_micros() % 1_000_000;
    for i in 0.. {
        if ids.len() == count {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) || i > count * 100 + 1000 {
            bail!("found only {} of {count} client ids routed to {node}", ids.len());
        }
        let id = format!("rs-{tag}-{salt}-{i}");
        let body = http_get(admin, &format!("/route?client={id}")).await?;
        let v: serde_json::Value = serde_json::from_str(&body).context("the balancer's /route answer")?;
        if v["node"].as_str() == Some(node) {
            ids.push(id);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_take_nearest_rank_percentiles() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        let d = Dist::of(&xs);
        assert_eq!((d.samples, d.p50_ms, d.p99_ms, d.max_ms), (100, 50.0, 99.0, 100.0));
        assert_eq!(Dist::of(&[]).samples, 0);
        assert_eq!(Dist::of(&[7.0]).p99_ms, 7.0);
    }
}
