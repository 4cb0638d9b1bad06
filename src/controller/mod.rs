//! The controllers of `templatecache run`, one module per reconciler, sharing one [`Context`].

pub mod conditions;
pub mod events;
pub mod jobs;
pub mod pacing;
pub mod pod_gate;
pub mod reference_gc;
pub mod staging_store;
pub mod template_cache;

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use crate::api::names::{MANAGED_BY, MANAGED_BY_LABEL, POD_CACHE_LABEL};
use crate::api::{StagingStore, TemplateCache};
use crate::client::ClientError;
use crate::runtime::metrics::Metrics;
use events::Events;
use jobs::JobSettings;
use pacing::Pacer;
use template_cache::lifecycle::RetryPolicy;

/// Errors of a reconcile; each is retried by the controller with a short backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("the TemplateCache has no namespace")]
    MissingNamespace,
    #[error("TemplateCache {0} changed while it was being reconciled; reconciling it again")]
    Conflict(String),
    #[error("cannot build a manifest: {0}")]
    Manifest(#[from] serde_json::Error),
    #[error("Job {0} failed to remove the cached data: {1}")]
    CleanupFailed(String, String),
    #[error("cannot change a reference: {0}")]
    Reference(#[from] ClientError),
    #[error("StagingStore {0}: capacity {1} is not a whole number of bytes")]
    InvalidCapacity(String, String),
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
            },
            retry: RetryPolicy::default(),
            concurrency: 16,
            reference_sweep: Duration::from_secs(60),
            instance: None,
            source_allowlist: vec![],
        }
    }
}

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
    /// StagingStores as the store controller's watch sees them; empty while that controller
    /// is not running (a test driving one reconcile), and then [`Context::store`] reads them.
    pub store_view: Store<StagingStore>,
}

impl Context {
    pub fn new(client: Client, config: Config) -> Self {
        let events = Events::new(client.clone(), config.instance.clone());
        Self {
            client,
            config,
            events,
            metrics: Arc::new(Metrics::new()),
            store_lists: Pacer::new(Duration::from_secs(5)),
            count_writes: Pacer::new(Duration::from_secs(2)),
            store_view: reflector::store().0,
        }
    }

    /// The StagingStore a cache lives in: its `storeRef`, else the operator's default.
    pub fn store_name_of(&self, cache: &TemplateCache) -> String {
        cache
            .spec
            .store_ref
            .as_ref()
            .map_or_else(|| self.config.default_store.clone(), |s| s.name.clone())
    }

    /// Why the cache's source is refused by the allowlist, if it is.
    pub fn source_refusal(&self, cache: &TemplateCache) -> Option<String> {
        let allowlist = &self.config.source_allowlist;
        let location = cache.spec.source.location();
        if allowlist.is_empty() || allowlist.iter().any(|p| location.starts_with(p)) {
            return None;
        }
        Some(format!(
            "source {location} is outside the operator's source allowlist ({})",
            allowlist.join(", ")
        ))
    }

    /// The StagingStore `name`: as watched when the watch has it, else read from the API server.
    /// Stores change rarely, so a reconcile need not read its store every time.
    pub async fn store(&self, name: &str) -> Result<Option<Arc<StagingStore>>, Error> {
        if let Some(store) = self.store_view.get(&ObjectRef::new(name)) {
            return Ok(Some(store));
        }
        Ok(self.stores().get_opt(name).await?.map(Arc::new))
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

/// [`run`], counting into `metrics`.
pub async fn run_with(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let mut ctx = Context::new(client, config);
    ctx.metrics = metrics;
    let (store_view, store_writer) = reflector::store();
    ctx.store_view = store_view;
    let ctx = Arc::new(ctx);
    let shutdown = shutdown.shared();
    futures::join!(
        run_template_caches(ctx.clone(), shutdown.clone()),
        run_pod_gate(ctx.clone(), shutdown.clone()),
        run_staging_stores(ctx, store_writer, shutdown),
    );
    info!("controllers stopped");
}

/// The TemplateCache controller: owns the copy and remove Jobs, and hears of labelled Pods so
/// a Pod's deletion releases its reference at once.
async fn run_template_caches(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let jobs_selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
    let controller_config = ControllerConfig::default().concurrency(ctx.config.concurrency);
    let (caches, writer) = reflector::store();
    let cache_changes = watcher(ctx.scoped::<TemplateCache>(), watcher::Config::default())
        .modify(drop_managed_fields)
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    Controller::for_stream(cache_changes, caches)
        .owns(
            ctx.scoped::<Job>(),
            watcher::Config::default().labels(&jobs_selector),
        )
        .watches(ctx.scoped::<Pod>(), labelled_pods(), |pod| {
            let name = pod.labels().get(POD_CACHE_LABEL)?;
            Some(ObjectRef::new(name).within(&pod.namespace()?))
        })
        .with_config(controller_config)
        .graceful_shutdown_on(shutdown)
        .run(
            |cache, ctx| {
                measured(
                    "template_cache",
                    template_cache::reconcile(cache, ctx.clone()),
                    ctx,
                )
            },
            error_policy,
            ctx,
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!("reconcile: {e}");
            }
        })
        .await;
}

/// The Pod-gate controller: only Pods with the cache label (a server-side selector, never all
/// Pods), and again whenever their cache changes.
async fn run_pod_gate(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let controller = Controller::new(ctx.scoped::<Pod>(), labelled_pods());
    let pods = controller.store();
    controller
        .watches(
            ctx.scoped::<TemplateCache>(),
            watcher::Config::default(),
            move |cache| pod_gate::pods_of(&pods, &cache),
        )
        .with_config(ControllerConfig::default().concurrency(ctx.config.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(
            |pod, ctx| measured("pod_gate", pod_gate::reconcile(pod, ctx.clone()), ctx),
            error_policy,
            ctx,
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!("pod gate: {e}");
            }
        })
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
        .applied_objects();
    Controller::for_stream(store_changes, ctx.store_view.clone())
        .watches(
            ctx.scoped::<TemplateCache>(),
            watcher::Config::default(),
            move |cache| {
                let store = cache
                    .spec
                    .store_ref
                    .as_ref()
                    .map_or_else(|| default_store.clone(), |s| s.name.clone());
                Some(ObjectRef::<StagingStore>::new(&store))
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(
            |store, ctx| {
                measured(
                    "staging_store",
                    staging_store::reconcile(store, ctx.clone()),
                    ctx,
                )
            },
            error_policy,
            ctx,
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!("staging store: {e}");
            }
        })
        .await;
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

/// Conflicts are expected under concurrency and retried at once; other errors back off.
fn error_policy<K: ResourceExt>(object: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    match error {
        Error::Conflict(_) => Action::requeue(Duration::from_millis(200)),
        _ => {
            warn!(object = %object.name_any(), "reconcile failed: {error}");
            Action::requeue(Duration::from_secs(5))
        }
    }
}
