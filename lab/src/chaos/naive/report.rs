//! The figures of a `tether chaos --naive` run: [`NaiveReport`] (what `--json` writes), its
//! markdown table and the reasons it fails.

use crate::chaos::{LostMessage, RunConfig, UnconfirmedSend};
use serde::Serialize;
use std::collections::BTreeMap;

/// A naive client's connection ending before the run closed it: a close frame (with its
/// code), the TCP stream's end, or an error. Every one counts: the client never comes back.
#[derive(Debug, Clone, Serialize)]
pub struct CloseSeen {
    pub client: String,
    /// ms since the clients were started.
    pub at_ms: u64,
    /// The node the client was on (its `connected`, or its last `rehomed`).
    pub server: String,
    /// `close frame`, `TCP end`, `error` (a read or write failed) or `connect`.
    pub how: String,
    /// The close frame's code; `None` for the others (and a close frame without one).
    pub code: Option<u16>,
    pub reason: String,
}

/// A frame that rehome mode is to keep from the client (a `duplicate` answer, a complete
/// `resumed`, a second `connected`) and that reached it all the same.
#[derive(Debug, Clone, Serialize)]
pub struct LeakedFrame {
    pub client: String,
    /// ms since the clients were started.
    pub at_ms: u64,
    /// The node the client was on by its last `connected`/`rehomed`.
    pub server: String,
    /// The frame as received.
    pub frame: String,
}

/// One thing the schedule did to a node.
#[derive(Debug, Clone, Serialize)]
pub struct NaiveAction {
    /// ms since the clients were started.
    pub at_ms: u64,
    /// `sigkill` (restarted after `--restart-delay-ms`), `drain` (undrained after it) or
    /// `sigterm` (one node of the rolling restart: back up and `up` at the balancer before
    /// the next).
    pub kind: &'static str,
    pub target: String,
    /// Naive clients on it (by their last `connected`/`rehomed`) just before.
    pub clients_on_it: u64,
    /// When it was back: restarted and ready, or undrained; `None` if that failed.
    pub back_at_ms: Option<u64>,
    pub error: Option<String>,
}

/// What the clients sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NaiveSends {
    /// Send slots at the target rate over the run.
    pub slots: u64,
    /// Slots skipped because no client was in sync at that instant.
    pub no_client_ready: u64,
    /// Handed to a client.
    pub attempted: u64,
    /// Written to its WebSocket.
    pub written: u64,
    /// Of those, written with a `msg_id` of the client's own (the others without one).
    pub with_own_msg_id: u64,
    /// Written sends whose echo came back to their sender.
    pub echoed: u64,
    /// Written sends whose sender never saw the echo (nor an `error` naming it).
    pub no_echo: u64,
    /// Written sends nobody ever received.
    pub never_published: u64,
    /// Not written (the client had ended) or answered `error`.
    pub refused: u64,
    /// Echoes of sends with their own `msg_id` that carried another one or none.
    pub echo_msg_id_changed: u64,
    /// Echoes of sends without a `msg_id` that carried no `tb-` one from the balancer.
    pub echo_without_balancer_msg_id: u64,
}

/// Everything a naive run measured. `--json` writes this.
#[derive(Debug, Clone, Serialize)]
pub struct NaiveReport {
    /// `naive`: plain WebSocket clients (no reconnect) through the balancer.
    pub mode: &'static str,
    /// The balancer's `--failover`: `rehome`, or `reconnect` for a contrast run.
    pub failover: String,
    pub config: RunConfig,
    /// When the load started, in the ms of every `*_ms` field.
    pub load_started_at_ms: u64,
    pub elapsed_s: f64,
    pub drain_s: f64,
    /// Every client still connected had each room's last seq and every echo before the deadline.
    pub drained: bool,
    pub kills: u64,
    pub drains: u64,
    /// Nodes stopped with SIGTERM in the rolling restart (one rolling restart: every node).
    pub sigterms: u64,
    /// Actions that did not complete (a restart, drain or undrain that failed).
    pub action_failures: u64,
    pub actions: Vec<NaiveAction>,
    /// Connections that ended under a client (every close frame, TCP end or error).
    pub closes: u64,
    /// `closes` by close code (`none` for a TCP end or an error).
    pub close_codes: BTreeMap<String, u64>,
    pub close_log: Vec<CloseSeen>,
    /// `rehomed` frames the clients received, and how many clients got at least one.
    pub rehomed: u64,
    pub clients_rehomed: u64,
    /// `connected` frames after a client's first (the balancer is to send `rehomed` instead).
    pub connected_again: u64,
    pub sends: NaiveSends,
    /// Distinct `(room, epoch, seq)` received by any client.
    pub published: u64,
    /// Sum of the rooms' seq counters at the end (`None`: not readable).
    pub seqs_assigned: Option<u64>,
    pub never_observed: u64,
    pub seq_conflicts: u64,
    /// (client, message) pairs owed: every message published to its rooms after its join.
    pub expected: u64,
    pub delivered: u64,
    /// Messages that came marked `"replay":true`.
    pub replayed: u64,
    /// Owed and never delivered.
    pub lost: u64,
    pub lost_distinct: u64,
    pub clients_with_loss: u64,
    /// `duplicated_by_seq + duplicated_by_content`.
    pub duplicated: u64,
    /// A client handed the same `(room, epoch, seq)` twice.
    pub duplicated_by_seq: u64,
    /// One send's text published under two seqs.
    pub duplicated_by_content: u64,
    /// A room message at or below the room's last seq a client had (same epoch).
    pub out_of_order: u64,
    /// Live seq jumps within an epoch (each missing seq also counts as lost).
    pub gaps: u64,
    pub resumed_seen: u64,
    pub incomplete_resumes: u64,
    pub duplicate_answers: u64,
    pub bad_frames: u64,
    /// Up to 50 of the `duplicate`, complete `resumed` and second `connected` frames that
    /// reached clients, as received.
    pub leaked_frames: Vec<LeakedFrame>,
    pub joins_missing: u64,
    pub errors: BTreeMap<String, u64>,
    /// Why the run failed; empty when it passed.
    pub failures: Vec<String>,
    pub lost_examples: Vec<LostMessage>,
    /// Up to 200 written sends whose sender saw no echo, oldest first.
    pub no_echo_sends: Vec<UnconfirmedSend>,
}

impl NaiveReport {
    /// Passed: no close, nothing lost, nothing duplicated (and the rest of [`Self::failures`]).
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// Why the run fails, if it does.
    pub(super) fn judge(&self) -> Vec<String> {
        let mut why = Vec::new();
        if self.closes > 0 {
            why.push(format!("{} client connections ended ({:?})", self.closes, self.close_codes));
        }
        if self.lost > 0 {
            why.push(format!(
                "{} owed messages never delivered ({} distinct, {} clients)",
                self.lost, self.lost_distinct, self.clients_with_loss
            ));
        }
        if self.duplicated > 0 {
            why.push(format!(
                "{} duplicates: {} by (room, epoch, seq), {} sends published twice",
                self.duplicated, self.duplicated_by_seq, self.duplicated_by_content
            ));
        }
        let s = &self.sends;
        if s.no_echo > 0 {
            why.push(format!("{} sends got no echo ({} never published at all)", s.no_echo, s.never_published));
        }
        if s.echo_msg_id_changed + s.echo_without_balancer_msg_id > 0 {
            why.push(format!(
                "echo msg_ids: {} changed, {} without the balancer's tb- one",
                s.echo_msg_id_changed, s.echo_without_balancer_msg_id
            ));
        }
        if self.out_of_order > 0 {
            why.push(format!("{} messages reached a client out of order", self.out_of_order));
        }
        if self.connected_again > 0 {
            why.push(format!("{} `connected` frames after the first reached clients", self.connected_again));
        }
        if self.seq_conflicts > 0 {
            why.push(format!("{} seqs carried two different messages", self.seq_conflicts));
        }
        if self.published == 0 {
            why.push("nothing was published: nothing to judge".into());
        }
        if self.joins_missing > 0 {
            why.push(format!("{} joins never confirmed", self.joins_missing));
        }
        why
    }

    /// The final table, markdown.
    pub fn table(&self) -> String {
        let c = &self.config;
        let s = &self.sends;
        let hit = |kind: &str| self.actions.iter().filter(|a| a.kind == kind && a.clients_on_it > 0).count();
        let codes = if self.close_codes.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = self.close_codes.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            format!(" ({})", list.join(", "))
        };
        let rows: Vec<(&str, String)> = vec![
            (
                "cluster",
                format!(
                    "{} nodes on {}, {} naive clients, {} rooms, {} msg/s, balancer failover = {}, seed {}",
                    c.nodes, c.backbone, c.clients, c.rooms, c.rate, self.failover, c.seed
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
            (
                "node actions",
                format!(
                    "{} SIGKILL ({} on a node with clients), {} drains ({}), rolling restart: {} SIGTERM ({}); {} failed",
                    self.kills,
                    hit("sigkill"),
                    self.drains,
                    hit("drain"),
                    self.sigterms,
                    hit("sigterm"),
                    self.action_failures
                ),
            ),
            ("**closes seen by clients**", format!("**{}**{codes}", self.closes)),
            (
                "rehomed frames",
                format!(
                    "{} ({} clients; `connected` again: {})",
                    self.rehomed, self.clients_rehomed, self.connected_again
                ),
            ),
            (
                "messages published",
                match self.seqs_assigned {
                    Some(n) => format!(
                        "{} ({} counters: {n}; never received: {})",
                        self.published, c.backbone, self.never_observed
                    ),
                    None => format!("{} ({} counters unreadable)", self.published, c.backbone),
                },
            ),
            (
                "sends",
                format!(
                    "{} written ({} with their own msg_id), {} echoed, **{} no echo** ({} never published), {} refused",
                    s.written, s.with_own_msg_id, s.echoed, s.no_echo, s.never_published, s.refused
                ),
            ),
            (
                "echo msg_ids",
                format!(
                    "{} changed, {} without the balancer's tb- id",
                    s.echo_msg_id_changed, s.echo_without_balancer_msg_id
                ),
            ),
            ("delivered", format!("{} of {} owed ({} replayed)", self.delivered, self.expected, self.replayed)),
            ("**lost**", format!("**{}**", self.lost)),
            (
                "**duplicated**",
                format!(
                    "**{}** ({} by (room, epoch, seq), {} by content)",
                    self.duplicated, self.duplicated_by_seq, self.duplicated_by_content
                ),
            ),
            ("out of order", format!("{} ({} live seq jumps)", self.out_of_order, self.gaps)),
            (
                "resumed / duplicate frames seen",
                format!(
                    "{} resumed ({} incomplete), {} duplicate{}",
                    self.resumed_seen,
                    self.incomplete_resumes,
                    self.duplicate_answers,
                    if self.leaked_frames.is_empty() { "" } else { " (see leaked_frames in --json)" }
                ),
            ),
        ];
        let mut out = String::from("| figure | value |\n|:--|:--|\n");
        for (k, v) in rows {
            out.push_str(&format!("| {k} | {v} |\n"));
        }
        out
    }
}
