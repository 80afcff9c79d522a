//! The resend queue against real processes: three `tether-node`s behind a `tether-balancer`,
//! on a private Redis (and the same on NATS). A sender's node is `SIGKILL`ed while some of
//! its messages are unconfirmed; the sender reconnects through the balancer to another node
//! and every message reaches every member exactly once:
//! - written to a node that never read them (frozen, then killed): resent, published once;
//! - published, echo lost with the node: confirmed by the resume's replay, not resent;
//! - published, echo lost and the replay no longer holding it: resent, answered
//!   `duplicate`, not published again.

mod support;

use anyhow::{ensure, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::cut::CutProxy;
use tether_client::{Client, ClientConfig, Event, Message, Outgoing, Status};
use tether_kit::{eventually, Cluster, ClusterLogs, ClusterOptions};

const DEADLINE: Duration = Duration::from_secs(30);
const ROOM: &str = "r";

#[derive(Debug, Clone, Copy)]
enum Backbone {
    Redis,
    Nats,
}

/// What one member's app was handed.
#[derive(Debug, Default)]
struct Seen {
    messages: Vec<Message>,
    /// `(msg_id, seq)` of each `duplicate` answer.
    duplicates: Vec<(String, u64)>,
    /// The `unconfirmed` lists of its `Disconnected` events.
    in_flight_at_loss: Vec<Vec<String>>,
}

struct Member {
    client: Client,
    seen: Arc<Mutex<Seen>>,
}

impl Member {
    /// Connects as `id` to `url`, reads its events into [`Seen`], joins [`ROOM`].
    async fn join(url: &str, id: &str) -> Result<Self> {
        let mut cfg = ClientConfig::new(url);
        cfg.client_id = Some(id.into());
        cfg.jitter = 0.0;
        cfg.backoff_min = Duration::from_millis(50);
        cfg.backoff_max = Duration::from_millis(500);
        let (client, mut events) = Client::start(cfg)?;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                let mut log = log.lock().expect("seen");
                match ev {
                    Event::Message(m) => log.messages.push(m),
                    Event::Duplicate { msg_id, seq, .. } => log.duplicates.push((msg_id, seq)),
                    Event::Disconnected { unconfirmed, .. } => log.in_flight_at_loss.push(unconfirmed),
                    _ => {}
                }
            }
        });
        tokio::time::timeout(DEADLINE, client.join(ROOM)).await.context("join in time")??;
        tokio::time::timeout(DEADLINE, client.wait_ready()).await.context("in sync in time")??;
        Ok(Self { client, seen })
    }

    fn server(&self) -> Option<String> {
        match self.client.status() {
            Status::Ready { server } => Some(server),
            _ => None,
        }
    }

    /// Seqs of the messages carrying `msg_id` handed to the app (one entry per delivery).
    fn deliveries(&self, msg_id: &str) -> Vec<u64> {
        let seen = self.seen.lock().expect("seen");
        seen.messages.iter().filter(|m| m.msg_id.as_deref() == Some(msg_id)).map(|m| m.seq).collect()
    }

    fn has_all(&self, ids: &[String]) -> bool {
        ids.iter().all(|id| !self.deliveries(id).is_empty())
    }

    fn seq_of_text(&self, text: &str) -> Option<u64> {
        self.seen.lock().expect("seen").messages.iter().find(|m| m.text == text).map(|m| m.seq)
    }
}

async fn cluster(backbone: Backbone, node_args: Vec<String>) -> Result<Cluster> {
    Cluster::start(ClusterOptions {
        nodes: 3,
        nats: matches!(backbone, Backbone::Nats),
        node_args,
        // Slow enough that a frozen node is not noticed (and its tunnels cut) between the
        // freeze and the kill, however loaded the machine: the kill itself is noticed at once
        // (its refused connects), so failover does not wait for a probe.
        balancer_args: vec!["--health-interval-ms".into(), "2000".into()],
        logs: ClusterLogs::Null,
        ..ClusterOptions::default()
    })
    .await
}

/// The sender through `url` (the balancer, or a relay in front of it) and one member
/// directly on each other node, all in [`ROOM`], with one message confirmed end to end.
/// Returns them and the sender's node.
async fn setup(cl: &Cluster, url: &str) -> Result<(Member, Vec<Member>, String)> {
    let sender = Member::join(url, "sender").await?;
    let victim = sender.server().context("the sender is in sync after its join")?;
    let mut members = Vec::new();
    for (i, (_, node_url)) in cl.node_urls().into_iter().filter(|(name, _)| *name != victim).enumerate() {
        members.push(Member::join(&node_url, &format!("member-{i}")).await?);
    }
    ensure!(members.len() == 2, "two other nodes");
    let warm = sender.client.send_message(ROOM, Outgoing::text("warm")).await?;
    let warm = [warm];
    eventually(DEADLINE, "the first message confirmed and delivered everywhere", || async {
        sender.client.unconfirmed() == 0 && members.iter().all(|m| m.has_all(&warm))
    })
    .await?;
    Ok((sender, members, victim))
}

/// Every message of `ids` reached each of `who` exactly once, all under the same seq.
fn exactly_once(who: &[&Member], ids: &[String]) -> Result<BTreeMap<String, u64>> {
    let mut seqs = BTreeMap::new();
    for id in ids {
        let mut all = BTreeSet::new();
        for m in who {
            let got = m.deliveries(id);
            ensure!(got.len() == 1, "{id} delivered {} times to {:?}: {got:?}", got.len(), m.client.id());
            all.insert(got[0]);
        }
        ensure!(all.len() == 1, "{id} published under several seqs: {all:?}");
        seqs.insert(id.clone(), all.into_iter().next().unwrap_or_default());
    }
    Ok(seqs)
}

async fn unpublished_messages_of_a_killed_node_are_resent_elsewhere_and_published_once(
    backbone: Backbone,
) -> Result<()> {
    let mut cl = cluster(backbone, Vec::new()).await?;
    let (sender, members, victim) = setup(&cl, &cl.ws_url()).await?;
    // Frozen, the node takes the frames into its socket buffer and never reads them.
    cl.node_mut(&victim).context("victim")?.freeze()?;
    let mut ids = Vec::new();
    for i in 1..=5 {
        ids.push(sender.client.send_message(ROOM, Outgoing::text(format!("m{i}"))).await?);
    }
    ensure!(sender.client.unconfirmed() == 5, "all five wait: {}", sender.client.unconfirmed());
    cl.node_mut(&victim).context("victim")?.kill().await?;

    eventually(DEADLINE, "every message delivered to everyone", || async {
        sender.client.unconfirmed() == 0 && sender.has_all(&ids) && members.iter().all(|m| m.has_all(&ids))
    })
    .await?;
    let now_on = sender.server().context("in sync again")?;
    ensure!(now_on != victim, "reconnected to another node, not {victim}");
    let seqs = exactly_once(&[&sender, &members[0], &members[1]], &ids)?;
    let order: Vec<u64> = ids.iter().map(|id| seqs[id]).collect();
    ensure!(order.windows(2).all(|w| w[0] < w[1]), "published in the order sent: {order:?}");
    let in_flight = sender.seen.lock().expect("seen").in_flight_at_loss.clone();
    ensure!(in_flight == [ids.clone()], "the loss listed the five in flight: {in_flight:?}");
    let s = sender.client.stats();
    ensure!((s.messages_resent, s.confirmed_by_duplicate) == (5, 0), "{s:?}");
    ensure!(s.confirmed_by_echo == 6 && s.duplicates_dropped == 0, "{s:?}");
    Ok(())
}

async fn a_published_message_whose_echo_died_with_the_node_is_confirmed_by_the_replay(
    backbone: Backbone,
) -> Result<()> {
    let mut cl = cluster(backbone, Vec::new()).await?;
    let relay = CutProxy::start(cl.balancer().addr()).await;
    let (sender, members, victim) = setup(&cl, &relay.url).await?;
    relay.blind_open_connections();
    let mut ids = Vec::new();
    for i in 1..=3 {
        ids.push(sender.client.send_message(ROOM, Outgoing::text(format!("m{i}"))).await?);
    }
    eventually(DEADLINE, "the three published (the others have them)", || async {
        members.iter().all(|m| m.has_all(&ids))
    })
    .await?;
    ensure!(sender.client.unconfirmed() == 3, "no echo reached the sender");
    cl.node_mut(&victim).context("victim")?.kill().await?;

    eventually(DEADLINE, "the sender confirmed all three", || async {
        sender.client.unconfirmed() == 0 && sender.has_all(&ids)
    })
    .await?;
    ensure!(sender.server().is_some_and(|s| s != victim), "on another node");
    exactly_once(&[&sender, &members[0], &members[1]], &ids)?;
    let replayed = sender.seen.lock().expect("seen").messages.iter().filter(|m| m.replay).count();
    ensure!(replayed == 3, "the echoes came through the replay: {replayed}");
    let s = sender.client.stats();
    ensure!((s.messages_resent, s.confirmed_by_duplicate, s.confirmed_by_echo) == (0, 0, 4), "{s:?}");
    Ok(())
}

async fn a_resend_of_a_message_that_had_landed_is_answered_duplicate_and_not_published_again(
    backbone: Backbone,
) -> Result<()> {
    // A log of two messages: by the time the sender resumes, its message is trimmed away,
    // so only the `msg_id` record can tell the node it was published.
    let config = std::env::temp_dir().join(format!("tether-resend-{}-{:?}.toml", std::process::id(), backbone));
    std::fs::write(&config, "history_len = 2\n")?;
    let mut cl = cluster(backbone, vec!["--config".into(), config.display().to_string()]).await?;
    let relay = CutProxy::start(cl.balancer().addr()).await;
    let (sender, members, victim) = setup(&cl, &relay.url).await?;
    relay.blind_open_connections();
    let id = sender.client.send_message(ROOM, Outgoing::text("landed")).await?;
    let ids = [id.clone()];
    eventually(DEADLINE, "published", || async { members.iter().all(|m| m.has_all(&ids)) }).await?;
    for t in ["f1", "f2", "f3"] {
        members[0].client.send(ROOM, t).await?;
    }
    eventually(DEADLINE, "the others' messages delivered", || async {
        members.iter().all(|m| m.seq_of_text("f3").is_some())
    })
    .await?;
    cl.node_mut(&victim).context("victim")?.kill().await?;

    eventually(DEADLINE, "the sender's resend answered", || async { sender.client.unconfirmed() == 0 }).await?;
    let seqs = exactly_once(&[&members[0], &members[1]], &ids)?;
    let dups = sender.seen.lock().expect("seen").duplicates.clone();
    ensure!(dups == [(id.clone(), seqs[&id])], "one duplicate naming the first seq: {dups:?}");
    let s = sender.client.stats();
    ensure!((s.messages_resent, s.confirmed_by_duplicate) == (1, 1), "{s:?}");
    ensure!(s.incomplete_resumes >= 1, "the trimmed log was reported: {s:?}");
    // Nothing took a seq for the resend: the next message follows f3 directly.
    members[1].client.send(ROOM, "next").await?;
    eventually(DEADLINE, "the next message", || async { members[0].seq_of_text("next").is_some() }).await?;
    let (f3, next) = (members[0].seq_of_text("f3"), members[0].seq_of_text("next"));
    ensure!(next == f3.map(|s| s + 1), "f3 {f3:?}, next {next:?}");
    let _ = std::fs::remove_file(&config);
    Ok(())
}

macro_rules! on_both_backbones {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() -> anyhow::Result<()> {
                    super::$name(super::Backbone::Redis).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn nats() -> anyhow::Result<()> {
                    super::$name(super::Backbone::Nats).await
                }
            }
        )+
    };
}

on_both_backbones!(
    unpublished_messages_of_a_killed_node_are_resent_elsewhere_and_published_once,
    a_published_message_whose_echo_died_with_the_node_is_confirmed_by_the_replay,
    a_resend_of_a_message_that_had_landed_is_answered_duplicate_and_not_published_again,
);
