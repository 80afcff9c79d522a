//! The figures of a chaos run: [`ChaosReport`] (what `--json` writes) and its markdown table.

use super::account::{LostMessage, UnconfirmedSend};
use super::in_flight::InFlightFate;
use serde::Serialize;

/// The run's parameters, as used.
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub nodes: usize,
    pub clients: usize,
    pub rooms: usize,
    pub rate: f64,
    pub kill_every_s: f64,
    pub duration_s: f64,
    pub redis_restart: bool,
    /// `redis` or `nats`.
    pub backbone: &'static str,
    pub restart_delay_ms: u64,
    pub drain_timeout_s: f64,
    pub seed: u64,
}

/// One node kill.
#[derive(Debug, Clone, Serialize)]
pub struct KillRecord {
    /// ms since the clients were started.
    pub at_ms: u64,
    /// `node-2`, or `redis`.
    pub target: String,
    pub pid: u32,
    /// Clients that were in sync on it at the kill (a node restarted earlier holds none:
    /// the balancer moves no live connection back to it).
    pub clients_on_it: u64,
    /// When it was back (ready line printed), ms; `None` if the restart failed.
    pub back_at_ms: Option<u64>,
    pub restart_error: Option<String>,
    /// Messages its clients had sent and not seen confirmed when their connections to it
    /// dropped, and what became of them.
    pub in_flight: InFlightFate,
}

/// p50 / p99 / max of a set of durations, in ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    pub(crate) fn of(samples_us: impl Iterator<Item = u64>) -> Self {
        // 1 µs to 1 h at 3 significant digits.
        let mut h = tether_kit::hist::histogram_up_to(3_600_000_000);
        for us in samples_us {
            h.saturating_record(us.max(1));
        }
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| (us as f64 / 100.0).round() / 10.0;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }

    fn cell(&self) -> String {
        if self.count == 0 {
            return "—".into();
        }
        format!("{} / {} / {} ms", self.p50_ms, self.p99_ms, self.max_ms)
    }
}

/// Where sends went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sends {
    /// Send slots at the target rate over the run.
    pub slots: u64,
    /// Slots skipped because no client was ready at that instant.
    pub no_client_ready: u64,
    /// `send` calls.
    pub attempted: u64,
    /// Written to the socket.
    pub written: u64,
    /// Refused by the client library (`NotConnected`: not in sync, or the write failed).
    pub refused_not_connected: u64,
    /// Answered `backbone_unavailable` by the node (not tied to a send by the protocol).
    pub rejected_by_node: u64,
    /// Written sends whose text came back to their sender.
    pub confirmed: u64,
    /// Written sends nobody ever received. The library resends every unconfirmed message
    /// after a reconnect, so each of these is a loss.
    pub unconfirmed: u64,
    /// Messages the clients still held unconfirmed when they were closed.
    pub unconfirmed_at_end: u64,
    /// Resends the libraries made (same `msg_id`), and how many of them the node answered
    /// `duplicate` (it had published the first copy).
    pub resent: u64,
    pub confirmed_by_duplicate: u64,
    /// Sends the library reported failed that were published all the same.
    pub refused_but_published: u64,
}

/// Everything a chaos run measured. `--json` writes this.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub config: RunConfig,
    /// When the load started, in the ms of every `*_ms` field (t = 0: clients started;
    /// the progress line counts from the load's start instead).
    pub load_started_at_ms: u64,
    /// Load phase length, s.
    pub elapsed_s: f64,
    /// Drain phase length, s.
    pub drain_s: f64,
    /// Every client was in sync and caught up with every room's head before the deadline.
    pub drained: bool,
    pub clients_not_ready_at_end: u64,
    pub kills: u64,
    pub restart_failures: u64,
    pub redis_restarts: u64,
    pub kill_log: Vec<KillRecord>,
    /// Messages sent and unconfirmed when a kill dropped their sender's connection (distinct
    /// over all kills), and their fate after the resend.
    pub in_flight_at_kills: InFlightFate,
    /// The same for connection losses no kill explains (a Redis restart, a slow consumer).
    pub in_flight_at_other_losses: InFlightFate,
    /// `connected` frames after a client's first.
    pub reconnects: u64,
    pub disconnects: u64,
    pub connect_failures: u64,
    pub sessions_restored: u64,
    /// Reconnects that found no session (name and rooms had to be re-sent).
    pub sessions_new_on_reconnect: u64,
    /// Connection loss → `connected` with a restored session.
    pub reconnect_to_restored: Spread,
    /// Connection loss → back in sync (every room replayed).
    pub reconnect_to_resumed: Spread,
    pub sends: Sends,
    /// Distinct `(room, epoch, seq)` received by any client.
    pub published: u64,
    /// Sum of the rooms' seq counters in Redis at the end (`None`: Redis not readable).
    pub seqs_assigned_by_redis: Option<u64>,
    /// Seqs Redis assigned that no client ever received (each also counts as lost for every
    /// member that was owed it).
    pub never_observed: u64,
    /// `(epoch, seq)` pairs seen with two different texts.
    pub seq_conflicts: u64,
    /// (client, message) pairs owed: every published message after the client's join.
    pub expected: u64,
    /// Distinct (client, message) pairs handed to the apps.
    pub delivered: u64,
    pub replayed: u64,
    /// Owed and never delivered.
    pub lost: u64,
    /// Distinct messages among the lost.
    pub lost_distinct: u64,
    pub clients_with_loss: u64,
    /// `duplicates_dropped + app_duplicates + republished`.
    pub duplicated: u64,
    /// Frames the node sent twice (suppressed by the client library).
    pub duplicates_dropped: u64,
    /// Messages handed to an app twice (the library should make this impossible).
    pub app_duplicates: u64,
    /// One send published under two seqs.
    pub republished: u64,
    /// Live seq jumps the library reported (`Gap` events).
    pub out_of_order: u64,
    pub gap_messages: u64,
    pub app_out_of_order: u64,
    pub incomplete_resumes: u64,
    pub epoch_changes: u64,
    pub stale_epoch_dropped: u64,
    pub joins_missing: u64,
    pub joins_without_head: u64,
    /// Messages whose text no sender of this run wrote.
    pub foreign_texts: u64,
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Why the run failed; empty when it passed.
    pub failures: Vec<String>,
    pub lost_examples: Vec<LostMessage>,
    /// Up to 200 sends nobody received, oldest first (compare with `kill_log`).
    pub unconfirmed_sends: Vec<UnconfirmedSend>,
}

impl ChaosReport {
    /// Passed: nothing lost, nothing duplicated, something published.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The final table, markdown.
    pub fn table(&self) -> String {
        let c = &self.config;
        let s = &self.sends;
        let kills = if c.kill_every_s > 0.0 {
            let hit = self.kill_log.iter().filter(|k| k.target != "redis" && k.clients_on_it > 0).count();
            format!(
                "{} (SIGKILL every {} s, restart after {} ms; {hit} hit a node holding clients)",
                self.kills, c.kill_every_s, c.restart_delay_ms
            )
        } else {
            "0 (kills disabled)".into()
        };
        let redis = if c.redis_restart {
            format!("{} (SIGKILL + restart with its append-only file)", self.redis_restarts)
        } else {
            "0 (not requested)".into()
        };
        let assigned = match self.seqs_assigned_by_redis {
            Some(n) => {
                format!("{} ({} counters: {n}; never received: {})", self.published, c.backbone, self.never_observed)
            }
            None => format!("{} ({} counters unreadable)", self.published, c.backbone),
        };
        let rows: Vec<(&str, String)> = vec![
            (
                "cluster",
                format!(
                    "{} nodes on {}, {} clients, {} rooms, {} msg/s, seed {}",
                    c.nodes, c.backbone, c.clients, c.rooms, c.rate, c.seed
                ),
            ),
            (
                "duration",
                format!(
                    "{:.1} s + {:.1} s drain{}",
                    self.elapsed_s,
                    self.drain_s,
                    if self.drained { "" } else { " (deadline hit)" }
                ),
            ),
            ("kills", kills),
            ("Redis restarts", redis),
            ("reconnects", format!("{} ({} failed attempts)", self.reconnects, self.connect_failures)),
            (
                "sessions restored",
                format!("{} (new on reconnect: {})", self.sessions_restored, self.sessions_new_on_reconnect),
            ),
            ("reconnect → restored p50 / p99 / max", self.reconnect_to_restored.cell()),
            ("reconnect → resumed p50 / p99 / max", self.reconnect_to_resumed.cell()),
            ("messages published", assigned),
            (
                "sends",
                format!(
                    "{} written, {} confirmed by echo, {} resent ({} answered duplicate), {} never published",
                    s.written, s.confirmed, s.resent, s.confirmed_by_duplicate, s.unconfirmed
                ),
            ),
            ("**in flight at kills**", in_flight_cell(&self.in_flight_at_kills, &self.in_flight_at_other_losses)),
            (
                "rejected sends",
                format!("{} not connected, {} backbone_unavailable", s.refused_not_connected, s.rejected_by_node),
            ),
            ("delivered", format!("{} of {} owed ({} replayed)", self.delivered, self.expected, self.replayed)),
            ("**lost**", format!("**{}**", self.lost)),
            ("**duplicated**", format!("**{}**", self.duplicated)),
            ("out of order (gaps)", self.out_of_order.to_string()),
            ("incomplete resumes", self.incomplete_resumes.to_string()),
        ];
        let mut out = String::from("| figure | value |\n|:--|:--|\n");
        for (k, v) in rows {
            out.push_str(&format!("| {k} | {v} |\n"));
        }
        out
    }
}

fn in_flight_cell(k: &InFlightFate, other: &InFlightFate) -> String {
    let mut cell = format!(
        "{} unconfirmed when the connection dropped: {} delivered exactly once after the resend, **{} duplicated**, **{} lost**",
        k.messages, k.delivered_once, k.duplicated, k.lost
    );
    if other.messages > 0 {
        cell.push_str(&format!(
            " (other losses: {}: {} once, {} duplicated, {} lost)",
            other.messages, other.delivered_once, other.duplicated, other.lost
        ));
    }
    cell
}
