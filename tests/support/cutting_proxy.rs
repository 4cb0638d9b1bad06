//! A TCP proxy on loopback that drops every connection once it has forwarded a given number of
//! bytes towards the client: a flaky link in the middle of a large download, for the resume
//! rules of the data mover. Requests pass untouched; connections are counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy; stops accepting when dropped.
pub struct CuttingProxy {
    pub addr: SocketAddr,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CuttingProxy {
    /// Forwards to `upstream`, closing each connection after `bytes` towards the client.
    pub async fn start(upstream: SocketAddr, bytes: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("address");
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(forward(client, upstream, bytes));
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

async fn forward(client: TcpStream, upstream: SocketAddr, limit: u64) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    };
    let answers = async {
        let mut buffer = vec![0; 64 << 10];
        let mut sent = 0u64;
        while sent < limit {
            let room = usize::try_from(limit - sent)
                .unwrap_or(usize::MAX)
                .min(buffer.len());
            let n = match server_read.read(&mut buffer[..room]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if client_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
            sent += n as u64;
        }
    };
    // Whichever side ends first ends the connection: past the limit, the client sees it drop.
    tokio::select! {
        () = requests => {}
        () = answers => {}
    }
}
