//! The node's per-message hot path, minus the network: decode the client's frame
//! (`wire::decode`), build the frame head once (`MessageHead::json_prefix`), complete it as the
//! publish script would (`seq`, `epoch`), and offer it to 1,000 local members of the room
//! (`Hub::deliver`: gate check, queue bounds, a push of one shared `Utf8Bytes`).
//!
//! Members are their connections' bounded send queues (`Outbox`). They are drained (and their byte budgets
//! released, as the writer task would) *between* timed iterations, so every iteration
//! delivers to 1,000 members with room in their queues and no one is kicked as slow.
//!
//! `cargo bench -p tether-node --bench fanout`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::FutureExt;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tether_node::hub::{Gate, Hub, Member, Outbox};
use tether_node::metrics::Metrics;
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
}

fn room(members: usize) -> Room {
    let hub = Hub::new(1024);
    let mut queues = Vec::with_capacity(members);
    for conn in 0..members as u64 {
        let out = Outbox::new(1024, 1 << 20);
        hub.add(ROOM, conn, Member { out: Arc::clone(&out), kick: CancellationToken::new() }, Gate::open());
        queues.push(out);
    }
    Room { hub, metrics: Metrics::new(), queues }
}

/// decode → json_prefix → complete → deliver; returns how many members took the frame.
fn one_message(room: &Room, seq: u64) -> usize {
    let Ok(ClientMsg::Message { room: name, text }) = wire::decode(black_box(FRAME)) else {
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
        let batch = out.take().now_or_never().unwrap_or_default();
        out.sent(batch.iter().map(|f| f.len()).sum());
        out.recycle(batch);
    }
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("message_to_room");
    for members in [1usize, 1_000] {
        g.throughput(Throughput::Elements(members as u64));
        g.bench_with_input(BenchmarkId::new("decode_prefix_deliver", members), &members, |b, &members| {
            let mut r = room(members);
            let mut seq = 0u64;
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    seq += 1;
                    let started = Instant::now();
                    let delivered = one_message(&r, seq);
                    total += started.elapsed();
                    assert_eq!(delivered, members, "every member takes every frame");
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
        };
        b.iter(|| black_box(&head).json_prefix())
    });
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
