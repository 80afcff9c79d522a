//! JWT auth end to end (`docs/JWT.md`): real `tether-node` processes configured with `[auth]`,
//! a real `redis-server`, a real balancer, real WebSocket clients.
//!
//! Keys: the HS256 secret is a constant; the RS256 and ES256 key pairs are generated at test
//! time with `openssl genpkey` (the commands docs/JWT.md gives), into a temporary directory.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use tether_kit::{BalancerProcess, NodeProcess, RedisServer};
use tether_proto::token::{mint, Claims, MintKey};
use tether_proto::wire::ClientMsg;
use tether_tests::{Closed, HttpConn, WsClient, DEADLINE};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "auth-test-secret-0123456789abcdef";

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64
}

fn claims(sub: &str, ttl_secs: i64) -> Claims {
    Claims { sub: sub.into(), exp: (now_secs() as i64 + ttl_secs) as u64, iat: None, name: None, rooms: None }
}

fn hs256(c: &Claims) -> String {
    mint(c, &MintKey::hs256(SECRET.as_bytes()).expect("secret")).expect("mints")
}

/// The key pairs, generated with openssl in a temporary directory.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn generate() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("tether-jwt-keys-").tempdir()?;
        let run = |args: &[&str]| -> Result<()> {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .context("running openssl (needed to generate the RS256/ES256 test keys)")?;
            if !out.status.success() {
                bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        run(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "rsa.pem"])?;
        run(&["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub.pem"])?;
        run(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ec.pem"])?;
        run(&["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub.pem"])?;
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn rs256(&self, c: &Claims) -> Result<String> {
        Ok(mint(c, &MintKey::rs256_pem(&std::fs::read(self.path("rsa.pem"))?)?)?)
    }

    fn es256(&self, c: &Claims) -> Result<String> {
        Ok(mint(c, &MintKey::es256_pem(&std::fs::read(self.path("ec.pem"))?)?)?)
    }
}

/// A node process with `auth` as its `[auth]` table (written into `dir`).
async fn node(name: &str, redis: &RedisServer, dir: &Path, auth: &str) -> Result<NodeProcess> {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, format!("[auth]\n{auth}\n"))?;
    NodeProcess::start(name, &redis.url(), &["--config".into(), file.display().to_string()]).await
}

fn hs_auth() -> String {
    format!("hs256_secret = {SECRET:?}\nleeway_secs = 0")
}

/// The HTTP status an upgrade of `url` (with `headers`) is answered with, and its body.
async fn upgrade_status(url: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    let mut req = url.into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes())?, http::HeaderValue::from_str(v)?);
    }
    let answer = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(req)).await.context("upgrade")?;
    Ok(match answer {
        Ok((_ws, resp)) => (resp.status().as_u16(), String::new()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            (resp.status().as_u16(), body)
        }
        Err(e) => bail!("upgrade of {url}: {e}"),
    })
}

async fn connected(url: &str, headers: &[(&str, &str)]) -> Result<(WsClient, Value)> {
    let mut c = WsClient::connect_with(url, headers).await?;
    let hello = c.recv_type("connected").await?;
    Ok((c, hello))
}

#[tokio::test]
async fn hs256_rs256_and_es256_tokens_are_accepted_by_the_key_their_alg_names() -> Result<()> {
    let redis = RedisServer::start().await?;
    let keys = Keys::generate()?;
    let rs_node =
        node("rs", &redis, keys.dir.path(), &format!("{}\npublic_key = {:?}", hs_auth(), keys.path("rsa.pub.pem")))
            .await?;
    let es_node =
        node("es", &redis, keys.dir.path(), &format!("public_key = {:?}\nleeway_secs = 0", keys.path("ec.pub.pem")))
            .await?;

    let named = Claims { name: Some("Alice A.".into()), ..claims("alice", 60) };
    let (_a, hello) = connected(&format!("{}?token={}", rs_node.ws_url(), hs256(&named)), &[]).await?;
    assert_eq!((hello["id"].as_str(), hello["name"].as_str()), (Some("alice"), Some("Alice A.")), "{hello}");
    let rs = keys.rs256(&claims("bob", 60))?;
    let (_b, hello) = connected(&rs_node.ws_url(), &[("authorization", &format!("Bearer {rs}"))]).await?;
    assert_eq!(hello["id"], "bob");
    let es = keys.es256(&claims("carol", 60))?;
    let (_c, hello) = connected(&format!("{}?token={es}", es_node.ws_url()), &[]).await?;
    assert_eq!(hello["id"], "carol");

    // An alg the node has no key for is refused, whatever the signature.
    let (status, body) =
        upgrade_status(&format!("{}?token={}", es_node.ws_url(), hs256(&claims("dave", 60))), &[]).await?;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("HS256"), "{body}");
    let (status, _) = upgrade_status(&format!("{}?token={es}", rs_node.ws_url()), &[]).await?;
    assert_eq!(status, 401);
    Ok(())
}

#[tokio::test]
async fn missing_forged_expired_mismatched_and_unsigned_tokens_get_401_before_the_upgrade() -> Result<()> {
    let redis = RedisServer::start().await?;
    let dir = tempfile::tempdir()?;
    let n = node("n", &redis, dir.path(), &hs_auth()).await?;
    let url = n.ws_url();
    let forged = mint(&claims("alice", 60), &MintKey::hs256(b"some-other-secret-entirely")?)?;
    // {"alg":"none","typ":"JWT"} . {"sub":"alice","exp":9999999999} . (no signature)
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
    let good = hs256(&claims("alice", 60));
    let no_exp = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "alice"}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes())?,
    )?;
    // (url, extra headers, what the 401's body must say)
    type Case<'a> = (String, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (format!("{url}?client=alice"), vec![], "required"),
        (url.clone(), vec![], "required"),
        (format!("{url}?token={forged}"), vec![], "signature"),
        (format!("{url}?token={}", hs256(&claims("alice", -30))), vec![], "expired"),
        (format!("{url}?token={good}&client=bob"), vec![], "sub"),
        (format!("{url}?token={good}"), vec![("x-client-id", "mallory".into())], "sub"),
        (format!("{url}?token={none}"), vec![], "none"),
        (format!("{url}?token=not-a-jwt"), vec![], "malformed"),
        (format!("{url}?token={no_exp}"), vec![], "exp"),
        (url.clone(), vec![("authorization", format!("Bearer {forged}"))], "signature"),
    ];
    for (url, headers, why) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, body) = upgrade_status(url, &headers).await?;
        assert_eq!(status, 401, "{url} {headers:?}: {body}");
        assert!(body.contains(why), "{url}: {body:?} should say {why:?}");
    }
    // The node still serves, and a good token with its own id agreeing is let in.
    let (_c, hello) = connected(&format!("{url}?client=alice&token={good}"), &[]).await?;
    assert_eq!(hello["id"], "alice");

    // `required = false`: no token is fine (ids as before); a bad one is still refused.
    let open = node("open", &redis, dir.path(), &format!("{}\nrequired = false", hs_auth())).await?;
    let (_d, hello) = connected(&format!("{}?client=dave", open.ws_url()), &[]).await?;
    assert_eq!(hello["id"], "dave");
    let (status, _) = upgrade_status(&format!("{}?token={forged}", open.ws_url()), &[]).await?;
    assert_eq!(status, 401);
    Ok(())
}

#[tokio::test]
async fn room_claims_forbid_joins_and_filter_the_restored_session() -> Result<()> {
    let redis = RedisServer::start().await?;
    let dir = tempfile::tempdir()?;
    let n = node("n", &redis, dir.path(), &hs_auth()).await?;
    // First with every room allowed: the session remembers three rooms.
    let (mut c, _) = connected(&format!("{}?token={}", n.ws_url(), hs256(&claims("erin", 60))), &[]).await?;
    for room in ["general", "support:1", "random"] {
        c.join(room).await?;
    }
    c.close().await;
    // Then with patterns: only the allowed ones come back, the others cannot be joined.
    let limited = Claims {
        rooms: Some(vec!["general".into(), "support:*".into()]),
        name: Some("Erin".into()),
        ..claims("erin", 60)
    };
    let url = format!("{}?token={}", n.ws_url(), hs256(&limited));
    let restored = tether_tests::eventually("the restored session", || {
        let url = url.clone();
        async move {
            let (c, hello) = connected(&url, &[]).await.ok()?;
            (hello["session"] == "restored").then_some((c, hello))
        }
    })
    .await?;
    let (mut c, hello) = restored;
    assert_eq!(hello["rooms"], json!(["general", "support:1"]), "{hello}");
    assert_eq!(hello["name"], "Erin");
    c.send_msg(&ClientMsg::Join { room: "random".into() }).await?;
    let e = c.recv_type("error").await?;
    assert_eq!(e["code"], "forbidden", "{e}");
    c.join("support:2").await?;
    c.send_msg(&ClientMsg::Presence { room: "random".into() }).await?;
    assert_eq!(c.recv_type("error").await?["code"], "forbidden");
    // The token names the client: set_name is refused.
    c.set_name("Mallory").await?;
    assert_eq!(c.recv_type("error").await?["code"], "forbidden");
    Ok(())
}

/// Waits for the close and checks it is 4001 `token expired`, not before `exp`.
async fn closes_at_exp(c: &mut WsClient, exp: u64) -> Result<()> {
    let closed = c.closed_within(std::time::Duration::from_secs(15)).await?;
    let at = now_ms();
    assert_eq!(closed, Closed::Code(4001, "token expired".into()));
    // Not early (a little slack for the two clocks' reads: the node's and this one's).
    assert!(at + 50 >= exp * 1000, "closed at {at} ms, before exp {exp} s");
    Ok(())
}

#[tokio::test]
async fn an_unrefreshed_token_closes_4001_at_exp() -> Result<()> {
    let redis = RedisServer::start().await?;
    let dir = tempfile::tempdir()?;
    let n = node("n", &redis, dir.path(), &hs_auth()).await?;
    let short = claims("frank", 2);
    let (mut c, _) = connected(&format!("{}?token={}", n.ws_url(), hs256(&short)), &[]).await?;
    c.join("general").await?;
    closes_at_exp(&mut c, short.exp).await
}

#[tokio::test]
async fn a_refresh_before_exp_keeps_the_connection_open_past_it() -> Result<()> {
    let redis = RedisServer::start().await?;
    let dir = tempfile::tempdir()?;
    let n = node("n", &redis, dir.path(), &hs_auth()).await?;
    let short = claims("gina", 2);
    let (mut c, _) = connected(&format!("{}?token={}", n.ws_url(), hs256(&short)), &[]).await?;
    let longer = claims("gina", 3600);
    c.send_msg(&ClientMsg::Refresh { token: hs256(&longer) }).await?;
    let answer = c.recv_type("refreshed").await?;
    assert_eq!(answer["exp"], longer.exp);
    // Still open a second past the first exp: nothing closes it.
    let wait = (short.exp * 1000 + 1000).saturating_sub(now_ms());
    let still = c.closed_within(std::time::Duration::from_millis(wait)).await;
    assert!(still.is_err(), "closed: {still:?}");
    c.send_msg(&ClientMsg::Online).await?;
    c.recv_type("online").await?;
    Ok(())
}

#[tokio::test]
async fn a_bad_refresh_is_unauthorized_and_the_old_expiry_stands() -> Result<()> {
    let redis = RedisServer::start().await?;
    let dir = tempfile::tempdir()?;
    let n = node("n", &redis, dir.path(), &hs_auth()).await?;
    let short = claims("hank", 2);
    let (mut c, _) = connected(&format!("{}?token={}", n.ws_url(), hs256(&short)), &[]).await?;
    let bad = [
        hs256(&claims("someone-else", 3600)),
        mint(&claims("hank", 3600), &MintKey::hs256(b"some-other-secret-entirely")?)?,
        hs256(&claims("hank", -60)),
        "garbage".to_string(),
    ];
    for token in bad {
        c.send_msg(&ClientMsg::Refresh { token }).await?;
        let e = c.recv_type("error").await?;
        assert_eq!(e["code"], "unauthorized", "{e}");
    }
    closes_at_exp(&mut c, short.exp).await
}

#[tokio::test]
async fn the_balancer_routes_a_token_by_its_sub() -> Result<()> {
    let redis = RedisServer::start().await?;
    let dir = tempfile::tempdir()?;
    let mut nodes = Vec::new();
    for name in ["node-1", "node-2", "node-3"] {
        nodes.push(node(name, &redis, dir.path(), &hs_auth()).await?);
    }
    let list: Vec<(String, std::net::SocketAddr)> = nodes.iter().map(|n| (n.name().to_owned(), n.addr())).collect();
    let balancer = BalancerProcess::start(&list, &[]).await?;
    let mut admin = HttpConn::connect(balancer.admin_addr()).await?;
    let mut servers = std::collections::BTreeSet::new();
    for i in 0..12 {
        let sub = format!("user-{i}");
        let route = admin.get_json(&format!("/route?client={sub}")).await?;
        let token = hs256(&claims(&sub, 60));
        let (_c, hello) = connected(&format!("{}?token={token}", balancer.ws_url()), &[]).await?;
        assert_eq!((&hello["id"], &hello["server"]), (&json!(sub), &route["node"]), "{hello} vs {route}");
        let (_c, hello) = connected(&balancer.ws_url(), &[("authorization", &format!("Bearer {token}"))]).await?;
        assert_eq!(hello["server"], route["node"]);
        servers.insert(hello["server"].as_str().unwrap_or_default().to_owned());
    }
    assert!(servers.len() > 1, "12 subs all on {servers:?}: routing ignored the token");
    // Another id named beside the token: the balancer forwards it, the node refuses it.
    let token = hs256(&claims("user-1", 60));
    let (status, body) = upgrade_status(&format!("{}?client=user-2&token={token}", balancer.ws_url()), &[]).await?;
    assert_eq!(status, 401, "{body}");
    // No token at all through the balancer: it mints an id, the node wants a token.
    let (status, _) = upgrade_status(&balancer.ws_url(), &[]).await?;
    assert_eq!(status, 401);
    Ok(())
}

/// `tether token` prints what a node accepts (HS256 from a secret, ES256 from a PEM key), with
/// the claims asked for; bad input exits 64.
#[tokio::test]
async fn tokens_minted_by_the_cli_are_accepted() -> Result<()> {
    let redis = RedisServer::start().await?;
    let keys = Keys::generate()?;
    let auth = format!("{}\npublic_key = {:?}", hs_auth(), keys.path("ec.pub.pem"));
    let n = node("n", &redis, keys.dir.path(), &auth).await?;
    let tether = tether_kit::bin::bin_path("tether")?;
    let mint = |args: &[&str]| std::process::Command::new(&tether).arg("token").args(args).output();
    let ec = keys.path("ec.pem").display().to_string();
    for args in [
        vec!["--secret", SECRET, "--sub", "ivy", "--name", "Ivy", "--rooms", "general,team:*", "--ttl", "10m"],
        vec!["--key", ec.as_str(), "--sub", "ivy", "--name", "Ivy", "--rooms", "general,team:*"],
    ] {
        let out = mint(&args)?;
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let token = String::from_utf8(out.stdout)?.trim().to_owned();
        let (mut c, hello) = connected(&format!("{}?token={token}", n.ws_url()), &[]).await?;
        assert_eq!((hello["id"].as_str(), hello["name"].as_str()), (Some("ivy"), Some("Ivy")));
        c.join("team:blue").await?;
        c.send_msg(&ClientMsg::Join { room: "random".into() }).await?;
        assert_eq!(c.recv_type("error").await?["code"], "forbidden");
    }
    for args in [
        &["--secret", SECRET, "--sub", "bad id"][..],
        &["--key", "/nonexistent.pem", "--sub", "ivy"],
        &["--sub", "ivy"],
    ] {
        let out = mint(args)?;
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
