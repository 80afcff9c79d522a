//! End-to-end behaviour of the balancer: real mock nodes and a real balancer on port 0, real
//! HTTP and WebSocket clients.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn index_of(name: &str) -> usize {
    NAMES.iter().position(|n| *n == name).unwrap()
}

#[tokio::test]
async fn same_id_always_reaches_the_same_node_whatever_carries_it() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;
    let expected = NAMES[tether_proto::hrw::rank(&NAMES, "alice-7f3a")[0]];

    for _ in 0..3 {
        let (_ws, hello) = ws_for(lb.addr, "alice-7f3a").await;
        assert_eq!(hello.server, expected);
    }
    let (mut ws, _) = ws_connect(lb.addr, "", &[("x-client-id", "alice-7f3a")]).await.unwrap();
    assert_eq!(hello(&mut ws).await.server, expected);
    let (mut ws, _) = ws_connect(lb.addr, "", &[("cookie", "a=1; tether_sid=alice-7f3a")]).await.unwrap();
    let h = hello(&mut ws).await;
    assert_eq!((h.server.as_str(), h.client.as_str()), (expected, "alice-7f3a"));
    for _ in 0..3 {
        assert_eq!(lb.http_node("alice-7f3a").await, expected);
    }
}

#[tokio::test]
async fn ids_spread_over_all_three_nodes() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for i in 0..90 {
        *per_node.entry(lb.http_node(&format!("user-{i}")).await).or_default() += 1;
    }
    for name in NAMES {
        let n = per_node.get(name).copied().unwrap_or(0);
        assert!(n >= 15, "{name} got {n} of 90 ids: {per_node:?}");
    }
}

#[tokio::test]
async fn minted_id_comes_back_as_cookie_and_reaches_the_node_as_header() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;

    // WebSocket: the cookie rides on the 101 itself.
    let (mut ws, response) = ws_connect(lb.addr, "", &[]).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_owned();
    let id = cookie
        .strip_prefix("tether_sid=")
        .and_then(|rest| rest.strip_suffix("; Path=/; HttpOnly; SameSite=Lax"))
        .unwrap_or_else(|| panic!("unexpected cookie {cookie}"));
    assert_eq!(id.len(), 32);
    let first = hello(&mut ws).await;
    assert_eq!(first.client, id);
    assert_eq!(first.xff, "127.0.0.1");

    // Coming back with the cookie: same node, same id, no new cookie.
    let (mut ws, response) = ws_connect(lb.addr, "", &[("cookie", &format!("tether_sid={id}"))]).await.unwrap();
    assert!(!response.headers().contains_key("set-cookie"));
    assert_eq!(hello(&mut ws).await, first);

    // Plain HTTP mints too.
    let (code, headers, body) = http(lb.addr, Method::GET, "/api", &[]).await;
    assert_eq!(code, StatusCode::OK);
    let cookie = headers["set-cookie"].to_str().unwrap();
    let id = &cookie["tether_sid=".len().."tether_sid=".len() + 32];
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["client"], id);
    assert_eq!(headers["x-node"], v["server"].as_str().unwrap());
}

#[tokio::test]
async fn chosen_id_overwrites_a_client_sent_header_and_forwarded_for_is_appended() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;
    let (code, _, body) = http(
        lb.addr,
        Method::GET,
        "/api?client=alice",
        &[("x-client-id", "mallory"), ("x-forwarded-for", "203.0.113.7")],
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["client"], "alice");
    assert_eq!(v["xff"], "203.0.113.7, 127.0.0.1");
    assert_eq!(v["path"], "/api?client=alice");
}

#[tokio::test]
async fn bad_id_is_refused_with_400_before_the_upgrade() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;

    match ws_connect(lb.addr, "?client=a%20b", &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
            assert!(body.contains("client id"), "{body}");
        }
        other => panic!("expected a 400, got {other:?}"),
    }
    let long = "x".repeat(129);
    for (path, headers) in [
        (format!("/api?client={long}"), vec![]),
        ("/api".to_owned(), vec![("x-client-id", "a/b")]),
        ("/api".to_owned(), vec![("cookie", "tether_sid=<script>")]),
    ] {
        let (code, _, body) = http(lb.addr, Method::GET, &path, &headers).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{path} {headers:?}: {body}");
    }
    assert_eq!(nodes.iter().map(MockNode::requests).sum::<usize>(), 0);
    assert_eq!(lb.metric("tether_balancer_requests_total{kind=\"ws\",code=\"400\"}").await, 1.0);
}

#[tokio::test]
async fn refused_connect_fails_over_on_the_first_try_and_marks_the_node_down() {
    let mut nodes = three_nodes().await;
    // Probes are far apart: only the failed connect itself can notice the death.
    let lb = start_balancer(file_nodes(&nodes), |f| f.health_interval_ms = Some(3_600_000)).await;
    let dead = 1;
    let checked = format!("tether_balancer_health_checks_total{{node=\"{}\",result=\"ready\"}}", NAMES[dead]);
    eventually("the start-up probe", || async { lb.metric(&checked).await >= 1.0 }).await;

    let ids = ids_ranking_first(&NAMES, dead, 5);
    let (_ws, before) = ws_for(lb.addr, &ids[0]).await;
    assert_eq!(before.server, NAMES[dead]);
    nodes[dead].stop().await;

    let (_ws, after) = ws_for(lb.addr, &ids[1]).await;
    let second = NAMES[tether_proto::hrw::rank(&NAMES, &ids[1])[1]];
    assert_eq!(after.server, second);
    assert_eq!(lb.node_state(NAMES[dead]).await, "down");
    let failures = format!("tether_balancer_upstream_connect_failures_total{{node=\"{}\"}}", NAMES[dead]);
    assert_eq!(lb.metric(&failures).await, 1.0);
    // Down now: later clients skip the node without trying it.
    for id in &ids[2..] {
        let (_ws, h) = ws_for(lb.addr, id).await;
        assert_ne!(h.server, NAMES[dead]);
    }
    assert_eq!(lb.metric(&failures).await, 1.0);
}

#[tokio::test]
async fn only_the_dead_nodes_clients_move_and_they_come_back() {
    let mut nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;
    let ids: Vec<String> = (0..60).map(|i| format!("c-{i}")).collect();
    let mut before = HashMap::new();
    for id in &ids {
        before.insert(id.clone(), lb.http_node(id).await);
    }
    let dead = 2;
    let addr = nodes[dead].addr;
    nodes[dead].stop().await;
    lb.wait_state(NAMES[dead], "down").await;
    let mut moved = 0;
    for id in &ids {
        let now = lb.http_node(id).await;
        if before[id] == NAMES[dead] {
            moved += 1;
            assert_eq!(now, NAMES[tether_proto::hrw::rank(&NAMES, id)[1]], "{id}");
        } else {
            assert_eq!(now, before[id], "{id} moved although its node lives");
        }
    }
    assert!(moved > 0);

    // The node returns on the same port: its clients return too (new connections only).
    let revived = MockNode::start_on(NAMES[dead], addr).await;
    lb.wait_state(NAMES[dead], "up").await;
    for id in &ids {
        assert_eq!(lb.http_node(id).await, before[id], "{id}");
    }
    drop(revived);
}

#[tokio::test]
async fn node_dying_under_a_tunnel_closes_the_client_promptly() {
    let mut nodes = three_nodes().await;
    // Probes are far apart: the tunnel itself must notice.
    let lb = start_balancer(file_nodes(&nodes), |f| f.health_interval_ms = Some(3_600_000)).await;
    let (mut ws, hello) = ws_for(lb.addr, "bob").await;
    let (mut other, other_hello) =
        ws_for(lb.addr, &ids_ranking_first(&NAMES, (index_of(&hello.server) + 1) % 3, 1)[0]).await;
    echo(&mut ws, "ping").await;
    nodes[index_of(&hello.server)].stop().await;
    expect_closed(&mut ws).await;
    // Another node's tunnel is untouched.
    assert_ne!(other_hello.server, hello.server);
    echo(&mut other, "still here").await;
    // The client reconnects and lands on its next node at the first try.
    let (_ws, again) = ws_for(lb.addr, "bob").await;
    assert_eq!(again.server, NAMES[tether_proto::hrw::rank(&NAMES, "bob")[1]]);
    eventually("active connections to drop", || async { lb.status().await["active_connections"] == 2 }).await;
}

#[tokio::test]
async fn tunnels_to_a_node_marked_down_are_closed_even_if_its_sockets_live() {
    let mut nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;
    let (mut ws, hello) = ws_for(lb.addr, "carol").await;
    let i = index_of(&hello.server);
    // Refuse new connections, but keep the open WebSocket alive on the node's side.
    nodes[i].stop_accepting().await;
    lb.wait_state(NAMES[i], "down").await;
    expect_closed(&mut ws).await;
}

#[tokio::test]
async fn unready_nodes_keep_their_tunnels_and_serve_when_none_is_ready() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;
    let (mut ws, hello) = ws_for(lb.addr, "dave").await;
    let home = index_of(&hello.server);

    // Only dave's node is unready: new clients for it go to the next ready node...
    nodes[home].set_ready(false);
    lb.wait_state(NAMES[home], "unready").await;
    let (_ws2, h) = ws_for(lb.addr, "dave").await;
    assert_eq!(h.server, NAMES[tether_proto::hrw::rank(&NAMES, "dave")[1]]);

    // ...and when every node is unready, each client goes to its own first choice.
    for node in &nodes {
        node.set_ready(false);
    }
    for name in NAMES {
        lb.wait_state(name, "unready").await;
    }
    for i in 0..9 {
        let id = format!("u-{i}");
        let (_ws, h) = ws_for(lb.addr, &id).await;
        assert_eq!(h.server, NAMES[tether_proto::hrw::rank(&NAMES, &id)[0]]);
    }
    let (code, route) = lb.route("dave").await;
    assert_eq!((code, route["node"].as_str()), (StatusCode::OK, Some(NAMES[home])));

    // Several probes later the first tunnel is still open.
    let probes = format!("tether_balancer_health_checks_total{{node=\"{}\",result=\"unready\"}}", NAMES[home]);
    let seen = lb.metric(&probes).await;
    eventually("more probes", || async { lb.metric(&probes).await >= seen + 3.0 }).await;
    echo(&mut ws, "still connected").await;

    nodes[home].set_ready(true);
    lb.wait_state(NAMES[home], "up").await;
}

#[tokio::test]
async fn drain_and_undrain_through_the_admin_port() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;
    let (mut ws, hello) = ws_for(lb.addr, "erin").await;
    let home = hello.server.clone();

    let (code, _, body) = http(lb.admin, Method::POST, &format!("/nodes/{home}/drain"), &[]).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(lb.node_state(&home).await, "draining");
    let next = NAMES[tether_proto::hrw::rank(&NAMES, "erin")[1]];
    assert_eq!(lb.route("erin").await.1["node"], next);
    let (_ws2, h) = ws_for(lb.addr, "erin").await;
    assert_eq!(h.server, next);
    // The open tunnel was told to reconnect (tests/drain.rs has the details).
    assert_eq!(expect_close_code(&mut ws).await, 1012);
    // Probes do not clear a drain.
    let probes = format!("tether_balancer_health_checks_total{{node=\"{home}\",result=\"ready\"}}");
    let seen = lb.metric(&probes).await;
    eventually("more probes", || async { lb.metric(&probes).await >= seen + 2.0 }).await;
    assert_eq!(lb.node_state(&home).await, "draining");

    let (code, _, _) = http(lb.admin, Method::POST, &format!("/nodes/{home}/undrain"), &[]).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(lb.node_state(&home).await, "up");
    assert_eq!(lb.http_node("erin").await, home);

    let (code, _, _) = http(lb.admin, Method::POST, "/nodes/nope/drain", &[]).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, headers, _) = http(lb.admin, Method::GET, &format!("/nodes/{home}/drain"), &[]).await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "POST");
}

#[tokio::test]
async fn route_matches_where_connections_actually_go() {
    let mut nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;
    for i in 0..20 {
        let id = format!("r-{i}");
        let (code, route) = lb.route(&id).await;
        assert_eq!(code, StatusCode::OK);
        let (_ws, h) = ws_for(lb.addr, &id).await;
        assert_eq!(route["node"], h.server.as_str(), "{id}");
        assert_eq!(route["client"], id.as_str());
        let addr = nodes[index_of(&h.server)].addr.to_string();
        assert_eq!(route["addr"], addr.as_str());
    }
    assert_eq!(lb.route("a%20b").await.0, StatusCode::BAD_REQUEST);
    let (code, _, _) = http(lb.admin, Method::GET, "/route", &[]).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);

    for node in &mut nodes {
        node.stop().await;
    }
    for name in NAMES {
        lb.wait_state(name, "down").await;
    }
    assert_eq!(lb.route("r-1").await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (code, _, body) = http(lb.addr, Method::GET, "/api?client=r-1", &[]).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

#[tokio::test]
async fn status_metrics_and_page_describe_the_nodes() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |_| {}).await;
    let (_ws, hello) = ws_for(lb.addr, "frank").await;
    let status = lb.status().await;
    assert_eq!(status["active_connections"], 1);
    let names: HashSet<&str> =
        status["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, NAMES.into_iter().collect());
    let home = status["nodes"].as_array().unwrap().iter().find(|n| n["name"] == hello.server.as_str()).unwrap();
    assert_eq!(home["active_connections"], 1);
    assert_eq!(home["total_connections"], 1);
    assert_eq!(home["state"], "up");

    let active = format!("tether_balancer_active_connections{{node=\"{}\"}}", hello.server);
    assert_eq!(lb.metric(&active).await, 1.0);
    assert_eq!(lb.metric("tether_balancer_requests_total{kind=\"ws\",code=\"101\"}").await, 1.0);
    let (_, _, metrics) = http(lb.admin, Method::GET, "/metrics", &[]).await;
    for name in [
        "tether_balancer_connections_total",
        "tether_balancer_upstream_connect_failures_total",
        "tether_balancer_node_up",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }

    let (code, headers, page) = http(lb.admin, Method::GET, "/", &[]).await;
    assert_eq!(code, StatusCode::OK);
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/html"));
    for name in NAMES {
        assert!(page.contains(name));
    }
    let (code, _, _) = http(lb.admin, Method::GET, "/nope", &[]).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, _, _) = http(lb.admin, Method::POST, "/status", &[]).await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
}

/// Sends `bytes` and reads until the peer closes; returns what came back.
async fn send_raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    within("raw exchange", async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let _ = stream.write_all(bytes).await;
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out).await;
        out
    })
    .await
}

#[tokio::test]
async fn garbage_on_either_port_does_not_hurt_the_balancer() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |f| f.header_read_timeout_ms = Some(300)).await;
    let mut noise: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    noise.extend_from_slice(b"\r\n\r\n");
    let huge_header = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(64 * 1024));
    for addr in [lb.addr, lb.admin] {
        let reply = send_raw(addr, &noise).await;
        assert!(reply.is_empty() || reply.starts_with(b"HTTP/1.1 4"), "{reply:?}");
        let reply = send_raw(addr, huge_header.as_bytes()).await;
        assert!(reply.is_empty() || reply.starts_with(b"HTTP/1.1 4"));
        // Half a request, then silence: cut by header_read_timeout_ms.
        send_raw(addr, b"GET / HTTP/1.1\r\nhost").await;
        // Connect and hang up at once.
        drop(TcpStream::connect(addr).await.unwrap());
    }
    // A WebSocket handshake cut short after the request.
    send_raw(lb.addr, b"GET /ws?client=z HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
        .await;
    assert_eq!(lb.http_node("after-garbage").await.len(), 6);
    assert_eq!(lb.status().await["nodes"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn a_node_speaking_garbage_gets_502_or_503_not_a_crash() {
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = garbage.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"\x16\x03\x01 not http at all\r\n\r\n").await;
            });
        }
    });
    let node = tether_balancer::FileNode { name: "junk".into(), addr: addr.to_string() };
    let lb = start_balancer(vec![node], |_| {}).await;
    let (code, _, _) = http(lb.addr, Method::GET, "/api?client=x", &[]).await;
    assert!(code == StatusCode::BAD_GATEWAY || code == StatusCode::SERVICE_UNAVAILABLE, "{code}");
    lb.wait_state("junk", "down").await;
}

#[tokio::test]
async fn connections_beyond_the_cap_get_503_with_retry_after() {
    let nodes = three_nodes().await;
    let lb = start_balancer(file_nodes(&nodes), |f| f.max_connections = Some(2)).await;
    let (ws1, _) = ws_for(lb.addr, "g1").await;
    let (_ws2, _) = ws_for(lb.addr, "g2").await;
    match ws_connect(lb.addr, "?client=g3", &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers().get(http::header::RETRY_AFTER).map(|v| v.as_bytes()), Some(&b"5"[..]));
        }
        other => panic!("expected a 503 answer, got {other:?}"),
    }
    assert_eq!(lb.metric("tether_balancer_rejected_connections_total").await, 1.0);
    assert_eq!(lb.metric("tether_balancer_max_connections").await, 2.0);
    drop(ws1);
    eventually("a slot to free up", || async { ws_connect(lb.addr, "?client=g3", &[]).await.is_ok() }).await;
}

#[tokio::test]
async fn shutdown_lets_tunnels_finish_then_cuts_them_after_the_grace() {
    let nodes = three_nodes().await;
    let mut lb = start_balancer(file_nodes(&nodes), |f| f.grace_period_ms = Some(60_000)).await;
    let (mut ws, _) = ws_for(lb.addr, "hank").await;
    lb.shutdown.cancel();
    eventually("the listener to close", || async { TcpStream::connect(lb.addr).await.is_err() }).await;
    echo(&mut ws, "still served during the grace").await;
    ws.close(None).await.unwrap();
    drop(ws);
    // The last tunnel ended: run returns long before the 60 s grace.
    lb.stop().await.unwrap();

    let mut lb = start_balancer(file_nodes(&nodes), |f| f.grace_period_ms = Some(200)).await;
    let (mut ws, _) = ws_for(lb.addr, "ivy").await;
    lb.stop().await.unwrap();
    expect_closed(&mut ws).await;
}
