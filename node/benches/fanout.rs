//! The node's per-message hot path: decode the client's frame (`wire::decode`), build the
//! frame head once (`MessageHead::json_prefix`), complete it as the publish script would
//! (`seq`, `epoch`), and hand it to every local member of the room (`Hub::deliver`: gate check,
//! one WebSocket framing shared by all, the member's outbox).
//!
//! Two kinds of member:
//! - `queue`: outboxes with no socket behind them, so every frame waits in the queue (the
//!   in-process cost alone); they are emptied between timed iterations;
//! - `socket`: outboxes in front of real loopback TCP connections, so each delivery is the
//!   non-blocking write an idle client's frame costs on a node; the far ends are read empty
//!   between timed iterations, so no socket buffer fills up.
//!
//! `cargo bench -p tether-node --bench fanout`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tether_node::hub::{Gate, Hub, Member};
use tether_node::metrics::Metrics;
use tether_node::outbox::{Limits, Outbox, Wire};
use tether_proto::wire::{self, ClientMsg, MessageHead};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

const ROOM: &str = "general";
const FRAME: &str = r#"{"type":"message","room":"general","text":"hello everyone, this is a 64-byte message.."}"#;
const EPOCH: &str = "9f2c41d0a7b3";

struct Room {
    hub: Hub,
    metrics: Metrics,
    queues: Vec<Arc<Outbox>>,
    /// The clients' ends of the members' sockets (`socket` members only).
    far: Vec<std::net::TcpStream>,
    /// The node's ends: tokio must have seen each writable (its readiness is set by the
    /// reactor) before a non-blocking write is even tried.
    near: Vec<Arc<tokio::net::TcpStream>>,
    /// The runtime the members' sockets are registered with.
    _rt: Option<tokio::runtime::Runtime>,
}

fn room(members: usize, sockets: bool) -> Room {
    let hub = Hub::new(1024);
    let mut queues = Vec::with_capacity(members);
    let mut far = Vec::new();
    let mut near_ends = Vec::new();
    let rt = sockets.then(|| tokio::runtime::Builder::new_current_thread().enable_io().build().expect("runtime"));
    let _entered = rt.as_ref().map(|rt| rt.enter());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    for conn in 0..members as u64 {
        let wire: Option<Arc<dyn Wire>> = if sockets {
            let client = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
            let (near, _) = listener.accept().expect("accept");
            near.set_nodelay(true).expect("nodelay");
            near.set_nonblocking(true).expect("nonblocking");
            client.set_nonblocking(true).expect("nonblocking");
            far.push(client);
            let near = Arc::new(tokio::net::TcpStream::from_std(near).expect("register"));
            near_ends.push(Arc::clone(&near));
            Some(near as Arc<dyn Wire>)
        } else {
            None
        };
        let out = Outbox::new(wire, Limits::generous());
        hub.add(ROOM, conn, Member { out: Arc::clone(&out), kick: CancellationToken::new() }, Gate::open());
        queues.push(out);
    }
    drop(_entered);
    let r = Room { hub, metrics: Metrics::new(), queues, far, near: near_ends, _rt: rt };
    ready(&r);
    r
}

/// Lets the reactor see every member's socket writable.
fn ready(room: &Room) {
    if let Some(rt) = &room._rt {
        rt.block_on(async {
            for s in &room.near {
                s.writable().await.expect("writable");
            }
        });
    }
}

/// decode → json_prefix → complete → deliver; returns how many members took the frame.
fn one_message(room: &Room, seq: u64) -> usize {
    let Ok(ClientMsg::Message { room: name, text, .. }) = wire::decode(black_box(FRAME)) else {
        panic!("the benchmark frame decodes as a message");
    };
    let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let head = MessageHead {
        kind: "message",
        room: &name,
        from: "alice",
        id: "alice",
        text: &text,
        server: "node-1",
        timestamp,
        data: None,
        msg_id: None,
    };
    let mut frame = head.json_prefix();
    frame.push_str(&seq.to_string());
    frame.push_str(",\"epoch\":\"");
    frame.push_str(EPOCH);
    frame.push_str("\"}");
    room.hub.deliver(&name, &Utf8Bytes::from(frame), &room.metrics)
}

fn drain(room: &mut Room) {
    for out in &room.queues {
        out.take_all();
    }
    let mut buf = [0u8; 64 * 1024];
    for client in &mut room.far {
        while matches!(client.read(&mut buf), Ok(n) if n > 0) {}
    }
    ready(room);
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("message_to_room");
    // Every member took every frame into its socket, none waited in its queue.
    let written = |r: &Room| r.queues.iter().all(|q| q.queued_frames() == 0);
    for (kind, members) in [("queue", 1usize), ("queue", 1_000), ("socket", 1), ("socket", 100)] {
        g.throughput(Throughput::Elements(members as u64));
        let id = BenchmarkId::new(format!("decode_prefix_deliver_{kind}"), members);
        g.bench_with_input(id, &members, |b, &members| {
            let mut r = room(members, kind == "socket");
            let mut seq = 0u64;
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    seq += 1;
                    let started = Instant::now();
                    let delivered = one_message(&r, seq);
                    total += started.elapsed();
                    assert_eq!(delivered, members, "every member takes every frame");
                    assert!(kind == "queue" || written(&r), "sockets took every frame at once");
                    drain(&mut r);
                }
                total
            });
        });
    }
    g.finish();

    // The parts on their own, for attributing the total.
    let mut g = c.benchmark_group("parts");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode", |b| b.iter(|| wire::decode(black_box(FRAME))));
    g.bench_function("json_prefix", |b| {
        let head = MessageHead {
            kind: "message",
            room: ROOM,
            from: "alice",
            id: "alice",
            text: "hello everyone, this is a 64-byte message..",
            server: "node-1",
            timestamp: 1_764_290_000_000,
            data: None,
            msg_id: None,
        };
        b.iter(|| black_box(&head).json_prefix())
    });
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
