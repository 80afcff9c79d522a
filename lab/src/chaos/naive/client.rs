//! One client of `tether chaos --naive`: a plain WebSocket (tokio-tungstenite), no
//! `tether-client`, no reconnect, no resume, no resend. It connects once through the balancer
//! as `?client=naive-N`, joins its rooms, writes the `message` frames the publisher hands it
//! and reads whatever comes. A close frame or the end of the TCP stream ends it for good: that
//! is the event the run counts, because a naive client never comes back.

use super::report::{CloseSeen, LeakedFrame};
use crate::chaos::account::{ClientLog, Sent, Shared};
use futures_util::{SinkExt, StreamExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tether_proto::wire::{decode_node_frame, ClientMsg, NodeFrame, RoomMessage};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Longest wait for the WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After our own close at the end: how long to read on for the server's answer.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Leaked frames kept per client.
const LEAKED_PER_CLIENT: usize = 10;

/// A `message` the publisher asks a client to send.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) room: String,
    pub(super) text: String,
    /// `None`: sent without one (the balancer is to add a `tb-` one).
    pub(super) msg_id: Option<String>,
}

/// What the run reads of a client while it runs (progress line, publisher, drain, victims).
#[derive(Debug, Default)]
pub(super) struct Live {
    /// Every room joined and the connection not ended.
    pub(super) ready: AtomicBool,
    /// The connection ended (close frame, TCP end, error).
    pub(super) ended: AtomicBool,
    /// The node it is on: from `connected`, then from each `rehomed`.
    server: Mutex<String>,
    /// The highest `(epoch, seq)` handed over per room (the join position before any).
    positions: Mutex<HashMap<String, (String, u64)>>,
    /// Own messages written and neither echoed nor refused yet.
    pub(super) unechoed: AtomicU64,
    pub(super) rehomed: AtomicU64,
}

impl Live {
    pub(super) fn server(&self) -> String {
        self.server.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_server(&self, server: &str) {
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = server.to_string();
    }

    pub(super) fn position(&self, room: &str) -> Option<(String, u64)> {
        self.positions.lock().unwrap_or_else(|e| e.into_inner()).get(room).cloned()
    }

    /// Moves `room`'s position to `(epoch, seq)` if that is further on (another epoch is).
    /// Returns whether seqs were skipped (a live jump within the epoch).
    fn advance(&self, room: &str, epoch: &str, seq: u64) -> bool {
        let mut positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        match positions.get_mut(room) {
            Some((e, s)) if e == epoch => {
                let skipped = seq > *s + 1;
                *s = (*s).max(seq);
                skipped
            }
            _ => {
                positions.insert(room.to_string(), (epoch.to_string(), seq));
                false
            }
        }
    }

    /// In sync and not gone.
    pub(super) fn is_ready(&self) -> bool {
        self.ready.load(Relaxed) && !self.ended.load(Relaxed)
    }
}

/// Everything one client saw, handed back when it ends.
#[derive(Debug, Default)]
pub(super) struct ClientRun {
    pub(super) log: ClientLog,
    /// Own messages written, by text (`msg_id`: its own, or the one its echo carried).
    pub(super) written: HashMap<String, Sent>,
    /// How many of them were written with a `msg_id` of the client's own.
    pub(super) with_own_msg_id: u64,
    /// Messages not written (the connection was gone) or answered `error`, with why.
    pub(super) refused: HashMap<String, String>,
    /// Written, and neither echoed nor refused when the client ended: text → sent.
    pub(super) unechoed: Vec<(String, Sent)>,
    /// The close it saw, if the connection ended before the run closed it.
    pub(super) close: Option<CloseSeen>,
    pub(super) rehomed: u64,
    /// `connected` frames after the first (rehome mode swallows the new node's).
    pub(super) connected_again: u64,
    pub(super) replayed: u64,
    /// Live seq jumps within an epoch (what a replay did not fill shows as lost).
    pub(super) gaps: u64,
    /// `resumed` frames that reached the client, and those with `complete: false`.
    pub(super) resumed_seen: u64,
    pub(super) incomplete_resumes: u64,
    /// `duplicate` answers that reached the client (rehome mode keeps them to itself).
    pub(super) duplicate_answers: u64,
    /// Echoes of a message sent with its own `msg_id` that carried another (or none).
    pub(super) echo_msg_id_changed: u64,
    /// Echoes of a message sent without a `msg_id` that carried no `tb-` one.
    pub(super) echo_without_balancer_msg_id: u64,
    /// Text frames that did not decode as node frames.
    pub(super) bad_frames: u64,
    /// `duplicate`, complete `resumed` and second `connected` frames, as received (a few).
    pub(super) leaked: Vec<LeakedFrame>,
    pub(super) errors: BTreeMap<String, u64>,
}

/// A running naive client.
pub(super) struct NaiveClient {
    pub(super) id: String,
    pub(super) rooms: Vec<String>,
    pub(super) live: Arc<Live>,
    tx: mpsc::UnboundedSender<Outgoing>,
    task: JoinHandle<ClientRun>,
}

impl NaiveClient {
    /// Connects and joins in a task of its own; the receiver answers once every room is
    /// joined (or why not).
    pub(super) fn start(
        id: String,
        rooms: Vec<String>,
        url: String,
        shared: Arc<Shared>,
        stop: CancellationToken,
    ) -> (Self, oneshot::Receiver<Result<(), String>>) {
        let live = Arc::new(Live::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let (joined_tx, joined_rx) = oneshot::channel();
        let state = State::new(id.clone(), rooms.clone(), Arc::clone(&live), shared, joined_tx);
        let task = tokio::spawn(state.run(url, rx, stop));
        (Self { id, rooms, live, tx, task }, joined_rx)
    }

    /// Hands `out` to the client's task; `false` when it has ended.
    pub(super) fn send(&self, out: Outgoing) -> bool {
        self.tx.send(out).is_ok()
    }

    /// Waits for the task (cancel the clients' token first) and returns what it saw.
    pub(super) async fn finish(self) -> ClientRun {
        drop(self.tx);
        match self.task.await {
            Ok(run) => run,
            Err(e) => {
                tracing::error!(client = %self.id, error = %e, "a naive client's task failed");
                ClientRun::default()
            }
        }
    }
}

/// A message written and not yet echoed.
#[derive(Debug)]
struct Pending {
    own_msg_id: Option<String>,
}

/// The client task's own state.
struct State {
    id: String,
    rooms: Vec<String>,
    live: Arc<Live>,
    shared: Arc<Shared>,
    joined_tx: Option<oneshot::Sender<Result<(), String>>>,
    joined: HashSet<String>,
    connected: bool,
    pending: HashMap<String, Pending>,
    /// Own `msg_id` → text, to match `error` answers.
    by_msg_id: HashMap<String, String>,
    run: ClientRun,
}

impl State {
    fn new(
        id: String,
        rooms: Vec<String>,
        live: Arc<Live>,
        shared: Arc<Shared>,
        joined_tx: oneshot::Sender<Result<(), String>>,
    ) -> Self {
        let log = ClientLog::new(id.clone(), rooms.clone());
        Self {
            id,
            rooms,
            live,
            shared,
            joined_tx: Some(joined_tx),
            joined: HashSet::new(),
            connected: false,
            pending: HashMap::new(),
            by_msg_id: HashMap::new(),
            run: ClientRun { log, ..ClientRun::default() },
        }
    }

    async fn run(
        mut self,
        url: String,
        mut rx: mpsc::UnboundedReceiver<Outgoing>,
        stop: CancellationToken,
    ) -> ClientRun {
        let mut ws = match timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url.as_str())).await {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => return self.ended_before_start(format!("connect failed: {e}")),
            Err(_) => return self.ended_before_start(format!("no handshake within {CONNECT_TIMEOUT:?}")),
        };
        for room in self.rooms.clone() {
            if let Err(e) = ws.send(Message::text(ClientMsg::Join { room }.to_json())).await {
                self.ended(None, format!("write failed: {e}"), "error");
                return self.finish();
            }
        }
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    // Our own close: not one the run counts.
                    let _ = ws.close(None).await;
                    let _ = timeout(CLOSE_WAIT, async { while let Some(Ok(_)) = ws.next().await {} }).await;
                    break;
                }
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => self.on_text(text.as_str()),
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = close_parts(frame.as_ref());
                        self.ended(code, reason, "close frame");
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        self.ended(None, e.to_string(), "error");
                        break;
                    }
                    None => {
                        self.ended(None, String::new(), "TCP end");
                        break;
                    }
                },
                Some(out) = rx.recv() => {
                    if let Err(e) = self.write(&mut ws, out).await {
                        self.ended(None, format!("write failed: {e}"), "error");
                        break;
                    }
                }
            }
        }
        // What the publisher queued after the end was never written.
        rx.close();
        while let Ok(out) = rx.try_recv() {
            self.run.refused.insert(out.text, "connection gone".into());
        }
        self.finish()
    }

    async fn write<S>(&mut self, ws: &mut S, out: Outgoing) -> Result<(), S::Error>
    where
        S: futures_util::Sink<Message> + Unpin,
    {
        let frame = ClientMsg::Message {
            room: out.room.clone(),
            text: out.text.clone(),
            data: None,
            msg_id: out.msg_id.clone(),
        };
        let at_ms = self.shared.ms();
        let node = self.live.server();
        ws.send(Message::text(frame.to_json())).await?;
        if let Some(id) = &out.msg_id {
            self.by_msg_id.insert(id.clone(), out.text.clone());
            self.run.with_own_msg_id += 1;
        }
        let sent = Sent { room: out.room, at_ms, node, msg_id: out.msg_id.clone().unwrap_or_default() };
        self.run.written.insert(out.text.clone(), sent);
        self.pending.insert(out.text, Pending { own_msg_id: out.msg_id });
        self.live.unechoed.fetch_add(1, Relaxed);
        Ok(())
    }

    fn on_text(&mut self, text: &str) {
        let ms = self.shared.ms();
        let frame = match decode_node_frame(text) {
            Ok(f) => f,
            Err(e) => {
                self.run.bad_frames += 1;
                self.run.log.note(ms, format!("undecodable frame: {e}"));
                return;
            }
        };
        let leaked = match &frame {
            NodeFrame::Duplicate { .. } => true,
            NodeFrame::Resumed { complete, .. } => *complete,
            NodeFrame::Connected { .. } => self.connected,
            _ => false,
        };
        if leaked && self.run.leaked.len() < LEAKED_PER_CLIENT {
            let (client, server) = (self.id.clone(), self.live.server());
            self.run.leaked.push(LeakedFrame { client, at_ms: ms, server, frame: text.to_string() });
        }
        match frame {
            NodeFrame::Message(m) => self.on_message(ms, m),
            NodeFrame::UserJoined { room, id, head_seq, epoch, .. } if id == self.id => {
                if !self.run.log.joins.contains_key(&room) {
                    if let Some(e) = &epoch {
                        self.live.advance(&room, e, head_seq.unwrap_or(0));
                    }
                }
                self.run.log.record_own_join(&self.shared, ms, room.clone(), head_seq, epoch);
                if self.rooms.contains(&room) && self.joined.insert(room) && self.joined.len() == self.rooms.len() {
                    self.live.ready.store(true, Relaxed);
                    if let Some(tx) = self.joined_tx.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
            }
            NodeFrame::Connected { server, session, rooms, .. } => {
                self.run.log.note(ms, format!("connected to {server}: {session:?} {rooms:?}"));
                if self.connected {
                    self.run.connected_again += 1;
                }
                self.connected = true;
                self.live.set_server(&server);
                self.run.log.server = Some(server);
            }
            NodeFrame::Rehomed { from, server, rooms } => {
                self.run.log.note(ms, format!("rehomed from {from} to {server}, rooms {rooms:?}"));
                self.run.rehomed += 1;
                self.live.rehomed.fetch_add(1, Relaxed);
                self.live.set_server(&server);
                self.run.log.server = Some(server);
            }
            NodeFrame::Resumed { room, from_seq, to_seq, complete, epoch } => {
                self.run
                    .log
                    .note(ms, format!("resumed {room} {from_seq}..={to_seq} epoch {epoch:?} complete {complete}"));
                self.run.resumed_seen += 1;
                if !complete {
                    self.run.incomplete_resumes += 1;
                }
            }
            NodeFrame::Duplicate { room, msg_id, seq, .. } => {
                self.run.log.note(ms, format!("{msg_id} to {room} answered duplicate (seq {seq})"));
                self.run.duplicate_answers += 1;
            }
            NodeFrame::Error { code, message, msg_id } => {
                self.run.log.note(ms, format!("error {code}: {message} (msg_id {msg_id:?})"));
                *self.run.errors.entry(code.clone()).or_default() += 1;
                let text = msg_id.and_then(|id| self.by_msg_id.get(&id).cloned());
                if let Some(text) = text {
                    if self.pending.remove(&text).is_some() {
                        self.live.unechoed.fetch_sub(1, Relaxed);
                        self.run.refused.insert(text, code);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_message(&mut self, ms: u64, m: RoomMessage) {
        if m.replay {
            self.run.replayed += 1;
        }
        if self.live.advance(&m.room, &m.epoch, m.seq) {
            self.run.gaps += 1;
            self.run.log.note(ms, format!("seq jump in {} to {} (epoch {})", m.room, m.seq, m.epoch));
        }
        if m.id == self.id {
            if let Some(p) = self.pending.remove(&m.text) {
                self.live.unechoed.fetch_sub(1, Relaxed);
                match (&p.own_msg_id, &m.msg_id) {
                    (Some(own), got) if got.as_ref() != Some(own) => self.run.echo_msg_id_changed += 1,
                    (None, got) if !got.as_deref().is_some_and(|id| id.starts_with("tb-")) => {
                        self.run.echo_without_balancer_msg_id += 1;
                    }
                    _ => {}
                }
                if let (Some(sent), Some(id)) = (self.run.written.get_mut(&m.text), &m.msg_id) {
                    if sent.msg_id.is_empty() {
                        sent.msg_id = id.clone();
                    }
                }
            }
        }
        self.run.log.record_message(&self.shared, ms, m);
    }

    /// The connection ended under the client: the close the run counts.
    fn ended(&mut self, code: Option<u16>, reason: String, how: &str) {
        let at_ms = self.shared.ms();
        self.live.ended.store(true, Relaxed);
        let server = self.live.server();
        self.run.log.note(at_ms, format!("{how} {code:?} {reason:?} from {server}"));
        if let Some(tx) = self.joined_tx.take() {
            let _ = tx.send(Err(format!("{how} {code:?} {reason} before joining")));
        }
        self.run.close = Some(CloseSeen { client: self.id.clone(), at_ms, server, how: how.to_string(), code, reason });
    }

    fn ended_before_start(mut self, why: String) -> ClientRun {
        self.ended(None, why, "connect");
        self.finish()
    }

    fn finish(mut self) -> ClientRun {
        self.live.ended.store(true, Relaxed);
        let mut unechoed: Vec<(String, Sent)> = self
            .pending
            .drain()
            .filter_map(|(text, _)| self.run.written.get(&text).map(|s| (text, s.clone())))
            .collect();
        unechoed.sort_by_key(|(_, s)| s.at_ms);
        self.run.unechoed = unechoed;
        if let Some(tx) = self.joined_tx.take() {
            let _ = tx.send(Err("ended before joining".into()));
        }
        self.run
    }
}

/// A close frame's code and reason (`None`: a close frame without a code).
fn close_parts(frame: Option<&CloseFrame>) -> (Option<u16>, String) {
    match frame {
        Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
        None => (None, String::new()),
    }
}
