//! `tether chat`: a line client for people at a terminal and for scripts in a pipe.
//!
//! Each input line is a command (`/join ROOM`, `/help`, …) or a message to the current room;
//! each frame from the server is printed as one line (`[node-2] #general alice: hi (seq 7)`).
//! Nothing assumes a terminal: no prompt, no cursor tricks, stdout flushed per line.
//!
//! When the input ends, the client does not hang up at once: it waits (up to
//! [`ChatOptions::linger`]) until every request it sent has been answered — its own
//! `user_joined` for a join, its own echo for a message, the answer to `presence` — so that
//! `printf '/join g\nhi\n' | tether chat URL` prints the echo before it exits.

use crate::args::ChatArgs;
use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::Write;
use std::time::Duration;
use tether_proto::id::validate_client_id;
use tether_proto::wire::{validate_name, validate_room};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Default of [`ChatOptions::linger`].
pub const DEFAULT_LINGER: Duration = Duration::from_secs(5);

/// How long to wait for the `connected` frame before reading input anyway.
const FIRST_FRAME_WAIT: Duration = Duration::from_secs(5);
/// How long to wait for the server's close frame after ours.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What `tether chat` connects to and as whom.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub url: String,
    pub client: Option<String>,
    pub name: Option<String>,
    /// After the input ends, the longest wait for answers still outstanding.
    pub linger: Duration,
}

impl From<ChatArgs> for ChatOptions {
    fn from(a: ChatArgs) -> Self {
        Self { url: a.url, client: a.client, name: a.name, linger: DEFAULT_LINGER }
    }
}

/// How a chat session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEnd {
    /// The input ended (and answers were waited for).
    InputClosed,
    /// `/quit`.
    Quit,
    /// The server sent a close frame.
    ServerClosed { code: u16, reason: String },
    /// The connection broke without a close frame.
    Lost,
}

impl ChatEnd {
    /// Process exit code: 1 for a broken connection, 0 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Lost => 1,
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

/// The URL to connect to: `base`, with `client=ID` added to its query if given.
pub fn connect_url(base: &str, client: Option<&str>) -> Result<String> {
    let uri: http::Uri = base.parse().with_context(|| format!("{base:?} is not a valid URL"))?;
    match uri.scheme_str() {
        Some("ws") => {}
        Some("wss") => bail!("{base}: wss:// is not supported (this build has no TLS); use ws://"),
        _ => bail!("{base}: the URL must start with ws:// (e.g. ws://127.0.0.1:8080/ws)"),
    }
    if uri.authority().is_none() {
        bail!("{base}: the URL has no host");
    }
    let Some(id) = client else {
        return Ok(base.to_owned());
    };
    validate_client_id(id).with_context(|| format!("--client {id:?}"))?;
    let sep = match uri.query() {
        Some(q) if !q.is_empty() => "&",
        Some(_) => "",
        None if uri.path() == "/" && !base.ends_with('/') => "/?",
        None => "?",
    };
    Ok(format!("{base}{sep}client={id}"))
}

/// What one input line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Send this frame; `answered` says whether the server will answer it (for lingering).
    Send {
        frame: Value,
        answered: bool,
    },
    Join(String),
    Leave(Option<String>),
    Switch(String),
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
        return Input::Send { frame: json!({ "text": line }), answered: true };
    };
    if command.starts_with('/') {
        // `//text` sends the message `/text`.
        return Input::Send { frame: json!({ "text": command }), answered: true };
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
        "presence" if rest.is_empty() => Input::Send { frame: json!({ "type": "presence" }), answered: true },
        "presence" => match room_arg("/presence [ROOM]") {
            Ok(room) => Input::Send { frame: json!({ "type": "presence", "room": room }), answered: true },
            Err(e) => Input::Complaint(e),
        },
        "name" if rest.is_empty() => Input::Complaint("usage: /name NAME".into()),
        "name" => match validate_name(rest) {
            Ok(()) => Input::Send { frame: json!({ "type": "set_name", "name": rest }), answered: false },
            Err(e) => Input::Complaint(e.to_string()),
        },
        "online" => Input::Send { frame: json!({ "type": "online" }), answered: true },
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

/// Client-side state: which rooms we are in and what we still expect an answer to.
#[derive(Debug, Default)]
struct Session {
    /// Our client id, from the `connected` frame: tells our own echoes from others' frames.
    me: Option<String>,
    current: Option<String>,
    rooms: Vec<String>,
    /// Requests sent whose answer has not arrived; the input's end waits for zero.
    outstanding: usize,
}

impl Session {
    fn answered(&mut self) {
        self.outstanding = self.outstanding.saturating_sub(1);
    }

    /// Updates state from a server frame.
    fn observe(&mut self, v: &Value) {
        let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
        let mine = self.me.is_some() && v.get("id").and_then(Value::as_str) == self.me.as_deref();
        match kind {
            "connected" => {
                self.me = v.get("id").and_then(Value::as_str).map(str::to_owned);
                for room in v.get("rooms").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
                    if !self.rooms.iter().any(|r| r == room) {
                        self.rooms.push(room.to_owned());
                    }
                }
                if self.current.is_none() {
                    self.current = self.rooms.first().cloned();
                }
            }
            "user_joined" | "message" if mine => self.answered(),
            "user_left" if mine && v.get("reason").and_then(Value::as_str) == Some("left") => self.answered(),
            "presence" | "online" | "error" => self.answered(),
            _ => {}
        }
    }
}

/// Runs one chat session: connects, then reads `input` lines and prints to `out` until the
/// input ends, `/quit`, or the server closes.
pub async fn run<W: Write>(opts: ChatOptions, mut input: mpsc::Receiver<String>, out: &mut W) -> Result<ChatEnd> {
    let url = connect_url(&opts.url, opts.client.as_deref())?;
    if let Some(name) = &opts.name {
        validate_name(name).with_context(|| format!("--name {name:?}"))?;
    }
    let (ws, _response) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let (mut sink, mut stream) = ws.split();
    let mut session = Session::default();
    if let Some(name) = &opts.name {
        sink.send(Message::text(json!({"type":"set_name","name":name}).to_string()))
            .await
            .context("sending set_name")?;
    }

    // The first frame is `connected`: wait for it before reading input, so that our id is
    // known (it tells our own echoes from others' frames) and the transcript starts with it.
    if let Ok(frame) = timeout(FIRST_FRAME_WAIT, stream.next()).await {
        if let Some(end) = on_frame(frame, &mut session, out)? {
            return Ok(end);
        }
    }

    let mut input_open = true;
    let mut linger_until: Option<Instant> = None;
    loop {
        if !input_open && session.outstanding == 0 {
            close(&mut sink, &mut stream).await;
            return Ok(ChatEnd::InputClosed);
        }
        tokio::select! {
            line = input.recv(), if input_open => {
                let Some(line) = line else {
                    input_open = false;
                    linger_until = Some(Instant::now() + opts.linger);
                    continue;
                };
                let frames = match handle_input(&mut session, &line, out)? {
                    Handled::Send(frames) => frames,
                    Handled::Quit => {
                        close(&mut sink, &mut stream).await;
                        return Ok(ChatEnd::Quit);
                    }
                };
                for frame in frames {
                    sink.send(Message::text(frame.to_string())).await.context("sending")?;
                }
            }
            frame = stream.next() => {
                if let Some(end) = on_frame(frame, &mut session, out)? {
                    return Ok(end);
                }
            }
            _ = sleep_until(linger_until.unwrap_or_else(Instant::now)), if linger_until.is_some() => {
                writeln!(out, "* gave up waiting for {} answer(s)", session.outstanding)?;
                session.outstanding = 0;
            }
        }
    }
}

type WsResult = Result<Message, tokio_tungstenite::tungstenite::Error>;

/// Prints one frame from the server and updates the session; `Some` when the connection ended.
fn on_frame<W: Write>(frame: Option<WsResult>, session: &mut Session, out: &mut W) -> Result<Option<ChatEnd>> {
    let end = match frame {
        Some(Ok(Message::Text(text))) => {
            match serde_json::from_str::<Value>(&text) {
                Ok(v) => {
                    session.observe(&v);
                    writeln!(out, "{}", format_frame(&v, &text))?;
                }
                Err(_) => writeln!(out, "{text}")?,
            }
            None
        }
        Some(Ok(Message::Binary(data))) => {
            writeln!(out, "* binary frame, {} bytes", data.len())?;
            None
        }
        Some(Ok(Message::Close(frame))) => {
            let (code, reason) =
                frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
            writeln!(out, "* connection closed by the server: {code} {reason}")?;
            Some(ChatEnd::ServerClosed { code, reason })
        }
        // Ping, pong: tungstenite answers pings itself.
        Some(Ok(_)) => None,
        Some(Err(e)) => {
            writeln!(out, "! connection lost: {e}")?;
            Some(ChatEnd::Lost)
        }
        None => {
            writeln!(out, "! connection lost")?;
            Some(ChatEnd::Lost)
        }
    };
    out.flush()?;
    Ok(end)
}

enum Handled {
    Send(Vec<Value>),
    Quit,
}

/// Applies one input line to the session; returns the frames to send.
fn handle_input<W: Write>(session: &mut Session, line: &str, out: &mut W) -> Result<Handled> {
    let mut frames = Vec::new();
    match parse_line(line) {
        Input::Nothing => {}
        Input::Quit => return Ok(Handled::Quit),
        Input::Help => writeln!(out, "{HELP}")?,
        Input::Complaint(msg) => writeln!(out, "! {msg}")?,
        Input::Join(room) => {
            frames.push(json!({"type":"join","room":room}));
            session.outstanding += 1;
            if !session.rooms.contains(&room) {
                session.rooms.push(room.clone());
            }
            session.current = Some(room);
        }
        Input::Leave(room) => match room.or_else(|| session.current.clone()) {
            None => writeln!(out, "! no current room; /leave ROOM")?,
            Some(room) => {
                frames.push(json!({"type":"leave","room":room}));
                session.outstanding += 1;
                session.rooms.retain(|r| *r != room);
                if session.current.as_ref() == Some(&room) {
                    session.current = session.rooms.last().cloned();
                    if let Some(now) = &session.current {
                        writeln!(out, "* current room is now #{now}")?;
                    }
                }
            }
        },
        Input::Switch(room) => {
            if !session.rooms.contains(&room) {
                writeln!(out, "* not joined to #{room}: messages will fail until /join {room}")?;
            }
            writeln!(out, "* current room is now #{room}")?;
            session.current = Some(room);
        }
        Input::Send { mut frame, answered } => {
            // Frames parsed without a type are room messages; `presence` without a room
            // means the current one. Both need a current room.
            let needs_room =
                frame.get("type").is_none() || (frame["type"] == "presence" && frame.get("room").is_none());
            if needs_room {
                let Some(room) = session.current.clone() else {
                    writeln!(out, "! no current room: /join ROOM first")?;
                    out.flush()?;
                    return Ok(Handled::Send(frames));
                };
                if frame.get("type").is_none() {
                    frame["type"] = json!("message");
                }
                frame["room"] = json!(room);
            }
            frames.push(frame);
            if answered {
                session.outstanding += 1;
            }
        }
    }
    out.flush()?;
    Ok(Handled::Send(frames))
}

async fn close<S, R>(sink: &mut S, stream: &mut R)
where
    S: futures_util::Sink<Message> + Unpin,
    R: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let bye = Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() }));
    if sink.send(bye).await.is_err() {
        return;
    }
    // Wait briefly for the server's close frame so the close handshake completes.
    let _ = timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = stream.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// One server frame as one line; `raw` is printed when the frame is not one we know.
pub fn format_frame(v: &Value, raw: &str) -> String {
    format_known(v).unwrap_or_else(|| raw.to_owned())
}

fn format_known(v: &Value) -> Option<String> {
    let s = |key: &str| v.get(key).and_then(Value::as_str);
    let kind = s("type")?;
    Some(match kind {
        "connected" => {
            let mut line =
                format!("[{}] connected as {} (session {})", s("server")?, s("id")?, s("session").unwrap_or("?"));
            if let Some(name) = s("name") {
                line.push_str(&format!(", name {name}"));
            }
            let rooms = room_list(v.get("rooms"));
            if !rooms.is_empty() {
                line.push_str(&format!(", rooms {rooms}"));
            }
            line
        }
        "user_joined" => format!("[{}] #{} + {} joined", s("server")?, s("room")?, s("user")?),
        "user_left" => {
            let reason = s("reason").unwrap_or("?");
            let how = match reason {
                "left" => "left".to_owned(),
                "disconnected" => "disconnected".to_owned(),
                other => format!("left ({other})"),
            };
            format!("[{}] #{} - {} {how}", s("server")?, s("room")?, s("user")?)
        }
        "message" => {
            let seq = v.get("seq").and_then(Value::as_u64)?;
            let replay = if v.get("replay").and_then(Value::as_bool) == Some(true) { ", replay" } else { "" };
            format!("[{}] #{} {}: {} (seq {seq}{replay})", s("server")?, s("room")?, s("from")?, s("text")?)
        }
        "resumed" => {
            let complete = match v.get("complete").and_then(Value::as_bool) {
                Some(true) => "complete",
                Some(false) => "INCOMPLETE: messages were lost",
                None => "?",
            };
            format!("* #{} resumed seq {}..{} ({complete})", s("room")?, v.get("from_seq")?, v.get("to_seq")?)
        }
        "presence" => format!("* #{} presence: {}", s("room")?, users(v.get("users")?)?),
        "online" => format!("* online: {}", users(v.get("users")?)?),
        "error" => format!("! {}: {}", s("code")?, s("message").unwrap_or("")),
        _ => return None,
    })
}

fn room_list(rooms: Option<&Value>) -> String {
    rooms
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|r| format!("#{r}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn users(list: &Value) -> Option<String> {
    let list = list.as_array()?;
    if list.is_empty() {
        return Some("nobody".into());
    }
    let shown: Vec<String> = list
        .iter()
        .map(|u| {
            let user = u.get("user").and_then(Value::as_str).unwrap_or("?");
            match u.get("server").and_then(Value::as_str) {
                Some(server) => format!("{user}@{server}"),
                None => user.to_owned(),
            }
        })
        .collect();
    Some(format!("{} ({})", shown.join(", "), list.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(text: &str) -> String {
        let v: Value = serde_json::from_str(text).expect("json");
        format_frame(&v, text)
    }

    #[test]
    fn frames_print_as_one_readable_line() {
        assert_eq!(
            fmt(
                r#"{"type":"message","room":"general","from":"alice","id":"a","text":"hi","server":"node-2","timestamp":1,"seq":7,"epoch":"e"}"#
            ),
            "[node-2] #general alice: hi (seq 7)"
        );
        assert_eq!(
            fmt(r#"{"type":"message","room":"g","from":"a","id":"a","text":"x","server":"n","seq":3,"replay":true}"#),
            "[n] #g a: x (seq 3, replay)"
        );
        assert_eq!(
            fmt(r#"{"type":"user_joined","room":"general","user":"bob","id":"b","server":"node-1"}"#),
            "[node-1] #general + bob joined"
        );
        assert_eq!(
            fmt(r#"{"type":"user_left","room":"g","user":"bob","id":"b","server":"n","reason":"node_down"}"#),
            "[n] #g - bob left (node_down)"
        );
        assert_eq!(
            fmt(r#"{"type":"error","code":"not_in_room","message":"join g first"}"#),
            "! not_in_room: join g first"
        );
        assert_eq!(
            fmt(r#"{"type":"presence","room":"g","users":[{"id":"a","user":"alice","server":"n1"}]}"#),
            "* #g presence: alice@n1 (1)"
        );
        assert_eq!(
            fmt(
                r#"{"type":"connected","server":"node-1","id":"x1","session":"restored","name":null,"rooms":["a","b"]}"#
            ),
            "[node-1] connected as x1 (session restored), rooms #a #b"
        );
    }

    #[test]
    fn unknown_or_incomplete_frames_print_raw() {
        let raw = r#"{"type":"surprise","x":1}"#;
        assert_eq!(fmt(raw), raw);
        let raw = r#"{"type":"message","room":"g"}"#;
        assert_eq!(fmt(raw), raw);
    }

    #[test]
    fn lines_become_commands_or_messages() {
        assert_eq!(parse_line("/join general"), Input::Join("general".into()));
        assert_eq!(parse_line("/leave"), Input::Leave(None));
        assert_eq!(parse_line("/quit"), Input::Quit);
        assert_eq!(parse_line("   "), Input::Nothing);
        assert!(matches!(parse_line("/join"), Input::Complaint(_)));
        assert!(matches!(parse_line("/join a b"), Input::Complaint(_)));
        assert!(matches!(parse_line("/frobnicate"), Input::Complaint(_)));
        assert_eq!(parse_line("hello there"), Input::Send { frame: json!({"text":"hello there"}), answered: true });
        assert_eq!(parse_line("//slash"), Input::Send { frame: json!({"text":"/slash"}), answered: true });
        assert_eq!(
            parse_line("/name Alice Smith"),
            Input::Send { frame: json!({"type":"set_name","name":"Alice Smith"}), answered: false }
        );
    }

    #[test]
    fn messages_need_a_current_room() {
        let mut session = Session::default();
        let mut out = Vec::new();
        let Handled::Send(frames) = handle_input(&mut session, "hi", &mut out).expect("ok") else {
            panic!("not a send");
        };
        assert!(frames.is_empty());
        assert!(String::from_utf8_lossy(&out).contains("no current room"));
        let Handled::Send(frames) = handle_input(&mut session, "/join g", &mut out).expect("ok") else {
            panic!("not a send");
        };
        assert_eq!(frames, [json!({"type":"join","room":"g"})]);
        let Handled::Send(frames) = handle_input(&mut session, "hi", &mut out).expect("ok") else {
            panic!("not a send");
        };
        assert_eq!(frames, [json!({"type":"message","room":"g","text":"hi"})]);
        assert_eq!(session.outstanding, 2);
    }

    #[test]
    fn urls_are_checked_and_get_the_client_id() {
        assert_eq!(connect_url("ws://h:1/ws", Some("alice")).expect("ok"), "ws://h:1/ws?client=alice");
        assert_eq!(connect_url("ws://h:1/ws?x=1", Some("alice")).expect("ok"), "ws://h:1/ws?x=1&client=alice");
        assert_eq!(connect_url("ws://h:1", Some("a")).expect("ok"), "ws://h:1/?client=a");
        assert_eq!(connect_url("ws://h:1/ws", None).expect("ok"), "ws://h:1/ws");
        assert!(connect_url("http://h:1/ws", None).is_err());
        assert!(connect_url("not a url", None).is_err());
        assert!(connect_url("ws://h:1/ws", Some("bad id")).is_err());
    }
}
