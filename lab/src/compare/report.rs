//! What `tether compare` writes: the figures of every mode ([`CompareReport`], serialised as
//! `compare.json`) and the markdown of `compare.md` — the seed lesson's "Scaling approaches
//! compared" table (approach, complexity, latency, failover) with measurements in place of
//! its claims.

use super::account::{LatencyUs, LossTally};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub tool: &'static str,
    pub machine: Machine,
    pub run: RunParams,
    pub modes: Vec<ModeReport>,
    /// Wall time of the whole run.
    pub elapsed_s: f64,
}

/// Where it ran.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: Option<String>,
    pub kernel: Option<String>,
    /// 1/5/15-minute load averages when the run started.
    pub loadavg: Option<[f64; 3]>,
    /// `debug` or `release`: the profile `tether` was built with (the nodes are normally
    /// built alongside it).
    pub build: &'static str,
    /// `YYYY-MM-DD HH:MM UTC` when the run started.
    pub started: String,
}

/// The workload every mode ran.
#[derive(Debug, Clone, Serialize)]
pub struct RunParams {
    pub quick: bool,
    pub clients: usize,
    pub rooms: usize,
    /// Fixed-rate phase: messages per second, all publishers together, and its length.
    pub rate: f64,
    pub warmup_s: f64,
    pub fixed_s: f64,
    /// Step-up rates and the length of each step.
    pub steps: Vec<f64>,
    pub step_s: f64,
    pub p99_bound_ms: f64,
    /// Rate during the node loss.
    pub node_loss_rate: f64,
    /// How long a killed single node stays down before its restart.
    pub single_restart_after_s: f64,
    pub seed: u64,
}

/// One mode's figures. Everything but `mode`, `approach`, `processes` and `nodes` is absent
/// when the mode failed before measuring it; `error` says why.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModeReport {
    /// `single`, `sticky`, `routed`, `redis` or `nats`.
    pub mode: String,
    /// The seed table's row name.
    pub approach: String,
    /// The processes the approach needs behind the balancer.
    pub processes: String,
    pub nodes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Fixed-rate phase: member deliveries received ÷ (messages × members of the room).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_ratio: Option<f64>,
    /// Members on the sender's node ÷ members, averaged over the fixed phase's messages: what
    /// sticky sessions without a backbone can deliver at best.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reach_ratio: Option<f64>,
    /// Fixed-rate phase, send → receipt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<LatencyUs>,
    /// This mode's latency minus the single server's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_latency_us: Option<AddedLatency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fixed: Option<PhaseFigures>,
    /// Highest step-up rate sustained (msg/s); 0 when not even the first step was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<f64>,
    /// Why the step-up stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_loss: Option<NodeLoss>,
    /// Balancer `/status` `active_connections` per node once every client had joined.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub connections_per_node: BTreeMap<String, u64>,
    /// Rooms whose members were connected to more than one node once every client had joined
    /// (without a backbone, a message there misses the members on the other nodes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rooms_split: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    /// `(µs, fraction at or below)` of the fixed phase's latencies: the CDF chart's data.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub latency_cdf: Vec<(u64, f64)>,
    pub elapsed_s: f64,
}

/// Latency added over the single server, µs (negative when faster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AddedLatency {
    pub p50: i64,
    pub p99: i64,
    pub p999: i64,
}

impl AddedLatency {
    pub fn between(mode: &LatencyUs, single: &LatencyUs) -> Self {
        let d = |a: u64, b: u64| i64::try_from(a).unwrap_or(i64::MAX) - i64::try_from(b).unwrap_or(i64::MAX);
        Self { p50: d(mode.p50, single.p50), p99: d(mode.p99, single.p99), p999: d(mode.p999, single.p999) }
    }
}

/// The counts behind a phase's ratio.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PhaseFigures {
    pub rate: f64,
    pub secs: f64,
    pub messages: u64,
    pub refused: u64,
    pub expected_deliveries: u64,
    pub received: u64,
    pub duplicates: u64,
    /// Whether every delivery that was going to arrive had arrived when it was counted.
    pub drained: bool,
    /// The longest this process went without waking up meanwhile (see `StallProbe`): a p99
    /// near it is the load generator's, not the system's.
    pub generator_max_stall_us: u64,
}

/// One step of the step-up.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub rate: f64,
    pub achieved_rate: f64,
    pub delivery_ratio: f64,
    pub latency_us: LatencyUs,
    pub sustained: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// As in [`PhaseFigures`].
    pub generator_max_stall_us: u64,
    /// Trials run at this rate: a step that fails is run once more, and only a second failure
    /// ends the step-up (one scheduling hiccup on a shared machine is not a limit). The
    /// figures are the last trial's.
    pub trials: u32,
}

/// The node-loss phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeLoss {
    /// The node killed with SIGKILL.
    pub node: String,
    /// Whether it was restarted (single: the only node; the clients need somewhere to go).
    pub restarted_after_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_error: Option<String>,
    /// Clients connected to it when it died.
    pub clients_on_node: u64,
    /// Of those, how many got a `connected` again.
    pub reconnected: u64,
    /// Of those, how many were answered `"session":"restored"`.
    pub restored: u64,
    /// (member, message) deliveries owed and never received, after the drain (see
    /// `DeliveryView::node_loss`).
    pub lost: u64,
    /// Distinct messages behind those: at least one member they were owed to never got them.
    pub lost_messages: u64,
    /// Of those, owed to the killed node's clients.
    pub lost_by_moved_clients: u64,
    /// What an app saw twice.
    pub duplicates: u64,
    /// Raw duplicate frames the client library suppressed (a rejoin's live frames repeated by
    /// the replay that follows): never seen by an app.
    pub duplicates_suppressed: u64,
    pub owed: u64,
    pub confirmed: u64,
    /// Written but received by nobody: in flight on the node that died.
    pub unconfirmed: u64,
    /// Sends refused by a client between connections.
    pub refused: u64,
    /// Publishing slots with no client in sync at all (everyone down).
    pub nobody_ready: u64,
    /// Deliveries made by resume replays.
    pub replayed: u64,
    /// Seq jumps and incomplete resumes the clients noticed (known, reported loss).
    pub gaps_noticed: u64,
    pub incomplete_resumes: u64,
    /// Kill → the last moved client's `connected`.
    pub reconnect_ms: Option<u64>,
    /// Kill → the last moved client back in sync (rooms re-joined, replays done).
    pub recovered_ms: Option<u64>,
    pub drained: bool,
}

impl NodeLoss {
    pub fn set_tally(&mut self, t: &LossTally) {
        self.lost = t.lost;
        self.lost_messages = t.lost_messages;
        self.lost_by_moved_clients = t.lost_by_victims;
        self.duplicates = t.duplicates;
        self.owed = t.owed;
        self.confirmed = t.confirmed;
        self.unconfirmed = t.unconfirmed;
        self.refused = t.refused;
        self.replayed = t.replayed;
    }
}

/// The nodes' RSS (summed) with only the warm-up clients connected, and again once the
/// workload's clients had joined too: the difference per workload connection is the marginal
/// cost of a joined connection, without each node's one-time start-up costs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Memory {
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// The workload's connections (the divisor).
    pub connections: u64,
    /// Throw-away clients connected and joined before `rss_before_kib` was read.
    pub warmup_connections: u64,
    pub per_connection_kib: f64,
}

/// `1.0` → `100 %`; anything else with two decimals, rounded down so that a ratio short of
/// 1 never reads as 100.
pub fn percent(ratio: f64) -> String {
    if ratio == 1.0 {
        "100 %".into()
    } else {
        // The epsilon keeps 0.3812 (3811.999… in binary) at 38.12.
        format!("{:.2} %", (ratio * 10_000.0 + 1e-6).floor() / 100.0)
    }
}

/// µs as milliseconds with two decimals.
pub fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1e3)
}

fn signed_ms(us: i64) -> String {
    format!("{:+.2}", us as f64 / 1e3)
}

/// `12345` → `12,345`.
pub fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A table cell: no pipes or newlines.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

const DASH: &str = "—";

impl CompareReport {
    /// The main table: one row per mode.
    pub fn table(&self) -> String {
        let mut s = String::from(
            "| approach | processes (behind the balancer) | delivery | p50 | p99 | p99.9 | added over single (p50 / p99) \
             | max sustained rate | node loss: sessions restored / messages lost | kill → all back | conns per node \
             | memory per conn |\n\
             |:--|:--|--:|--:|--:|--:|--:|--:|:--|--:|:--|--:|\n",
        );
        for m in &self.modes {
            let approach = format!("{} (`{}`)", m.approach, m.mode);
            if let (Some(err), None) = (&m.error, &m.latency_us) {
                let _ = writeln!(
                    s,
                    "| {approach} | {} | **failed**: {} | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} |",
                    m.processes,
                    cell(err)
                );
                continue;
            }
            let delivery = m.delivery_ratio.map_or(DASH.into(), percent);
            let (p50, p99, p999) =
                m.latency_us.map_or((DASH.into(), DASH.into(), DASH.into()), |l| (ms(l.p50), ms(l.p99), ms(l.p999)));
            let added = match (&m.added_latency_us, m.mode.as_str()) {
                (_, "single") => "baseline".to_string(),
                (Some(a), _) => format!("{} / {} ms", signed_ms(a.p50), signed_ms(a.p99)),
                (None, _) => DASH.into(),
            };
            let max_rate = match m.max_rate {
                Some(r) if r > 0.0 => format!("{} msg/s", thousands(r)),
                Some(_) => match self.run.steps.first() {
                    Some(first) => format!("< {} msg/s", thousands(*first)),
                    None => DASH.into(),
                },
                None => DASH.into(),
            };
            let (loss, back) = match &m.node_loss {
                Some(l) => loss_cells(l),
                None => (DASH.into(), DASH.into()),
            };
            let conns = if m.connections_per_node.is_empty() {
                DASH.to_string()
            } else {
                m.connections_per_node.values().map(u64::to_string).collect::<Vec<_>>().join(" / ")
            };
            let memory = m.memory.map_or(DASH.into(), |mem| format!("{:.1} KiB", mem.per_connection_kib));
            let mut delivery = delivery;
            if let Some(err) = &m.error {
                delivery = format!("{delivery} (then failed: {})", cell(err));
            }
            let _ = writeln!(
                s,
                "| {approach} | {} | {delivery} | {p50} | {p99} | {p999} | {added} | {max_rate} | {loss} | {back} | {conns} | {memory} |",
                m.processes
            );
        }
        s
    }

    /// The step-up, rate by rate: p99 and whether it was sustained, per mode.
    pub fn steps_table(&self) -> String {
        let modes: Vec<&ModeReport> = self.modes.iter().filter(|m| !m.steps.is_empty()).collect();
        if modes.is_empty() {
            return String::new();
        }
        let mut s = String::from("| rate msg/s |");
        for m in &modes {
            let _ = write!(s, " {} |", m.mode);
        }
        s.push_str("\n|--:|");
        s.push_str(&":--|".repeat(modes.len()));
        s.push('\n');
        for rate in &self.run.steps {
            let _ = write!(s, "| {} |", thousands(*rate));
            for m in &modes {
                match m.steps.iter().find(|st| st.rate == *rate) {
                    Some(st) => {
                        let verdict = match (st.sustained, st.trials > 1) {
                            (true, false) => "ok",
                            (true, true) => "ok (2nd trial)",
                            (false, _) => "**stop**",
                        };
                        let _ = write!(
                            s,
                            " {verdict}: p99 {}, {} delivered, {} msg/s written |",
                            ms(st.latency_us.p99),
                            percent(st.delivery_ratio),
                            thousands(st.achieved_rate)
                        );
                    }
                    None => s.push_str(" · |"),
                }
            }
            s.push('\n');
        }
        s
    }

    /// Node loss in detail.
    pub fn node_loss_table(&self) -> String {
        let mut s = String::from(
            "| mode | node killed | its clients | reconnected | sessions restored | deliveries lost (by moved clients; messages) \
             | duplicates seen / suppressed | unconfirmed | refused sends | kill → all connected | kill → all in sync \
             | resumes incomplete / gaps noticed |\n\
             |:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        let mut any = false;
        for m in &self.modes {
            let Some(l) = &m.node_loss else { continue };
            any = true;
            let node = match (l.restarted_after_ms, &l.restart_error) {
                (_, Some(e)) => format!("{} (restart failed: {})", l.node, cell(e)),
                (Some(after), None) => format!("{} (restarted after {:.1} s)", l.node, after as f64 / 1e3),
                (None, None) => l.node.clone(),
            };
            let _ = writeln!(
                s,
                "| {} | {node} | {} | {} | {} | {} ({}; {}) | {} / {} | {} | {} | {} | {} | {} / {} |",
                m.mode,
                l.clients_on_node,
                l.reconnected,
                l.restored,
                l.lost,
                l.lost_by_moved_clients,
                l.lost_messages,
                l.duplicates,
                l.duplicates_suppressed,
                l.unconfirmed,
                l.refused,
                l.reconnect_ms.map_or(DASH.into(), |v| format!("{:.2} s", v as f64 / 1e3)),
                l.recovered_ms.map_or(DASH.into(), |v| format!("{:.2} s", v as f64 / 1e3)),
                l.incomplete_resumes,
                l.gaps_noticed,
            );
        }
        if any {
            s
        } else {
            String::new()
        }
    }

    /// `compare.md`.
    pub fn markdown(&self) -> String {
        let r = &self.run;
        let mc = &self.machine;
        let mut s = String::from("# tether compare: scaling approaches, measured\n\n");
        let _ = writeln!(
            s,
            "Machine: {} cores{}{}; load average {} at the start; `{}` build; run {}{}, {:.0} s in all.\n",
            mc.cores,
            mc.cpu.as_ref().map_or(String::new(), |c| format!(" ({c})")),
            mc.kernel.as_ref().map_or(String::new(), |k| format!(", Linux {k}")),
            mc.loadavg.map_or("unknown".into(), |[a, b, c]| format!("{a:.2} / {b:.2} / {c:.2}")),
            mc.build,
            mc.started,
            if r.quick { " with `--quick`" } else { "" },
            self.elapsed_s,
        );
        let steps: Vec<String> = r.steps.iter().map(|x| thousands(*x)).collect();
        let _ = writeln!(
            s,
            "Workload, the same for every mode: {} reconnecting clients (`tether-client`) in {} rooms, one room each, \
             all through one `tether-balancer`; a fixed {} msg/s for {:.1} s (after {:.1} s of warm-up) for delivery \
             and latency; a step-up at {} msg/s, {:.1} s per step, until p99 exceeds {:.0} ms, delivery falls under \
             99 % of the fixed phase's, or the publisher cannot write the rate, in two trials of the same step; then \
             one node killed with SIGKILL at \
             {} msg/s (with one node, it is restarted after {:.1} s). The load generator and the servers share the \
             machine. How each figure is measured: `docs/COMPARISON.md`.\n",
            r.clients,
            r.rooms,
            thousands(r.rate),
            r.fixed_s,
            r.warmup_s,
            steps.join(", "),
            r.step_s,
            r.p99_bound_ms,
            thousands(r.node_loss_rate),
            r.single_restart_after_s,
        );
        s.push_str(&self.table());
        s.push_str(
            "\nDelivery: member deliveries received ÷ (messages × members of the room) in the fixed phase. \
             Latency: send → receipt, every member, fixed phase. Node loss: a message is lost when some member \
             received it (it has a seq) and a member it was owed to never did, after the drain; with sticky sessions \
             and no backbone a message is owed only to the members on the sender's node (`routed` owes it to every \
             member: they share a node). \"Resumes incomplete\": clients that came back to a node without their \
             rooms' history.\n\n\
             ![latency CDF](latency-cdf.svg)\n\n![max sustained rate](max-rate.svg)\n",
        );
        let stalls: Vec<String> = self
            .modes
            .iter()
            .filter_map(|m| m.fixed.map(|f| format!("{} {}", m.mode, ms(f.generator_max_stall_us))))
            .collect();
        if !stalls.is_empty() {
            let _ = writeln!(
                s,
                "\nLongest stall of the load generator itself during the fixed phase (this process not scheduled): \
                 {}. A p99 near it says more about the machine than about the approach.",
                stalls.join(", ")
            );
        }
        let split: Vec<String> =
            self.modes.iter().filter_map(|m| m.rooms_split.map(|n| format!("{} {n} of {}", m.mode, r.rooms))).collect();
        if !split.is_empty() {
            let _ = writeln!(
                s,
                "\nRooms whose members were on more than one node once every client had joined: {}. Without a \
                 backbone a message in such a room misses the members on the other nodes.",
                split.join(", ")
            );
        }
        let steps = self.steps_table();
        if !steps.is_empty() {
            s.push_str("\n## Step-up\n\n");
            s.push_str(&steps);
        }
        let loss = self.node_loss_table();
        if !loss.is_empty() {
            s.push_str("\n## Node loss\n\n");
            s.push_str(&loss);
        }
        s
    }
}

fn loss_cells(l: &NodeLoss) -> (String, String) {
    let mut loss = format!(
        "{}/{} restored, {} of {} deliveries lost",
        l.restored,
        l.clients_on_node,
        thousands(l.lost as f64),
        thousands(l.owed as f64)
    );
    if l.duplicates > 0 {
        let _ = write!(loss, ", {} duplicated", l.duplicates);
    }
    if l.incomplete_resumes > 0 {
        // The room's log was gone where the client came back (no backbone): history lost.
        let _ = write!(loss, ", {} resumes incomplete", l.incomplete_resumes);
    }
    if let Some(e) = &l.restart_error {
        let _ = write!(loss, " (restart failed: {})", cell(e));
    }
    let back = match (l.recovered_ms, l.reconnected < l.clients_on_node) {
        (_, true) => format!("{} of {} never came back", l.clients_on_node - l.reconnected, l.clients_on_node),
        (Some(v), false) => format!("{:.2} s", v as f64 / 1e3),
        (None, false) => DASH.into(),
    };
    (loss, back)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(modes: Vec<ModeReport>) -> CompareReport {
        CompareReport {
            tool: "tether compare",
            machine: Machine {
                cores: 2,
                cpu: Some("Test CPU".into()),
                kernel: Some("6.1".into()),
                loadavg: Some([0.5, 0.4, 0.3]),
                build: "debug",
                started: "2026-01-02 03:04 UTC".into(),
            },
            run: RunParams {
                quick: true,
                clients: 30,
                rooms: 3,
                rate: 200.0,
                warmup_s: 0.3,
                fixed_s: 2.0,
                steps: vec![1000.0, 2000.0, 4000.0],
                step_s: 0.6,
                p99_bound_ms: 50.0,
                node_loss_rate: 200.0,
                single_restart_after_s: 1.0,
                seed: 1,
            },
            modes,
            elapsed_s: 30.0,
        }
    }

    fn measured(mode: &str, approach: &str, ratio: f64, p50: u64) -> ModeReport {
        ModeReport {
            mode: mode.into(),
            approach: approach.into(),
            processes: "3 nodes".into(),
            nodes: 3,
            delivery_ratio: Some(ratio),
            latency_us: Some(LatencyUs { samples: 100, p50, p99: p50 * 3, p999: p50 * 5, max: p50 * 9 }),
            max_rate: Some(2000.0),
            steps: vec![
                StepReport {
                    rate: 1000.0,
                    achieved_rate: 1000.0,
                    delivery_ratio: ratio,
                    latency_us: LatencyUs::default(),
                    sustained: true,
                    reason: None,
                    generator_max_stall_us: 0,
                    trials: 1,
                },
                StepReport {
                    rate: 2000.0,
                    achieved_rate: 1990.0,
                    delivery_ratio: ratio,
                    latency_us: LatencyUs::default(),
                    sustained: true,
                    reason: None,
                    generator_max_stall_us: 0,
                    trials: 1,
                },
                StepReport {
                    rate: 4000.0,
                    achieved_rate: 3000.0,
                    delivery_ratio: ratio,
                    latency_us: LatencyUs { p99: 80_000, ..LatencyUs::default() },
                    sustained: false,
                    reason: Some("p99".into()),
                    generator_max_stall_us: 0,
                    trials: 1,
                },
            ],
            node_loss: Some(NodeLoss {
                node: "node-2".into(),
                clients_on_node: 10,
                reconnected: 10,
                restored: 10,
                owed: 1650,
                recovered_ms: Some(250),
                ..NodeLoss::default()
            }),
            fixed: Some(PhaseFigures { generator_max_stall_us: 3_500, ..PhaseFigures::default() }),
            connections_per_node: [("node-1".to_string(), 11), ("node-2".into(), 10), ("node-3".into(), 9)].into(),
            memory: Some(Memory {
                rss_before_kib: 100,
                rss_after_kib: 400,
                connections: 30,
                warmup_connections: 12,
                per_connection_kib: 10.0,
            }),
            ..ModeReport::default()
        }
    }

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(percent(1.0), "100 %");
        assert_eq!(percent(0.99996), "99.99 %");
        assert_eq!(percent(0.3812), "38.12 %");
        assert_eq!(ms(1234), "1.23 ms");
        assert_eq!(signed_ms(-250), "-0.25");
        assert_eq!(thousands(16000.0), "16,000");
        assert_eq!(thousands(500.0), "500");
        assert_eq!(thousands(1234567.0), "1,234,567");
    }

    #[test]
    fn the_table_has_a_row_per_mode_and_failed_modes_say_why() {
        let single = measured("single", "Single server", 1.0, 400);
        let mut redis = measured("redis", "Redis Pub/Sub", 1.0, 600);
        redis.added_latency_us = Some(AddedLatency::between(
            redis.latency_us.as_ref().expect("set"),
            single.latency_us.as_ref().expect("set"),
        ));
        let nats = ModeReport {
            mode: "nats".into(),
            approach: "NATS".into(),
            processes: "3 nodes + NATS".into(),
            nodes: 3,
            error: Some("starting the cluster: node-1 exited | code 64".into()),
            ..ModeReport::default()
        };
        let r = report(vec![single, redis, nats]);
        let table = r.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        let columns = lines[0].matches('|').count();
        assert!(lines.iter().all(|l| l.matches('|').count() - l.matches("\\|").count() == columns), "{table}");
        assert!(lines[2].contains("Single server (`single`)") && lines[2].contains("baseline"), "{table}");
        assert!(lines[2].contains("100 %") && lines[2].contains("0.40 ms") && lines[2].contains("2,000 msg/s"));
        assert!(
            lines[2].contains("10/10 restored, 0 of 1,650 deliveries lost") && lines[2].contains("0.25 s"),
            "{table}"
        );
        assert!(lines[2].contains("11 / 10 / 9") && lines[2].contains("10.0 KiB"), "{table}");
        assert!(lines[3].contains("+0.20 / +0.60 ms"), "{table}");
        assert!(lines[4].contains("**failed**: starting the cluster: node-1 exited \\| code 64"), "{table}");

        let md = r.markdown();
        assert!(md.starts_with("# tether compare"));
        assert!(md.contains("2 cores (Test CPU), Linux 6.1") && md.contains("`debug` build"), "{md}");
        assert!(md.contains("until p99 exceeds 50 ms"), "{md}");
        assert!(md.contains("fixed phase (this process not scheduled): single 3.50 ms, redis 3.50 ms."), "{md}");
        assert!(md.contains("latency-cdf.svg") && md.contains("max-rate.svg"));
        assert!(md.contains("## Step-up") && md.contains("**stop**: p99 80.00 ms"), "{md}");
        assert!(md.contains("## Node loss") && md.contains("| redis | node-2 | 10 | 10 | 10 | 0 (0; 0) |"), "{md}");
        assert!(!md.contains("Rooms whose members"), "no mode measured it: {md}");
    }

    #[test]
    fn lost_history_and_split_rooms_are_reported() {
        let mut routed = measured("routed", "Shared-nothing + routing", 1.0, 300);
        routed.rooms_split = Some(0);
        if let Some(l) = routed.node_loss.as_mut() {
            (l.restored, l.lost, l.incomplete_resumes, l.gaps_noticed) = (0, 12, 10, 3);
        }
        let mut sticky = measured("sticky", "Sticky sessions", 0.4, 300);
        sticky.rooms_split = Some(3);
        let r = report(vec![sticky, routed]);
        let table = r.table();
        assert!(table.contains("0/10 restored, 12 of 1,650 deliveries lost, 10 resumes incomplete"), "{table}");
        let md = r.markdown();
        assert!(md.contains("more than one node once every client had joined: sticky 3 of 3, routed 0 of 3."), "{md}");
        assert!(md.contains("| routed | node-2 | 10 | 10 | 0 | 12 (0; 0) |") && md.contains("| 10 / 3 |"), "{md}");
    }

    #[test]
    fn a_mode_that_fails_after_measuring_keeps_its_figures_and_reports_the_failure() {
        let mut sticky = measured("sticky", "Sticky sessions", 0.38, 300);
        sticky.error = Some("node loss: restart failed".into());
        sticky.max_rate = Some(0.0);
        let table = report(vec![sticky]).table();
        assert!(table.contains("38.00 % (then failed: node loss: restart failed)"), "{table}");
        assert!(table.contains("< 1,000 msg/s"), "{table}");
    }

    #[test]
    fn json_keys_follow_the_design() {
        let r = report(vec![measured("redis", "Redis Pub/Sub", 1.0, 500)]);
        let v = serde_json::to_value(&r).expect("serialisable");
        let m = &v["modes"][0];
        assert_eq!(m["mode"], "redis");
        assert_eq!(m["delivery_ratio"], 1.0);
        assert_eq!(m["latency_us"]["p50"], 500);
        assert_eq!(m["latency_us"]["p999"], 2500);
        assert_eq!(m["max_rate"], 2000.0);
        assert_eq!(m["node_loss"]["restored"], 10);
        assert_eq!(m["node_loss"]["lost"], 0);
        assert!(m.get("error").is_none());
    }
}
