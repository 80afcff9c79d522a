//! `tether-kit`: what the `tether` CLI, the lab tools and the workspace's tests share.
//!
//! - [`process`]: the one child-process guard ([`ChildProcess`]: own process group, killed
//!   on drop and on the parent's death), ready lines, graceful stops;
//! - [`api_client`]: a keep-alive HTTP/1.1 client of the nodes' server API;
//! - [`bin`]: finding `tether-node`, `tether-balancer`, `tether` (`$TETHER_BIN_DIR`, next to
//!   the executable, `PATH`) and other tools on `PATH`;
//! - [`certs`]: a development CA, the certificates it signs, and `wss://` client configs;
//! - [`ports`]: free loopback ports;
//! - [`redis_server`], [`nats_server`]: private servers on free ports, never the shared ones;
//! - [`nats_cluster`]: a private NATS JetStream cluster (N routed servers), ready for R3 streams;
//! - [`redis_cluster`]: a private Redis Cluster (masters and replicas), with the failures
//!   its tests inject: a master killed, a replica stopped, a slot migrated;
//! - [`node`], [`balancer`]: the workspace binaries as children, on free ports, restartable;
//! - [`cluster`]: all of them wired together, as `tether up` and the tests run them;
//! - [`hist`]: latency histograms and their percentiles;
//! - [`redis_client`]: a deadline-bound client (the `redis` crate) for tools reading what the
//!   nodes wrote;
//! - [`url`]: WebSocket URLs with the client id in the query;
//! - [`wait`]: [`eventually`], the one poll-until-it-holds helper of tools and tests;
//! - [`webhook_receiver`]: an in-process webhook receiver that records and checks every
//!   request, and can answer 500 or refuse connections for a while.
#![deny(unsafe_code)]

pub mod api_client;
pub mod balancer;
pub mod bin;
pub mod certs;
pub mod cluster;
mod flags;
pub mod hist;
pub mod nats_cluster;
pub mod nats_server;
pub mod node;
pub mod ports;
pub mod process;
pub mod redis_client;
pub mod redis_cluster;
pub mod redis_server;
mod server;
pub mod url;
pub mod wait;
pub mod webhook_receiver;

pub use api_client::{ApiAnswer, ApiClient};
pub use balancer::BalancerProcess;
pub use bin::{bin_path, find_on_path, BALANCER_BIN, BIN_DIR_ENV, NODE_BIN};
pub use cluster::{Cluster, ClusterLogs, ClusterOptions, DEFAULT_GRACE};
pub use nats_cluster::{NatsCluster, StreamPeers};
pub use nats_server::NatsServer;
pub use node::{NodeProcess, SpawnOptions};
pub use process::{ChildProcess, LogTarget, ReadyLine, StopOutcome, StopReport, DEFAULT_READY_TIMEOUT};
pub use redis_cluster::RedisCluster;
pub use redis_server::{Persistence, RedisServer};
pub use server::SERVER_READY_TIMEOUT;
pub use wait::{eventually, TimedOut};
pub use webhook_receiver::{Mode as ReceiverMode, Received, WebhookReceiver};
