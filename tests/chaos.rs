//! Chaos: 200 consumers acquire and release 10 templates while the operator (the real binary)
//! is SIGKILLed at random moments, the API server is restarted, and the source fails at random.
//! The source's first answer for each template is stale (a byte wrong), so every cache needs a
//! second attempt with a new Job. Afterwards every cache must be exactly right: Ready with the
//! right bytes, one Job per attempt, refCount equal to the references held and, in a watch over
//! the whole run, never above the references of the same version; no orphaned data or partial
//! file in the store.
//!
//! `make test` runs it for `CHAOS_SECONDS` (default 45); `make chaos` runs it for 10 minutes
//! and writes the report into docs/reliability.md.

use templatecache_test_support as support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use support::TestNamespace;
use support::eventually;
use support::http_server::{HttpServer, random_below};
use support::operator::OperatorProcess;
use support::rig::Rig;
use support::rig::{random_bytes, sha256, store_files};
use templatecache::controller::jobs::JobState;
use templatecache_api::conditions::{READY, find};
use templatecache_api::reasons::cache as reason;
use templatecache_api::references::count_references;
use templatecache_api::{Phase, TemplateCache, TemplateCacheSpec};
use templatecache_client as client;

const TEMPLATES: usize = 10;
const CONSUMERS: usize = 200;

struct Settings {
    run: Duration,
    kills: u32,
}

impl Settings {
    fn from_env() -> Self {
        let seconds = std::env::var("CHAOS_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(45);
        Self {
            run: Duration::from_secs(seconds),
            // At least 20 kills, more in a longer run.
            kills: 20.max(u32::try_from(seconds / 3).unwrap_or(u32::MAX)),
        }
    }
}

/// What the run did, for the report.
#[derive(Default)]
struct Tally {
    acquires: AtomicU32,
    releases: AtomicU32,
    kills: AtomicU32,
    restarts: AtomicU32,
    last_restart: Mutex<Option<Instant>>,
    watch_events: AtomicU32,
    watch_errors: AtomicU32,
    last_watch_event: Mutex<Option<Instant>>,
    /// Versions whose refCount exceeded the references they held.
    counts_above_references: Mutex<Vec<String>>,
}

fn spec_of(server: &HttpServer, t: usize, checksum: &str) -> TemplateCacheSpec {
    serde_json::from_value(json!({
        "source": {"http": {"url": server.url(&format!("unreliable/t{t}.img"))}},
        "checksum": checksum,
    }))
    .expect("spec")
}

/// One consumer: acquire a random template, wait for it, hold it a moment, release it; again
/// until the run ends. An acquire that errors may still have landed (its reply lost in an API
/// server restart), so it is followed by a release: both are idempotent, so the books stay exact.
/// Returns the template it still holds at the end, if any.
async fn consumer(
    ns: Arc<TestNamespace>,
    specs: Arc<Vec<TemplateCacheSpec>>,
    index: usize,
    until: Instant,
    tally: Arc<Tally>,
) -> Option<usize> {
    let keeps_last = index.is_multiple_of(2);
    let mut round = 0;
    loop {
        let t = usize::try_from(random_below(TEMPLATES as u64)).unwrap_or(0);
        let id = format!("c{index}-{round}");
        round += 1;
        let request = ns.request(&format!("t{t}"), Some(specs[t].clone()));
        if let Ok(reference) = client::acquire(ns.client.clone(), &request, &id).await {
            tally.acquires.fetch_add(1, Ordering::Relaxed);
            let _ = reference.wait_ready(Duration::from_secs(20)).await;
            if Instant::now() >= until && keeps_last {
                return Some(t);
            }
            tokio::time::sleep(Duration::from_millis(random_below(300))).await;
        }
        release_for_sure(&ns, &format!("t{t}"), &id).await;
        tally.releases.fetch_add(1, Ordering::Relaxed);
        if Instant::now() >= until {
            return None;
        }
    }
}

async fn release_for_sure(ns: &TestNamespace, cache: &str, id: &str) {
    while client::release(ns.client.clone(), &ns.name, cache, id)
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn start_operator(ns: &TestNamespace, store: &str, generation: u32) -> OperatorProcess {
    let args = [
        "--leader-elect=false",
        "--max-attempts",
        "20",
        "--reference-sweep-seconds",
        "5",
    ];
    OperatorProcess::start(&format!("chaos-{generation}"), &ns.name, store, &args)
}

/// Kills the operator at random moments (each time restarting it after a random pause) and
/// restarts the API server twice, until `until`.
async fn chaos_monkey(
    ns: Arc<TestNamespace>,
    store: String,
    settings: &Settings,
    until: Instant,
    tally: Arc<Tally>,
) -> OperatorProcess {
    let started = Instant::now();
    let mut operator = start_operator(&ns, &store, 0);
    let interval_ms =
        u64::try_from(settings.run.as_millis()).unwrap_or(u64::MAX) / u64::from(settings.kills + 1);
    let restarts_at = [settings.run / 3, settings.run * 2 / 3];
    let mut restarted = 0;
    let mut generation = 0;
    while Instant::now() < until || tally.kills.load(Ordering::Relaxed) < settings.kills {
        let pause = interval_ms / 2 + random_below(interval_ms);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        operator.kill().await;
        tally.kills.fetch_add(1, Ordering::Relaxed);
        if restarted < restarts_at.len() && started.elapsed() >= restarts_at[restarted] {
            let status = tokio::process::Command::new(support::repo_root().join("hack/cluster.sh"))
                .arg("restart-apiserver")
                .status()
                .await
                .expect("restart the API server");
            assert!(status.success(), "restart the API server");
            restarted += 1;
            tally.restarts.fetch_add(1, Ordering::Relaxed);
            *tally.last_restart.lock().unwrap() = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(random_below(500))).await;
        generation += 1;
        operator = start_operator(&ns, &store, generation);
    }
    operator
}

/// Watches every cache of the namespace as raw JSON for the whole run, resuming across API
/// server restarts, and notes every version whose refCount is above the references it holds.
/// The test checks that the watch kept delivering after the last restart, so a watch that died
/// cannot pass for one that saw nothing wrong.
fn watch_ref_counts(ns: &TestNamespace, tally: Arc<Tally>) -> tokio::task::JoinHandle<()> {
    let ar = ApiResource::erase::<TemplateCache>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
    tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            let obj = match event {
                Ok(obj) => obj,
                Err(_) => {
                    tally.watch_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            tally.watch_events.fetch_add(1, Ordering::Relaxed);
            *tally.last_watch_event.lock().unwrap() = Some(Instant::now());
            let references = i64::from(count_references(obj.finalizers()));
            if let Some(count) = obj.data["status"]["refCount"].as_i64()
                && count > references
            {
                tally.counts_above_references.lock().unwrap().push(format!(
                    "{} rv {}: refCount {count} with {references} references",
                    obj.name_any(),
                    obj.resource_version().unwrap_or_default()
                ));
            }
        }
    })
}

/// Waits until no copy runs and every cache has settled (Ready, or failed for good).
async fn wait_for_quiet(ns: &TestNamespace) -> (Vec<TemplateCache>, Vec<Job>) {
    eventually(
        "the namespace settled",
        Duration::from_secs(300),
        || async {
            let caches = ns.api::<TemplateCache>().list(&Default::default()).await;
            let jobs = ns.api::<Job>().list(&Default::default()).await;
            let (Ok(caches), Ok(jobs)) = (caches, jobs) else {
                return Err("no answer from the API server".to_owned());
            };
            let running = jobs
                .items
                .iter()
                .filter(|j| JobState::of(Some(j)) == JobState::Running)
                .count();
            let unsettled: Vec<String> = caches
                .items
                .iter()
                .filter(|c| !settled(c))
                .map(|c| c.name_any())
                .collect();
            if running == 0 && unsettled.is_empty() {
                Ok((caches.items, jobs.items))
            } else {
                Err(format!("{running} Jobs running, unsettled: {unsettled:?}"))
            }
        },
    )
    .await
}

fn settled(cache: &TemplateCache) -> bool {
    let Some(status) = &cache.status else {
        return false;
    };
    let given_up =
        find(&status.conditions, READY).is_some_and(|r| r.reason == reason::RETRIES_EXHAUSTED);
    let counted = status.ref_count == Some(count_references(cache.finalizers()));
    counted && (status.phase == Some(Phase::Ready) || given_up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_consumers_survive_operator_kills_api_restarts_and_a_failing_source() {
    let settings = Settings::from_env();
    let server = HttpServer::start().await;
    let sources: Vec<Vec<u8>> = (0..TEMPLATES)
        .map(|t| {
            let mut bytes = random_bytes(256 << 10);
            bytes[0] = t as u8;
            server.put(&format!("t{t}.img"), &bytes);
            bytes
        })
        .collect();
    let specs: Arc<Vec<TemplateCacheSpec>> = Arc::new(
        sources
            .iter()
            .enumerate()
            .map(|(t, b)| spec_of(&server, t, &sha256(b)))
            .collect(),
    );
    let rig = Rig::builder("chaos").store("10Gi").executor().start().await;
    let (ns, store) = (Arc::new(rig.ns.clone()), rig.store());
    let tally = Arc::new(Tally::default());
    let watch = watch_ref_counts(&ns, tally.clone());
    let begun = Instant::now();
    let until = begun + settings.run;

    let consumers = futures::future::join_all(
        (0..CONSUMERS)
            .map(|i| tokio::spawn(consumer(ns.clone(), specs.clone(), i, until, tally.clone()))),
    );
    let monkey = chaos_monkey(
        ns.clone(),
        store.name.clone(),
        &settings,
        until,
        tally.clone(),
    );
    let (held, _operator) = tokio::join!(consumers, monkey);
    let held: Vec<usize> = held
        .into_iter()
        .filter_map(|r| r.expect("consumer"))
        .collect();
    let mut expected: BTreeMap<String, u32> = BTreeMap::new();
    for t in held {
        *expected.entry(format!("t{t}")).or_default() += 1;
    }

    let (caches, jobs) = wait_for_quiet(&ns).await;
    watch.abort();
    let mut problems = vec![];
    let mut rows = vec![];
    let dir = store.dir.path().join(&ns.name);
    for cache in &caches {
        let name = cache.name_any();
        let status = cache.status.clone().unwrap_or_default();
        let attempt = status.attempt.unwrap_or(0);
        let copy_jobs: BTreeSet<String> = jobs
            .iter()
            .filter_map(|j| j.metadata.name.clone())
            .filter(|j| j.starts_with(&format!("{name}-copy-")))
            .collect();
        let wanted: BTreeSet<String> = (1..=attempt).map(|n| format!("{name}-copy-{n}")).collect();
        if copy_jobs != wanted {
            problems.push(format!("{name}: Jobs {copy_jobs:?} for {attempt} attempts"));
        }
        let refs = count_references(cache.finalizers());
        let want = expected.get(&name).copied().unwrap_or(0);
        if status.ref_count != Some(refs) || refs != want {
            problems.push(format!(
                "{name}: refCount {:?}, {refs} references, {want} held",
                status.ref_count
            ));
        }
        let file = dir.join(&name);
        let t: usize = name[1..].parse().expect("t<n>");
        if status.phase == Some(Phase::Ready) {
            match std::fs::read(&file) {
                Ok(bytes) if bytes == sources[t] => {}
                Ok(_) => problems.push(format!("{name}: Ready with wrong data")),
                Err(_) => problems.push(format!("{name}: Ready without data")),
            }
            let digest = format!("sha256:{:x}", Sha256::digest(&sources[t]));
            if status.checksum.as_deref() != Some(&*digest) {
                problems.push(format!("{name}: status checksum {:?}", status.checksum));
            }
        } else {
            // 20 attempts against a source that fails about 30 % of requests: a cache that did
            // not get there lost its way, it was not unlucky.
            problems.push(format!(
                "{name}: {:?} after {attempt} attempts",
                status.phase
            ));
            if file.exists() {
                problems.push(format!("{name}: {:?} but data in the store", status.phase));
            }
        }
        if attempt < 2 {
            problems.push(format!(
                "{name}: {attempt} attempt(s), but the source's first answer was stale"
            ));
        }
        rows.push(format!(
            "| {name} | {:?} | {attempt} | {} | {refs} | {want} |",
            status.phase.unwrap_or_default(),
            copy_jobs.len()
        ));
    }
    let names: BTreeSet<String> = caches.iter().map(|c| c.name_any()).collect();
    for (file, _) in store_files(&dir) {
        if !names.contains(&file) {
            problems.push(format!("left in the store: {file}"));
        }
    }
    problems.extend(
        tally
            .counts_above_references
            .lock()
            .unwrap()
            .iter()
            .cloned(),
    );
    let kills = tally.kills.load(Ordering::Relaxed);
    let restarts = tally.restarts.load(Ordering::Relaxed);
    let last_restart = *tally.last_restart.lock().unwrap();
    let last_watch_event = *tally.last_watch_event.lock().unwrap();
    let attempts: u32 = caches
        .iter()
        .filter_map(|c| c.status.as_ref()?.attempt)
        .sum();
    let source = &server.unreliable;
    let requests = source.requests.load(Ordering::Relaxed);
    let percent = |n: u32| f64::from(n) * 100.0 / f64::from(requests.max(1));

    assert!(
        kills >= settings.kills && restarts >= 2,
        "{kills} kills, {restarts} restarts"
    );
    assert!(
        matches!((last_restart, last_watch_event), (Some(r), Some(e)) if e > r),
        "the refCount watch delivered nothing after the last API server restart"
    );
    assert!(problems.is_empty(), "{problems:#?}");

    let report = format!(
        "Ran {:.0} s: {CONSUMERS} consumers, {} acquires, {} releases; operator SIGKILLed {kills} \
         times, API server restarted {restarts} times; {attempts} copy attempts for {} caches. \
         The source answered {requests} GETs and failed {:.0} % of them ({:.0} % 503, {:.0} % cut \
         short, {:.0} % stale bytes, the first answer for each template among them). A raw watch \
         of the caches saw {} versions ({} watch errors across the restarts, resumed), none with \
         a refCount above its references. Every cache ended Ready with the right bytes.\n\n\
         | cache | phase | attempts | copy Jobs | refCount | references held by consumers |\n\
         |---|---|---|---|---|---|\n{}\n",
        begun.elapsed().as_secs_f64(),
        tally.acquires.load(Ordering::Relaxed),
        tally.releases.load(Ordering::Relaxed),
        caches.len(),
        percent(source.failed()),
        percent(source.unavailable.load(Ordering::Relaxed)),
        percent(source.cut_short.load(Ordering::Relaxed)),
        percent(source.stale.load(Ordering::Relaxed)),
        tally.watch_events.load(Ordering::Relaxed),
        tally.watch_errors.load(Ordering::Relaxed),
        rows.join("\n"),
    );
    println!("{report}");
    support::write_report("chaos/report.md", &report);
}
