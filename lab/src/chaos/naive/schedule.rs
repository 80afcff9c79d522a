//! The node schedule of `tether chaos --naive`: every `--kill-every` seconds a `SIGKILL`
//! (restart after `--restart-delay-ms`) or a drain (undrain after the same delay), in turn,
//! and once, halfway, a rolling restart of every node — `SIGTERM`, wait for the exit, start it
//! again, wait until it is ready and the balancer lists it `up`, then the next. Never two
//! actions at once. It runs as a task of its own, owning the [`Cluster`], so that the
//! progress line keeps going through a rolling restart.

use super::client::NaiveClient;
use super::report::NaiveAction;
use crate::chaos::account::Shared;
use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tether_kit::{eventually, ApiClient, Cluster};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// Longest wait for a node's exit after `SIGTERM` (it drains its clients first); it is
/// killed after that, and the action records it.
const TERM_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a restarted node's `/readyz`, and for the balancer to list it `up`.
const BACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What a slot of the plan does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Kill,
    Drain,
    RollingRestart,
}

/// The plan: a slot every `every` within `duration`; the one nearest its middle is the
/// rolling restart, the others alternate kill and drain (kill first). Empty when `every`
/// is zero (a control run).
pub(super) fn plan(duration: Duration, every: Duration) -> Vec<(Duration, Kind)> {
    if every.is_zero() {
        return Vec::new();
    }
    let times: Vec<Duration> = (1u32..).map(|k| every * k).take_while(|t| *t < duration).collect();
    let half = duration / 2;
    let Some(rolling) = (0..times.len()).min_by_key(|&i| times[i].abs_diff(half)) else {
        return Vec::new();
    };
    let mut others = [Kind::Kill, Kind::Drain].into_iter().cycle();
    times
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, if i == rolling { Kind::RollingRestart } else { others.next().unwrap_or(Kind::Kill) }))
        .collect()
}

/// Counts the progress line reads while the schedule runs.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub(super) kills: AtomicU64,
    pub(super) drains: AtomicU64,
    pub(super) sigterms: AtomicU64,
}

/// A node out of service, to be brought back.
#[derive(Debug, Clone, Copy)]
enum Out {
    Killed { node: usize, back_at: Instant, record: usize },
    Drained { node: usize, back_at: Instant, record: usize },
}

/// What the schedule hands back at the end.
pub(super) struct Done {
    pub(super) cluster: Cluster,
    pub(super) actions: Vec<NaiveAction>,
}

pub(super) struct Schedule {
    plan: std::vec::IntoIter<(Duration, Kind)>,
    next: Option<(Instant, Kind)>,
    load_start: Instant,
    rng: StdRng,
    restart_delay: Duration,
    out: Option<Out>,
    clients: Arc<Vec<NaiveClient>>,
    shared: Arc<Shared>,
    pub(super) counts: Arc<Counts>,
    actions: Vec<NaiveAction>,
}

impl Schedule {
    pub(super) fn new(
        plan: Vec<(Duration, Kind)>,
        seed: u64,
        restart_delay: Duration,
        clients: Arc<Vec<NaiveClient>>,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            plan: plan.into_iter(),
            next: None,
            load_start: Instant::now(),
            rng: StdRng::seed_from_u64(seed.wrapping_add(2)),
            restart_delay,
            out: None,
            clients,
            shared,
            counts: Arc::new(Counts::default()),
            actions: Vec::new(),
        }
    }

    /// Runs the plan from now until `stop`, then brings back whatever is out of service.
    pub(super) async fn run(mut self, mut cluster: Cluster, stop: CancellationToken) -> Done {
        self.load_start = Instant::now();
        self.next = self.next_planned();
        loop {
            let out_due = self.out.map(|o| match o {
                Out::Killed { back_at, .. } | Out::Drained { back_at, .. } => back_at,
            });
            let due = [self.next.map(|(at, _)| at), out_due].into_iter().flatten().min();
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = until(due) => {}
            }
            let now = Instant::now();
            if out_due.is_some_and(|at| at <= now) {
                self.bring_back(&mut cluster).await;
            }
            if let Some((_, kind)) = self.next.filter(|(at, _)| *at <= now) {
                self.next = self.next_planned();
                // Never two at once: what is out comes back first.
                self.bring_back(&mut cluster).await;
                match kind {
                    Kind::Kill => self.kill(&mut cluster).await,
                    Kind::Drain => self.drain(&mut cluster).await,
                    Kind::RollingRestart => self.rolling_restart(&mut cluster).await,
                }
            }
        }
        if let Some(Out::Killed { back_at, .. } | Out::Drained { back_at, .. }) = self.out {
            sleep_until(back_at).await;
            self.bring_back(&mut cluster).await;
        }
        Done { cluster, actions: self.actions }
    }

    fn next_planned(&mut self) -> Option<(Instant, Kind)> {
        self.plan.next().map(|(t, kind)| (self.load_start + t, kind))
    }

    /// A random node among those holding a connected client (any node if none does).
    fn victim(&mut self, cluster: &Cluster) -> (usize, u64) {
        let names: Vec<String> = cluster.nodes().iter().map(|n| n.name().to_string()).collect();
        let on = |name: &str| {
            self.clients.iter().filter(|c| !c.live.ended.load(Relaxed) && c.live.server() == name).count() as u64
        };
        let holding: Vec<(usize, u64)> =
            names.iter().enumerate().map(|(i, n)| (i, on(n))).filter(|(_, k)| *k > 0).collect();
        if holding.is_empty() {
            (self.rng.random_range(0..names.len()), 0)
        } else {
            holding[self.rng.random_range(0..holding.len())]
        }
    }

    fn clients_on(&self, name: &str) -> u64 {
        self.clients.iter().filter(|c| !c.live.ended.load(Relaxed) && c.live.server() == name).count() as u64
    }

    fn record(&mut self, kind: &'static str, target: &str, clients_on_it: u64) -> usize {
        self.actions.push(NaiveAction {
            at_ms: self.shared.ms(),
            kind,
            target: target.to_string(),
            clients_on_it,
            back_at_ms: None,
            error: None,
        });
        self.actions.len() - 1
    }

    fn settle(&mut self, record: usize, result: Result<()>) {
        let at = self.shared.ms();
        let a = &mut self.actions[record];
        match result {
            Ok(()) => a.back_at_ms = Some(at),
            Err(e) => {
                tracing::error!(node = %a.target, kind = a.kind, error = %format!("{e:#}"), "chaos action failed");
                a.error = Some(format!("{e:#}"));
            }
        }
    }

    async fn kill(&mut self, cluster: &mut Cluster) {
        let (i, on) = self.victim(cluster);
        let name = cluster.nodes()[i].name().to_string();
        let record = self.record("sigkill", &name, on);
        self.counts.kills.fetch_add(1, Relaxed);
        match cluster.nodes_mut()[i].kill().await {
            Ok(_) => self.out = Some(Out::Killed { node: i, back_at: Instant::now() + self.restart_delay, record }),
            Err(e) => self.settle(record, Err(e.context(format!("killing {name}")))),
        }
    }

    async fn drain(&mut self, cluster: &mut Cluster) {
        let (i, on) = self.victim(cluster);
        let name = cluster.nodes()[i].name().to_string();
        let record = self.record("drain", &name, on);
        self.counts.drains.fetch_add(1, Relaxed);
        match admin_post(cluster.balancer().admin_addr(), &format!("/nodes/{name}/drain")).await {
            Ok(()) => self.out = Some(Out::Drained { node: i, back_at: Instant::now() + self.restart_delay, record }),
            Err(e) => self.settle(record, Err(e)),
        }
    }

    async fn bring_back(&mut self, cluster: &mut Cluster) {
        let Some(out) = self.out.take() else { return };
        match out {
            Out::Killed { node, record, .. } => {
                let n = &mut cluster.nodes_mut()[node];
                let result = async {
                    n.restart().await?;
                    n.wait_ready(BACK_TIMEOUT).await
                }
                .await;
                self.settle(record, result);
            }
            Out::Drained { node, record, .. } => {
                let name = cluster.nodes()[node].name().to_string();
                let result = admin_post(cluster.balancer().admin_addr(), &format!("/nodes/{name}/undrain")).await;
                self.settle(record, result);
            }
        }
    }

    /// Every node in turn: SIGTERM, exit, start, ready, `up` at the balancer.
    async fn rolling_restart(&mut self, cluster: &mut Cluster) {
        let admin = cluster.balancer().admin_addr();
        for i in 0..cluster.nodes().len() {
            let name = cluster.nodes()[i].name().to_string();
            let record = self.record("sigterm", &name, self.clients_on(&name));
            self.counts.sigterms.fetch_add(1, Relaxed);
            let node = &mut cluster.nodes_mut()[i];
            let result = async {
                node.terminate()?;
                if node.wait_exit(TERM_EXIT_TIMEOUT).await?.is_none() {
                    node.kill().await?;
                    bail!("{name} did not exit within {TERM_EXIT_TIMEOUT:?} of SIGTERM (killed)");
                }
                node.restart().await?;
                node.wait_ready(BACK_TIMEOUT).await?;
                let what = format!("the balancer to list {name} up");
                eventually(BACK_TIMEOUT, &what, || balancer_says_up(admin, &name)).await?;
                Ok(())
            }
            .await;
            self.settle(record, result);
        }
    }
}

async fn until(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `POST path` on the balancer's admin port; an error unless it answers 200.
async fn admin_post(admin: SocketAddr, path: &str) -> Result<()> {
    let mut api = ApiClient::connect(admin, None).await.context("the balancer's admin port")?;
    let answer = api.post(path, &serde_json::json!({})).await?;
    if answer.status != 200 {
        return Err(anyhow!("POST {path}: {} {}", answer.status, answer.body));
    }
    Ok(())
}

/// Whether the balancer's `/status` lists node `name` as `up`.
async fn balancer_says_up(admin: SocketAddr, name: &str) -> bool {
    let status = async {
        let mut api = ApiClient::connect(admin, None).await.ok()?;
        let answer = api.get("/status").await.ok()?;
        let node = answer.body["nodes"].as_array()?.iter().find(|n| n["name"] == name)?.clone();
        Some(node["state"] == "up")
    };
    status.await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_alternates_kills_and_drains_around_one_rolling_restart_halfway() {
        let s = Duration::from_secs;
        let p = plan(s(30), s(5));
        let kinds: Vec<Kind> = p.iter().map(|(_, k)| *k).collect();
        use Kind::*;
        assert_eq!(kinds, [Kill, Drain, RollingRestart, Kill, Drain]);
        assert_eq!(p.iter().map(|(t, _)| *t).collect::<Vec<_>>(), [s(5), s(10), s(15), s(20), s(25)]);
        assert_eq!(plan(s(12), s(2)).iter().filter(|(_, k)| *k == RollingRestart).count(), 1);
        assert_eq!(plan(s(3), s(5)), []);
        assert_eq!(plan(s(30), Duration::ZERO), []);
    }
}
