//! TemplateCacheClaims against the real API server: CLOUDSTACK-7539's parallel deployment as a
//! storm of claims (each consumer its own client), with duplicate acquires and releases mixed
//! in; a claim whose template differs; a claim made while its cache is being deleted; a claim
//! deleted while the operator was down; the reference limit.

use templatecache_test_support as support;

use std::collections::BTreeSet;
use std::time::Duration;

use futures::future::join_all;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::TestNamespace;
use support::cache_watch::{CacheWatch, counts_above_references, lost_references};
use support::eventually;
use support::http_spec;
use support::jobs::{Outcome, finish_copy, finish_job, jobs_of, wait_for_cache, wait_for_job};
use support::rig::Rig;
use templatecache::controller::DEFAULT_MAX_REFERENCES;
use templatecache_api::conditions::{BOUND, READY, find};
use templatecache_api::reasons::claim as reason;
use templatecache_api::references::{claim_reference, count_references};
use templatecache_api::{ClaimPhase, Phase, TemplateCache, TemplateCacheClaim};
use templatecache_client::{self as client, ClientError};

const CHECKSUM: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// Waits until claim `name` satisfies `done`; returns it.
async fn wait_for_claim(
    ns: &TestNamespace,
    name: &str,
    what: &str,
    done: impl Fn(&TemplateCacheClaim) -> bool,
) -> TemplateCacheClaim {
    let claims: Api<TemplateCacheClaim> = ns.api();
    let awaited = format!("claim {name} {what}");
    eventually(&awaited, Duration::from_secs(60), || async {
        match claims.get_opt(name).await.expect("read claim") {
            Some(claim) if done(&claim) => Ok(claim),
            other => Err(format!("{:?}", other.and_then(|c| c.status))),
        }
    })
    .await
}

/// etcd's default limit on one object (`--max-request-bytes`).
const ETCD_LIMIT: usize = 1536 * 1024;

/// The cache as stored, `managedFields` included, in bytes of compact JSON.
async fn stored_bytes(ns: &TestNamespace, name: &str) -> usize {
    let cache: TemplateCache = ns.api().get(name).await.expect("read cache");
    serde_json::to_vec(&cache).expect("json").len()
}

fn condition_reason(claim: &TemplateCacheClaim, type_: &str) -> Option<String> {
    let status = claim.status.as_ref()?;
    find(&status.conditions, type_).map(|c| c.reason.clone())
}

fn phase(claim: &TemplateCacheClaim) -> Option<ClaimPhase> {
    claim.status.as_ref().and_then(|s| s.phase)
}

async fn references_of(ns: &TestNamespace, cache: &str) -> BTreeSet<String> {
    let cache: TemplateCache = ns.api().get(cache).await.expect("read cache");
    cache.finalizers().iter().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_claims_with_duplicates_and_deletes_share_one_copy_in_few_writes() {
    const N: usize = 300;
    let rig = Rig::operator("claims-storm").await;
    let ns = &rig.ns;
    let watch = CacheWatch::start(ns, "template");
    let request = ns.request("template", Some(http_spec("http://127.0.0.1:9/disk.qcow2")));
    let clients = join_all((0..N).map(|_| support::consumer::consumer_client())).await;

    // Every consumer its own client, all at once; one in ten acquires twice, one in six
    // releases again in the middle of the storm.
    let storm = clients.into_iter().enumerate().map(|(i, client)| {
        let request = request.clone();
        tokio::spawn(async move {
            let id = format!("consumer-{i}");
            let reference = client::acquire(client.clone(), &request, &id)
                .await
                .expect("acquire");
            if i % 10 == 0 {
                let again = client::acquire(client.clone(), &request, &id)
                    .await
                    .expect("acquire again");
                assert_eq!(again.claim_name(), reference.claim_name(), "one claim");
            }
            if i % 6 == 0 {
                reference.release().await.expect("release mid-storm");
                return None;
            }
            Some(reference)
        })
    });
    let references: Vec<_> = join_all(storm)
        .await
        .into_iter()
        .map(|r| r.expect("consumer task"))
        .collect();
    let kept: Vec<_> = references.into_iter().flatten().collect();
    let claims: Api<TemplateCacheClaim> = ns.api();
    let mut held = BTreeSet::new();
    for reference in &kept {
        let claim = claims.get(reference.claim_name()).await.expect("claim");
        held.insert(claim_reference(&claim.uid().expect("uid")));
    }
    assert_eq!(held.len(), N - N.div_ceil(6), "one claim per kept consumer");

    let counted = wait_for_cache(&ns.client, &ns.name, "template", "all kept counted", |c| {
        let refs: BTreeSet<String> = c.finalizers().iter().cloned().collect();
        held.is_subset(&refs)
            && count_references(c.finalizers()) as usize == held.len()
            && c.status.as_ref().and_then(|s| s.ref_count) == Some(held.len() as u32)
    })
    .await;
    assert_eq!(count_references(counted.finalizers()) as usize, held.len());
    let referenced_bytes = stored_bytes(ns, "template").await;

    // The copy finishes after the storm, so every claim really waits for it.
    wait_for_job(&ns.client, &ns.name, "template-copy-1").await;
    let outcome = Outcome::Succeeded {
        bytes: 4,
        checksum: CHECKSUM,
    };
    finish_copy(&ns.client, &ns.name, "template", 1, outcome).await;
    let waits = kept.iter().map(|r| r.wait_ready(Duration::from_secs(120)));
    for claim in join_all(waits).await {
        let claim = claim.expect("every kept claim becomes Ready");
        let status = claim.status.expect("status");
        assert_eq!(
            status.cache.and_then(|c| c.checksum).as_deref(),
            Some(CHECKSUM)
        );
    }
    let caches: Api<TemplateCache> = ns.api();
    assert_eq!(
        caches
            .list(&Default::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    assert_eq!(
        jobs_of(&ns.client, &ns.name, "template").await.len(),
        1,
        "one Job"
    );

    // Up to here nobody who keeps a claim released it: no held reference may have vanished.
    let versions = watch.stop().await;
    let lost = lost_references(&versions, &held);
    assert!(lost.is_empty(), "a held reference vanished: {lost:?}");
    let over = counts_above_references(&versions);
    assert!(
        over.is_empty(),
        "refCount above the references held: {over:?}"
    );
    println!(
        "{N} consumers ({} kept): {} versions of the cache from creation to Ready",
        held.len(),
        versions.len()
    );
    assert!(
        versions.len() < N / 4,
        "group commit: far fewer writes to the cache than consumers, got {} for {N}",
        versions.len()
    );

    // Everyone releases at once; one in five twice.
    let watch = CacheWatch::start(ns, "template");
    let releases = kept
        .into_iter()
        .enumerate()
        .map(|(i, reference)| async move {
            if i % 5 == 0 {
                reference
                    .clone()
                    .release()
                    .await
                    .expect("duplicate release");
            }
            reference.release().await.expect("release");
        });
    join_all(releases).await;
    wait_for_cache(&ns.client, &ns.name, "template", "unreferenced", |c| {
        count_references(c.finalizers()) == 0
            && c.status.as_ref().and_then(|s| s.ref_count) == Some(0)
    })
    .await;
    let versions = watch.stop().await;
    let over = counts_above_references(&versions);
    assert!(
        over.is_empty(),
        "refCount above the references held: {over:?}"
    );

    // What one claim reference costs the object, and so how many fit under etcd's limit.
    let unreferenced_bytes = stored_bytes(ns, "template").await;
    let per_reference = (referenced_bytes - unreferenced_bytes) / held.len();
    let fit = (ETCD_LIMIT - unreferenced_bytes) / per_reference;
    println!(
        "a claim reference costs {per_reference} bytes: {fit} fit under etcd's limit; the \
         operator stops at {DEFAULT_MAX_REFERENCES}"
    );
    assert!(
        DEFAULT_MAX_REFERENCES * 3 / 2 < fit,
        "the default reference limit keeps a third of etcd's limit free: {per_reference} bytes \
         per reference, {fit} fit"
    );
}

#[tokio::test]
async fn a_claim_with_another_template_fails_and_holds_no_reference() {
    let rig = Rig::operator("claims-mismatch").await;
    let ns = &rig.ns;
    let first = client::acquire(
        ns.client.clone(),
        &ns.request("img", Some(http_spec("http://127.0.0.1:9/a.qcow2"))),
        "first",
    )
    .await
    .expect("acquire");
    wait_for_claim(ns, first.claim_name(), "bound", |c| {
        condition_reason(c, BOUND).as_deref() == Some(reason::BOUND)
    })
    .await;

    let other = client::acquire(
        ns.client.clone(),
        &ns.request("img", Some(http_spec("http://127.0.0.1:9/b.qcow2"))),
        "second",
    )
    .await
    .expect("the claim itself is accepted");
    let waited = other.wait_ready(Duration::from_secs(60)).await;
    assert!(
        matches!(&waited, Err(ClientError::SpecMismatch { message, .. }) if message.contains("spec.template differs")),
        "{waited:?}"
    );
    let claim = wait_for_claim(ns, other.claim_name(), "failed", |c| {
        phase(c) == Some(ClaimPhase::Failed)
    })
    .await;
    assert_eq!(
        condition_reason(&claim, BOUND).as_deref(),
        Some(reason::TEMPLATE_MISMATCH)
    );
    let refs = references_of(ns, "img").await;
    assert!(
        !refs.contains(&claim_reference(&claim.uid().expect("uid"))),
        "{refs:?}"
    );
    assert_eq!(
        count_references(refs.iter()),
        1,
        "only the first claim's reference"
    );
    let cache: TemplateCache = ns.api().get("img").await.expect("cache");
    assert_eq!(
        cache.spec,
        http_spec("http://127.0.0.1:9/a.qcow2"),
        "the cache is unharmed"
    );
}

#[tokio::test]
async fn a_claim_made_while_its_cache_is_deleted_waits_and_binds_to_the_new_cache() {
    let rig = Rig::operator("claims-deleting").await;
    let ns = &rig.ns;
    let template = http_spec("http://127.0.0.1:9/a.qcow2");
    let old = client::acquire(
        ns.client.clone(),
        &ns.request("img", Some(template.clone())),
        "old",
    )
    .await
    .expect("acquire");
    wait_for_claim(ns, old.claim_name(), "bound", |c| {
        condition_reason(c, BOUND).as_deref() == Some(reason::BOUND)
    })
    .await;
    let caches: Api<TemplateCache> = ns.api();
    let first_uid = caches.get("img").await.expect("cache").uid();
    caches
        .delete("img", &DeleteParams::default())
        .await
        .expect("delete cache");
    wait_for_cache(&ns.client, &ns.name, "img", "Deleting", |c| {
        c.status.as_ref().and_then(|s| s.phase) == Some(Phase::Deleting)
    })
    .await;

    let new = client::acquire(
        ns.client.clone(),
        &ns.request("img", Some(template.clone())),
        "new",
    )
    .await
    .expect("acquire");
    let waiting = wait_for_claim(ns, new.claim_name(), "pending on the deletion", |c| {
        condition_reason(c, BOUND).as_deref() == Some(reason::CACHE_DELETING)
    })
    .await;
    assert_eq!(phase(&waiting), Some(ClaimPhase::Pending));
    let deleting = caches.get("img").await.expect("still there");
    assert_eq!(
        count_references(deleting.finalizers()),
        1,
        "the new claim does not hold it"
    );

    // The last reference gone, the old data is removed (the test plays the remove Job).
    old.release().await.expect("release");
    wait_for_job(&ns.client, &ns.name, "img-remove-1").await;
    finish_job(&ns.client, &ns.name, "img-remove-1", true).await;
    let bound = wait_for_claim(ns, new.claim_name(), "bound to the new cache", |c| {
        condition_reason(c, BOUND).as_deref() == Some(reason::BOUND)
    })
    .await;
    let cache = caches.get("img").await.expect("made again");
    assert_ne!(cache.uid(), first_uid, "a new cache");
    assert!(
        cache
            .finalizers()
            .contains(&claim_reference(&bound.uid().expect("uid")))
    );
    assert_eq!(cache.spec, template);
}

#[tokio::test]
async fn a_claim_deleted_while_the_operator_was_down_is_released_when_it_returns() {
    let mut rig = Rig::operator("claims-gc").await;
    let ns = rig.ns.clone();
    let template = Some(http_spec("http://127.0.0.1:9/a.qcow2"));
    let mut references = vec![];
    for id in ["stays", "goes"] {
        let reference =
            client::acquire(ns.client.clone(), &ns.request("img", template.clone()), id)
                .await
                .expect("acquire");
        references.push(reference);
    }
    // A consumer that wrote its reference by hand, the old way: never the operator's to drop.
    let by_hand = json!([{"op": "add", "path": "/metadata/finalizers/-", "value": "ref.templatecache.io/by-hand"}]);
    let caches: Api<TemplateCache> = ns.api();
    wait_for_cache(&ns.client, &ns.name, "img", "both claims counted", |c| {
        count_references(c.finalizers()) == 2
    })
    .await;
    let patch: json_patch::Patch = serde_json::from_value(by_hand).expect("patch");
    caches
        .patch("img", &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .expect("hand-written reference");
    wait_for_cache(&ns.client, &ns.name, "img", "refCount 3", |c| {
        c.status.as_ref().and_then(|s| s.ref_count) == Some(3)
    })
    .await;

    rig.stop_operators().await;
    let goes = references.pop().expect("second");
    goes.release()
        .await
        .expect("release while the operator is down");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count_references(caches.get("img").await.expect("cache").finalizers()),
        3,
        "nobody was there to notice"
    );

    rig.start_operator(rig.config()).await;
    let cache = wait_for_cache(&ns.client, &ns.name, "img", "released", |c| {
        count_references(c.finalizers()) == 2
            && c.status.as_ref().and_then(|s| s.ref_count) == Some(2)
    })
    .await;
    assert!(
        cache
            .finalizers()
            .contains(&"ref.templatecache.io/by-hand".to_owned()),
        "a hand-written reference is never collected: {:?}",
        cache.finalizers()
    );
}

#[tokio::test]
async fn claims_past_the_reference_limit_wait_with_a_condition_and_lose_nothing() {
    let rig = Rig::builder("claims-limit")
        .configured(|cfg| {
            cfg.max_references = 3;
        })
        .start()
        .await;
    let ns = &rig.ns;
    let template = Some(http_spec("http://127.0.0.1:9/a.qcow2"));
    let mut references = vec![];
    for i in 0..5 {
        let reference = client::acquire(
            ns.client.clone(),
            &ns.request("img", template.clone()),
            &format!("c{i}"),
        )
        .await
        .expect("acquire");
        references.push(reference);
        // Made one after another, so the oldest three are the ones bound.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    for reference in &references[3..] {
        let claim = wait_for_claim(ns, reference.claim_name(), "told of the limit", |c| {
            condition_reason(c, BOUND).as_deref() == Some(reason::REFERENCE_LIMIT)
        })
        .await;
        assert_eq!(phase(&claim), Some(ClaimPhase::Pending));
        let message = find(&claim.status.expect("status").conditions, BOUND)
            .expect("Bound")
            .message
            .clone();
        assert!(message.contains("limit of 3 references"), "{message}");
    }
    let cache: TemplateCache = ns.api().get("img").await.expect("cache");
    assert_eq!(count_references(cache.finalizers()), 3);

    // A release makes room: the oldest waiting claim is bound, nothing was lost.
    references.remove(0).release().await.expect("release");
    wait_for_claim(
        ns,
        references[2].claim_name(),
        "bound once there is room",
        |c| condition_reason(c, BOUND).as_deref() == Some(reason::BOUND),
    )
    .await;
    let claim = ns
        .api::<TemplateCacheClaim>()
        .get(references[3].claim_name())
        .await
        .expect("claim");
    assert_eq!(
        condition_reason(&claim, BOUND).as_deref(),
        Some(reason::REFERENCE_LIMIT)
    );
    let ready = find(&claim.status.expect("status").conditions, READY).map(|c| c.status.clone());
    assert_eq!(ready.as_deref(), Some("False"));
}

#[tokio::test]
async fn a_claim_without_template_waits_for_its_cache_to_exist() {
    let rig = Rig::operator("claims-wait").await;
    let ns = &rig.ns;
    let claims: Api<TemplateCacheClaim> = ns.api();
    let claim: TemplateCacheClaim = serde_json::from_value(json!({
        "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCacheClaim",
        "metadata": {"name": "vm-1-root"}, "spec": {"cacheName": "later"}
    }))
    .expect("claim literal");
    claims
        .create(&PostParams::default(), &claim)
        .await
        .expect("create claim");
    let waiting = wait_for_claim(ns, "vm-1-root", "told the cache is missing", |c| {
        condition_reason(c, BOUND).as_deref() == Some(reason::CACHE_NOT_FOUND)
    })
    .await;
    assert_eq!(phase(&waiting), Some(ClaimPhase::Pending));
    assert!(
        ns.api::<TemplateCache>()
            .get_opt("later")
            .await
            .expect("read")
            .is_none(),
        "no template, no cache"
    );

    ns.create_cache(
        "later",
        json!({"source": {"http": {"url": "http://127.0.0.1:9/a"}}}),
    )
    .await;
    wait_for_claim(ns, "vm-1-root", "bound", |c| {
        phase(c) == Some(ClaimPhase::Bound)
    })
    .await;
}

/// PVC protection's shape: a claim that names a cache keeps it from eviction even before the
/// operator has committed its reference. The store controller is driven by hand with no
/// operator running, so the claim's reference can never land during the test.
#[tokio::test]
async fn a_claim_whose_reference_is_not_committed_yet_blocks_eviction() {
    use std::sync::Arc;
    use templatecache::controller::{Context, staging_store};
    use templatecache_api::StagingStore;

    let eviction =
        json!({"highWatermarkPercent": 40, "lowWatermarkPercent": 10, "minUnusedSeconds": 0});
    let rig = Rig::builder("claims-evict")
        .store("1Mi")
        .eviction(eviction)
        .start()
        .await;
    let (ns, store) = (&rig.ns, rig.store());
    ns.create_cache(
        "img",
        json!({"source": {"http": {"url": "http://127.0.0.1:9/a"}}}),
    )
    .await;
    let caches: Api<TemplateCache> = ns.api();
    let finalizer = json!({"metadata": {"finalizers": ["templatecache.io/cleanup"]}});
    caches
        .patch("img", &PatchParams::default(), &Patch::Merge(&finalizer))
        .await
        .expect("cleanup finalizer");
    // A Ready, unreferenced copy taking 90 % of the store: an eviction candidate at once.
    let ready = json!({"status": {"phase": "Ready", "attempt": 1, "size": 943718,
        "checksum": CHECKSUM, "store": store.name, "conditions": [{"type": "Ready",
        "status": "True", "reason": "Copied", "message": "copied",
        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    caches
        .patch_status("img", &PatchParams::default(), &Patch::Merge(&ready))
        .await
        .expect("Ready");
    let claim: TemplateCacheClaim = serde_json::from_value(json!({
        "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCacheClaim",
        "metadata": {"name": "vm-1"}, "spec": {"cacheName": "img"}
    }))
    .expect("claim literal");
    let claims: Api<TemplateCacheClaim> = ns.api();
    claims
        .create(&PostParams::default(), &claim)
        .await
        .expect("claim");

    let staging: StagingStore = Api::all(ns.client.clone())
        .get(&store.name)
        .await
        .expect("store");
    let reconcile_store = || async {
        // A fresh context each time, so the store's list pacing never skips a pass.
        let ctx = Arc::new(Context::new(ns.client.clone(), rig.config()));
        staging_store::reconcile(Arc::new(staging.clone()), ctx)
            .await
            .expect("store reconcile");
    };
    let phase = || async {
        caches
            .get("img")
            .await
            .expect("cache")
            .status
            .and_then(|s| s.phase)
    };
    reconcile_store().await;
    assert_eq!(
        phase().await,
        Some(Phase::Ready),
        "a named cache is not evicted"
    );

    claims
        .delete("vm-1", &DeleteParams::default())
        .await
        .expect("delete claim");
    reconcile_store().await;
    assert_eq!(
        phase().await,
        Some(Phase::Evicted),
        "with the claim gone, it is"
    );
}
