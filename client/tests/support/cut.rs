//! A TCP relay between a client and the balancer that can lose what the node sends: once
//! [`CutProxy::blind_open_connections`] is called, every byte the upstream sends on the
//! connections open at that moment is dropped instead of relayed. Connections made later
//! relay normally. So a test can make a node publish a client's message while the echo never
//! reaches the client — the echo lost with a dying node, deterministically.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct CutProxy {
    /// `ws://ADDR/ws` of the relay.
    pub url: String,
    /// One flag per connection made so far: drop what upstream sends.
    blind: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl CutProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let blind: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let conns = Arc::clone(&blind);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let flag = Arc::new(AtomicBool::new(false));
                conns.lock().expect("flags").push(Arc::clone(&flag));
                tokio::spawn(relay(client, upstream, flag));
            }
        });
        Self { url: format!("ws://{addr}/ws"), blind }
    }

    /// From now on, what upstream sends on every connection open now is dropped.
    pub fn blind_open_connections(&self) {
        for flag in self.blind.lock().expect("flags").iter() {
            flag.store(true, Relaxed);
        }
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, blind: Arc<AtomicBool>) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async move {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) if !blind.load(Relaxed) => {
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {} // lost on the way
            }
        }
        // The upstream is gone (the node died): so is the client's connection.
        let _ = cw.shutdown().await;
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}
