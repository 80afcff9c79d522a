//! The file-descriptor budget of a server process, shared by the node and the balancer:
//!
//! - [`raise_nofile_limit`]: at start, the soft `RLIMIT_NOFILE` is raised to the hard limit,
//!   as servers commonly do (the soft limit is often 1024 while the hard one is far higher);
//! - [`ConnectionLimit::resolve`]: the default `max_connections` is what that limit allows
//!   once a reserve is held back ([`reserve`]), divided by the descriptors one connection holds
//!   (1 on a node, 2 on the balancer: a tunnel is a client socket and a node socket). An
//!   explicit value wins, and [`ConnectionLimit::exceeds_fd_limit`] says when it asks for more
//!   than the descriptors allow;
//! - [`AcceptBackoff`]: what an accept loop does when `accept` fails for want of descriptors
//!   (EMFILE, ENFILE, ENOBUFS): pause, doubling up to a second, and log rate-limited rather
//!   than once per failure, so that a process out of descriptors neither spins a core nor
//!   floods its log.

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use rlimit::Resource;

/// Most descriptors held back from client connections. They cover what a server holds besides
/// its clients: its listeners (one on a node, two on the balancer), stdio and the runtime's own
/// (epoll, its waker, the signal pipe), backbone connections (Redis: a command connection, a
/// subscriber, and one per blocking call; NATS: one), the balancer's health probes (one per
/// node at a time) and admin connections, `/metrics` scrapes and health checks, and HTTP
/// requests that have not upgraded yet (or are being answered 503).
pub const RESERVE_MAX: u64 = 256;

/// Used when the limit cannot be read (a platform without `RLIMIT_NOFILE`): the usual soft
/// default of Linux distributions.
pub const FALLBACK_NOFILE: u64 = 1024;

/// Ceiling of a derived `max_connections` (with an unlimited `RLIMIT_NOFILE` the derivation
/// would otherwise give an absurd figure). Far above what one process can hold in memory.
pub const MAX_CONNECTIONS_CEILING: usize = 100_000_000;

/// Descriptors held back from clients out of a soft limit of `nofile`: [`RESERVE_MAX`], or a
/// quarter of the limit when that is smaller (a limit of 256 keeps 64), so that even a tiny
/// limit leaves most of itself to clients.
pub fn reserve(nofile: u64) -> u64 {
    (nofile / 4).min(RESERVE_MAX)
}

/// Connections a soft limit of `nofile` allows when each holds `fds_per_connection`
/// descriptors: `(nofile - reserve(nofile)) / fds_per_connection`, at least 1 and at most
/// [`MAX_CONNECTIONS_CEILING`].
pub fn derive_max_connections(nofile: u64, fds_per_connection: u64) -> usize {
    let left = nofile.saturating_sub(reserve(nofile)) / fds_per_connection.max(1);
    usize::try_from(left).unwrap_or(usize::MAX).clamp(1, MAX_CONNECTIONS_CEILING)
}

/// The soft `RLIMIT_NOFILE` in force now (`None` where it cannot be read).
pub fn current_nofile() -> Option<u64> {
    rlimit::getrlimit(Resource::NOFILE).ok().map(|(soft, _)| soft)
}

/// What [`raise_nofile_limit`] found and did.
#[derive(Debug)]
pub struct Raised {
    /// The soft limit before.
    pub before: u64,
    /// The soft limit now.
    pub soft: u64,
    pub hard: u64,
    /// Why the soft limit could not be raised to the hard one, if it could not.
    pub error: Option<io::Error>,
}

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |v: u64| if v == rlimit::INFINITY { "unlimited".to_owned() } else { v.to_string() };
        match &self.error {
            Some(e) => write!(
                f,
                "RLIMIT_NOFILE soft limit stays {} (could not raise it to the hard limit {}: {e})",
                shown(self.soft),
                shown(self.hard)
            ),
            None if self.before == self.soft => {
                write!(f, "RLIMIT_NOFILE soft limit {} (hard {})", shown(self.soft), shown(self.hard))
            }
            None => write!(
                f,
                "RLIMIT_NOFILE soft limit raised from {} to {} (hard {})",
                shown(self.before),
                shown(self.soft),
                shown(self.hard)
            ),
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (to the kernel's `fs.nr_open` when the
/// hard limit is unlimited, as Linux refuses an unlimited soft one). An error reading the
/// limit is returned; one raising it is reported in [`Raised::error`], the limit left as it was.
pub fn raise_nofile_limit() -> io::Result<Raised> {
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE)?;
    let target = if hard == rlimit::INFINITY { nr_open().unwrap_or(1 << 20) } else { hard };
    if soft >= target {
        return Ok(Raised { before: soft, soft, hard, error: None });
    }
    Ok(match rlimit::setrlimit(Resource::NOFILE, target, hard) {
        Ok(()) => Raised { before: soft, soft: target, hard, error: None },
        Err(e) => Raised { before: soft, soft, hard, error: Some(e) },
    })
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open").ok()?.trim().parse().ok()
}

/// A process's `max_connections` and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimit {
    pub max_connections: usize,
    /// Set explicitly (config file or flag) rather than derived.
    pub configured: bool,
    /// The soft `RLIMIT_NOFILE` it was derived from or checked against (`None`: unknown, and
    /// [`FALLBACK_NOFILE`] was assumed).
    pub nofile: Option<u64>,
    /// Descriptors one connection holds: 1 on a node, 2 on the balancer.
    pub fds_per_connection: u64,
}

impl ConnectionLimit {
    /// `configured` if set, else [`derive_max_connections`] of `nofile` (or of
    /// [`FALLBACK_NOFILE`] when it is unknown).
    pub fn resolve(configured: Option<usize>, nofile: Option<u64>, fds_per_connection: u64) -> Self {
        let fds_per_connection = fds_per_connection.max(1);
        let max_connections =
            configured.unwrap_or_else(|| derive_max_connections(nofile.unwrap_or(FALLBACK_NOFILE), fds_per_connection));
        Self { max_connections, configured: configured.is_some(), nofile, fds_per_connection }
    }

    /// The soft limit the figures use.
    pub fn nofile_or_fallback(&self) -> u64 {
        self.nofile.unwrap_or(FALLBACK_NOFILE)
    }

    /// Descriptors held back from clients.
    pub fn reserve(&self) -> u64 {
        reserve(self.nofile_or_fallback())
    }

    /// What the descriptor limit allows ([`derive_max_connections`]).
    pub fn fd_allowance(&self) -> usize {
        derive_max_connections(self.nofile_or_fallback(), self.fds_per_connection)
    }

    /// An explicit value above what the descriptors allow: past the allowance, accepts may
    /// fail with EMFILE instead of clients getting 503.
    pub fn exceeds_fd_limit(&self) -> bool {
        self.configured && self.max_connections > self.fd_allowance()
    }

    /// `"configured"` or `"rlimit_nofile"`, as `/status` shows it.
    pub fn source(&self) -> &'static str {
        if self.configured {
            "configured"
        } else {
            "rlimit_nofile"
        }
    }
}

/// `max_connections=19744 (from RLIMIT_NOFILE 20000 less 256)`: the start-up log line's text.
impl fmt::Display for ConnectionLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nofile = match self.nofile {
            Some(n) => format!("RLIMIT_NOFILE {n}"),
            None => format!("RLIMIT_NOFILE unknown, assumed {FALLBACK_NOFILE}"),
        };
        let halved = if self.fds_per_connection == 2 {
            ", halved: each tunnel holds two sockets".to_owned()
        } else if self.fds_per_connection > 2 {
            format!(", divided by {} sockets per connection", self.fds_per_connection)
        } else {
            String::new()
        };
        if self.configured {
            write!(
                f,
                "max_connections={} (configured; {nofile} allows {}{halved})",
                self.max_connections,
                self.fd_allowance()
            )
        } else {
            write!(f, "max_connections={} (from {nofile} less {}{halved})", self.max_connections, self.reserve())
        }
    }
}

/// First pause after an accept error such as EMFILE; it doubles per consecutive error.
pub const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(10);
/// Longest pause between two accept attempts while they keep failing.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this interval about failing accepts.
pub const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// An accept loop's state across failures: the pause before the next attempt and when it last
/// logged. Time is passed in, so it is tested without a clock.
#[derive(Debug)]
pub struct AcceptBackoff {
    pause: Duration,
    last_log: Option<Instant>,
    /// Failures since the last log line.
    unlogged: u64,
}

/// What to do after one failed accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptFailure {
    /// Sleep this long before accepting again.
    pub pause: Duration,
    /// `Some(n)`: log this failure now; `n` earlier ones went unlogged since the last line.
    /// `None`: stay quiet (a line was written less than [`ACCEPT_LOG_INTERVAL`] ago).
    pub log: Option<u64>,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self::new()
    }
}

impl AcceptBackoff {
    pub fn new() -> Self {
        Self { pause: ACCEPT_BACKOFF_START, last_log: None, unlogged: 0 }
    }

    /// A failed accept (not a per-connection error, see [`is_per_connection`]) at `now`.
    pub fn failed(&mut self, now: Instant) -> AcceptFailure {
        let pause = self.pause;
        self.pause = (self.pause * 2).min(ACCEPT_BACKOFF_MAX);
        let due = self.last_log.is_none_or(|at| now.saturating_duration_since(at) >= ACCEPT_LOG_INTERVAL);
        let log = if due {
            self.last_log = Some(now);
            Some(std::mem::take(&mut self.unlogged))
        } else {
            self.unlogged += 1;
            None
        };
        AcceptFailure { pause, log }
    }

    /// A successful accept: the next failure pauses briefly again (the log stays rate-limited).
    pub fn succeeded(&mut self) {
        self.pause = ACCEPT_BACKOFF_START;
    }
}

/// Accept errors that concern one half-open connection, not the listener: skip it and go on
/// at once.
pub fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// `EMFILE` or `ENFILE`: this process (or the whole system) is out of file descriptors. Said
/// of a failed connect, it is no fault of the peer's.
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    // The same numbers on Linux, the BSDs and macOS.
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_holds_back_the_reserve_and_halves_for_tunnels() {
        // The figure the start-up line shows on a 20,000-descriptor machine.
        assert_eq!(reserve(20_000), 256);
        assert_eq!(derive_max_connections(20_000, 1), 19_744);
        assert_eq!(derive_max_connections(20_000, 2), 9_872);
        // Small limits keep a quarter.
        assert_eq!(reserve(256), 64);
        assert_eq!(derive_max_connections(256, 1), 192);
        assert_eq!(derive_max_connections(256, 2), 96);
        assert_eq!(reserve(1024), 256);
        assert_eq!(derive_max_connections(1024, 1), 768);
        // Degenerate limits still give one connection; unlimited ones are capped.
        assert_eq!(derive_max_connections(0, 1), 1);
        assert_eq!(derive_max_connections(3, 2), 1);
        assert_eq!(derive_max_connections(u64::MAX, 1), MAX_CONNECTIONS_CEILING);
        assert_eq!(derive_max_connections(100, 0), derive_max_connections(100, 1));
    }

    #[test]
    fn an_explicit_value_wins_and_is_flagged_when_over_the_allowance() {
        let derived = ConnectionLimit::resolve(None, Some(20_000), 1);
        assert_eq!((derived.max_connections, derived.configured, derived.source()), (19_744, false, "rlimit_nofile"));
        assert!(!derived.exceeds_fd_limit());
        assert_eq!(derived.to_string(), "max_connections=19744 (from RLIMIT_NOFILE 20000 less 256)");

        let tunnels = ConnectionLimit::resolve(None, Some(20_000), 2);
        assert_eq!(tunnels.max_connections, 9_872);
        assert!(tunnels.to_string().starts_with("max_connections=9872 (from RLIMIT_NOFILE 20000 less 256, halved"));

        let small = ConnectionLimit::resolve(Some(5), Some(20_000), 1);
        assert_eq!((small.max_connections, small.source()), (5, "configured"));
        assert!(!small.exceeds_fd_limit());
        let big = ConnectionLimit::resolve(Some(50_000), Some(20_000), 1);
        assert_eq!(big.max_connections, 50_000);
        assert!(big.exceeds_fd_limit());
        assert_eq!(big.to_string(), "max_connections=50000 (configured; RLIMIT_NOFILE 20000 allows 19744)");

        let unknown = ConnectionLimit::resolve(None, None, 1);
        assert_eq!(unknown.max_connections, 768);
        assert!(unknown.to_string().contains("unknown"), "{unknown}");
    }

    #[test]
    fn accept_backoff_doubles_to_a_second_and_logs_rate_limited() {
        let mut b = AcceptBackoff::new();
        let t0 = Instant::now();
        let first = b.failed(t0);
        assert_eq!(first, AcceptFailure { pause: ACCEPT_BACKOFF_START, log: Some(0) });
        let mut pauses = vec![first.pause];
        let mut logged = 0;
        // A minute of failures, one attempt after each pause.
        let mut now = t0 + first.pause;
        while now < t0 + Duration::from_secs(60) {
            let f = b.failed(now);
            pauses.push(f.pause);
            if f.log.is_some() {
                logged += 1;
            }
            now += f.pause;
        }
        assert_eq!(pauses[1], ACCEPT_BACKOFF_START * 2);
        assert!(pauses.iter().all(|p| *p <= ACCEPT_BACKOFF_MAX));
        assert_eq!(*pauses.last().unwrap(), ACCEPT_BACKOFF_MAX);
        // Roughly 65 attempts, about six lines (one per 10 s), not one per failure.
        assert!(pauses.len() > 60, "{}", pauses.len());
        assert!((5..=6).contains(&logged), "{logged} lines");
        // The line after a quiet stretch says how many failures it stood for.
        let f = b.failed(now + ACCEPT_LOG_INTERVAL);
        assert!(matches!(f.log, Some(n) if n > 0), "{f:?}");
        // A success resets the pause, not the log's rate limit.
        b.succeeded();
        let f = b.failed(now + ACCEPT_LOG_INTERVAL + Duration::from_millis(1));
        assert_eq!(f, AcceptFailure { pause: ACCEPT_BACKOFF_START, log: None });
    }

    #[test]
    fn raising_reaches_the_hard_limit_or_says_why_not() {
        let raised = raise_nofile_limit().expect("RLIMIT_NOFILE is readable on Linux");
        assert!(raised.soft >= raised.before);
        if raised.error.is_none() && raised.hard != rlimit::INFINITY {
            assert_eq!(raised.soft, raised.hard, "{raised}");
        }
        assert_eq!(current_nofile(), Some(raised.soft));
    }

    #[test]
    fn per_connection_errors_are_told_apart_from_exhaustion() {
        assert!(is_per_connection(&io::Error::from(io::ErrorKind::ConnectionAborted)));
        assert!(!is_per_connection(&io::Error::from_raw_os_error(24))); // EMFILE
        assert!(!is_per_connection(&io::Error::from_raw_os_error(23))); // ENFILE
        assert!(is_out_of_descriptors(&io::Error::from_raw_os_error(24)));
        assert!(!is_out_of_descriptors(&io::Error::from(io::ErrorKind::ConnectionRefused)));
    }
}
