//! The balancer's per-request routing cost: find the client id in the request
//! (`id::extract_client_id`, query first as configured by default) and pick its node by
//! rendezvous hashing (`hrw::best`) among 3, 10 and 100 nodes; and the `token` source (a
//! JWT's `sub`, decoded, not verified).
//!
//! `cargo bench -p tether-proto --bench routing`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use tether_proto::hrw;
use tether_proto::id::{extract_client_id, IdSource};

/// A realistic query string: the id is not the only parameter.
const QUERY: &str = "v=2&client=u-7f3a9c2e41d84b6f&lang=en";
/// A browser's cookie header with the session cookie in the middle.
const COOKIE: &[u8] = b"theme=dark; tether_sid=u-7f3a9c2e41d84b6f; _ga=GA1.2.3";

fn node_names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("node-{i}")).collect()
}

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("client_id");
    g.throughput(Throughput::Elements(1));
    g.bench_function("from_query", |b| {
        b.iter(|| extract_client_id(black_box(Some(QUERY)), None, None, std::iter::empty(), &IdSource::DEFAULT_ORDER))
    });
    g.bench_function("from_cookie", |b| {
        b.iter(|| extract_client_id(None, None, None, std::iter::once(black_box(COOKIE)), &IdSource::DEFAULT_ORDER))
    });
    // The token source: base64url-decode a JWT's payload and read its `sub` (unverified).
    let key = tether_proto::token::MintKey::hs256(b"bench-secret").expect("a non-empty secret");
    let claims = tether_proto::token::Claims {
        sub: "u-7f3a9c2e41d84b6f".into(),
        exp: 4_000_000_000,
        iat: Some(1_700_000_000),
        name: Some("Alice".into()),
        rooms: Some(vec!["general".into(), "support:*".into()]),
    };
    let bearer = format!("Bearer {}", tether_proto::token::mint(&claims, &key).expect("mints"));
    g.bench_function("from_token", |b| {
        b.iter(|| {
            extract_client_id(
                None,
                None,
                Some(black_box(bearer.as_bytes())),
                std::iter::empty(),
                &IdSource::DEFAULT_ORDER,
            )
        })
    });
    g.finish();

    let mut g = c.benchmark_group("hrw_best");
    g.throughput(Throughput::Elements(1));
    for n in [3usize, 10, 100] {
        let nodes = node_names(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &nodes, |b, nodes| {
            b.iter(|| hrw::best(nodes, black_box("u-7f3a9c2e41d84b6f"), |_| true))
        });
    }
    g.finish();

    // What the balancer does per upgrade: both steps, with one node marked down.
    let mut g = c.benchmark_group("extract_then_best");
    g.throughput(Throughput::Elements(1));
    for n in [3usize, 10, 100] {
        let nodes = node_names(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &nodes, |b, nodes| {
            b.iter(|| {
                let id =
                    extract_client_id(black_box(Some(QUERY)), None, None, std::iter::empty(), &IdSource::DEFAULT_ORDER)
                        .ok()
                        .flatten()
                        .unwrap_or(std::borrow::Cow::Borrowed("anonymous"));
                hrw::best(nodes, &id, |i| i != 1)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
