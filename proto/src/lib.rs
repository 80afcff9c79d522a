//! Pieces every Tether process must agree on.
//!
//! Layout:
//! - [`id`]: client ids — the alphabet the balancer and nodes accept, and minting new ones;
//! - [`placement`]: the balancer's `hash_keys` read — id sources, and `query:NAME`
//!   parameters whose value (a room, say) is the key the rendezvous hash ranks instead of the id;
//! - [`hrw`]: rendezvous (highest random weight) ranking of nodes for a client id, with a
//!   fixed, specified hash so that every balancer process, release and machine agrees;
//! - [`wire`]: the JSON protocol between clients and nodes, both directions, encode and
//!   decode (client frames, node frames, the room message frame, error and close codes, room
//!   and display-name rules);
//! - [`sign`]: HMAC-signed client ids, so that knowing an id is not enough to forge one;
//! - [`token`]: JWT claims, room patterns, minting, and the unverified `sub` read the
//!   balancer places a client by (verification is the node's);
//! - [`query`]: reading a query parameter (ids and tokens are URL-safe: no decoding);
//! - [`logging`]: the tracing set-up shared by the binaries (`RUST_LOG`, `--log-format json`);
//! - [`limits`]: the file-descriptor budget: raising `RLIMIT_NOFILE`, the `max_connections`
//!   it allows, and the accept loops' back-off when descriptors run out;
//! - [`backbone`]: what is stored in or sent through the backbone (records, key names,
//!   frame completion), which other processes read.
#![forbid(unsafe_code)]

pub mod backbone;
pub mod hrw;
pub mod id;
pub mod limits;
pub mod logging;
pub mod placement;
pub mod query;
pub mod sign;
pub mod token;
pub mod wire;
