//! The report of `tether bench proxies`: per-target figures (one value per round), the
//! markdown table of their medians with ratios to HAProxy, and the verdicts against the
//! balancer's targets. With `--tls`, the TLS rows (hand-shake latency and CPU per set-up at a
//! fixed rate) and what each target negotiated.

use super::{Kind, TlsReport, Workloads};
use crate::bench::median;
use serde::Serialize;

/// Per-target figures: each field holds one value per round, and the report its median.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetFigures {
    pub target: String,
    pub setup: String,
    /// What a TLS hand-shake with it negotiated (`None`: plain).
    pub tls: Option<String>,
    pub echo_per_sec: Vec<f64>,
    pub cpu_us_per_echo: Vec<f64>,
    pub cpu_percent: Vec<f64>,
    pub rate_achieved: Vec<f64>,
    pub p50_us: Vec<f64>,
    pub p99_us: Vec<f64>,
    pub p999_us: Vec<f64>,
    pub setups_per_sec: Vec<f64>,
    pub upgrade_p50_us: Vec<f64>,
    pub upgrade_p99_us: Vec<f64>,
    /// (c) at saturation: the proxy's CPU per connection cycle, and its share of a core.
    pub setup_cpu_us_per_cycle: Vec<f64>,
    pub setup_cpu_percent: Vec<f64>,
    /// (c) at a fixed rate: completed set-ups/s, TCP connect + TLS hand-shake latency, connect
    /// → `101` latency, and the proxy's CPU per set-up.
    pub rate_setups_per_sec: Vec<f64>,
    pub handshake_p50_us: Vec<f64>,
    pub handshake_p99_us: Vec<f64>,
    pub rate_upgrade_p50_us: Vec<f64>,
    pub rate_upgrade_p99_us: Vec<f64>,
    pub rate_cpu_us_per_setup: Vec<f64>,
    /// Set-ups of the fixed-rate pass that failed or timed out (all rounds).
    pub rate_failed: u64,
    /// TLS hand-shakes of (c) that resumed a session (0 unless `--tls-resume`).
    pub resumed: u64,
    pub idle_kib_per_tunnel: Vec<f64>,
    pub idle_open: Vec<f64>,
    pub errors: Vec<String>,
}

/// The whole run, as written by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct ProxiesReport {
    pub bench: &'static str,
    /// What the run was asked for (flattened: the JSON keeps its fields at the top level).
    #[serde(flatten)]
    pub workloads: Workloads,
    pub cores: usize,
    pub loadavg_start: Option<[f64; 3]>,
    pub loadavg_end: Option<[f64; 3]>,
    pub skipped: Vec<String>,
    /// `None` for a plain run.
    pub tls: Option<TlsReport>,
    pub targets: Vec<TargetFigures>,
}

/// Reads one figure's per-round values.
type Field = fn(&TargetFigures) -> &Vec<f64>;
/// `(label, field, lower is better, decimals)` for each table row.
type Row = (&'static str, Field, bool, usize);

/// Rows no target has a value for are left out (the fixed-rate set-ups of a plain run).
const ROWS: [Row; 18] = [
    ("(a) echo throughput, msg/s", |t| &t.echo_per_sec, false, 0),
    ("(a) proxy CPU per echo, µs", |t| &t.cpu_us_per_echo, true, 2),
    ("(a) proxy CPU, % of a core", |t| &t.cpu_percent, true, 0),
    ("(b) latency p50, µs", |t| &t.p50_us, true, 0),
    ("(b) latency p99, µs", |t| &t.p99_us, true, 0),
    ("(b) latency p99.9, µs", |t| &t.p999_us, true, 0),
    ("(b) achieved rate, msg/s", |t| &t.rate_achieved, false, 0),
    ("(c) connection cycles (upgrades)/s", |t| &t.setups_per_sec, false, 0),
    ("(c) upgrade latency p50, µs", |t| &t.upgrade_p50_us, true, 0),
    ("(c) proxy CPU per cycle, µs", |t| &t.setup_cpu_us_per_cycle, true, 1),
    ("(c) fixed rate: set-ups/s achieved", |t| &t.rate_setups_per_sec, false, 0),
    ("(c) fixed rate: TCP + TLS hand-shake p50, µs", |t| &t.handshake_p50_us, true, 0),
    ("(c) fixed rate: TCP + TLS hand-shake p99, µs", |t| &t.handshake_p99_us, true, 0),
    ("(c) fixed rate: connect → 101 p50, µs", |t| &t.rate_upgrade_p50_us, true, 0),
    ("(c) fixed rate: connect → 101 p99, µs", |t| &t.rate_upgrade_p99_us, true, 0),
    ("(c) fixed rate: proxy CPU per set-up, µs", |t| &t.rate_cpu_us_per_setup, true, 1),
    ("(d) RSS growth per idle tunnel, KiB", |t| &t.idle_kib_per_tunnel, true, 2),
    ("(d) idle tunnels open", |t| &t.idle_open, false, 0),
];

impl ProxiesReport {
    /// The markdown table (medians, ratios to HAProxy) and the verdicts against the targets.
    pub fn table(&self) -> String {
        let w = &self.workloads;
        let mut s = format!(
            "{} round(s) of {:.1} s per target and workload; (a) {} connections, {}-byte messages; (b) {} \
             connections, {:.0} msg/s; (c) {} concurrent; (d) {} idle tunnels. {} cores; load average at start \
             {}, at end {}.\n",
            w.rounds,
            w.secs,
            w.echo_conns,
            w.message_bytes,
            w.rate_conns,
            w.rate,
            w.setup_concurrency,
            w.idle,
            self.cores,
            fmt_load(self.loadavg_start),
            fmt_load(self.loadavg_end),
        );
        if w.connect_rate > 0.0 {
            s.push_str(&format!(
                "(c) fixed rate: {:.0} set-ups/s for {:.1} s per target and round, each timed from its TCP connect.\n",
                w.connect_rate, w.secs
            ));
        }
        if let Some(tls) = &self.tls {
            s.push_str(&format!(
                "TLS: every proxy terminates it with the same certificate ({}); clients offer {}; session resumption \
                 {}; direct is {}.\n",
                tls.certificate,
                tls.offered,
                if tls.resume { "on (--tls-resume)" } else { "off: every connect is a full hand-shake" },
                tls.direct
            ));
        }
        s.push('\n');
        for t in &self.targets {
            s.push_str(&format!("- {}: {}\n", t.target, t.setup));
            if let Some(n) = &t.tls {
                s.push_str(&format!(
                    "  - negotiated: {n}{}\n",
                    if t.resumed > 0 { format!("; {} hand-shakes resumed", t.resumed) } else { String::new() }
                ));
            }
        }
        for skip in &self.skipped {
            s.push_str(&format!("- skipped: {skip}\n"));
        }
        let haproxy = self.targets.iter().find(|t| t.target == Kind::Haproxy.label());
        let ratio_cols: Vec<&TargetFigures> =
            self.targets.iter().filter(|t| t.target != Kind::Haproxy.label() && t.target != "direct").collect();
        s.push_str("\n| workload (median) |");
        for t in &self.targets {
            s.push_str(&format!(" {} |", t.target));
        }
        for t in &ratio_cols {
            s.push_str(&format!(" {} / HAProxy |", t.target));
        }
        s.push_str("\n|:--|");
        for _ in 0..self.targets.len() + if haproxy.is_some() { ratio_cols.len() } else { 0 } {
            s.push_str("--:|");
        }
        s.push('\n');
        for (name, field, _, decimals) in ROWS {
            if self.targets.iter().all(|t| field(t).is_empty()) {
                continue;
            }
            s.push_str(&format!("| {name} |"));
            for t in &self.targets {
                s.push_str(&format!(" {} |", fmt_opt(median(field(t)), decimals)));
            }
            if let Some(h) = haproxy {
                for t in &ratio_cols {
                    let r = match (median(field(t)), median(field(h))) {
                        (Some(a), Some(b)) if b > 0.0 => format!("×{:.2}", a / b),
                        _ => "—".to_owned(),
                    };
                    s.push_str(&format!(" {r} |"));
                }
            }
            s.push('\n');
        }
        if let (Some(h), Some(b)) = (haproxy, self.targets.iter().find(|t| t.target == Kind::Balancer.label())) {
            s.push_str("\nTargets (tether-balancer against HAProxy, same run):\n");
            let checks: [(&str, Field, bool); 6] = [
                ("throughput ≥ 1.0× HAProxy", |t| &t.echo_per_sec, false),
                ("p99 ≤ HAProxy", |t| &t.p99_us, true),
                ("CPU per echo ≤ HAProxy", |t| &t.cpu_us_per_echo, true),
                ("idle memory per tunnel ≤ HAProxy", |t| &t.idle_kib_per_tunnel, true),
                ("TLS hand-shake p99 ≤ HAProxy", |t| &t.handshake_p99_us, true),
                ("CPU per set-up ≤ HAProxy", |t| &t.rate_cpu_us_per_setup, true),
            ];
            for (what, field, lower) in checks {
                if field(b).is_empty() && field(h).is_empty() {
                    continue;
                }
                let line = match (median(field(b)), median(field(h))) {
                    (Some(bv), Some(hv)) if hv > 0.0 => {
                        let ok = if lower { bv <= hv } else { bv >= hv };
                        format!(
                            "- {what}: balancer {bv:.2} vs HAProxy {hv:.2} (×{:.2}): {}\n",
                            bv / hv,
                            if ok { "met" } else { "missed" }
                        )
                    }
                    _ => format!("- {what}: not measured\n"),
                };
                s.push_str(&line);
            }
        }
        for t in &self.targets {
            if !t.errors.is_empty() {
                s.push_str(&format!("\n{} errors (first few): {:?}\n", t.target, t.errors));
            }
        }
        s
    }
}

pub(super) fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("—".to_owned(), |v| format!("{v:.decimals$}"))
}

fn fmt_load(l: Option<[f64; 3]>) -> String {
    l.map_or("unknown".to_owned(), |[a, b, c]| format!("{a:.2} {b:.2} {c:.2}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_keeps_the_workload_sizes_at_the_top_level() {
        let w = Workloads {
            rounds: 3,
            secs: 2.5,
            echo_conns: 50,
            rate_conns: 40,
            rate: 1000.0,
            setup_concurrency: 8,
            idle: 9500,
            message_bytes: 64,
            connect_rate: 0.0,
            tls: false,
            tls_resume: false,
        };
        let report = ProxiesReport {
            bench: "proxies",
            workloads: w,
            cores: 2,
            loadavg_start: None,
            loadavg_end: None,
            skipped: Vec::new(),
            tls: None,
            targets: vec![TargetFigures {
                target: "direct".into(),
                echo_per_sec: vec![3.0, 1.0, 2.0],
                ..Default::default()
            }],
        };
        let json = serde_json::to_value(&report).expect("encodes");
        let keys: Vec<&str> = json.as_object().expect("an object").keys().map(String::as_str).collect();
        for key in [
            "bench",
            "rounds",
            "secs",
            "echo_conns",
            "rate_conns",
            "rate",
            "setup_concurrency",
            "idle",
            "message_bytes",
            "cores",
            "targets",
        ] {
            assert!(keys.contains(&key), "{key} in {keys:?}");
        }
        assert!(!keys.contains(&"workloads"), "{keys:?}");
        assert_eq!(json["rounds"], 3);
        let table = report.table();
        assert!(
            table.starts_with("3 round(s) of 2.5 s per target and workload; (a) 50 connections, 64-byte messages"),
            "{table}"
        );
        assert!(table.contains("| (a) echo throughput, msg/s | 2 |"), "{table}");
    }
}
