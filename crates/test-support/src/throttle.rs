//! A TCP proxy on loopback that shapes every connection towards the client, as a real link
//! does: at most a fixed rate, the way a remote object store or mirror serves one GET (loopback
//! has no such limit, so without it a benchmark cannot show what parallel streams buy), and/or a
//! cut once a given number of bytes went through (a flaky link in the middle of a large
//! download, for the mover's resume rules). It forwards bytes untouched (an S3 signature made for
//! the proxy's address stays valid) and counts connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Bytes forwarded in one go at most.
const SLICE: usize = 64 << 10;

/// How far a connection may run ahead of its rate before it sleeps, or lag behind it (idle
/// time) before it stops earning credit.
const SLACK: Duration = Duration::from_millis(10);

/// What a proxy does to each connection's answers.
#[derive(Clone, Copy)]
struct Shape {
    bytes_per_second: Option<u64>,
    cut_after: Option<u64>,
}

/// A running proxy; stops accepting when dropped.
pub struct ThrottleProxy {
    pub addr: SocketAddr,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ThrottleProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ThrottleProxy {
    /// Forwards to `upstream`, each connection at most `bytes_per_second` towards the client.
    pub async fn start(upstream: SocketAddr, bytes_per_second: u64) -> Self {
        let shape = Shape {
            bytes_per_second: Some(bytes_per_second),
            cut_after: None,
        };
        Self::shaping(upstream, shape).await
    }

    /// Forwards to `upstream` at full speed, closing each connection after `bytes` towards the
    /// client.
    pub async fn cutting(upstream: SocketAddr, bytes: u64) -> Self {
        let shape = Shape {
            bytes_per_second: None,
            cut_after: Some(bytes),
        };
        Self::shaping(upstream, shape).await
    }

    async fn shaping(upstream: SocketAddr, shape: Shape) -> Self {
        let listener = TcpListener::bind((super::source_ip(), 0))
            .await
            .expect("bind the source address");
        let addr = listener.local_addr().expect("address");
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(forward(client, upstream, shape));
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

async fn forward(client: TcpStream, upstream: SocketAddr, shape: Shape) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    };
    let answers = async {
        let mut buffer = vec![0; SLICE];
        let mut sent = 0u64;
        // When the connection may send again: no credit builds up while it idles.
        let mut ready = Instant::now();
        loop {
            let room = match shape.cut_after {
                Some(limit) => usize::try_from(limit - sent)
                    .unwrap_or(usize::MAX)
                    .min(SLICE),
                None => SLICE,
            };
            if room == 0 {
                // Past the cut-off: the connection drops, without a clean end.
                return;
            }
            let n = match server_read.read(&mut buffer[..room]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if client_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
            sent += n as u64;
            if let Some(rate) = shape.bytes_per_second {
                // A token bucket: `ready` moves by what was sent at the rate. Sleeping only
                // once it is a few ms ahead keeps the rate exact despite the timer's 1 ms grain
                // and reads smaller than a slice; the burst is those few ms.
                let cost = Duration::from_secs_f64(n as f64 / rate as f64);
                ready = ready.max(Instant::now() - SLACK) + cost;
                if ready > Instant::now() + SLACK {
                    tokio::time::sleep_until(ready).await;
                }
            }
        }
        let _ = client_write.shutdown().await;
    };
    if shape.cut_after.is_some() {
        // Whichever side ends first ends the connection: past the limit, the client sees it
        // drop.
        tokio::select! {
            () = requests => {}
            () = answers => {}
        }
    } else {
        tokio::join!(requests, answers);
    }
}
