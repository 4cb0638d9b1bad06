//! The controllers of `templatecache run`, one module per reconciler, sharing one [`Context`].

pub mod events;
#[cfg(test)]
mod fixtures;
pub mod index;
pub mod jobs;
pub mod pacing;
pub mod pod_gate;
pub mod references;
pub mod staging_store;
pub mod template_cache;
pub mod template_cache_claim;
pub mod watched;
pub mod writes;

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use crate::api::names::{MANAGED_BY, MANAGED_BY_LABEL, POD_CACHE_LABEL};
use crate::api::{StagingStore, TemplateCache, TemplateCacheClaim};
use crate::runtime::metrics::Metrics;
use events::Events;
use index::{ByCache, Wakeups};
use jobs::JobSettings;
use pacing::Pacer;
use template_cache::lifecycle::RetryPolicy;
use watched::{Watched, cache_of_claim, cache_of_pod};

/// Errors of a reconcile; each is retried by the controller with a short backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("the TemplateCache has no namespace")]
    MissingNamespace,
    #[error("TemplateCache {0} changed while it was being reconciled; reconciling it again")]
    Conflict(String),
    #[error("the API server refused the change to {0}")]
    Refused(String),
    #[error("cannot build a manifest: {0}")]
    Manifest(#[from] serde_json::Error),
    #[error("Job {0} failed to remove the cached data: {1}")]
    CleanupFailed(String, String),
    #[error("StagingStore {0}: capacity {1} is not a whole number of bytes")]
    InvalidCapacity(String, String),
    #[error("StagingStore {0}: namespaceQuota {1} is not a whole number of bytes")]
    InvalidQuota(String, String),
}

/// Settings of `templatecache run`.
#[derive(Clone, Debug)]
pub struct Config {
    /// Reconcile only this namespace; all namespaces when unset.
    pub namespace: Option<String>,
    /// StagingStore of caches that name none.
    pub default_store: String,
    /// How copy and remove Jobs run.
    pub jobs: JobSettings,
    /// How failed copies are retried.
    pub retry: RetryPolicy,
    /// Caches reconciled at once.
    pub concurrency: u16,
    /// Claims reconciled (and so claim statuses written) at once.
    pub claim_concurrency: u16,
    /// Most references one cache takes; consumers past it wait, with a condition that says so.
    /// Bounded by etcd's object size limit (see the README's "Limits").
    pub max_references: usize,
    /// How often a cache holding Pod references is checked for Pods that are gone, in case a
    /// deletion event was missed.
    pub reference_sweep: Duration,
    /// Name of this replica in Events (the Pod name in a cluster).
    pub instance: Option<String>,
    /// Prefixes a source location must start with (see `TemplateSource::location`); empty
    /// allows every source. Keeps namespace users from making the cluster fetch from addresses
    /// they should not reach.
    pub source_allowlist: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: None,
            default_store: "default".to_owned(),
            jobs: JobSettings {
                image: concat!(
                    "ghcr.io/templatecache/templatecache:",
                    env!("CARGO_PKG_VERSION")
                )
                .to_owned(),
                service_account: None,
                copy: crate::copy::Tuning::default(),
                oci_plain_http_registries: vec![],
                allow_internal_addresses: vec![],
            },
            retry: RetryPolicy::default(),
            concurrency: 16,
            claim_concurrency: 32,
            max_references: DEFAULT_MAX_REFERENCES,
            reference_sweep: Duration::from_secs(60),
            instance: None,
            source_allowlist: vec![],
        }
    }
}

/// The default of [`Config::max_references`]: a cache with this many claim references still
/// weighs well under etcd's 1.5 MiB object limit (see the README's "Limits").
pub const DEFAULT_MAX_REFERENCES: usize = 5_000;

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
    fn watching(
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

/// Runs the controllers until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    run_with(client, config, Arc::new(Metrics::new()), shutdown).await;
}

/// Buffer of each shared watch's subscribers: how far a controller may fall behind its watch
/// before the watch waits for it.
const SUBSCRIBER_BUFFER: usize = 1024;

/// [`run`], counting into `metrics`.
pub async fn run_with(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (store_view, store_writer) = reflector::store();
    let (caches, cache_writer) = reflector::store_shared(SUBSCRIBER_BUFFER);
    let (claims, claim_writer) = reflector::store_shared(SUBSCRIBER_BUFFER);
    let (pods, pod_writer) = reflector::store_shared(SUBSCRIBER_BUFFER);
    let watched = Watched {
        caches,
        claims,
        pods,
        claims_by_cache: ByCache::new(cache_of_claim),
        pods_by_cache: ByCache::new(cache_of_pod),
    };
    let subscribe = "a shared store always takes subscribers";
    let cache_changes = cache_writer.subscribe().expect(subscribe);
    let claim_changes = claim_writer.subscribe().expect(subscribe);
    let pod_changes = pod_writer.subscribe().expect(subscribe);
    let (wake_caches, cache_wakeups) = Wakeups::channel();
    let (wake_claims, claim_wakeups) = Wakeups::channel();
    let (wake_pods, pod_wakeups) = Wakeups::channel();

    let ctx = Arc::new(Context::watching(
        client, config, metrics, watched, store_view,
    ));
    let shutdown = shutdown.shared();
    let watched = ctx.watched.clone();
    // A cache's change concerns the claims and Pods that name it (its deletion too: a claim
    // with a template makes it again).
    let cache_watch = watcher(ctx.scoped::<TemplateCache>(), watcher::Config::default())
        .modify(drop_managed_fields)
        .default_backoff()
        .reflect_shared(cache_writer)
        .inspect_ok(move |event| {
            if let Some(cache) = changed_objects(event) {
                wake_claims.wake(watched.claims_by_cache.members(&cache));
                wake_pods.wake(watched.pods_by_cache.members(&cache));
            }
        });
    // A consumer's change (its deletion too) concerns the cache it names.
    let index = ctx.watched.claims_by_cache.clone();
    let wake = wake_caches.clone();
    let claim_watch = watcher(
        ctx.scoped::<TemplateCacheClaim>(),
        watcher::Config::default(),
    )
    .modify(drop_managed_fields)
    .default_backoff()
    .reflect_shared(claim_writer)
    .inspect_ok(move |event| wake.wake(index.apply(event)));
    let index = ctx.watched.pods_by_cache.clone();
    let pod_watch = watcher(ctx.scoped::<Pod>(), labelled_pods())
        .modify(drop_managed_fields)
        .default_backoff()
        .reflect_shared(pod_writer)
        .inspect_ok(move |event| wake_caches.wake(index.apply(event)));

    let jobs_selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
    let cache_controller = Controller::for_shared_stream(cache_changes, ctx.watched.caches.clone())
        .owns(
            ctx.scoped::<Job>(),
            watcher::Config::default().labels(&jobs_selector),
        )
        .reconcile_on(cache_wakeups)
        .with_config(ControllerConfig::default().concurrency(ctx.config.concurrency));
    let claim_controller = Controller::for_shared_stream(claim_changes, ctx.watched.claims.clone())
        .reconcile_on(claim_wakeups)
        .with_config(ControllerConfig::default().concurrency(ctx.config.claim_concurrency));
    let pod_gate = Controller::for_shared_stream(pod_changes, ctx.watched.pods.clone())
        .reconcile_on(pod_wakeups)
        .with_config(ControllerConfig::default().concurrency(ctx.config.concurrency));

    futures::join!(
        drive("TemplateCache", cache_watch, shutdown.clone()),
        drive("TemplateCacheClaim", claim_watch, shutdown.clone()),
        drive("Pod", pod_watch, shutdown.clone()),
        run_controller(
            "template_cache",
            cache_controller,
            template_cache::reconcile,
            ctx.clone(),
            shutdown.clone()
        ),
        run_controller(
            "template_cache_claim",
            claim_controller,
            template_cache_claim::reconcile,
            ctx.clone(),
            shutdown.clone()
        ),
        run_controller(
            "pod_gate",
            pod_gate,
            pod_gate::reconcile,
            ctx.clone(),
            shutdown.clone()
        ),
        run_staging_stores(ctx, store_writer, shutdown),
    );
    info!("controllers stopped");
}

/// The objects a watch event is about (a relist's objects one by one).
fn changed_objects<K: kube::Resource<DynamicType = ()>>(
    event: &watcher::Event<K>,
) -> Option<ObjectRef<K>> {
    match event {
        watcher::Event::Apply(object)
        | watcher::Event::InitApply(object)
        | watcher::Event::Delete(object) => Some(ObjectRef::from_obj(object)),
        watcher::Event::Init | watcher::Event::InitDone => None,
    }
}

/// Polls a shared watch until `shutdown`: it feeds its store, its index and its subscribers.
/// Its errors are retried with backoff by the watcher; they are only logged here.
async fn drive<K>(
    kind: &'static str,
    watch: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    watch
        .take_until(shutdown)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!("watch of {kind}: {e}");
            }
        })
        .await;
}

/// Runs one controller's reconciles until `shutdown`, each measured.
async fn run_controller<K, F>(
    name: &'static str,
    controller: Controller<K>,
    reconcile: fn(Arc<K>, Arc<Context>) -> F,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    F: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    controller
        .graceful_shutdown_on(shutdown)
        .run(
            move |object, ctx| measured(name, reconcile(object, ctx.clone()), ctx),
            error_policy,
            ctx,
        )
        .for_each(|_| async {})
        .await;
}

/// The StagingStore controller: looks at a store whenever one of its caches changes. Its watch
/// of stores, through `writer`, is also the [`Context::store_view`] the other controllers read.
async fn run_staging_stores(
    ctx: Arc<Context>,
    writer: reflector::store::Writer<StagingStore>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let default_store = ctx.config.default_store.clone();
    let store_changes = watcher(ctx.stores(), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect_ok(forget_deleted_stores(ctx.clone()))
        .applied_objects();
    let controller = Controller::for_stream(store_changes, ctx.store_view.clone()).watches(
        ctx.scoped::<TemplateCache>(),
        watcher::Config::default(),
        move |cache| {
            let store = cache.spec.store_name(&default_store);
            Some(ObjectRef::<StagingStore>::new(store))
        },
    );
    run_controller(
        "staging_store",
        controller,
        staging_store::reconcile,
        ctx,
        shutdown,
    )
    .await;
}

/// Forgets the metrics of deleted stores once the reflector has applied a deletion or a relist
/// (which is how a deletion missed while the watch was down shows up).
fn forget_deleted_stores(ctx: Arc<Context>) -> impl FnMut(&watcher::Event<StagingStore>) {
    move |event| {
        if matches!(event, watcher::Event::Delete(_) | watcher::Event::InitDone) {
            ctx.forget_deleted_stores();
        }
    }
}

/// What the operator keeps of an object it watches: everything but `managedFields`, which it never
/// reads and which would be most of the memory of thousands of TemplateCaches.
fn drop_managed_fields(object: &mut impl kube::Resource) {
    object.meta_mut().managed_fields = None;
}

/// Runs one reconcile and counts it; a conflict (a retry by design) is not an error.
async fn measured(
    controller: &'static str,
    reconcile: impl std::future::Future<Output = Result<Action, Error>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile.await;
    let failed = matches!(&result, Err(e) if !matches!(e, Error::Conflict(_)));
    ctx.metrics
        .observe_reconcile(controller, started.elapsed(), failed);
    result
}

fn labelled_pods() -> watcher::Config {
    watcher::Config::default().labels(POD_CACHE_LABEL)
}

/// Conflicts are expected under concurrency and looked at again after 200 ms, without a log line;
/// other errors are logged here (only here: the run stream is drained silently) and back off.
fn error_policy<K: ResourceExt>(object: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    match error {
        Error::Conflict(_) => Action::requeue(Duration::from_millis(200)),
        _ => {
            warn!(object = %object.name_any(), "reconcile failed: {error}");
            Action::requeue(Duration::from_secs(5))
        }
    }
}
