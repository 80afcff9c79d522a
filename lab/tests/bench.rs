//! The quick modes of `tether bench idle` and `tether bench fanout`, end to end: a real
//! `redis-server`, real node and balancer processes, real load-generator children (the
//! `tether` binary re-run as `tether bench worker`). No timing is asserted — only that every
//! client connected, was counted by the servers, and that messages went round.

use anyhow::Result;
use tether_lab::bench::fanout::{self, FanoutOptions};
use tether_lab::bench::idle::{self, IdleOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_quick_counts_every_client_direct_and_through_the_balancer() -> Result<()> {
    for through_balancer in [false, true] {
        let opts = IdleOptions { clients: 120, ..IdleOptions::quick(through_balancer) };
        let mut progress = Vec::new();
        let report = idle::run(&opts, &mut progress).await?;
        assert_eq!((report.open, report.failed), (120, 0), "{}", report.table());
        let node = report.processes.iter().find(|p| p.process == "node-1").expect("node-1 row");
        assert_eq!(node.connections, 120, "the node counts every client");
        assert!(node.kib_per_connection.is_some());
        let balancer = report.processes.iter().find(|p| p.process.starts_with("balancer"));
        if through_balancer {
            assert_eq!(balancer.map(|b| b.connections), Some(120), "{}", report.table());
        } else {
            assert!(balancer.is_none());
        }
        assert!(report.table().contains("| node-1 |"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_quick_delivers_room_messages_on_every_node() -> Result<()> {
    let opts = FanoutOptions { rates: vec![30.0], ..FanoutOptions::quick() };
    let mut progress = Vec::new();
    let report = fanout::run(&opts, &mut progress).await?;
    assert_eq!(report.clients_open, (opts.rooms * opts.members) as u64);
    let step = &report.steps[0];
    assert!(step.published_per_sec > 0.0);
    assert!(step.delivered_per_sec > 0.0, "{}", report.table());
    assert_eq!(step.node_delivered_per_sec.len(), 3);
    assert!(step.latency.samples > 0);
    let hop = report.hop.as_ref().expect("the backbone hop is measured");
    assert!(hop.latency.samples > 0, "{}", report.table());
    let local = hop.without_backbone.as_ref().expect("the same load without a backbone is measured");
    assert!(local.samples > 0, "{}", report.table());
    assert!(report.table().contains("added by the backbone hop"), "{}", report.table());
    Ok(())
}
