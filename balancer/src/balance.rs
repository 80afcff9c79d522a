//! How a connection's node is chosen among the usable ones: plain rendezvous hashing
//! (`balance = "hrw"`, the default) or rendezvous hashing with bounded loads
//! (`balance = "bounded"`).
//!
//! Under `bounded`, a connection goes to the first node in the client's HRW order whose load,
//! with this connection added, stays within `ceil(load_factor × mean)`, the mean taken over the
//! usable nodes and counting the connection being placed: `(total + 1) / n`. Since
//! `load_factor ≥ 1`, the bound times `n` is at least the new total, so some node always fits.
//! The load is this balancer's own count of open upstream connections per node (its tunnels,
//! plus plain HTTP requests in flight): several balancers each bound their own share.
//!
//! The choice is made for every client connection, on the hot path: one pass over the nodes
//! for the loads and one HRW pass (`tether_proto::hrw::best`), no allocation. The bound is in
//! integers (the factor is kept in thousandths) so that a mean that is exactly a whole number
//! is not rounded up by a floating-point error.
//!
//! Called by [`crate::pool::Pool`] (`pick`, `pick_except`, `/route`) and by the paced
//! rebalance ([`crate::rebalance`]), which asks where a client already placed would go.

use tether_proto::hrw;

/// `load_factor` when the file does not set one.
pub const DEFAULT_LOAD_FACTOR: f64 = 1.25;
/// Largest accepted `load_factor`: far above it the bound never binds; it catches a typo.
pub const MAX_LOAD_FACTOR: f64 = 1000.0;

/// The choice policy (`balance`, `load_factor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// The best-ranked usable node, whatever its load.
    #[default]
    Hrw,
    /// The best-ranked usable node within the load bound; the factor in thousandths.
    Bounded { factor_milli: u64 },
}

impl Balance {
    pub const NAMES: [&'static str; 2] = ["hrw", "bounded"];

    /// From the file's (or the flags') `balance` and `load_factor`: `Err((field, reason))`.
    pub fn from_settings(balance: Option<&str>, load_factor: Option<f64>) -> Result<Self, (&'static str, String)> {
        let factor = load_factor.unwrap_or(DEFAULT_LOAD_FACTOR);
        // Checked whatever the mode: a wrong value is a mistake even where it is unused.
        if !factor.is_finite() || !(1.0..=MAX_LOAD_FACTOR).contains(&factor) {
            return Err(("load_factor", format!("{factor} is outside 1.0..={MAX_LOAD_FACTOR}")));
        }
        match balance.unwrap_or("hrw") {
            "hrw" => Ok(Self::Hrw),
            // In range, so the cast is exact.
            "bounded" => Ok(Self::Bounded { factor_milli: (factor * 1000.0).round() as u64 }),
            other => Err(("balance", format!("{other:?} is not one of {}", Self::NAMES.join(", ")))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hrw => "hrw",
            Self::Bounded { .. } => "bounded",
        }
    }

    /// The factor, for `/status` (`None` under `hrw`).
    pub fn load_factor(self) -> Option<f64> {
        match self {
            Self::Hrw => None,
            Self::Bounded { factor_milli } => Some(factor_milli as f64 / 1000.0),
        }
    }
}

/// The connection being placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placing {
    /// A new one: the total grows by one.
    New,
    /// One already open on this node (a paced rebalance asks where it would go now): it is
    /// taken off that node's load and placed again, so the total stays.
    Moving(usize),
}

/// Most connections a node may hold once `placed` connections are spread over `nodes`
/// usable ones: `ceil(factor × placed / nodes)`.
pub fn capacity(factor_milli: u64, placed: u64, nodes: usize) -> u64 {
    let nodes = nodes.max(1) as u64;
    factor_milli.saturating_mul(placed).div_ceil(1000 * nodes)
}

/// The node for `client` among `names` for which `usable` holds, `load` giving each node's
/// open connections.
pub fn choose<S: AsRef<str>>(
    names: &[S],
    client: &str,
    balance: Balance,
    placing: Placing,
    usable: impl Fn(usize) -> bool,
    load: impl Fn(usize) -> u64,
) -> Option<usize> {
    let Balance::Bounded { factor_milli } = balance else {
        return hrw::best(names, client, usable);
    };
    let own = |i: usize| {
        let l = load(i);
        if placing == Placing::Moving(i) {
            l.saturating_sub(1)
        } else {
            l
        }
    };
    let (mut nodes, mut total) = (0usize, 0u64);
    for i in (0..names.len()).filter(|&i| usable(i)) {
        nodes += 1;
        total += own(i);
    }
    if nodes == 0 {
        return None;
    }
    let cap = capacity(factor_milli, total + 1, nodes);
    // Some node always fits (see the module's note); the fallback only guards against loads
    // that changed between the two passes.
    hrw::best(names, client, |i| usable(i) && own(i) < cap).or_else(|| hrw::best(names, client, usable))
}

/// `rebalance_per_sec` when the file does not set one.
pub const DEFAULT_REBALANCE_PER_SEC: f64 = 10.0;
/// Largest accepted `rebalance_per_sec`: beyond it, pacing means nothing; it catches a typo.
pub const MAX_REBALANCE_PER_SEC: f64 = 100_000.0;

/// The rebalance policy (`rebalance`, `rebalance_per_sec`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Rebalance {
    /// A returning node gets new connections only.
    #[default]
    Off,
    /// A returning node takes back the clients that rank it first, this many per second.
    Paced { per_sec: f64 },
}

impl Rebalance {
    pub const NAMES: [&'static str; 2] = ["off", "paced"];

    /// From the file's (or the flags') `rebalance` and `rebalance_per_sec`:
    /// `Err((field, reason))`.
    pub fn from_settings(rebalance: Option<&str>, per_sec: Option<f64>) -> Result<Self, (&'static str, String)> {
        let per_sec = per_sec.unwrap_or(DEFAULT_REBALANCE_PER_SEC);
        if !per_sec.is_finite() || per_sec <= 0.0 || per_sec > MAX_REBALANCE_PER_SEC {
            return Err((
                "rebalance_per_sec",
                format!("{per_sec} must be greater than 0 and at most {MAX_REBALANCE_PER_SEC}"),
            ));
        }
        match rebalance.unwrap_or("off") {
            "off" => Ok(Self::Off),
            "paced" => Ok(Self::Paced { per_sec }),
            other => Err(("rebalance", format!("{other:?} is not one of {}", Self::NAMES.join(", ")))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Paced { .. } => "paced",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

    fn bounded(f: f64) -> Balance {
        Balance::from_settings(Some("bounded"), Some(f)).unwrap()
    }

    #[test]
    fn settings_are_checked_and_default_to_hrw() {
        assert_eq!(Balance::from_settings(None, None), Ok(Balance::Hrw));
        assert_eq!(bounded(1.25), Balance::Bounded { factor_milli: 1250 });
        assert_eq!(Balance::from_settings(Some("bounded"), None), Ok(Balance::Bounded { factor_milli: 1250 }));
        for bad in [0.5, 0.999, f64::NAN, f64::INFINITY, 1e9] {
            let e = Balance::from_settings(Some("bounded"), Some(bad)).unwrap_err();
            assert_eq!(e.0, "load_factor", "{bad}");
        }
        assert_eq!(Balance::from_settings(Some("ring"), None).unwrap_err().0, "balance");
    }

    #[test]
    fn capacity_is_an_exact_ceiling() {
        assert_eq!(capacity(1250, 60, 3), 25, "1.25 × 20 is 25, not 26");
        assert_eq!(capacity(1250, 61, 3), 26);
        assert_eq!(capacity(1000, 3, 3), 1);
        assert_eq!(capacity(1000, 4, 3), 2);
        assert_eq!(capacity(1250, 1, 3), 1);
        assert_eq!(capacity(1100, 1, 0), 2, "no node: treated as one");
    }

    #[test]
    fn hrw_ignores_load_and_bounded_moves_past_a_full_node() {
        let id = "someone";
        let rank = hrw::rank(&NODES, id);
        let loads = |full: usize| move |i: usize| if i == full { 10 } else { 0 };
        assert_eq!(choose(&NODES, id, Balance::Hrw, Placing::New, |_| true, loads(rank[0])), Some(rank[0]));
        assert_eq!(choose(&NODES, id, bounded(1.25), Placing::New, |_| true, loads(rank[0])), Some(rank[1]));
        // Empty: the first choice.
        assert_eq!(choose(&NODES, id, bounded(1.25), Placing::New, |_| true, |_| 0), Some(rank[0]));
        // Not usable is never chosen.
        assert_eq!(choose(&NODES, id, bounded(1.25), Placing::New, |i| i == rank[2], |_| 5), Some(rank[2]));
        assert_eq!(choose(&NODES, id, bounded(1.25), Placing::New, |_| false, |_| 0), None);
    }

    #[test]
    fn filling_with_ids_that_prefer_one_node_never_passes_the_bound() {
        // Every id ranks node-1 first: found by trying (as `tether_tests::id_ranked` does).
        let ids: Vec<String> =
            (0..).map(|i| format!("c{i}")).filter(|id| hrw::rank(&NODES, id)[0] == 0).take(200).collect();
        for f in [1.0, 1.1, 1.25, 2.0] {
            let mut loads = [0u64; 3];
            for (k, id) in ids.iter().enumerate() {
                let l = loads;
                let i = choose(&NODES, id, bounded(f), Placing::New, |_| true, |i| l[i]).unwrap();
                loads[i] += 1;
                let placed = k as u64 + 1;
                let cap = capacity((f * 1000.0) as u64, placed, 3);
                assert!(loads.iter().all(|&l| l <= cap), "factor {f}, after {placed}: {loads:?} > {cap}");
            }
            assert!(loads[0] >= loads[1] && loads[0] >= loads[2], "the preferred node is the fullest: {loads:?}");
        }
    }

    #[test]
    fn a_moving_connection_is_placed_as_if_it_left_first() {
        let id = "mover";
        let rank = hrw::rank(&NODES, id);
        // On its second choice; its first holds as many as the bound allows with it counted.
        let mut loads = [0u64; 3];
        loads[rank[0]] = 4;
        loads[rank[1]] = 4;
        loads[rank[2]] = 4;
        // 12 in all, cap ceil(1.25 × 12 / 3) = 5: the first choice has room for one more.
        let l = loads;
        let moving = Placing::Moving(rank[1]);
        assert_eq!(choose(&NODES, id, bounded(1.25), moving, |_| true, |i| l[i]), Some(rank[0]));
        loads[rank[0]] = 5;
        loads[rank[1]] = 3;
        let l = loads;
        assert_eq!(choose(&NODES, id, bounded(1.25), moving, |_| true, |i| l[i]), Some(rank[1]), "stays");
    }

    #[test]
    fn settings_are_checked_and_default_to_off() {
        assert_eq!(Rebalance::from_settings(None, None), Ok(Rebalance::Off));
        assert_eq!(Rebalance::from_settings(Some("paced"), None), Ok(Rebalance::Paced { per_sec: 10.0 }));
        assert_eq!(Rebalance::from_settings(Some("paced"), Some(2.5)), Ok(Rebalance::Paced { per_sec: 2.5 }));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e9] {
            assert_eq!(Rebalance::from_settings(Some("paced"), Some(bad)).unwrap_err().0, "rebalance_per_sec");
        }
        assert_eq!(Rebalance::from_settings(Some("eager"), None).unwrap_err().0, "rebalance");
    }
}
