//! The front door's view of the client: the PROXY protocol header that names it, the
//! forwarded headers a node receives, and the per-IP limits on its address. Real mock nodes,
//! a real balancer on port 0, raw TCP clients writing the PROXY header themselves.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::MaybeTlsStream;

fn v1(src: &str, port: u16) -> Vec<u8> {
    let family = if src.contains(':') { "TCP6" } else { "TCP4" };
    let dst = if src.contains(':') { "::1" } else { "127.0.0.1" };
    format!("PROXY {family} {src} {dst} {port} 8080\r\n").into_bytes()
}

fn v2(src: &str) -> Vec<u8> {
    let src: SocketAddr = src.parse().unwrap();
    let dst: SocketAddr = if src.is_ipv4() { "127.0.0.1:8080" } else { "[::1]:8080" }.parse().unwrap();
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap()
}

/// Connects and writes `prefix` as separate writes (each its own segment with NODELAY).
async fn connect_with_prefix(addr: SocketAddr, prefix: &[&[u8]]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    for chunk in prefix {
        stream.write_all(chunk).await.unwrap();
        stream.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    stream
}

/// A plain GET after `prefix`; `None` when the balancer closed the connection unanswered.
async fn get_after(
    addr: SocketAddr,
    prefix: &[&[u8]],
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(StatusCode, HeaderMap, String)> {
    within("a request after a PROXY header", async {
        let stream = connect_with_prefix(addr, prefix).await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(conn);
        let mut req = Request::builder().method(Method::GET).uri(path).header(header::HOST, "front.door");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.ok()?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.ok()?.to_bytes();
        Some((parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
}

/// The mock node's JSON answer to a GET after `prefix`.
async fn node_view(addr: SocketAddr, prefix: &[&[u8]], headers: &[(&str, &str)]) -> Value {
    let (code, _, body) = get_after(addr, prefix, "/x?client=carol", headers).await.expect("the balancer answered");
    assert_eq!(code, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// A WebSocket after `prefix`; returns the node's hello.
async fn ws_after(addr: SocketAddr, prefix: &[&[u8]], client: &str) -> Result<(Ws, Hello), String> {
    let stream = connect_with_prefix(addr, prefix).await;
    let request = format!("ws://{addr}/ws?client={client}").into_client_request().unwrap();
    let (mut ws, _) =
        within("websocket handshake", tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)))
            .await
            .map_err(|e| e.to_string())?;
    let hello = hello(&mut ws).await;
    Ok((ws, hello))
}

async fn refused(lb: &Balancer, reason: &str) -> f64 {
    lb.metric(&format!("tether_balancer_proxy_protocol_refused_total{{reason=\"{reason}\"}}")).await
}

/// Writes `bytes` and expects the balancer to close without answering a byte.
async fn expect_closed_unanswered(addr: SocketAddr, bytes: &[u8]) {
    let mut stream = connect_with_prefix(addr, &[bytes]).await;
    let mut got = Vec::new();
    // EOF or a reset: either way nothing came back.
    let _ = within("the balancer to close", stream.read_to_end(&mut got)).await;
    assert!(got.is_empty(), "answered: {:?}", String::from_utf8_lossy(&got));
}

#[tokio::test]
async fn proxy_v1_and_v2_headers_name_the_client_for_http_and_websocket() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |f| f.proxy_protocol = Some("any".into())).await;

    let view = node_view(lb.addr, &[&v1("203.0.113.7", 51000)], &[]).await;
    assert_eq!(view["real_ip"], "203.0.113.7");
    assert_eq!(view["xff"], "203.0.113.7");
    assert_eq!(view["proto"], "http");

    let view = node_view(lb.addr, &[&v2("[2001:db8::42]:4000")], &[("x-forwarded-for", "10.9.9.9")]).await;
    assert_eq!(view["real_ip"], "2001:db8::42");
    assert_eq!(view["xff"], "10.9.9.9, 2001:db8::42", "appended at the end");

    for (prefix, ip) in [(v1("198.51.100.9", 1234), "198.51.100.9"), (v2("192.0.2.77:999"), "192.0.2.77")] {
        let (mut ws, hello) = ws_after(lb.addr, &[&prefix], "ws-client").await.unwrap();
        assert_eq!((hello.real_ip.as_str(), hello.xff.as_str(), hello.proto.as_str()), (ip, ip, "http"));
        echo(&mut ws, "through the tunnel").await;
    }
    // v1 UNKNOWN and v2 LOCAL: the socket's peer.
    let view = node_view(lb.addr, &[b"PROXY UNKNOWN\r\n"], &[]).await;
    assert_eq!(view["real_ip"], "127.0.0.1");
    let local = ppp::v2::Builder::new(0x20, 0x00).build().unwrap();
    assert_eq!(node_view(lb.addr, &[&local], &[]).await["real_ip"], "127.0.0.1");
}

#[tokio::test]
async fn a_header_split_across_writes_still_names_the_client() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |f| f.proxy_protocol = Some("any".into())).await;
    let h1 = v1("203.0.113.8", 40000);
    let view = node_view(lb.addr, &[&h1[..4], &h1[4..17], &h1[17..h1.len() - 1], &h1[h1.len() - 1..]], &[]).await;
    assert_eq!(view["real_ip"], "203.0.113.8");
    let h2 = v2("203.0.113.9:1");
    let (_ws, hello) = ws_after(lb.addr, &[&h2[..7], &h2[7..16], &h2[16..]], "split").await.unwrap();
    assert_eq!(hello.real_ip, "203.0.113.9");
}

#[tokio::test]
async fn missing_garbage_and_wrong_version_headers_are_closed_before_any_node_sees_them() {
    let nodes = three_nodes().await;
    let v1_only = start_balancer(file_nodes(&nodes), |f| f.proxy_protocol = Some("v1".into())).await;
    let v2_only = start_balancer(file_nodes(&nodes), |f| f.proxy_protocol = Some("v2".into())).await;

    // Required but missing: a client talking HTTP (or WebSocket) straight away.
    expect_closed_unanswered(v1_only.addr, b"GET /x?client=a HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(ws_connect(v2_only.addr, "?client=a", &[]).await.is_err());
    // Garbage that starts like a header.
    expect_closed_unanswered(v1_only.addr, b"PROXY TCP4 not an address\r\nGET / HTTP/1.1\r\n\r\n").await;
    expect_closed_unanswered(v1_only.addr, b"PROXY \x00\x01\x02\r\n").await;
    // The other version.
    expect_closed_unanswered(v1_only.addr, &[v2("192.0.2.1:1"), b"GET / HTTP/1.1\r\n\r\n".to_vec()].concat()).await;
    expect_closed_unanswered(v2_only.addr, &[v1("192.0.2.1", 1), b"GET / HTTP/1.1\r\n\r\n".to_vec()].concat()).await;

    let seen: usize = nodes.iter().map(|n| n.requests() + n.ws_opened()).sum();
    assert_eq!(seen, 0, "a node saw a connection that had no valid header");
    assert_eq!(refused(&v1_only, "missing").await, 1.0);
    assert_eq!(refused(&v2_only, "missing").await, 1.0);
    assert_eq!(refused(&v1_only, "invalid").await, 2.0);
    assert_eq!(refused(&v1_only, "wrong_version").await, 1.0);
    assert_eq!(refused(&v2_only, "wrong_version").await, 1.0);

    // The right version still works on each.
    assert_eq!(node_view(v1_only.addr, &[&v1("192.0.2.5", 5)], &[]).await["real_ip"], "192.0.2.5");
    assert_eq!(node_view(v2_only.addr, &[&v2("192.0.2.6:6")], &[]).await["real_ip"], "192.0.2.6");
}

#[tokio::test]
async fn off_serves_headerless_clients_and_sets_the_forwarded_headers() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;
    let spoof = [
        ("x-real-ip", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-for", "10.1.1.1"),
        ("x-forwarded-for", "10.2.2.2"),
    ];
    let view = node_view(lb.addr, &[], &spoof).await;
    assert_eq!(view["headers"]["x-real-ip"], serde_json::json!(["127.0.0.1"]), "replaced, not added");
    assert_eq!(view["headers"]["x-forwarded-proto"], serde_json::json!(["http"]));
    assert_eq!(view["xff"], "10.1.1.1, 10.2.2.2, 127.0.0.1");

    let (mut ws, _) = ws_connect(lb.addr, "?client=plain", &spoof).await.unwrap();
    let h = hello(&mut ws).await;
    assert_eq!((h.real_ip.as_str(), h.proto.as_str()), ("127.0.0.1", "http"));
    assert_eq!(h.xff, "10.1.1.1, 10.2.2.2, 127.0.0.1");

    // With `off`, a PROXY header is not read as one: it is the start of a bad request, and
    // no node sees it.
    let before: usize = nodes.iter().map(MockNode::requests).sum();
    let mut stream =
        connect_with_prefix(lb.addr, &[&v1("203.0.113.7", 1), b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"]).await;
    let mut got = Vec::new();
    let _ = within("the balancer to answer or close", stream.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 4"), "{got}");
    assert_eq!(nodes.iter().map(MockNode::requests).sum::<usize>(), before);
}

#[tokio::test]
async fn per_ip_connection_cap_answers_429_and_a_closed_connection_frees_its_slot() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |f| {
        f.proxy_protocol = Some("v1".into());
        f.max_connections_per_ip = Some(2);
    })
    .await;
    let from = |ip: &str| v1(ip, 1000);
    let (first, _) = ws_after(lb.addr, &[&from("192.0.2.10")], "a").await.unwrap();
    let (_second, _) = ws_after(lb.addr, &[&from("192.0.2.10")], "b").await.unwrap();

    let (code, headers, body) = get_after(lb.addr, &[&from("192.0.2.10")], "/x?client=c", &[]).await.unwrap();
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    let err = ws_after(lb.addr, &[&from("192.0.2.10")], "c").await.unwrap_err();
    assert!(err.contains("429"), "{err}");

    // Other addresses are not affected.
    let (_other, hello) = ws_after(lb.addr, &[&from("192.0.2.11")], "d").await.unwrap();
    assert_eq!(hello.real_ip, "192.0.2.11");
    assert_eq!(lb.metric("tether_balancer_per_ip_refused_total{reason=\"connections\"}").await, 2.0);
    assert_eq!(lb.metric("tether_balancer_requests_total{kind=\"ws\",code=\"429\"}").await, 1.0);
    assert_eq!(lb.metric("tether_balancer_requests_total{kind=\"http\",code=\"429\"}").await, 1.0);
    let status = lb.status().await;
    assert_eq!(status["max_connections_per_ip"], 2);
    assert_eq!(status["per_ip_entries"], 2);
    assert_eq!(lb.metric("tether_balancer_per_ip_entries").await, 2.0);

    // A closed tunnel gives its slot back.
    drop(first);
    eventually("the closed tunnel's slot to be free", || async {
        get_after(lb.addr, &[&from("192.0.2.10")], "/x?client=e", &[])
            .await
            .is_some_and(|(code, _, _)| code == StatusCode::OK)
    })
    .await;
}

#[tokio::test]
async fn per_ip_connect_rate_answers_429_until_the_next_token() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |f| {
        f.proxy_protocol = Some("v2".into());
        // One token every 100 s, a burst of two.
        f.connect_rate_per_ip = Some(0.01);
        f.connect_burst_per_ip = Some(2);
    })
    .await;
    let from = |ip: &str| v2(&format!("{ip}:1000"));
    for _ in 0..2 {
        assert_eq!(node_view(lb.addr, &[&from("198.51.100.20")], &[]).await["real_ip"], "198.51.100.20");
    }
    let (code, headers, _) = get_after(lb.addr, &[&from("198.51.100.20")], "/x", &[]).await.unwrap();
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = headers[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((2..=100).contains(&retry), "Retry-After {retry}: until the next token, at most 100 s");
    // Rate limiting is by address: another one has its own bucket; an IPv6 /64 is one address.
    assert_eq!(node_view(lb.addr, &[&from("198.51.100.21")], &[]).await["real_ip"], "198.51.100.21");
    node_view(lb.addr, &[&from("[2001:db8:0:1::1]")], &[]).await;
    node_view(lb.addr, &[&from("[2001:db8:0:1::2]")], &[]).await;
    let (code, _, _) = get_after(lb.addr, &[&from("[2001:db8:0:1::3]")], "/x", &[]).await.unwrap();
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS, "same /64, same bucket");
    assert_eq!(lb.metric("tether_balancer_per_ip_refused_total{reason=\"rate\"}").await, 2.0);
    assert_eq!(lb.status().await["connect_burst_per_ip"], 2);
}
