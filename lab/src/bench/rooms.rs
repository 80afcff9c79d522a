//! The room load of `fanout` and `fanout --steady`: `rooms × members` member clients in
//! load-generator children ([`Fleet`]), every one joined to its room, and one publisher per
//! room in this process ([`Publishers`]), connected the same way by both benchmarks.

use super::procfs;
use super::protocol::Protocol;
use super::publish::Publishers;
use super::worker::{Fleet, RoomSpec, WorkerSpec};
use super::{source_addrs, split, MAX_PER_WORKER};
use anyhow::Result;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

/// Names and wording of one [`connect`]: what differs between the benchmarks' runs.
pub struct RoomLoadNames<'a> {
    /// Room `r` is `{room_prefix}{r}`.
    pub room_prefix: &'a str,
    /// Members are `{id_tag}-m…`, publishers `{id_tag}-p…`.
    pub id_tag: &'a str,
    /// Printed before `connecting`, e.g. `tether: `.
    pub lead: &'a str,
    /// Printed after the room counts, e.g. ` through the balancer`.
    pub how: &'a str,
    /// The first load generator's index: its source addresses (see [`source_addrs`]).
    pub first_worker: usize,
}

/// Connected members and publishers.
pub struct RoomLoad {
    pub fleet: Fleet,
    pub pubs: Publishers,
    /// Members that joined.
    pub open: u64,
}

/// Connects the members (spread over `targets` by [`WorkerSpec`]'s rule) and the publishers,
/// printing progress to `out`.
pub async fn connect<W: Write>(
    protocol: Protocol,
    targets: &[SocketAddr],
    rooms: usize,
    members: usize,
    names: RoomLoadNames<'_>,
    out: &mut W,
) -> Result<RoomLoad> {
    let clients = rooms * members;
    let RoomLoadNames { room_prefix, id_tag, lead, how, first_worker } = names;
    // At least two load generators, so that receiving can use both cores.
    let per_worker = MAX_PER_WORKER.min(clients.div_ceil(2)).max(1);
    let specs: Vec<WorkerSpec> = split(clients, per_worker)
        .into_iter()
        .enumerate()
        .map(|(k, (first, count))| WorkerSpec {
            targets: targets.to_vec(),
            sources: source_addrs(first_worker + k, count),
            id_prefix: format!("{id_tag}-m"),
            first: first as u64,
            count: count as u64,
            concurrency: 32,
            rooms: Some(RoomSpec { prefix: room_prefix.to_owned(), count: rooms as u64 }),
            connect_timeout_ms: 60_000,
            protocol,
            tls: None,
        })
        .collect();
    writeln!(
        out,
        "{lead}connecting {clients} members ({rooms} rooms × {members}){how} from {} load generators; {}",
        specs.len(),
        procfs::loadavg_line()
    )?;
    let (fleet, opened) = Fleet::start(specs, Duration::from_secs(600), out).await?;
    writeln!(
        out,
        "  {} members joined, {} failed, in {:.1} s",
        opened.open,
        opened.failed,
        opened.elapsed.as_secs_f64()
    )?;
    if opened.failed > 0 {
        writeln!(out, "  first errors: {:?}", opened.errors)?;
    }
    let room_names: Vec<String> = (0..rooms).map(|r| format!("{room_prefix}{r}")).collect();
    let pubs = Publishers::connect(protocol, targets, &format!("{id_tag}-p"), &room_names).await?;
    Ok(RoomLoad { fleet, pubs, open: opened.open })
}
