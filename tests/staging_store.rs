//! A StagingStore with a capacity, against the real API server with real copies: eviction of
//! unreferenced caches in least-recently-referenced order, referenced caches never evicted, a
//! store that never holds more than its capacity, and eviction racing a new reference.

use templatecache_test_support as support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::http_server::HttpServer;
use support::jobs::wait_for_cache;
use support::rig::{Rig, random_bytes, sha256, stop_observer};
use templatecache_api::conditions::{READY, find};
use templatecache_api::reasons::cache as reason;
use templatecache_api::references::count_references;
use templatecache_api::{Phase, TemplateCache, TemplateCacheSpec};
use templatecache_client::{self as client, Reference};

const MIB: usize = 1 << 20;

/// Distinct 1 MiB templates on the HTTP server.
fn templates(server: &HttpServer, names: &[&str]) -> BTreeMap<String, Vec<u8>> {
    names
        .iter()
        .map(|name| {
            let mut bytes = random_bytes(MIB);
            bytes[..name.len()].copy_from_slice(name.as_bytes());
            server.put(name, &bytes);
            ((*name).to_owned(), bytes)
        })
        .collect()
}

fn spec(server: &HttpServer, name: &str, bytes: &[u8]) -> TemplateCacheSpec {
    serde_json::from_value(json!({
        "source": {"http": {"url": server.url(name)}}, "checksum": sha256(bytes)
    }))
    .expect("spec")
}

async fn acquire(rig: &Rig, spec: TemplateCacheSpec, name: &str, consumer: &str) -> Reference {
    let request = rig.ns.request(name, Some(spec));
    client::acquire(rig.ns.client.clone(), &request, consumer)
        .await
        .unwrap_or_else(|e| panic!("acquire {name}: {e}"))
}

async fn acquire_ready(rig: &Rig, spec: TemplateCacheSpec, name: &str) -> Reference {
    let reference = acquire(rig, spec, name, "holder").await;
    reference
        .wait_ready(Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{name} never Ready: {e}"));
    reference
}

/// Everything a watch of the namespace's caches saw: (name, phase, references).
type Seen = Arc<Mutex<Vec<(String, Option<Phase>, u32)>>>;

fn watch_caches(rig: &Rig) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let api: Api<TemplateCache> = rig.ns.api();
    let log = seen.clone();
    let task = tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(event) = stream.next().await {
            let cache = event.expect("watch of the caches");
            let phase = cache.status.as_ref().and_then(|s| s.phase);
            let refs = count_references(cache.finalizers());
            log.lock().unwrap().push((cache.name_any(), phase, refs));
        }
    });
    (seen, task)
}

async fn wait_evicted_and_removed(rig: &Rig, name: &str) {
    wait_for_cache(
        &rig.ns.client,
        &rig.ns.name,
        name,
        "evicted and removed",
        |c| {
            let status = c.status.as_ref();
            status.and_then(|s| s.phase) == Some(Phase::Evicted)
                && status.and_then(|s| s.size).is_none()
        },
    )
    .await;
    assert!(!rig.data(name).exists(), "{name}: evicted data is removed");
}

/// Transitions from Ready to Evicted of a cache that held a reference at that moment.
fn referenced_evictions(seen: &Seen) -> usize {
    let seen = seen.lock().unwrap();
    let mut last_phase: BTreeMap<&str, Option<Phase>> = BTreeMap::new();
    let mut bad = 0;
    for (name, phase, refs) in seen.iter() {
        let before = last_phase.insert(name, *phase).flatten();
        if before == Some(Phase::Ready) && *phase == Some(Phase::Evicted) && *refs > 0 {
            bad += 1;
        }
    }
    bad
}

fn first_eviction(seen: &Seen, name: &str) -> Option<usize> {
    let seen = seen.lock().unwrap();
    seen.iter()
        .position(|(n, phase, _)| n == name && *phase == Some(Phase::Evicted))
}

#[tokio::test]
async fn a_full_store_evicts_the_least_recently_referenced_and_never_a_referenced_cache() {
    let server = HttpServer::start().await;
    let names = ["t1", "t2", "t3", "t4", "t5"];
    let sources = templates(&server, &names);
    // Room for three 1 MiB caches; evict down to two once all three are there.
    let eviction =
        json!({"highWatermarkPercent": 90, "lowWatermarkPercent": 70, "minUnusedSeconds": 0});
    let rig = Rig::with_store("evict", 1, "3Mi", eviction).await;
    let capacity = 3 * MIB as u64;
    let (seen, watch) = watch_caches(&rig);
    let (peak, sampler) = rig.sample_usage();
    let spec_of = |n: &str| spec(&server, n, &sources[n]);

    // t1 and t2 are used and released; t3 is held: the store is full, t1 goes first.
    acquire_ready(&rig, spec_of("t1"), "t1")
        .await
        .release()
        .await
        .expect("release");
    acquire_ready(&rig, spec_of("t2"), "t2")
        .await
        .release()
        .await
        .expect("release");
    let t3 = acquire_ready(&rig, spec_of("t3"), "t3").await;
    wait_evicted_and_removed(&rig, "t1").await;
    // t4 fits in t1's room; then the store is full again and t2, the only unheld one, goes.
    let _t4 = acquire_ready(&rig, spec_of("t4"), "t4").await;
    wait_evicted_and_removed(&rig, "t2").await;
    let _t5 = acquire_ready(&rig, spec_of("t5"), "t5").await;
    for held in ["t3", "t4", "t5"] {
        rig.assert_copied(held, &sources[held]).await;
    }

    // t1 again: three held caches fill the store, so the copy waits with a clear condition.
    let t1 = acquire(&rig, spec_of("t1"), "t1", "holder").await;
    let refused = wait_for_cache(&rig.ns.client, &rig.ns.name, "t1", "StoreFull", |c| {
        let ready = c.status.as_ref().and_then(|s| find(&s.conditions, READY));
        ready.is_some_and(|r| r.reason == reason::STORE_FULL)
    })
    .await;
    let status = refused.status.clone().expect("status");
    assert_eq!(status.phase, Some(Phase::Pending));
    let message = &find(&status.conditions, READY).expect("Ready").message;
    assert!(
        message.contains("cannot hold 1048576 more bytes"),
        "{message}"
    );
    assert!(!rig.data("t1").exists());

    // Releasing t3 makes room: t3 is evicted, and t1 is copied again as a new attempt.
    t3.release().await.expect("release t3");
    t1.wait_ready(Duration::from_secs(120))
        .await
        .expect("t1 Ready again");
    rig.assert_copied("t1", &sources["t1"]).await;
    wait_evicted_and_removed(&rig, "t3").await;
    let t1_now = rig.ns.api::<TemplateCache>().get("t1").await.expect("t1");
    assert_eq!(t1_now.status.and_then(|s| s.attempt), Some(2));

    stop_observer(sampler, "usage sampler");
    stop_observer(watch, "watch of the caches");
    let (disk, reported) = *peak.lock().unwrap();
    println!("peak: {disk} bytes on disk, {reported} reported, capacity {capacity}");
    assert!(
        disk <= capacity,
        "the store held {disk} bytes, over {capacity}"
    );
    assert!(
        reported <= capacity,
        "usage {reported} reported over {capacity}"
    );
    let order = |n| first_eviction(&seen, n);
    assert!(order("t1") < order("t2"), "least recently referenced first");
    for never in ["t4", "t5"] {
        assert_eq!(order(never), None, "{never} is referenced and was evicted");
    }
    assert!(order("t3").is_some(), "t3 is evicted once released");
    assert_eq!(
        referenced_evictions(&seen),
        0,
        "a referenced cache was evicted"
    );
}

/// Reads where a cache was Ready (before and after the file check, at the same attempt), and
/// how many of them found its file missing: a Ready cache without data.
#[derive(Default)]
struct ReadyChecks {
    made: u32,
    without_data: u32,
}

/// Samples a cache until stopped, checking its file whenever it is Ready. A failed read panics,
/// which [`stop_observer`] turns into a failed test.
fn watch_for_ready_without_data(
    rig: &Rig,
    name: &str,
    size: u64,
) -> (Arc<Mutex<ReadyChecks>>, tokio::task::JoinHandle<()>) {
    let checks = Arc::new(Mutex::new(ReadyChecks::default()));
    let caches: Api<TemplateCache> = rig.ns.api();
    let path = rig.data(name);
    let name = name.to_owned();
    let out = checks.clone();
    let task = tokio::spawn(async move {
        let ready_at = |c: &Option<TemplateCache>| {
            let status = c.as_ref()?.status.as_ref()?;
            (status.phase == Some(Phase::Ready)).then_some(status.attempt)
        };
        loop {
            let before = caches.get_opt(&name).await.expect("read the cache");
            let present = std::fs::metadata(&path).is_ok_and(|m| m.len() == size);
            let after = caches.get_opt(&name).await.expect("read the cache");
            if let (Some(a), Some(b)) = (ready_at(&before), ready_at(&after))
                && a == b
            {
                let mut checks = out.lock().unwrap();
                checks.made += 1;
                checks.without_data += u32::from(!present);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    (checks, task)
}

async fn current_attempt(rig: &Rig, name: &str) -> Option<u32> {
    let cache: TemplateCache = rig.ns.api().get(name).await.expect("cache");
    cache.status.and_then(|s| s.attempt)
}

/// How long after the release the new acquire comes, one round each: from at once (the acquire
/// wins and keeps the copy) to long after the eviction (the cache is copied again). The test
/// requires both outcomes, so the sweep provably crossed the moment the two race for.
const RACE_PAUSES_MS: [u64; 9] = [0, 20, 50, 100, 200, 400, 800, 1600, 3200];

#[tokio::test]
async fn eviction_racing_a_new_reference_never_evicts_it_nor_leaves_a_ready_cache_without_data() {
    let server = HttpServer::start().await;
    let sources = templates(&server, &["img"]);
    let bytes = &sources["img"];
    // Any unreferenced Ready copy is over the high watermark: eviction is immediate.
    let eviction =
        json!({"highWatermarkPercent": 40, "lowWatermarkPercent": 10, "minUnusedSeconds": 0});
    let rig = Rig::with_store("race", 1, "2Mi", eviction).await;
    let (checks, checker) = watch_for_ready_without_data(&rig, "img", bytes.len() as u64);
    let (seen, watch) = watch_caches(&rig);
    let mut outcomes = vec![];

    for pause_ms in RACE_PAUSES_MS {
        let first = acquire(&rig, spec(&server, "img", bytes), "img", "first").await;
        first
            .wait_ready(Duration::from_secs(120))
            .await
            .expect("Ready");
        let attempt = current_attempt(&rig, "img").await;
        // The release makes the cache evictable at once; the new acquire races the eviction.
        let (released, second) = tokio::join!(first.release(), async {
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            acquire(&rig, spec(&server, "img", bytes), "img", "second").await
        });
        released.expect("release");
        second
            .wait_ready(Duration::from_secs(120))
            .await
            .expect("Ready again");
        rig.assert_copied("img", bytes).await;
        let kept = current_attempt(&rig, "img").await == attempt;
        outcomes.push((pause_ms, if kept { "kept" } else { "copied again" }));
        second.release().await.expect("release");
        wait_evicted_and_removed(&rig, "img").await;
    }
    stop_observer(checker, "Ready-without-data checker");
    stop_observer(watch, "watch of the caches");
    assert_eq!(
        referenced_evictions(&seen),
        0,
        "the cache was evicted while the new acquire held it"
    );
    let checks = std::mem::take(&mut *checks.lock().unwrap());
    println!(
        "races (pause ms, outcome): {outcomes:?}; {} reads of a Ready cache checked its file",
        checks.made
    );
    assert_eq!(
        checks.without_data, 0,
        "a Ready cache was seen without its data"
    );
    assert!(checks.made > 0, "no read ever found the cache Ready");
    let won = |o: &str| outcomes.iter().any(|(_, outcome)| *outcome == o);
    assert!(
        won("kept") && won("copied again"),
        "the pauses did not cross the race: {outcomes:?}"
    );
}
