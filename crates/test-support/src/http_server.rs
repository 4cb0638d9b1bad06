//! A real HTTP server (on loopback unless told another address) serving a folder (with Range support, from tower-http), plus
//! routes that misbehave the ways a real source does: a body cut short, a slow body, a file
//! behind basic auth, a source that fails at random and counts how it failed, one that lies
//! about its size, and a redirect to anywhere. It counts the requests it receives.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::services::ServeDir;

/// A server over a temporary folder; stops when dropped.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// How the `/unreliable/` route answered so far.
    pub unreliable: Arc<UnreliableTally>,
    requests: Arc<AtomicUsize>,
    redirects: Redirects,
    _served: Served,
}

/// An axum app served on loopback; stops when dropped.
pub struct Served {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    /// Serves `app` on a free port of `ip`.
    pub async fn start(ip: IpAddr, app: Router) -> Self {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, task }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where each `/redirect/<name>` points. A table rather than a query parameter: the mover
/// reads an HTTP source by its path (object_store drops a URL's query).
type Redirects = Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>;

/// Credentials of the `/private/` route.
pub const USER: &str = "reader";
pub const PASSWORD: &str = "s3cret";

impl HttpServer {
    /// A server on the tests' source address ([`super::source_ip`]): loopback, or the node's
    /// address when Jobs run on the node.
    pub async fn start() -> Self {
        Self::start_on(super::source_ip()).await
    }

    /// A server on another address: another loopback one (127.0.0.2, say) to tell two servers
    /// apart as the mover's allowlist does, or the node's address (`node::Node::ip`), the one
    /// address of this machine that Pods on the real node reach.
    pub async fn start_on(ip: IpAddr) -> Self {
        let dir = tempfile::tempdir().expect("server folder");
        let root = dir.path().to_owned();
        let unreliable = Arc::new(UnreliableTally::default());
        let unreliable_route = Router::new()
            .route("/unreliable/{file}", get(unreliable_source))
            .with_state((root.clone(), unreliable.clone()));
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let redirects = Redirects::default();
        let table = redirects.clone();
        let app = Router::new()
            .route("/truncated/{file}", get(truncated))
            .route("/flaky/{file}", get(flaky))
            .route("/slow/{file}", get(slow))
            .route("/private/{file}", get(private))
            .merge(unreliable_route)
            .route("/lying/{file}", get(lying))
            .route(
                "/redirect/{name}",
                get(move |Path(name): Path<String>| redirect(table.clone(), name)),
            )
            .fallback_service(ServeDir::new(&root))
            .with_state(root)
            .layer(axum::middleware::from_fn(
                move |request: axum::extract::Request, next: axum::middleware::Next| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    next.run(request)
                },
            ));
        let served = Served::start(ip, app).await;
        Self {
            addr: served.addr,
            dir,
            unreliable,
            requests,
            redirects,
            _served: served,
        }
    }

    /// Requests received so far, of any method and path.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// A URL of this server, `/redirect/<name>`, that answers `302 Found` to `target`.
    pub fn redirect(&self, name: &str, target: &str) -> String {
        self.redirects
            .lock()
            .expect("redirect table")
            .insert(name.to_owned(), target.to_owned());
        self.url(&format!("redirect/{name}"))
    }

    /// Writes `bytes` as `name` in the served folder.
    pub fn put(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.path().join(name), bytes).expect("write served file");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }
}

type Root = State<std::path::PathBuf>;

fn read(root: &std::path::Path, file: &str) -> Option<Vec<u8>> {
    std::fs::read(root.join(file)).ok()
}

/// Announces the whole file, sends half, then breaks the connection; ignores Range headers, so
/// the copy cannot resume: a source that never delivers the whole file.
async fn truncated(State(root): Root, Path(file): Path<String>) -> Response {
    let Some(bytes) = read(&root, &file) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    cut_short(&bytes, bytes.len())
}

/// Breaks the first, whole-file response halfway, like a flaky link, and serves Range requests
/// in full: a copy that resumes gets every byte.
async fn flaky(State(root): Root, Path(file): Path<String>, headers: HeaderMap) -> Response {
    let Some(bytes) = read(&root, &file) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let range_start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse::<usize>().ok());
    let Some(start) = range_start.filter(|s| *s < bytes.len()) else {
        return cut_short(&bytes, bytes.len());
    };
    let range = format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len());
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header(header::CONTENT_RANGE, range)
        .header(header::ACCEPT_RANGES, "bytes")
        .body(Body::from(bytes[start..].to_vec()))
        .expect("response")
}

fn cut_short(bytes: &[u8], announced: usize) -> Response {
    let half = bytes[..bytes.len() / 2].to_vec();
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(half)]).chain(
        futures::stream::once(async { Err(std::io::Error::other("connection reset")) }),
    );
    Response::builder()
        .header(header::CONTENT_LENGTH, announced)
        .header(header::ACCEPT_RANGES, "bytes")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// What the `/unreliable/` route answered to GET requests, counted as it answered, so that a
/// test reports the failure rate its run met rather than the one it asked for.
#[derive(Default, Debug)]
pub struct UnreliableTally {
    pub requests: AtomicU32,
    pub unavailable: AtomicU32,
    pub cut_short: AtomicU32,
    pub stale: AtomicU32,
    /// Files answered at least once: the first answer for each is stale.
    answered: Mutex<BTreeSet<String>>,
}

impl UnreliableTally {
    /// Requests answered with a failure of any kind.
    pub fn failed(&self) -> u32 {
        [&self.unavailable, &self.cut_short, &self.stale]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    fn first_answer_for(&self, file: &str) -> bool {
        self.answered.lock().unwrap().insert(file.to_owned())
    }
}

/// Fails the ways a source under load does: about 10 % of GETs get a 503 (which the mover's
/// client retries), 10 % a body cut short (whose resume meets the same odds) and 10 % a whole
/// body with one byte wrong, as a stale mirror or a broken proxy sends: the copy completes but
/// fails verification, so the operator must retry with a new Job. The first GET of each file is
/// always stale, so every run exercises that retry. HEAD is answered truthfully.
async fn unreliable_source(
    State((root, tally)): State<(std::path::PathBuf, Arc<UnreliableTally>)>,
    Path(file): Path<String>,
    method: Method,
) -> Response {
    let Some(mut bytes) = read(&root, &file) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if method != Method::GET {
        return whole(bytes);
    }
    tally.requests.fetch_add(1, Ordering::Relaxed);
    let roll = if tally.first_answer_for(&file) {
        25
    } else {
        random_below(100)
    };
    match roll {
        0..10 => {
            tally.unavailable.fetch_add(1, Ordering::Relaxed);
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        10..20 => {
            tally.cut_short.fetch_add(1, Ordering::Relaxed);
            cut_short(&bytes, bytes.len())
        }
        20..30 => {
            tally.stale.fetch_add(1, Ordering::Relaxed);
            if let Some(last) = bytes.last_mut() {
                *last ^= 0xff;
            }
            whole(bytes)
        }
        _ => whole(bytes),
    }
}

fn whole(bytes: Vec<u8>) -> Response {
    Response::builder()
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(Body::from(bytes))
        .expect("response")
}

/// A well-spread random number below `bound` (std's hasher is randomly seeded).
pub fn random_below(bound: u64) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now()) % bound.max(1)
}

/// Sends the file in 64 KiB pieces, 50 ms apart.
async fn slow(State(root): Root, Path(file): Path<String>) -> Response {
    let Some(bytes) = read(&root, &file) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let len = bytes.len();
    let chunks: Vec<Vec<u8>> = bytes.chunks(64 << 10).map(<[u8]>::to_vec).collect();
    let stream = futures::stream::iter(chunks).then(|chunk| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok::<_, std::io::Error>(chunk)
    });
    Response::builder()
        .header(header::CONTENT_LENGTH, len)
        .body(Body::from_stream(stream))
        .expect("response")
}

/// What `/lying/` announces to a HEAD, whatever the file's size.
pub const LYING_HEAD_BYTES: u64 = 1024;

/// Answers a HEAD with [`LYING_HEAD_BYTES`] and a GET with the whole file: a source that gets a
/// small reservation and then tries to fill the store.
async fn lying(State(root): Root, Path(file): Path<String>, method: Method) -> Response {
    let Some(bytes) = read(&root, &file) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let announced = if method == Method::HEAD {
        LYING_HEAD_BYTES as usize
    } else {
        bytes.len()
    };
    Response::builder()
        .header(header::CONTENT_LENGTH, announced)
        .body(Body::from(bytes))
        .expect("response")
}

/// `302 Found` to where the table says `name` points.
async fn redirect(table: Redirects, name: String) -> Response {
    let Some(target) = table.lock().expect("redirect table").get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, target)
        .body(Body::empty())
        .expect("response")
}

/// Serves the file only with the right basic-auth credentials.
async fn private(State(root): Root, Path(file): Path<String>, headers: HeaderMap) -> Response {
    use base64::Engine;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    );
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if given != Some(expected.as_str()) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match read(&root, &file) {
        Some(bytes) => bytes.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

use futures::StreamExt;
