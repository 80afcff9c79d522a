//! `tether bench rehome --quick`, end to end: a private `redis-server`, two real nodes, two
//! real balancers (`--failover reconnect` and `--failover rehome`) and real WebSocket clients.
//! No speed is asserted: only that the report is produced, with CPU per frame and latency
//! measured for both modes, and switch times for every client of every kill and drain round
//! (which needs the rehome tunnel: without it, the clients are closed instead of rehomed).

use anyhow::Result;
use tether_lab::bench::rehome::{self, switch::How, RehomeOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehome_quick_reports_cost_for_both_modes_and_switch_times() -> Result<()> {
    let opts = RehomeOptions::quick();
    let mut progress = Vec::new();
    let report = rehome::run(&opts, &mut progress).await?;
    let table = report.table();
    let log = String::from_utf8_lossy(&progress);
    assert_eq!(report.cost.len(), 2 * opts.rates.len(), "a row per mode and rate\n{table}");
    for c in &report.cost {
        assert!(c.frames > 0, "{}: nothing proxied\n{table}", c.mode);
        assert!(c.cpu_us_per_frame.is_some_and(|x| x > 0.0), "{}: no balancer CPU measured\n{table}", c.mode);
        assert!(c.latency.samples > 0 && c.latency.p50_us > 0, "{}: no latency\n{table}", c.mode);
    }
    assert!(report.ratios.iter().all(|r| r.cpu_ratio.is_some_and(|x| x > 0.0)), "{table}");
    assert!(report.cost_closed.iter().all(|c| c.1 == 0), "clients of (a) were closed\n{table}\n{log}");
    assert!(table.contains("rehome ÷ reconnect"), "{table}");

    for (how, rounds) in [(How::Kill, opts.kills), (How::Drain, opts.drains)] {
        let w = report.switch.iter().find(|w| w.how == how).expect("a summary per kind of round");
        assert_eq!(w.rounds, rounds as usize, "{table}");
        assert_eq!(w.clients, opts.clients * rounds as usize, "{table}");
        // The contract: nobody is closed, everybody gets `rehomed` and then a message.
        assert_eq!((w.rehomed, w.closed, w.connected_again), (w.clients, 0, 0), "{:?}\n{table}\n{log}", how);
        assert_eq!(w.to_rehomed.samples, w.clients, "{table}");
        assert_eq!(w.to_first_message.samples, w.clients, "{table}");
        assert!(w.to_rehomed.p50_ms > 0.0 && w.to_rehomed.max_ms >= w.to_rehomed.p99_ms, "{table}");
        assert!(w.to_first_message.p50_ms >= w.to_rehomed.p50_ms, "{table}");
        assert_eq!((w.lost, w.duplicates), (0, 0), "{:?}: missed or repeated messages\n{table}", how);
    }
    let json = serde_json::to_value(&report)?;
    assert_eq!(json["bench"], "rehome");
    assert!(json["switch_rounds"].as_array().is_some_and(|r| r.len() == (opts.kills + opts.drains) as usize));
    Ok(())
}
