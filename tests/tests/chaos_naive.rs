//! `tether chaos --naive` in the test suite: plain WebSocket clients without any reconnect
//! logic, through a balancer in `failover = "rehome"` mode, while nodes are killed, drained and
//! restarted one by one with SIGTERM. Not one client may see its connection end, and nothing
//! may be lost or duplicated. The contrast run (the same clients, `failover = "reconnect"`)
//! shows that the closes are counted.

use anyhow::Result;
use std::time::Duration;
use tether_lab::chaos::naive::{self, NaiveReport};
use tether_lab::chaos::ChaosOptions;

fn options(failover: &str) -> ChaosOptions {
    ChaosOptions {
        nodes: 3,
        clients: 12,
        rooms: 3,
        rate: 40.0,
        // Slots at 2, 4, 6 (the rolling restart), 8, 10 s: kill, drain, SIGTERM ×3, kill, drain.
        kill_every: Duration::from_secs(2),
        duration: Duration::from_secs(12),
        seed: 16,
        naive: true,
        failover: failover.into(),
        ..ChaosOptions::default()
    }
}

fn context(r: &NaiveReport) -> String {
    format!(
        "{}\nfailures: {:?}\ncloses: {:#?}\nactions: {:#?}\nlost: {:#?}\nno echo: {:#?}",
        r.table(),
        r.failures,
        r.close_log,
        r.actions,
        r.lost_examples.iter().take(5).collect::<Vec<_>>(),
        r.no_echo_sends.iter().take(5).collect::<Vec<_>>()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_clients_behind_a_rehoming_balancer_see_no_close_and_lose_nothing() -> Result<()> {
    let r = naive::run(options("rehome")).await?;
    let context = context(&r);
    // The schedule did what it says, on nodes that held clients, and every node came back.
    // (The kill and drain after the rolling restart may not fit in a slow machine's 12 s.)
    assert!(r.kills >= 1 && r.drains >= 1, "{context}");
    assert_eq!(r.sigterms, 3, "{context}");
    assert_eq!(r.action_failures, 0, "{context}");
    assert!(r.actions.iter().any(|a| a.clients_on_it > 0), "{context}");
    // The contract: no close, one rehomed frame per move instead of connected, everything
    // once and in order, every send echoed with its msg_id (the balancer's tb- one if none).
    assert_eq!(r.closes, 0, "{context}");
    assert!(r.rehomed > 0, "{context}");
    assert_eq!(r.connected_again, 0, "{context}");
    assert!(r.published > 0 && r.expected > 0, "{context}");
    assert_eq!(r.lost, 0, "{context}");
    assert_eq!(r.duplicated, 0, "{context}");
    assert_eq!(r.out_of_order, 0, "{context}");
    assert!(r.drained, "{context}");
    let s = &r.sends;
    assert!(s.with_own_msg_id > 0 && s.with_own_msg_id < s.written, "both kinds of send: {context}");
    assert_eq!((s.no_echo, s.never_published), (0, 0), "{context}");
    assert_eq!((s.echo_msg_id_changed, s.echo_without_balancer_msg_id), (0, 0), "{context}");
    assert_eq!(r.seqs_assigned, Some(r.published), "Redis' counters agree with what was seen: {context}");
    assert!(r.passed(), "{context}");
    let json = serde_json::to_value(&r)?;
    for key in ["closes", "rehomed", "lost", "duplicated", "out_of_order"] {
        assert!(json[key].is_u64(), "--json carries {key}");
    }
    assert!(json["sends"]["no_echo"].is_u64() && json["close_codes"].is_object(), "--json carries the sends and codes");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_naive_clients_behind_a_reconnecting_balancer_are_closed_and_counted() -> Result<()> {
    let r = naive::run(ChaosOptions { duration: Duration::from_secs(6), ..options("reconnect") }).await?;
    let context = context(&r);
    assert!(r.actions.iter().any(|a| a.clients_on_it > 0), "{context}");
    assert!(r.closes > 0, "{context}");
    assert_eq!(r.closes, r.close_log.len() as u64, "{context}");
    assert_eq!(r.close_codes.values().sum::<u64>(), r.closes, "{context}");
    // The rolling restart's SIGTERM closes its clients with 1012 (service restart).
    assert!(r.close_codes.contains_key("1012"), "{context}");
    assert_eq!(r.rehomed, 0, "{context}");
    assert!(!r.passed(), "{context}");
    assert!(r.failures.iter().any(|f| f.contains("connections ended")), "{context}");
    Ok(())
}
