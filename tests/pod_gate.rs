//! Pods that wait for a cache, against the real API server: CloudStack's parallel deployment as
//! 300 gated Pods created at once (as a ReplicaSet would), a Pod whose cache does not exist yet,
//! and references of Pods deleted while the operator was down. The local control plane has no scheduler or kubelet, so Pods stay
//! Pending and are deleted at once; everything the operator does to them is real.

use templatecache_test_support as support;

use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::TestNamespace;
use support::cache_watch::{CacheWatch, counts_above_references};
use support::eventually;
use support::jobs::{Outcome, finish_copy, jobs_of, wait_for_cache, wait_for_job};
use support::rig::Rig;
use templatecache_api::names::{POD_CACHE_LABEL, READY_GATE};
use templatecache_api::references::{claim_reference, count_references, pod_uid_of};
use templatecache_api::{Phase, TemplateCache, TemplateCacheClaim};
use templatecache_client as client;

const CHECKSUM: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

async fn create_cache(ns: &TestNamespace, name: &str) {
    let url = "http://templates.invalid/img.qcow2";
    ns.create_cache(name, json!({"source": {"http": {"url": url}}}))
        .await;
}

/// A Pod as a Deployment's pod template would make it: the cache label and the gate.
fn gated_pod(name: &str, cache: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {POD_CACHE_LABEL: cache, "app": "vm-launcher"}},
        "spec": {
            "schedulingGates": [{"name": READY_GATE}],
            "automountServiceAccountToken": false,
            "containers": [{"name": "launcher", "image": "registry.invalid/launcher:1"}]
        }
    }))
    .expect("pod literal")
}

/// The ServiceAccount admission plugin refuses Pods until the namespace's `default` account
/// exists, which the controller manager creates a moment after the namespace.
async fn wait_for_default_account(ns: &TestNamespace) {
    let accounts = ns.api::<ServiceAccount>();
    let awaited = format!("namespace {}'s default ServiceAccount", ns.name);
    eventually(&awaited, Duration::from_secs(10), || async {
        accounts.get_opt("default").await.expect("read SA")
    })
    .await;
}

async fn create_pods(ns: &TestNamespace, cache: &str, count: usize) -> Vec<String> {
    let pods = ns.api::<Pod>();
    let names: Vec<String> = (0..count).map(|i| format!("{cache}-pod-{i}")).collect();
    join_all(names.iter().map(|name| {
        let pods = pods.clone();
        async move {
            pods.create(&PostParams::default(), &gated_pod(name, cache))
                .await
                .unwrap_or_else(|e| panic!("create Pod {name}: {e}"))
        }
    }))
    .await;
    names
}

async fn delete_pods(ns: &TestNamespace, names: &[String]) {
    let pods = ns.api::<Pod>();
    join_all(names.iter().map(|name| {
        let pods = pods.clone();
        async move {
            pods.delete(name, &DeleteParams::default())
                .await
                .unwrap_or_else(|e| panic!("delete Pod {name}: {e}"));
        }
    }))
    .await;
}

/// Pods of `cache` still carrying the gate.
async fn gated(ns: &TestNamespace, cache: &str) -> usize {
    let selector = format!("{POD_CACHE_LABEL}={cache}");
    ns.api::<Pod>()
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("list Pods")
        .items
        .iter()
        .filter(|pod| {
            let gates = pod.spec.as_ref().and_then(|s| s.scheduling_gates.as_ref());
            gates.is_some_and(|g| g.iter().any(|g| g.name == READY_GATE))
        })
        .count()
}

async fn wait_until_ungated(ns: &TestNamespace, cache: &str) {
    let awaited = format!("every Pod of {cache} ungated");
    eventually(&awaited, Duration::from_secs(120), || async {
        match gated(ns, cache).await {
            0 => Ok(()),
            n => Err(format!("{n} Pods still gated")),
        }
    })
    .await
}

async fn wait_for_refs(ns: &TestNamespace, cache: &str, refs: u32) -> TemplateCache {
    wait_for_cache(
        &ns.client,
        &ns.name,
        cache,
        &format!("refCount {refs}"),
        move |c| {
            let counted = c.status.as_ref().and_then(|s| s.ref_count) == Some(refs);
            counted && count_references(c.finalizers()) == refs
        },
    )
    .await
}

async fn make_ready(ns: &TestNamespace, cache: &str) {
    wait_for_job(&ns.client, &ns.name, &format!("{cache}-copy-1")).await;
    let outcome = Outcome::Succeeded {
        bytes: 4096,
        checksum: CHECKSUM,
    };
    finish_copy(&ns.client, &ns.name, cache, 1, outcome).await;
    wait_for_cache(&ns.client, &ns.name, cache, "Ready", |c| {
        c.status.as_ref().and_then(|s| s.phase) == Some(Phase::Ready)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_gated_pods_share_one_copy_in_few_writes_and_are_ungated_when_ready() {
    const N: usize = 300;
    let rig = Rig::operator("podgate").await;
    let ns = &rig.ns;
    wait_for_default_account(ns).await;
    create_cache(ns, "vm-image").await;
    wait_for_cache(&ns.client, &ns.name, "vm-image", "looked at", |c| {
        c.status.is_some()
    })
    .await;

    let watch = CacheWatch::start(ns, "vm-image");
    let pods = create_pods(ns, "vm-image", N).await;
    wait_for_refs(ns, "vm-image", N as u32).await;
    let versions = watch.stop().await;
    println!(
        "{N} Pods: {} versions of the cache until all were counted",
        versions.len()
    );
    assert!(
        versions.len() < N / 4,
        "group commit: far fewer writes to the cache than Pods, got {} for {N}",
        versions.len()
    );
    let over = counts_above_references(&versions);
    assert!(
        over.is_empty(),
        "refCount above the references held: {over:?}"
    );
    assert_eq!(
        gated(ns, "vm-image").await,
        N,
        "no Pod runs before the copy"
    );
    make_ready(ns, "vm-image").await;
    wait_until_ungated(ns, "vm-image").await;
    let jobs = jobs_of(&ns.client, &ns.name, "vm-image").await;
    assert_eq!(jobs.len(), 1, "one copy for {N} Pods");

    delete_pods(ns, &pods[..120]).await;
    wait_for_refs(ns, "vm-image", (N - 120) as u32).await;
    delete_pods(ns, &pods[120..]).await;
    let cache = wait_for_refs(ns, "vm-image", 0).await;
    assert!(
        !cache.finalizers().iter().any(|f| pod_uid_of(f).is_some()),
        "no Pod reference left: {:?}",
        cache.finalizers()
    );
}

#[tokio::test]
async fn a_pod_whose_cache_does_not_exist_waits_with_an_event_until_it_is_ready() {
    let rig = Rig::operator("podwait").await;
    let ns = &rig.ns;
    wait_for_default_account(ns).await;

    create_pods(ns, "later", 1).await;
    let event = eventually(
        "an Event saying the cache does not exist",
        Duration::from_secs(30),
        || async {
            ns.list::<Event>()
                .await
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("CacheNotFound"))
        },
    )
    .await;
    let note = event.note.unwrap_or_default();
    assert!(
        note.contains("TemplateCache later does not exist"),
        "{note}"
    );
    assert_eq!(
        event.regarding.and_then(|r| r.name).as_deref(),
        Some("later-pod-0")
    );
    assert_eq!(gated(ns, "later").await, 1);

    create_cache(ns, "later").await;
    wait_for_refs(ns, "later", 1).await;
    assert_eq!(gated(ns, "later").await, 1, "still gated while copying");
    make_ready(ns, "later").await;
    wait_until_ungated(ns, "later").await;
}

#[tokio::test]
async fn references_of_pods_deleted_while_the_operator_was_down_go_when_it_returns() {
    let mut rig = Rig::operator("podgc").await;
    let ns = rig.ns.clone();
    wait_for_default_account(&ns).await;
    create_cache(&ns, "img").await;
    let pods = create_pods(&ns, "img", 3).await;
    let request = ns.request("img", None);
    client::acquire(ns.client.clone(), &request, "library-consumer")
        .await
        .expect("acquire");
    wait_for_refs(&ns, "img", 4).await;
    let claims: Api<TemplateCacheClaim> = ns.api();
    let claim = claims
        .get(&client::claim_name("img", "library-consumer").expect("id"))
        .await
        .expect("claim");
    let claim_ref = claim_reference(&claim.uid().expect("uid"));

    rig.stop_operators().await;
    delete_pods(&ns, &pods[..2]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cache = ns.api::<TemplateCache>().get("img").await.expect("read");
    assert_eq!(
        cache.status.and_then(|s| s.ref_count),
        Some(4),
        "nobody was there to notice"
    );

    rig.start_operator(rig.config()).await;
    let cache = wait_for_refs(&ns, "img", 2).await;
    assert!(
        cache.finalizers().contains(&claim_ref),
        "a live claim's reference stays: {:?}",
        cache.finalizers()
    );
}
