//! Node registry and discovery (`docs/SCALING.md`, "Node registry and discovery"): nodes
//! announce themselves in their backbone; balancers started with `--discover` follow it and
//! agree on the node set — and so on every client's node — within 2 s of a node's `/readyz`
//! turning 200, or of its death. Real processes throughout: a private `redis-server` or
//! `nats-server`, node and balancer binaries (build them first: `cargo build --workspace --bins`).

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use tether_kit::{BalancerProcess, NatsServer, NodeProcess, RedisServer};
use tether_tests::HttpConn;
use tokio::time::Instant;

/// The contract: balancers agree within this of a node's readiness or death.
const AGREE_WITHIN: Duration = Duration::from_secs(2);
/// Client ids whose routes are compared.
const IDS: usize = 200;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A node on a port chosen here, announcing that port explicitly (`--advertise`).
async fn node(name: &str, redis: &str, extra: &[&str]) -> Result<NodeProcess> {
    let port = tether_kit::ports::free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut all = args(&["--listen", &addr, "--advertise", &addr]);
    all.extend(args(extra));
    NodeProcess::start(name, redis, &all).await
}

/// Two balancers following `url`, with nothing static.
async fn balancers(url: &str) -> Result<[BalancerProcess; 2]> {
    let flags = args(&["--discover", url]);
    Ok([BalancerProcess::start(&[], &flags).await?, BalancerProcess::start(&[], &flags).await?])
}

/// `name → (addr, state)` of every node in a balancer's `/status`.
async fn status(b: &BalancerProcess) -> Result<BTreeMap<String, (String, String)>> {
    let status = HttpConn::connect(b.admin_addr()).await?.get_json("/status").await?;
    let nodes = status["nodes"].as_array().context("/status without nodes")?;
    Ok(nodes
        .iter()
        .map(|n| {
            let s = |k: &str| n[k].as_str().unwrap_or_default().to_owned();
            (s("name"), (s("addr"), s("state")))
        })
        .collect())
}

/// The names shown `up`.
async fn up(b: &BalancerProcess) -> Result<Vec<String>> {
    Ok(status(b).await?.into_iter().filter(|(_, (_, state))| state == "up").map(|(n, _)| n).collect())
}

/// Where each of the test ids goes now, per `/route`.
async fn routes(b: &BalancerProcess) -> Result<Vec<String>> {
    let mut admin = HttpConn::connect(b.admin_addr()).await?;
    let mut out = Vec::with_capacity(IDS);
    for i in 0..IDS {
        let route: Value = admin.get_json(&format!("/route?client=disc-{i}")).await?;
        out.push(route["node"].as_str().context("/route without node")?.to_owned());
    }
    Ok(out)
}

/// Each test id's node by HRW over `names`: what every balancer must answer.
fn expected(names: &[&str]) -> Vec<String> {
    (0..IDS).map(|i| names[tether_proto::hrw::rank(names, &format!("disc-{i}"))[0]].to_string()).collect()
}

/// Waits up to `within` (from `since`) until `cond` holds at both balancers; returns how
/// long after `since` it did.
async fn both_within<F, Fut>(
    bs: &[BalancerProcess; 2],
    since: Instant,
    within: Duration,
    what: &str,
    cond: F,
) -> Result<Duration>
where
    F: Fn(BTreeMap<String, (String, String)>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        let mut all = true;
        for b in bs {
            all &= cond(status(b).await?).await;
        }
        if all {
            return Ok(since.elapsed());
        }
        if since.elapsed() > within {
            bail!(
                "{what}: not at both balancers within {within:?}: {:?} / {:?}",
                status(&bs[0]).await?,
                status(&bs[1]).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `name`, waits for its `/readyz` 200, then until both balancers show it up (within
/// [`AGREE_WITHIN`]); returns the node and that delay.
async fn join(
    bs: &[BalancerProcess; 2],
    name: &str,
    backbone: &str,
    extra: &[&str],
) -> Result<(NodeProcess, Duration)> {
    let n = node(name, backbone, extra).await?;
    n.wait_ready(tether_tests::DEADLINE).await?;
    let ready = Instant::now();
    let addr = n.addr().to_string();
    let took = both_within(bs, ready, AGREE_WITHIN, &format!("{name} up"), |s| {
        let ok = s.get(name).is_some_and(|(a, state)| *a == addr && state == "up");
        async move { ok }
    })
    .await?;
    Ok((n, took))
}

/// Both balancers route every test id to its HRW node over `names` (eventually: a health
/// flip may be on its way).
async fn routes_agree(bs: &[BalancerProcess; 2], names: &[&str]) -> Result<()> {
    let want = expected(names);
    tether_tests::eventually(&format!("routes over {names:?} at both balancers"), || {
        let want = &want;
        async move {
            for b in bs {
                if routes(b).await.ok()? != *want {
                    return None;
                }
            }
            Some(())
        }
    })
    .await
}

/// Whether `name` is gone from, or shown down in, a status.
fn down_or_gone(s: &BTreeMap<String, (String, String)>, name: &str) -> bool {
    s.get(name).is_none_or(|(_, state)| state == "down")
}

/// Waits until neither balancer's `/status` lists `name` any more.
async fn dropped_at_both(bs: &[BalancerProcess; 2], name: &str) -> Result<()> {
    tether_tests::eventually(&format!("{name} dropped at both balancers"), || async {
        for b in bs {
            (!status(b).await.ok()?.contains_key(name)).then_some(())?;
        }
        Some(())
    })
    .await
}

async fn registry_has(redis_url: &str, name: &str) -> Result<bool> {
    let mut con = redis::Client::open(redis_url)?.get_multiplexed_async_connection().await?;
    Ok(redis::cmd("HEXISTS").arg("tether:nodes").arg(name).query_async::<i64>(&mut con).await? == 1)
}

#[tokio::test]
async fn two_balancers_follow_the_redis_registry_through_joins_deaths_and_stops() -> Result<()> {
    let redis = RedisServer::start().await?;
    let url = redis.url();
    let bs = balancers(&url).await?;
    let mut nodes = Vec::new();
    for name in ["d1", "d2", "d3"] {
        let (n, took) = join(&bs, name, &url, &[]).await?;
        eprintln!("{name}: up at both balancers {took:?} after its /readyz 200");
        nodes.push(n);
    }
    for b in &bs {
        ensure!(up(b).await? == ["d1", "d2", "d3"], "three nodes up");
    }
    routes_agree(&bs, &["d1", "d2", "d3"]).await?;

    // A death: SIGKILL, no withdrawal.
    nodes[1].kill().await?;
    let killed = Instant::now();
    let took =
        both_within(&bs, killed, AGREE_WITHIN, "d2 down or dropped", |s| async move { down_or_gone(&s, "d2") }).await?;
    eprintln!("d2 killed: down or dropped at both balancers after {took:?}");
    routes_agree(&bs, &["d1", "d3"]).await?;
    ensure!(registry_has(&url, "d2").await?, "a killed node is not withdrawn: its entry only goes stale");
    // Stale → dropped, not merely down.
    dropped_at_both(&bs, "d2").await?;

    // A new node joins: both agree again (HRW over the new set: only ids that rank it first move).
    let (d4, took) = join(&bs, "d4", &url, &[]).await?;
    eprintln!("d4: up at both balancers {took:?} after its /readyz 200");
    routes_agree(&bs, &["d1", "d3", "d4"]).await?;

    // A graceful stop withdraws at once (the entry is deleted, not left to go stale).
    nodes[2].terminate()?;
    dropped_at_both(&bs, "d3").await?;
    ensure!(!registry_has(&url, "d3").await?, "SIGTERM withdrew d3 from the registry");
    routes_agree(&bs, &["d1", "d4"]).await?;
    drop(d4);
    Ok(())
}

#[tokio::test]
async fn two_balancers_follow_the_nats_registry() -> Result<()> {
    let nats = NatsServer::start().await?;
    let url = nats.url();
    let bs = balancers(&url).await?;
    let backbone = ["--backbone", "nats", "--nats", url.as_str()];
    // The node fixture's `--redis` is unused under NATS.
    let unused = "redis://127.0.0.1:1/";
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        let (n, took) = join(&bs, name, unused, &backbone).await?;
        eprintln!("{name} (nats): up at both balancers {took:?} after its /readyz 200");
        nodes.push(n);
    }
    routes_agree(&bs, &["n1", "n2", "n3"]).await?;
    nodes[0].kill().await?;
    let took =
        both_within(&bs, Instant::now(), AGREE_WITHIN, "n1 down or dropped", |s| async move { down_or_gone(&s, "n1") })
            .await?;
    eprintln!("n1 (nats) killed: down or dropped at both balancers after {took:?}");
    routes_agree(&bs, &["n2", "n3"]).await?;
    dropped_at_both(&bs, "n1").await?;
    Ok(())
}

#[tokio::test]
async fn a_static_node_wins_over_a_discovered_one_of_the_same_name() -> Result<()> {
    let redis = RedisServer::start().await?;
    let url = redis.url();
    // s1 announces an address nobody listens on; the static entry names the real one.
    let port = tether_kit::ports::free_port()?;
    let real = format!("127.0.0.1:{port}");
    let s1 = NodeProcess::start("s1", &url, &args(&["--listen", &real, "--advertise", "127.0.0.1:1"])).await?;
    s1.wait_ready(tether_tests::DEADLINE).await?;
    let s2 = node("s2", &url, &[]).await?;
    let b = BalancerProcess::start(&[("s1".to_owned(), s1.addr())], &args(&["--discover", &url])).await?;
    let want = BTreeMap::from([
        ("s1".to_owned(), (real.clone(), "up".to_owned())),
        ("s2".to_owned(), (s2.addr().to_string(), "up".to_owned())),
    ]);
    tether_tests::eventually("s1 static, s2 discovered, both up", || async {
        (status(&b).await.ok()? == want).then_some(())
    })
    .await?;
    Ok(())
}

/// Runs a binary that must refuse its configuration: exit code 64, the field named.
async fn refused(bin: &str, flags: &[&str], field: &str) -> Result<()> {
    let out = tokio::time::timeout(
        tether_tests::DEADLINE,
        tokio::process::Command::new(tether_kit::bin_path(bin)?).args(flags).output(),
    )
    .await
    .context("timed out")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(64), "{bin} {flags:?}: exit {:?}, stderr {stderr}", out.status.code());
    ensure!(stderr.contains(field), "{bin} {flags:?}: the error names {field}: {stderr}");
    Ok(())
}

#[tokio::test]
async fn bad_registry_settings_are_refused_at_start() -> Result<()> {
    use tether_kit::{BALANCER_BIN, NODE_BIN};
    refused(NODE_BIN, &["--listen", "0.0.0.0:0", "--name", "x"], "advertise").await?;
    refused(NODE_BIN, &["--listen", "127.0.0.1:0", "--advertise", "0.0.0.0:9001"], "advertise").await?;
    let listeners = ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
    for bad in ["http://x", "redis+cluster://", "nats://a,,b"] {
        let mut flags = listeners.to_vec();
        flags.extend(["--discover", bad]);
        refused(BALANCER_BIN, &flags, "discover").await?;
    }
    // Neither static nodes nor a registry: nothing to route to.
    refused(BALANCER_BIN, &listeners, "nodes").await?;
    Ok(())
}
