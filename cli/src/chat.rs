//! `tether chat`: a line client for people at a terminal and for scripts in a pipe, built on
//! the reconnecting client library [`tether_client`].
//!
//! Each input line is a command (`/join ROOM`, `/help`, …) or a message to the current room;
//! each event is printed as one line (`[node-2] #general alice: hi (seq 7)`). Nothing assumes
//! a terminal: no prompt, no cursor tricks, stdout flushed per line.
//!
//! When the node under the chat dies or drains, the library reconnects through the balancer,
//! gets the session back and replays what was missed, once and in order; the chat narrates it
//! in `~` lines (`~ reconnected to node-3 (session restored, 2 rooms, 4 missed messages
//! replayed)`), marks replays (`(seq 7, replay)`) and warns (`!`) about anything the library
//! reports lost. A line typed while the chat is not in sync is refused, never queued: the
//! person decides whether to say it again.
//!
//! Lines are handled one at a time. A `/join` holds the next line back until the node confirms
//! it, so `printf '/join g\nhi\n'` sends `hi` to `g` (the library refuses a message to a room
//! whose join has not completed). Input is not read at all before the first connection is in
//! sync, and when it ends the chat waits (up to [`ChatOptions::linger`]) for the answers to
//! what it sent — its own echo for a message, the answer to `presence` — before it hangs up.

use crate::args::ChatArgs;
use anyhow::{anyhow, Context, Result};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;
use tether_client::{
    Client, ClientConfig, Error as ClientError, Event, LeaveReason, Message, PresenceUser, Session as SessionKind,
    Status,
};
use tether_kit::url::connect_url;
use tether_proto::wire::{validate_name, validate_room};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

/// Default of [`ChatOptions::linger`].
pub const DEFAULT_LINGER: Duration = Duration::from_secs(5);

/// What `tether chat` connects to and as whom.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub url: String,
    pub client: Option<String>,
    pub name: Option<String>,
    /// After the input ends, the longest wait for answers still outstanding.
    pub linger: Duration,
    /// `--ca`: the CA file wss:// connections trust instead of the system's roots.
    pub ca: Option<std::path::PathBuf>,
}

impl From<ChatArgs> for ChatOptions {
    fn from(a: ChatArgs) -> Self {
        Self { url: a.url, client: a.client, name: a.name, linger: DEFAULT_LINGER, ca: a.ca }
    }
}

/// How a chat session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEnd {
    /// The input ended (and answers were waited for).
    InputClosed,
    /// `/quit`.
    Quit,
    /// The client library stopped reconnecting (the upgrade was refused for good).
    GaveUp,
}

impl ChatEnd {
    /// Process exit code: 1 when the client gave up, 0 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::GaveUp => 1,
            _ => 0,
        }
    }
}

/// Runs a chat session on this process' stdin and stdout.
pub async fn run_stdio(opts: ChatOptions) -> Result<i32> {
    let (tx, rx) = mpsc::channel(64);
    // A plain thread, not `tokio::io::stdin`: its blocking read cannot be cancelled, and a
    // tokio blocking task would hold up runtime shutdown until the user pressed Enter.
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        })
        .context("starting the stdin reader")?;
    let end = run(opts, rx, &mut std::io::stdout()).await?;
    Ok(end.exit_code())
}

/// The library configuration for `opts`, with every flag checked first so that a mistake is
/// named after the flag (`--client`, `--name`) rather than the library's field.
fn client_config(opts: &ChatOptions) -> Result<ClientConfig> {
    connect_url(&opts.url, opts.client.as_deref())?;
    if let Some(name) = &opts.name {
        validate_name(name).with_context(|| format!("--name {name:?}"))?;
    }
    let mut cfg = ClientConfig::new(opts.url.clone());
    cfg.client_id = opts.client.clone();
    cfg.name = opts.name.clone();
    if let Some(ca) = &opts.ca {
        cfg.tls = Some(tether_kit::certs::client_config_from_file(ca).context("--ca")?);
    }
    Ok(cfg)
}

/// What one input line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A message to the current room.
    Message(String),
    Join(String),
    Leave(Option<String>),
    Switch(String),
    Presence(Option<String>),
    Online,
    Name(String),
    Help,
    Quit,
    Nothing,
    /// A local complaint, printed as `! …`.
    Complaint(String),
}

/// Parses one line of input. Validation that needs no server happens here, so typos get an
/// immediate, specific answer.
pub fn parse_line(line: &str) -> Input {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Input::Nothing;
    }
    let Some(command) = line.strip_prefix('/') else {
        return Input::Message(line.to_owned());
    };
    if command.starts_with('/') {
        // `//text` sends the message `/text`.
        return Input::Message(command.to_owned());
    }
    let (word, rest) = command.split_once(char::is_whitespace).map_or((command, ""), |(w, r)| (w, r.trim()));
    let room_arg = |usage: &str| -> Result<String, String> {
        if rest.is_empty() {
            return Err(format!("usage: {usage}"));
        }
        validate_room(rest).map_err(|e| e.to_string())?;
        Ok(rest.to_owned())
    };
    match word {
        "join" => room_arg("/join ROOM").map_or_else(Input::Complaint, Input::Join),
        "room" => room_arg("/room ROOM").map_or_else(Input::Complaint, Input::Switch),
        "leave" if rest.is_empty() => Input::Leave(None),
        "leave" => room_arg("/leave [ROOM]").map_or_else(Input::Complaint, |r| Input::Leave(Some(r))),
        "presence" if rest.is_empty() => Input::Presence(None),
        "presence" => room_arg("/presence [ROOM]").map_or_else(Input::Complaint, |r| Input::Presence(Some(r))),
        "name" if rest.is_empty() => Input::Complaint("usage: /name NAME".into()),
        "name" => match validate_name(rest) {
            Ok(()) => Input::Name(rest.to_owned()),
            Err(e) => Input::Complaint(e.to_string()),
        },
        "online" => Input::Online,
        "quit" | "exit" => Input::Quit,
        "help" | "?" => Input::Help,
        other => Input::Complaint(format!("unknown command /{other}; /help lists them")),
    }
}

/// The `/help` text.
pub const HELP: &str = "\
* commands:
*   /join ROOM       join ROOM and make it the current room
*   /leave [ROOM]    leave ROOM (default: the current room)
*   /room ROOM       make ROOM the current room
*   /name NAME       set your display name
*   /presence [ROOM] who is in ROOM (default: the current room)
*   /online          who is connected anywhere
*   /quit            close the connection and exit
*   /help            this text
* any other line is sent to the current room (start it with // to send a leading /)";

/// The chat's own view of the conversation, next to the library's.
#[derive(Debug, Default)]
struct Session {
    /// Our client id (configured, or minted by the server): tells our own echoes, joins and
    /// leaves from other people's.
    me: Option<String>,
    current: Option<String>,
    /// Rooms joined or being joined, oldest first: `/leave` of the current room falls back to
    /// the newest of the others.
    rooms: Vec<String>,
    /// Own messages written whose echo has not arrived. Kept across a reconnect: the echo of
    /// a message the node published comes back in the replay.
    echoes: usize,
    /// Answers awaited on the current connection (`presence`, `online`, own `user_left`);
    /// a lost connection takes them with it.
    answers: usize,
}

impl Session {
    fn outstanding(&self) -> usize {
        self.echoes + self.answers
    }

    fn is_me(&self, id: &str) -> bool {
        self.me.as_deref() == Some(id)
    }

    fn add_room(&mut self, room: &str) {
        if !self.rooms.iter().any(|r| r == room) {
            self.rooms.push(room.to_owned());
        }
    }
}

/// What a reconnect's re-sync has shown so far, for its `~ reconnected` line.
#[derive(Debug, Default)]
struct Resync {
    restored: bool,
    /// Replayed messages delivered since the connection was lost.
    replayed: u64,
    /// Loss warnings printed meanwhile (incomplete resumes, gaps, epoch changes).
    losses: u64,
}

/// A join whose confirmation is awaited: the room and the library's answer.
type Joining = BoxFuture<'static, (String, Result<(), ClientError>)>;

/// One running chat: the library handle, the chat's state and where lines go.
struct Chat<'a, W: Write> {
    client: Client,
    out: &'a mut W,
    session: Session,
    /// Joins not yet confirmed. Polled first in every turn of the loop, so each one's
    /// command reaches the library before any later input line is handled.
    joins: FuturesUnordered<Joining>,
    /// Rooms whose join holds the input back (only while in sync: a join made offline is
    /// completed by the next re-sync, and a lost connection releases the hold).
    awaiting: BTreeSet<String>,
    /// A `connected` event arrived at least once: from then on failures are retried.
    ever_connected: bool,
    /// The first connection got in sync: input is read from then on.
    ever_ready: bool,
    /// The node serving us, for the lines that narrate its loss.
    server: String,
    /// `Some` between a lost connection and the next `Ready`.
    resync: Option<Resync>,
}

/// Runs one chat session: connects, then reads `input` lines and prints to `out` until the
/// input ends or `/quit`. Fails when the configuration is bad or the first connection cannot
/// be made; later losses are reconnected.
pub async fn run<W: Write>(opts: ChatOptions, mut input: mpsc::Receiver<String>, out: &mut W) -> Result<ChatEnd> {
    let cfg = client_config(&opts)?;
    let (client, mut events) = Client::start(cfg).context("client configuration")?;
    let mut chat = Chat {
        client: client.clone(),
        out,
        session: Session::default(),
        joins: FuturesUnordered::new(),
        awaiting: BTreeSet::new(),
        ever_connected: false,
        ever_ready: false,
        server: String::new(),
        resync: None,
    };
    let result = chat.drive(&mut events, &mut input, opts.linger).await;
    if !matches!(result, Ok(ChatEnd::GaveUp)) {
        // Close with 1000 so that the node drops the session's presence at once.
        let _ = client.close().await;
    }
    result.with_context(|| format!("chat with {}", opts.url))
}

impl<W: Write> Chat<'_, W> {
    async fn drive(
        &mut self,
        events: &mut mpsc::Receiver<Event>,
        input: &mut mpsc::Receiver<String>,
        linger: Duration,
    ) -> Result<ChatEnd> {
        let mut input_open = true;
        let mut linger_until: Option<Instant> = None;
        loop {
            if !input_open && self.awaiting.is_empty() && self.session.outstanding() == 0 {
                return Ok(ChatEnd::InputClosed);
            }
            let reading = input_open && self.ever_ready && self.awaiting.is_empty();
            tokio::select! {
                biased;
                Some((room, result)) = self.joins.next(), if !self.joins.is_empty() => {
                    self.awaiting.remove(&room);
                    match result {
                        // A refusal was printed as the node's `error`; a cancelled join was
                        // left on purpose; a closed client ends through its events.
                        Ok(()) | Err(ClientError::Server { .. } | ClientError::Cancelled(_) | ClientError::Closed) => {}
                        Err(e) => self.say(format!("! join #{room}: {e}"))?,
                    }
                }
                ev = events.recv() => {
                    let Some(ev) = ev else {
                        self.say("! the client library stopped")?;
                        return Ok(ChatEnd::GaveUp);
                    };
                    if let Some(end) = self.on_event(ev)? {
                        return Ok(end);
                    }
                }
                line = input.recv(), if reading => {
                    let Some(line) = line else {
                        input_open = false;
                        linger_until = Some(Instant::now() + linger);
                        continue;
                    };
                    if let Some(end) = self.on_line(&line).await? {
                        return Ok(end);
                    }
                }
                () = sleep_until(linger_until.unwrap_or_else(Instant::now)), if linger_until.is_some() => {
                    self.say(format!("* gave up waiting for {} answer(s)", self.session.outstanding()))?;
                    self.session.echoes = 0;
                    self.session.answers = 0;
                    self.awaiting.clear();
                }
            }
        }
    }

    fn say(&mut self, line: impl std::fmt::Display) -> Result<()> {
        writeln!(self.out, "{line}")?;
        self.out.flush()?;
        Ok(())
    }

    fn in_sync(&self) -> bool {
        matches!(self.client.status(), Status::Ready { .. })
    }

    /// Asks the library to join `room`; `hold` keeps the input waiting for the confirmation.
    fn start_join(&mut self, room: String, hold: bool) {
        if hold {
            self.awaiting.insert(room.clone());
        }
        let client = self.client.clone();
        self.joins.push(Box::pin(async move {
            let result = client.join(&room).await;
            (room, result)
        }));
    }

    /// Prints one event and updates the state; `Some` when the chat is over.
    fn on_event(&mut self, ev: Event) -> Result<Option<ChatEnd>> {
        match &ev {
            Event::Connected { server, id, session, rooms, .. } => {
                self.server = server.clone();
                self.session.me = Some(id.clone());
                let first = !self.ever_connected;
                self.ever_connected = true;
                if let Some(resync) = &mut self.resync {
                    resync.restored = *session == SessionKind::Restored;
                }
                if first && !rooms.is_empty() {
                    // The library leaves restored rooms the app has not asked for, and on the
                    // first connection that is all of them: ask for them again.
                    self.say(format_event(&ev).unwrap_or_default())?;
                    self.say(format!("* rejoining the restored session's rooms {}", room_list(rooms)))?;
                    for room in rooms {
                        self.session.add_room(room);
                        self.start_join(room.clone(), true);
                    }
                    if self.session.current.is_none() {
                        self.session.current = rooms.first().cloned();
                    }
                    return Ok(None);
                }
            }
            Event::Ready { server, since_disconnect } => {
                self.ever_ready = true;
                if let Some(resync) = self.resync.take() {
                    let rooms = self.client.rooms().len();
                    self.say(reconnected_line(server, &resync, rooms, *since_disconnect))?;
                }
                return Ok(None);
            }
            Event::Disconnected { code, reason, will_retry, .. } => {
                // Answers to requests of the lost connection will not come; joins are made
                // again by the re-sync, so the input need not wait for them.
                self.session.answers = 0;
                self.awaiting.clear();
                self.resync.get_or_insert_with(Resync::default);
                self.say(lost_line(&self.server, *code, reason, *will_retry))?;
                return Ok(None);
            }
            Event::ConnectFailed { attempt, error, retry_in } => {
                if !self.ever_connected {
                    // As before the library: a chat that never got a connection exits 1
                    // rather than retrying silently behind a prompt-less pipe.
                    return Err(anyhow!("could not connect: {error}"));
                }
                let next = match retry_in {
                    Some(d) => format!("retrying in {:.1} s", d.as_secs_f64()),
                    None => "giving up".to_owned(),
                };
                self.say(format!("~ reconnect attempt {attempt} failed: {error}; {next}"))?;
                return Ok(None);
            }
            Event::Closed => {
                self.say("! the client stopped reconnecting")?;
                return Ok(Some(ChatEnd::GaveUp));
            }
            Event::Message(m) => {
                if self.session.is_me(&m.id) {
                    self.session.echoes = self.session.echoes.saturating_sub(1);
                }
                if let (Some(resync), true) = (&mut self.resync, m.replay) {
                    resync.replayed += 1;
                }
            }
            Event::UserLeft { id, reason: LeaveReason::Left, .. } if self.session.is_me(id) => {
                self.session.answers = self.session.answers.saturating_sub(1);
            }
            Event::Presence { .. } | Event::Online { .. } => {
                self.session.answers = self.session.answers.saturating_sub(1);
            }
            Event::Error { .. } => {
                // The protocol does not tie an error to its request: count it against
                // whatever is outstanding, so the input's end does not wait in vain.
                if self.session.answers > 0 {
                    self.session.answers -= 1;
                } else {
                    self.session.echoes = self.session.echoes.saturating_sub(1);
                }
            }
            Event::Gap { .. } | Event::EpochChanged { .. } | Event::Resumed { complete: false, .. } => {
                if let Some(resync) = &mut self.resync {
                    resync.losses += 1;
                }
            }
            Event::UserJoined { .. } | Event::UserLeft { .. } | Event::Resumed { .. } | Event::Unknown(_) => {}
            Event::Duplicate { .. } => {} // its echo came (or comes) as a message
        }
        if let Some(line) = format_event(&ev) {
            self.say(line)?;
        }
        Ok(None)
    }

    /// Applies one input line; `Some` on `/quit`.
    async fn on_line(&mut self, line: &str) -> Result<Option<ChatEnd>> {
        match parse_line(line) {
            Input::Nothing => {}
            Input::Quit => return Ok(Some(ChatEnd::Quit)),
            Input::Help => self.say(HELP)?,
            Input::Complaint(msg) => self.say(format!("! {msg}"))?,
            Input::Join(room) => {
                let hold = self.in_sync();
                if !hold {
                    self.say(format!("* not connected; #{room} will be joined once reconnected"))?;
                }
                self.session.add_room(&room);
                self.session.current = Some(room.clone());
                self.start_join(room, hold);
            }
            Input::Leave(room) => {
                let Some(room) = room.or_else(|| self.session.current.clone()) else {
                    return self.say("! no current room; /leave ROOM").map(|()| None);
                };
                let told = self.in_sync();
                match self.client.leave(&room).await {
                    // Only a connected leave gets its own `user_left` back.
                    Ok(()) if told => self.session.answers += 1,
                    Ok(()) => {}
                    Err(e) => self.say(format!("! leave #{room}: {e}"))?,
                }
                self.session.rooms.retain(|r| *r != room);
                if self.session.current.as_ref() == Some(&room) {
                    self.session.current = self.session.rooms.last().cloned();
                    if let Some(now) = self.session.current.clone() {
                        self.say(format!("* current room is now #{now}"))?;
                    }
                }
            }
            Input::Switch(room) => {
                if !self.session.rooms.contains(&room) {
                    self.say(format!("* not joined to #{room}: messages will fail until /join {room}"))?;
                }
                self.say(format!("* current room is now #{room}"))?;
                self.session.current = Some(room);
            }
            Input::Message(text) => {
                let Some(room) = self.session.current.clone() else {
                    return self.say("! no current room: /join ROOM first").map(|()| None);
                };
                match self.client.send(&room, &text).await {
                    Ok(()) => self.session.echoes += 1,
                    Err(e) => self.refused("message", &e)?,
                }
            }
            Input::Presence(room) => {
                let Some(room) = room.or_else(|| self.session.current.clone()) else {
                    return self.say("! no current room: /join ROOM first").map(|()| None);
                };
                match self.client.presence(&room).await {
                    Ok(()) => self.session.answers += 1,
                    Err(e) => self.refused("/presence", &e)?,
                }
            }
            Input::Online => match self.client.online().await {
                Ok(()) => self.session.answers += 1,
                Err(e) => self.refused("/online", &e)?,
            },
            Input::Name(name) => {
                // Offline, the library remembers it and sends it on the next connection.
                if let Err(e) = self.client.set_name(&name).await {
                    self.refused("/name", &e)?;
                }
            }
        }
        Ok(None)
    }

    /// Says why the library refused to send `what`.
    fn refused(&mut self, what: &str, e: &ClientError) -> Result<()> {
        match e {
            ClientError::NotConnected => self.say(format!("! not connected; {what} not sent")),
            // Same code as the node's refusal, which the chat printed before the library
            // checked it locally.
            ClientError::NotJoined(room) => self.say(format!("! not_in_room: join {room} first (/join {room})")),
            e => self.say(format!("! {what} not sent: {e}")),
        }
    }
}

/// The `~` line that ends a reconnect: where, what came back, and how long it took.
fn reconnected_line(server: &str, resync: &Resync, rooms: usize, offline: Option<Duration>) -> String {
    let session = if resync.restored { "restored" } else { "new" };
    let mut line = format!(
        "~ reconnected to {server} (session {session}, {}, {} replayed)",
        plural(rooms as u64, "room"),
        plural(resync.replayed, "missed message")
    );
    if let Some(d) = offline {
        line.push_str(&format!(" after {:.2} s", d.as_secs_f64()));
    }
    if resync.losses > 0 {
        line.push_str("; some messages were lost (see above)");
    }
    line
}

/// The `~` line for a lost connection.
fn lost_line(server: &str, code: Option<u16>, reason: &str, will_retry: bool) -> String {
    let next = if will_retry { "reconnecting" } else { "not reconnecting" };
    let server = if server.is_empty() { "the node" } else { server };
    match code {
        Some(code) => format!("~ {server} closed the connection ({code} {reason}); {next}"),
        None => format!("~ connection to {server} lost: {reason}; {next}"),
    }
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// One event as one line; `None` for events that print nothing by themselves (a complete
/// resume, and the connection events the chat narrates with its own state).
pub fn format_event(ev: &Event) -> Option<String> {
    Some(match ev {
        Event::Connected { server, id, session, rooms, .. } => {
            let session = match session {
                SessionKind::New => "new",
                SessionKind::Restored => "restored",
            };
            let mut line = format!("[{server}] connected as {id} (session {session})");
            if !rooms.is_empty() {
                line.push_str(&format!(", rooms {}", room_list(rooms)));
            }
            line
        }
        Event::Message(m) => format_message(m),
        Event::UserJoined { room, user, server, .. } => format!("[{server}] #{room} + {user} joined"),
        Event::UserLeft { room, user, server, reason, .. } => {
            let how = match reason {
                LeaveReason::Left => "left".to_owned(),
                LeaveReason::Disconnected => "disconnected".to_owned(),
                LeaveReason::NodeDown => "left (node_down)".to_owned(),
                LeaveReason::Other(other) => format!("left ({other})"),
            };
            format!("[{server}] #{room} - {user} {how}")
        }
        Event::Resumed { complete: true, .. } => return None,
        Event::Resumed { room, from_seq, to_seq, .. } => format!(
            "! #{room}: resume incomplete, the room's log no longer held every missed message \
             (replayed seq {from_seq}..{to_seq})"
        ),
        Event::Gap { room, expected, got } => {
            let lost =
                if got - expected == 1 { format!("seq {expected}") } else { format!("seq {expected}..{}", got - 1) };
            format!("! #{room}: messages {lost} were lost")
        }
        Event::EpochChanged { room, old, new } => {
            format!("! #{room}: the room's log was reset (epoch {old} -> {new}); earlier messages may be lost")
        }
        Event::Error { code, message } => format!("! {code}: {message}"),
        Event::Duplicate { room, seq, .. } => format!("* #{room}: a resent message was in already (seq {seq})"),
        Event::Presence { room, users: list } => format!("* #{room} presence: {}", users(list)),
        Event::Online { users: list } => format!("* online: {}", users(list)),
        Event::Unknown(v) => v.to_string(),
        Event::Ready { .. } | Event::Disconnected { .. } | Event::ConnectFailed { .. } | Event::Closed => return None,
    })
}

/// `[node-2] #general alice: hi (seq 7)`, with `, replay` for a message sent again after a reconnect.
pub fn format_message(m: &Message) -> String {
    let replay = if m.replay { ", replay" } else { "" };
    format!("[{}] #{} {}: {} (seq {}{replay})", m.server, m.room, m.from, m.text, m.seq)
}

fn room_list(rooms: &[String]) -> String {
    rooms.iter().map(|r| format!("#{r}")).collect::<Vec<_>>().join(" ")
}

fn users(list: &[PresenceUser]) -> String {
    if list.is_empty() {
        return "nobody".into();
    }
    let shown: Vec<String> = list
        .iter()
        .map(|u| if u.server.is_empty() { u.user.clone() } else { format!("{}@{}", u.user, u.server) })
        .collect();
    format!("{} ({})", shown.join(", "), list.len())
}

#[cfg(test)]
mod tests;
