//! Contention benchmark: N consumers of one template at the same moment (N = 10, 100, 1000 by
//! default), against the local control plane, five ways in the same run:
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
//!   process, standing in for CloudStack's database lock).
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
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
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
const RESOURCES: [&str; 5] = [
    "templatecaches",
    "templatecacheclaims",
    "pods",
    "jobs",
    "events",
];
/// How long any one phase may take before the benchmark gives up (a hang, not a result).
const PATIENCE: Duration = Duration::from_secs(600);

/// One way's results at one N.
struct Row {
    way: &'static str,
    n: usize,
    copies: usize,
    cache_writes: usize,
    api_writes: f64,
    counted: Vec<Duration>,
    all_counted: Duration,
    all_ready: Option<Duration>,
    lowest: i64,
    final_count: i64,
}

impl Row {
    fn markdown(&self) -> String {
        let mut sorted = self.counted.clone();
        sorted.sort();
        let pct =
            |p: f64| sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1];
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
        format!(
            "| {} | {} | {} | {} | {:.2} | {} | {} | {:.2} s | {} | {} | {} |",
            self.way,
            self.n,
            self.copies,
            self.cache_writes,
            self.api_writes / self.n as f64,
            ms(pct(0.50)),
            ms(pct(0.99)),
            self.all_counted.as_secs_f64(),
            self.all_ready
                .map_or("n/a".into(), |d| format!("{:.2} s", d.as_secs_f64())),
            self.lowest,
            self.final_count,
        )
    }
}

fn spec() -> TemplateCacheSpec {
    support::http_spec("http://127.0.0.1:9/disk.qcow2")
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
    writes_before: f64,
) -> (Duration, Instant, f64) {
    let caches: Api<TemplateCache> = ns.api();
    until(what, || async {
        let cache = caches.get("template").await.expect("cache");
        let refs: BTreeSet<String> = cache.finalizers().iter().cloned().collect();
        wanted.keys().all(|r| refs.contains(r))
    })
    .await;
    let all_counted = started.elapsed();
    let counted_at = Instant::now();
    let api_writes = support::api_writes::served(&ns.client, &RESOURCES).await - writes_before;
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
    api_writes: f64,
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
        cache_writes: versions_between(&versions, measured.started, measured.counted_at),
        api_writes: measured.api_writes,
        counted: first_seen(&versions, &measured.wanted),
        all_counted: measured.all_counted,
        all_ready: Some(measured.all_ready),
        lowest: lowest_count(&versions, final_count),
        final_count,
    }
}

async fn claims_way(n: usize) -> Row {
    let rig = Rig::operator(&format!("bench-claims-{n}")).await;
    let ns = &rig.ns;
    let watch = CacheWatch::start(ns, "template");
    let clients = consumers(n).await;
    let request = ns.request("template", Some(spec()));
    let writes_before = support::api_writes::served(&ns.client, &RESOURCES).await;
    let started = Instant::now();
    let storm = clients.into_iter().enumerate().map(|(i, client)| {
        let request = request.clone();
        async move {
            let begun = Instant::now();
            let reference = client::acquire(client, &request, &format!("consumer-{i}"))
                .await
                .expect("acquire");
            (reference, begun)
        }
    });
    let acquired = future::join_all(storm).await;
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
        .map(|(r, begun)| (claim_reference(&uids[r.claim_name()]), *begun))
        .collect();
    let (all_counted, counted_at, api_writes) =
        until_counted(ns, "every claim counted", &wanted, started, writes_before).await;

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

    let releases = acquired.into_iter().map(|(r, _)| r.release());
    for released in future::join_all(releases).await {
        released.expect("release");
    }
    let measured = Measured {
        way: "claims",
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

async fn pods_way(n: usize) -> Row {
    let rig = Rig::operator(&format!("bench-pods-{n}")).await;
    let ns = &rig.ns;
    let accounts: Api<ServiceAccount> = ns.api();
    until("the namespace's default ServiceAccount", || async {
        accounts
            .get_opt("default")
            .await
            .expect("read SA")
            .is_some()
    })
    .await;
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
    let writes_before = support::api_writes::served(&ns.client, &RESOURCES).await;
    let started = Instant::now();
    let created: Vec<(String, Instant)> = stream::iter(0..n)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let begun = Instant::now();
                let pod = pods.create(&PostParams::default(), &gated_pod(i)).await?;
                Ok::<_, kube::Error>((pod_reference(&pod.uid().expect("uid")), begun))
            }
        })
        .buffer_unordered(POD_CREATORS)
        .try_collect()
        .await
        .expect("create Pods");
    let wanted: BTreeMap<String, Instant> = created.into_iter().collect();
    let (all_counted, counted_at, api_writes) =
        until_counted(ns, "every Pod counted", &wanted, started, writes_before).await;

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
        way: "gated Pods",
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
    let writes_before = support::api_writes::served(&ns.client, &RESOURCES).await;
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
    let api_writes = support::api_writes::served(&ns.client, &RESOURCES).await - writes_before;

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

/// CloudStack's acquire: read the row, create it if absent (and copy), then counter += 1.
async fn cloudstack_acquire(api: &Api<TemplateCache>, copies: &AtomicU32) {
    if api.get_opt("template").await.expect("read row").is_none() {
        // The worker saw no row, so it starts a copy (the bug: several workers do).
        copies.fetch_add(1, Ordering::Relaxed);
        let mut row = TemplateCache::new("template", spec());
        row.metadata.annotations = Some([(COUNTER.to_owned(), "0".to_owned())].into());
        match api.create(&PostParams::default(), &row).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create row: {e}"),
        }
    }
    add_to_counter(api, 1).await;
}

/// Read-modify-write of the counter with no precondition, as the SQL UPDATE did.
async fn add_to_counter(api: &Api<TemplateCache>, delta: i64) {
    let row = api.get("template").await.expect("read counter");
    let current: i64 = row
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(COUNTER)?.parse().ok())
        .unwrap_or(0);
    let patch = json!({"metadata": {"annotations": {COUNTER: (current + delta).to_string()}}});
    api.patch("template", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("write counter");
}

async fn row_counter(api: &Api<TemplateCache>) -> i64 {
    let row = api.get("template").await.expect("row");
    annotation_counter_of(&row)
}

fn annotation_counter_of(row: &TemplateCache) -> i64 {
    row.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(COUNTER)?.parse().ok())
        .expect("the row has a counter")
}

async fn cloudstack_way(n: usize, global_lock: bool) -> Row {
    // No operator watches this namespace: the rows are CloudStack's database, nothing more.
    let rig = Rig::namespace(&format!("bench-cs-{n}")).await;
    let ns = &rig.ns;
    let watch = CacheWatch::counting(ns, "template", annotation_counter);
    let clients = consumers(n).await;
    let copies = Arc::new(AtomicU32::new(0));
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    let writes_before = support::api_writes::served(&ns.client, &RESOURCES).await;
    let started = Instant::now();
    let workers = clients.iter().cloned().map(|client| {
        let (copies, lock) = (copies.clone(), lock.clone());
        let api: Api<TemplateCache> = Api::namespaced(client, &ns.name);
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
    let api_writes = support::api_writes::served(&ns.client, &RESOURCES).await - writes_before;
    let rows: Api<TemplateCache> = ns.api();

    let releases = clients.into_iter().map(|client| {
        let lock = lock.clone();
        let api: Api<TemplateCache> = Api::namespaced(client, &ns.name);
        async move {
            let _held = if global_lock {
                Some(lock.lock().await)
            } else {
                None
            };
            add_to_counter(&api, -1).await;
        }
    });
    future::join_all(releases).await;
    let final_count = row_counter(&rows).await;
    // Let the watch see the last writes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let versions = watch.stop().await;
    drop(rig);
    Row {
        way: if global_lock {
            "CloudStack after its fix (global lock)"
        } else {
            "CloudStack before its fix"
        },
        n,
        copies: copies.load(Ordering::Relaxed) as usize,
        cache_writes: versions_between(&versions, started, counted_at),
        api_writes,
        counted,
        all_counted,
        all_ready: None,
        lowest: lowest_count(&versions, final_count),
        final_count,
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
            row_set.push(cloudstack_way(n, false).await);
        }
        if runs("lock") {
            row_set.push(cloudstack_way(n, true).await);
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
    let report = format!(
        "## Contention\n\n\
         `cargo bench --bench contention -- {}` (also `make bench`), {}, {} cores: N consumers of \
         one template at the same moment, five ways in the same run. **claims**: every consumer \
         its own client (a ServiceAccount, so API priority and fairness applies) creating its \
         TemplateCacheClaim; **gated Pods**: N Pods with the label and the scheduling gate \
         created at once by one client ({POD_CREATORS} in flight, a ReplicaSet's burst); **direct \
         finalizers**: the old path, each consumer appending its own finalizer to the cache; \
         **CloudStack** before and after its fix: read the row, create it if absent (each worker \
         that saw no row starts a copy), read-modify-write a counter with no precondition, after \
         the fix under one global lock.\n\n\
         Every way is measured the same way. A raw watch of the one shared object (the cache, or \
         CloudStack's row) records each version: *counted* is when a consumer's reference first \
         shows on it (CloudStack: when its counter write returns), measured from that \
         consumer's start; *writes to \
         the cache object* are the versions the watch saw from the start of the storm until all \
         were counted; *API writes per consumer* are the API server's own \
         `apiserver_request_total` write requests to {} in the same window, whoever sent them \
         (consumers, operator, benchmark), divided by N. The benchmark then plays the copy Job's \
         completion; *all Ready after* is the time from there until every claim is Ready, every \
         Pod ungated, or the cache Ready (direct path). Then all consumers release at once; \
         *lowest count* is the lowest `status.refCount` (CloudStack: its counter) the watch saw \
         over the whole run, *final count* the count once all have released.\n\n\
         | way | N | copies started | writes to the cache object during the storm | API writes per consumer | p50 until counted | p99 until counted | all counted after | all Ready after the Job completes | lowest count | final count |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n{table}\n\n{ratios}\n\n\
         ![Time until all consumers are counted, against N, for each way](plots/contention.svg)\n\n\
         Targets: claims and Pods all counted within 0.5x the global lock's time at N = 100 and \
         1,000; at most N/20 + 20 writes to the cache object during a storm; at N = 10 a p99 until \
         counted no worse than 2x the global lock's; one copy whatever N; a count never below 0 \
         (the CRD's minimum forbids it) nor above the references the same version holds \
         (asserted in tests/claims.rs and tests/pod_gate.rs). CloudStack's counter loses \
         concurrent updates before its fix, so releases drive it negative (the bug).\n",
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

/// Each way's time until all were counted, and its p99, against the global lock's at the same N.
fn ratios(rows: &[Row]) -> String {
    let mut out = String::from(
        "| way | N | all counted / global lock | p99 until counted / global lock's | cache writes / (N/20 + 20) |\n|---|---|---|---|---|\n",
    );
    for row in rows
        .iter()
        .filter(|r| matches!(r.way, "claims" | "gated Pods"))
    {
        let Some(lock) = rows
            .iter()
            .find(|r| r.n == row.n && r.way.starts_with("CloudStack after"))
        else {
            continue;
        };
        let p99 = |r: &Row| {
            let mut s = r.counted.clone();
            s.sort();
            s[((s.len() as f64 * 0.99).ceil() as usize).clamp(1, s.len()) - 1]
        };
        out.push_str(&format!(
            "| {} | {} | {:.2}x | {:.2}x | {:.2} |\n",
            row.way,
            row.n,
            row.all_counted.as_secs_f64() / lock.all_counted.as_secs_f64(),
            p99(row).as_secs_f64() / p99(lock).as_secs_f64(),
            row.cache_writes as f64 / (row.n as f64 / 20.0 + 20.0),
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
