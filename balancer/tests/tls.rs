//! TLS on the client listener, end to end: wss and https through the balancer with a test CA
//! (TLS 1.2 and 1.3, ALPN http/1.1), plain clients refused before anything reaches a node,
//! close codes and the drain's 1012 over TLS, and SIGHUP reloads of a real `tether-balancer`
//! process swapping its certificate under 50 open tunnels (and refusing a broken one).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, ProtocolVersion, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use serde_json::Value;
use tether_balancer::FileTls;
use tether_kit::certs::{client_config, CertFiles, DevCa};
use tether_kit::BalancerProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::Connector;

/// A test CA and its certificate files in a directory of their own.
struct Certs {
    ca: DevCa,
    files: CertFiles,
    _dir: tempfile::TempDir,
}

fn certs(name: &str) -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate(name).unwrap();
    let files = ca.write(dir.path()).unwrap();
    Certs { ca, files, _dir: dir }
}

/// A client config that trusts `ca_pem` only and speaks only `version`.
fn pinned(ca_pem: &str, version: &'static SupportedProtocolVersion) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

async fn tls_connect(addr: SocketAddr, config: Arc<ClientConfig>) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config).connect(ServerName::try_from(HOST).unwrap(), tcp).await
}

/// One HTTPS request on a fresh connection: the negotiated version and ALPN, status, body.
async fn https_get(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    path: &str,
) -> (Option<ProtocolVersion>, Option<Vec<u8>>, StatusCode, String) {
    within("an https request", async {
        let tls = tls_connect(addr, config).await.expect("TLS handshake");
        let (_, session) = tls.get_ref();
        let (version, alpn) = (session.protocol_version(), session.alpn_protocol().map(<[u8]>::to_vec));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let request = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header(header::HOST, HOST)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (version, alpn, status, String::from_utf8_lossy(&body).into_owned())
    })
    .await
}

/// [`wss_connect`] to `/ws{query}` with extra headers.
async fn wss_connect_with(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("wss://{HOST}:{}/ws{query}", addr.port()).into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connecting = tokio_tungstenite::client_async_tls_with_config(
        request,
        tcp,
        None,
        Some(Connector::Rustls(Arc::clone(config))),
    );
    within("a wss handshake", connecting).await.map(|(ws, _)| ws)
}

fn tls_table(files: &CertFiles) -> Option<FileTls> {
    Some(FileTls { cert: Some(files.cert.clone()), key: Some(files.key.clone()) })
}

#[tokio::test]
async fn wss_and_https_go_through_with_tls_12_and_13_and_alpn_http1() {
    let certs = certs("tls test CA");
    let nodes = three_nodes().await;
    let tls = tls_table(&certs.files);
    let balancer = start_balancer(file_nodes(&nodes), |f| f.tls = tls).await;

    // wss with the kit's client config (the safe defaults: TLS 1.3 here).
    let trust = client_config(certs.ca.cert_pem()).unwrap();
    let (mut ws, hello) = wss_for(balancer.addr, &trust, "alice").await;
    echo(&mut ws, "hello over wss").await;
    assert_eq!(hello.xff, "127.0.0.1");

    // https, and each version on its own.
    for (version, expected) in [(&TLS12, ProtocolVersion::TLSv1_2), (&TLS13, ProtocolVersion::TLSv1_3)] {
        let config = pinned(certs.ca.cert_pem(), version);
        let (got, alpn, status, body) = https_get(balancer.addr, Arc::clone(&config), "/api?client=bob").await;
        assert_eq!(got, Some(expected));
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(status, StatusCode::OK, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["client"], "bob");
        // And a WebSocket over that version.
        let (mut ws, _) = wss_for(balancer.addr, &config, &format!("carol-{expected:?}")).await;
        echo(&mut ws, "pinned").await;
    }
    // Big frames both ways (several TLS records each).
    let big = "x".repeat(200_000);
    echo(&mut ws, &big).await;
    assert!(balancer.metric("tether_balancer_tls_handshake_failures_total{reason=\"error\"}").await == 0.0);
}

/// Sends `request` in the clear to a TLS port and reads what comes back until the balancer
/// closes the connection.
async fn plain_exchange(addr: SocketAddr, request: &str) -> Vec<u8> {
    within("the balancer to close a plain connection", async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        // End of stream or a reset: either way the connection is over.
        let _ = tcp.read_to_end(&mut got).await;
        got
    })
    .await
}

#[tokio::test]
async fn plain_ws_and_http_on_the_tls_port_get_no_http_answer_and_reach_no_node() {
    let certs = certs("tls test CA");
    let nodes = three_nodes().await;
    let tls = tls_table(&certs.files);
    let balancer = start_balancer(file_nodes(&nodes), |f| f.tls = tls).await;

    let upgrade = format!(
        "GET /ws?client=alice HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        balancer.addr
    );
    let plain_get = format!("GET /api?client=alice HTTP/1.1\r\nHost: {}\r\n\r\n", balancer.addr);
    for request in [upgrade, plain_get] {
        let got = plain_exchange(balancer.addr, &request).await;
        assert!(!got.windows(5).any(|w| w == b"HTTP/"), "an HTTP answer: {:?}", String::from_utf8_lossy(&got));
    }
    // A real WebSocket client fails too.
    assert!(ws_connect(balancer.addr, "?client=alice", &[]).await.is_err());
    eventually("the failed handshakes to be counted", || async {
        balancer.metric("tether_balancer_tls_handshake_failures_total{reason=\"error\"}").await >= 3.0
    })
    .await;
    for node in &nodes {
        assert_eq!((node.requests(), node.ws_opened()), (0, 0), "{} saw a plain client", node.name);
    }
    // The listener still serves TLS clients.
    let trust = client_config(certs.ca.cert_pem()).unwrap();
    let (mut ws, _) = wss_for(balancer.addr, &trust, "alice").await;
    echo(&mut ws, "still fine").await;
}

#[tokio::test]
async fn a_tls_client_that_never_says_hello_is_cut_at_the_header_timeout() {
    let certs = certs("tls test CA");
    let nodes = three_nodes().await;
    let tls = tls_table(&certs.files);
    let balancer = start_balancer(file_nodes(&nodes), |f| {
        f.tls = tls;
        f.header_read_timeout_ms = Some(200);
    })
    .await;
    let mut tcp = TcpStream::connect(balancer.addr).await.unwrap();
    let mut got = Vec::new();
    within("the silent connection to be closed", tcp.read_to_end(&mut got)).await.unwrap();
    assert!(got.is_empty());
    eventually("the timeout to be counted", || async {
        balancer.metric("tether_balancer_tls_handshake_failures_total{reason=\"timeout\"}").await == 1.0
    })
    .await;
}

#[tokio::test]
async fn close_codes_and_the_drains_1012_reach_a_tls_client() {
    let certs = certs("tls test CA");
    let nodes = three_nodes().await;
    let tls = tls_table(&certs.files);
    let balancer = start_balancer(file_nodes(&nodes), |f| f.tls = tls).await;
    let trust = client_config(certs.ca.cert_pem()).unwrap();

    // An operator drains the node under a streaming tunnel: every frame whole, then 1012.
    let client = ids_ranking_first(&NAMES, 0, 1).remove(0);
    let request =
        format!("wss://{HOST}:{}/ws?client={client}&mode=stream", balancer.addr.port()).into_client_request().unwrap();
    let tcp = TcpStream::connect(balancer.addr).await.unwrap();
    let (mut streaming, _) = within(
        "a wss handshake",
        tokio_tungstenite::client_async_tls_with_config(request, tcp, None, Some(Connector::Rustls(trust.clone()))),
    )
    .await
    .unwrap();
    let first = hello(&mut streaming).await;
    assert_eq!(first.server, "node-1");
    // An idle tunnel on the same node.
    let (mut idle, _) = wss_for(balancer.addr, &trust, &ids_ranking_first(&NAMES, 0, 2)[1]).await;
    let (code, _, body) = http(balancer.admin, Method::POST, "/nodes/node-1/drain", &[]).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (frames, close) = read_stream_until_close(&mut streaming, 0).await;
    assert!(frames > 0);
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1012));
    assert_eq!(expect_close_code(&mut idle).await, 1012);

    // A node's own close frame (its SIGTERM's 1012) comes through intact.
    let client = ids_ranking_first(&NAMES, 1, 1).remove(0);
    let (mut ws, hello) = wss_for(balancer.addr, &trust, &client).await;
    assert_eq!(hello.server, "node-2");
    nodes[1].shut_down_gracefully();
    assert_eq!(expect_close_code(&mut ws).await, 1012);
}

// ---------------------------------------------------------------------------------------------
// SIGHUP reload of a real process

/// Where the balancer process's config says its certificate and key are.
struct LiveFiles {
    dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl LiveFiles {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("live-cert.pem"), dir.path().join("live-key.pem"));
        Self { dir, cert, key }
    }

    /// Replaces the files with a leaf of `ca` (written beside, then renamed over: what a
    /// certificate tool does, so a reload never reads half a file).
    fn install(&self, ca: &DevCa) {
        let leaf = ca.leaf(&tether_kit::certs::LOCAL_NAMES).unwrap();
        self.write(&self.cert, &leaf.cert_pem);
        self.write(&self.key, &leaf.key_pem);
    }

    fn write(&self, path: &Path, text: &str) {
        let tmp = self.dir.path().join("incoming.pem");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// Writes the balancer's config file (with `extra` top-level keys) and returns its path.
    fn config_file(&self, extra: &str) -> std::path::PathBuf {
        let path = self.dir.path().join("balancer.toml");
        let text = format!(
            "health_interval_ms = 100\nrise = 1\ngrace_period_ms = 1000\n{extra}\n[tls]\ncert = {:?}\nkey = {:?}\n",
            self.cert.to_str().unwrap(),
            self.key.to_str().unwrap()
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// The process's `/status` `reload` object (`Null` before any).
async fn reload_status(admin: SocketAddr) -> Value {
    let (code, _, body) = http(admin, Method::GET, "/status", &[]).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["reload"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_certificate_under_50_open_tunnels_and_refuses_a_broken_one() {
    init_logging();
    let nodes = three_nodes().await;
    let (old_ca, new_ca) = (DevCa::generate("old CA").unwrap(), DevCa::generate("new CA").unwrap());
    let trusts_old = client_config(old_ca.cert_pem()).unwrap();
    let trusts_new = client_config(new_ca.cert_pem()).unwrap();
    let files = LiveFiles::new();
    files.install(&old_ca);
    let config = files.config_file("");
    let node_list: Vec<(String, SocketAddr)> = nodes.iter().map(|n| (n.name.clone(), n.addr)).collect();
    let mut balancer =
        BalancerProcess::start(&node_list, &["--config".to_owned(), config.to_str().unwrap().to_owned()])
            .await
            .unwrap();
    let (addr, admin) = (balancer.addr(), balancer.admin_addr());
    assert_eq!(reload_status(admin).await, Value::Null, "no reload yet");

    let mut tunnels = Vec::new();
    for i in 0..50 {
        let (mut ws, _) = wss_for(addr, &trusts_old, &format!("reload-{i}")).await;
        echo(&mut ws, &format!("before {i}")).await;
        tunnels.push(ws);
    }
    assert!(wss_connect(addr, Arc::clone(&trusts_new), "too-early").await.is_err(), "new CA before the reload");

    // The id comes from the query first (the default `hash_keys`).
    let header_id = [("x-client-id", "from-header")];
    let mut ws = wss_connect_with(addr, &trusts_old, "?client=from-query", &header_id).await.unwrap();
    assert_eq!(hello(&mut ws).await.client, "from-query");

    // A certificate from another CA, the header first, and SIGHUP.
    files.install(&new_ca);
    files.config_file("hash_keys = [\"header\", \"query\"]");
    balancer.hangup().unwrap();
    eventually("/status to show a good reload", || async { reload_status(admin).await["ok"] == true }).await;
    let reload = reload_status(admin).await;
    assert!(reload.get("error").is_none(), "{reload}");
    let at = reload["at"].as_str().unwrap();
    assert!(at.ends_with('Z') && humantime::parse_rfc3339(at).is_ok(), "{at}");

    for (i, ws) in tunnels.iter_mut().enumerate() {
        echo(ws, &format!("after {i}")).await;
    }
    let (mut fresh, _) = wss_for(addr, &trusts_new, "after-reload").await;
    echo(&mut fresh, "new certificate").await;
    // The reloaded settings hold for new connections: the header's id wins now.
    let mut ws = wss_connect_with(addr, &trusts_new, "?client=from-query", &header_id).await.unwrap();
    assert_eq!(hello(&mut ws).await.client, "from-header");
    assert!(wss_connect(addr, Arc::clone(&trusts_old), "old-trust").await.is_err(), "old CA after the reload");

    // A broken certificate: the reload is refused, the second certificate stays.
    files.write(&files.cert, "-----BEGIN CERTIFICATE-----\nbroken\n");
    balancer.hangup().unwrap();
    eventually("/status to show a failed reload", || async { reload_status(admin).await["ok"] == false }).await;
    let reload = reload_status(admin).await;
    let error = reload["error"].as_str().unwrap_or_else(|| panic!("no error in {reload}"));
    assert!(error.contains(files.cert.to_str().unwrap()), "{error}");
    let (mut still, _) = wss_for(addr, &trusts_new, "after-failed-reload").await;
    echo(&mut still, "second certificate").await;
    assert!(wss_connect(addr, Arc::clone(&trusts_old), "old-trust-2").await.is_err());
    for (i, ws) in tunnels.iter_mut().enumerate() {
        echo(ws, &format!("still {i}")).await;
    }
    let (code, _, metrics) = http(admin, Method::GET, "/metrics", &[]).await;
    assert_eq!(code, StatusCode::OK);
    for line in [
        "tether_balancer_config_reloads_total{result=\"ok\"} 1",
        "tether_balancer_config_reloads_total{result=\"failed\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    drop(tunnels);
    balancer.terminate().unwrap();
    assert!(balancer.wait_exit(Duration::from_secs(10)).await.unwrap().is_some_and(|s| s.success()));
}
