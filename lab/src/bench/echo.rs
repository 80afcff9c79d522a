//! `tether bench echo-backend`: the WebSocket echo server behind the proxies in
//! `tether bench proxies`.
//!
//! Every proxy under test (and the direct connection that is the floor) talks to the same two
//! processes of this, so what differs between the targets is the proxy alone. It is kept
//! cheap — one read buffer per connection, frames echoed without reassembly, all echoes of
//! one read written with one `write` — so that on a two-core machine it takes as little CPU
//! from the proxy as it can. It answers any plain HTTP request (the balancer's `GET /readyz`
//! probes) with `200 ok`.
//!
//! Ready line on stdout: `tether-echo ready listen=127.0.0.1:PORT`. It exits when its stdin
//! closes, on SIGTERM and on Ctrl-C.

use super::args::EchoArgs;
use super::wsraw::{self, Decoder, OP_CLOSE, OP_PING, OP_PONG};
use anyhow::{Context, Result};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;

/// The program name in the ready line.
pub const PROGRAM: &str = "tether-echo";
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head.
const MAX_HEAD: usize = 16 * 1024;
/// Read size per connection.
const READ_CHUNK: usize = 4096;

/// `tether bench echo-backend`: binds, prints the ready line, serves until stdin closes or a
/// signal arrives.
pub async fn run_cli(args: EchoArgs) -> Result<i32> {
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("{PROGRAM} ready listen={addr}");
    let stop = CancellationToken::new();
    let serving = tokio::spawn(serve(listener, stop.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        // EOF (or an error) on stdin: our parent is gone or done with us.
        _ = async { while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {} } => {}
    }
    stop.cancel();
    let _ = serving.await;
    Ok(0)
}

/// Accepts until `stop`; every connection runs in its own task.
pub async fn serve(listener: TcpListener, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                tokio::spawn(async move {
                    if let Err(e) = handle(stream).await {
                        tracing::debug!(%peer, error = %e, "echo connection ended");
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off rather than spin; the loop never ends on an error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Binds `addr` and serves in a background task; returns the bound address (for tests).
pub async fn spawn_in_process(addr: SocketAddr, stop: CancellationToken) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, stop));
    Ok(bound)
}

async fn handle(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let end = tokio::time::timeout(HEAD_TIMEOUT, async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the request head"));
            }
            head.extend_from_slice(&chunk[..n]);
            if let Some(at) = wsraw::find(&head, b"\r\n\r\n") {
                return Ok(at + 4);
            }
            if head.len() > MAX_HEAD {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too long"));
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request head"))??;
    let text = String::from_utf8_lossy(&head[..end]);
    let upgrade = header(&text, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = header(&text, "sec-websocket-key");
    let Some(key) = key.filter(|_| upgrade) else {
        stream
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
            )
            .await?;
        return stream.shutdown().await;
    };
    let accept = derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await?;
    let mut decoder = Decoder::with_bytes(&head[end..]);
    drop(head);
    let mut out = Vec::with_capacity(256);
    loop {
        while let Some(frame) = decoder.next_frame()? {
            let payload = decoder.payload(&frame);
            match frame.opcode {
                OP_PING => wsraw::encode(&mut out, OP_PONG, payload, None),
                OP_PONG => {}
                OP_CLOSE => {
                    let reply = &payload[..payload.len().min(125)];
                    wsraw::encode(&mut out, OP_CLOSE, reply, None);
                    stream.write_all(&out).await?;
                    return stream.shutdown().await;
                }
                // Data frames go back as they came (the load generators send whole messages
                // in single frames, so FIN is always set).
                op => wsraw::encode(&mut out, op, payload, None),
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
            if out.capacity() > 64 * 1024 {
                out.shrink_to(256);
            }
        }
        if decoder.pending() == 0 {
            // Idle connections wait without a read buffer.
            decoder = Decoder::default();
            stream.readable().await?;
        }
        if decoder.read_from(&mut stream, READ_CHUNK).await? == 0 {
            return Ok(());
        }
    }
}

/// The value of header `name` (lowercase) in a request head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    #[tokio::test]
    async fn echoes_to_a_real_websocket_client_and_answers_probes() -> Result<()> {
        let stop = CancellationToken::new();
        let addr = spawn_in_process("127.0.0.1:0".parse()?, stop.clone()).await?;
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?client=a")).await?;
        for text in ["hello", &"x".repeat(70_000)] {
            ws.send(Message::text(text)).await?;
            match ws.next().await {
                Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), text),
                other => panic!("unexpected {other:?}"),
            }
        }
        ws.send(Message::binary(vec![1u8, 2, 3])).await?;
        assert!(matches!(ws.next().await, Some(Ok(Message::Binary(b))) if b[..] == [1, 2, 3]));
        ws.close(None).await?;

        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

        let mut raw = wsraw::connect(addr, None, "/ws").await?;
        let mut frame = Vec::new();
        wsraw::encode(&mut frame, wsraw::OP_BINARY, &[7u8; 64], Some(wsraw::mask_for(3)));
        raw.stream.write_all(&frame).await?;
        loop {
            if let Some(f) = raw.decoder.next_frame()? {
                assert_eq!(raw.decoder.payload(&f), &[7u8; 64]);
                break;
            }
            assert!(raw.decoder.read_from(&mut raw.stream, 4096).await? > 0);
        }
        stop.cancel();
        Ok(())
    }
}
