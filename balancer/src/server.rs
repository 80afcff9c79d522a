//! Accept loops for the two listeners and the per-connection hyper set-up.
//!
//! This is where a client connection begins: accepted, counted against its listener's cap
//! (beyond it on the client listener: answered 503 with `Retry-After` and closed; on the admin
//! listener: closed at once). On the client listener it then meets, in this order: its PROXY
//! header when `proxy_protocol` requires one (missing or bad: closed, nothing reaches a node),
//! the per-IP limits on the real address (over: 429 with `Retry-After`), the TLS handshake
//! when the live config has `[tls]` (see [`crate::tls`]), and hyper, which serves it until it
//! ends, is upgraded into a tunnel, or shutdown asks it to finish its in-flight request and
//! close. An accept error never ends
//! the loop: per-connection errors are skipped, resource exhaustion (EMFILE and friends) backs
//! off, doubling up to a second, and is logged at most once per 10 s.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;

use tether_proto::limits::{is_per_connection, AcceptBackoff};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, field, warn, Instrument};

use crate::conn::ClientConn;
use crate::metrics::Kind;
use crate::response;
use tokio_util::either::Either;

use crate::tls::{self, ClientStream};
use crate::Config;
use crate::{admin, api, per_ip, proxy, proxy_protocol, Shared};

/// Cap on concurrent admin connections: it is an operator's port, and a flood there must not
/// take file descriptors from clients.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// hyper refuses a read buffer smaller than this (its initial buffer size).
const HYPER_MIN_BUF: usize = 8192;

/// Connections the kernel queues on a listener before they are accepted (what tokio's
/// `TcpListener::bind` asks for).
const LISTEN_BACKLOG: u32 = 1024;

/// Binds a listener the way `main` wants it: with `SO_REUSEADDR` (a restarted balancer need
/// not wait for the old connections' TIME_WAIT), and with `SO_REUSEPORT` when `reuse_port`,
/// so that several balancer processes can listen on one port and the kernel spreads new
/// connections over them. That is safe because routing keeps no state: every process sends a
/// client to the same node. Must be called within a Tokio runtime.
pub fn bind_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves the client-facing listener until `shutdown` fires. Each connection reads the live
/// config once, when it is accepted: its TLS (and certificate), header limits and timeouts
/// stay those for its whole life, whatever a reload does meanwhile.
pub(crate) async fn serve_proxy(shared: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    let limit = Arc::clone(&shared.client_slots);
    // Refusals being answered at once: each holds a descriptor from the reserve for a moment,
    // so they get a quarter of it; past that a refused connection is closed unanswered.
    let answering = Arc::new(Semaphore::new(refusals_at_once(&shared)));
    let refuse = |stream: TcpStream, peer: SocketAddr| {
        shared.metrics.rejected_connections.inc();
        let Ok(permit) = Arc::clone(&answering).try_acquire_owned() else {
            debug!(%peer, "connection limit reached and too many refusals pending; closing");
            return;
        };
        debug!(%peer, "connection limit reached; answering 503");
        let accepted = Accepted::new(shared.config().clone());
        let (shared, shutdown) = (Arc::clone(&shared), shutdown.clone());
        shared.tracker.clone().spawn(
            async move {
                let mut stream = stream;
                // Even a refusal reads the PROXY header first: hyper must not take it for a
                // request.
                if read_proxy_header(&shared, &accepted, &mut stream, peer).await.is_some() {
                    let max = accepted.config.max_connections;
                    answer(&shared, &accepted, stream, move || response::at_capacity(max), shutdown).await;
                }
                drop(permit);
            }
            .instrument(tracing::debug_span!("refused", %peer)),
        );
    };
    accept_loop(&shared, listener, limit, &shutdown, "proxy", refuse, |stream, peer, permit| {
        let accepted = Accepted::new(shared.config().clone());
        let span = tracing::debug_span!("conn", peer = field::Empty, socket_peer = %peer);
        shared.tracker.spawn(
            serve_client(Arc::clone(&shared), accepted, stream, peer, permit, shutdown.clone()).instrument(span),
        );
    })
    .await;
}

/// What an accepted client connection takes from the live config when it is accepted: it
/// keeps those settings (PROXY mode, TLS certificate, header limits, timeouts) for its whole
/// life, whatever a reload does meanwhile.
struct Accepted {
    config: Arc<Config>,
    /// hyper's settings (header timeout and size).
    builder: http1::Builder,
}

impl Accepted {
    fn new(config: Arc<Config>) -> Self {
        Self { builder: http_builder(&config), config }
    }

    /// The stream hyper serves: the socket itself, or TLS over it once the handshake is done
    /// (`None`: it failed, timed out — bounded by `header_read_timeout`, as the request head
    /// that follows — or the shutdown grace ran out first; the socket closes).
    async fn stream(&self, stream: TcpStream, shared: &Shared) -> Option<ClientStream> {
        let Some(tls) = &self.config.tls else {
            return Some(Either::Left(stream));
        };
        let timeout = self.config.header_read_timeout;
        // Boxed: a handshake's state is large and lives only until it is done; a plain
        // connection's task must not carry room for it.
        let handshake = Box::pin(tls::handshake(Arc::clone(&tls.server), stream, timeout, &shared.metrics));
        tokio::select! {
            done = handshake => done.map(|tls| Either::Right(Box::new(tls))),
            _ = shared.hard_stop.cancelled() => None,
        }
    }
}

/// One client connection, in the order it meets the front door: the PROXY header (when the
/// listener requires one), the per-IP limits on the address that header names, the TLS
/// handshake (when the listener speaks TLS), then hyper until the connection ends or is
/// upgraded into a tunnel.
async fn serve_client(
    shared: Arc<Shared>,
    accepted: Accepted,
    mut stream: TcpStream,
    socket_peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let Some(peer) = read_proxy_header(&shared, &accepted, &mut stream, socket_peer).await else {
        return;
    };
    tracing::Span::current().record("peer", field::display(peer));

    let limits = per_ip::Limits::from_config(&accepted.config);
    let per_ip = if limits.any() {
        match shared.per_ip.admit(peer.ip(), limits, tokio::time::Instant::now()) {
            Ok(guard) => Some(guard),
            Err(refusal) => {
                shared.metrics.per_ip_refused(refusal.reason);
                debug!(reason = ?refusal.reason, retry_after = refusal.retry_after_secs, "per-IP limit; answering 429");
                // Answered while holding the connection's `max_connections` slot: the answer
                // is bounded by `header_read_timeout`, like any request head.
                answer(&shared, &accepted, stream, move || response::per_ip_limit(refusal), shutdown).await;
                return;
            }
        }
    } else {
        None
    };

    let Some(stream) = accepted.stream(stream, &shared).await else {
        return;
    };
    let conn = Arc::new(ClientConn { peer, socket_peer, tls: tls::is_tls(&stream), _permit: permit, _per_ip: per_ip });
    let service = {
        let shared = Arc::clone(&shared);
        service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let (shared, conn) = (Arc::clone(&shared), Arc::clone(&conn));
            async move {
                // The server API belongs to no client: any node, round robin (see `api`).
                if api::is_api(&request) && !proxy::is_upgrade(request.headers()) {
                    api::handle(shared, conn, request).await
                } else {
                    proxy::handle(shared, conn, request).await
                }
            }
        })
    };
    let connection = accepted.builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
    drive(connection, |c| c.graceful_shutdown(), shutdown, shared.hard_stop.clone()).await;
}

/// The client's real address: from the PROXY header the listener requires (`None`, counted
/// and logged, when the header is missing or bad: the caller closes the connection), else the
/// socket's peer.
async fn read_proxy_header(
    shared: &Shared,
    accepted: &Accepted,
    stream: &mut TcpStream,
    socket_peer: SocketAddr,
) -> Option<SocketAddr> {
    let mode = accepted.config.proxy_protocol;
    match proxy_protocol::read_header(stream, mode, accepted.config.header_read_timeout).await {
        Ok(named) => Some(named.unwrap_or(socket_peer)),
        Err(reason) => {
            shared.metrics.proxy_protocol_refused(reason);
            debug!(?reason, mode = mode.as_str(), "no valid PROXY header; closing");
            None
        }
    }
}

/// Serves one answer the balancer writes itself (a 503 or 429) to the connection's request,
/// counted like any answer, then closes. Over TLS the answer is only readable after a
/// handshake, which is bounded like any.
async fn answer(
    shared: &Arc<Shared>,
    accepted: &Accepted,
    stream: TcpStream,
    make: impl Fn() -> hyper::Response<response::Body> + Send + Sync + 'static,
    shutdown: CancellationToken,
) {
    let Some(stream) = accepted.stream(stream, shared).await else {
        return;
    };
    let service = {
        let shared = Arc::clone(shared);
        service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let kind = if proxy::is_upgrade(request.headers()) { Kind::ws } else { Kind::http };
            let response = make();
            shared.metrics.request(kind, response.status().as_u16());
            std::future::ready(Ok::<_, std::convert::Infallible>(response))
        })
    };
    let mut builder = accepted.builder.clone();
    builder.keep_alive(false);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    drive(connection, |c| c.graceful_shutdown(), shutdown, shared.hard_stop.clone()).await;
}

/// Serves the admin listener until `shutdown` fires.
pub(crate) async fn serve_admin(shared: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let refuse = |_stream: TcpStream, peer: SocketAddr| debug!(%peer, "admin connection limit reached; closing");
    accept_loop(&shared, listener, limit, &shutdown, "admin", refuse, |stream, peer, permit| {
        let service = {
            let shared = Arc::clone(&shared);
            service_fn(move |request| admin::handle(Arc::clone(&shared), request))
        };
        let connection = http_builder(&shared.config()).serve_connection(TokioIo::new(stream), service);
        let span = tracing::debug_span!("admin_conn", %peer);
        let (shutdown, hard_stop) = (shutdown.clone(), shared.hard_stop.clone());
        shared.tracker.spawn(
            async move {
                drive(connection, |c| c.graceful_shutdown(), shutdown, hard_stop).await;
                drop(permit);
            }
            .instrument(span),
        );
    })
    .await;
}

fn http_builder(config: &Config) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_header_size(config.max_header_bytes)
        .max_buf_size(config.max_header_bytes.max(HYPER_MIN_BUF));
    builder
}

/// How many refusals the client listener answers (503) at once: a quarter of the descriptor
/// reserve, at least one.
fn refusals_at_once(shared: &Shared) -> usize {
    usize::try_from(shared.config().connection_limit.reserve() / 4).unwrap_or(usize::MAX).max(1)
}

/// Accepts until `shutdown`; hands each connection that fits under `limit` to `serve`, and
/// each that does not to `refuse`.
async fn accept_loop(
    shared: &Shared,
    listener: TcpListener,
    limit: Arc<Semaphore>,
    shutdown: &CancellationToken,
    name: &'static str,
    mut refuse: impl FnMut(TcpStream, SocketAddr),
    mut serve: impl FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit),
) {
    let mut backoff = AcceptBackoff::new();
    // Paused while an upgrade hands over: the new process accepts on the same sockets.
    let mut accepting = shared.process.accepting.subscribe();
    loop {
        if !*accepting.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = accepting.changed() => continue,
            }
        }
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = accepting.changed() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                backoff.succeeded();
                pair
            }
            Err(e) if is_per_connection(&e) => {
                debug!(listener = name, error = %e, "accept: connection failed");
                continue;
            }
            Err(e) => {
                shared.metrics.accept_error(name);
                let failure = backoff.failed(std::time::Instant::now());
                if let Some(unlogged) = failure.log {
                    let pause_ms = failure.pause.as_millis() as u64;
                    warn!(
                        listener = name,
                        error = %e,
                        pause_ms,
                        unlogged,
                        "accept failed; backing off (logged at most every 10 s)"
                    );
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(failure.pause) => {}
                }
                continue;
            }
        };
        match Arc::clone(&limit).try_acquire_owned() {
            Ok(permit) => serve(stream, peer, permit),
            Err(_) => refuse(stream, peer),
        }
    }
}

/// Runs one connection; on shutdown lets it finish its in-flight request, and cuts it when the
/// grace period is over.
/// `graceful` is hyper's `graceful_shutdown` of the connection's concrete type.
async fn drive<C>(connection: C, graceful: fn(Pin<&mut C>), shutdown: CancellationToken, hard_stop: CancellationToken)
where
    C: Future<Output = hyper::Result<()>>,
{
    let mut connection = pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            graceful(connection.as_mut());
            tokio::select! {
                result = connection.as_mut() => result,
                _ = hard_stop.cancelled() => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        // Garbage, timeouts and hang-ups are the client's business, not an operator's.
        debug!(error = %e, "connection ended with an error");
    }
}
