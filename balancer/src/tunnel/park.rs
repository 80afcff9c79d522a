//! Parking a tunnel for an upgrade: the meeting point of the running tunnels and a hand-off
//! under way ([`crate::upgrade`]). A movable tunnel watches the park signal; when it fires, its
//! copy stops with its [`Flow`] exact, and it offers duplicates of its sockets with that flow
//! (a [`TunnelRecord`]); the hand-off answers with a [`Verdict`]: taken by the new process, or
//! copy on. Here rather than in `upgrade` so that the tunnel needs nothing of the hand-off
//! itself (the upgrade module drives this one, never the other way round).

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Flow, Movable};
use crate::frames::FrameState;

/// One tunnel as it travels: both sockets, the bytes in flight each way, and where the
/// node→client stream stands between frames.
#[derive(Debug)]
pub struct TunnelRecord {
    pub client: OwnedFd,
    pub node: OwnedFd,
    pub to_node: Bytes,
    pub to_client: Bytes,
    pub frames: FrameState,
    pub websocket: bool,
    pub client_id: String,
    pub node_name: String,
    pub peer: SocketAddr,
}

/// The meeting point of the tunnels and an upgrade under way: the park signal every movable
/// tunnel watches, where parked tunnels offer themselves, and how many may still do so.
#[derive(Debug, Default)]
pub(crate) struct Tunnels {
    /// Fired when a hand-off starts; replaced by a fresh one when it fails.
    park: Mutex<CancellationToken>,
    /// Open while a hand-off collects tunnels.
    offers: Mutex<Option<mpsc::UnboundedSender<Offer>>>,
    /// Movable tunnels running (or being set up) that have not offered themselves.
    live: AtomicUsize,
}

/// One movable tunnel not yet offered; counted in [`Tunnels`] while it lives.
#[derive(Debug)]
pub(crate) struct Live(Arc<Tunnels>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A parked tunnel's offer: duplicates of its sockets and its flow, and where to answer.
#[derive(Debug)]
pub(crate) struct Offer {
    pub record: TunnelRecord,
    pub reply: oneshot::Sender<Verdict>,
}

/// The answer to a parked tunnel.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// The new process has it: let go of the sockets (this process's descriptors only).
    Taken,
    /// Copy on, watching this park signal (`None`: never park again).
    Resume(Option<CancellationToken>),
}

impl Tunnels {
    pub fn live(self: &Arc<Self>) -> Live {
        self.live.fetch_add(1, Ordering::AcqRel);
        Live(Arc::clone(self))
    }

    pub fn park_signal(&self) -> CancellationToken {
        self.park.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Offers a parked tunnel to the hand-off and waits for the verdict. The tunnel keeps its
    /// own sockets meanwhile, so whatever happens to the hand-off it can copy on.
    #[allow(clippy::too_many_arguments)]
    pub async fn offer(
        &self,
        client: &TcpStream,
        node: &TcpStream,
        flow: &Flow,
        websocket: bool,
        movable: &Movable,
        peer: SocketAddr,
        live: Option<Live>,
    ) -> Verdict {
        let (Ok(client_fd), Ok(node_fd)) = (client.as_fd().try_clone_to_owned(), node.as_fd().try_clone_to_owned())
        else {
            // Out of descriptors: this one stays.
            return Verdict::Resume(None);
        };
        let record = TunnelRecord {
            client: client_fd,
            node: node_fd,
            to_node: flow.to_node.clone(),
            to_client: flow.to_client.clone(),
            frames: flow.frames.state(),
            websocket,
            client_id: movable.client_id.to_string(),
            node_name: movable.node.to_string(),
            peer,
        };
        let (reply, verdict) = oneshot::channel();
        let sent = match &*self.offers.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(offers) => offers.send(Offer { record, reply }).is_ok(),
            None => false,
        };
        // Only once the offer is queued: the hand-off ends when none is live and none queued.
        drop(live);
        if !sent {
            // No hand-off under way (it ended before this tunnel parked): stay here.
            return Verdict::Resume(None);
        }
        verdict.await.unwrap_or(Verdict::Resume(None))
    }

    /// Opens the hand-off and fires the park signal.
    pub(crate) fn begin(&self) -> mpsc::UnboundedReceiver<Offer> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.offers.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        self.park.lock().unwrap_or_else(PoisonError::into_inner).cancel();
        rx
    }

    /// Closes the hand-off; after a failure, arms a fresh park signal for the next attempt
    /// (once: a second call keeps the fresh one, which resumed tunnels may already hold).
    pub(crate) fn end(&self, ok: bool) {
        *self.offers.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let mut park = self.park.lock().unwrap_or_else(PoisonError::into_inner);
        if !ok && park.is_cancelled() {
            *park = CancellationToken::new();
        }
    }

    pub(crate) fn quiet(&self) -> bool {
        self.live.load(Ordering::Acquire) == 0
    }
}
