//! `tether bench fanout --steady --quick`, end to end: a real `redis-server`, real node
//! processes (and, with `--vs socketio`, real Node.js processes running Socket.IO with its
//! Redis adapter, installed by `npm ci` when missing), real load-generator children. No timing
//! is asserted: only the report's accounting — on an idle machine every message of every
//! window reaches every member exactly once — and that CPU per delivery was measured.
//!
//! The Socket.IO test needs `node` and `npm` (and the npm registry, the first time):
//! `scripts/deps.sh` installs them; without them the test fails, it does not skip.

use anyhow::Result;
use tether_lab::bench::steady::{self, SteadyOptions, SteadyReport};

fn check_accounting(report: &SteadyReport, opts: &SteadyOptions, system: &str) {
    let table = report.table();
    let steps: Vec<_> = report.steps.iter().filter(|s| s.system == system).collect();
    assert_eq!(steps.len(), opts.rates.len(), "{system}: a row per rate\n{table}");
    let open = report.clients_open.iter().find(|(s, _)| *s == system).map(|(_, n)| *n);
    assert_eq!(open, Some((opts.rooms * opts.members) as u64), "{table}");
    for st in steps {
        let a = &st.accounting;
        assert!(st.messages > 0, "{system} at {}: nothing published\n{table}", st.rate);
        // Every message is due at its room's members and at its publisher.
        assert_eq!(a.expected, st.messages * (opts.members as u64 + 1), "{table}");
        assert_eq!(a.received, a.expected, "{system} at {}: deliveries missing\n{table}", st.rate);
        assert_eq!((a.short_messages, a.duplicates, a.repeats), (0, 0, 0), "{table}");
        assert!(a.short_exact);
        assert_eq!(a.ratio, 1.0);
        assert_eq!(st.latency.samples, a.received, "one latency per delivery\n{table}");
        assert!(st.delivered_per_sec > 0.0, "{table}");
        assert!(st.cpu_us_per_delivery.is_some_and(|c| c > 0.0), "{system}: no CPU measured\n{table}");
        assert_eq!(st.closed, 0, "no member was cut off\n{table}");
    }
    assert!(table.contains(&format!("| {system} |")), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_quick_accounts_for_every_delivery() -> Result<()> {
    let opts = SteadyOptions::quick();
    let mut progress = Vec::new();
    let report = steady::run(&opts, &mut progress).await?;
    check_accounting(&report, &opts, "tether");
    assert!(report.steps.iter().all(|s| s.system == "tether"));
    assert!(!report.table().contains("socketio"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_quick_vs_socketio_accounts_for_both_systems() -> Result<()> {
    let opts = SteadyOptions { vs_socketio: true, rates: vec![200.0], ..SteadyOptions::quick() };
    let mut progress = Vec::new();
    let report = steady::run(&opts, &mut progress).await?;
    check_accounting(&report, &opts, "tether");
    check_accounting(&report, &opts, "socketio");
    assert!(report.node_version.is_some());
    let table = report.table();
    assert!(table.contains("CPU/delivery tether ÷ socketio"), "{table}");
    assert!(table.contains("highest clean step, tether ÷ socketio"), "{table}");
    Ok(())
}
