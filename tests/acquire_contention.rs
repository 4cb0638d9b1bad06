//! CLOUDSTACK-7539's test, scaled up: N concurrent acquirers of one template, each a separate
//! task with a separate client, against a real API server. Exactly one TemplateCache and one Job,
//! refCount equal to N, and a watch over the whole run never sees refCount below 0 or above the
//! references the object actually holds. Then all release at once, with duplicate releases mixed
//! in: refCount 0, never negative.

mod support;

use std::time::Duration;

use futures::{StreamExt, future};
use kube::Api;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use support::TestNamespace;
use support::jobs::{Outcome, finish_copy, jobs_of, wait_for_cache, wait_for_job};
use support::operator::{Operator, TestStore, config};
use templatecache::api::references::count_references;
use templatecache::api::{Phase, TemplateCache, TemplateCacheSpec};
use templatecache::client::{self, CacheRequest};
use tokio::sync::watch;

const CHECKSUM: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// What the watch saw over the whole run.
#[derive(Debug, Default, Clone)]
struct Seen {
    events: usize,
    lowest: Option<i64>,
    highest: Option<i64>,
    /// Events whose refCount exceeded the references in the same object while only acquires ran.
    above_truth: Vec<String>,
}

/// Watches the cache as raw JSON (so a negative refCount would show as one) until `stop` fires.
fn watch_ref_counts(
    ns: &TestNamespace,
    name: &str,
    releasing: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Seen> {
    let ar = ApiResource::erase::<TemplateCache>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    tokio::spawn(async move {
        let mut seen = Seen::default();
        let mut stream = std::pin::pin!(watcher(api, config).applied_objects());
        while let Some(Ok(obj)) = stream.next().await {
            seen.events += 1;
            let Some(count) = obj.data["status"]["refCount"].as_i64() else {
                continue;
            };
            seen.lowest = Some(seen.lowest.map_or(count, |l| l.min(count)));
            seen.highest = Some(seen.highest.map_or(count, |h| h.max(count)));
            let finalizers = obj.metadata.finalizers.clone().unwrap_or_default();
            let held = i64::from(count_references(&finalizers));
            if !*releasing.borrow() && count > held {
                seen.above_truth
                    .push(format!("refCount {count} with {held} references"));
            }
            if *releasing.borrow() && count == 0 && held == 0 {
                break;
            }
        }
        seen
    })
}

fn spec() -> TemplateCacheSpec {
    serde_json::from_value(json!({"source": {"http": {"url": "http://127.0.0.1:9/disk.qcow2"}}}))
        .expect("spec literal")
}

async fn concurrent_acquirers_share_one_copy(n: usize) {
    let ns = TestNamespace::new(&format!("acquire-{n}")).await;
    let store = TestStore::new(&ns.client, &format!("{}-store", ns.name), "10Gi").await;
    let operator = Operator::start(config(&ns.name, &store.name)).await;
    let (releasing_tx, releasing) = watch::channel(false);
    let watch = watch_ref_counts(&ns, "template", releasing);
    let request = CacheRequest {
        namespace: ns.name.clone(),
        name: "template".into(),
        spec: Some(spec()),
    };

    // N acquirers, each its own task and its own client, all at once.
    let started = std::time::Instant::now();
    let acquirers = (0..n).map(|i| {
        let request = request.clone();
        tokio::spawn(async move {
            let client = support::consumer::consumer_client().await;
            let reference = client::acquire(client, &request, &format!("consumer-{i}"))
                .await
                .expect("acquire");
            if i % 50 == 0 {
                println!(
                    "acquirer {i} holds its reference after {:?}",
                    started.elapsed()
                );
            }
            reference
                .wait_ready(Duration::from_secs(120))
                .await
                .expect("the copy becomes Ready for every acquirer");
            reference
        })
    });
    let acquirers = tokio::spawn(future::join_all(acquirers));

    wait_for_job(&ns.client, &ns.name, "template-copy-1").await;
    let caches = ns.api::<TemplateCache>();
    // Let the acquire storm land before the copy finishes, so waiters really wait.
    wait_for_cache(&ns.client, &ns.name, "template", "fully referenced", |c| {
        count_references(c.metadata.finalizers.iter().flatten()) as usize == n
    })
    .await;
    let outcome = Outcome::Succeeded {
        bytes: 4,
        checksum: CHECKSUM,
    };
    finish_copy(&ns.client, &ns.name, "template", 1, outcome).await;
    let references: Vec<_> = acquirers
        .await
        .expect("acquirers")
        .into_iter()
        .map(|r| r.expect("acquirer task"))
        .collect();

    let ready = wait_for_cache(&ns.client, &ns.name, "template", "Ready with N refs", |c| {
        let s = c.status.as_ref();
        s.and_then(|s| s.phase) == Some(Phase::Ready)
            && s.and_then(|s| s.ref_count) == Some(n as u32)
    })
    .await;
    assert_eq!(ready.status.and_then(|s| s.ref_count), Some(n as u32));
    let writes: u32 = references.iter().map(|r| r.write_requests()).sum();
    let per_acquire = f64::from(writes) / n as f64;
    println!("N={n}: {writes} write requests for {n} acquires ({per_acquire:.2} per acquire)");
    assert!(
        per_acquire <= 1.5,
        "at most 1.5 writes per acquire, got {per_acquire:.2}"
    );
    let all_caches = caches.list(&Default::default()).await.expect("list caches");
    assert_eq!(all_caches.items.len(), 1, "exactly one TemplateCache");
    assert_eq!(
        jobs_of(&ns.client, &ns.name, "template").await.len(),
        1,
        "exactly one Job"
    );

    // Everyone releases at once; one in five releases twice.
    releasing_tx.send(true).expect("watch task alive");
    let releases = references.into_iter().enumerate().map(|(i, reference)| {
        let namespace = ns.name.clone();
        tokio::spawn(async move {
            let client = support::consumer::consumer_client().await;
            if i % 5 == 0 {
                let id = format!("consumer-{i}");
                client::release(client, &namespace, "template", &id)
                    .await
                    .expect("duplicate release");
            }
            reference.release().await.expect("release");
        })
    });
    for r in future::join_all(releases).await {
        r.expect("release task");
    }
    wait_for_cache(&ns.client, &ns.name, "template", "unreferenced", |c| {
        c.status.as_ref().and_then(|s| s.ref_count) == Some(0)
    })
    .await;

    let seen = tokio::time::timeout(Duration::from_secs(30), watch)
        .await
        .expect("watch ends once refCount is 0")
        .expect("watch task");
    println!("N={n}: {seen:?}");
    assert!(
        seen.lowest.is_some_and(|l| l >= 0),
        "never negative: {seen:?}"
    );
    assert!(
        seen.highest.is_some_and(|h| h <= n as i64),
        "never above N: {seen:?}"
    );
    assert!(
        seen.above_truth.is_empty(),
        "never above the truth: {seen:?}"
    );
    assert_eq!(
        jobs_of(&ns.client, &ns.name, "template").await.len(),
        1,
        "still one Job"
    );

    operator.stop().await;
    store.delete().await;
    ns.delete().await;
}

#[tokio::test]
async fn two_concurrent_acquirers_share_one_copy() {
    concurrent_acquirers_share_one_copy(2).await;
}

#[tokio::test]
async fn fifty_concurrent_acquirers_share_one_copy() {
    concurrent_acquirers_share_one_copy(50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_acquirers_share_one_copy() {
    concurrent_acquirers_share_one_copy(500).await;
}
