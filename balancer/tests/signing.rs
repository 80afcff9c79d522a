//! Signed client ids: with a `signing_key`, ids that do not verify are refused with 403 before
//! any node is contacted, and minted ids are signed and round-trip through the cookie.

mod common;

use common::*;
use http::{Method, StatusCode};
use tether_balancer::config::Secret;
use tether_proto::sign::SigningKey;
use tokio_tungstenite::tungstenite;

const KEY: &str = "test-signing-key-0123456789";

async fn signed_balancer(nodes: &[MockNode]) -> Balancer {
    start_balancer(file_nodes(nodes), |f| {
        f.signing_key_env = Some(Secret(KEY.into()));
    })
    .await
}

fn key() -> SigningKey {
    SigningKey::new(KEY.as_bytes().to_vec()).unwrap()
}

/// `id` with the last hex digit of its signature changed to another lowercase hex digit.
fn flip_last(id: &str) -> String {
    let mut forged = id.to_owned();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    forged
}

/// Expects the WebSocket handshake to be answered with 403.
async fn ws_refused(lb: &Balancer, query: &str, headers: &[(&str, &str)]) {
    match ws_connect(lb.addr, query, headers).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{query} {headers:?}");
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default());
            assert_eq!(body.trim(), "unsigned or forged client id");
        }
        Err(e) => panic!("{query} {headers:?}: expected 403, got {e}"),
        Ok(_) => panic!("{query} {headers:?}: expected 403, got a WebSocket"),
    }
}

#[tokio::test]
async fn unsigned_and_forged_ids_get_403_before_any_node_is_contacted() {
    let nodes = three_nodes().await;
    let lb = signed_balancer(&nodes).await;
    let genuine = key().mint();
    let forged = flip_last(&genuine);
    let other_key = SigningKey::new(b"some-other-key-of-enough-bytes".to_vec()).unwrap().mint();
    let (random, _) = genuine.split_once('.').unwrap();

    let mut refused = 0;
    for bad in ["alice", forged.as_str(), other_key.as_str(), random, &format!("{random}.")] {
        ws_refused(&lb, &format!("?client={bad}"), &[]).await;
        ws_refused(&lb, "", &[("x-client-id", bad)]).await;
        ws_refused(&lb, "", &[("cookie", &format!("tether_sid={bad}"))]).await;
        let (code, _, body) = http(lb.addr, Method::GET, &format!("/api?client={bad}"), &[]).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{bad}: {body}");
        refused += 3;
    }
    // The first source present decides: a genuine cookie does not rescue a forged query.
    ws_refused(&lb, &format!("?client={forged}"), &[("cookie", &format!("tether_sid={genuine}"))]).await;
    refused += 1;
    // A syntactically bad id is still a 400, as without a key.
    let (code, _, _) = http(lb.addr, Method::GET, "/api?client=a%20b", &[]).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);

    for node in &nodes {
        assert_eq!(node.requests(), 0, "{} was contacted", node.name);
        assert_eq!(node.ws_opened(), 0);
    }
    assert_eq!(lb.metric("tether_balancer_requests_total{kind=\"ws\",code=\"403\"}").await, f64::from(refused));
    assert_eq!(lb.metric("tether_balancer_requests_total{kind=\"http\",code=\"403\"}").await, 5.0);

    // The genuine id itself passes, by any source.
    let (_ws, hello) = ws_for(lb.addr, &genuine).await;
    assert_eq!(hello.client, genuine);
    let (mut ws, _) = ws_connect(lb.addr, "", &[("x-client-id", &genuine)]).await.unwrap();
    assert_eq!(hello_of(&mut ws).await, genuine);
}

async fn hello_of(ws: &mut Ws) -> String {
    hello(ws).await.client
}

#[tokio::test]
async fn minted_ids_are_signed_and_round_trip_through_the_cookie() {
    let nodes = three_nodes().await;
    let lb = signed_balancer(&nodes).await;

    let (mut ws, response) = ws_connect(lb.addr, "", &[]).await.unwrap();
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_owned();
    let id = cookie
        .strip_prefix("tether_sid=")
        .and_then(|rest| rest.strip_suffix("; Path=/; HttpOnly; SameSite=Lax"))
        .unwrap_or_else(|| panic!("unexpected cookie {cookie}"))
        .to_owned();
    assert!(key().verify(&id), "{id} is not signed with the key");
    let first = hello(&mut ws).await;
    assert_eq!(first.client, id);
    assert_eq!(first.server, NAMES[tether_proto::hrw::rank(&NAMES, &id)[0]]);

    // Back with the cookie: accepted, same node, no new cookie.
    for _ in 0..3 {
        let (mut ws, response) = ws_connect(lb.addr, "", &[("cookie", &format!("tether_sid={id}"))]).await.unwrap();
        assert!(!response.headers().contains_key("set-cookie"));
        assert_eq!(hello(&mut ws).await, first);
    }

    // Plain HTTP mints signed ids too.
    let (code, headers, _) = http(lb.addr, Method::GET, "/api", &[]).await;
    assert_eq!(code, StatusCode::OK);
    let cookie = headers["set-cookie"].to_str().unwrap();
    let minted = cookie.strip_prefix("tether_sid=").and_then(|c| c.split(';').next()).unwrap();
    assert!(key().verify(minted));
}

#[tokio::test]
async fn route_answers_for_any_valid_id_and_says_whether_it_is_signed() {
    let nodes = three_nodes().await;
    let lb = signed_balancer(&nodes).await;
    let genuine = key().mint();
    let (code, route) = lb.route(&genuine).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(route["signed"], true);
    assert_eq!(route["node"], NAMES[tether_proto::hrw::rank(&NAMES, &genuine)[0]]);
    for unsigned in ["alice", &flip_last(&genuine)] {
        let (code, route) = lb.route(unsigned).await;
        assert_eq!(code, StatusCode::OK, "{unsigned}");
        assert_eq!(route["signed"], false, "{unsigned}");
    }
    assert_eq!(lb.route("a%20b").await.0, StatusCode::BAD_REQUEST);

    // Without a key there is no `signed` field and unsigned ids are served as before.
    let plain = start_balancer(file_nodes(&nodes), |_| {}).await;
    let (code, route) = plain.route("alice").await;
    assert_eq!(code, StatusCode::OK);
    assert!(route.get("signed").is_none(), "{route}");
    let (_ws, hello) = ws_for(plain.addr, "alice").await;
    assert_eq!(hello.client, "alice");
}
