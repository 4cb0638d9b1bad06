//! A deleted cache: reads what [`super::deletion::plan`] needs, and does the one thing it says.
//! Whatever the state of the cache's namespace, this finishes: a removal that cannot be made
//! in a namespace being deleted runs in the operator's, and a failed one is tried again.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use tracing::info;

use super::deletion::{self, Deletion, Seen};
use super::lifecycle::{self, Observed};
use super::{records, removal};
use crate::controller::context::Context;
use crate::controller::error::Error;
use crate::controller::jobs::{self, JobState, Operation};
use templatecache_api::TemplateCache;
use templatecache_api::references::count_references;

/// How often a removal is looked at while it runs: its Job may be in the operator's namespace,
/// whose Jobs do not wake the cache.
const REMOVAL_POLL: Duration = Duration::from_secs(2);

/// Deleting: hold the cache until its last reference is released, stop its copy, remove its
/// data with a remove Job, and let it go.
pub async fn finalize(
    cache: &TemplateCache,
    caches: &Api<TemplateCache>,
    jobs: &Api<Job>,
    ctx: &Context,
) -> Result<Option<Duration>, Error> {
    if !super::has_cleanup_finalizer(cache) {
        return Ok(None);
    }
    let store_name = ctx.store_name_of(cache);
    let store = ctx.store(store_name).await?;
    let references = count_references(cache.finalizers());
    let attempt = cache.status.as_ref().and_then(|s| s.attempt).unwrap_or(0);
    // The Jobs and Pods are read only when the decision may need them.
    let needs_jobs = references == 0 && store.is_some() && attempt > 0;
    let (copy, removal) = match needs_jobs {
        true => (
            records::copy_job_state(jobs, cache).await?,
            records::removal_job_state(ctx, cache).await?,
        ),
        false => (JobState::Missing, JobState::Missing),
    };
    let copy_pods_running = needs_jobs
        && matches!(copy, JobState::Missing | JobState::Failed { .. })
        && records::copy_pods_running(ctx, cache).await?;
    let observed = Observed {
        cache,
        references,
        store_name,
        store: store.as_deref(),
        job: JobState::Missing,
        removal: removal.clone(),
        source_refusal: None,
        namespace_refusal: None,
        now: Timestamp::now(),
    };
    super::write_status(caches, cache, &lifecycle::deleting_status(&observed)).await?;
    let seen = Seen {
        holds_cleanup: true,
        references,
        attempt,
        store_exists: store.is_some(),
        copy,
        copy_pods_running,
        removal_record: cache.status.as_ref().and_then(|s| s.removal.clone()),
        removal,
        now: observed.now,
    };
    match (deletion::plan(&seen, &ctx.config.retry), store) {
        (Deletion::Done | Deletion::WaitForReferences, _) => Ok(None),
        (Deletion::ReleaseWithoutRemoval, _) => {
            super::remove_cleanup_finalizer(caches, cache).await?;
            Ok(None)
        }
        (Deletion::StopCopy, _) => {
            let name = jobs::job_name(&cache.name_any(), Operation::Copy, attempt);
            jobs.delete(&name, &DeleteParams::background()).await?;
            Ok(Some(Duration::from_secs(1)))
        }
        (Deletion::WaitForCopyPods, _) => Ok(Some(Duration::from_secs(1))),
        (Deletion::StartRemoval(try_), Some(store)) => {
            let failure = removal::failure(&seen.removal);
            records::start_removal(caches, cache, &store, try_, failure, ctx).await?;
            Ok(Some(REMOVAL_POLL))
        }
        (Deletion::CreateRemoval, Some(store)) => {
            if let Some(record) = &seen.removal_record {
                records::create_recorded_removal(caches, cache, &store, record, ctx).await?;
            }
            Ok(Some(REMOVAL_POLL))
        }
        (Deletion::WaitForRemoval(after), _) => Ok(Some(after.unwrap_or(REMOVAL_POLL))),
        (Deletion::Release, _) => {
            info!("data removed; releasing the cache");
            super::remove_cleanup_finalizer(caches, cache).await?;
            let namespace = cache.namespace().unwrap_or_default();
            ctx.metrics
                .observe_cache(&namespace, &cache.name_any(), None);
            Ok(None)
        }
        // The plan removes only with the store present.
        (Deletion::StartRemoval(_) | Deletion::CreateRemoval, None) => Ok(None),
    }
}
