//! The connection's task: the socket half of a connection. It reads the client's frames and
//! hands them to its [`Client`], writes out the client's outbox meanwhile (also while a
//! frame's handling waits on the backbone), and ends the socket with [`close::goodbye`].

use super::{close, Client, Close, Now, Ws};
use crate::auth::Grant;
use crate::hub::ConnCommand;
use crate::outbox::{ClientIo, Outbox, Wire};
use crate::state::NodeState;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, debug_span, Instrument};

/// Serves one upgraded connection until it ends; then leaves every room it was in. `early`:
/// bytes of the client's first frames that arrived with its upgrade request.
///
/// One task per connection: it waits for the client's next frame, and for frames in its outbox.
pub async fn run(
    sock: TcpStream,
    early: Bytes,
    client_id: String,
    grant: Option<Grant>,
    peer: String,
    state: Arc<NodeState>,
) {
    let conn = state.hub.next_conn_id();
    // Debug level: a span per idle connection costs memory (its fields, formatted) for
    // nothing when only info and above are logged.
    let span = debug_span!("client", id = %client_id, node = %state.cfg.name, peer = %peer, conn);
    async move {
        state.metrics.connections_active.inc();
        state.metrics.connections_total.inc();
        let sock = Arc::new(sock);
        let wire: Arc<dyn Wire> = Arc::clone(&sock) as Arc<dyn Wire>;
        let out = Outbox::new(Some(wire), Arc::clone(&state.limits));
        let io = ClientIo { sock, out: Arc::clone(&out) };
        // Boxed: this await's state would otherwise size the connection's task for its life.
        let mut ws =
            Box::pin(WebSocketStream::from_partially_read(io, early.to_vec(), Role::Server, Some(state.ws_config)))
                .await;
        drop(early);
        let mut client = Client::new(client_id, conn, out, Arc::clone(&state), Instant::now());
        if let Some(grant) = grant {
            client.authorize(grant, now());
        }
        // The rarely-run steps are boxed: a connection's task is sized by its largest await
        // state, and an idle connection should pay only for waiting on its next frame.
        Box::pin(client.start(Instant::now())).await;
        let close = serve(&mut client, &mut ws).await;
        // The goodbye goes out while the rooms are left: a peer that stopped reading may take
        // up to CLOSE_DEADLINE to refuse it, and nobody else should wait for that.
        let goodbye = tokio::spawn(close::goodbye(ws, close).in_current_span());
        Box::pin(client.disconnect()).await;
        drop(client);
        let _ = goodbye.await;
        state.metrics.connections_active.dec();
        debug!("connection closed");
    }
    .instrument(span)
    .await
}

/// The clock, read once per batch of frames: the client state machine reads none itself.
fn now() -> Now {
    let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    Now { at: Instant::now(), unix_ms }
}

/// Why a connection stopped writing.
enum WriteStop {
    /// The hub found it too slow (close with 1008), or the node is shutting down (1012).
    Kicked,
    /// The socket failed: nothing more can be sent.
    Failed,
}

/// The close frame to send after writing stopped for `stop`, if any.
fn stopped(client: &Client, stop: WriteStop) -> Option<Close> {
    match stop {
        WriteStop::Kicked => Some(client.kicked()),
        WriteStop::Failed => None,
    }
}

/// Runs `work` to its end while writing out whatever waits in the outbox meanwhile (a resume
/// queues a whole replay), so a long step never fills this client's own queue. If writing has
/// to stop, `work` still runs to its end (dropping it halfway could leave a room half joined);
/// the reason comes back with its output. `kicked` is the connection's one wait for its kick.
async fn writing_while<F>(
    work: F,
    out: &Outbox,
    kicked: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> (F::Output, Option<WriteStop>)
where
    F: std::future::Future,
{
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            r = &mut work => return (r, None),
            _ = &mut *kicked => return (work.await, Some(WriteStop::Kicked)),
            r = out.write_backlog() => if let Err(e) = r {
                debug!(error = %e, "write failed");
                return (work.await, Some(WriteStop::Failed));
            }
        }
    }
}

/// Reads and handles the client's frames and writes out its outbox, until the connection
/// ends; returns the close frame to send, if any.
async fn serve(client: &mut Client, ws: &mut Ws) -> Option<Close> {
    let kick = client.kick().clone();
    let out = Arc::clone(client.outbox());
    // Taken once: `serve` runs once per connection. A client without one takes no commands.
    let mut commands = client.take_commands();
    // `kick` is a child of the node's shutdown token, so this one wait covers both. It is
    // made once, not on every turn of the loop (a fresh wait registers with its token
    // again each time), and a second one would cost every idle client its size.
    let mut kicked = std::pin::pin!(kick.cancelled());
    loop {
        let grace = client.grace_deadline();
        let next = tokio::select! {
            _ = &mut kicked => return stopped(client, WriteStop::Kicked),
            written = out.write_backlog() => {
                if let Err(e) = written {
                    debug!(error = %e, "write failed");
                    return stopped(client, WriteStop::Failed);
                }
                continue;
            }
            _ = sleep_until_or_never(grace) => {
                client.end_grace();
                continue;
            }
            Some(command) = next_command(&mut commands) => {
                let (close, stop) = writing_while(Box::pin(client.command(command)), &out, &mut kicked).await;
                if let Some(stop) = stop {
                    return stopped(client, stop);
                }
                match close {
                    Some(close) => return Some(close),
                    None => continue,
                }
            }
            _ = sleep_until_or_never(client.token_deadline()) => return Some(client.expired()),
            next = ws.next() => next,
        };
        // Text frames already received are handled together (consecutive messages to one
        // room are published in one backbone call); whatever else arrived after them is
        // handled next, before waiting again.
        let mut next = next;
        loop {
            match next {
                None | Some(Ok(Message::Close(_))) => return None,
                Some(Ok(Message::Text(text))) => {
                    let (rest, after) = ready_texts(ws, text.len());
                    let (_, stop) = writing_while(Box::pin(client.handle(text, rest, now())), &out, &mut kicked).await;
                    if let Some(stop) = stop {
                        return stopped(client, stop);
                    }
                    match after {
                        Some(after) => next = *after,
                        None => break,
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    client.refuse_binary();
                    break;
                }
                Some(Ok(_)) => break, // ping/pong: tungstenite answers pings itself
                Some(Err(WsError::Capacity(e))) => {
                    debug!(error = %e, "oversized frame");
                    return Some(client.oversized());
                }
                Some(Err(e)) => {
                    debug!(error = %e, "read failed");
                    return None;
                }
            }
        }
    }
}

/// The next command for this connection; never, when it takes none (or its sender is gone).
async fn next_command(commands: &mut Option<mpsc::Receiver<ConnCommand>>) -> Option<ConnCommand> {
    match commands {
        Some(rx) => match rx.recv().await {
            Some(c) => Some(c),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Most frames handled together; and most bytes of them.
const GATHER_FRAMES: usize = 64;
const GATHER_BYTES: usize = 256 * 1024;

/// What reading a WebSocket yields: a frame, an error, or `None` at its end.
type Read = Option<Result<Message, WsError>>;

/// The text frames that have already arrived after one of `first_len` bytes, without waiting
/// (up to [`GATHER_FRAMES`] / [`GATHER_BYTES`]), and the first other item read, if any. That
/// one is boxed: it is kept while the texts are handled, and unboxed it would add the size of
/// a tungstenite error to every connection's task.
fn ready_texts(ws: &mut Ws, first_len: usize) -> (Vec<Utf8Bytes>, Option<Box<Read>>) {
    let mut texts = Vec::new();
    let mut bytes = first_len;
    while texts.len() + 1 < GATHER_FRAMES && bytes < GATHER_BYTES {
        match ws.next().now_or_never() {
            Some(Some(Ok(Message::Text(t)))) => {
                bytes += t.len();
                texts.push(t);
            }
            Some(other) => return (texts, Some(Box::new(other))),
            None => break,
        }
    }
    (texts, None)
}
