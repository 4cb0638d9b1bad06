//! What the operator's watches show: one shared watch each of caches, claims, labelled Pods and
//! PersistentVolumeClaims (every controller subscribes to these instead of watching again), each
//! kept in a store, with the index of which claims, Pods and volumes name each cache. The operator's Jobs and the StagingStores
//! have one watch each of their own, in the controller that reads them. The controllers read
//! these instead of the API server, and each watch wakes the controllers its changes concern.

use std::sync::Arc;

use futures::FutureExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};

use super::index::{ByCache, CacheKey};
use templatecache_api::names::{GROUP, POD_CACHE_LABEL};
use templatecache_api::{TemplateCache, TemplateCacheClaim};

/// The stores and indexes of the operator's watches.
#[derive(Clone)]
pub struct Watched {
    pub caches: Store<TemplateCache>,
    pub claims: Store<TemplateCacheClaim>,
    pub pods: Store<Pod>,
    pub volumes: Store<PersistentVolumeClaim>,
    pub claims_by_cache: ByCache<TemplateCacheClaim>,
    pub pods_by_cache: ByCache<Pod>,
    pub volumes_by_cache: ByCache<PersistentVolumeClaim>,
}

impl Watched {
    /// Empty stores that no watch fills (until [`super::run_with`] makes real ones): a test
    /// that drives one reconcile by hand sees no consumers and removes no reference.
    pub fn unwatched() -> Self {
        Self {
            caches: kube::runtime::reflector::store().0,
            claims: kube::runtime::reflector::store().0,
            pods: kube::runtime::reflector::store().0,
            volumes: kube::runtime::reflector::store().0,
            claims_by_cache: ByCache::new(cache_of_claim),
            pods_by_cache: ByCache::new(cache_of_pod),
            volumes_by_cache: ByCache::new(cache_of_volume),
        }
    }

    /// The cache `key` as last seen.
    pub fn cache(&self, key: &CacheKey) -> Option<Arc<TemplateCache>> {
        self.caches.get(key)
    }

    /// The claims that name `cache`, as last seen.
    pub fn claims_of(&self, cache: &CacheKey) -> Vec<Arc<TemplateCacheClaim>> {
        let members = self.claims_by_cache.members(cache);
        members.iter().filter_map(|c| self.claims.get(c)).collect()
    }

    /// The labelled Pods that name `cache`, as last seen.
    pub fn pods_of(&self, cache: &CacheKey) -> Vec<Arc<Pod>> {
        let members = self.pods_by_cache.members(cache);
        members.iter().filter_map(|p| self.pods.get(p)).collect()
    }

    /// The volumes being filled from `cache` (claims whose `dataSourceRef` names it), as last
    /// seen.
    pub fn volumes_of(&self, cache: &CacheKey) -> Vec<Arc<PersistentVolumeClaim>> {
        let members = self.volumes_by_cache.members(cache);
        members.iter().filter_map(|v| self.volumes.get(v)).collect()
    }

    /// True once the claim, Pod and volume watches have listed everything: before, a consumer
    /// missing from them may just not be listed yet, so no reference may be removed on their
    /// word.
    pub fn synced(&self) -> bool {
        let ready = |f: futures::future::BoxFuture<'_, _>| matches!(f.now_or_never(), Some(Ok(())));
        ready(self.claims.wait_until_ready().boxed())
            && ready(self.pods.wait_until_ready().boxed())
            && ready(self.volumes.wait_until_ready().boxed())
    }
}

/// The cache a claim names.
pub fn cache_of_claim(claim: &TemplateCacheClaim) -> Option<CacheKey> {
    Some(ObjectRef::new(&claim.spec.cache_name).within(&claim.namespace()?))
}

/// The cache a labelled Pod names.
pub fn cache_of_pod(pod: &Pod) -> Option<CacheKey> {
    let name = pod.labels().get(POD_CACHE_LABEL)?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

/// The kind a PersistentVolumeClaim's `dataSourceRef` names to be filled from a cache.
pub const POPULATOR_KIND: &str = "TemplateCache";

/// The cache a PersistentVolumeClaim is to be filled from: its `dataSourceRef` names a
/// TemplateCache of its own namespace (a reference into another namespace is not followed).
pub fn cache_of_volume(volume: &PersistentVolumeClaim) -> Option<CacheKey> {
    let source = volume.spec.as_ref()?.data_source_ref.as_ref()?;
    let ours = source.api_group.as_deref() == Some(GROUP) && source.kind == POPULATOR_KIND;
    let namespace = volume.namespace()?;
    let same_namespace = source.namespace.as_deref().is_none_or(|n| n == namespace);
    (ours && same_namespace).then(|| ObjectRef::new(&source.name).within(&namespace))
}
