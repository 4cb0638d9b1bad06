//! Acquire, wait for and release a TemplateCache from an in-cluster controller written in Rust,
//! through a TemplateCacheClaim (the contract: README, "How it works"). The library writes only
//! the consumer's own claim, never the shared cache: the operator records the claim's reference on the cache
//! together with every other new one in one write, so a storm of consumers does not queue on
//! the one object they all want.
//!
//! All three calls are idempotent:
//!
//! - [`acquire`] creates the consumer's claim, named from the cache and the consumer id, so
//!   acquiring twice is one claim. With a spec in the request, the operator creates the cache
//!   from it when it does not exist yet (one name per template, so never a second cache).
//! - [`Reference::wait_ready`] watches the claim (never the shared cache) until it is Ready, or
//!   returns why it never will be; it never hangs past its timeout.
//! - [`release`] deletes the claim; the operator removes its reference. Releasing twice, or
//!   releasing what was never held, is a no-op.

use std::time::Duration;

use futures::StreamExt;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use sha2::{Digest, Sha256};

use templatecache_api::conditions::{READY, find};
use templatecache_api::reasons::claim as reason;
use templatecache_api::references::{InvalidConsumerId, consumer_reference};
use templatecache_api::{
    ClaimPhase, TemplateCacheClaim, TemplateCacheClaimSpec, TemplateCacheSpec,
};

/// Failures of acquire, wait and release, each a sentence a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    InvalidConsumerId(#[from] InvalidConsumerId),
    #[error("TemplateCache {name} exists with a different spec than requested: {message}")]
    SpecMismatch { name: String, message: String },
    #[error("claim {claim} already exists for another request (cache {cache})")]
    ClaimTaken { claim: String, cache: String },
    #[error("copying TemplateCache {name} failed for good: {message}")]
    CopyFailed { name: String, message: String },
    #[error("the claim on TemplateCache {0} was deleted while waiting for it")]
    Deleted(String),
    #[error("TemplateCache {0} was not Ready within {1:?}")]
    Timeout(String, Duration),
    #[error("the watch of the claim on TemplateCache {0} ended")]
    WatchEnded(String),
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
}

/// The cache to acquire: its namespace and name, and the spec to create it with if it does not
/// exist yet (`None` to wait for a cache someone else creates).
#[derive(Clone, Debug)]
pub struct CacheRequest {
    pub namespace: String,
    pub name: String,
    pub spec: Option<TemplateCacheSpec>,
}

/// A consumer's claim on a cache. Dropping it does not release it: claims outlive processes by
/// design, so call [`Reference::release`] (or [`release`]) when done.
#[derive(Clone, Debug)]
pub struct Reference {
    api: Api<TemplateCacheClaim>,
    cache: String,
    claim: String,
    write_requests: u32,
}

/// Creates the consumer's claim on the cache (or finds the one it made before).
pub async fn acquire(
    client: Client,
    request: &CacheRequest,
    consumer_id: &str,
) -> Result<Reference, ClientError> {
    let claim_name = claim_name(&request.name, consumer_id)?;
    let api: Api<TemplateCacheClaim> = Api::namespaced(client, &request.namespace);
    let spec = TemplateCacheClaimSpec {
        cache_name: request.name.clone(),
        template: request.spec.clone(),
    };
    let claim = TemplateCacheClaim::new(&claim_name, spec.clone());
    let existing = match api.create(&PostParams::default(), &claim).await {
        Ok(_) => None,
        Err(kube::Error::Api(s)) if s.reason == "AlreadyExists" => {
            Some(api.get(&claim_name).await?)
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(existing) = existing
        && existing.spec != spec
    {
        return Err(ClientError::ClaimTaken {
            claim: claim_name,
            cache: existing.spec.cache_name,
        });
    }
    Ok(Reference {
        api,
        cache: request.name.clone(),
        claim: claim_name,
        write_requests: 1,
    })
}

/// Deletes the consumer's claim on the cache: its reference goes with the operator's next
/// commit. A no-op when there is no such claim.
pub async fn release(
    client: Client,
    namespace: &str,
    cache: &str,
    consumer_id: &str,
) -> Result<(), ClientError> {
    let api: Api<TemplateCacheClaim> = Api::namespaced(client, namespace);
    delete_claim(&api, &claim_name(cache, consumer_id)?).await
}

/// The name of a consumer's claim on a cache: `<cache>.<consumer id>` when the id can be part
/// of a name as it is (one DNS label), else `<cache>.h.<digest of the id>`. Deterministic, so
/// acquiring twice is one claim, and a restarted consumer finds its claim again.
///
/// The digest is two labels (`h.<hex>`) because an id used as it is never holds a dot: no
/// consumer id of the same cache can produce a hashed name. (An id that is itself `h-<hex>`
/// once did, and two consumers shared one claim.) Any valid name splits into some cache name
/// and some one-label id, so a hashed name can still equal a plain name of a cache called
/// `<cache>.h`; that claim names the other cache, and [`acquire`] refuses it as
/// [`ClientError::ClaimTaken`] instead of sharing it.
pub fn claim_name(cache: &str, consumer_id: &str) -> Result<String, InvalidConsumerId> {
    consumer_reference(consumer_id)?;
    if is_one_label(consumer_id) {
        return Ok(format!("{cache}.{consumer_id}"));
    }
    let digest = Sha256::digest(consumer_id.as_bytes());
    let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    Ok(format!("{cache}.{HASHED_MARK}.{hex}"))
}

/// The label between a cache's name and the digest of a consumer id in a hashed claim name.
const HASHED_MARK: &str = "h";

/// Whether `id` is a DNS label: lowercase letters, digits and `-`, starting and ending with a
/// letter or digit (no dot, so it is one label of the claim's name).
fn is_one_label(id: &str) -> bool {
    id.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id.ends_with(|c: char| c.is_ascii_alphanumeric())
}

async fn delete_claim(api: &Api<TemplateCacheClaim>, name: &str) -> Result<(), ClientError> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Reference {
    /// The cache's name.
    pub fn name(&self) -> &str {
        &self.cache
    }

    /// The claim's name.
    pub fn claim_name(&self) -> &str {
        &self.claim
    }

    /// Write requests the consumer sent to acquire: one create of its own claim.
    pub fn write_requests(&self) -> u32 {
        self.write_requests
    }

    /// Waits until the claim is Ready (its reference is on the cache and the cache is Ready) and
    /// returns it, with the cache's path, size and checksum in `status.cache`. Fails when the
    /// copy failed for good, when the claim cannot be bound to the cache (another template),
    /// when the claim is deleted, or after `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<TemplateCacheClaim, ClientError> {
        tokio::time::timeout(timeout, self.watch_until_settled())
            .await
            .map_err(|_| ClientError::Timeout(self.cache.clone(), timeout))?
    }

    /// Releases this reference (see [`release`]).
    pub async fn release(self) -> Result<(), ClientError> {
        delete_claim(&self.api, &self.claim).await
    }

    /// Watches this one claim (a field selector on its name): each waiter hears only of its own
    /// small object, never of the shared cache that every consumer's reference changes.
    async fn watch_until_settled(&self) -> Result<TemplateCacheClaim, ClientError> {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.claim));
        let mut events = std::pin::pin!(watcher(self.api.clone(), config).default_backoff());
        let mut listed = false;
        while let Some(event) = events.next().await {
            let object = match event {
                Ok(watcher::Event::Apply(claim) | watcher::Event::InitApply(claim)) => claim,
                Ok(watcher::Event::Delete(_)) => {
                    return Err(ClientError::Deleted(self.cache.clone()));
                }
                Ok(watcher::Event::Init) => {
                    listed = false;
                    continue;
                }
                // A list that did not hold the claim: it is gone.
                Ok(watcher::Event::InitDone) if !listed => {
                    return Err(ClientError::Deleted(self.cache.clone()));
                }
                // Transient: the watcher retries with backoff.
                Ok(watcher::Event::InitDone) | Err(_) => continue,
            };
            listed = true;
            if let Some(result) = settled(object) {
                return result;
            }
        }
        Err(ClientError::WatchEnded(self.cache.clone()))
    }
}

/// `Some` once waiting is over: Ready, or failed for good.
fn settled(claim: TemplateCacheClaim) -> Option<Result<TemplateCacheClaim, ClientError>> {
    let status = claim.status.as_ref()?;
    let ready = find(&status.conditions, READY)?;
    let name = claim.spec.cache_name.clone();
    match status.phase? {
        ClaimPhase::Ready if ready.status == "True" => Some(Ok(claim)),
        ClaimPhase::Failed if ready.reason == reason::TEMPLATE_MISMATCH => {
            let message = ready.message.clone();
            Some(Err(ClientError::SpecMismatch { name, message }))
        }
        ClaimPhase::Failed => {
            let message = ready.message.clone();
            Some(Err(ClientError::CopyFailed { name, message }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_names_are_deterministic_and_valid() {
        assert_eq!(claim_name("img", "vm-1234").as_deref(), Ok("img.vm-1234"));
        let hashed = claim_name("img", "Pod_UID.x").expect("valid id");
        assert!(hashed.starts_with("img.h."), "{hashed}");
        assert_eq!(
            claim_name("img", "Pod_UID.x").as_deref(),
            Ok(hashed.as_str())
        );
        assert_ne!(
            claim_name("img", "Pod_UID.y").as_deref(),
            Ok(hashed.as_str())
        );
        assert!(claim_name("img", "has space").is_err());
        let longest = claim_name(&"c".repeat(52), &"x".repeat(63)).expect("valid");
        assert!(longest.len() <= 253);
        let longest_hashed = claim_name(&"c".repeat(52), &"X".repeat(63)).expect("valid");
        assert!(is_dns_subdomain(&longest_hashed), "{longest_hashed}");
    }

    #[test]
    fn a_consumer_id_shaped_like_a_digest_gets_a_claim_of_its_own() {
        // `h-` and the 20 hex of the digest of "Pod_UID.x": once the hashed name of that id.
        let digest = Sha256::digest(b"Pod_UID.x");
        let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
        let lookalike = format!("h-{hex}");
        let hashed = claim_name("img", "Pod_UID.x").expect("valid id");
        let plain = claim_name("img", &lookalike).expect("valid id");
        assert_eq!(
            plain,
            format!("img.{lookalike}"),
            "plain ids keep their names"
        );
        assert_ne!(plain, hashed, "two consumers, two claims");
        assert!(is_dns_subdomain(&hashed), "{hashed}");
    }

    #[test]
    fn plain_ids_keep_the_names_they_always_had() {
        for (id, name) in [
            ("vm-1234", "img.vm-1234"),
            (
                "0f3c9a2e-1b4d-4e8a-9c7f-2d6b5a8e1f00",
                "img.0f3c9a2e-1b4d-4e8a-9c7f-2d6b5a8e1f00",
            ),
            ("h-0123456789abcdef0123", "img.h-0123456789abcdef0123"),
            ("h", "img.h"),
        ] {
            assert_eq!(claim_name("img", id).as_deref(), Ok(name));
        }
    }

    fn is_dns_subdomain(name: &str) -> bool {
        name.len() <= 253
            && name.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    }
}
