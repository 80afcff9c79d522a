//! [`Quiet`]: waiting for a rare signal from inside a busy task without paying for it on
//! every wakeup of that task.
//!
//! A tunnel's task wakes for every read and every write, and `select!` then polls every
//! branch — including the ones waiting for the node to go down or be drained, or for the
//! shutdown grace to run out. Those wait on `CancellationToken`s shared by many tunnels (all
//! of a node's, or all of them), and one poll of a waiting token locks its mutex twice: per
//! message, on locks every worker thread shares. [`Quiet`] gives the signal a waker of its
//! own and polls it only once that waker has fired; any other poll costs a few atomic
//! operations on memory of the tunnel's own.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// The signal's own waker: records that the signal woke, then wakes the task.
#[derive(Debug)]
pub(crate) struct Quiet {
    /// Set by the signal's wakeup, cleared by the poll that follows it. Starts set: the first
    /// poll must reach the signal so that it registers this waker.
    woken: AtomicBool,
    /// The task to wake, as of its latest poll.
    task: AtomicWaker,
}

impl Quiet {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { woken: AtomicBool::new(true), task: AtomicWaker::new() })
    }

    /// Polls `signal` if it woke since it was last polled (or was never polled); pending
    /// otherwise. `signal` must not be polled once it has completed.
    pub fn poll<F: Future>(self: &Arc<Self>, cx: &mut Context<'_>, signal: Pin<&mut F>) -> Poll<F::Output> {
        // Registered before `woken` is read: a wakeup in between is not lost.
        self.task.register(cx.waker());
        if !self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(Arc::clone(self));
        signal.poll(&mut Context::from_waker(&waker))
    }

    /// Waits for `signal`, polling it only when it woke.
    pub fn wait<'a, F: Future>(
        self: &'a Arc<Self>,
        mut signal: Pin<&'a mut F>,
    ) -> impl Future<Output = F::Output> + 'a {
        poll_fn(move |cx| self.poll(cx, signal.as_mut()))
    }
}

impl Wake for Quiet {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;

    use tokio_util::sync::CancellationToken;

    use super::*;

    #[tokio::test]
    async fn the_signal_is_polled_only_when_it_woke() {
        let token = CancellationToken::new();
        let polls = AtomicUsize::new(0);
        let signal = pin!(async {
            let mut cancelled = pin!(token.cancelled());
            poll_fn(|cx| {
                polls.fetch_add(1, Ordering::SeqCst);
                cancelled.as_mut().poll(cx)
            })
            .await
        });
        let quiet = Quiet::new();
        let mut waiting = pin!(quiet.wait(signal));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut got = 0;
        for i in 0..100 {
            tx.send(i).unwrap();
            // Each message wakes the task; the signal is not asked again.
            tokio::select! {
                _ = waiting.as_mut() => panic!("not cancelled yet"),
                Some(_) = rx.recv() => got += 1,
            }
        }
        assert_eq!(got, 100);
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled once, to register");
        let canceller = {
            let token = token.clone();
            tokio::spawn(async move { token.cancel() })
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the signal's wakeup got through");
        canceller.await.unwrap();
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_signal_that_already_fired_completes_at_once() {
        let token = CancellationToken::new();
        token.cancel();
        let quiet = Quiet::new();
        quiet.wait(pin!(token.cancelled())).await;
    }
}
