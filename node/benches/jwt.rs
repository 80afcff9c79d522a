//! The cost of JWT auth per connect.
//!
//! - `jwt_verify/{HS256,RS256,ES256}`: [`tether_node::auth::Verifier::verify`] alone, on a
//!   token like `tether token` mints (sub, name, exp, iat, two room patterns);
//! - `connect/{none,HS256,RS256,ES256}`: one whole connect against a real node served in this
//!   process (backbone `none`, so no Redis round trip hides the difference): TCP connect,
//!   the upgrade (with the token in the query), and the `connected` frame read back; then
//!   the client goes. `none` is the same node set-up without `[auth]`.
//!
//! The RSA-2048 and P-256 keys are generated with `openssl` at start (it must be on PATH).
//!
//! `cargo bench -p tether-node --bench jwt`

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::StreamExt;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tether_node::auth::config::FileAuth;
use tether_node::auth::Verifier;
use tether_node::config::BackboneKind;
use tether_node::Config;
use tether_proto::token::{mint, Claims, MintKey};

const SECRET: &str = "bench-secret-0123456789abcdef";

struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn generate() -> Self {
        let dir = std::env::temp_dir().join(format!("tether-jwt-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let run = |args: &[&str]| {
            let ok = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .status()
                .expect("openssl on PATH (it generates the bench's keys)")
                .success();
            assert!(ok, "openssl {args:?} failed");
        };
        run(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "rsa.pem"]);
        run(&["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub.pem"]);
        run(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ec.pem"]);
        run(&["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub.pem"]);
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn claims() -> Claims {
    let now = jsonwebtoken::get_current_timestamp();
    Claims {
        sub: "u-7f3a9c2e41d84b6f".into(),
        exp: now + 3600,
        iat: Some(now),
        name: Some("Alice".into()),
        rooms: Some(vec!["general".into(), "support:*".into()]),
    }
}

/// `(alg, [auth] table, token)` for each algorithm.
fn cases(keys: &Keys) -> Vec<(&'static str, FileAuth, String)> {
    let read = |name: &str| std::fs::read(keys.path(name)).expect("key file");
    let public =
        |name: &str| FileAuth { public_key: Some(keys.path(name)), leeway_secs: Some(0), ..Default::default() };
    vec![
        (
            "HS256",
            FileAuth { hs256_secret: Some(SECRET.into()), leeway_secs: Some(0), ..Default::default() },
            mint(&claims(), &MintKey::hs256(SECRET.as_bytes()).expect("secret")).expect("mint"),
        ),
        (
            "RS256",
            public("rsa.pub.pem"),
            mint(&claims(), &MintKey::rs256_pem(&read("rsa.pem")).expect("rsa")).expect("mint"),
        ),
        (
            "ES256",
            public("ec.pub.pem"),
            mint(&claims(), &MintKey::es256_pem(&read("ec.pem")).expect("ec")).expect("mint"),
        ),
    ]
}

fn verifier(auth: FileAuth) -> Verifier {
    auth.validate(None).expect("valid [auth]").expect("a key is set")
}

/// Serves a node (backbone `none`) with `auth` on 127.0.0.1:0 in `rt`; its address.
fn serve(rt: &tokio::runtime::Runtime, name: &str, auth: Option<FileAuth>) -> std::net::SocketAddr {
    let mut cfg = Config::with_defaults(name, "redis://127.0.0.1:1/");
    cfg.backbone = BackboneKind::None;
    cfg.auth = auth.map(|a| std::sync::Arc::new(verifier(a)));
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(tether_node::run(listener, cfg, tokio_util::sync::CancellationToken::new()));
        addr
    })
}

/// One connect: upgrade, `connected` read, client gone.
async fn connect_once(url: &str) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
    let first = ws.next().await.expect("a frame").expect("read");
    assert!(first.to_text().is_ok_and(|t| t.contains("\"connected\"")), "{first:?}");
}

fn jwt(c: &mut Criterion) {
    let keys = Keys::generate();
    let cases = cases(&keys);

    let mut g = c.benchmark_group("jwt_verify");
    for (alg, auth, token) in &cases {
        let v = verifier(auth.clone());
        v.verify(token).expect("the bench token verifies");
        g.bench_function(*alg, |b| b.iter(|| v.verify(black_box(token))));
    }
    g.finish();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut targets = vec![("none", format!("ws://{}/ws?client=u-7f3a9c2e41d84b6f", serve(&rt, "plain", None)))];
    for (alg, auth, token) in &cases {
        let addr = serve(&rt, alg, Some(auth.clone()));
        targets.push((*alg, format!("ws://{addr}/ws?token={token}")));
    }
    let mut g = c.benchmark_group("connect");
    g.sample_size(30).measurement_time(Duration::from_secs(5));
    for (label, url) in &targets {
        g.bench_function(*label, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        connect_once(url).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, jwt);
criterion_main!(benches);
