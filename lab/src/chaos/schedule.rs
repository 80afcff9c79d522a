//! The kill schedule of `tether chaos`: which node to `SIGKILL` next and when, its restart after
//! `--restart-delay-ms`, the optional Redis restart half-way through, and the log of all it did
//! (the report's kill log).

use super::account::Shared;
use super::{ChaosOptions, KillRecord, Member};
use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;
use tether_client::Status;
use tether_kit::Cluster;
use tokio::time::{sleep_until, Instant};

/// The kill schedule and what it did.
pub(super) struct Chaos {
    pub(super) rng: StdRng,
    pub(super) restart_delay: Duration,
    pub(super) kill_every: Duration,
    pub(super) next_kill: Option<Instant>,
    /// A killed node waiting for its restart: (index, when).
    pub(super) pending: Option<(usize, Instant)>,
    pub(super) redis_kill_at: Option<Instant>,
    pub(super) redis_back_at: Option<Instant>,
    pub(super) kills: u64,
    pub(super) restart_failures: u64,
    pub(super) redis_restarts: u64,
    pub(super) log: Vec<KillRecord>,
}

impl Chaos {
    pub(super) fn new(opts: &ChaosOptions, load_start: Instant) -> Self {
        Self {
            rng: StdRng::seed_from_u64(opts.seed.wrapping_add(2)),
            restart_delay: opts.restart_delay,
            kill_every: opts.kill_every,
            next_kill: (!opts.kill_every.is_zero()).then(|| load_start + opts.kill_every),
            pending: None,
            redis_kill_at: opts.redis_restart.then(|| load_start + opts.duration / 2),
            redis_back_at: None,
            kills: 0,
            restart_failures: 0,
            redis_restarts: 0,
            log: Vec::new(),
        }
    }

    /// Resolves when the next scheduled action is due (never, if none is).
    pub(super) async fn next_action(&self) {
        let next = [self.next_kill, self.pending.map(|(_, at)| at), self.redis_kill_at, self.redis_back_at]
            .into_iter()
            .flatten()
            .min();
        match next {
            Some(at) => sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// Does whatever is due now.
    pub(super) async fn act(&mut self, cluster: &mut Cluster, members: &[Member], shared: &Shared) -> Result<()> {
        let now = Instant::now();
        if self.pending.is_some_and(|(_, at)| at <= now) {
            self.restart_node(cluster, shared).await;
        }
        if self.redis_back_at.is_some_and(|at| at <= now) {
            self.restart_redis(cluster, shared).await?;
        }
        if self.redis_kill_at.is_some_and(|at| at <= now) {
            self.redis_kill_at = None;
            if let Some(redis) = cluster.redis_mut() {
                let pid = redis.pid().unwrap_or(0);
                redis.kill().await.context("killing Redis")?;
                self.log.push(KillRecord {
                    at_ms: shared.ms(),
                    target: "redis".into(),
                    pid,
                    clients_on_it: 0,
                    back_at_ms: None,
                    restart_error: None,
                    in_flight: Default::default(),
                });
                self.redis_back_at = Some(Instant::now() + self.restart_delay);
            }
        }
        if self.next_kill.is_some_and(|at| at <= now) {
            self.next_kill = self.next_kill.map(|at| at + self.kill_every);
            if self.pending.is_some() {
                // The last victim is still down: bring it back first, never two at once.
                self.restart_node(cluster, shared).await;
            }
            let i = self.rng.random_range(0..cluster.nodes().len());
            let node = &mut cluster.nodes_mut()[i];
            let pid = node.pid();
            let name = node.name().to_string();
            let on_it = members
                .iter()
                .filter(|m| matches!(m.client.status(), Status::Ready { server } if server == name))
                .count() as u64;
            node.kill().await.with_context(|| format!("killing {name}"))?;
            self.kills += 1;
            self.log.push(KillRecord {
                at_ms: shared.ms(),
                target: name,
                pid,
                clients_on_it: on_it,
                back_at_ms: None,
                restart_error: None,
                in_flight: Default::default(),
            });
            self.pending = Some((i, Instant::now() + self.restart_delay));
        }
        Ok(())
    }

    pub(super) async fn restart_node(&mut self, cluster: &mut Cluster, shared: &Shared) {
        let Some((i, _)) = self.pending.take() else { return };
        let node = &mut cluster.nodes_mut()[i];
        let name = node.name().to_string();
        let result = node.restart().await;
        let record = self.log.iter_mut().rev().find(|k| k.target == name);
        match result {
            Ok(()) => {
                if let Some(k) = record {
                    k.back_at_ms = Some(shared.ms());
                }
            }
            Err(e) => {
                // The run goes on with one node fewer; the report says so.
                self.restart_failures += 1;
                tracing::error!(node = %name, error = %format!("{e:#}"), "restart failed");
                if let Some(k) = record {
                    k.restart_error = Some(format!("{e:#}"));
                }
            }
        }
    }

    pub(super) async fn restart_redis(&mut self, cluster: &mut Cluster, shared: &Shared) -> Result<()> {
        self.redis_back_at = None;
        if let Some(redis) = cluster.redis_mut() {
            redis.restart().await.context("restarting Redis (the run cannot go on without it)")?;
            self.redis_restarts += 1;
            if let Some(k) = self.log.iter_mut().rev().find(|k| k.target == "redis") {
                k.back_at_ms = Some(shared.ms());
            }
        }
        Ok(())
    }

    /// After the load: whatever is still down comes back (no new kills).
    pub(super) async fn finish(&mut self, cluster: &mut Cluster, shared: &Shared) -> Result<()> {
        self.next_kill = None;
        self.redis_kill_at = None;
        if let Some(at) = self.redis_back_at {
            sleep_until(at).await;
            self.restart_redis(cluster, shared).await?;
        }
        if let Some((_, at)) = self.pending {
            sleep_until(at).await;
            self.restart_node(cluster, shared).await;
        }
        Ok(())
    }
}
