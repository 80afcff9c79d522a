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
    assert!(report.passed(), "{context}");
    Ok(())
}
