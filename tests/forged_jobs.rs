//! Jobs a namespace user forges against the operator: one squatting the name of a cache's next
//! copy Job, and complete Jobs "controlled" by the cache (ownerReferences are anyone's to
//! write) under the names of its next copy and remove Jobs. None is ever taken for the
//! operator's own; each case goes to the bad-input corpus.
//!
//! On the real node (`make test-node`): each forged Job runs a Pod of the consumer image and
//! the real Job controller completes it, and the operator's own Jobs fail and succeed for real.
//! The attacks from inside a running Pod (a Pod running as the mover's account, a copy Pod
//! rewriting its reservation) are in tests/hostile_tenant.rs.

use templatecache_test_support as support;

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use support::corpus::record;
use support::eventually;
use support::http_server::HttpServer;
use support::jobs::{wait_for_cache_gone, wait_until_complete};
use support::ranged_server::RangedServer;
use support::rig::{Rig, random_bytes, ready_reason};
use support::tenant::{account, client_as, completing_job, template};
use templatecache_api::reasons::cache as reason;
use templatecache_api::{Phase, TemplateCache};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_squatting_the_next_attempts_name_is_never_taken_for_the_copy() {
    let rig = Rig::new("tenant-squat", 3).await;
    let ns = &rig.ns;
    // A namespace user who may create Jobs, with its own account (the mover's is reserved to
    // the operator by policy), makes the Job the cache's first attempt will be named after,
    // before the cache exists, and it completes.
    account(
        &ns.name,
        "tenant",
        &[&["--verb=create", "--resource=jobs.batch"]],
    )
    .await;
    let tenant = client_as(&ns.name, "tenant", None).await;
    let squatter = completing_job::<TemplateCache>("image-copy-1", None);
    Api::<Job>::namespaced(tenant, &ns.name)
        .create(&PostParams::default(), &squatter)
        .await
        .expect("the tenant may create Jobs");
    wait_until_complete(&ns.client, &ns.name, "image-copy-1").await;

    let server = HttpServer::start().await;
    let (bytes, spec) = template(&server, "disk.img");
    rig.create("image", spec).await;
    let message = ready_reason(ns, "image", reason::JOB_NOT_OURS).await;
    record(
        "hostile tenant (squatted Job): a Job under the next attempt's name, made (and completed) by a namespace user before the operator",
        &format!(
            "not taken for the copy, Ready reason {}: {message}",
            reason::JOB_NOT_OURS
        ),
    );
    for part in [
        "image-copy-1",
        "not the Job the operator created",
        "no controller",
    ] {
        assert!(
            message.contains(part),
            "the refusal names {part}: {message}"
        );
    }
    let cache: TemplateCache = ns.api().get("image").await.expect("cache");
    let status = cache.status.clone().expect("status");
    assert_ne!(
        status.phase,
        Some(Phase::Ready),
        "nothing goes Ready from it"
    );
    assert_eq!(
        status.job_name, None,
        "no Pod of it counts as the current Job's"
    );
    assert!(
        rig.files().is_empty(),
        "nothing is written: {:?}",
        rig.files()
    );
    let job: Job = ns
        .api()
        .get("image-copy-1")
        .await
        .expect("the squatter's Job");
    assert_eq!(
        job.metadata.owner_references, None,
        "the operator did not adopt it"
    );

    // Once its owner deletes it, the operator makes its own Job for the same attempt.
    ns.api::<Job>()
        .delete("image-copy-1", &kube::api::DeleteParams::background())
        .await
        .expect("delete the squatter's Job");
    rig.assert_copied("image", &bytes).await;
    let job: Job = ns
        .api()
        .get("image-copy-1")
        .await
        .expect("the operator's Job");
    let owner = &job.metadata.owner_references.expect("owned")[0];
    assert_eq!(Some(&owner.uid), cache.metadata.uid.as_ref());
    let status = ns
        .api::<TemplateCache>()
        .get("image")
        .await
        .expect("cache")
        .status;
    assert_eq!(
        status.and_then(|s| s.attempt),
        Some(1),
        "no attempt was used up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_remove_job_owned_by_the_cache_and_complete_lets_nothing_go_unremoved() {
    let rig = Rig::new("tenant-forged-rm", 3).await;
    let ns = &rig.ns;
    let server = HttpServer::start().await;
    let (bytes, spec) = template(&server, "disk.img");
    rig.create("img", spec).await;
    rig.assert_copied("img", &bytes).await;
    let cache: TemplateCache = ns.api().get("img").await.expect("cache");
    account(
        &ns.name,
        "tenant",
        &[&["--verb=create", "--resource=jobs.batch"]],
    )
    .await;
    let tenant = client_as(&ns.name, "tenant", None).await;
    Api::<Job>::namespaced(tenant, &ns.name)
        .create(
            &PostParams::default(),
            &completing_job("img-remove-1", Some(&cache)),
        )
        .await
        .expect("the tenant may create Jobs");
    wait_until_complete(&ns.client, &ns.name, "img-remove-1").await;

    ns.api::<TemplateCache>()
        .delete("img", &DeleteParams::background())
        .await
        .expect("delete the cache");
    wait_for_cache_gone(&ns.client, &ns.name, "img").await;
    assert!(
        rig.files().is_empty(),
        "the cache went only once its data was removed: {:?}",
        rig.files()
    );
    // (Both Jobs went with the cache, their owner, by garbage collection.)
    record(
        "hostile tenant (forged remove Job): a complete Job img-remove-1 whose controller ownerReference carries the cache's uid, made before the cache is deleted",
        "not taken for the removal: the operator removed the data with its own img-remove-2, then the cache went; no file left",
    );
}

/// How long the source may send nothing before the copy's attempt fails: the forged Job is
/// made and completed in the meantime.
const STALL_SECONDS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_copy_job_owned_by_the_cache_is_deleted_and_never_taken_for_the_copy() {
    // The source stalls every attempt: attempt 1 fails STALL_SECONDS after its first bytes,
    // by which time the tenant's Job under the next attempt's name has run to completion.
    let server = RangedServer::start().await;
    server.put("disk.img", random_bytes(3 << 20));
    let rig = Rig::with_config("tenant-forged-copy", |cfg| {
        cfg.jobs.limits.stall_seconds = STALL_SECONDS;
        cfg.retry.max_attempts = 3;
    })
    .await;
    let ns = &rig.ns;
    let url = server.url("stalling", "disk.img");
    rig.create("img", json!({"source": {"http": {"url": url}}}))
        .await;
    support::jobs::wait_for_job(&ns.client, &ns.name, "img-copy-1").await;
    let cache: TemplateCache = ns.api().get("img").await.expect("cache");
    account(
        &ns.name,
        "tenant",
        &[&["--verb=create", "--resource=jobs.batch"]],
    )
    .await;
    let tenant = client_as(&ns.name, "tenant", None).await;
    let forged = Api::<Job>::namespaced(tenant, &ns.name)
        .create(
            &PostParams::default(),
            &completing_job("img-copy-2", Some(&cache)),
        )
        .await
        .expect("the tenant may create Jobs");
    wait_until_complete(&ns.client, &ns.name, "img-copy-2").await;
    let cache: TemplateCache = ns.api().get("img").await.expect("cache");
    assert_eq!(
        cache.status.and_then(|s| s.attempt),
        Some(1),
        "the forged Job completed while attempt 1 still ran"
    );

    let jobs: Api<Job> = ns.api();
    let recorded = eventually(
        "attempt 2 runs the operator's own Job",
        Duration::from_secs(STALL_SECONDS + 90),
        || async {
            let cache: TemplateCache = ns.api().get("img").await.expect("cache");
            let status = cache.status.unwrap_or_default();
            let job = jobs.get_opt("img-copy-2").await.expect("read Job");
            let uid = job.and_then(|j| j.metadata.uid);
            match (status.attempt, status.job_uid) {
                (Some(2), Some(recorded)) if uid.as_ref() == Some(&recorded) => Ok(recorded),
                seen => Err(format!(
                    "attempt and recorded uid {seen:?}, Job uid {uid:?}"
                )),
            }
        },
    )
    .await;
    assert_ne!(
        Some(recorded),
        forged.metadata.uid,
        "the forged Job is gone"
    );
    let cache: TemplateCache = ns.api().get("img").await.expect("cache");
    assert_eq!(
        cache.status.and_then(|s| s.phase),
        Some(Phase::Copying),
        "the forged Job's success counted for nothing"
    );
    record(
        "hostile tenant (forged copy Job): a Job under the next attempt's name whose controller ownerReference carries the cache's uid, completed by the Job controller while attempt 1 runs",
        "never taken for the copy: not the recorded uid, so the operator deleted it and ran its own Job for attempt 2",
    );
}
