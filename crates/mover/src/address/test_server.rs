//! A loopback HTTP server for the unit tests of the guarded client and the checked proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// What reached the server: the request heads it answered and every byte it received, so a
/// test can tell that not even part of a request was written to it.
#[derive(Clone, Default)]
pub struct Reached {
    requests: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
}

impl Reached {
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }
}

/// Starts a server on loopback that answers every request with a 3-byte body.
pub async fn start() -> (SocketAddr, Reached) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let reached = Reached::default();
    let counters = reached.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counters = counters.clone();
            tokio::spawn(async move {
                while let Ok((head, rest)) = super::proxy::read_head(&mut socket).await {
                    counters
                        .bytes
                        .fetch_add(head.len() + rest.len(), Ordering::SeqCst);
                    counters.requests.fetch_add(1, Ordering::SeqCst);
                    let answer = "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc";
                    if socket.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, reached)
}
