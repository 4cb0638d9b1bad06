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
//!
//! The same run on the real node (`make test-node`), with the chart installed: the copy Jobs
//! run as Pods, whose movers are SIGKILLed half-way through a copy, the kubelet is SIGKILLed
//! once, and the leading operator Pod is deleted at once several times, so a standby must take
//! over; the same books must come out right.

use templatecache_test_support as support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DeleteParams, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use support::TestNamespace;
use support::chart::{Release, STORE_CLAIM};
use support::eventually;
use support::http_server::{HttpServer, random_below};
use support::jobs::{self, running_movers};
use support::node::{self, ProvisionedVolume};
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

/// Held by each chaos run for its whole length: the two runs, when one binary runs both
/// (`--include-ignored`), would otherwise share two cores and the API server restarts.
static ONE_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
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
    /// On the node: copy Pods' movers SIGKILLed while their partial file held bytes.
    copy_kills: AtomicU32,
    /// On the node: kubelet SIGKILLs.
    kubelet_kills: AtomicU32,
    /// On the node: how long each leader Pod kill left the operator without a leader.
    takeovers: Mutex<Vec<Duration>>,
    /// Every uid each copy Job name had: a second one is the operator's own Job replaced
    /// within its attempt (a leader killed between creating it and recording its uid, so the
    /// next leader cannot tell it from a forgery, deletes it and makes its own).
    copy_job_uids: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl Tally {
    /// Whether the copy Job `name` was replaced within its attempt.
    fn replaced(&self, name: &str) -> bool {
        let uids = self.copy_job_uids.lock().unwrap();
        uids.get(name).is_some_and(|u| u.len() > 1)
    }
}

/// Templates `t0`..: `unreliable` of 256 KiB on the `/unreliable/` route (its first answer for
/// each is stale), then `slow` of 2 MiB on `/slow/` (64 KiB pieces 50 ms apart: a copy takes
/// about 1.6 s, long enough to be killed half-way). The bytes of each, and the spec naming it.
fn serve_templates(
    server: &HttpServer,
    unreliable: usize,
    slow: usize,
) -> (Vec<Vec<u8>>, Vec<TemplateCacheSpec>) {
    (0..unreliable + slow)
        .map(|t| {
            let (route, size) = if t < unreliable {
                ("unreliable", 256 << 10)
            } else {
                ("slow", 2 << 20)
            };
            let mut bytes = random_bytes(size);
            bytes[0] = t as u8;
            server.put(&format!("t{t}.img"), &bytes);
            let spec = serde_json::from_value(json!({
                "source": {"http": {"url": server.url(&format!("{route}/t{t}.img"))}},
                "checksum": sha256(&bytes),
            }))
            .expect("spec");
            (bytes, spec)
        })
        .unzip()
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
        let t = usize::try_from(random_below(specs.len() as u64)).unwrap_or(0);
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

/// Records every uid each copy Job name has (see [`Tally::copy_job_uids`]).
fn watch_copy_jobs(ns: &TestNamespace, tally: Arc<Tally>) -> tokio::task::JoinHandle<()> {
    let jobs = ns.api::<Job>();
    tokio::spawn(async move {
        let mut events = watcher(jobs, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            let Ok(job) = event else { continue };
            if let Some(uid) = job.uid() {
                let mut uids = tally.copy_job_uids.lock().unwrap();
                uids.entry(job.name_any()).or_default().insert(uid);
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
            let running: Vec<String> = jobs
                .items
                .iter()
                .filter(|j| JobState::of(Some(j)) == JobState::Running)
                .map(|j| j.name_any())
                .collect();
            let unsettled: Vec<String> = caches
                .items
                .iter()
                .filter(|c| !settled(c))
                .map(|c| c.name_any())
                .collect();
            let unsettled_status: Vec<String> = (caches.items.iter())
                .filter(|c| !settled(c))
                .map(|c| {
                    let mut status = serde_json::to_value(&c.status).unwrap_or_default();
                    status["conditions"].take();
                    format!("{}: {status}", c.name_any())
                })
                .collect();
            if running.is_empty() && unsettled.is_empty() {
                Ok((caches.items, jobs.items))
            } else {
                let described = jobs::describe_jobs(&ns.client, &ns.name, &running).await;
                let count = running.len();
                let statuses = unsettled_status.join("\n");
                Err(format!(
                    "{count} Jobs running, unsettled: {unsettled:?}\n{statuses}\n{described}"
                ))
            }
        },
    )
    .await
}

/// How long the books may take to balance once the namespace is quiet: a release deletes the
/// consumer's claim, and its reference leaves the cache when the operator catches up, which
/// after a leader is killed is the new leader's first sweep of gone consumers (every 5 s on
/// the node) once its Lease is taken (5 s).
const BOOKS_SETTLE: Duration = Duration::from_secs(60);

/// References held at the end, per cache, from the template each consumer still holds.
fn held_at_the_end(held: impl IntoIterator<Item = usize>) -> BTreeMap<String, u32> {
    let mut expected = BTreeMap::new();
    for t in held {
        *expected.entry(format!("t{t}")).or_default() += 1;
    }
    expected
}

/// The caches once the namespace is quiet and the books balance ([`check_the_books`], and no
/// version the watch saw counted above its references), with their problems and rows; the problems still seen after [`BOOKS_SETTLE`] if they never
/// do.
async fn settled_books(
    ns: &TestNamespace,
    expected: &BTreeMap<String, u32>,
    sources: &[Vec<u8>],
    dir: &std::path::Path,
    tally: &Tally,
) -> (Vec<TemplateCache>, Vec<String>, Vec<String>) {
    let quiet = Instant::now();
    loop {
        let (caches, jobs) = wait_for_quiet(ns).await;
        let (mut problems, rows) = check_the_books(&caches, &jobs, expected, sources, dir, tally);
        problems.extend(
            tally
                .counts_above_references
                .lock()
                .unwrap()
                .iter()
                .cloned(),
        );
        if problems.is_empty() || quiet.elapsed() > BOOKS_SETTLE {
            eprintln!(
                "the books, {:.1} s after the namespace was quiet: {} problems",
                quiet.elapsed().as_secs_f64(),
                problems.len()
            );
            return (caches, problems, rows);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What the books must say once the namespace is quiet: per cache one Job per attempt, a
/// refCount equal to its references and to what consumers hold, the right bytes when Ready, at
/// least two attempts (every first copy is made to fail) unless the first attempt's Job was
/// replaced, and nothing else in the store.
/// Returns the problems and a table row per cache.
fn check_the_books(
    caches: &[TemplateCache],
    jobs: &[Job],
    expected: &BTreeMap<String, u32>,
    sources: &[Vec<u8>],
    dir: &std::path::Path,
    tally: &Tally,
) -> (Vec<String>, Vec<String>) {
    let mut problems = vec![];
    let mut rows = vec![];
    for cache in caches {
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
        // The stale first answer went to a Pod whose Job was replaced within the attempt when
        // one attempt was enough: that Pod was stopped, its failure counted for no attempt.
        if attempt < 2 && !tally.replaced(&format!("{name}-copy-1")) {
            problems.push(format!(
                "{name}: {attempt} attempt(s), but its first copy was stale or killed"
            ));
        }
        rows.push(format!(
            "| {name} | {:?} | {attempt} | {} | {refs} | {want} |",
            status.phase.unwrap_or_default(),
            copy_jobs.len()
        ));
    }
    let names: BTreeSet<String> = caches.iter().map(|c| c.name_any()).collect();
    for (file, _) in store_files(dir) {
        if !names.contains(&file) {
            problems.push(format!("left in the store: {file}"));
        }
    }
    (problems, rows)
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
    let _alone = ONE_RUN_AT_A_TIME.lock().await;
    let settings = Settings::from_env();
    let server = HttpServer::start().await;
    let (sources, specs) = serve_templates(&server, TEMPLATES, 0);
    let specs = Arc::new(specs);
    let rig = Rig::builder("chaos")
        .store("10Gi")
        .runs_jobs()
        .start()
        .await;
    let (ns, store) = (Arc::new(rig.ns.clone()), rig.store());
    let tally = Arc::new(Tally::default());
    let watch = watch_ref_counts(&ns, tally.clone());
    let job_watch = watch_copy_jobs(&ns, tally.clone());
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
    let expected = held_at_the_end(held);
    let dir = store.dir.path().join(&ns.name);
    let (caches, problems, rows) = settled_books(&ns, &expected, &sources, &dir, &tally).await;
    watch.abort();
    job_watch.abort();
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

/// Slow templates of the chaos on the node (see [`serve_templates`]): the first copy of each is
/// killed once its partial file holds bytes.
const SLOW_TEMPLATES: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the real node: make test-node"]
async fn on_the_node_copy_pods_killed_mid_copy_a_kubelet_kill_and_leader_pod_kills_lose_nothing() {
    let _alone = ONE_RUN_AT_A_TIME.lock().await;
    let settings = Settings::from_env();
    let (node, images) = node::up();
    let operator_ns = TestNamespace::new("chaos-ops").await;
    let caches_ns = TestNamespace::new("chaos-node").await;
    let mut release = Release::new(&operator_ns, &caches_ns);
    for ns in [&operator_ns, &caches_ns] {
        node::enforce_restricted(&ns.name);
    }
    let volume = ProvisionedVolume::new(&caches_ns, STORE_CLAIM);
    let server = HttpServer::start_on(node.ip).await;
    let (sources, specs) = serve_templates(&server, TEMPLATES, SLOW_TEMPLATES);
    let specs = Arc::new(specs);
    // Its own namespace only (the other chaos run may have an operator of its own); retries a
    // second apart (doubling), a sweep of gone consumers every 5 s and a 5 s Lease: the run is
    // short, the chart's defaults are tuned for hours.
    let watch_only = format!("watchNamespace={}", caches_ns.name);
    release.install(
        &images,
        &node,
        server.addr,
        &[
            &watch_only,
            "operator.maxAttempts=20",
            "operator.retryBaseSeconds=1",
            "operator.referenceSweepSeconds=5",
            "leaderElection.leaseDurationSeconds=5",
        ],
    );
    release.assert_available_from_the_registry(&images).await;

    let ns = Arc::new(caches_ns.clone());
    let tally = Arc::new(Tally::default());
    let watch = watch_ref_counts(&ns, tally.clone());
    let job_watch = watch_copy_jobs(&ns, tally.clone());
    let begun = Instant::now();
    let until = begun + settings.run;
    let leader_kills = 3.max(u32::try_from(settings.run.as_secs() / 15).unwrap_or(u32::MAX));
    let store_dir = volume.dir.join(&ns.name);
    let consumers = futures::future::join_all(
        (0..CONSUMERS)
            .map(|i| tokio::spawn(consumer(ns.clone(), specs.clone(), i, until, tally.clone()))),
    );
    let monkey = node_monkey(
        &release,
        &ns,
        &store_dir,
        leader_kills,
        until,
        tally.clone(),
    );
    let (held, ()) = tokio::join!(consumers, monkey);
    let expected = held_at_the_end(held.into_iter().filter_map(|r| r.expect("consumer")));
    let (caches, problems, rows) =
        settled_books(&ns, &expected, &sources, &store_dir, &tally).await;
    watch.abort();
    job_watch.abort();
    let copy_kills = tally.copy_kills.load(Ordering::Relaxed);
    let kills = tally.kills.load(Ordering::Relaxed);
    let takeovers = tally.takeovers.lock().unwrap().clone();
    assert!(
        copy_kills >= SLOW_TEMPLATES as u32,
        "{copy_kills} copy Pods killed mid-copy"
    );
    assert_eq!(tally.kubelet_kills.load(Ordering::Relaxed), 1);
    assert!(
        kills >= leader_kills && takeovers.len() == kills as usize,
        "{kills} leader Pods killed, {} standbys took over",
        takeovers.len()
    );
    assert!(problems.is_empty(), "{problems:#?}");

    let attempts: u32 = caches
        .iter()
        .filter_map(|c| c.status.as_ref()?.attempt)
        .sum();
    let report = format!(
        "On the node, ran {:.0} s: {CONSUMERS} consumers, {} acquires, {} releases; {copy_kills} \
         copy Pods' movers SIGKILLed with bytes in their partial file, the kubelet SIGKILLed \
         once, the leading operator Pod deleted {kills} times (a standby led again after {}); \
         {attempts} copy attempts for {} caches. A raw watch of the caches saw {} versions, none \
         with a refCount above its references. Every cache ended Ready with the right bytes.\n\n\
         | cache | phase | attempts | copy Jobs | refCount | references held by consumers |\n\
         |---|---|---|---|---|---|\n{}\n",
        begun.elapsed().as_secs_f64(),
        tally.acquires.load(Ordering::Relaxed),
        tally.releases.load(Ordering::Relaxed),
        takeovers
            .iter()
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        caches.len(),
        tally.watch_events.load(Ordering::Relaxed),
        rows.join("\n"),
    );
    println!("{report}");
    support::write_report("chaos/node-report.md", &report);
}

/// The chaos on the node: first the first copy of every slow template is killed mid-copy, then
/// `leader_kills` leader Pods are deleted spread over the run (with the copies running at each
/// moment killed too), and the kubelet once half-way.
async fn node_monkey(
    release: &Release,
    ns: &TestNamespace,
    store_dir: &std::path::Path,
    leader_kills: u32,
    until: Instant,
    tally: Arc<Tally>,
) {
    let slow: BTreeSet<String> = (TEMPLATES..TEMPLATES + SLOW_TEMPLATES)
        .map(|t| format!("t{t}"))
        .collect();
    let mut first_copies_killed = BTreeSet::new();
    eventually(
        "the first copy of each slow template killed mid-copy",
        Duration::from_secs(120),
        || {
            let killed = kill_copies_mid_copy(ns, store_dir, |cache, attempt| {
                attempt == 1 && slow.contains(cache)
            });
            tally
                .copy_kills
                .fetch_add(killed.len() as u32, Ordering::Relaxed);
            first_copies_killed.extend(killed);
            let done = first_copies_killed.len() == slow.len();
            async move { done.then_some(()) }
        },
    )
    .await;
    let left = until.saturating_duration_since(Instant::now());
    let pause = left / (leader_kills + 1);
    for k in 0..leader_kills {
        tokio::time::sleep(pause).await;
        let killed = kill_copies_mid_copy(ns, store_dir, |_, _| true);
        tally
            .copy_kills
            .fetch_add(killed.len() as u32, Ordering::Relaxed);
        if k == leader_kills / 2 {
            kill_the_kubelet().await;
            tally.kubelet_kills.fetch_add(1, Ordering::Relaxed);
        }
        let without_leader = kill_the_leader_pod(release).await;
        tally.kills.fetch_add(1, Ordering::Relaxed);
        tally.takeovers.lock().unwrap().push(without_leader);
    }
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
}

/// SIGKILLs, as the kernel's OOM killer would, every mover of `ns` (the node's containers are
/// this machine's processes) that copies a cache and attempt `pick` chooses and whose partial
/// file already holds bytes. Returns the caches whose copy it killed.
fn kill_copies_mid_copy(
    ns: &TestNamespace,
    store_dir: &std::path::Path,
    pick: impl Fn(&str, u32) -> bool,
) -> Vec<String> {
    let mut killed = vec![];
    for mover in running_movers(&ns.name) {
        let partial = store_dir
            .join(".partial")
            .join(templatecache_mover::partial_name(
                &mover.cache,
                mover.attempt,
            ));
        let written = std::fs::metadata(&partial).map_or(0, |m| m.len());
        if pick(&mover.cache, mover.attempt) && written > 0 {
            let status = std::process::Command::new("kill")
                .args(["-KILL", &mover.pid.to_string()])
                .status()
                .expect("run kill");
            if status.success() {
                killed.push(mover.cache);
            }
        }
    }
    killed
}

/// SIGKILLs the node's kubelet and starts it again (`hack/node.sh up` starts what is not
/// running) once the node has been without it for 3 s.
async fn kill_the_kubelet() {
    let pid_file = support::repo_root().join(".cluster/node/kubelet.pid");
    let pid = std::fs::read_to_string(&pid_file).expect("the kubelet's pid file");
    let status = std::process::Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill the kubelet (pid {pid})");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = tokio::process::Command::new(support::repo_root().join("hack/node.sh"))
        .arg("up")
        .status()
        .await
        .expect("restart the kubelet");
    assert!(status.success(), "hack/node.sh up brought the kubelet back");
}

/// Deletes the Pod that holds the release's Lease at once (grace period 0: its process gets no
/// time to give the Lease up) and returns how long until another Pod holds it.
async fn kill_the_leader_pod(release: &Release) -> Duration {
    let holder = || release.lease_holder();
    let leader = eventually("a leader", Duration::from_secs(60), holder).await;
    let pods: Api<Pod> = Api::namespaced(support::client().await, &release.namespace);
    let killed = Instant::now();
    pods.delete(
        &leader,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .expect("delete the leader Pod");
    eventually("a standby leads", Duration::from_secs(120), || async {
        holder().await.filter(|h| *h != leader)
    })
    .await;
    killed.elapsed()
}
