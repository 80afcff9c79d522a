//! The client's real address, end to end with real processes: a client speaking the PROXY
//! protocol to a `tether-balancer` (as a load balancer in front would), the balancer passing
//! the address on in `X-Real-IP`/`X-Forwarded-For`, and a `tether-node` that believes it only
//! when the balancer is among its `trusted_proxies` — shown by the address the node logs for
//! the connection (its `websocket accepted` line, at debug).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use serde_json::Value;
use tether_kit::{bin_path, BalancerProcess, ChildProcess, LogTarget, NODE_BIN};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::MaybeTlsStream;

const DEADLINE: Duration = Duration::from_secs(10);

/// A `tether-node --backbone none` logging JSON at debug into `log`.
async fn node(name: &str, log: &Path, extra: &[&str]) -> Result<(ChildProcess, std::net::SocketAddr)> {
    let mut cmd = Command::new(bin_path(NODE_BIN)?);
    cmd.args(["--listen", "127.0.0.1:0", "--name", name, "--backbone", "none", "--log-format", "json"])
        .args(extra)
        .env("RUST_LOG", "tether_node=debug")
        .stdout(Stdio::piped())
        .stderr(LogTarget::File(log.to_owned()).stdio()?);
    let mut proc = ChildProcess::spawn(name, cmd)?;
    let ready = proc.await_ready(NODE_BIN, DEADLINE, &LogTarget::File(log.to_owned())).await?;
    let addr = ready.addr("listen").context(name.to_owned())?;
    Ok((proc, addr))
}

/// Opens a WebSocket through the balancer with a PROXY v1 header naming `client_ip`, and
/// reads the node's first frame (so the node has accepted it).
async fn connect_as(balancer: std::net::SocketAddr, client_ip: &str, id: &str) -> Result<()> {
    let mut stream = TcpStream::connect(balancer).await?;
    stream.write_all(format!("PROXY TCP4 {client_ip} 127.0.0.1 40000 8080\r\n").as_bytes()).await?;
    let request = format!("ws://{balancer}/ws?client={id}").into_client_request()?;
    let (mut ws, _) =
        tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)))
            .await
            .context("handshake timed out")??;
    tokio::time::timeout(DEADLINE, ws.next()).await.context("no first frame")?.context("closed")??;
    Ok(())
}

/// The `peer` and `tcp_peer` the node logged on accepting `id`.
async fn logged_peer(log: &Path, id: &str) -> Result<(String, String)> {
    tether_kit::eventually(DEADLINE, &format!("the node to log {id}'s connection"), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let found = text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find_map(|v| {
            let f = &v["fields"];
            if f["message"] != "websocket accepted" || f["client"] != id {
                return None;
            }
            Some((f["peer"].as_str()?.to_owned(), f["tcp_peer"].as_str()?.to_owned()))
        });
        async move { found }
    })
    .await
    .map_err(Into::into)
}

fn log_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(format!("{name}.log"))
}

#[tokio::test]
async fn a_node_believes_the_forwarded_address_only_from_a_trusted_proxy() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Default trusted_proxies: loopback, where the balancer connects from.
    let trusting_log = log_path(&dir, "trusting");
    let (_trusting, trusting_addr) = node("trusting", &trusting_log, &[]).await?;
    // This one trusts only a range the balancer is not in.
    let wary_log = log_path(&dir, "wary");
    let (_wary, wary_addr) = node("wary", &wary_log, &["--trusted-proxies", "10.0.0.0/8"]).await?;

    let args = ["--proxy-protocol".to_owned(), "v1".to_owned()];
    let lb_trusting = BalancerProcess::start(&[("trusting".into(), trusting_addr)], &args).await?;
    let lb_wary = BalancerProcess::start(&[("wary".into(), wary_addr)], &args).await?;

    connect_as(lb_trusting.addr(), "203.0.113.50", "via-trusted").await?;
    let (peer, tcp_peer) = logged_peer(&trusting_log, "via-trusted").await?;
    assert_eq!(peer, "203.0.113.50", "the address the PROXY header named");
    assert!(tcp_peer.starts_with("127.0.0.1:"), "{tcp_peer}");

    connect_as(lb_wary.addr(), "203.0.113.51", "via-untrusted").await?;
    let (peer, tcp_peer) = logged_peer(&wary_log, "via-untrusted").await?;
    assert_eq!(peer, tcp_peer, "an untrusted peer is the client: its own address, port and all");
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");
    Ok(())
}
