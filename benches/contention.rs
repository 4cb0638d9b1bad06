//! Contention benchmark: N consumers of one template at the same moment (N = 10, 100, 1000 by
//! default), against the local control plane, all ways in the same run:
//!
//! - **claims**: every consumer its own client (a ServiceAccount) making its TemplateCacheClaim
//!   with `client::acquire`; the operator commits the references in batches.
//! - **gated Pods**: N Pods with the cache label and the scheduling gate created at once, as a
//!   Deployment's ReplicaSet would.
//! - **direct finalizers** (the old path, still supported): every consumer appends its own
//!   `ref.templatecache.io/<id>` to the cache with a JSON patch.
//! - **CloudStack before its fix** (CLOUDSTACK-7539): read the template's row, create it if
//!   absent (every worker that saw it absent starts a copy), then read-modify-write a counter
//!   with no precondition.
//! - **CloudStack after its fix**: the same steps under one global lock (a mutex in this
//!   process, standing in for CloudStack's database lock), on two rows: a ConfigMap (the
//!   cheapest object this API server stores, the fair stand-in for a database row) and a
//!   TemplateCache (our own kind, CEL rules and finalizers, so every locked write pays for them).
//! - **floors**: the same N claims, and the same N gated Pods, created with no operator running:
//!   what the API server takes just to accept the consumers, which no way can beat.
//!
//! Every way is measured the same: a raw watch of the one shared object (the cache, or
//! CloudStack's row) sees each version of it, so "counted" is the moment a consumer's reference
//! (or the counter's increment) first shows on the object, and the writes to it are its
//! versions; API writes are the API server's own `apiserver_request_total` for the resources
//! involved (whoever sent them: consumers, operator, benchmark). The benchmark plays the copy
//! Job's completion, then all consumers release at once. Writes `target/bench/contention.md`.
//!
//!     cargo bench --bench contention [-- 10 100 1000]

use templatecache_test_support as support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, future, stream};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use support::TestNamespace;
use support::cache_watch::{CacheWatch, Version};
use support::jobs::{Outcome, finish_copy, wait_for_job};
use support::rig::Rig;
use templatecache_api::names::{POD_CACHE_LABEL, READY_GATE};
use templatecache_api::references::{claim_reference, is_reference, pod_reference};
use templatecache_api::{ClaimPhase, TemplateCache, TemplateCacheClaim, TemplateCacheSpec};
use templatecache_client as client;

const COUNTER: &str = "cloudstack.example/ref-count";
const CHECKSUM: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
/// The resources any way writes to; API writes per consumer count writes to these.
const RESOURCES: [&str; 6] = [
    "templatecaches",
    "templatecacheclaims",
    "pods",
    "jobs",
    "events",
    "configmaps",
];
/// The ways' names, as the tables show them; the ratios find rows by them.
const CLAIMS: &str = "claims";
const PODS: &str = "gated Pods";
const CLAIMS_FLOOR: &str = "floor: creating the claims (no operator)";
const PODS_FLOOR: &str = "floor: creating the gated Pods (no operator)";
const FAIR_LOCK: &str = "CloudStack after its fix (global lock, ConfigMap row)";
const CACHE_ROW_LOCK: &str = "CloudStack after its fix (global lock, TemplateCache row)";
const NO_LOCK: &str = "CloudStack before its fix";
/// How long any one phase may take before the benchmark gives up (a hang, not a result).
const PATIENCE: Duration = Duration::from_secs(600);

/// One way's results at one N.
struct Row {
    way: &'static str,
    n: usize,
    copies: usize,
    /// None for a floor: no shared object is written.
    cache_writes: Option<usize>,
    /// The API server's write requests during the storm, by verb and resource (refused ones
    /// apart).
    api_writes: Writes,
    counted: Vec<Duration>,
    all_counted: Duration,
    all_ready: Option<Duration>,
    /// The lowest and the final count; None for a floor, which counts nothing.
    counts: Option<(i64, i64)>,
}

impl Row {
    fn markdown(&self) -> String {
        let mut sorted = self.counted.clone();
        sorted.sort();
        let pct =
            |p: f64| sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1];
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
        let or_na = |v: Option<String>| v.unwrap_or_else(|| "n/a".into());
        format!(
            "| {} | {} | {} | {} | {:.2} | {} | {} | {:.2} s | {} | {} | {} |",
            self.way,
            self.n,
            self.copies,
            or_na(self.cache_writes.map(|w| w.to_string())),
            support::api_writes::written(&self.api_writes) / self.n as f64,
            ms(pct(0.50)),
            ms(pct(0.99)),
            self.all_counted.as_secs_f64(),
            or_na(self.all_ready.map(|d| format!("{:.2} s", d.as_secs_f64()))),
            or_na(self.counts.map(|(lowest, _)| lowest.to_string())),
            or_na(self.counts.map(|(_, last)| last.to_string())),
        )
    }
}

fn spec() -> TemplateCacheSpec {
    support::http_spec("http://127.0.0.1:9/disk.qcow2")
}

/// Write requests the API server served, by verb and resource (`PATCH templatecaches/status`).
type Writes = BTreeMap<String, f64>;

/// The writes the API server has served to [`RESOURCES`] so far.
async fn writes_now(ns: &TestNamespace) -> Writes {
    support::api_writes::served_by_kind(&ns.client, &RESOURCES).await
}

/// The writes served to [`RESOURCES`] since `before`.
async fn writes_since(ns: &TestNamespace, before: &Writes) -> Writes {
    support::api_writes::since(before, &writes_now(ns).await)
}

/// Clients for `n` consumers, made before the clock starts.
async fn consumers(n: usize) -> Vec<Client> {
    future::join_all((0..n).map(|_| support::consumer::consumer_client())).await
}

fn annotation_counter(obj: &DynamicObject) -> Option<i64> {
    obj.metadata
        .annotations
        .as_ref()?
        .get(COUNTER)?
        .parse()
        .ok()
}

/// When each of `references` first showed on the object.
fn first_seen(versions: &[Version], references: &BTreeMap<String, Instant>) -> Vec<Duration> {
    references
        .iter()
        .map(|(reference, started)| {
            let seen = versions
                .iter()
                .find(|v| v.references.contains(reference))
                .unwrap_or_else(|| panic!("{reference} never showed on the cache"));
            seen.at.saturating_duration_since(*started)
        })
        .collect()
}

fn versions_between(versions: &[Version], from: Instant, to: Instant) -> usize {
    versions
        .iter()
        .filter(|v| v.at >= from && v.at <= to)
        .count()
}

/// The lowest count any version showed, the final one included (read after the releases, it
/// may reach the benchmark before the watch delivers it).
fn lowest_count(versions: &[Version], final_count: i64) -> i64 {
    versions
        .iter()
        .filter_map(|v| v.ref_count)
        .chain([final_count])
        .min()
        .unwrap_or(final_count)
}

/// Polls `check` every 50 ms until it holds (panics after [`PATIENCE`]).
async fn until<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn cache_copies(ns: &TestNamespace) -> usize {
    let jobs: Api<Job> = ns.api();
    jobs.list(&ListParams::default())
        .await
        .expect("jobs")
        .items
        .iter()
        .filter(|j| j.name_any().contains("-copy-"))
        .count()
}

async fn recorded_count(ns: &TestNamespace) -> i64 {
    let cache: TemplateCache = ns.api().get("template").await.expect("cache");
    i64::from(
        cache
            .status
            .and_then(|s| s.ref_count)
            .expect("a recorded count"),
    )
}

/// Waits until the cache holds every reference of `wanted`; how long that took since `started`,
/// the moment it was seen, and the API writes served since `writes_before`.
async fn until_counted(
    ns: &TestNamespace,
    what: &str,
    wanted: &BTreeMap<String, Instant>,
    started: Instant,
    writes_before: &Writes,
) -> (Duration, Instant, Writes) {
    let caches: Api<TemplateCache> = ns.api();
    until(what, || async {
        let cache = caches.get("template").await.expect("cache");
        let refs: BTreeSet<String> = cache.finalizers().iter().cloned().collect();
        wanted.keys().all(|r| refs.contains(r))
    })
    .await;
    let all_counted = started.elapsed();
    let counted_at = Instant::now();
    let api_writes = writes_since(ns, writes_before).await;
    (all_counted, counted_at, api_writes)
}

/// Finishes the template's one copy Job as the mover would on success; when it did.
async fn copy_succeeds(ns: &TestNamespace) -> Instant {
    wait_for_job(&ns.client, &ns.name, "template-copy-1").await;
    let outcome = Outcome::Succeeded {
        bytes: 4,
        checksum: CHECKSUM,
    };
    let completed = Instant::now();
    finish_copy(&ns.client, &ns.name, "template", 1, outcome).await;
    completed
}

/// What one of the operator's ways measured while its consumers acquired.
struct Measured {
    way: &'static str,
    n: usize,
    started: Instant,
    counted_at: Instant,
    /// When each consumer's reference was made.
    wanted: BTreeMap<String, Instant>,
    all_counted: Duration,
    all_ready: Duration,
    api_writes: Writes,
}

/// Waits until every reference of an operator's way is released, then makes its row from the
/// versions of the cache its watch saw.
async fn released_row(ns: &TestNamespace, watch: CacheWatch, measured: Measured) -> Row {
    until("every reference released", || async {
        recorded_count(ns).await == 0
    })
    .await;
    let final_count = recorded_count(ns).await;
    let versions = watch.stop().await;
    Row {
        way: measured.way,
        n: measured.n,
        copies: cache_copies(ns).await,
        cache_writes: Some(versions_between(
            &versions,
            measured.started,
            measured.counted_at,
        )),
        api_writes: measured.api_writes,
        counted: first_seen(&versions, &measured.wanted),
        all_counted: measured.all_counted,
        all_ready: Some(measured.all_ready),
        counts: Some((lowest_count(&versions, final_count), final_count)),
    }
}

/// Every consumer acquires its claim on `request` at once, each with its own client: each one's
/// reference, when it began, and how long its create took.
async fn claim_storm(
    clients: Vec<Client>,
    request: &client::CacheRequest,
) -> Vec<(client::Reference, Instant, Duration)> {
    let storm = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| async move {
            let begun = Instant::now();
            let reference = client::acquire(client, request, &format!("consumer-{i}"))
                .await
                .expect("acquire");
            (reference, begun, begun.elapsed())
        });
    future::join_all(storm).await
}

async fn claims_way(n: usize) -> Row {
    let rig = Rig::operator(&format!("bench-claims-{n}")).await;
    let ns = &rig.ns;
    let watch = CacheWatch::start(ns, "template");
    let clients = consumers(n).await;
    let request = ns.request("template", Some(spec()));
    let writes_before = writes_now(ns).await;
    let started = Instant::now();
    let acquired = claim_storm(clients, &request).await;
    println!(
        "claims N={n}: every claim created after {:?}",
        started.elapsed()
    );
    let claims: Api<TemplateCacheClaim> = ns.api();
    let uids: BTreeMap<String, String> = claims
        .list(&ListParams::default())
        .await
        .expect("claims")
        .items
        .iter()
        .map(|c| (c.name_any(), c.uid().expect("uid")))
        .collect();
    let wanted: BTreeMap<String, Instant> = acquired
        .iter()
        .map(|(r, begun, _)| (claim_reference(&uids[r.claim_name()]), *begun))
        .collect();
    let (all_counted, counted_at, api_writes) =
        until_counted(ns, "every claim counted", &wanted, started, &writes_before).await;

    let completed = copy_succeeds(ns).await;
    until("every claim Ready", || async {
        let list = claims.list(&ListParams::default()).await.expect("claims");
        list.items.len() == n
            && list
                .items
                .iter()
                .all(|c| c.status.as_ref().and_then(|s| s.phase) == Some(ClaimPhase::Ready))
    })
    .await;
    let all_ready = completed.elapsed();

    let releases = acquired.into_iter().map(|(r, _, _)| r.release());
    for released in future::join_all(releases).await {
        released.expect("release");
    }
    let measured = Measured {
        way: CLAIMS,
        n,
        started,
        counted_at,
        wanted,
        all_counted,
        all_ready,
        api_writes,
    };
    released_row(ns, watch, measured).await
}

fn gated_pod(i: usize) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("launcher-{i}"), "labels": {POD_CACHE_LABEL: "template"}},
        "spec": {
            "schedulingGates": [{"name": READY_GATE}],
            "automountServiceAccountToken": false,
            "containers": [{"name": "launcher", "image": "registry.invalid/launcher:1"}]
        }
    }))
    .expect("pod literal")
}

/// Pods created at once by one client, as a ReplicaSet controller would (its burst of creates).
const POD_CREATORS: usize = 64;

/// Pods need their ServiceAccount: waits for the one the namespace's controller makes.
async fn default_service_account(ns: &TestNamespace) {
    let accounts: Api<ServiceAccount> = ns.api();
    until("the namespace's default ServiceAccount", || async {
        accounts
            .get_opt("default")
            .await
            .expect("read SA")
            .is_some()
    })
    .await;
}

/// Creates N gated Pods, [`POD_CREATORS`] at a time; each one's reference, when its create
/// began and how long it took.
async fn create_gated_pods(pods: &Api<Pod>, n: usize) -> Vec<(String, Instant, Duration)> {
    stream::iter(0..n)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let begun = Instant::now();
                let pod = pods.create(&PostParams::default(), &gated_pod(i)).await?;
                let reference = pod_reference(&pod.uid().expect("uid"));
                Ok::<_, kube::Error>((reference, begun, begun.elapsed()))
            }
        })
        .buffer_unordered(POD_CREATORS)
        .try_collect()
        .await
        .expect("create Pods")
}

async fn pods_way(n: usize) -> Row {
    let rig = Rig::operator(&format!("bench-pods-{n}")).await;
    let ns = &rig.ns;
    default_service_account(ns).await;
    ns.create_cache(
        "template",
        json!({"source": {"http": {"url": "http://127.0.0.1:9/disk.qcow2"}}}),
    )
    .await;
    let caches: Api<TemplateCache> = ns.api();
    until("the cache looked at", || async {
        caches
            .get("template")
            .await
            .expect("cache")
            .status
            .is_some()
    })
    .await;
    let watch = CacheWatch::start(ns, "template");
    let pods: Api<Pod> = ns.api();
    let writes_before = writes_now(ns).await;
    let started = Instant::now();
    let created = create_gated_pods(&pods, n).await;
    let wanted: BTreeMap<String, Instant> = created
        .into_iter()
        .map(|(reference, begun, _)| (reference, begun))
        .collect();
    let (all_counted, counted_at, api_writes) =
        until_counted(ns, "every Pod counted", &wanted, started, &writes_before).await;

    let completed = copy_succeeds(ns).await;
    until("every Pod ungated", || async {
        let list = pods.list(&ListParams::default()).await.expect("pods");
        list.items.iter().all(|p| {
            let gates = p.spec.as_ref().and_then(|s| s.scheduling_gates.as_ref());
            !gates.is_some_and(|g| g.iter().any(|g| g.name == READY_GATE))
        })
    })
    .await;
    let all_ready = completed.elapsed();

    pods.delete_collection(
        &DeleteParams::default().grace_period(0),
        &ListParams::default(),
    )
    .await
    .expect("delete Pods");
    let measured = Measured {
        way: PODS,
        n,
        started,
        counted_at,
        wanted,
        all_counted,
        all_ready,
        api_writes,
    };
    released_row(ns, watch, measured).await
}

/// A floor's row: the consumers were only created, so each is "counted" when its create
/// returned, and nothing is shared, copied or counted.
fn floor_row(
    way: &'static str,
    n: usize,
    counted: Vec<Duration>,
    all: Duration,
    writes: Writes,
) -> Row {
    Row {
        way,
        n,
        copies: 0,
        cache_writes: None,
        api_writes: writes,
        counted,
        all_counted: all,
        all_ready: None,
        counts: None,
    }
}

/// The claims way's storm with no operator running: N clients each creating its claim, the
/// same requests as [`claims_way`] sends.
async fn claims_floor(n: usize) -> Row {
    let rig = Rig::namespace(&format!("bench-claims-floor-{n}")).await;
    let ns = &rig.ns;
    let clients = consumers(n).await;
    let request = ns.request("template", Some(spec()));
    let writes_before = writes_now(ns).await;
    let started = Instant::now();
    let acquired = claim_storm(clients, &request).await;
    let all = started.elapsed();
    let counted = acquired.into_iter().map(|(_, _, took)| took).collect();
    let writes = writes_since(ns, &writes_before).await;
    floor_row(CLAIMS_FLOOR, n, counted, all, writes)
}

/// The gated Pods way's burst with no operator running.
async fn pods_floor(n: usize) -> Row {
    let rig = Rig::namespace(&format!("bench-pods-floor-{n}")).await;
    let ns = &rig.ns;
    default_service_account(ns).await;
    let writes_before = writes_now(ns).await;
    let started = Instant::now();
    let created = create_gated_pods(&ns.api(), n).await;
    let all = started.elapsed();
    let writes = writes_since(ns, &writes_before).await;
    let counted = created.into_iter().map(|(_, _, took)| took).collect();
    floor_row(PODS_FLOOR, n, counted, all, writes)
}

/// The old path: each consumer appends its own finalizer to the shared cache (the operator adds
/// its cleanup finalizer first, so the list exists), retrying on transient errors.
async fn direct_append(api: &Api<TemplateCache>, entry: &str) {
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/metadata/finalizers/-", "value": entry}
    ]))
    .expect("patch");
    for round in 0..64u32 {
        match api
            .patch(
                "template",
                &PatchParams::default(),
                &Patch::<()>::Json(patch.clone()),
            )
            .await
        {
            Ok(_) => return,
            Err(kube::Error::Api(s)) if matches!(s.code, 409 | 422 | 429 | 500 | 503 | 504) => {
                tokio::time::sleep(Duration::from_millis(10 << round.min(7))).await;
            }
            Err(e) => panic!("append {entry}: {e}"),
        }
    }
    panic!("append {entry}: still contended after 64 rounds");
}

async fn direct_way(n: usize) -> Row {
    let rig = Rig::operator(&format!("bench-direct-{n}")).await;
    let ns = &rig.ns;
    ns.create_cache(
        "template",
        json!({"source": {"http": {"url": "http://127.0.0.1:9/disk.qcow2"}}}),
    )
    .await;
    let caches: Api<TemplateCache> = ns.api();
    until("the cleanup finalizer in place", || async {
        !caches
            .get("template")
            .await
            .expect("cache")
            .finalizers()
            .is_empty()
    })
    .await;
    let watch = CacheWatch::start(ns, "template");
    let clients = consumers(n).await;
    let writes_before = writes_now(ns).await;
    let started = Instant::now();
    let storm = clients.into_iter().enumerate().map(|(i, client)| {
        let ns_name = ns.name.clone();
        async move {
            let api: Api<TemplateCache> = Api::namespaced(client, &ns_name);
            let entry = format!("ref.templatecache.io/consumer-{i}");
            let begun = Instant::now();
            direct_append(&api, &entry).await;
            (entry, begun)
        }
    });
    let wanted: BTreeMap<String, Instant> = future::join_all(storm).await.into_iter().collect();
    let all_counted = started.elapsed();
    let counted_at = Instant::now();
    let api_writes = writes_since(ns, &writes_before).await;

    let completed = copy_succeeds(ns).await;
    until("the cache Ready", || async {
        let cache = caches.get("template").await.expect("cache");
        cache.status.and_then(|s| s.phase) == Some(templatecache_api::Phase::Ready)
    })
    .await;
    let all_ready = completed.elapsed();

    // Release: drop every reference in one write (the old path's release is per consumer; what
    // is compared here is the storm of acquires).
    let cache = caches.get("template").await.expect("cache");
    let kept: Vec<&String> = cache
        .finalizers()
        .iter()
        .filter(|f| !is_reference(f))
        .collect();
    caches
        .patch(
            "template",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": kept}})),
        )
        .await
        .expect("release all");
    let measured = Measured {
        way: "direct finalizers (old path)",
        n,
        started,
        counted_at,
        wanted,
        all_counted,
        all_ready,
        api_writes,
    };
    released_row(ns, watch, measured).await
}

/// The object CloudStack's database row is played on; its counter is an annotation, which
/// either kind holds.
trait CounterRow:
    kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::Serialize
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// A new row named `template` (its counter is set by [`new_row`]).
    fn named_template() -> Self;
}

impl CounterRow for TemplateCache {
    fn named_template() -> Self {
        TemplateCache::new("template", spec())
    }
}

impl CounterRow for ConfigMap {
    fn named_template() -> Self {
        let mut row = ConfigMap::default();
        row.metadata.name = Some("template".into());
        row
    }
}

/// A new row whose counter is 0.
fn new_row<K: CounterRow>() -> K {
    let mut row = K::named_template();
    row.meta_mut().annotations = Some([(COUNTER.to_owned(), "0".to_owned())].into());
    row
}

/// CloudStack's acquire: read the row, create it if absent (and copy), then counter += 1 from
/// what was read: one read and one write, as `SELECT` and `UPDATE` would be.
async fn cloudstack_acquire<K: CounterRow>(api: &Api<K>, copies: &AtomicU32) {
    let read = api.get_opt("template").await.expect("read row");
    let current = match read {
        Some(row) => counter_of(&row),
        None => {
            // The worker saw no row, so it starts a copy (the bug: several workers do).
            copies.fetch_add(1, Ordering::Relaxed);
            match api.create(&PostParams::default(), &new_row()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => panic!("create row: {e}"),
            }
            0
        }
    };
    write_counter(api, current + 1).await;
}

/// CloudStack's release: read the counter, write it less one.
async fn cloudstack_release<K: CounterRow>(api: &Api<K>) {
    let row = api.get("template").await.expect("read counter");
    write_counter(api, counter_of(&row) - 1).await;
}

/// Writes the counter with no precondition, as the SQL UPDATE did.
async fn write_counter<K: CounterRow>(api: &Api<K>, value: i64) {
    let patch = json!({"metadata": {"annotations": {COUNTER: value.to_string()}}});
    api.patch("template", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("write counter");
}

fn counter_of<K: CounterRow>(row: &K) -> i64 {
    row.annotations()
        .get(COUNTER)
        .and_then(|c| c.parse().ok())
        .expect("the row has a counter")
}

/// CloudStack's way on a row of kind `K`, with or without its global lock, named `way`.
async fn cloudstack_way<K: CounterRow>(n: usize, global_lock: bool, way: &'static str) -> Row {
    // No operator watches this namespace: the rows are CloudStack's database, nothing more.
    let rig = Rig::namespace(&format!("bench-cs-{n}")).await;
    let ns = &rig.ns;
    let kind = ApiResource::erase::<K>(&());
    let watch = CacheWatch::counting_kind(ns, &kind, "template", annotation_counter);
    let clients = consumers(n).await;
    let copies = Arc::new(AtomicU32::new(0));
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    let writes_before = writes_now(ns).await;
    let started = Instant::now();
    let workers = clients.iter().cloned().map(|client| {
        let (copies, lock) = (copies.clone(), lock.clone());
        let api: Api<K> = Api::namespaced(client, &ns.name);
        async move {
            let begun = Instant::now();
            let _held = if global_lock {
                Some(lock.lock().await)
            } else {
                None
            };
            cloudstack_acquire(&api, &copies).await;
            begun.elapsed()
        }
    });
    let counted = future::join_all(workers).await;
    let all_counted = started.elapsed();
    let counted_at = Instant::now();
    let api_writes = writes_since(ns, &writes_before).await;
    let rows: Api<K> = ns.api();

    let releases = clients.into_iter().map(|client| {
        let lock = lock.clone();
        let api: Api<K> = Api::namespaced(client, &ns.name);
        async move {
            let _held = if global_lock {
                Some(lock.lock().await)
            } else {
                None
            };
            cloudstack_release(&api).await;
        }
    });
    future::join_all(releases).await;
    let final_count = counter_of(&rows.get("template").await.expect("row"));
    // Let the watch see the last writes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let versions = watch.stop().await;
    drop(rig);
    Row {
        way,
        n,
        copies: copies.load(Ordering::Relaxed) as usize,
        cache_writes: Some(versions_between(&versions, started, counted_at)),
        api_writes,
        counted,
        all_counted,
        all_ready: None,
        counts: Some((lowest_count(&versions, final_count), final_count)),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --all-targets` runs bench targets without --bench: nothing to do then.
    if !args.iter().any(|a| a == "--bench") {
        println!("contention: a benchmark; run it with `cargo bench --bench contention`");
        return;
    }
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        vec![10, 100, 1000]
    } else {
        sizes
    };
    // `CONTENTION_WAYS=claims,lock` runs only those ways (for a quick look; the report is the
    // full run).
    let only = std::env::var("CONTENTION_WAYS").unwrap_or_default();
    let runs = |way: &str| only.is_empty() || only.split(',').any(|w| w == way);
    let mut rows = vec![];
    for &n in &sizes {
        let mut row_set = vec![];
        if runs("floor") {
            row_set.push(claims_floor(n).await);
            row_set.push(pods_floor(n).await);
        }
        if runs("claims") {
            row_set.push(claims_way(n).await);
        }
        if runs("pods") {
            row_set.push(pods_way(n).await);
        }
        if runs("direct") {
            row_set.push(direct_way(n).await);
        }
        if runs("cloudstack") {
            row_set.push(cloudstack_way::<TemplateCache>(n, false, NO_LOCK).await);
        }
        if runs("lock") {
            row_set.push(cloudstack_way::<ConfigMap>(n, true, FAIR_LOCK).await);
        }
        if runs("cache-lock") {
            row_set.push(cloudstack_way::<TemplateCache>(n, true, CACHE_ROW_LOCK).await);
        }
        for row in row_set {
            println!("{}", row.markdown());
            rows.push(row);
        }
    }
    let table = rows
        .iter()
        .map(Row::markdown)
        .collect::<Vec<_>>()
        .join("\n");
    let ratios = ratios(&rows);
    let breakdown = write_breakdown(&rows);
    let report = format!(
        "## Contention\n\n\
         `cargo bench --bench contention -- {}` (also `make bench`), {}, {} cores: N consumers of \
         one template at the same moment, all ways in the same run, against the same API server. \
         **claims**: every consumer its own client (a ServiceAccount, so API priority and \
         fairness applies) creating its TemplateCacheClaim; **gated Pods**: N Pods with the label \
         and the scheduling gate created at once by one client ({POD_CREATORS} in flight, a \
         ReplicaSet's burst); **direct finalizers**: the old path, each consumer appending its \
         own finalizer to the cache; **CloudStack** before and after its fix: read the row, \
         create it if absent (each worker that saw no row starts a copy), then write the counter \
         read plus one with no precondition; after the fix under one global lock. The **fair \
         lock** plays that lock on the cheapest row this API server has, a ConfigMap; the same \
         lock on a TemplateCache row (CEL rules, finalizers) is kept as a second row. The \
         **floors** are the same N claims, and the same N gated Pods, created with no operator \
         running: what the API server takes to accept the consumers at all.\n\n\
         Every way is measured the same way. A raw watch of the one shared object (the cache, or \
         CloudStack's row) records each version: *counted* is when a consumer's reference first \
         shows on it (CloudStack: when its counter write returns; a floor: when its create \
         returns), measured from that consumer's start; *writes to \
         the cache object* are the versions the watch saw from the start of the storm until all \
         were counted; *API writes per consumer* are the API server's own \
         `apiserver_request_total` write requests to {} in the same window, whoever sent them \
         (consumers, operator, benchmark), divided by N; requests its priority and fairness \
         refused (429, which the client sends again) wrote nothing and are shown apart below. \
         The benchmark then plays the copy Job's \
         completion; *all Ready after* is the time from there until every claim is Ready, every \
         Pod ungated, or the cache Ready (direct path). Then all consumers release at once; \
         *lowest count* is the lowest `status.refCount` (CloudStack: its counter) the watch saw \
         over the whole run, *final count* the count once all have released.\n\n\
         | way | N | copies started | writes to the cache object during the storm | API writes per consumer | p50 until counted | p99 until counted | all counted after | all Ready after the Job completes | lowest count | final count |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n{table}\n\n{ratios}\n\n\
         Where the writes of each storm went, as the API server counted them \
         (`apiserver_request_total` by verb, resource and subresource, from the start of the \
         storm until all were counted):\n\n{breakdown}\n\
         ![Time until all consumers are counted, against N, for each way](plots/contention.svg)\n\n\
         Targets (issue 28): at N = 1,000, claims and gated Pods all counted within 1.5x their \
         floor and within 0.5x the fair lock; all Ready within 2x the floor after the Job \
         completes; at most 1.5 API writes per consumer during the storm; at N = 10 a p99 until \
         counted no worse than 2x the fair lock's; at most N/20 + 20 writes to the cache object \
         during a storm; one copy whatever N; a count never below 0 (the CRD's minimum forbids \
         it) nor above the references the same version holds (asserted in tests/claims.rs and \
         tests/pod_gate.rs). CloudStack's counter loses concurrent updates before its fix, so \
         releases drive it negative (the bug).\n",
        sizes
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        today_utc(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        RESOURCES.join(", "),
    );
    support::write_report("bench/contention.md", &report);
    support::write_report("bench/contention.tsv", &plot_data(&rows));
    println!("contention: wrote target/bench/contention.md");
}

/// The rows as tab-separated values for `benches/plots.rs`: way, N, seconds until all counted.
fn plot_data(rows: &[Row]) -> String {
    rows.iter()
        .map(|r| format!("{}\t{}\t{:.4}\n", r.way, r.n, r.all_counted.as_secs_f64()))
        .collect()
}

/// Where each way's writes went during its storm: the API server's count by request, and per
/// consumer.
fn write_breakdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| way | N | API writes during the storm, by request (per consumer) |\n|---|---|---|\n",
    );
    for row in rows {
        let kinds: Vec<String> = row
            .api_writes
            .iter()
            .map(|(kind, n)| format!("{kind} {n:.0} ({:.2})", n / row.n as f64))
            .collect();
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            row.way,
            row.n,
            kinds.join(", ")
        ));
    }
    out
}

/// The 99th percentile of a row's times until counted.
fn p99(row: &Row) -> Duration {
    let mut sorted = row.counted.clone();
    sorted.sort();
    sorted[((sorted.len() as f64 * 0.99).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The operator's ways against the baselines of the same N: the fair lock (ConfigMap row), the
/// lock on a TemplateCache row, and the floor of the same consumers (their creates alone).
fn ratios(rows: &[Row]) -> String {
    let mut out = String::from(
        "| way | N | all counted / fair lock | all counted / TemplateCache-row lock | all counted / floor | p99 until counted / fair lock's | all Ready after the Job / floor | cache writes / (N/20 + 20) |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let find = |way: &str, n: usize| rows.iter().find(|r| r.way == way && r.n == n);
    let ratio = |a: Duration, b: Option<Duration>| {
        b.map_or("n/a".into(), |b| {
            format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64())
        })
    };
    for (row, floor_way) in rows.iter().filter_map(|r| match r.way {
        CLAIMS => Some((r, CLAIMS_FLOOR)),
        PODS => Some((r, PODS_FLOOR)),
        _ => None,
    }) {
        let fair = find(FAIR_LOCK, row.n);
        let floor = find(floor_way, row.n).map(|f| f.all_counted);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.way,
            row.n,
            ratio(row.all_counted, fair.map(|l| l.all_counted)),
            ratio(
                row.all_counted,
                find(CACHE_ROW_LOCK, row.n).map(|l| l.all_counted)
            ),
            ratio(row.all_counted, floor),
            ratio(p99(row), fair.map(p99)),
            row.all_ready
                .map_or("n/a".into(), |ready| ratio(ready, floor)),
            row.cache_writes.map_or("n/a".into(), |w| format!(
                "{:.2}",
                w as f64 / (row.n as f64 / 20.0 + 20.0)
            )),
        ));
    }
    out
}

/// Today's date (UTC) from `date`, to stamp the report.
fn today_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
