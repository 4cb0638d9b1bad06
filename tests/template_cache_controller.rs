//! The TemplateCache controller against a real API server: one Job per attempt whatever the
//! concurrency, retries with a new Job, a final Failed that waiters see, and deletion held by
//! references.

use templatecache_test_support as support;

use std::sync::Arc;
use std::time::Duration;

use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::TestNamespace;
use support::eventually;
use support::jobs::{
    Outcome, finish_copy, finish_job, jobs_of, wait_for_cache, wait_for_cache_gone, wait_for_job,
};
use support::rig::Rig;
use templatecache::controller::template_cache;
use templatecache::controller::{Context, Error};
use templatecache_api::conditions;
use templatecache_api::reasons::cache as reason;
use templatecache_api::references::count_references;
use templatecache_api::{Phase, TemplateCache, TemplateCacheClaim, TemplateCacheSpec};
use templatecache_client::{self as client, ClientError};

const CHECKSUM: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn spec() -> TemplateCacheSpec {
    support::http_spec("http://127.0.0.1:9/disk.qcow2")
}

fn phase(cache: &TemplateCache) -> Option<Phase> {
    cache.status.as_ref().and_then(|s| s.phase)
}

fn ready_reason(cache: &TemplateCache) -> Option<String> {
    let status = cache.status.as_ref()?;
    conditions::find(&status.conditions, conditions::READY).map(|c| c.reason.clone())
}

async fn create_cache(ns: &TestNamespace, name: &str) -> TemplateCache {
    ns.api::<TemplateCache>()
        .create(&PostParams::default(), &TemplateCache::new(name, spec()))
        .await
        .expect("create cache")
}

/// The test plays the copy Job (it reports a success, no bytes move): what it checks is the
/// controller's side, one owned Job and Ready on the Job's report. Real copies are in
/// `copy_end_to_end.rs`.
#[tokio::test]
async fn a_cache_gets_one_copy_job_and_its_reported_success_makes_it_ready() {
    let rig = Rig::operator("lifecycle").await;
    let ns = &rig.ns;

    create_cache(ns, "ubuntu").await;
    let job = wait_for_job(&ns.client, &ns.name, "ubuntu-copy-1").await;
    let owner = &job.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("TemplateCache", "ubuntu")
    );
    let copying = wait_for_cache(&ns.client, &ns.name, "ubuntu", "Copying", |c| {
        phase(c) == Some(Phase::Copying)
    })
    .await;
    assert_eq!(copying.finalizers(), ["templatecache.io/cleanup"]);

    let outcome = Outcome::Succeeded {
        bytes: 4,
        checksum: CHECKSUM,
    };
    finish_copy(&ns.client, &ns.name, "ubuntu", 1, outcome).await;
    let ready = wait_for_cache(&ns.client, &ns.name, "ubuntu", "Ready", |c| {
        phase(c) == Some(Phase::Ready)
    })
    .await;
    let status = ready.status.expect("status");
    assert_eq!(status.size, Some(4));
    assert_eq!(status.checksum.as_deref(), Some(CHECKSUM));
    assert_eq!(
        status.path.as_deref(),
        Some(&*format!("{}/ubuntu", ns.name))
    );
    assert_eq!(ready_reason_of(&status.conditions), Some("Copied"));
    assert_eq!(jobs_of(&ns.client, &ns.name, "ubuntu").await.len(), 1);
}

fn ready_reason_of(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Option<&str> {
    conditions::find(conds, conditions::READY).map(|c| c.reason.as_str())
}

/// kube-runtime's reflector may hand the reconciler an old object. Reconciling that old object
/// after the attempt has started must be refused by the API server (the JSON patch's `test` of
/// `status.attempt` fails), not start a second Job.
#[tokio::test]
async fn a_reconciler_with_a_stale_object_never_starts_a_second_job() {
    let rig = Rig::builder("stale").store("10Gi").start().await;
    let ns = &rig.ns;
    let cfg = rig.config();
    let caches = ns.api::<TemplateCache>();
    let ctx = Arc::new(Context::new(ns.client.clone(), cfg.clone()));

    create_cache(ns, "stale").await;
    // The cleanup finalizer as the operator's first commit puts it; keep the object as it was
    // right after that.
    let finalizer = json!({"metadata": {"finalizers": ["templatecache.io/cleanup"]}});
    caches
        .patch(
            "stale",
            &Default::default(),
            &kube::api::Patch::Merge(&finalizer),
        )
        .await
        .expect("add finalizer");
    let before_attempt = Arc::new(caches.get("stale").await.unwrap());
    assert_eq!(phase(&before_attempt), None);

    // A fresh reconcile starts attempt 1.
    template_cache::reconcile(before_attempt.clone(), ctx.clone())
        .await
        .expect("start attempt 1");
    wait_for_job(&ns.client, &ns.name, "stale-copy-1").await;

    // The stale object would also start attempt 1: the precondition refuses it.
    for _ in 0..5 {
        let result = template_cache::reconcile(before_attempt.clone(), ctx.clone()).await;
        assert!(
            matches!(result, Err(Error::Conflict(_))),
            "stale reconcile must conflict, got {result:?}"
        );
    }
    // Fail attempt 1; a reconcile of the now stale Copying object must not start attempt 2
    // twice either.
    finish_copy(
        &ns.client,
        &ns.name,
        "stale",
        1,
        Outcome::Failed { error: "boom" },
    )
    .await;
    let copying_1 = Arc::new(caches.get("stale").await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await; // past the 200ms backoff
    template_cache::reconcile(copying_1.clone(), ctx.clone())
        .await
        .expect("start attempt 2");
    let again = template_cache::reconcile(copying_1, ctx.clone()).await;
    assert!(matches!(again, Err(Error::Conflict(_))), "got {again:?}");

    let names: Vec<String> = jobs_of(&ns.client, &ns.name, "stale")
        .await
        .iter()
        .map(|j| j.name_any())
        .collect();
    assert_eq!(names.len(), 2, "one Job per attempt: {names:?}");
    assert!(
        names.contains(&"stale-copy-1".to_owned()) && names.contains(&"stale-copy-2".to_owned())
    );
}

#[tokio::test]
async fn two_operators_at_once_still_create_one_job_per_attempt() {
    let mut rig = Rig::operator("two-operators").await;
    rig.start_operator(rig.config()).await;
    let ns = &rig.ns;

    let names: Vec<String> = (0..20).map(|i| format!("twin-{i}")).collect();
    futures::future::join_all(names.iter().map(|n| create_cache(ns, n))).await;
    for name in &names {
        wait_for_job(&ns.client, &ns.name, &format!("{name}-copy-1")).await;
    }
    // Fail every first attempt: both operators race to start attempt 2.
    for name in &names {
        finish_copy(
            &ns.client,
            &ns.name,
            name,
            1,
            Outcome::Failed { error: "flaky" },
        )
        .await;
    }
    for name in &names {
        wait_for_job(&ns.client, &ns.name, &format!("{name}-copy-2")).await;
        let outcome = Outcome::Succeeded {
            bytes: 4,
            checksum: CHECKSUM,
        };
        finish_copy(&ns.client, &ns.name, name, 2, outcome).await;
    }
    for name in &names {
        wait_for_cache(&ns.client, &ns.name, name, "Ready", |c| {
            phase(c) == Some(Phase::Ready)
        })
        .await;
    }
    // Give both operators time to act on anything they still would.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for name in &names {
        let mut jobs: Vec<String> = jobs_of(&ns.client, &ns.name, name)
            .await
            .iter()
            .map(|j| j.name_any())
            .collect();
        jobs.sort();
        assert_eq!(jobs, [format!("{name}-copy-1"), format!("{name}-copy-2")]);
    }
}

#[tokio::test]
async fn failed_copies_retry_as_new_attempts_then_fail_for_good_and_waiters_see_it() {
    let rig = Rig::operator("retries").await; // 3 attempts
    let ns = &rig.ns;

    let request = ns.request("flaky", Some(spec()));
    let reference = client::acquire(ns.client.clone(), &request, "waiter")
        .await
        .expect("acquire");
    let waiter = tokio::spawn({
        let reference = reference.clone();
        async move { reference.wait_ready(Duration::from_secs(60)).await }
    });

    for attempt in 1..=3 {
        wait_for_job(&ns.client, &ns.name, &format!("flaky-copy-{attempt}")).await;
        let error = format!("HTTP 503 from source on attempt {attempt}");
        finish_copy(
            &ns.client,
            &ns.name,
            "flaky",
            attempt,
            Outcome::Failed { error: &error },
        )
        .await;
    }
    let failed = wait_for_cache(&ns.client, &ns.name, "flaky", "Failed for good", |c| {
        ready_reason(c).as_deref() == Some(reason::RETRIES_EXHAUSTED)
    })
    .await;
    assert_eq!(phase(&failed), Some(Phase::Failed));
    let status = failed.status.as_ref().expect("status");
    let ready = conditions::find(&status.conditions, conditions::READY).expect("Ready condition");
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("attempt 3 of 3") && ready.message.contains("HTTP 503"),
        "clear message: {}",
        ready.message
    );
    assert_eq!(jobs_of(&ns.client, &ns.name, "flaky").await.len(), 3);

    let waited = waiter.await.expect("waiter task");
    assert!(
        matches!(&waited, Err(ClientError::CopyFailed { message, .. }) if message.contains("HTTP 503")),
        "the waiter sees the failure: {waited:?}"
    );
    reference.release().await.expect("release");
}

#[tokio::test]
async fn a_referenced_cache_stays_until_its_last_release_then_its_data_is_removed() {
    let rig = Rig::operator("deleting").await;
    let ns = &rig.ns;
    let request = ns.request("held", Some(spec()));
    let a = client::acquire(ns.client.clone(), &request, "consumer-a")
        .await
        .unwrap();
    let b = client::acquire(ns.client.clone(), &request, "consumer-b")
        .await
        .unwrap();
    wait_for_job(&ns.client, &ns.name, "held-copy-1").await;
    let outcome = Outcome::Succeeded {
        bytes: 4,
        checksum: CHECKSUM,
    };
    finish_copy(&ns.client, &ns.name, "held", 1, outcome).await;
    wait_for_cache(&ns.client, &ns.name, "held", "Ready", |c| {
        phase(c) == Some(Phase::Ready)
    })
    .await;

    let caches = ns.api::<TemplateCache>();
    caches
        .delete("held", &DeleteParams::default())
        .await
        .expect("delete");
    let deleting = wait_for_cache(&ns.client, &ns.name, "held", "Deleting", |c| {
        phase(c) == Some(Phase::Deleting)
    })
    .await;
    assert_eq!(deleting.status.as_ref().and_then(|s| s.ref_count), Some(2));
    // A cache going away takes no new references: a claim made now waits, and holds nothing.
    let without_template = ns.request("held", None);
    let late = client::acquire(ns.client.clone(), &without_template, "latecomer")
        .await
        .expect("the claim itself is made");
    let claims: Api<TemplateCacheClaim> = ns.api();
    let waiting_reason = eventually(
        "the latecomer's Bound condition",
        Duration::from_secs(20),
        || async {
            let claim = claims.get(late.claim_name()).await.expect("claim");
            claim
                .status
                .and_then(|s| conditions::find(&s.conditions, "Bound").map(|c| c.reason.clone()))
        },
    )
    .await;
    assert_eq!(waiting_reason, "CacheDeleting");
    let still = caches.get("held").await.expect("deleting");
    assert_eq!(
        count_references(still.finalizers()),
        2,
        "the latecomer holds nothing"
    );

    a.release().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = caches
        .get("held")
        .await
        .expect("still there with one reference");
    assert_eq!(still.status.as_ref().and_then(|s| s.ref_count), Some(1));
    assert!(
        jobs_of(&ns.client, &ns.name, "held")
            .await
            .iter()
            .all(|j| j.name_any() != "held-remove-1")
    );

    b.release().await.unwrap();
    wait_for_job(&ns.client, &ns.name, "held-remove-1").await;
    assert!(
        caches.get_opt("held").await.unwrap().is_some(),
        "held until the data is removed"
    );
    finish_job(&ns.client, &ns.name, "held-remove-1", true).await;
    // The cache is gone once its data is removed.
    wait_for_cache_gone(&ns.client, &ns.name, "held").await;
    late.release().await.expect("release the latecomer");
}
