//! `tether bench`: measurements that guard the hot paths.
//!
//! - [`rtt`]: one client's message round trip (client → node → Redis → node → client),
//!   straight to a node and through the balancer, so the balancer's cost is a ratio.
//!
//! `idle`, `fanout` and `proxies` are planned (issue 6).

pub mod rtt;
