//! Removal always finishes: a deleted cache's data goes whatever its namespace's state, a failed
//! remove Job is tried again under a new name, and nothing a tenant makes stands in for the
//! operator's remove Job.

use templatecache_test_support as support;

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;
use support::corpus::record;
use support::eventually;
use support::jobs::{
    Outcome, finish_copy, finish_job, wait_for_cache, wait_for_cache_gone, wait_for_job,
};
use support::ranged_server::RangedServer;
use support::rig::{Rig, random_bytes, sha256};
use support::throttle::ThrottleProxy;
use templatecache_api::reasons::cache as reason;
use templatecache_api::{Phase, TemplateCache, TemplateCacheClaim};

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_namespace_with_ready_caches_claims_and_a_running_copy_finishes_and_leaves_no_file()
 {
    // The operator's own namespace, where remove Jobs of a namespace being deleted run, with
    // the mover's account of its own.
    let home = Rig::builder("removal-home").runs_jobs().start().await;
    let home_name = home.ns.name.clone();
    let rig = Rig::builder("removal-ns")
        .store("10Gi")
        .configured(move |config| config.operator_namespace = home_name)
        .runs_jobs()
        .start()
        .await;
    let ns = &rig.ns;

    let server = RangedServer::start().await;
    let ready = random_bytes(MIB);
    server.put("ready.img", ready.clone());
    let url = |name: &str| format!("http://{}/files/{name}", server.addr);
    rig.create(
        "ready",
        json!({"source": {"http": {"url": url("ready.img")}}, "checksum": sha256(&ready)}),
    )
    .await;
    rig.assert_copied("ready", &ready).await;
    ns.create::<TemplateCacheClaim>(json!({
        "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCacheClaim",
        "metadata": {"name": "vm-1"}, "spec": {"cacheName": "ready"}
    }))
    .await;
    wait_for_cache(
        &ns.client,
        &ns.name,
        "ready",
        "the claim's reference",
        |c| c.status.as_ref().and_then(|s| s.ref_count) == Some(1),
    )
    .await;

    // A copy that is still running when the namespace goes: 32 MiB at 256 KiB/s.
    server.put("slow.img", random_bytes(32 * MIB));
    let proxy = ThrottleProxy::start(server.addr, 256 << 10).await;
    let slow = format!("http://{}/files/slow.img", proxy.addr);
    rig.create("slow", json!({"source": {"http": {"url": slow}}}))
        .await;
    eventually("the slow copy writes", Duration::from_secs(60), || async {
        rig.files()
            .iter()
            .any(|f| f.starts_with(".partial/slow"))
            .then_some(())
    })
    .await;

    let namespaces: Api<Namespace> = Api::all(ns.client.clone());
    namespaces
        .delete(&ns.name, &DeleteParams::background())
        .await
        .expect("delete the namespace");
    eventually(
        "the namespace is gone",
        Duration::from_secs(120),
        || async {
            namespaces
                .get_opt(&ns.name)
                .await
                .expect("read the namespace")
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(
        rig.files().is_empty(),
        "every cache's data is gone with the namespace: {:?}",
        rig.files()
    );
    // (The store's usedBytes is not checked here: an operator limited to one namespace, as the
    // tests' are, leaves the record of a store it has no cache in to the others; the unit test
    // of `usage::decide` shows a cache that is gone counts nothing.)
    let removals: Api<Job> = Api::namespaced(ns.client.clone(), &home.ns.name);
    let ran_at_home = removals
        .list(&Default::default())
        .await
        .expect("Jobs")
        .items
        .len();
    assert!(
        ran_at_home >= 1,
        "the removals ran in the operator's namespace"
    );
    record(
        "namespace deleted with a Ready cache, a claim and a running copy",
        &format!(
            "the namespace went, no file left; {ran_at_home} remove Job(s) ran in the operator's namespace"
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_remove_job_is_tried_again_under_a_new_name_and_the_cache_says_so() {
    // The test plays the Jobs: the operator's retry is what is tested.
    let rig = Rig::operator("removal-retry").await;
    let ns = &rig.ns;
    rig.create(
        "img",
        json!({"source": {"http": {"url": "http://example.invalid/a"}}}),
    )
    .await;
    wait_for_job(&ns.client, &ns.name, "img-copy-1").await;
    let checksum = format!("sha256:{}", "a".repeat(64));
    finish_copy(
        &ns.client,
        &ns.name,
        "img",
        1,
        Outcome::Succeeded {
            bytes: 5,
            checksum: &checksum,
        },
    )
    .await;
    wait_for_cache(&ns.client, &ns.name, "img", "Ready", |c| {
        c.status.as_ref().and_then(|s| s.phase) == Some(Phase::Ready)
    })
    .await;

    let caches: Api<TemplateCache> = ns.api();
    caches
        .delete("img", &DeleteParams::background())
        .await
        .expect("delete the cache");
    wait_for_job(&ns.client, &ns.name, "img-remove-1").await;
    finish_job(&ns.client, &ns.name, "img-remove-1", false).await;
    let failed = wait_for_cache(&ns.client, &ns.name, "img", "RemoveFailed", |c| {
        c.status
            .as_ref()
            .and_then(|s| templatecache_api::conditions::find(&s.conditions, "Ready"))
            .is_some_and(|r| r.reason == reason::REMOVE_FAILED)
    })
    .await;
    let message = templatecache_api::conditions::find(
        &failed.status.as_ref().expect("status").conditions,
        "Ready",
    )
    .expect("Ready")
    .message
    .clone();
    assert!(message.contains("finished by the test"), "{message}");
    wait_for_job(&ns.client, &ns.name, "img-remove-2").await;
    let retried = caches.get("img").await.expect("still held");
    let removal = retried.status.and_then(|s| s.removal).expect("the record");
    assert_eq!(removal.attempt, 2);
    assert_eq!(removal.job_name.as_deref(), Some("img-remove-2"));
    finish_job(&ns.client, &ns.name, "img-remove-2", true).await;
    wait_for_cache_gone(&ns.client, &ns.name, "img").await;
    record(
        "a remove Job that failed once",
        &format!(
            "Ready reason {} ({message}); tried again as img-remove-2, then the cache went",
            reason::REMOVE_FAILED
        ),
    );
}
