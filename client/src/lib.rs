//! Tether's reconnecting WebSocket client.
//!
//! A [`Client`] keeps one logical session alive across any number of connections: when a
//! node dies or drains, it reconnects (through the balancer, which routes it to a live node),
//! keeps its client id, gets its rooms back — restored by the node or re-joined — and asks
//! for everything it missed with one `resume`. Messages are de-duplicated and ordered by
//! `(epoch, seq)`, so the app sees every room's messages once, in order; what it could not
//! see (gaps, lost logs) is reported, never hidden. [`StatsSnapshot`] counts it all, for
//! `tether chaos` and `tether bench` to judge.
//!
//! Layout:
//! - [`config`]: [`ClientConfig`], its defaults and validation;
//! - `client`: the [`Client`] handle the app holds;
//! - `shared`: what the handle and the connection task share: [`Status`], the session view,
//!   the commands;
//! - `driver`: the connection task — connect, serve, back off — and, in `driver::frames`,
//!   what it does with each node frame (handshake, re-sync, delivery);
//! - `outbox`: the task's queue of events to the app;
//! - `pending`: the messages sent and not yet confirmed, each with its `msg_id`, resent
//!   after a reconnect;
//! - [`event`]: what the app receives ([`Event`], [`Message`]); the frames themselves are
//!   encoded and decoded by `tether_proto::wire`;
//! - `order`: per-room de-duplication, gap and epoch detection ([`Position`]);
//! - `backoff`: the reconnect delay schedule;
//! - `stats`: the counters behind [`StatsSnapshot`];
//! - [`error`]: [`Error`] of commands, [`ConfigError`] of configurations.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tether_client::{Client, ClientConfig, Event};
//! let mut cfg = ClientConfig::new("ws://127.0.0.1:8080/ws");
//! cfg.name = Some("alice".into());
//! let (client, mut events) = Client::start(cfg)?;
//! let c = client.clone();
//! tokio::spawn(async move {
//!     c.join("general").await?;
//!     c.send("general", "hi").await
//! });
//! while let Some(ev) = events.recv().await {
//!     match ev {
//!         Event::Message(m) => println!("#{} {}: {}", m.room, m.from, m.text),
//!         Event::Closed => break,
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod backoff;
mod client;
pub mod config;
mod driver;
pub mod error;
pub mod event;
mod order;
mod outbox;
mod pending;
mod shared;
mod stats;

pub use client::{Client, Outgoing};
pub use config::ClientConfig;
pub use error::{ConfigError, Error};
pub use event::{Event, LeaveReason, Message, PresenceUser, Session, UPGRADE_REFUSED};
pub use order::Position;
pub use shared::Status;
pub use stats::StatsSnapshot;
