//! Acquire, wait for and release a TemplateCache from an in-cluster controller written in Rust.
//!
//! A reference is the finalizer `ref.templatecache.io/<consumer-id>` on the cache (contract in
//! DESIGN.md); the reference count is the number of such entries, derived by the operator, never
//! counted up or down. All three calls are idempotent:
//!
//! - [`acquire`] creates the cache when it does not exist yet (one name per template, so there
//!   is never a second cache) and adds the consumer's entry, unless it is already there.
//! - [`Reference::wait_ready`] waits until the copy is Ready, or returns the failure once the
//!   operator gives up; it never hangs past its timeout.
//! - [`release`] removes the consumer's entry; releasing twice, or releasing what was never
//!   held, is a no-op.
//!
//! Patch strategy (numbers in `docs/design-notes.md`): an entry is added with a JSON patch
//! `test /metadata/resourceVersion` + `add /metadata/finalizers/-`, about 40 bytes per reference,
//! and removed with `test` + `remove` at its index. A write that meets a concurrent change fails
//! at once (nothing is lost, nothing is half-applied) and is retried after a jittered
//! exponential pause, so a storm of acquirers spreads out instead of making the API server
//! retry every patch against every other.

use std::time::Duration;

use kube::api::{GetParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::api::references::{InvalidConsumerId, consumer_reference};
use crate::api::{Phase, TemplateCache, TemplateCacheSpec};
use crate::controller::conditions::{READY, find};
use crate::controller::template_cache::lifecycle::reason;

/// Failures of acquire, wait and release, each a sentence a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    InvalidConsumerId(#[from] InvalidConsumerId),
    #[error("TemplateCache {0} does not exist and no spec was given to create it")]
    NotFound(String),
    #[error("TemplateCache {0} is being deleted and accepts no new references")]
    Deleting(String),
    #[error("TemplateCache {name} exists with a different source or checksum than requested")]
    SpecMismatch { name: String },
    #[error("copying TemplateCache {name} failed for good: {message}")]
    CopyFailed { name: String, message: String },
    #[error("TemplateCache {0} was deleted while waiting for it")]
    Deleted(String),
    #[error("TemplateCache {0} was not Ready within {1:?}")]
    Timeout(String, Duration),
    #[error(
        "TemplateCache {0} met a concurrent change or a transient error {1} times in a row; try again later"
    )]
    Contended(String, u32),
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
}

/// The cache to acquire: its namespace and name, and the spec to create it with if it does not
/// exist yet (`None` to require an existing cache).
#[derive(Clone, Debug)]
pub struct CacheRequest {
    pub namespace: String,
    pub name: String,
    pub spec: Option<TemplateCacheSpec>,
}

/// A reference held on a cache. Dropping it does not release it: references outlive processes
/// by design, so call [`Reference::release`] (or [`release`]) when done.
#[derive(Clone, Debug)]
pub struct Reference {
    api: Api<TemplateCache>,
    name: String,
    consumer_id: String,
    write_requests: u32,
}

/// Rounds an acquire retries through transient errors (with the backoff's 2 s cap, about two
/// minutes). Appends do not conflict, so this is rarely reached.
const MAX_ROUNDS: u32 = 64;

/// Rounds a release retries. Removal is by index under a `test`, and in a storm of releases
/// every removal below ours shifts our index, so a release may need many rounds (measured with
/// 500 simultaneous releases: some needed more than 64).
const MAX_RELEASE_ROUNDS: u32 = 512;

/// Adds the consumer's reference to the cache, creating the cache first if it does not exist.
pub async fn acquire(
    client: Client,
    request: &CacheRequest,
    consumer_id: &str,
) -> Result<Reference, ClientError> {
    let entry = consumer_reference(consumer_id)?;
    let api: Api<TemplateCache> = Api::namespaced(client, &request.namespace);
    let mut reference = Reference {
        api: api.clone(),
        name: request.name.clone(),
        consumer_id: consumer_id.to_owned(),
        write_requests: 0,
    };
    for round in 0..MAX_ROUNDS {
        match try_acquire(&api, request, &entry, &mut reference.write_requests).await {
            Ok(()) => return Ok(reference),
            Err(ClientError::Kube(e)) if is_retriable(&e) => {
                tokio::time::sleep(backoff(round)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(ClientError::Contended(request.name.clone(), MAX_ROUNDS))
}

/// One read-then-write round of [`acquire`].
async fn try_acquire(
    api: &Api<TemplateCache>,
    request: &CacheRequest,
    entry: &str,
    write_requests: &mut u32,
) -> Result<(), ClientError> {
    let Some(cache) = find_or_wait_for_creator(api, &request.name).await? else {
        let spec = request
            .spec
            .clone()
            .ok_or_else(|| ClientError::NotFound(request.name.clone()))?;
        // Losing the race to create (AlreadyExists, a 409) is retried as an append.
        *write_requests += 1;
        return Ok(create_with_reference(api, &request.name, spec, entry).await?);
    };
    check_acquirable(&cache, request)?;
    if cache.finalizers().iter().any(|f| f == entry) {
        return Ok(());
    }
    *write_requests += 1;
    append_reference(api, &cache, entry).await?;
    Ok(())
}

/// Reads the cache; when it does not exist, reads once more after a random pause. When many
/// consumers ask for a new template at the same moment, one of them creates it during that pause
/// and the rest append to it, instead of all sending a create that all but one lose (measured:
/// 1.9 write requests per acquire for 500 acquirers without the pause).
///
/// A create stays invisible for about as long as a request takes, and under a storm that is
/// seconds, not milliseconds: with a fixed 500 ms pause a slow API server lost 1.56 writes per
/// acquire to create races. So the pause is scaled by the read's own latency, which keeps the
/// share of consumers that race a create in flight near [`CREATOR_PAUSE_FACTOR`]⁻¹ at any load.
async fn find_or_wait_for_creator(
    api: &Api<TemplateCache>,
    name: &str,
) -> kube::Result<Option<TemplateCache>> {
    let started = std::time::Instant::now();
    if let Some(cache) = api.get_opt(name).await? {
        return Ok(Some(cache));
    }
    tokio::time::sleep(creator_pause(started.elapsed())).await;
    api.get_opt(name).await
}

/// How many request latencies the pause before a create may span.
const CREATOR_PAUSE_FACTOR: u32 = 8;

/// A uniform random pause up to [`CREATOR_PAUSE_FACTOR`] times `read_latency`, at least up to
/// 500 ms and at most up to 10 s (the pause is paid only by the first consumers of a new
/// template, once).
fn creator_pause(read_latency: Duration) -> Duration {
    let bound = (read_latency * CREATOR_PAUSE_FACTOR)
        .clamp(Duration::from_millis(500), Duration::from_secs(10));
    Duration::from_millis(random_below(bound.as_millis() as u64))
}

/// Removes the consumer's reference from the cache. A no-op when it holds none, or when the cache
/// is gone.
pub async fn release(
    client: Client,
    namespace: &str,
    name: &str,
    consumer_id: &str,
) -> Result<(), ClientError> {
    let entry = consumer_reference(consumer_id)?;
    let api: Api<TemplateCache> = Api::namespaced(client, namespace);
    remove_entry(&api, name, &entry).await
}

/// Removes every copy of the finalizer `entry` from the cache: a no-op when it holds none or is
/// gone. How the operator drops a Pod's reference too, so there is one way to release.
pub(crate) async fn remove_entry(
    api: &Api<TemplateCache>,
    name: &str,
    entry: &str,
) -> Result<(), ClientError> {
    for round in 0..MAX_RELEASE_ROUNDS {
        match try_release(api, name, entry).await {
            Ok(()) => return Ok(()),
            Err(e) if is_retriable(&e) => tokio::time::sleep(backoff(round)).await,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ClientError::Contended(name.to_owned(), MAX_RELEASE_ROUNDS))
}

/// Adds the finalizer `entry` to an existing cache unless it is there: how the operator takes a
/// reference for a Pod. Unlike [`acquire`] it never creates the cache.
///
/// Returns the cache as read with the entry in place, so what it says (Ready or not) already
/// holds under the reference.
pub(crate) async fn add_entry(
    api: &Api<TemplateCache>,
    name: &str,
    entry: &str,
) -> Result<TemplateCache, ClientError> {
    for round in 0..MAX_ROUNDS {
        let result = match api.get_opt(name).await {
            Ok(None) => return Err(ClientError::NotFound(name.to_owned())),
            Ok(Some(cache)) if cache.metadata.deletion_timestamp.is_some() => {
                return Err(ClientError::Deleting(name.to_owned()));
            }
            Ok(Some(cache)) if cache.finalizers().iter().any(|f| f == entry) => {
                return Ok(cache);
            }
            Ok(Some(cache)) => append_reference(api, &cache, entry).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(cache) => return Ok(cache),
            Err(e) if is_retriable(&e) => tokio::time::sleep(backoff(round)).await,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ClientError::Contended(name.to_owned(), MAX_ROUNDS))
}

/// One read-then-write round of [`release`].
async fn try_release(api: &Api<TemplateCache>, name: &str, entry: &str) -> kube::Result<()> {
    let Some(cache) = api.get_opt(name).await? else {
        return Ok(());
    };
    let indices: Vec<usize> = (cache.finalizers().iter().enumerate())
        .filter(|(_, f)| *f == entry)
        .map(|(i, _)| i)
        .collect();
    if indices.is_empty() {
        return Ok(());
    }
    match remove_entries(api, &cache, entry, &indices).await {
        // Gone between our read and our write: nothing left to release.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other,
    }
}

/// Errors worth another round: a concurrent change (409 Conflict or AlreadyExists, 422 from a
/// failed `test`), the object vanishing between read and write (404), the API server shedding
/// load (429) or failing transiently (5xx), and a dropped connection.
fn is_retriable(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(s) => matches!(s.code, 404 | 409 | 422 | 429 | 500 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

impl Reference {
    /// The cache's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Write requests (creates and patches, failed ones included) the acquire that made this
    /// reference sent: the cost of an acquire under contention.
    pub fn write_requests(&self) -> u32 {
        self.write_requests
    }

    /// Waits until the cache is Ready and returns it; fails when the operator has given up on the
    /// copy, when the cache is deleted, or after `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<TemplateCache, ClientError> {
        tokio::time::timeout(timeout, self.watch_until_settled())
            .await
            .map_err(|_| ClientError::Timeout(self.name.clone(), timeout))?
    }

    /// Releases this reference (see [`release`]).
    pub async fn release(self) -> Result<(), ClientError> {
        let namespace = self.api.namespace().unwrap_or_default().to_owned();
        release(
            self.api.into_client(),
            &namespace,
            &self.name,
            &self.consumer_id,
        )
        .await
    }

    /// Polls the API server's watch cache (a `resourceVersion=0` read) with a growing, jittered
    /// interval. A watch would be the usual choice, but every acquire rewrites the object, so N
    /// waiters watching one cache receive N full copies of it each: N² bytes for an acquire
    /// storm. Polling costs each waiter one small read per interval instead.
    async fn watch_until_settled(&self) -> Result<TemplateCache, ClientError> {
        let mut interval = Duration::from_millis(200);
        loop {
            let cache = match self.api.get_with(&self.name, &GetParams::any()).await {
                Ok(cache) => cache,
                // The watch cache may not have seen a cache created a moment ago: only a
                // quorum read can say it is gone.
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    match self.api.get_opt(&self.name).await? {
                        Some(cache) => cache,
                        None => return Err(ClientError::Deleted(self.name.clone())),
                    }
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(result) = settled(cache) {
                return result;
            }
            let jitter = Duration::from_millis(random_below(200));
            tokio::time::sleep(interval + jitter).await;
            interval = (interval * 3 / 2).min(Duration::from_secs(2));
        }
    }
}

/// `Some` once waiting is over: Ready, failed for good, or deleted.
fn settled(cache: TemplateCache) -> Option<Result<TemplateCache, ClientError>> {
    let name = cache.name_any();
    if cache.metadata.deletion_timestamp.is_some() {
        return Some(Err(ClientError::Deleted(name)));
    }
    let status = cache.status.as_ref()?;
    let ready = find(&status.conditions, READY)?;
    if ready.status == "True" && status.phase == Some(Phase::Ready) {
        return Some(Ok(cache));
    }
    if ready.reason == reason::RETRIES_EXHAUSTED {
        let message = ready.message.clone();
        return Some(Err(ClientError::CopyFailed { name, message }));
    }
    None
}

fn check_acquirable(cache: &TemplateCache, request: &CacheRequest) -> Result<(), ClientError> {
    if cache.metadata.deletion_timestamp.is_some() {
        return Err(ClientError::Deleting(request.name.clone()));
    }
    if let Some(spec) = &request.spec
        && (spec.source != cache.spec.source || spec.checksum != cache.spec.checksum)
    {
        return Err(ClientError::SpecMismatch {
            name: request.name.clone(),
        });
    }
    Ok(())
}

async fn create_with_reference(
    api: &Api<TemplateCache>,
    name: &str,
    spec: TemplateCacheSpec,
    entry: &str,
) -> Result<(), kube::Error> {
    let mut cache = TemplateCache::new(name, spec);
    cache.metadata.finalizers = Some(vec![entry.to_owned()]);
    api.create(&PostParams::default(), &cache).await.map(drop)
}

/// Appends `entry`. The server applies the append to the latest object, so concurrent appends
/// all land and none is lost; the one case that fails is an object with no finalizer list yet,
/// which is created under a resourceVersion test instead.
async fn append_reference(
    api: &Api<TemplateCache>,
    cache: &TemplateCache,
    entry: &str,
) -> Result<TemplateCache, kube::Error> {
    let ops = match &cache.metadata.finalizers {
        Some(_) => json!([{"op": "add", "path": "/metadata/finalizers/-", "value": entry}]),
        None => json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": cache.resource_version()},
            {"op": "add", "path": "/metadata/finalizers", "value": [entry]},
        ]),
    };
    json_patch(api, &cache.name_any(), ops).await
}

/// Removes `entry` at each of `indices`, testing each first, so a list that a concurrent release
/// shifted fails cleanly (422) and is read again.
async fn remove_entries(
    api: &Api<TemplateCache>,
    cache: &TemplateCache,
    entry: &str,
    indices: &[usize],
) -> Result<(), kube::Error> {
    let mut ops = vec![];
    // Highest index first, so earlier removals do not shift later ones.
    for index in indices.iter().rev() {
        let path = format!("/metadata/finalizers/{index}");
        ops.push(json!({"op": "test", "path": path, "value": entry}));
        ops.push(json!({"op": "remove", "path": path}));
    }
    json_patch(api, &cache.name_any(), serde_json::Value::Array(ops))
        .await
        .map(drop)
}

async fn json_patch(
    api: &Api<TemplateCache>,
    name: &str,
    ops: serde_json::Value,
) -> Result<TemplateCache, kube::Error> {
    let patch: json_patch::Patch = serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
}

/// Exponential backoff with full jitter (a uniform pause up to 10 ms × 2^round, capped at 2 s):
/// contending writers spread out instead of retrying in lockstep.
fn backoff(round: u32) -> Duration {
    let cap_ms = 10u64.saturating_mul(1 << round.min(8)).min(2_000);
    Duration::from_millis(random_below(cap_ms + 1))
}

/// A cheap, well-spread random number below `bound` (std's hasher is randomly seeded).
fn random_below(bound: u64) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now()) % bound.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_creator_pause_scales_with_the_read_latency_within_its_bounds() {
        let pauses = |latency| (0..200).map(move |_| creator_pause(latency));
        assert!(pauses(Duration::from_millis(1)).all(|p| p < Duration::from_millis(500)));
        assert!(pauses(Duration::from_secs(1)).all(|p| p < Duration::from_secs(8)));
        assert!(
            pauses(Duration::from_secs(1)).any(|p| p > Duration::from_millis(500)),
            "a slow read widens the pause"
        );
        assert!(pauses(Duration::from_secs(60)).all(|p| p < Duration::from_secs(10)));
    }
}
