//! Steady traffic through one room while the Redis Cluster under it fails or moves: a sender
//! that sends one message at a time (each with a `msg_id`, resent after a refusal until it is
//! acknowledged), receivers reading in their own tasks, and the checks every scenario runs on
//! what they saw.

use anyhow::{bail, Context, Result};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use tether_tests::WsClient;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The sender's pace: one message per tick.
const TICK: Duration = Duration::from_millis(20);

/// What the sender did with one message.
#[derive(Debug, Clone)]
pub struct Sent {
    pub text: String,
    /// Its position once acknowledged (its echo came back, or `duplicate` named the first).
    pub at: Option<(String, u64)>,
    /// `backbone_unavailable` answers before that.
    pub refusals: u32,
}

/// A sender task: sends `text-N` messages to `room` until told to stop (after the current
/// one), then the `end` marker; answers what happened to each.
pub struct Sender {
    stop: watch::Sender<bool>,
    acked: watch::Receiver<usize>,
    task: JoinHandle<Result<(Vec<Sent>, WsClient)>>,
}

impl Sender {
    pub fn start(mut ws: WsClient, room: &'static str, tag: &'static str) -> Self {
        let (stop, stopped) = watch::channel(false);
        let (acks, acked) = watch::channel(0usize);
        let task = tokio::spawn(async move {
            let mut sent: Vec<Sent> = Vec::new();
            let mut tick = tokio::time::interval(TICK);
            let mut i = 0usize;
            loop {
                let last = *stopped.borrow();
                let text = if last { format!("{tag}-end") } else { format!("{tag}-{i}") };
                let mut s = Sent { text: text.clone(), at: None, refusals: 0 };
                // Bounded: a message refused this often fails the scenario.
                for _ in 0..500 {
                    tick.tick().await;
                    let msg_id = format!("m-{text}");
                    ws.send(json!({"type": "message", "room": room, "text": text, "msg_id": msg_id})).await?;
                    let answer = ws
                        .recv_until("the echo, a duplicate or a refusal", |v| {
                            (v["type"] == "message" && v["msg_id"] == msg_id.as_str())
                                || (v["type"] == "duplicate" && v["msg_id"] == msg_id.as_str())
                                || (v["type"] == "error" && v["code"] == "backbone_unavailable")
                        })
                        .await?;
                    if answer["type"] == "error" {
                        s.refusals += 1;
                        continue;
                    }
                    let epoch = answer["epoch"].as_str().context("epoch")?.to_string();
                    s.at = Some((epoch, answer["seq"].as_u64().context("seq")?));
                    break;
                }
                let done = s.at.is_some();
                sent.push(s);
                if !done {
                    bail!("{text} was refused 500 times");
                }
                acks.send_modify(|n| *n += 1);
                if last {
                    return Ok((sent, ws));
                }
                i += 1;
            }
        });
        Self { stop, acked, task }
    }

    /// Messages acknowledged so far.
    pub fn acked(&self) -> usize {
        *self.acked.borrow()
    }

    /// Waits until `n` more messages than now are acknowledged, within `within`.
    pub async fn more_acked(&mut self, n: usize, within: Duration) -> Result<()> {
        let target = self.acked() + n;
        tokio::time::timeout(within, self.acked.wait_for(|a| *a >= target))
            .await
            .with_context(|| format!("{n} more messages acknowledged within {within:?}"))??;
        Ok(())
    }

    /// Stops after the current message and the `end` marker.
    pub async fn finish(self) -> Result<(Vec<Sent>, WsClient)> {
        self.stop.send_replace(true);
        self.task.await?
    }
}

/// A receiver task: reads until the `end` marker of `tag` arrives; answers every frame.
pub fn receive(mut ws: WsClient, tag: &'static str) -> JoinHandle<Result<WsClient>> {
    tokio::spawn(async move {
        let end = format!("{tag}-end");
        // Bounded by the scenario: each read waits at most the crate's deadline.
        loop {
            let v = ws.recv_within(Duration::from_secs(30)).await?;
            if v["type"] == "message" && v["text"] == end.as_str() {
                return Ok(ws);
            }
        }
    })
}

/// The `message` frames of `room` a client saw, as `(text, epoch, seq)`.
pub fn messages(ws: &WsClient, room: &str) -> Vec<(String, String, u64)> {
    ws.seen
        .iter()
        .filter(|v| v["type"] == "message" && v["room"] == room)
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            (s("text"), s("epoch"), v["seq"].as_u64().unwrap_or_default())
        })
        .collect()
}

/// No `(epoch, seq)` names two different messages, across every client's frames.
pub fn positions_unique(clients: &[&WsClient], room: &str) -> Result<()> {
    let mut named: HashMap<(String, u64), String> = HashMap::new();
    for ws in clients {
        for (text, epoch, seq) in messages(ws, room) {
            if let Some(other) = named.insert((epoch.clone(), seq), text.clone()) {
                if other != text {
                    bail!("({epoch}, {seq}) named both {other:?} and {text:?}");
                }
            }
        }
    }
    Ok(())
}

/// Every acknowledged message reached `ws` exactly once, and within each epoch seqs only grow.
pub fn each_once(ws: &WsClient, room: &str, sent: &[Sent]) -> Result<()> {
    let got = messages(ws, room);
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (text, _, _) in &got {
        *count.entry(text.as_str()).or_default() += 1;
    }
    for s in sent.iter().filter(|s| s.at.is_some()) {
        match count.get(s.text.as_str()) {
            Some(1) => {}
            Some(n) => bail!("{} arrived {n} times", s.text),
            None => bail!("{} (acknowledged at {:?}) never arrived", s.text, s.at),
        }
    }
    let mut last: HashMap<&str, u64> = HashMap::new();
    for (text, epoch, seq) in &got {
        if let Some(prev) = last.insert(epoch.as_str(), *seq) {
            if *seq <= prev {
                bail!("{text}: seq {seq} after {prev} in epoch {epoch}");
            }
        }
    }
    Ok(())
}
