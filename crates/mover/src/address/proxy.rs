//! The [`AddressPolicy`] for a client that cannot take [`super::guard`]'s resolver, redirect
//! policy and connector layer: oci-client, which builds its own reqwest client from a config
//! whose only network hooks are its proxy URLs. So the mover runs a forward proxy of its own on
//! loopback and gives that client nothing else: every connection the client makes (to the
//! registry, its token realm, every redirect hop to a bucket or CDN, a manifest's foreign-layer
//! URLs) is asked of this proxy, and the proxy connects only to addresses the policy allows.
//!
//! The check is on the address the proxy itself connects to (a name is resolved here, and only
//! its allowed addresses are tried, so DNS rebinding does not help), with its port. HTTPS goes
//! through `CONNECT` (the proxy only relays the TLS bytes); plain HTTP is forwarded one request
//! per connection (`connection: close` both ways), so every request's destination is judged.
//! A refusal answers `403` and is kept: the client's error (a failed tunnel, a 403) then gives
//! way to it, so the copy fails with the sentence the policy wrote.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{AddressPolicy, AddressRefused};

/// Longest request or response head the proxy reads (registries send a few hundred bytes).
const MAX_HEAD: usize = 64 << 10;

/// Bytes relayed per read: a blob is gigabytes, and 8 KiB (tokio's default) would cost a core.
const RELAY: usize = 256 << 10;

/// How long a connection to a destination may take, as the other sources' connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The running proxy: its URL for the client, and the first refusal it made. Stops on drop.
pub struct CheckedProxy {
    pub url: String,
    refused: Arc<Mutex<Option<AddressRefused>>>,
    accepting: JoinHandle<()>,
}

impl CheckedProxy {
    /// Listens on a free loopback port (the mover's own; nothing else in the copy Pod runs).
    pub async fn start(policy: Arc<AddressPolicy>) -> std::io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let refused = Arc::new(Mutex::new(None));
        let kept = Arc::clone(&refused);
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let policy = Arc::clone(&policy);
                let kept = Arc::clone(&kept);
                tokio::spawn(async move {
                    // A broken client connection is the client's error to report.
                    let _ = serve(client, &policy, &kept).await;
                });
            }
        });
        Ok(Self {
            url,
            refused,
            accepting,
        })
    }

    /// The first destination refused, if any.
    pub fn refusal(&self) -> Option<AddressRefused> {
        self.refused.lock().ok().and_then(|r| r.clone())
    }
}

impl Drop for CheckedProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// One client connection: a `CONNECT` tunnel, or one forwarded plain-HTTP request.
async fn serve(
    mut client: TcpStream,
    policy: &AddressPolicy,
    refused: &Mutex<Option<AddressRefused>>,
) -> std::io::Result<()> {
    let (head, rest) = read_head(&mut client).await?;
    let Some(request) = Request::parse(&head) else {
        return answer(&mut client, "400 Bad Request").await;
    };
    let Some((host, port)) = request.destination() else {
        return answer(&mut client, "400 Bad Request").await;
    };
    let mut upstream = match connect(policy, &host, port).await {
        Ok(upstream) => upstream,
        Err(Failure::Refused(refusal)) => {
            if let Ok(mut slot) = refused.lock() {
                slot.get_or_insert(refusal);
            }
            return answer(&mut client, "403 Forbidden").await;
        }
        Err(Failure::Unreachable) => return answer(&mut client, "502 Bad Gateway").await,
    };
    if request.method == "CONNECT" {
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        upstream.write_all(&rest).await?;
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, RELAY, RELAY).await?;
        return Ok(());
    }
    upstream.write_all(request.origin_form().as_bytes()).await?;
    upstream.write_all(&rest).await?;
    let (response, body) = read_head(&mut upstream).await?;
    client.write_all(&closing(&response)).await?;
    client.write_all(&body).await?;
    let mut upstream = tokio::io::BufReader::with_capacity(RELAY, upstream);
    tokio::io::copy_buf(&mut upstream, &mut client).await?;
    client.shutdown().await
}

/// A request head: its request line and header lines.
struct Request {
    method: String,
    target: String,
    version: String,
    headers: Vec<String>,
}

impl Request {
    fn parse(head: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(head).ok()?;
        let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
        let mut first = lines.next()?.split_whitespace();
        let (method, target, version) = (first.next()?, first.next()?, first.next()?);
        Some(Self {
            method: method.to_owned(),
            target: target.to_owned(),
            version: version.to_owned(),
            headers: lines.map(str::to_owned).collect(),
        })
    }

    /// Host and port to connect to: a `CONNECT`'s authority, or a plain-HTTP absolute URL's.
    fn destination(&self) -> Option<(String, u16)> {
        if self.method == "CONNECT" {
            let (host, port) = self.target.rsplit_once(':')?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            return Some((host.to_owned(), port.parse().ok()?));
        }
        let url = url::Url::parse(&self.target).ok()?;
        if url.scheme() != "http" {
            return None;
        }
        let host = match url.host()? {
            url::Host::Ipv6(ip) => ip.to_string(),
            other => other.to_string(),
        };
        Some((host, url.port_or_known_default()?))
    }

    /// The request as the destination expects it: path and query only, the proxy's own headers
    /// dropped, and the connection closed after the answer.
    fn origin_form(&self) -> String {
        let path = url::Url::parse(&self.target)
            .map(|url| url[url::Position::BeforePath..].to_owned())
            .unwrap_or_else(|_| "/".to_owned());
        let mut head = format!("{} {path} {}\r\n", self.method, self.version);
        for line in self.headers.iter().filter(|l| !hop_by_hop(l)) {
            head.push_str(line);
            head.push_str("\r\n");
        }
        head.push_str("connection: close\r\n\r\n");
        head
    }
}

/// Headers that belong to one connection (or to the proxy), never forwarded.
fn hop_by_hop(line: &str) -> bool {
    let name = line.split(':').next().unwrap_or_default().trim();
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// A response head with `connection: close`, so the client opens (and the proxy judges) a new
/// connection for its next request.
fn closing(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text
        .split("\r\n")
        .filter(|l| !l.is_empty() && !hop_by_hop(l))
    {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("connection: close\r\n\r\n");
    out.into_bytes()
}

/// Reads up to the end of a head (`\r\n\r\n`): the head, and the bytes read past it.
pub(super) async fn read_head(stream: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buffer.split_off(end + 4);
            return Ok((buffer, rest));
        }
        if buffer.len() > MAX_HEAD {
            return Err(std::io::Error::other("head too long"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

async fn answer(client: &mut TcpStream, status: &str) -> std::io::Result<()> {
    let head = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    client.write_all(head.as_bytes()).await?;
    client.shutdown().await
}

enum Failure {
    Refused(AddressRefused),
    Unreachable,
}

/// Connects to `host:port` at an address the policy allows: an IP literal is judged as it is;
/// a name is resolved here, and only its allowed addresses are tried.
async fn connect(policy: &AddressPolicy, host: &str, port: u16) -> Result<TcpStream, Failure> {
    let candidates: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => {
            let address = SocketAddr::new(ip, port);
            policy.check(address).map_err(Failure::Refused)?;
            vec![address]
        }
        Err(_) => {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
                .await
                .map_err(|_| Failure::Unreachable)?
                .collect();
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|a| policy.check(*a).is_ok())
                .collect();
            if allowed.is_empty() && !resolved.is_empty() {
                let addresses = resolved
                    .iter()
                    .filter_map(|a| match policy.check(*a) {
                        Err(AddressRefused::Internal { class, .. }) => {
                            Some(format!("{} is {class}", a.ip()))
                        }
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let host = host.to_owned();
                return Err(Failure::Refused(AddressRefused::AllResolvedInternal {
                    host,
                    addresses,
                }));
            }
            allowed
        }
    };
    for address in candidates {
        if let Ok(Ok(stream)) =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await
        {
            return Ok(stream);
        }
    }
    Err(Failure::Unreachable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::test_server;

    async fn get_through(proxy: &CheckedProxy, url: &str) -> Result<String, reqwest::Error> {
        let client = reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(&proxy.url).expect("proxy"))
            .build()
            .expect("client");
        client
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    }

    #[tokio::test]
    async fn the_proxy_connects_only_where_the_policy_allows_and_keeps_the_refusal() {
        let (addr, reached) = test_server::start().await;
        let proxy = CheckedProxy::start(Arc::new(AddressPolicy::default()))
            .await
            .expect("proxy");
        let by_name = format!("http://localhost:{}/blob", addr.port());
        get_through(&proxy, &by_name)
            .await
            .expect_err("loopback by name");
        assert_eq!(reached.bytes(), 0, "no byte of a request reached it");
        let refused = proxy.refusal().expect("kept").to_string();
        assert!(
            refused.contains("localhost") && refused.contains("loopback"),
            "{refused}"
        );

        let literal = CheckedProxy::start(Arc::new(AddressPolicy::default()))
            .await
            .expect("proxy");
        get_through(&literal, &format!("http://{addr}/blob"))
            .await
            .expect_err("loopback literal");
        let refused = literal.refusal().expect("kept");
        assert!(
            matches!(&refused, AddressRefused::Internal { address, .. } if *address == addr.to_string()),
            "{refused}"
        );
        assert_eq!(reached.bytes(), 0, "no byte of a request reached it");

        let allowed = AddressPolicy::new(vec![addr.to_string().parse().expect("entry")]);
        let proxy = CheckedProxy::start(Arc::new(allowed)).await.expect("proxy");
        for _ in 0..2 {
            let body = get_through(&proxy, &format!("http://{addr}/blob"))
                .await
                .expect("allowed endpoint");
            assert_eq!(body, "abc");
        }
        assert_eq!(reached.requests(), 2);
        assert!(proxy.refusal().is_none());
    }

    #[test]
    fn a_forwarded_request_goes_in_origin_form_without_the_proxys_headers() {
        let head = b"GET http://reg.example:5000/v2/a/blobs/sha256:1?x=1 HTTP/1.1\r\nhost: reg.example:5000\r\nproxy-connection: keep-alive\r\nconnection: keep-alive\r\naccept: */*\r\n\r\n";
        let request = Request::parse(head).expect("request");
        assert_eq!(
            request.destination(),
            Some(("reg.example".to_owned(), 5000))
        );
        assert_eq!(
            request.origin_form(),
            "GET /v2/a/blobs/sha256:1?x=1 HTTP/1.1\r\nhost: reg.example:5000\r\naccept: */*\r\nconnection: close\r\n\r\n"
        );
        let tunnel = Request::parse(b"CONNECT [::1]:443 HTTP/1.1\r\nhost: [::1]:443\r\n\r\n");
        assert_eq!(
            tunnel.expect("connect").destination(),
            Some(("::1".to_owned(), 443))
        );
    }
}
