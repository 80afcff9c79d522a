//! The load side of one mode: reconnecting clients ([`tether_client`]) through the balancer,
//! one room each, a publisher at a fixed rate, and what every client received and when.
//!
//! Per client two tasks run: a *receiver* that reads its events (messages → receipts;
//! `connected`/ready/lost → its connection timeline) and a *sender* that writes the messages
//! the publisher assigns to it, in order, and records whether each was written or refused.
//! The publisher stamps each message when it hands it over, so time spent queued in this
//! process counts against the latency like any other delay (no coordinated omission).
//!
//! [`Workload`] owns the tasks: dropping it aborts them, which drops the last client
//! handles and so stops every client — a mode that fails or times out leaves nothing running.

use super::account::{message_text, parse_text, DeliveryView, Outcome, Receipt, SentMsg, Transition};
use anyhow::{bail, Context, Result};
use futures_util::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tether_client::{Client, ClientConfig, Event, Session, StatsSnapshot, Status};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{interval, sleep, timeout, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// How often the publisher wakes up to hand out what is due.
const PUBLISH_TICK: Duration = Duration::from_millis(1);
/// How often waits poll their condition.
const POLL: Duration = Duration::from_millis(10);
/// Reconnect backoff of the workload's clients: short, so that a node loss measures the
/// system's failover rather than a long client-side wait (the library's default is 0.5–20 s).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Events a client buffers before it stops reading its socket; generous, so that the
/// step-up measures the servers rather than this process' scheduling.
const EVENT_BUFFER: usize = 8192;

/// The name of room `r`.
fn room_name(r: usize) -> String {
    format!("compare-{r}")
}

/// The URL a member of `room` connects to: the balancer's, plus `room=` when the balancer
/// places clients by room (room names here are URL-safe as they are).
fn member_url(url: &str, room: &str, by_room: bool) -> String {
    match (by_room, url.contains('?')) {
        (false, _) => url.to_owned(),
        (true, false) => format!("{url}?room={room}"),
        (true, true) => format!("{url}&room={room}"),
    }
}

/// Locks a mutex of plain data; a panic elsewhere mid-update leaves data still worth reading.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A message the publisher handed to one client's sender task.
struct Job {
    msg: u64,
    phase: usize,
    at_us: u64,
}

/// One workload client.
pub struct Member {
    pub id: String,
    /// Index of its room.
    pub room: usize,
    pub client: Client,
    jobs: mpsc::UnboundedSender<Job>,
}

/// Per phase: counters that let waits end early without scanning the receipts.
#[derive(Default)]
struct PhaseCounters {
    /// Messages handed over and not settled (written or refused) yet.
    pending: AtomicU64,
    /// Σ room size over the written messages: deliveries a lossless cross-node system owes.
    owed: AtomicU64,
    /// Receipts of the phase's messages.
    received: AtomicU64,
}

/// The shared state of one mode's workload.
pub struct Run {
    origin: Instant,
    pub rooms: Vec<String>,
    pub members: Vec<Member>,
    /// Client indexes per room.
    pub room_members: Vec<Vec<usize>>,
    /// Message id = index.
    sent: Mutex<Vec<SentMsg>>,
    receipts: Vec<Mutex<Vec<Receipt>>>,
    timelines: Vec<Mutex<Vec<Transition>>>,
    phases: Vec<PhaseCounters>,
    /// Receipts of every phase, for progress lines and quiet detection.
    pub delivered: AtomicU64,
}

impl Run {
    /// Microseconds since the run's origin.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Messages handed out so far (the next message id).
    pub fn sent_len(&self) -> u64 {
        lock(&self.sent).len() as u64
    }

    pub fn phase_received(&self, phase: usize) -> u64 {
        self.phases.get(phase).map_or(0, |p| p.received.load(Relaxed))
    }

    pub fn phase_owed(&self, phase: usize) -> u64 {
        self.phases.get(phase).map_or(0, |p| p.owed.load(Relaxed))
    }

    fn phase_pending(&self, phase: usize) -> u64 {
        self.phases.get(phase).map_or(0, |p| p.pending.load(Relaxed))
    }

    pub fn ready_count(&self) -> usize {
        self.members.iter().filter(|m| matches!(m.client.status(), Status::Ready { .. })).count()
    }

    /// The node each client is connected (or syncing) to now.
    pub fn nodes_now(&self) -> Vec<Option<String>> {
        self.members
            .iter()
            .map(|m| match m.client.status() {
                Status::Ready { server } | Status::Syncing { server } => Some(server),
                _ => None,
            })
            .collect()
    }

    /// A copy of every client's connection history.
    pub fn timelines(&self) -> Vec<Vec<Transition>> {
        self.timelines.iter().map(|t| lock(t).clone()).collect()
    }

    pub fn stats(&self) -> Vec<StatsSnapshot> {
        self.members.iter().map(|m| m.client.stats()).collect()
    }

    /// Copies what an accounting of `ids` needs and hands it to `f` as a [`DeliveryView`].
    pub fn with_delivery_view<T>(&self, ids: &Range<u64>, f: impl FnOnce(DeliveryView<'_>) -> T) -> T {
        let sent = lock(&self.sent).clone();
        let receipts: Vec<Vec<Receipt>> =
            self.receipts.iter().map(|r| lock(r).iter().filter(|r| ids.contains(&r.msg)).copied().collect()).collect();
        let timelines = self.timelines();
        f(DeliveryView { sent: &sent, room_members: &self.room_members, receipts: &receipts, timelines: &timelines })
    }

    fn register(&self, phase: usize, sender: usize, sender_node: Arc<str>) -> Job {
        let at_us = self.now_us();
        let mut sent = lock(&self.sent);
        let msg = sent.len() as u64;
        sent.push(SentMsg { room: self.members[sender].room, sender, sender_node, at_us, outcome: Outcome::Pending });
        if let Some(p) = self.phases.get(phase) {
            p.pending.fetch_add(1, Relaxed);
        }
        Job { msg, phase, at_us }
    }

    fn settle(&self, job: &Job, outcome: Outcome) {
        let room = {
            let mut sent = lock(&self.sent);
            let Some(m) = sent.get_mut(job.msg as usize) else { return };
            m.outcome = outcome;
            m.room
        };
        if let Some(p) = self.phases.get(job.phase) {
            if matches!(outcome, Outcome::Written(_)) {
                p.owed.fetch_add(self.room_members[room].len() as u64, Relaxed);
            }
            p.pending.fetch_sub(1, Relaxed);
        }
    }
}

/// What [`Workload::start`] builds.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// The balancer's `ws://…/ws`.
    pub url: String,
    pub clients: usize,
    pub rooms: usize,
    /// How many phase counters to keep (phase ids are `0..phases`).
    pub phases: usize,
    /// Connect with `?room=R` (the `routed` mode's balancer places by it).
    pub by_room: bool,
    /// Seeds the client ids.
    pub seed: u64,
    /// Longest wait for every client to connect and join.
    pub join_timeout: Duration,
}

/// Opens `n` throw-away clients that join the workload's rooms and stay idle, and waits for
/// their joins: they pay each node's one-time costs (worker threads, buffers, room
/// subscriptions) before memory is measured, so that the workload's own connections show
/// their marginal cost. Their events are read and dropped.
pub async fn warm_clients(
    url: &str,
    n: usize,
    rooms: usize,
    by_room: bool,
    seed: u64,
    within: Duration,
) -> Result<Vec<Client>> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5741_524d);
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut cfg = ClientConfig::new(member_url(url, &room_name(i % rooms.max(1)), by_room));
        cfg.client_id = Some(format!("cmp-warm-{i}-{:08x}", rng.random::<u32>()));
        let (client, mut events) = Client::start(cfg).context("client configuration")?;
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        clients.push(client);
    }
    let joins = clients.iter().enumerate().map(|(i, c)| async move {
        let room = room_name(i % rooms.max(1));
        match timeout(within, c.join(&room)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => bail!("warm-up client {i} could not join {room}: {e}"),
            Err(_) => bail!("warm-up client {i} did not join {room} within {within:?}"),
        }
    });
    for r in join_all(joins).await {
        r?;
    }
    Ok(clients)
}

/// The running workload; dropping it stops every client.
pub struct Workload {
    pub run: Arc<Run>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Workload {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Workload {
    /// Starts the clients (random ids, so that the balancer's hashing spreads them over the
    /// nodes; client `i` in room `i mod rooms`) and waits until each has its own `user_joined`.
    pub async fn start(spec: &WorkloadSpec) -> Result<Self> {
        if spec.clients == 0 || spec.rooms == 0 {
            bail!("a workload needs at least one client and one room");
        }
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let tag: u32 = rng.random();
        let rooms: Vec<String> = (0..spec.rooms).map(room_name).collect();
        let mut members = Vec::with_capacity(spec.clients);
        let mut inputs = Vec::with_capacity(spec.clients);
        for i in 0..spec.clients {
            let id = format!("cmp-{tag:08x}-{i}-{:08x}", rng.random::<u32>());
            let mut cfg = ClientConfig::new(member_url(&spec.url, &rooms[i % spec.rooms], spec.by_room));
            cfg.client_id = Some(id.clone());
            cfg.name = Some(format!("c{i}"));
            cfg.backoff_min = BACKOFF_MIN;
            cfg.backoff_max = BACKOFF_MAX;
            cfg.event_buffer = EVENT_BUFFER;
            let (client, events) = Client::start(cfg).context("client configuration")?;
            let (jobs, job_rx) = mpsc::unbounded_channel();
            members.push(Member { id, room: i % spec.rooms, client, jobs });
            inputs.push((events, job_rx));
        }
        let mut room_members = vec![Vec::new(); spec.rooms];
        for (i, m) in members.iter().enumerate() {
            room_members[m.room].push(i);
        }
        let n = members.len();
        let run = Arc::new(Run {
            origin: Instant::now(),
            rooms,
            members,
            room_members,
            sent: Mutex::new(Vec::new()),
            receipts: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            timelines: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            phases: (0..spec.phases).map(|_| PhaseCounters::default()).collect(),
            delivered: AtomicU64::new(0),
        });
        let mut tasks = Vec::with_capacity(2 * n);
        for (i, (events, jobs)) in inputs.into_iter().enumerate() {
            tasks.push(tokio::spawn(receive(Arc::clone(&run), i, events)));
            tasks.push(tokio::spawn(send(Arc::clone(&run), i, jobs)));
        }
        let workload = Self { run, tasks };
        let joins = workload.run.members.iter().map(|m| {
            let room = &workload.run.rooms[m.room];
            async move {
                match timeout(spec.join_timeout, m.client.join(room)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => bail!("client {} could not join {room}: {e}", m.id),
                    Err(_) => bail!("client {} did not join {room} within {:?}", m.id, spec.join_timeout),
                }
            }
        });
        for r in join_all(joins).await {
            r?;
        }
        Ok(workload)
    }

    /// Closes every client (a 1000 close each), at most `within` in all.
    pub async fn close(&self, within: Duration) {
        let _ = timeout(within, join_all(self.run.members.iter().map(|m| m.client.close()))).await;
    }

    /// Publishes `rate` messages per second for `phase` until `until` or `stop`, round robin
    /// over the clients in sync. Returns what it did.
    pub fn publish(&self, phase: usize, rate: f64, until: Option<Instant>, stop: CancellationToken) -> Publisher {
        let run = Arc::clone(&self.run);
        let first = run.sent_len();
        let handle = tokio::spawn(publish(run, phase, rate, until, stop.clone()));
        Publisher { first, stop, handle: Some(handle) }
    }

    /// Waits until the messages of `phase` have all been settled and either everything owed
    /// arrived or nothing arrived for `quiet`; at most `max`. Whether it completed.
    pub async fn drain(&self, phase: usize, quiet: Duration, max: Duration) -> bool {
        let run = &self.run;
        let deadline = Instant::now() + max;
        let mut last = run.phase_received(phase);
        let mut last_change = Instant::now();
        loop {
            let received = run.phase_received(phase);
            if received != last {
                last = received;
                last_change = Instant::now();
            }
            let settled = run.phase_pending(phase) == 0;
            if settled && (received >= run.phase_owed(phase) || last_change.elapsed() >= quiet) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            sleep(POLL).await;
        }
    }

    /// Waits until every client is in sync and no message arrived for `quiet`; at most `max`.
    pub async fn settle(&self, quiet: Duration, max: Duration) -> bool {
        let run = &self.run;
        let deadline = Instant::now() + max;
        let mut last = run.delivered.load(Relaxed);
        let mut last_change = Instant::now();
        loop {
            let delivered = run.delivered.load(Relaxed);
            if delivered != last {
                last = delivered;
                last_change = Instant::now();
            }
            if run.ready_count() == run.members.len() && last_change.elapsed() >= quiet {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            sleep(POLL).await;
        }
    }
}

/// Measures how late this process wakes up: a task sleeps 1 ms at a time and records the
/// longest gap between wake-ups. A long gap means every client task waited too (CPU taken by
/// the servers on the same cores, or by this process itself), so the latencies measured
/// meanwhile say as much about the load generator as about the system under test.
pub struct StallProbe {
    stop: CancellationToken,
    handle: JoinHandle<Duration>,
}

impl StallProbe {
    pub fn start() -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            let mut longest = Duration::ZERO;
            let mut last = Instant::now();
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    () = sleep(Duration::from_millis(1)) => {}
                }
                let now = Instant::now();
                longest = longest.max(now - last);
                last = now;
            }
            longest
        });
        Self { stop, handle }
    }

    /// The longest gap between wake-ups since [`StallProbe::start`].
    pub async fn finish(self) -> Duration {
        self.stop.cancel();
        self.handle.await.unwrap_or_default()
    }
}

/// A running publisher; [`Publisher::finish`] stops it and returns the range of message ids
/// it handed out.
pub struct Publisher {
    first: u64,
    stop: CancellationToken,
    handle: Option<JoinHandle<PublishStats>>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.abort();
        }
    }
}

/// What a publisher did.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishStats {
    /// Messages due at the rate over the window.
    pub due: u64,
    /// Slots with no client in sync to send them (nobody could publish).
    pub nobody_ready: u64,
    /// The window, µs since the run's origin.
    pub started_us: u64,
    pub ended_us: u64,
}

impl Publisher {
    /// Waits for the publisher to end by itself (its `until`), or stops it now with `stop`.
    pub async fn finish(mut self, stop: bool) -> Result<(Range<u64>, PublishStats)> {
        if stop {
            self.stop.cancel();
        }
        let handle = self.handle.take().context("publisher already finished")?;
        let stats = handle.await.context("the publisher task")?;
        let end = self.first + stats.due - stats.nobody_ready;
        Ok((self.first..end, stats))
    }

    /// The id of its first message.
    pub fn first(&self) -> u64 {
        self.first
    }
}

async fn publish(
    run: Arc<Run>,
    phase: usize,
    rate: f64,
    until: Option<Instant>,
    stop: CancellationToken,
) -> PublishStats {
    let start = Instant::now();
    let mut stats = PublishStats { started_us: run.now_us(), ..PublishStats::default() };
    let mut cursor = 0usize;
    let mut tick = interval(PUBLISH_TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let n = run.members.len();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let now = match until {
            Some(end) if now >= end => end,
            _ => now,
        };
        let due = (now.duration_since(start).as_secs_f64() * rate) as u64;
        while stats.due < due {
            stats.due += 1;
            let pick = (0..n).map(|k| (cursor + k) % n).find_map(|i| match run.members[i].client.status() {
                Status::Ready { server } => Some((i, server)),
                _ => None,
            });
            let Some((i, server)) = pick else {
                stats.nobody_ready += 1;
                continue;
            };
            cursor = (i + 1) % n;
            let job = run.register(phase, i, Arc::from(server));
            if let Err(mpsc::error::SendError(job)) = run.members[i].jobs.send(job) {
                run.settle(&job, Outcome::Refused);
            }
        }
        if until.is_some_and(|end| Instant::now() >= end) {
            break;
        }
    }
    stats.ended_us = run.now_us();
    stats
}

/// One client's sender: writes its messages in order.
async fn send(run: Arc<Run>, i: usize, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let client = run.members[i].client.clone();
    let room = run.rooms[run.members[i].room].clone();
    while let Some(job) = jobs.recv().await {
        let text = message_text(job.phase, job.msg, job.at_us);
        let outcome = match client.send(&room, &text).await {
            Ok(()) => Outcome::Written(run.now_us()),
            Err(_) => Outcome::Refused,
        };
        run.settle(&job, outcome);
    }
}

/// One client's receiver: receipts and connection changes.
async fn receive(run: Arc<Run>, i: usize, mut events: mpsc::Receiver<Event>) {
    while let Some(ev) = events.recv().await {
        let at_us = run.now_us();
        match ev {
            Event::Message(m) => {
                let Some((phase, msg)) = parse_text(&m.text) else { continue };
                lock(&run.receipts[i]).push(Receipt { msg, at_us, replay: m.replay });
                if let Some(p) = run.phases.get(phase) {
                    p.received.fetch_add(1, Relaxed);
                }
                run.delivered.fetch_add(1, Relaxed);
            }
            Event::Connected { server, session, .. } => lock(&run.timelines[i]).push(Transition::Up {
                at_us,
                server: Arc::from(server),
                restored: session == Session::Restored,
            }),
            Event::Ready { server, .. } => {
                lock(&run.timelines[i]).push(Transition::Ready { at_us, server: Arc::from(server) });
            }
            Event::Disconnected { .. } => lock(&run.timelines[i]).push(Transition::Down { at_us }),
            Event::Closed => break,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_carry_their_room_only_when_placed_by_it() {
        assert_eq!(member_url("ws://h/ws", "compare-2", false), "ws://h/ws");
        assert_eq!(member_url("ws://h/ws", "compare-2", true), "ws://h/ws?room=compare-2");
        assert_eq!(member_url("ws://h/ws?x=1", "compare-0", true), "ws://h/ws?x=1&room=compare-0");
    }
}
