//! The operator's Jobs as the cache records them: a Job is created, then its uid is written into
//! the cache's status (`jobUid` for the copy, `removal.jobUid` for a removal), and only the Job
//! with that uid is ever believed. Names are predictable and ownerReferences are anyone's to
//! write, so a tenant can make a Job under the operator's name "owned" by the cache; it cannot
//! make one with the uid the API server gave the operator's.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, ListParams, PatchParams, PostParams, Preconditions};
use kube::{Api, ResourceExt};
use tracing::info;

use super::super::jobs::{self, JobState, Operation, RemovalJob};
use super::super::writes::{self, Answer};
use crate::controller::context::Context;
use crate::controller::error::Error;
use templatecache_api::names::OPERATOR_MANAGER;
use templatecache_api::{Removal, StagingStore, TemplateCache};

/// Label the Job controller (and the API server's Job defaults) put on a Job's Pods.
const CONTROLLER_UID_LABEL: &str = "batch.kubernetes.io/controller-uid";

/// Creates `job`; its uid, or `None` when a Job of that name exists already (ours from before a
/// crash, or someone else's: the caller records nothing then, and so trusts neither).
pub async fn create_job(jobs: &Api<Job>, job: Job) -> Result<Option<String>, Error> {
    let params = PostParams {
        field_manager: Some(OPERATOR_MANAGER.to_owned()),
        ..Default::default()
    };
    match jobs.create(&params, &job).await {
        Err(kube::Error::Api(status)) if status.reason == "AlreadyExists" => Ok(None),
        other => Ok(other?.metadata.uid),
    }
}

/// Records `uid` as the copy Job of `attempt`, if the cache is still at that attempt.
pub async fn record_copy_job(
    caches: &Api<TemplateCache>,
    name: &str,
    attempt: u32,
    uid: &str,
) -> Result<(), Error> {
    let patch = writes::json_patch(vec![
        writes::test(writes::pointer(["status", "attempt"]), attempt)?,
        writes::add(writes::pointer(["status", "jobUid"]), uid)?,
    ]);
    caches
        .patch_status(name, &PatchParams::default(), &patch)
        .await
        .or_conflict(name)
        .map(drop)
}

/// The state of the copy Job of the cache's current attempt: only the recorded one counts.
pub async fn copy_job_state(jobs: &Api<Job>, cache: &TemplateCache) -> Result<JobState, Error> {
    let Some(status) = &cache.status else {
        return Ok(JobState::Missing);
    };
    let Some(attempt) = status.attempt.filter(|a| *a > 0) else {
        return Ok(JobState::Missing);
    };
    let name = jobs::job_name(&cache.name_any(), Operation::Copy, attempt);
    let job = jobs.get_opt(&name).await?;
    Ok(JobState::of_recorded(
        job.as_ref(),
        status.job_uid.as_deref(),
        cache,
    ))
}

/// A copy Job under the current attempt's name, controlled by the cache, with no uid recorded:
/// the operator's own from before a crash between creating it and recording it, or a tenant's
/// made to look so. Looked at on a fresh read of the cache (the watch may lag the record): if
/// the record names it after all, nothing is wrong; else it is deleted (by uid, so a Job made
/// meanwhile is untouched) and the operator makes its own. Whether it deleted one.
pub async fn clear_unrecorded_copy_job(
    caches: &Api<TemplateCache>,
    jobs: &Api<Job>,
    cache: &TemplateCache,
) -> Result<bool, Error> {
    let attempt = cache.status.as_ref().and_then(|s| s.attempt).unwrap_or(0);
    if attempt == 0 || cache.status.as_ref().is_some_and(|s| s.job_uid.is_some()) {
        return Ok(false);
    }
    let name = jobs::job_name(&cache.name_any(), Operation::Copy, attempt);
    let Some(job) = jobs.get_opt(&name).await? else {
        return Ok(false);
    };
    if !jobs::is_controlled_by(&job, cache) {
        return Ok(false);
    }
    let fresh = caches.get(&cache.name_any()).await?;
    let fresh_status = fresh.status.unwrap_or_default();
    if fresh_status.attempt != Some(attempt) || fresh_status.job_uid.is_some() {
        return Err(Error::Conflict(cache.name_any()));
    }
    info!(job = %name, "a copy Job with no recorded uid holds the attempt's name; deleting it");
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: job.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match jobs.delete(&name, &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if matches!(status.code, 404 | 409) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Whether a Pod of the recorded copy Job still runs: a deleted (or failed) Job's Pods stop
/// only after their grace period, and until then they can write into the store.
pub async fn copy_pods_running(ctx: &Context, cache: &TemplateCache) -> Result<bool, Error> {
    let Some(uid) = cache.status.as_ref().and_then(|s| s.job_uid.as_deref()) else {
        return Ok(false);
    };
    let pods: Api<Pod> =
        Api::namespaced(ctx.client.clone(), &cache.namespace().unwrap_or_default());
    let selector = format!("{CONTROLLER_UID_LABEL}={uid}");
    let listed = pods
        .list_metadata(&ListParams::default().labels(&selector))
        .await?;
    // Metadata only: a Pod counts until it is gone, whatever its phase says meanwhile.
    Ok(!listed.items.is_empty())
}

/// The state of the Job of the recorded removal try: only the recorded uid counts.
///
/// A Job whose uid the cache as watched does not record is judged again on a fresh read of the
/// cache before it is called someone else's: the watch can lag the record of a Job made a
/// moment ago (seen on a loaded machine: the operator's own failed remove Job taken for a
/// forgery, its failure message lost). A fresh read whose record moved on to another try is a
/// conflict: the reconcile starts over from it.
pub async fn removal_job_state(ctx: &Context, cache: &TemplateCache) -> Result<JobState, Error> {
    let record = cache.status.as_ref().and_then(|s| s.removal.as_ref());
    let Some((name, namespace)) =
        record.and_then(|r| Some((r.job_name.as_ref()?, r.job_namespace.as_ref()?)))
    else {
        return Ok(JobState::Missing);
    };
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let job = jobs.get_opt(name).await?;
    let recorded = record.and_then(|r| r.job_uid.as_deref());
    let state = JobState::of_recorded(job.as_ref(), recorded, cache);
    if !matches!(state, JobState::NotOurs(_)) {
        return Ok(state);
    }
    let caches: Api<TemplateCache> =
        Api::namespaced(ctx.client.clone(), &cache.namespace().unwrap_or_default());
    let fresh = caches.get(&cache.name_any()).await?;
    let fresh_record = fresh.status.as_ref().and_then(|s| s.removal.as_ref());
    let try_of = |r: Option<&Removal>| r.map(|r| (r.attempt, r.job_name.clone()));
    if try_of(fresh_record) != try_of(record) {
        return Err(Error::Conflict(cache.name_any()));
    }
    let recorded = fresh_record.and_then(|r| r.job_uid.as_deref());
    Ok(JobState::of_recorded(job.as_ref(), recorded, &fresh))
}

/// Starts removal try `attempt`: records it (on the view the decision was made from, so two
/// reconciles never start the same try twice), then makes its Job and records its uid. The Job
/// runs in the cache's namespace, or in the operator's when the cache's is being deleted (no new
/// object can be made there, and the data must still go).
pub async fn start_removal(
    caches: &Api<TemplateCache>,
    cache: &TemplateCache,
    store: &StagingStore,
    attempt: u32,
    failure: Option<&str>,
    ctx: &Context,
) -> Result<(), Error> {
    let namespace = cache.namespace().unwrap_or_default();
    let elsewhere = namespace_terminating(ctx, &namespace)
        .await?
        .then_some(ctx.config.operator_namespace.as_str());
    let job = RemovalJob::new(cache, attempt, elsewhere);
    info!(attempt, job = %job.name, namespace = %job.namespace, "removing the cached data");
    let record = Removal {
        attempt,
        job_name: Some(job.name.clone()),
        job_namespace: Some(job.namespace.clone()),
        job_uid: None,
        message: failure.map(str::to_owned),
    };
    let seen = cache.status.as_ref().and_then(|s| s.removal.as_ref());
    let patch = writes::json_patch(vec![
        writes::test(writes::pointer(["status", "removal"]), seen)?,
        writes::add(writes::pointer(["status", "removal"]), &record)?,
    ]);
    caches
        .patch_status(&cache.name_any(), &PatchParams::default(), &patch)
        .await
        .or_conflict(&cache.name_any())?;
    create_recorded_removal(caches, cache, store, &record, ctx).await
}

/// Makes the Job of the recorded removal try and records its uid.
pub async fn create_recorded_removal(
    caches: &Api<TemplateCache>,
    cache: &TemplateCache,
    store: &StagingStore,
    record: &Removal,
    ctx: &Context,
) -> Result<(), Error> {
    let (Some(name), Some(namespace)) = (&record.job_name, &record.job_namespace) else {
        return Ok(());
    };
    let job = RemovalJob {
        name: name.clone(),
        namespace: namespace.clone(),
    };
    let built = jobs::remove_job(cache, store, &job, record.attempt, &ctx.config.jobs)?;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(uid) = create_job(&jobs, built).await? else {
        // Someone else's Job under the name: not recorded, so the next try takes another name.
        return Ok(());
    };
    let patch = writes::json_patch(vec![
        writes::test(writes::pointer(["status", "removal", "jobName"]), name)?,
        writes::add(writes::pointer(["status", "removal", "jobUid"]), uid)?,
    ]);
    caches
        .patch_status(&cache.name_any(), &PatchParams::default(), &patch)
        .await
        .or_conflict(&cache.name_any())
        .map(drop)
}

/// Whether `namespace` is being deleted (or gone): the API server takes no new object there.
async fn namespace_terminating(ctx: &Context, namespace: &str) -> Result<bool, Error> {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    Ok(match namespaces.get_opt(namespace).await? {
        Some(found) => found.metadata.deletion_timestamp.is_some(),
        None => true,
    })
}
