//! `tether chaos` in the test suite: a short run through real processes — three nodes, a
//! few dozen clients, a node killed with SIGKILL every four seconds — must lose nothing and
//! duplicate nothing.

use anyhow::Result;
use std::time::Duration;
use tether_lab::chaos::{self, ChaosOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_nodes_under_load_lose_and_duplicate_nothing() -> Result<()> {
    let report = chaos::run(ChaosOptions {
        nodes: 3,
        clients: 36,
        rooms: 4,
        rate: 60.0,
        kill_every: Duration::from_secs(4),
        duration: Duration::from_secs(20),
        seed: 20,
        ..ChaosOptions::default()
    })
    .await?;
    let table = report.table();
    let context = format!("{table}\nfailures: {:?}\nlost: {:#?}", report.failures, report.lost_examples);
    assert!(report.kills >= 3, "{context}");
    assert!(report.sessions_restored > 0, "{context}");
    assert!(report.published > 0, "{context}");
    assert_eq!(report.lost, 0, "{context}");
    assert_eq!(report.duplicated, 0, "{context}");
    assert!(report.drained, "every client caught up: {context}");
    // Every accepted send was published: the library resent what the kills cut off.
    assert_eq!(report.sends.unconfirmed, 0, "{context}");
    assert_eq!(report.sends.unconfirmed_at_end, 0, "{context}");
    // The in-flight figures are there, add up, and show no loss: each message unconfirmed
    // at a kill was delivered exactly once after the resend.
    for f in [&report.in_flight_at_kills, &report.in_flight_at_other_losses] {
        assert_eq!(f.messages, f.delivered_once + f.duplicated + f.lost, "{context}");
        assert_eq!((f.lost, f.duplicated), (0, 0), "{context}");
    }
    let per_kill: u64 = report.kill_log.iter().map(|k| k.in_flight.messages).sum();
    assert!(per_kill >= report.in_flight_at_kills.messages, "per kill counts each at least once: {context}");
    let json = serde_json::to_value(&report)?;
    for key in ["messages", "delivered_once", "duplicated", "lost"] {
        assert!(json["in_flight_at_kills"][key].is_u64(), "--json carries in_flight_at_kills.{key}");
        assert!(json["kill_log"][0]["in_flight"][key].is_u64(), "--json carries kill_log[].in_flight.{key}");
    }
    assert!(report.table().contains("in flight at kills"), "{context}");
    assert!(report.passed(), "{context}");
    Ok(())
}
