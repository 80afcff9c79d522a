//! Property: whatever mix of valid and invalid frames, abrupt disconnects and reconnects
//! clients throw at one or two nodes, once every client has gone nothing of them is left in
//! Redis — no room subscription (`PUBSUB NUMSUB` of the room channel is 0), no presence entry
//! (room and `online` hashes, their `:ids` counters, the instances' bookkeeping sets) — and
//! while they were connected every answer was well-formed, every error carried a known code,
//! the code the frame deserved, and no recoverable error cost the connection.
//!
//! One private `redis-server` and two in-process nodes serve every case; each case names its
//! client ids and rooms after its own number, so no case sees another's state. After each
//! step the client sends a *barrier*: a `presence` request for a room nobody joins. A node
//! handles a connection's frames in order and queues direct answers in order, so everything
//! a step caused directly (its errors, its `user_left`, `presence`, `resumed`) arrives before
//! the barrier's answer: the test waits on that, never on a sleep. A connection also sends
//! one right after `connected`, which goes out *before* the node registers the connection's
//! presence (online, restored rooms): until its first frame is read, others may not see it.
//!
//! A small model of the protocol (decoder field order, membership, the session's rooms and
//! name) says which error codes and answers each step deserves. `PROPTEST_CASES=N` runs more
//! cases than the CI default; `docs/FUZZING.md` describes the design.

use anyhow::{anyhow, bail, ensure, Context, Result};
use model::{case, expect, frame_of, Answer, Case, Expect, Names, Slot};
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestError, TestRunner};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use steps::Step;
use tether_kit::RedisServer;
use tether_proto::wire::{ClientMsg, ErrorCode, NODE_FRAME_TYPES};
use tether_tests::{eventually, http_get, InProcessNode, WsClient, DEADLINE};
use tokio_tungstenite::tungstenite::Message;

/// Cases per run in CI: about 40 ms each (1–3 clients, up to 25 steps), shrinking aside.
const CASES: u32 = 64;
const MAX_STEPS: usize = 25;
const MAX_CLIENTS: usize = 3;
const NODES: usize = 2;
const PREFIX: &str = tether_node::config::DEFAULT_PREFIX;
/// How long a shrinking run waits for cleanup (cleanup takes milliseconds; the first failure
/// waited the full `DEADLINE`).
const SHRINK_DEADLINE: Duration = Duration::from_secs(2);
/// Shrinking stops after this long with the smallest failing case so far, well inside the
/// nextest timeout.
const SHRINK_TIME_MS: u32 = 60_000;

// The crate root's submodules live beside it in `property/` (a test's root resolves `mod`
// paths from its own directory).
#[path = "property/model.rs"]
mod model;
#[path = "property/steps.rs"]
mod steps;

struct Fixture {
    nodes: Vec<InProcessNode>,
    con: redis::aio::MultiplexedConnection,
    /// Held only to keep the server alive; declared after the nodes, so it dies after them.
    _redis: RedisServer,
    next_case: AtomicUsize,
    /// Set once a case failed: whatever it leaked stays behind, so later cases (shrinking
    /// runs) check only their own keys instead of the whole of `online` and the instances.
    dirty: AtomicBool,
}

impl Fixture {
    async fn start() -> Result<Self> {
        let redis = RedisServer::start().await?;
        let mut nodes = Vec::new();
        for i in 1..=NODES {
            let node = InProcessNode::start(&format!("node-{i}"), &redis.url(), |_| {})?;
            let addr = node.addr;
            eventually("node ready", || async { (http_get(addr, "/readyz").await.ok()?.0 == 200).then_some(()) })
                .await?;
            nodes.push(node);
        }
        let con = redis::Client::open(redis.url())?.get_multiplexed_async_connection().await?;
        Ok(Self { nodes, con, _redis: redis, next_case: AtomicUsize::new(0), dirty: AtomicBool::new(false) })
    }

    fn url(&self, node: usize, id: &str) -> String {
        self.nodes[node].ws_url(id)
    }
}

/// Connects `slot` to `node` and checks the `connected` frame against the model.
async fn connect(fx: &Fixture, slot: &mut Slot, node: usize, names: &Names) -> Result<()> {
    let mut ws = WsClient::connect(&fx.url(node, &slot.id)).await?;
    let hello = ws.recv().await.context("waiting for `connected`")?;
    ensure!(hello["type"] == "connected", "first frame is not `connected`: {hello}");
    ensure!(hello["id"] == slot.id.as_str(), "connected with the wrong id: {hello}");
    let kind = if slot.has_session { "restored" } else { "new" };
    ensure!(hello["session"] == kind, "expected a {kind} session: {hello}");
    let rooms: BTreeSet<String> =
        hello["rooms"].as_array().into_iter().flatten().filter_map(|r| r.as_str().map(String::from)).collect();
    ensure!(rooms == slot.rooms, "session restored rooms {rooms:?}, but the client was in {:?}", slot.rooms);
    ensure!(hello["name"].as_str() == slot.name.as_deref(), "session restored the wrong name: {hello}");
    // `connected` goes out before the connection registers its presence (online, restored
    // rooms); its first frame is read only once that is done, so a barrier answered proves it.
    let window = barrier(&mut ws, names).await?;
    ensure!(!window.iter().any(|v| v["type"] == "error"), "errors on connecting: {window:?}");
    slot.ws = Some(ws);
    Ok(())
}

/// Checks that a frame is well-formed: JSON object of a known type; errors with a known code.
fn well_formed(v: &Value) -> Result<()> {
    let kind = v["type"].as_str().ok_or_else(|| anyhow!("frame without a string `type`: {v}"))?;
    ensure!(NODE_FRAME_TYPES.contains(&kind), "frame of unknown type: {v}");
    if kind == "error" {
        let code = v["code"].as_str().ok_or_else(|| anyhow!("error without a string `code`: {v}"))?;
        ensure!(ErrorCode::parse(code).is_some(), "error with unknown code: {v}");
        ensure!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "error without a message: {v}");
    }
    Ok(())
}

fn ids_of(v: &Value) -> BTreeSet<String> {
    v["users"].as_array().into_iter().flatten().filter_map(|u| u["id"].as_str().map(String::from)).collect()
}

/// Sends the barrier and waits for its answer; returns the frames that came before it (since
/// the last barrier), each checked to be well-formed.
async fn barrier<'w>(ws: &'w mut WsClient, names: &Names) -> Result<&'w [Value]> {
    let room = names.barrier();
    let from = ws.seen.len();
    ws.send_msg(&ClientMsg::Presence { room: room.clone() }).await?;
    let answer =
        ws.recv_until("the barrier's answer", |v| v["type"] == "presence" && v["room"] == room.as_str()).await?;
    ensure!(ids_of(&answer).is_empty(), "somebody is in the barrier room: {answer}");
    let window = &ws.seen[from..ws.seen.len() - 1];
    for v in window {
        well_formed(v)?;
    }
    Ok(window)
}

/// Sends one step's frame and the barrier; checks everything that arrives up to the
/// barrier's answer against what the step deserves.
async fn exchange(ws: &mut WsClient, frame: Message, want: Expect, names: &Names, case_ids: &[String]) -> Result<()> {
    ws.send_raw(frame).await?;
    let window = barrier(ws, names).await.context("the connection did not survive the step")?;
    let errors: Vec<&str> = window.iter().filter(|v| v["type"] == "error").filter_map(|v| v["code"].as_str()).collect();
    let matches =
        errors.len() == want.errors.len() && errors.iter().zip(&want.errors).all(|(got, ok)| ok.contains(got));
    ensure!(matches, "errors {errors:?}, expected {:?}; frames: {window:?}", want.errors);
    for answer in &want.answers {
        let found = window.iter().any(|v| match answer {
            Answer::Left(room) => v["type"] == "user_left" && v["room"] == room.as_str() && v["reason"] == "left",
            Answer::Presence(room, ids) => {
                v["type"] == "presence" && v["room"] == room.as_str() && {
                    let got = ids_of(v);
                    got.is_superset(ids) && got.iter().all(|id| case_ids.contains(id))
                }
            }
            Answer::Online(ids) => v["type"] == "online" && ids_of(v).is_superset(ids),
            Answer::Resumed(room) => v["type"] == "resumed" && v["room"] == room.as_str(),
        });
        ensure!(found, "no answer {answer:?} among {window:?}");
    }
    Ok(())
}

/// What the case left in Redis; empty when nothing.
async fn leftovers(fx: &Fixture, names: &Names, case_ids: &[String]) -> Result<Vec<String>> {
    let mut con = fx.con.clone();
    let mut left = Vec::new();
    let rooms: Vec<String> = names.rooms().into_iter().chain([names.barrier()]).collect();
    for room in &rooms {
        let channel = format!("{PREFIX}room:{{{room}}}");
        let (_, subs): (String, i64) = redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel).query_async(&mut con).await?;
        if subs != 0 {
            left.push(format!("{channel} has {subs} subscriber(s)"));
        }
        for key in [format!("{PREFIX}presence:{{{room}}}"), format!("{PREFIX}presence:{{{room}}}:ids")] {
            let entries: BTreeMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(&mut con).await?;
            if !entries.is_empty() {
                left.push(format!("{key} = {entries:?}"));
            }
        }
    }
    let everything = !fx.dirty.load(Ordering::Relaxed);
    for key in [format!("{PREFIX}online"), format!("{PREFIX}online:ids")] {
        let entries: BTreeMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(&mut con).await?;
        let ours = |(field, value): &(&String, &String)| {
            case_ids.iter().any(|id| *field == id || value.contains(&format!("\"id\":\"{id}\"")))
        };
        let shown: Vec<_> = entries.iter().filter(|e| everything || ours(e)).collect();
        if !shown.is_empty() {
            left.push(format!("{key} = {shown:?}"));
        }
    }
    let sets: Vec<String> = redis::cmd("KEYS").arg(format!("{PREFIX}instance:*")).query_async(&mut con).await?;
    for set in sets {
        let members: Vec<String> = redis::cmd("SMEMBERS").arg(&set).query_async(&mut con).await?;
        let shown: Vec<&String> = members
            .iter()
            .filter(|m| everything || rooms.iter().any(|r| m.split_once('|').is_some_and(|(_, room)| room == r)))
            .collect();
        if !shown.is_empty() {
            left.push(format!("{set} = {shown:?}"));
        }
    }
    Ok(left)
}

async fn run_case(fx: &Fixture, case: &Case) -> Result<()> {
    let names = Names::new(&fx.next_case.fetch_add(1, Ordering::Relaxed).to_string());
    let case_ids: Vec<String> = (0..case.homes.len()).map(|i| names.client(i)).collect();
    let mut slots: Vec<Slot> = case_ids
        .iter()
        .map(|id| Slot { id: id.clone(), ws: None, rooms: BTreeSet::new(), name: None, has_session: false })
        .collect();
    for (slot, &home) in slots.iter_mut().zip(&case.homes) {
        connect(fx, slot, home, &names).await?;
    }
    for (i, step) in case.steps.iter().enumerate() {
        let me = step.client();
        let result = match step {
            Step::Drop { .. } => {
                drop(slots[me].ws.take());
                Ok(())
            }
            Step::Reconnect { node, .. } => {
                drop(slots[me].ws.take());
                connect(fx, &mut slots[me], *node, &names).await
            }
            _ if slots[me].ws.is_none() => Ok(()),
            _ => {
                let frame = frame_of(step, &names).expect("every other step sends a frame");
                let want = expect(step, me, &mut slots, &names);
                let ws = slots[me].ws.as_mut().expect("checked above");
                exchange(ws, frame, want, &names, &case_ids).await
            }
        };
        result.with_context(|| format!("step {i} ({step:?}) of case {}", names.label))?;
    }
    for slot in &mut slots {
        if let Some(ws) = slot.ws.take() {
            ws.close().await;
        }
    }
    // Cleanup runs on the nodes after the close: wait for it, up to the deadline — a short
    // one while shrinking, where every failing run would otherwise cost the full deadline.
    let deadline = if fx.dirty.load(Ordering::Relaxed) { SHRINK_DEADLINE } else { DEADLINE };
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let left = leftovers(fx, &names, &case_ids).await?;
        if left.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= end {
            bail!(
                "case {}: {DEADLINE:?} after every client closed, Redis still holds:\n  {}",
                names.label,
                left.join("\n  ")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn no_frame_sequence_leaks_subscriptions_or_presence() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let fx = rt.block_on(Fixture::start())?;
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(CASES);
    let config = ProptestConfig {
        cases,
        // Each run talks to real nodes: bound the shrinking, which still ends far smaller.
        max_shrink_iters: 400,
        max_shrink_time: SHRINK_TIME_MS,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let outcome = runner.run(&case(), |case| {
        rt.block_on(run_case(&fx, &case)).map_err(|e| {
            fx.dirty.store(true, Ordering::Relaxed);
            // The case goes into the reason: if shrinking never reproduces a failure, the
            // reason is all that is left of the case that failed.
            TestCaseError::fail(format!("{e:#}\nin case:\n{case:?}"))
        })
    });
    rt.block_on(async move { drop(fx) });
    match outcome {
        Ok(()) => Ok(()),
        // `why` holds the smallest case that failed (proptest's own value is not always it:
        // when no smaller case fails, shrinking can end on one that passed).
        Err(TestError::Fail(why, _)) => bail!("{why}"),
        Err(e) => bail!("{e}"),
    }
}
