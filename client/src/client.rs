//! The app's side: [`Client`], a cheap cloneable handle that sends commands to the
//! connection task and reads what it shares (stats, status, rooms and positions; the types
//! both sides use are in `shared`).

use crate::config::{ClientConfig, ConfigError};
use crate::driver::Driver;
use crate::error::Error;
use crate::event::Event;
use crate::order::Position;
use crate::shared::{Command, Shared, Status, View};
use crate::stats::{Stats, StatsSnapshot};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tether_proto::wire::{validate_name, validate_room, RawJson};
use tokio::sync::{mpsc, oneshot, watch};

/// Commands queued to the connection task before `Client` methods start waiting.
const COMMAND_QUEUE: usize = 256;

/// A handle on a reconnecting Tether client. Clone it freely; the connection task stops
/// after [`Client::close`] or when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    cmds: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl Client {
    /// Validates `cfg`, spawns the connection task on the current Tokio runtime (panics
    /// outside one, like `tokio::spawn`) and returns the handle and the event stream. The
    /// first attempt starts at once; watch for [`Event::Connected`] or call
    /// [`Client::wait_ready`].
    ///
    /// The event channel holds `cfg.event_buffer` events. When it is full the client stops
    /// reading from the socket until the app catches up — nothing is dropped, and the node
    /// eventually closes a client that stays behind (1008), after which the client
    /// reconnects and resumes. Commands keep working meanwhile, but a `join` completes only
    /// once its `user_joined` is read, so read events concurrently with awaiting commands.
    pub fn start(cfg: ClientConfig) -> Result<(Client, mpsc::Receiver<Event>), ConfigError> {
        let cfg = cfg.normalise()?;
        let (ev_tx, ev_rx) = mpsc::channel(cfg.event_buffer);
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let shared = Arc::new(Shared {
            stats: Stats::default(),
            status: watch::Sender::new(Status::Connecting { attempt: 1 }),
            view: Mutex::new(View { id: cfg.client_id.clone(), name: cfg.name.clone(), rooms: BTreeMap::new() }),
        });
        let driver = Driver::new(cfg, Arc::clone(&shared), cmd_rx, ev_tx);
        tokio::spawn(driver.run());
        Ok((Client { cmds: cmd_tx, shared }, ev_rx))
    }

    /// Joins `room`. Resolves when the node confirms with this client's own `user_joined`
    /// (the room is live for it then), or with the node's error. While disconnected the
    /// join is remembered and made on the next connection.
    pub async fn join(&self, room: &str) -> Result<(), Error> {
        check_room(room)?;
        self.request(|reply| Command::Join(room.to_string(), reply)).await
    }

    /// Leaves `room` and forgets its position. Resolves once the `leave` is written (or at
    /// once when disconnected: a restored session is told on the next connection).
    pub async fn leave(&self, room: &str) -> Result<(), Error> {
        check_room(room)?;
        self.request(|reply| Command::Leave(room.to_string(), reply)).await
    }

    /// Sends a text message to `room`; see [`Client::send_message`], which this is with
    /// no `data`.
    pub async fn send(&self, room: &str, text: &str) -> Result<(), Error> {
        self.send_message(room, Outgoing::text(text)).await.map(drop)
    }

    /// Sends a message to `room` and returns its `msg_id`. Resolves once the message is
    /// queued and written to the socket (or queued for the next connection, if the write
    /// failed); the message itself comes back as an [`Event::Message`] like everyone
    /// else's, carrying that `msg_id`. Until then it is *unconfirmed*: after a reconnect it
    /// is resent with the same `msg_id`, in order, and the node publishes it at most once.
    ///
    /// Fails with [`Error::NotConnected`] unless the client is [`Status::Ready`] (nothing is
    /// queued then: the app decides), [`Error::NotJoined`], [`Error::TooLarge`] for a frame
    /// over `max_message_bytes`, and [`Error::TooManyUnconfirmed`] when `max_unconfirmed`
    /// messages (or `max_unconfirmed_bytes`) already wait for their confirmation.
    pub async fn send_message(&self, room: &str, msg: Outgoing) -> Result<String, Error> {
        check_room(room)?;
        let (tx, rx) = oneshot::channel();
        let cmd = Command::Send { room: room.to_string(), text: msg.text, data: msg.data, reply: tx };
        self.cmds.send(cmd).await.map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Sets the display name, now (when connected) and on every later new session.
    pub async fn set_name(&self, name: &str) -> Result<(), Error> {
        validate_name(name).map_err(|e| Error::InvalidName { name: name.to_string(), reason: e.message })?;
        self.request(|reply| Command::SetName(name.to_string(), reply)).await
    }

    /// Asks who is in `room`; the answer arrives as [`Event::Presence`].
    pub async fn presence(&self, room: &str) -> Result<(), Error> {
        check_room(room)?;
        self.request(|reply| Command::Presence(room.to_string(), reply)).await
    }

    /// Asks who is connected anywhere; the answer arrives as [`Event::Online`].
    pub async fn online(&self) -> Result<(), Error> {
        self.request(Command::Online).await
    }

    /// Closes the connection (normal closure, 1000) and stops the client for good. Resolves
    /// once the socket is closed; the event stream then ends with [`Event::Closed`].
    pub async fn close(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Command::Close(tx)).await.is_err() {
            return Ok(()); // already stopped
        }
        let _ = rx.await;
        Ok(())
    }

    /// The client id in use: the configured one, or the one the server minted.
    pub fn id(&self) -> Option<String> {
        self.shared.view().id.clone()
    }

    /// The display name the client sets on each new session.
    pub fn name(&self) -> Option<String> {
        self.shared.view().name.clone()
    }

    /// The rooms the app is in (or joining), each with the last message delivered.
    pub fn rooms(&self) -> BTreeMap<String, Option<Position>> {
        self.shared.view().rooms.clone()
    }

    /// The last message of `room` delivered to the app.
    pub fn position(&self, room: &str) -> Option<Position> {
        self.shared.view().rooms.get(room).cloned().flatten()
    }

    /// Messages sent and not yet confirmed (each is resent after a reconnect).
    pub fn unconfirmed(&self) -> usize {
        usize::try_from(self.shared.stats.unconfirmed.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Where the connection stands now.
    pub fn status(&self) -> Status {
        self.shared.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.shared.status.subscribe()
    }

    /// Waits until the client is [`Status::Ready`]; [`Error::Closed`] if it stops first.
    /// Wrap it in a timeout: without `max_attempts` the client never gives up.
    pub async fn wait_ready(&self) -> Result<(), Error> {
        let mut rx = self.shared.status.subscribe();
        let status =
            rx.wait_for(|s| matches!(s, Status::Ready { .. } | Status::Closed)).await.map_err(|_| Error::Closed)?;
        match *status {
            Status::Closed => Err(Error::Closed),
            _ => Ok(()),
        }
    }

    async fn request(&self, make: impl FnOnce(oneshot::Sender<Result<(), Error>>) -> Command) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(make(tx)).await.map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }
}

/// What [`Client::send_message`] sends: a text, JSON `data`, or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    text: String,
    data: Option<RawJson>,
}

impl Outgoing {
    /// A text message.
    pub fn text(text: impl Into<String>) -> Self {
        Self { text: text.into(), data: None }
    }

    /// A message whose payload is `data` (members get it as `data`, `text` empty).
    pub fn data(data: &serde_json::Value) -> Self {
        Self::text("").with_data(data)
    }

    /// A message whose payload is `json`, kept byte for byte (key order, number forms);
    /// [`Error::InvalidData`] unless it is one JSON value.
    pub fn raw_data(json: &str) -> Result<Self, Error> {
        Self::text("").with_raw_data(json)
    }

    /// Adds `data` to the message.
    pub fn with_data(mut self, data: &serde_json::Value) -> Self {
        // A `Value` always serialises, and its text always parses back.
        self.data = serde_json::value::to_raw_value(data).ok().map(RawJson);
        self
    }

    /// Adds `json`, as written, to the message; [`Error::InvalidData`] unless it is one
    /// JSON value.
    pub fn with_raw_data(mut self, json: &str) -> Result<Self, Error> {
        self.data = Some(RawJson::parse(json).map_err(|e| Error::InvalidData(e.to_string()))?);
        Ok(self)
    }
}

fn check_room(room: &str) -> Result<(), Error> {
    validate_room(room).map_err(|e| Error::InvalidRoom { room: room.to_string(), reason: e.message })
}
