//! The wiring of `templatecache run`: one shared watch per kind, the index that wakes a cache
//! for its consumers, and the controllers that read them.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, PodSpec, PodStatus};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use super::config::Config;
use super::context::Context;
use super::error::Error;
use super::index::{ByCache, Wakeups};
use super::watched::{Watched, cache_of_claim, cache_of_pod, cache_of_volume};
use super::{pod_gate, populator, staging_store, template_cache, template_cache_claim};
use crate::infra::metrics::Metrics;
use templatecache_api::names::{MANAGED_BY, MANAGED_BY_LABEL, POD_CACHE_LABEL, POPULATE_FOR_LABEL};
use templatecache_api::{StagingStore, TemplateCache, TemplateCacheClaim};

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
    let (volumes, volume_writer) = reflector::store_shared(SUBSCRIBER_BUFFER);
    let watched = Watched {
        caches,
        claims,
        pods,
        volumes,
        claims_by_cache: ByCache::new(cache_of_claim),
        pods_by_cache: ByCache::new(cache_of_pod),
        volumes_by_cache: ByCache::new(cache_of_volume),
    };
    let subscribe = "a shared store always takes subscribers";
    let cache_changes = cache_writer.subscribe().expect(subscribe);
    let claim_changes = claim_writer.subscribe().expect(subscribe);
    let pod_changes = pod_writer.subscribe().expect(subscribe);
    let volume_changes = volume_writer.subscribe().expect(subscribe);
    let (wake_caches, cache_wakeups) = Wakeups::channel();
    let (wake_claims, claim_wakeups) = Wakeups::channel();
    let (wake_pods, pod_wakeups) = Wakeups::channel();
    let (wake_volumes, volume_wakeups) = Wakeups::channel();
    let (wake_stores, store_wakeups) = Wakeups::channel();

    let ctx = Arc::new(Context::watching(
        client, config, metrics, watched, store_view,
    ));
    let shutdown = shutdown.shared();
    let watched = ctx.watched.clone();
    // A cache's change concerns the claims, Pods and volumes that name it (its deletion too: a
    // claim with a template makes it again) and its store's usage.
    let default_store = ctx.config.default_store.clone();
    let cache_watch = watcher(ctx.scoped::<TemplateCache>(), watcher::Config::default())
        .modify(drop_managed_fields)
        .default_backoff()
        .reflect_shared(cache_writer)
        .inspect_ok(move |event| {
            if let Some(cache) = changed_object(event) {
                let key = ObjectRef::from_obj(cache);
                wake_claims.wake(watched.claims_by_cache.members(&key));
                wake_pods.wake(watched.pods_by_cache.members(&key));
                wake_volumes.wake(watched.volumes_by_cache.members(&key));
                let store = cache.spec.store_name(&default_store);
                wake_stores.wake([ObjectRef::<StagingStore>::new(store)]);
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
    let wake = wake_caches.clone();
    let pod_watch = watcher(ctx.scoped::<Pod>(), labelled_pods())
        .modify(keep_what_the_operator_reads)
        .default_backoff()
        .reflect_shared(pod_writer)
        .inspect_ok(move |event| wake.wake(index.apply(event)));
    // No selector finds a claim by its dataSourceRef: every claim in scope is watched, and the
    // index keeps those that name a cache.
    let index = ctx.watched.volumes_by_cache.clone();
    let volume_watch = watcher(
        ctx.scoped::<PersistentVolumeClaim>(),
        watcher::Config::default(),
    )
    .modify(drop_managed_fields)
    .default_backoff()
    .reflect_shared(volume_writer)
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
    // The prime claims and populate Jobs live in the operator's namespace, out of the user
    // claim's reach as owner: each names its claim in an annotation.
    let made_here = watcher::Config::default().labels(POPULATE_FOR_LABEL);
    let populate_namespace = &ctx.config.operator_namespace;
    let populator = Controller::for_shared_stream(volume_changes, ctx.watched.volumes.clone())
        .watches(
            Api::<Job>::namespaced(ctx.client.clone(), populate_namespace),
            made_here.clone(),
            |job| populator::user_claim_of(&job),
        )
        .watches(
            Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), populate_namespace),
            made_here,
            |prime| populator::user_claim_of(&prime),
        )
        .reconcile_on(volume_wakeups)
        .with_config(ControllerConfig::default().concurrency(ctx.config.concurrency));
    let orphans = Controller::new(
        Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), populate_namespace),
        watcher::Config::default().labels(POPULATE_FOR_LABEL),
    );

    futures::join!(
        drive("TemplateCache", cache_watch, shutdown.clone()),
        drive("TemplateCacheClaim", claim_watch, shutdown.clone()),
        drive("Pod", pod_watch, shutdown.clone()),
        drive("PersistentVolumeClaim", volume_watch, shutdown.clone()),
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
        run_controller(
            "populator",
            populator,
            populator::reconcile,
            ctx.clone(),
            shutdown.clone()
        ),
        run_controller(
            "populator_orphans",
            orphans,
            populator::collect_orphan,
            ctx.clone(),
            shutdown.clone()
        ),
        run_staging_stores(ctx, store_writer, store_wakeups, shutdown),
    );
    info!("controllers stopped");
}

/// The object a watch event is about (a relist's objects one by one).
fn changed_object<K>(event: &watcher::Event<K>) -> Option<&K> {
    match event {
        watcher::Event::Apply(object)
        | watcher::Event::InitApply(object)
        | watcher::Event::Delete(object) => Some(object),
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
    cache_changes: impl Stream<Item = ObjectRef<StagingStore>> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let store_changes = watcher(ctx.stores(), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect_ok(forget_deleted_stores(ctx.clone()))
        .applied_objects();
    // Caches reach it through the one cache watch (see `run_with`), not a second watch.
    let controller =
        Controller::for_stream(store_changes, ctx.store_view.clone()).reconcile_on(cache_changes);
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
pub(super) fn drop_managed_fields(object: &mut impl kube::Resource) {
    object.meta_mut().managed_fields = None;
}

/// What the operator keeps of a labelled Pod: who it is (metadata without managedFields,
/// annotations and owners), its scheduling gates and its phase, all the pod gate and the
/// reference commit read. A Pod's spec and status (containers, volumes, env, conditions) are
/// most of its size, so the watch's memory grows with the number of consumer Pods, not with how
/// big each one is written.
fn keep_what_the_operator_reads(pod: &mut Pod) {
    let metadata = &mut pod.metadata;
    metadata.managed_fields = None;
    metadata.annotations = None;
    metadata.owner_references = None;
    let gates = pod.spec.as_mut().and_then(|s| s.scheduling_gates.take());
    pod.spec = Some(PodSpec {
        scheduling_gates: gates,
        ..PodSpec::default()
    });
    let phase = pod.status.as_mut().and_then(|s| s.phase.take());
    pod.status = Some(PodStatus {
        phase,
        ..PodStatus::default()
    });
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_watched_pod_keeps_its_identity_gates_and_phase_and_nothing_else() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "resourceVersion": "7",
                         "labels": {"templatecache.io/cache": "img"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(4096)},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": "rs", "uid": "r"}]},
            "spec": {"schedulingGates": [{"name": "templatecache.io/ready"}],
                     "containers": [{"name": "c", "image": "i", "env": [{"name": "E", "value": "v"}]}]},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False"}]}
        }))
        .expect("pod");
        let before = serde_json::to_string(&pod).expect("json").len();
        keep_what_the_operator_reads(&mut pod);
        let kept = serde_json::to_value(&pod).expect("json");
        assert_eq!(
            kept,
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "ns", "uid": "u", "resourceVersion": "7",
                             "labels": {"templatecache.io/cache": "img"}},
                "spec": {"containers": [], "schedulingGates": [{"name": "templatecache.io/ready"}]},
                "status": {"phase": "Pending"}
            })
        );
        assert!(
            kept.to_string().len() * 10 < before,
            "a tenth of the size or less"
        );
    }
}
