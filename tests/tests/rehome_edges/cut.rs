//! A TCP proxy between the balancer and one node that can make the node "die" in the middle of
//! a WebSocket frame, deterministically: once armed, it forwards the first half of the next
//! node → balancer `message` frame, then closes both sides of that connection.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

pub struct CutProxy {
    pub addr: SocketAddr,
    armed: Arc<AtomicBool>,
    cut: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let armed = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(Notify::new());
        let task = tokio::spawn({
            let (armed, cut) = (armed.clone(), cut.clone());
            async move {
                while let Ok((down, _)) = listener.accept().await {
                    let (armed, cut) = (armed.clone(), cut.clone());
                    tokio::spawn(async move {
                        if let Ok(up) = TcpStream::connect(upstream).await {
                            relay(down, up, armed, cut).await;
                        }
                    });
                }
            }
        });
        Ok(Self { addr, armed, cut, task })
    }

    /// The next `message` frame a node sends over any WebSocket through here is cut in half.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Waits for the cut to have happened.
    pub async fn cut_done(&self) -> Result<()> {
        tokio::time::timeout(tether_tests::DEADLINE, self.cut.notified()).await.context("the proxy never cut a frame")
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(balancer: TcpStream, node: TcpStream, armed: Arc<AtomicBool>, cut: Arc<Notify>) {
    let (mut brx, mut btx) = balancer.into_split();
    let (mut nrx, mut ntx) = node.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut brx, &mut ntx).await;
    });
    let mut buf = Vec::new();
    let mut upgraded = false;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match nrx.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if !upgraded {
            // Until the 101's header block ends, bytes pass through as they come.
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                if btx.write_all(&buf).await.is_err() {
                    break;
                }
                buf.clear();
                continue;
            };
            upgraded = buf.starts_with(b"HTTP/1.1 101");
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            if btx.write_all(&head).await.is_err() {
                break;
            }
            if !upgraded {
                if btx.write_all(&buf).await.is_err() {
                    break;
                }
                buf.clear();
                continue;
            }
        }
        // Whole server frames pass; the armed cut takes the first message frame.
        let mut at = 0;
        let mut cut_now = None;
        while let Some(len) = frame_len(&buf[at..]) {
            if buf.len() - at < len {
                break;
            }
            let frame = &buf[at..at + len];
            if armed.load(Ordering::SeqCst) && contains(frame, br#""type":"message""#) {
                cut_now = Some(at + len / 2);
                break;
            }
            at += len;
        }
        let upto = cut_now.unwrap_or(at);
        if btx.write_all(&buf[..upto]).await.is_err() {
            break;
        }
        buf.drain(..upto);
        if cut_now.is_some() {
            armed.store(false, Ordering::SeqCst);
            let _ = btx.flush().await;
            cut.notify_one();
            break;
        }
    }
    up.abort();
    // Dropping both halves closes the balancer's side and the node's.
}

/// The length of the unmasked frame at the start of `b`, once its header is there.
fn frame_len(b: &[u8]) -> Option<usize> {
    if b.len() < 2 {
        return None;
    }
    let (len, header) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    Some(header + len)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A masked client text frame, as a browser would send it.
pub fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    let len = payload.len();
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len < 65536 {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let key = [0x37, 0xfa, 0x21, 0x3d];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}
