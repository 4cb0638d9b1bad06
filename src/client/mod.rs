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
//! `add /metadata/finalizers/-`, which the API server applies to the latest object, so concurrent
//! acquirers never conflict and never lose each other's entries: one write per acquire, about
//! 40 bytes per reference. An entry is removed with `test` + `remove` at its index, retried when
//! a concurrent change moved it.

use std::time::Duration;

use futures::TryStreamExt;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
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
        "releasing from TemplateCache {0} met a concurrent change {1} times in a row; try again"
    )]
    ReleaseContended(String, u32),
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("watching TemplateCache {0} failed: {1}")]
    Watch(String, watcher::Error),
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
}

/// How often a release retries when concurrent changes keep moving its entry.
const MAX_RELEASE_ROUNDS: u32 = 200;

/// Adds the consumer's reference to the cache, creating the cache first if it does not exist.
pub async fn acquire(
    client: Client,
    request: &CacheRequest,
    consumer_id: &str,
) -> Result<Reference, ClientError> {
    let entry = consumer_reference(consumer_id)?;
    let api: Api<TemplateCache> = Api::namespaced(client, &request.namespace);
    let reference = Reference {
        api: api.clone(),
        name: request.name.clone(),
        consumer_id: consumer_id.to_owned(),
    };
    loop {
        let Some(cache) = api.get_opt(&request.name).await? else {
            let spec = request
                .spec
                .clone()
                .ok_or_else(|| ClientError::NotFound(request.name.clone()))?;
            match create_with_reference(&api, &request.name, spec, &entry).await {
                Ok(()) => return Ok(reference),
                // Another acquirer created it first: add our entry to theirs.
                Err(kube::Error::Api(s)) if s.reason == "AlreadyExists" => continue,
                Err(e) => return Err(e.into()),
            }
        };
        check_acquirable(&cache, request)?;
        if cache.finalizers().contains(&entry) {
            return Ok(reference);
        }
        match append_reference(&api, &cache, &entry).await {
            Ok(()) => return Ok(reference),
            // The object changed shape under us (finalizers list created, object replaced).
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => {
                if cache.metadata.deletion_timestamp.is_some() {
                    return Err(ClientError::Deleting(request.name.clone()));
                }
                continue;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            Err(e) => return Err(e.into()),
        }
    }
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
    for round in 0..MAX_RELEASE_ROUNDS {
        let Some(cache) = api.get_opt(name).await? else {
            return Ok(());
        };
        let indices: Vec<usize> = cache
            .finalizers()
            .iter()
            .enumerate()
            .filter(|(_, f)| **f == entry)
            .map(|(i, _)| i)
            .collect();
        if indices.is_empty() {
            return Ok(());
        }
        match remove_entries(&api, name, &entry, &indices).await {
            Ok(()) => return Ok(()),
            // Our entry moved (a concurrent release or acquire): read again, after a short,
            // spread-out pause so a storm of releases does not retry in lockstep.
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => {
                tokio::time::sleep(jitter(round)).await;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Err(ClientError::ReleaseContended(
        name.to_owned(),
        MAX_RELEASE_ROUNDS,
    ))
}

impl Reference {
    /// The cache's name.
    pub fn name(&self) -> &str {
        &self.name
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

    async fn watch_until_settled(&self) -> Result<TemplateCache, ClientError> {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut stream = std::pin::pin!(watcher(self.api.clone(), config).applied_objects());
        while let Some(cache) = stream
            .try_next()
            .await
            .map_err(|e| ClientError::Watch(self.name.clone(), e))?
        {
            if let Some(result) = settled(cache) {
                return result;
            }
        }
        Err(ClientError::Deleted(self.name.clone()))
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

/// Appends `entry`; the server applies the patch to the latest object, so concurrent appends
/// all land. When the object has no finalizer list yet, it is created under a resourceVersion
/// test instead.
async fn append_reference(
    api: &Api<TemplateCache>,
    cache: &TemplateCache,
    entry: &str,
) -> Result<(), kube::Error> {
    let ops = match &cache.metadata.finalizers {
        Some(_) => json!([{"op": "add", "path": "/metadata/finalizers/-", "value": entry}]),
        None => json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": cache.resource_version()},
            {"op": "add", "path": "/metadata/finalizers", "value": [entry]},
        ]),
    };
    json_patch(api, &cache.name_any(), ops).await
}

/// Removes `entry` at each of `indices`, testing each first so a moved list fails cleanly.
async fn remove_entries(
    api: &Api<TemplateCache>,
    name: &str,
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
    json_patch(api, name, serde_json::Value::Array(ops)).await
}

async fn json_patch(
    api: &Api<TemplateCache>,
    name: &str,
    ops: serde_json::Value,
) -> Result<(), kube::Error> {
    let patch: json_patch::Patch = serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .map(drop)
}

/// A pause that grows with the round and is spread by the clock's nanoseconds.
fn jitter(round: u32) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let cap_ms = 5 + 5 * u64::from(round.min(20));
    Duration::from_millis(u64::from(nanos) % cap_ms)
}
