//! What every reconcile shares: the client, the settings, the watches and the pacers.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::{Api, Client};

use super::config::Config;
use super::error::Error;
use super::events::Events;
use super::pacing::Pacer;
use super::watched::Watched;
use crate::infra::metrics::Metrics;
use templatecache_api::{StagingStore, TemplateCache};

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub events: Events,
    pub metrics: Arc<Metrics>,
    /// When each store may list its caches again.
    pub store_lists: Pacer,
    /// When each cache may record a changed reference count again.
    pub count_writes: Pacer,
    /// When each cache may commit references again: the commits of a storm form batches.
    pub reference_commits: Pacer,
    /// When the claim controller may try to create a cache again: of a storm of claims that
    /// carry the same template, one creates the cache and the rest wait for the watch to show it.
    pub cache_creations: Pacer,
    /// Caches, claims and labelled Pods as the operator's watches show them.
    pub watched: Watched,
    /// StagingStores as the store controller's watch sees them; empty while that controller
    /// is not running (a test driving one reconcile), and then [`Context::store`] reads them.
    pub store_view: Store<StagingStore>,
}

impl Context {
    /// A context whose watches show nothing, for a test that drives one reconcile by hand: it
    /// sees no consumers (so removes no reference) and reads stores from the API server.
    pub fn new(client: Client, config: Config) -> Self {
        let store_view = reflector::store().0;
        Self::watching(
            client,
            config,
            Arc::default(),
            Watched::unwatched(),
            store_view,
        )
    }

    /// The context of running controllers: they read what `watched` and `store_view` show and
    /// count into `metrics`.
    pub(super) fn watching(
        client: Client,
        config: Config,
        metrics: Arc<Metrics>,
        watched: Watched,
        store_view: Store<StagingStore>,
    ) -> Self {
        let events = Events::new(client.clone(), config.instance.clone());
        Self {
            client,
            config,
            events,
            metrics,
            store_lists: Pacer::new(Duration::from_secs(5)),
            count_writes: Pacer::new(Duration::from_secs(2)),
            // At most 100 ms between the commits of one cache: a storm of N consumers is
            // counted within a tenth of a second of its last consumer, in about ten writes a
            // second however large N is (docs/design-notes.md).
            reference_commits: Pacer::new(Duration::from_millis(100)),
            cache_creations: Pacer::new(Duration::from_secs(5)),
            watched,
            store_view,
        }
    }

    /// The StagingStore `cache` lives in: its `storeRef`, else the operator's default.
    pub fn store_name_of<'a>(&'a self, cache: &'a TemplateCache) -> &'a str {
        cache.spec.store_name(&self.config.default_store)
    }

    /// The StagingStore `name`: as watched when the watch has it, else read from the API server.
    /// Stores change rarely, so a reconcile need not read its store every time.
    pub async fn store(&self, name: &str) -> Result<Option<Arc<StagingStore>>, Error> {
        if let Some(store) = self.store_view.get(&ObjectRef::new(name)) {
            return Ok(Some(store));
        }
        Ok(self.stores().get_opt(name).await?.map(Arc::new))
    }

    /// Drops the gauges of every store [`Context::store_view`] no longer holds. A deleted store
    /// is never reconciled again, so nothing else would; an unwatched context exports none.
    pub fn forget_deleted_stores(&self) {
        let view = &self.store_view;
        self.metrics
            .keep_stores(|store| view.get(&ObjectRef::new(store)).is_some());
    }

    pub fn stores(&self) -> Api<StagingStore> {
        Api::all(self.client.clone())
    }

    pub fn scoped<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        match &self.config.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }
}
