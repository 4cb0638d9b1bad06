//! The controllers of `templatecache run`, one module per reconciler, sharing one [`Context`].

pub mod conditions;
pub mod jobs;
pub mod template_cache;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use crate::api::names::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::api::{StagingStore, TemplateCache};
use jobs::JobSettings;
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
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub config: Config,
}

impl Context {
    /// The StagingStore a cache lives in: its `storeRef`, else the operator's default.
    pub fn store_name_of(&self, cache: &TemplateCache) -> String {
        cache
            .spec
            .store_ref
            .as_ref()
            .map_or_else(|| self.config.default_store.clone(), |s| s.name.clone())
    }

    pub fn stores(&self) -> Api<StagingStore> {
        Api::all(self.client.clone())
    }

    fn scoped<K>(&self) -> Api<K>
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
    let ctx = Arc::new(Context { client, config });
    let jobs_selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
    let controller_config = ControllerConfig::default().concurrency(ctx.config.concurrency);
    Controller::new(ctx.scoped::<TemplateCache>(), watcher::Config::default())
        .owns(
            ctx.scoped::<Job>(),
            watcher::Config::default().labels(&jobs_selector),
        )
        .with_config(controller_config)
        .graceful_shutdown_on(shutdown)
        .run(template_cache::reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!("reconcile: {e}");
            }
        })
        .await;
    info!("controllers stopped");
}

/// Conflicts are expected under concurrency and retried at once; other errors back off.
fn error_policy(cache: Arc<TemplateCache>, error: &Error, _ctx: Arc<Context>) -> Action {
    match error {
        Error::Conflict(_) => Action::requeue(Duration::from_millis(200)),
        _ => {
            warn!(cache = %cache.name_any(), "reconcile failed: {error}");
            Action::requeue(Duration::from_secs(5))
        }
    }
}
