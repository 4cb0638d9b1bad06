//! Scale benchmark: 5,000 TemplateCaches holding 50,000 references (10 each) are created while no
//! operator runs; then the operator (the release binary, as its own process) starts and the clock
//! runs until every cache is reconciled: its refCount recorded and its copy Job created. Reported:
//! that time, the operator's peak RSS, its write requests per second (from the API server's own
//! `apiserver_request_total`), and the API server's raw write rate measured in the same run (small
//! objects created by 32 concurrent writers) as the ceiling, beside the rates of TemplateCache
//! creates and status patches for scale. Then, with the operator still running, PODS labelled
//! gated Pods (a realistic spec of 2-3 KiB each) name the caches round robin, and the clock runs
//! until every cache counts them; the operator's peak RSS then is what the chart's memory limit
//! is set from. Writes `target/bench/scale.md`.
//!
//!     cargo bench --bench scale [-- CACHES REFERENCES_PER_CACHE PODS]

use templatecache_test_support as support;

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;
use support::operator::OperatorProcess;
use support::rig::Rig;
use templatecache_api::TemplateCache;

/// Concurrent writers for creating objects and for the raw write rate.
const WRITERS: usize = 32;

/// The kinds the operator writes while it reconciles (plural resource names as the API server's
/// metrics label them): only writes to these count as the operator's.
const OPERATOR_RESOURCES: [&str; 3] = ["templatecaches", "jobs", "events"];

/// Every create succeeded; panics with the error otherwise.
async fn create_all<K, F>(api: &Api<K>, count: usize, object: F) -> Duration
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
    F: Fn(usize) -> K,
{
    let started = Instant::now();
    stream::iter((0..count).map(|i| {
        let obj = object(i);
        async move { api.create(&PostParams::default(), &obj).await.map(drop) }
    }))
    .buffer_unordered(WRITERS)
    .try_collect::<Vec<_>>()
    .await
    .expect("create");
    started.elapsed()
}

fn cache(i: usize, references: usize) -> TemplateCache {
    let finalizers: Vec<String> = (0..references)
        .map(|r| format!("ref.templatecache.io/consumer-{r}"))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCache",
        "metadata": {"name": format!("t{i}"), "finalizers": finalizers},
        "spec": {"source": {"http": {"url": format!("http://127.0.0.1:9/t{i}.img")}}},
    }))
    .expect("cache literal")
}

/// A consumer Pod as a Deployment's replica looks: gated, labelled for cache `t<i % caches>`,
/// with the env, volumes and probes that make a real Pod 2-3 KiB (and the API server's
/// defaults add more).
fn gated_pod(i: usize, caches: usize) -> Pod {
    let env: Vec<_> = (0..20)
        .map(|e| json!({"name": format!("SETTING_{e}"), "value": format!("value-of-setting-{e}-for-replica-{i}")}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("consumer-{i}"),
                     "labels": {"templatecache.io/cache": format!("t{}", i % caches), "app": "vm"},
                     "annotations": {"example.com/owner": "platform-team", "example.com/build": "2026.12.03-1"}},
        "spec": {
            "schedulingGates": [{"name": "templatecache.io/ready"}],
            "containers": [{"name": "vm", "image": "registry.example/vm:1", "env": env,
                            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                            "volumeMounts": [{"name": "templates", "mountPath": "/templates", "subPath": "ns/t"}],
                            "readinessProbe": {"exec": {"command": ["test", "-f", "/templates/disk.img"]}}}],
            "volumes": [{"name": "templates", "persistentVolumeClaim": {"claimName": "templates"}}]
        }
    }))
    .expect("pod literal")
}

fn config_map(i: usize) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": format!("raw-{i}")}, "data": {"n": i.to_string()}}),
    )
    .expect("config map literal")
}

/// Merge-patches the status of caches `t0`..`t{count}` in `api`, with [`WRITERS`] at once.
async fn patch_statuses(api: &Api<TemplateCache>, count: usize) -> Duration {
    let started = Instant::now();
    let patch = json!({"status": {"refCount": 1}});
    stream::iter((0..count).map(|i| {
        let (name, patch) = (format!("t{i}"), &patch);
        async move {
            let params = PatchParams::default();
            api.patch_status(&name, &params, &Patch::Merge(patch))
                .await
                .map(drop)
        }
    }))
    .buffer_unordered(WRITERS)
    .try_collect::<Vec<_>>()
    .await
    .expect("status patch");
    started.elapsed()
}

/// Caches whose refCount is recorded, and copy Jobs, as two watches see them: the benchmark
/// follows the run through watches so that it does not load the API server it measures (a list
/// of 5,000 caches and 5,000 Jobs every second costs the API server more than the operator does).
struct Progress {
    caches: reflector::Store<TemplateCache>,
    jobs: reflector::Store<Job>,
    _drivers: Vec<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn follow(caches: Api<TemplateCache>, jobs: Api<Job>) -> Self {
        let (cache_view, cache_writer) = reflector::store();
        let (job_view, job_writer) = reflector::store();
        let drive_caches = reflector(cache_writer, watcher(caches, watcher::Config::default()))
            .default_backoff()
            .for_each(|_| async {});
        let drive_jobs = reflector(job_writer, watcher(jobs, watcher::Config::default()))
            .default_backoff()
            .for_each(|_| async {});
        Self {
            caches: cache_view,
            jobs: job_view,
            _drivers: vec![tokio::spawn(drive_caches), tokio::spawn(drive_jobs)],
        }
    }

    /// Caches whose refCount has reached at least `references`.
    fn counting_at_least(&self, references: u32) -> usize {
        (self.caches.state().iter())
            .filter(|c| c.status.as_ref().and_then(|s| s.ref_count) >= Some(references))
            .count()
    }

    fn reconciled(&self, references: u32) -> (usize, usize) {
        let counted = (self.caches.state().iter())
            .filter(|c| c.status.as_ref().and_then(|s| s.ref_count) == Some(references))
            .count();
        (counted, self.jobs.state().len())
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("scale: a benchmark; run it with `cargo bench --bench scale`");
        return;
    }
    let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let caches_n = numbers.first().copied().unwrap_or(5000);
    let refs_n = numbers.get(1).copied().unwrap_or(10);
    let pods_n = numbers.get(2).copied().unwrap_or(50_000);

    let rig = Rig::builder("bench-scale").store("100Ti").start().await;
    let (ns, store) = (&rig.ns, rig.store());
    let caches: Api<TemplateCache> = ns.api();
    let jobs: Api<Job> = ns.api();
    let create_time = create_all(&caches, caches_n, |i| cache(i, refs_n)).await;
    println!("scale: created {caches_n} caches with {refs_n} references each in {create_time:?}");
    // A second ceiling: writes of the same kind (CEL validation, 10 finalizers), same writers.
    let cache_rate = caches_n as f64 / create_time.as_secs_f64();

    // The ceiling: the API server's raw write rate for small objects, in this run.
    let raw = Rig::namespace("bench-raw").await;
    let raw_writes = caches_n;
    let raw_time = create_all(&raw.ns.api::<ConfigMap>(), raw_writes, config_map).await;
    let raw_rate = raw_writes as f64 / raw_time.as_secs_f64();
    println!("scale: raw write rate {raw_rate:.0}/s");
    // A third: the kind of write the operator mostly makes, a status patch of a TemplateCache,
    // on caches of the same shape in another namespace.
    let raw_caches = raw.ns.api::<TemplateCache>();
    create_all(&raw_caches, caches_n, |i| cache(i, refs_n)).await;
    let patch_rate = caches_n as f64 / patch_statuses(&raw_caches, caches_n).await.as_secs_f64();
    println!("scale: TemplateCache status patches {patch_rate:.0}/s");

    let progress = Progress::follow(caches.clone(), jobs.clone());
    progress
        .caches
        .wait_until_ready()
        .await
        .expect("cache watch");
    progress.jobs.wait_until_ready().await.expect("job watch");
    let writes_before = support::api_writes::served(&ns.client, &OPERATOR_RESOURCES).await;
    let started = Instant::now();
    let mut operator =
        OperatorProcess::start("scale-0", &ns.name, &store.name, &["--leader-elect=false"]);
    let want = u32::try_from(refs_n).expect("references per cache");
    loop {
        let (counted, job_count) = progress.reconciled(want);
        if counted == caches_n && job_count == caches_n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "not reconciled in 30 min: {counted} counted, {job_count} Jobs"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    let writes = support::api_writes::served(&ns.client, &OPERATOR_RESOURCES).await - writes_before;
    let rss = operator.peak_rss();
    let rate = writes / elapsed.as_secs_f64();
    println!(
        "scale: reconciled in {elapsed:?}, {writes} writes ({rate:.0}/s), peak RSS {} MiB",
        rss >> 20
    );

    // The operator keeps the labelled Pods it watches: its memory with a Deployment's worth of
    // consumers is what the chart's limit has to hold.
    let pods_started = Instant::now();
    let pods_create = create_all(&ns.api::<Pod>(), pods_n, |i| gated_pod(i, caches_n)).await;
    let with_pods = u32::try_from(refs_n + pods_n / caches_n.max(1)).expect("references");
    while progress.counting_at_least(with_pods) < caches_n {
        assert!(
            pods_started.elapsed() < Duration::from_secs(1800),
            "Pods not counted in 30 min: {} caches count them",
            progress.counting_at_least(with_pods)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pods_elapsed = pods_started.elapsed();
    let pods_rss = operator.peak_rss();
    operator.kill().await;
    println!(
        "scale: {pods_n} gated Pods created in {pods_create:?}, all counted after {pods_elapsed:?}, peak RSS {} MiB",
        pods_rss >> 20
    );

    let report = format!(
        "## Scale\n\n\
         `cargo bench --bench scale -- {caches_n} {refs_n} {pods_n}` (also `make bench`), {} cores: {caches_n} \
         TemplateCaches holding {} references ({refs_n} each) are created while no operator runs \
         ({WRITERS} concurrent writers, {:.0} s); then the operator (release build, its own process, \
         one namespace) starts and the clock runs until every cache has its refCount recorded and \
         its copy Job created. The ceiling the issue asks for is the API server's raw write rate \
         in the same run: {raw_writes} ConfigMaps created by {WRITERS} concurrent writers. Two more \
         ceilings, measured the same way in the same run, show what the API server can do for \
         writes of the operator's kind: creating the TemplateCaches (CEL-validated, \
         {refs_n} finalizers each), and merge-patching the status of {caches_n} such caches.\n\n\
         | caches | references | all reconciled after | operator peak RSS | operator writes | operator writes/s | raw writes/s (ConfigMap creates) | ratio | TemplateCache creates/s | ratio | TemplateCache status patches/s | ratio |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n\
         | {caches_n} | {} | {:.0} s | {} MiB | {writes:.0} | {rate:.0} | {raw_rate:.0} | {:.2} | {cache_rate:.0} | {:.2} | {patch_rate:.0} | {:.2} |\n\n\
         Targets: operator peak RSS under 150 MiB; at least half the raw write rate. Operator writes \
         are the state-changing requests the API server counted (`apiserver_request_total`) to the \
         kinds the operator writes (TemplateCaches and their status, Jobs, Events) while it worked, \
         about {:.1} per cache (cleanup finalizer, the attempt transition, the Job, its uid \
         recorded in the status, the CopyStarted Event); the API server's own Lease renewals and other background writes are left out.\n\n\
         Then, with the operator still running, {pods_n} labelled gated Pods (a Deployment \
         replica's spec: 20 env vars, a volume, a probe, two annotations) name the caches round \
         robin; they were created in {:.0} s and every cache counted them after {:.0} s. The \
         operator keeps only what it reads of each Pod (identity, labels, gates, phase). \
         **Operator peak RSS with {pods_n} Pods: {} MiB**; the chart's memory limit is set from \
         it with room for a relist (which holds the old and new lists at once).\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        caches_n * refs_n,
        create_time.as_secs_f64(),
        caches_n * refs_n,
        elapsed.as_secs_f64(),
        rss >> 20,
        rate / raw_rate,
        rate / cache_rate,
        rate / patch_rate,
        writes / caches_n as f64,
        pods_create.as_secs_f64(),
        pods_elapsed.as_secs_f64(),
        pods_rss >> 20,
    );
    support::write_report("bench/scale.md", &report);
    println!("scale: wrote target/bench/scale.md");
}
