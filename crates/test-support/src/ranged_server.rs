//! A real HTTP server on loopback that serves objects the way a mirror or CDN does (strong ETag,
//! single `Range`, `If-Match` answered with 412), plus routes that behave the ways a parallel
//! download must cope with. It logs every request so a test can see what the mover asked for.
//!
//! - `/files/<name>`: the well-behaved server.
//! - `/no-range/<name>`: ignores `Range`, answers 200 with the whole object.
//! - `/no-etag/<name>`: serves ranges but names no version.
//! - `/changing/<name>`: the object is replaced by another version (other bytes, other ETag)
//!   right after the third ranged request, as if someone uploaded a new image mid-copy.
//! - `/breaking/<name>`: the first answer for a range ending at any offset is cut halfway, like
//!   a flaky link; asking again for the rest of that range works.
//! - `/long-parts/<name>`: announces the object truthfully (HEAD, `Content-Range`), but answers
//!   each ranged GET with twice the bytes asked for: a source trying to write past the room
//!   reserved for it.
//! - `/stalling/<name>`: every GET answer sends its first 64 KiB, then nothing, holding the
//!   connection open: a source that stalls without closing.
//! - `/late-part/<name>`: the answer for the range starting at [`LATE_PART_AT`] comes
//!   [`LATE_BY`] late; every other answer at once. A part that holds the hashed front while
//!   the parts after it land.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::StreamExt;

use super::http_server::Served;

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub route: String,
    pub range: Option<(u64, u64)>,
    pub if_match: Option<String>,
    pub status: u16,
}

#[derive(Default)]
struct Objects {
    current: HashMap<String, (Bytes, String)>,
    /// What `/changing/` serves once it has changed.
    next: HashMap<String, Bytes>,
    ranged_requests: usize,
    broken_once: HashSet<(String, u64)>,
    log: Vec<Seen>,
}

type Shared = Arc<Mutex<Objects>>;

/// A running server; stops when dropped.
pub struct RangedServer {
    pub addr: SocketAddr,
    objects: Shared,
    _served: Served,
}

impl RangedServer {
    pub async fn start() -> Self {
        let objects = Shared::default();
        let app = Router::new()
            .route("/{route}/{name}", get(serve))
            .with_state(objects.clone());
        let served = Served::start(super::source_ip(), app).await;
        Self {
            addr: served.addr,
            objects,
            _served: served,
        }
    }

    /// Serves `bytes` as `name`, with a fresh ETag.
    pub fn put(&self, name: &str, bytes: impl Into<Bytes>) {
        let bytes = bytes.into();
        let tag = format!("\"{name}-{:x}\"", fingerprint(&bytes));
        let mut objects = self.objects.lock().expect("objects");
        objects.current.insert(name.to_owned(), (bytes, tag));
    }

    /// What `/changing/<name>` becomes after its third ranged request.
    pub fn put_next_version(&self, name: &str, bytes: impl Into<Bytes>) {
        let mut objects = self.objects.lock().expect("objects");
        objects.next.insert(name.to_owned(), bytes.into());
    }

    /// The ETag `name` is served with now.
    pub fn etag(&self, name: &str) -> String {
        let objects = self.objects.lock().expect("objects");
        objects.current.get(name).expect("object").1.clone()
    }

    pub fn url(&self, route: &str, name: &str) -> String {
        format!("http://{}/{route}/{name}", self.addr)
    }

    /// Every GET so far (HEADs left out).
    pub fn gets(&self) -> Vec<Seen> {
        self.objects.lock().expect("objects").log.clone()
    }
}

/// Enough to tell two versions apart in an ETag.
fn fingerprint(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

async fn serve(
    State(objects): State<Shared>,
    Path((route, name)): Path<(String, String)>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Response {
    let requested = parse_range(&headers);
    let if_match = header_text(&headers, header::IF_MATCH);
    let mut shared = objects.lock().expect("objects");
    let Some((bytes, tag)) = shared.current.get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let size = bytes.len() as u64;
    let honours_range = route != "no-range";
    let range = requested
        .filter(|_| honours_range)
        .map(|(start, end)| (start, end.unwrap_or(size - 1).min(size - 1)));
    let precondition_failed = if_match.as_ref().is_some_and(|m| *m != tag);
    let status = match () {
        _ if precondition_failed => StatusCode::PRECONDITION_FAILED,
        _ if range.is_some() => StatusCode::PARTIAL_CONTENT,
        _ => StatusCode::OK,
    };
    if method == axum::http::Method::GET {
        shared.log.push(Seen {
            route: route.clone(),
            range,
            if_match: if_match.clone(),
            status: status.as_u16(),
        });
        if range.is_some() {
            shared.ranged_requests += 1;
        }
        if route == "changing" && shared.ranged_requests == 3 {
            let next = shared.next.get(&name).cloned().unwrap_or_default();
            let next_tag = format!("\"{name}-{:x}\"", fingerprint(&next));
            shared.current.insert(name.clone(), (next, next_tag));
        }
    }
    if status == StatusCode::PRECONDITION_FAILED {
        return status.into_response();
    }
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let body = if size == 0 {
        Bytes::new()
    } else {
        bytes.slice(start as usize..=end as usize)
    };
    let cut = route == "breaking"
        && method == axum::http::Method::GET
        && shared.broken_once.insert((name.clone(), end));
    drop(shared);
    let sent = match route.as_str() {
        "long-parts" if status == StatusCode::PARTIAL_CONTENT => 2 * body.len(),
        _ => body.len(),
    };
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, sent)
        .header(header::ACCEPT_RANGES, "bytes");
    if route != "no-etag" {
        response = response.header(header::ETAG, &tag);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        response = response.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
    }
    let body = if route == "long-parts" && status == StatusCode::PARTIAL_CONTENT {
        Body::from([body.clone(), body].concat())
    } else if route == "stalling" && method == axum::http::Method::GET {
        stall_after(body, STALL_AFTER)
    } else if route == "late-part" && method == axum::http::Method::GET && start == LATE_PART_AT {
        arrive_late(body, LATE_BY)
    } else if cut {
        cut_halfway(body)
    } else {
        Body::from(body)
    };
    response.body(body).expect("response")
}

/// Where the range `/late-part/` answers late starts.
pub const LATE_PART_AT: u64 = 8 << 20;

/// How late `/late-part/` answers that range.
pub const LATE_BY: std::time::Duration = std::time::Duration::from_secs(6);

/// What `/stalling/` sends of each answer before it goes silent.
pub const STALL_AFTER: usize = 64 << 10;

/// Sends `body` once `late` has passed (the headers go at once).
fn arrive_late(body: Bytes, late: std::time::Duration) -> Body {
    let stream = futures::stream::once(async move {
        tokio::time::sleep(late).await;
        Ok::<_, std::io::Error>(body)
    });
    Body::from_stream(stream)
}

/// Sends the first `bytes` of `body`, then nothing, never closing.
fn stall_after(body: Bytes, bytes: usize) -> Body {
    let head = body.slice(..bytes.min(body.len()));
    let stream =
        futures::stream::iter([Ok::<_, std::io::Error>(head)]).chain(futures::stream::pending());
    Body::from_stream(stream)
}

/// Sends the first half of `body`, then breaks the connection (after a pause, so the half has
/// reached the client rather than died in a buffer with the connection).
fn cut_halfway(body: Bytes) -> Body {
    let half = body.slice(..body.len() / 2);
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(half)]).chain(
        futures::stream::once(async {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            Err(std::io::Error::other("connection reset"))
        }),
    );
    Body::from_stream(stream)
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `bytes=<start>-[<end>]`: the one form of Range the mover sends.
fn parse_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let spec = header_text(headers, header::RANGE)?;
    let (start, end) = spec.strip_prefix("bytes=")?.split_once('-')?;
    Some((start.parse().ok()?, end.parse().ok()))
}
