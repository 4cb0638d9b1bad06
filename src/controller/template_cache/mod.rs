//! The TemplateCache reconciler: reads what is, asks [`lifecycle::plan`] what should be, and
//! writes the difference.
//!
//! Exactly one copy Job per attempt, under any concurrency: the status write that starts attempt
//! N tests `status.attempt` against the value the decision saw, so of several reconcilers (a
//! stale reflector, a second operator) only one passes the test; the Job name
//! `<cache>-copy-<N>` is deterministic, so even a repeated create meets the one Job; and a Job that
//! seems missing is created again only after a fresh read confirms the attempt is still current.

pub mod deletion;
mod finalize;
pub mod lifecycle;
mod records;
pub mod removal;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::PatchParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::Value;
use tracing::{debug, info};

use self::lifecycle::{Observed, Plan, Step};
use super::jobs::{self, JobState};
use super::staging_store::tenancy;
use super::writes::{self, Answer};
use crate::controller::context::Context;
use crate::controller::error::Error;
use crate::controller::group_commit;
use crate::infra::metrics::CacheSample;
use templatecache_api::conditions::{READY, find};
use templatecache_api::names::CLEANUP_FINALIZER;
use templatecache_api::reasons::cache as reason;
use templatecache_api::references::{count_references, is_operator_reference};
use templatecache_api::{Phase, StagingStore, TemplateCache, TemplateCacheStatus};

/// Reconciles one TemplateCache. Public so tests can drive it with a deliberately stale object.
pub async fn reconcile(cache: Arc<TemplateCache>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = cache.namespace().ok_or(Error::MissingNamespace)?;
    let caches: Api<TemplateCache> = Api::namespaced(ctx.client.clone(), &namespace);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);

    // References first: the rest of the reconcile works on the cache as the commit left it.
    let (cache, commit_wait) = group_commit::commit(cache, &ctx).await?;
    let holds_consumers = cache.finalizers().iter().any(|f| is_operator_reference(f));
    let requeue = if cache.metadata.deletion_timestamp.is_some() {
        finalize::finalize(&cache, &caches, &jobs, &ctx).await?
    } else {
        reconcile_live(cache, &caches, &jobs, &ctx).await?
    };
    // A periodic look catches a consumer's deletion that the watch missed.
    let sweep = holds_consumers.then_some(ctx.config.reference_sweep);
    Ok(
        match [requeue, commit_wait, sweep].into_iter().flatten().min() {
            Some(after) => Action::requeue(after),
            None => Action::await_change(),
        },
    )
}

async fn reconcile_live(
    cache: Arc<TemplateCache>,
    caches: &Api<TemplateCache>,
    jobs: &Api<Job>,
    ctx: &Context,
) -> Result<Option<Duration>, Error> {
    if !has_cleanup_finalizer(&cache) {
        // The reference commit adds it; it had to wait its turn.
        return Ok(None);
    }

    let store_name = ctx.store_name_of(&cache).to_owned();
    let store = ctx.store(&store_name).await?;
    let attempt = cache.status.as_ref().and_then(|s| s.attempt).unwrap_or(0);
    if records::clear_unrecorded_copy_job(caches, jobs, &cache).await? {
        return Ok(Some(Duration::from_secs(1)));
    }
    let job = records::copy_job_state(jobs, &cache).await?;
    let cache = read_report_if_missing(caches, cache, attempt, &job).await?;
    let removal = match cache.status.as_ref().and_then(|s| s.phase) {
        Some(Phase::Evicted) => records::removal_job_state(ctx, &cache).await?,
        _ => JobState::Missing,
    };
    let observed = Observed {
        cache: &cache,
        references: count_references(cache.finalizers()),
        store_name: &store_name,
        store: store.as_deref(),
        job,
        removal,
        source_refusal: lifecycle::source_refusal(&cache, &ctx.config.source_allowlist),
        namespace_refusal: namespace_refusal(&cache, store.as_deref(), &store_name, ctx).await?,
        now: Timestamp::now(),
    };
    let plan = lifecycle::plan(&observed, &ctx.config.retry);
    let namespace = cache.namespace().unwrap_or_default();
    let sample = CacheSample {
        references: observed.references,
        phase: plan.status.phase.unwrap_or_default(),
    };
    ctx.metrics
        .observe_cache(&namespace, &cache.name_any(), Some(sample));
    // During an acquire storm every reference changes the count, and a status write for each
    // would double the writes on the one object all consumers append to. The count is derived
    // from the references, which stay exact; only its record is paced.
    let count_only = records_only_the_count(&plan, &cache)?;
    let key = format!("{namespace}/{}", cache.name_any());
    if count_only && let Some(wait) = ctx.count_writes.wait(&key) {
        return Ok(Some(
            plan.requeue_after.map_or(wait, |after| after.min(wait)),
        ));
    }
    let started = Instant::now();
    execute(
        &plan,
        &observed.removal,
        &cache,
        store.as_deref(),
        caches,
        jobs,
        ctx,
    )
    .await?;
    if count_only {
        ctx.count_writes.done(&key, started);
    }
    announce(&plan, &cache, ctx).await;
    Ok(plan.requeue_after)
}

/// Why the cache's store does not admit its namespace, for a cache that has not started a copy
/// (the only time it matters here; copies already started are refused room by the store). A
/// get of the Namespace, so a label added or removed counts at once.
async fn namespace_refusal(
    cache: &TemplateCache,
    store: Option<&StagingStore>,
    store_name: &str,
    ctx: &Context,
) -> Result<Option<String>, Error> {
    let started = cache.status.as_ref().and_then(|s| s.attempt).is_some();
    let selector = store.and_then(|s| s.spec.namespace_selector.as_ref());
    let (false, Some(selector)) = (started, selector) else {
        return Ok(None);
    };
    let namespace = cache.namespace().unwrap_or_default();
    let labels = Api::<Namespace>::all(ctx.client.clone())
        .get_opt(&namespace)
        .await?
        .and_then(|n| n.metadata.labels)
        .unwrap_or_default();
    if tenancy::selects(Some(selector), &labels) {
        return Ok(None);
    }
    let rules = tenancy::Tenancy {
        outside: [namespace.clone()].into(),
        selector: tenancy::describe(Some(selector)),
        quota: None,
    };
    Ok(rules.judge(store_name, &namespace, 0, 0).map(|r| r.message))
}

/// Status fields that change with every reference taken or released.
const COUNT_FIELDS: [&str; 2] = ["refCount", "lastReferenced"];

/// Whether the only thing the plan writes is a changed reference count.
fn records_only_the_count(plan: &Plan, cache: &TemplateCache) -> Result<bool, Error> {
    if plan.step != Step::Record {
        return Ok(false);
    }
    let changes = status_changes(cache, &plan.status)?;
    Ok(!changes.is_empty() && changes.keys().all(|k| COUNT_FIELDS.contains(&k.as_str())))
}

/// Counts and announces (as an Event on the cache) what the plan, now written, did to the copy:
/// started, succeeded, failed, given up.
async fn announce(plan: &Plan, cache: &TemplateCache, ctx: &Context) {
    let before = cache.status.as_ref().and_then(|s| s.phase);
    let after = plan.status.phase;
    let metrics = &ctx.metrics;
    let ready = find(&plan.status.conditions, READY);
    let note = ready.map(|c| c.message.clone()).unwrap_or_default();
    let publish = async |type_, reason: &str| {
        ctx.events
            .publish(cache, type_, reason, &note, "Reconcile")
            .await;
    };
    if let Step::StartAttempt(_) = plan.step {
        metrics.copies_started.inc();
        // A failure whose backoff had already run out goes straight to the next attempt.
        if before == Some(Phase::Copying) {
            metrics.copies_failed.inc();
        }
        publish(EventType::Normal, "CopyStarted").await;
        return;
    }
    if after == before {
        return;
    }
    match after {
        Some(Phase::Ready) => {
            metrics.copies_succeeded.inc();
            metrics.bytes_copied.inc_by(plan.status.size.unwrap_or(0));
            publish(EventType::Normal, reason::COPIED).await;
        }
        Some(Phase::Failed) => {
            metrics.copies_failed.inc();
            let reason = ready.map_or(reason::COPY_FAILED, |c| c.reason.as_str());
            publish(EventType::Warning, reason).await;
        }
        _ => {}
    }
}

async fn execute(
    plan: &Plan,
    observed_removal: &JobState,
    cache: &TemplateCache,
    store: Option<&StagingStore>,
    caches: &Api<TemplateCache>,
    jobs: &Api<Job>,
    ctx: &Context,
) -> Result<(), Error> {
    match (&plan.step, store) {
        (Step::Record, _) | (_, None) => write_status(caches, cache, &plan.status).await,
        (Step::StartAttempt(attempt), Some(store)) => {
            win_attempt(caches, cache, &plan.status).await?;
            info!(attempt, "won the transition; creating the copy Job");
            let job = jobs::copy_job(cache, store, *attempt, &ctx.config.jobs, &ctx.config.retry)?;
            if let Some(uid) = records::create_job(jobs, job).await? {
                records::record_copy_job(caches, &cache.name_any(), *attempt, &uid).await?;
            }
            Ok(())
        }
        (Step::RemoveData(try_), Some(store)) => {
            write_status(caches, cache, &plan.status).await?;
            let failure = removal::failure(observed_removal);
            records::start_removal(caches, cache, store, *try_, failure, ctx).await
        }
        (Step::CreateRemoval, Some(store)) => {
            write_status(caches, cache, &plan.status).await?;
            let record = cache.status.as_ref().and_then(|s| s.removal.clone());
            match record {
                Some(record) => {
                    records::create_recorded_removal(caches, cache, store, &record, ctx).await
                }
                None => Ok(()),
            }
        }
        (Step::EnsureJob(attempt), Some(store)) => {
            let fresh = caches.get(&cache.name_any()).await?;
            let fresh_attempt = fresh.status.as_ref().and_then(|s| s.attempt);
            if fresh_attempt != Some(*attempt) || fresh.metadata.deletion_timestamp.is_some() {
                return Err(Error::Conflict(cache.name_any()));
            }
            info!(
                attempt,
                "the copy Job of the current attempt is missing; creating it"
            );
            let job = jobs::copy_job(&fresh, store, *attempt, &ctx.config.jobs, &ctx.config.retry)?;
            if let Some(uid) = records::create_job(jobs, job).await? {
                records::record_copy_job(caches, &fresh.name_any(), *attempt, &uid).await?;
            }
            write_status(caches, &fresh, &plan.status).await
        }
    }
}

/// The data mover writes its report into the cache before its Job finishes, but the watch that
/// brought the finished Job may be ahead of the one that brings the cache. Deciding on a finished
/// Job without its report would record a false failure, so read the cache afresh first.
async fn read_report_if_missing(
    caches: &Api<TemplateCache>,
    cache: Arc<TemplateCache>,
    attempt: u32,
    job: &JobState,
) -> Result<Arc<TemplateCache>, Error> {
    let finished = matches!(job, JobState::Succeeded | JobState::Failed { .. });
    let has_report = cache
        .status
        .as_ref()
        .and_then(|s| s.progress.as_ref())
        .is_some_and(|p| p.attempt == Some(attempt));
    if !finished || has_report {
        return Ok(cache);
    }
    Ok(Arc::new(caches.get(&cache.name_any()).await?))
}

/// Writes the fields of `desired` that differ from the cache's status; nothing when none do.
/// The data mover's `progress` and the store's `storage` are left alone (a new attempt clears
/// them in [`win_attempt`]).
///
/// A change of phase is written only if the phase is still the one the decision saw, so a
/// reconcile working from an old read cannot, say, write `Ready` over an eviction. A changed
/// `refCount` is written only on the resourceVersion it was counted from. Other fields are
/// merged without a precondition: a storm of reference writes cannot starve them.
async fn write_status(
    caches: &Api<TemplateCache>,
    cache: &TemplateCache,
    desired: &TemplateCacheStatus,
) -> Result<(), Error> {
    let current = cache.status.clone().unwrap_or_default();
    let diff = status_changes(cache, desired)?;
    if diff.is_empty() {
        return Ok(());
    }
    debug!(?diff, "recording status");
    let name = cache.name_any();
    let params = PatchParams::default();
    // A count is written only on the version it was counted from: written from a view that
    // lags the last reference commit, it could show more references than the cache holds.
    let counted_on = diff
        .contains_key("refCount")
        .then(|| cache.resource_version())
        .flatten();
    let result = match (&cache.status, diff.contains_key("phase")) {
        (Some(_), true) => {
            let mut ops = vec![writes::test(
                writes::pointer(["status", "phase"]),
                current.phase,
            )?];
            if let Some(version) = &counted_on {
                ops.push(writes::test(
                    writes::pointer(["metadata", "resourceVersion"]),
                    version,
                )?);
            }
            for (key, value) in diff {
                let path = writes::pointer(["status", key.as_str()]);
                ops.push(match value {
                    Value::Null => writes::remove(path),
                    value => writes::add(path, value)?,
                });
            }
            caches
                .patch_status(&name, &params, &writes::json_patch(ops))
                .await
                .or_conflict(&name)
        }
        _ => {
            let patch = writes::status_merge(counted_on.as_deref(), Value::Object(diff));
            caches
                .patch_status(&name, &params, &patch)
                .await
                .or_version_conflict(&name)
        }
    };
    result.map(drop)
}

/// The transition that starts an attempt, written only if no one has started another attempt
/// since the decision was made: a JSON patch that tests `status.attempt` against the value the
/// decision saw, then replaces the status. A stale reader fails the test (422) instead of
/// starting a second Job. The test is on the attempt, not the whole object's resourceVersion, so
/// a storm of reference writes cannot starve the transition.
async fn win_attempt(
    caches: &Api<TemplateCache>,
    cache: &TemplateCache,
    desired: &TemplateCacheStatus,
) -> Result<(), Error> {
    let mut status = desired.clone();
    status.progress = None;
    let seen = match &cache.status {
        Some(current) => writes::test(writes::pointer(["status", "attempt"]), current.attempt)?,
        // `test` against null passes only while the field is absent.
        None => writes::test(writes::pointer(["status"]), Value::Null)?,
    };
    let patch = writes::json_patch(vec![
        seen,
        writes::add(writes::pointer(["status"]), status)?,
    ]);
    caches
        .patch_status(&cache.name_any(), &PatchParams::default(), &patch)
        .await
        .or_conflict(&cache.name_any())
        .map(drop)
}

/// The top-level status fields [`write_status`] would write: those that differ, except the
/// ones others own (`progress`, `storage`).
fn status_changes(
    cache: &TemplateCache,
    desired: &TemplateCacheStatus,
) -> Result<serde_json::Map<String, Value>, Error> {
    let current = cache.status.clone().unwrap_or_default();
    let mut diff = status_diff(&current, desired)?;
    // The mover's report, the store's grant, and the Job records (written right after each
    // Job is made, so a plan from an older view must not undo them).
    for owned_elsewhere in ["progress", "storage", "jobUid", "removal"] {
        diff.remove(owned_elsewhere);
    }
    Ok(diff)
}

/// Top-level status fields that differ, with `null` for fields to clear.
fn status_diff(
    current: &TemplateCacheStatus,
    desired: &TemplateCacheStatus,
) -> Result<serde_json::Map<String, Value>, Error> {
    let Value::Object(current) = serde_json::to_value(current)? else {
        return Ok(Default::default());
    };
    let Value::Object(desired) = serde_json::to_value(desired)? else {
        return Ok(Default::default());
    };
    let mut diff = serde_json::Map::new();
    for (key, value) in &desired {
        if current.get(key) != Some(value) {
            diff.insert(key.clone(), value.clone());
        }
    }
    for key in current.keys() {
        if !desired.contains_key(key) {
            diff.insert(key.clone(), Value::Null);
        }
    }
    Ok(diff)
}

/// Creates a Job. Its name is deterministic, so a repeat meets the Job already there and leaves
/// it be. A create, not an apply: a Job's spec cannot change after creation anyway, and an
/// apply costs the API server a YAML parse and a merge on every copy.
/// Whether the operator's cleanup finalizer is on the cache: the data it copies is removed
/// before the cache goes, so no copy starts before it is there.
fn has_cleanup_finalizer(cache: &TemplateCache) -> bool {
    cache.finalizers().iter().any(|f| f == CLEANUP_FINALIZER)
}

/// Removes every copy of the cleanup finalizer, each at its index under a `test`, so a list that
/// moved meanwhile fails cleanly and is read again.
async fn remove_cleanup_finalizer(
    caches: &Api<TemplateCache>,
    cache: &TemplateCache,
) -> Result<(), Error> {
    let mut ops = vec![];
    for (index, _) in cache
        .finalizers()
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, f)| *f == CLEANUP_FINALIZER)
    {
        let index = index.to_string();
        let path = || writes::pointer(["metadata", "finalizers", &index]);
        ops.push(writes::test(path(), CLEANUP_FINALIZER)?);
        ops.push(writes::remove(path()));
    }
    if ops.is_empty() {
        return Ok(());
    }
    // A failed `test` (422) means our view was stale: look again. Gone: nothing to release.
    caches
        .patch(
            &cache.name_any(),
            &PatchParams::default(),
            &writes::json_patch(ops),
        )
        .await
        .unless_gone()
        .or_conflict(&cache.name_any())
        .map(drop)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::controller::fixtures;

    fn cache_with(status: TemplateCacheStatus) -> TemplateCache {
        let mut cache = fixtures::cache("img", Value::Null);
        cache.status = Some(status);
        cache
    }

    fn plan(step: Step, status: &TemplateCacheStatus) -> Plan {
        Plan {
            step,
            status: status.clone(),
            requeue_after: None,
        }
    }

    #[test]
    fn only_a_write_of_nothing_but_the_count_is_paced() {
        let recorded = TemplateCacheStatus {
            phase: Some(Phase::Ready),
            ref_count: Some(1),
            ..Default::default()
        };
        let cache = cache_with(recorded.clone());
        let recount = TemplateCacheStatus {
            ref_count: Some(2),
            last_referenced: Some(Time(Timestamp::now())),
            ..recorded.clone()
        };
        let only_count = |step, status| records_only_the_count(&plan(step, status), &cache);

        assert!(only_count(Step::Record, &recount).expect("diff"));
        let failed = TemplateCacheStatus {
            phase: Some(Phase::Failed),
            ..recount.clone()
        };
        assert!(
            !only_count(Step::Record, &failed).expect("diff"),
            "a change of phase is never held back"
        );
        assert!(
            !only_count(Step::EnsureJob(1), &recount).expect("diff"),
            "a step that creates a Job is never held back"
        );
        assert!(
            !only_count(Step::Record, &recorded).expect("diff"),
            "nothing to write, nothing to pace"
        );
    }
}
