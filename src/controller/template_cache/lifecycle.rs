//! The TemplateCache state machine as a pure function: from what is observed (the cache, its
//! references, its store, the Job of its current attempt) to the status it should have and the
//! one step that gets it there. No I/O here, so every transition is unit-tested.
//!
//! ```text
//! Pending ──(win attempt N)──▶ Copying ──▶ Ready
//!                                 │
//!                                 ▼
//!                              Failed ──(backoff elapsed, N < limit)──▶ Copying (attempt N+1)
//!                                 └──(N = limit)──▶ Failed (RetriesExhausted, final)
//!
//! Ready ──(StagingStore controller evicts)──▶ Evicted ──(remove Job done, a reference)──▶
//!                                              Copying (attempt N+1)
//!
//! any phase ──(deleted)──▶ Deleting ──(no reference left)──▶ copy stopped ──▶ remove Job
//!                                     ──(remove Job done)──▶ cleanup finalizer removed: gone
//! ```
//!
//! An evicted cache is copied again only after its remove Job has finished, so the removal can
//! never delete the new copy. Deleting is decided by [`super::deletion::plan`].

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::removal::{self, Next};
use crate::controller::jobs::{JobState, Operation, data_path, job_name};
use crate::controller::retry::RetryPolicy;
use templatecache_api::conditions::{READY, condition, set_condition};
use templatecache_api::reasons::cache as reason;
use templatecache_api::{
    Phase, Progress, Removal, StagingStore, TemplateCache, TemplateCacheStatus,
};

/// What the reconciler saw.
pub struct Observed<'a> {
    pub cache: &'a TemplateCache,
    pub references: u32,
    pub store_name: &'a str,
    pub store: Option<&'a StagingStore>,
    /// State of the copy Job of `status.attempt`.
    pub job: JobState,
    /// State of the Job recorded in `status.removal` (looked up only for an evicted cache).
    pub removal: JobState,
    /// Why the operator's source allowlist refuses the source, if it does.
    pub source_refusal: Option<String>,
    /// Why the store's `namespaceSelector` does not admit the cache's namespace, if it does not
    /// (looked up only for a cache that has not started a copy yet).
    pub namespace_refusal: Option<String>,
    pub now: Timestamp,
}

/// The one write that moves the cache on.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Only record the status (when it differs).
    Record,
    /// Win the transition to this attempt (a patch that tests `status.attempt`), then create its
    /// Job.
    StartAttempt(u32),
    /// The current attempt's Job is missing (a crash between the two writes): create it.
    EnsureJob(u32),
    /// The cache's data is to be removed (it was evicted): start removal try `n`.
    RemoveData(u32),
    /// Make the Job of the recorded removal try (recorded, never made).
    CreateRemoval,
}

/// The status the cache should have, the step to take, and when to look again.
#[derive(Clone, Debug)]
pub struct Plan {
    pub status: TemplateCacheStatus,
    pub step: Step,
    pub requeue_after: Option<Duration>,
}

/// Why the cache's source is refused by the operator's source `allowlist` (prefixes of
/// [`TemplateSource::location`](templatecache_api::TemplateSource::location); empty allows all), if it is.
pub fn source_refusal(cache: &TemplateCache, allowlist: &[String]) -> Option<String> {
    let location = cache.spec.source.location();
    if allowlist.is_empty() || allowlist.iter().any(|p| location.starts_with(p)) {
        return None;
    }
    Some(format!(
        "source {location} is outside the operator's source allowlist ({})",
        allowlist.join(", ")
    ))
}

/// Decides the next step for a cache that is not being deleted.
pub fn plan(observed: &Observed, policy: &RetryPolicy) -> Plan {
    let cache = observed.cache;
    let current = cache.status.clone().unwrap_or_default();
    let mut status = common_status(observed, &current);
    let attempt = current.attempt.unwrap_or(0);
    let generation = cache.metadata.generation;

    if observed.store.is_none() {
        status.phase = Some(Phase::Pending);
        let message = format!("StagingStore {} does not exist", observed.store_name);
        set_ready(
            &mut status,
            false,
            reason::STORE_NOT_FOUND,
            message,
            generation,
        );
        return record(status, Some(Duration::from_secs(30)));
    }
    if let Some(refusal) = &observed.source_refusal
        && current.phase != Some(Phase::Ready)
    {
        // Final, with no Job: nothing is fetched from a source the operator may not reach.
        status.phase = Some(Phase::Failed);
        let message = refusal.clone();
        set_ready(
            &mut status,
            false,
            reason::SOURCE_NOT_ALLOWED,
            message,
            generation,
        );
        return record(status, None);
    }
    if current.phase == Some(Phase::Evicted) {
        return evicted(status, observed, attempt, policy);
    }
    if attempt == 0 {
        if let Some(refusal) = &observed.namespace_refusal {
            // No Job at all: a Pod that mounts the store is not made for a namespace that may
            // not use it. Pending, not Failed: the namespace may be labelled later.
            status.phase = Some(Phase::Pending);
            let message = refusal.clone();
            set_ready(
                &mut status,
                false,
                reason::STORE_NOT_ALLOWED,
                message,
                generation,
            );
            return record(status, Some(Duration::from_secs(30)));
        }
        return start_attempt(status, cache, 1);
    }
    // A Ready copy stays Ready whatever happens to its finished Job.
    if current.phase == Some(Phase::Ready) {
        return record(status, None);
    }
    match &observed.job {
        // The last attempt's Job went after it failed (its ttlSecondsAfterFinished): the cache
        // stays failed instead of running that attempt again.
        JobState::Missing if failed_for_good_before(&current) => record(status, None),
        JobState::Missing => {
            copying(&mut status, cache, attempt);
            waiting_for_room(&mut status, generation, attempt);
            Plan {
                status,
                step: Step::EnsureJob(attempt),
                requeue_after: None,
            }
        }
        JobState::Running => {
            copying(&mut status, cache, attempt);
            waiting_for_room(&mut status, generation, attempt);
            record(status, None)
        }
        JobState::Succeeded => succeeded(status, cache, attempt, observed, policy),
        JobState::Failed { message, at } => {
            let report = report_of(&current, attempt);
            let message = report
                .and_then(|r| r.error.clone())
                .unwrap_or_else(|| message.clone());
            if report.and_then(|r| r.final_reason.as_deref()) == Some(reason::ADDRESS_NOT_ALLOWED) {
                return failed_for_good(status, cache, reason::ADDRESS_NOT_ALLOWED, message);
            }
            failed(status, cache, attempt, message, *at, observed.now, policy)
        }
        JobState::NotOurs(message) => not_ours(status, cache, message),
    }
}

/// Whether the cache already failed with no attempt left.
fn failed_for_good_before(current: &TemplateCacheStatus) -> bool {
    let ready = templatecache_api::conditions::find(&current.conditions, READY);
    current.phase == Some(Phase::Failed)
        && ready.is_some_and(|c| {
            [reason::RETRIES_EXHAUSTED, reason::ADDRESS_NOT_ALLOWED].contains(&c.reason.as_str())
        })
}

/// A failure no other attempt would get past (the mover said so): Failed, no retry.
fn failed_for_good(
    mut status: TemplateCacheStatus,
    cache: &TemplateCache,
    why: &str,
    message: String,
) -> Plan {
    status.phase = Some(Phase::Failed);
    set_ready(&mut status, false, why, message, cache.metadata.generation);
    record(status, None)
}

/// The attempt's Job name is taken by a Job the cache does not control. Taking it would run
/// someone else's Pod as "the copy" (and the status policy trusts the current Job's Pods), and
/// moving on to the next name would only invite squatting that one too; so the cache says so
/// and trusts no Job (`jobName` empty) until that Job is gone, when the operator creates its
/// own under the same name and the attempt goes on. No attempt is used up meanwhile.
fn not_ours(mut status: TemplateCacheStatus, cache: &TemplateCache, message: &str) -> Plan {
    status.phase = Some(Phase::Failed);
    status.job_name = None;
    let generation = cache.metadata.generation;
    let message = message.to_owned();
    set_ready(
        &mut status,
        false,
        reason::JOB_NOT_OURS,
        message,
        generation,
    );
    // The operator watches only the Jobs it owns: look again for the squatter's removal.
    record(status, Some(Duration::from_secs(10)))
}

/// Status for a cache being deleted: it waits for its references to go.
pub fn deleting_status(observed: &Observed) -> TemplateCacheStatus {
    let current = observed.cache.status.clone().unwrap_or_default();
    let mut status = common_status(observed, &current);
    status.phase = Some(Phase::Deleting);
    let (why, message) = match (observed.references, removal::failure(&observed.removal)) {
        (0, Some(failure)) => (
            reason::REMOVE_FAILED,
            format!("removing the cached data failed, tried again under a new Job: {failure}"),
        ),
        (0, None) => (reason::DELETING, "removing the cached data".to_owned()),
        (n, _) => (
            reason::DELETING,
            format!("waiting for {n} reference(s) to be released"),
        ),
    };
    let generation = observed.cache.metadata.generation;
    set_ready(&mut status, false, why, message, generation);
    status
}

/// Fields every reconcile refreshes: the reference count (derived from the finalizers), when
/// the references last changed, the store and the path.
fn common_status(observed: &Observed, current: &TemplateCacheStatus) -> TemplateCacheStatus {
    let cache = observed.cache;
    let mut status = current.clone();
    let refs = observed.references;
    if current.ref_count.unwrap_or(0) != refs {
        status.last_referenced = Some(Time(observed.now));
    }
    status.ref_count = Some(refs);
    status.observed_generation = cache.metadata.generation;
    status.store = Some(observed.store_name.to_owned());
    status.path = Some(data_path(
        cache.metadata.namespace.as_deref().unwrap_or_default(),
        cache.metadata.name.as_deref().unwrap_or_default(),
    ));
    // The first digest a mover reports is kept for the life of the cache: every later attempt
    // pulls it, whatever the tag names by then (the mover's report is cleared between attempts).
    if status.resolved_digest.is_none()
        && let Some(attempt) = current.attempt
        && let Some(digest) = report_of(current, attempt).and_then(|p| p.resolved_digest.clone())
    {
        status.resolved_digest = Some(digest);
    }
    status
}

fn record(status: TemplateCacheStatus, requeue_after: Option<Duration>) -> Plan {
    Plan {
        status,
        step: Step::Record,
        requeue_after,
    }
}

fn start_attempt(mut status: TemplateCacheStatus, cache: &TemplateCache, attempt: u32) -> Plan {
    status.attempt = Some(attempt);
    // The new attempt's Job is not made yet; its uid is recorded once it is.
    status.job_uid = None;
    // A removal before this attempt is over; its tries still count, so no name is reused.
    if let Some(removal) = &mut status.removal {
        *removal = Removal {
            attempt: removal.attempt,
            ..Removal::default()
        };
    }
    status.progress = None;
    status.storage = None;
    status.size = None;
    status.checksum = None;
    copying(&mut status, cache, attempt);
    Plan {
        status,
        step: Step::StartAttempt(attempt),
        requeue_after: None,
    }
}

fn copying(status: &mut TemplateCacheStatus, cache: &TemplateCache, attempt: u32) {
    let name = cache.metadata.name.as_deref().unwrap_or_default();
    let job = job_name(name, Operation::Copy, attempt);
    status.phase = Some(Phase::Copying);
    let message = format!("attempt {attempt}: Job {job} is copying the template");
    status.job_name = Some(job);
    set_ready(
        status,
        false,
        reason::COPYING,
        message,
        cache.metadata.generation,
    );
}

/// A copy whose store has refused it room (for now) is Pending, with the store's reason.
fn waiting_for_room(status: &mut TemplateCacheStatus, generation: Option<i64>, attempt: u32) {
    let refused = status
        .storage
        .as_ref()
        .filter(|s| s.attempt == attempt && !s.admitted)
        .and_then(|s| Some((s.message.clone()?, s.reason.clone())));
    if let Some((message, why)) = refused {
        status.phase = Some(Phase::Pending);
        let why = why.unwrap_or_else(|| reason::STORE_FULL.to_owned());
        set_ready(status, false, &why, message, generation);
    }
}

/// Evicted: remove the data with the attempt's remove Job; once it is gone, a reference starts
/// the next attempt.
fn evicted(
    mut status: TemplateCacheStatus,
    observed: &Observed,
    attempt: u32,
    policy: &RetryPolicy,
) -> Plan {
    let cache = observed.cache;
    let generation = cache.metadata.generation;
    let store = observed.store_name;
    // `size` stays until the data is known to be gone: a finished removal is never repeated.
    let next = match status.size {
        Some(_) => removal::next(
            current_removal(cache),
            &observed.removal,
            observed.now,
            policy,
        ),
        None => Next::Done,
    };
    // A failed try says so (and is retried under a new name after its backoff).
    let (why, removing) = match removal::failure(&observed.removal) {
        Some(failure) => (
            reason::EVICTION_FAILED,
            format!("removing the evicted data failed, tried again: {failure}"),
        ),
        None => (reason::EVICTED, reason::evicted_removing(store)),
    };
    let step = match next {
        Next::Start(try_) => Step::RemoveData(try_),
        Next::Create => Step::CreateRemoval,
        Next::Wait(_) | Next::Done => Step::Record,
    };
    match next {
        Next::Start(_) | Next::Create | Next::Wait(_) => {
            set_ready(&mut status, false, why, removing, generation);
            let requeue_after = match next {
                Next::Wait(after) => after,
                _ => None,
            };
            Plan {
                status,
                step,
                requeue_after,
            }
        }
        Next::Done => {
            status.size = None;
            status.checksum = None;
            if observed.references > 0 {
                return start_attempt(status, cache, attempt + 1);
            }
            let message = format!(
                "evicted from StagingStore {store} to free space; a new reference copies it again"
            );
            set_ready(&mut status, false, reason::EVICTED, message, generation);
            record(status, None)
        }
    }
}

/// The cache's removal record (see [`super::removal`]).
fn current_removal(cache: &TemplateCache) -> Option<&Removal> {
    cache.status.as_ref()?.removal.as_ref()
}

fn succeeded(
    mut status: TemplateCacheStatus,
    cache: &TemplateCache,
    attempt: u32,
    observed: &Observed,
    policy: &RetryPolicy,
) -> Plan {
    let report = report_of(&status, attempt).cloned().unwrap_or_default();
    let verified = match (&report.checksum, &cache.spec.checksum) {
        (None, _) => Err("the copy Job succeeded but reported no checksum".to_owned()),
        (Some(got), Some(want)) if got != want => Err(format!(
            "checksum mismatch: expected {want}, the copy has {got}"
        )),
        (Some(got), _) => Ok(got.clone()),
    };
    match verified {
        Ok(checksum) => {
            status.phase = Some(Phase::Ready);
            status.size = Some(report.bytes_copied);
            let message = format!("copied {} bytes, {checksum}", report.bytes_copied);
            status.checksum = Some(checksum);
            let generation = cache.metadata.generation;
            set_ready(&mut status, true, reason::COPIED, message, generation);
            record(status, None)
        }
        Err(message) => failed(
            status,
            cache,
            attempt,
            message,
            Some(observed.now),
            observed.now,
            policy,
        ),
    }
}

fn failed(
    mut status: TemplateCacheStatus,
    cache: &TemplateCache,
    attempt: u32,
    message: String,
    failed_at: Option<Timestamp>,
    now: Timestamp,
    policy: &RetryPolicy,
) -> Plan {
    let generation = cache.metadata.generation;
    status.phase = Some(Phase::Failed);
    if policy.is_last(attempt) {
        let limit = policy.max_attempts;
        let message = format!("attempt {attempt} of {limit} failed: {message}; no retry left");
        set_ready(
            &mut status,
            false,
            reason::RETRIES_EXHAUSTED,
            message,
            generation,
        );
        return record(status, None);
    }
    let due = failed_at.unwrap_or(now) + policy.delay_after(attempt);
    let wait = now.duration_until(due);
    if wait.is_negative() || wait.is_zero() {
        return start_attempt(status, cache, attempt + 1);
    }
    let wait = Duration::try_from(wait).unwrap_or_default();
    // An absolute time keeps the message, and so the status, the same on every reconcile.
    let message = format!(
        "attempt {attempt} failed: {message}; attempt {} starts at {}",
        attempt + 1,
        due.round(k8s_openapi::jiff::Unit::Second).unwrap_or(due)
    );
    set_ready(&mut status, false, reason::COPY_FAILED, message, generation);
    record(status, Some(wait))
}

/// The data mover's report, if it belongs to `attempt`.
fn report_of(status: &TemplateCacheStatus, attempt: u32) -> Option<&Progress> {
    status
        .progress
        .as_ref()
        .filter(|p| p.attempt == Some(attempt))
}

fn set_ready(
    status: &mut TemplateCacheStatus,
    ready: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) {
    set_condition(
        &mut status.conditions,
        condition(READY, ready, reason, message, generation),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures;
    use serde_json::json;

    fn cache(status: serde_json::Value) -> TemplateCache {
        fixtures::cache("img", status)
    }

    fn store() -> StagingStore {
        fixtures::store("s", "1Gi")
    }

    /// What a reconcile sees of `cache` in `store` with one reference, no Jobs and no refusal;
    /// each test changes what it is about.
    fn observed<'a>(cache: &'a TemplateCache, store: Option<&'a StagingStore>) -> Observed<'a> {
        Observed {
            cache,
            references: 1,
            store_name: "s",
            store,
            job: JobState::Missing,
            removal: JobState::Missing,
            source_refusal: None,
            namespace_refusal: None,
            now: Timestamp::now(),
        }
    }

    fn plan_for(cache: &TemplateCache, job: JobState, store: Option<&StagingStore>) -> Plan {
        let observed = Observed {
            references: 2,
            job,
            ..observed(cache, store)
        };
        plan(&observed, &RetryPolicy::default())
    }

    #[test]
    fn a_new_cache_starts_attempt_one() {
        let p = plan_for(&cache(json!(null)), JobState::Missing, Some(&store()));
        assert_eq!(p.step, Step::StartAttempt(1));
        assert_eq!(p.status.phase, Some(Phase::Copying));
        assert_eq!(p.status.job_name.as_deref(), Some("img-copy-1"));
        assert_eq!(p.status.ref_count, Some(2));
    }

    #[test]
    fn a_missing_store_waits_with_a_clear_condition() {
        let p = plan_for(&cache(json!(null)), JobState::Missing, None);
        assert_eq!(p.step, Step::Record);
        assert_eq!(p.status.conditions[0].reason, reason::STORE_NOT_FOUND);
    }

    #[test]
    fn a_missing_job_of_the_current_attempt_is_recreated_not_a_new_attempt() {
        let c = cache(json!({"attempt": 2, "phase": "Copying"}));
        assert_eq!(
            plan_for(&c, JobState::Missing, Some(&store())).step,
            Step::EnsureJob(2)
        );
    }

    #[test]
    fn a_succeeded_job_with_its_report_makes_the_cache_ready() {
        let sum = format!("sha256:{}", "a".repeat(64));
        let c = cache(json!({"attempt": 1, "phase": "Copying",
            "progress": {"attempt": 1, "bytesCopied": 10, "checksum": sum}}));
        let p = plan_for(&c, JobState::Succeeded, Some(&store()));
        assert_eq!(p.status.phase, Some(Phase::Ready));
        assert_eq!(p.status.size, Some(10));
        assert_eq!(p.status.checksum.as_deref(), Some(&*sum));
    }

    #[test]
    fn a_report_of_an_older_attempt_does_not_count() {
        let sum = format!("sha256:{}", "a".repeat(64));
        let c = cache(json!({"attempt": 2, "phase": "Copying",
            "progress": {"attempt": 1, "bytesCopied": 10, "checksum": sum}}));
        let p = plan_for(&c, JobState::Succeeded, Some(&store()));
        assert_ne!(p.status.phase, Some(Phase::Ready));
    }

    #[test]
    fn a_failed_attempt_waits_out_its_backoff_then_starts_the_next() {
        let c = cache(json!({"attempt": 1, "phase": "Copying"}));
        let just_now = JobState::Failed {
            message: "503".into(),
            at: Some(Timestamp::now()),
        };
        let p = plan_for(&c, just_now, Some(&store()));
        assert_eq!(p.step, Step::Record);
        assert_eq!(p.status.phase, Some(Phase::Failed));
        assert!(p.requeue_after.is_some());
        let long_ago = JobState::Failed {
            message: "503".into(),
            at: Some(Timestamp::UNIX_EPOCH),
        };
        assert_eq!(
            plan_for(&c, long_ago, Some(&store())).step,
            Step::StartAttempt(2)
        );
    }

    #[test]
    fn the_first_resolved_digest_is_kept_for_the_next_attempts_and_never_replaced() {
        let first = format!("sha256:{}", "1".repeat(64));
        let c = cache(json!({"attempt": 1, "phase": "Copying",
            "progress": {"attempt": 1, "bytesCopied": 0, "resolvedDigest": first}}));
        let failed = JobState::Failed {
            message: "503".into(),
            at: Some(Timestamp::UNIX_EPOCH),
        };
        let next = plan_for(&c, failed.clone(), Some(&store()));
        assert_eq!(next.step, Step::StartAttempt(2));
        assert_eq!(next.status.progress, None, "the report is cleared");
        assert_eq!(next.status.resolved_digest.as_deref(), Some(&*first));

        let other = format!("sha256:{}", "2".repeat(64));
        let c = cache(
            json!({"attempt": 2, "phase": "Copying", "resolvedDigest": first,
            "progress": {"attempt": 2, "bytesCopied": 0, "resolvedDigest": other}}),
        );
        let p = plan_for(&c, failed, Some(&store()));
        assert_eq!(p.status.resolved_digest.as_deref(), Some(&*first));
    }

    #[test]
    fn the_last_failed_attempt_is_final() {
        let c = cache(json!({"attempt": 5, "phase": "Copying"}));
        let failed = JobState::Failed {
            message: "404 Not Found".into(),
            at: Some(Timestamp::UNIX_EPOCH),
        };
        let p = plan_for(&c, failed, Some(&store()));
        assert_eq!(p.step, Step::Record);
        let ready = &p.status.conditions[0];
        assert_eq!(ready.reason, reason::RETRIES_EXHAUSTED);
        assert!(ready.message.contains("404 Not Found"));
    }

    #[test]
    fn a_final_failure_stays_when_its_job_is_deleted_after_its_ttl() {
        let c = cache(json!({"attempt": 5, "phase": "Copying"}));
        let failed = JobState::Failed {
            message: "Job was active longer than specified deadline".into(),
            at: Some(Timestamp::UNIX_EPOCH),
        };
        let after_failure = plan_for(&c, failed, Some(&store())).status;
        let c = cache(serde_json::to_value(&after_failure).expect("status"));
        let p = plan_for(&c, JobState::Missing, Some(&store()));
        assert_eq!(p.step, Step::Record, "the last attempt does not run again");
        assert_eq!(p.status.phase, Some(Phase::Failed));
        let ready =
            templatecache_api::conditions::find(&p.status.conditions, READY).expect("Ready");
        assert_eq!(ready.reason, reason::RETRIES_EXHAUSTED);
        assert!(ready.message.contains("longer than specified deadline"));
    }

    #[test]
    fn a_copy_refused_room_is_pending_with_the_stores_reason() {
        let c = cache(json!({"attempt": 1, "phase": "Copying",
            "storage": {"attempt": 1, "admitted": false, "message": "no room"}}));
        let p = plan_for(&c, JobState::Running, Some(&store()));
        assert_eq!(p.status.phase, Some(Phase::Pending));
        assert_eq!(p.status.conditions[0].reason, reason::STORE_FULL);
        let stale = cache(json!({"attempt": 2, "phase": "Copying",
            "storage": {"attempt": 1, "admitted": false, "message": "no room"}}));
        let p = plan_for(&stale, JobState::Running, Some(&store()));
        assert_eq!(p.status.phase, Some(Phase::Copying));
    }

    #[test]
    fn a_copy_refused_by_the_stores_tenancy_rules_carries_their_reason() {
        let c = cache(json!({"attempt": 1, "phase": "Copying",
            "storage": {"attempt": 1, "admitted": false, "message": "over quota",
                        "reason": reason::QUOTA_EXCEEDED}}));
        let p = plan_for(&c, JobState::Running, Some(&store()));
        assert_eq!(p.status.phase, Some(Phase::Pending));
        assert_eq!(p.status.conditions[0].reason, reason::QUOTA_EXCEEDED);
        assert_eq!(p.status.conditions[0].message, "over quota");
    }

    #[test]
    fn an_evicted_cache_is_copied_again_only_after_its_data_is_removed() {
        let s = store();
        let plan_with = |c: &TemplateCache, removal| {
            let o = Observed {
                job: JobState::Succeeded,
                removal,
                ..observed(c, Some(&s))
            };
            plan(&o, &RetryPolicy::default())
        };
        let evicted = cache(json!({"attempt": 3, "phase": "Evicted", "size": 10}));
        assert_eq!(
            plan_with(&evicted, JobState::Missing).step,
            Step::RemoveData(1)
        );
        let removing = cache(json!({"attempt": 3, "phase": "Evicted", "size": 10,
            "removal": {"attempt": 1, "jobName": "img-remove-1", "jobNamespace": "ns",
                        "jobUid": "u"}}));
        let running = plan_with(&removing, JobState::Running);
        assert_eq!(running.step, Step::Record);
        assert_eq!(running.status.phase, Some(Phase::Evicted));
        let forged = plan_with(&removing, JobState::NotOurs("forged".into()));
        assert_eq!(
            forged.step,
            Step::RemoveData(2),
            "a Job not recorded is never the removal"
        );
        let removed = plan_with(&removing, JobState::Succeeded);
        assert_eq!(removed.step, Step::StartAttempt(4));
        assert_eq!(removed.status.size, None);
        let next = removed.status.removal.expect("the record stays");
        assert_eq!(
            (next.attempt, next.job_name),
            (1, None),
            "tries count on, the try is over"
        );
    }

    #[test]
    fn an_unreferenced_evicted_cache_stays_evicted() {
        let c = cache(json!({"attempt": 1, "phase": "Evicted"}));
        let s = store();
        let unreferenced = Observed {
            references: 0,
            job: JobState::Succeeded,
            removal: JobState::Succeeded,
            ..observed(&c, Some(&s))
        };
        let p = plan(&unreferenced, &RetryPolicy::default());
        assert_eq!(p.step, Step::Record);
        assert_eq!(p.status.phase, Some(Phase::Evicted));
        assert_eq!(p.status.conditions[0].reason, reason::EVICTED);
    }

    #[test]
    fn a_source_is_refused_only_outside_a_non_empty_allowlist() {
        let c = cache(json!(null));
        assert_eq!(source_refusal(&c, &[]), None);
        assert_eq!(source_refusal(&c, &["http://example/".into()]), None);
        let refusal = source_refusal(&c, &["https://mirror/".into()]).expect("refused");
        assert!(refusal.contains("http://example/x"), "{refusal}");
        assert!(refusal.contains("https://mirror/"), "{refusal}");
    }

    #[test]
    fn a_source_outside_the_allowlist_fails_for_good_without_a_job() {
        let c = cache(json!(null));
        let s = store();
        let refused = Observed {
            source_refusal: Some("not allowed".into()),
            ..observed(&c, Some(&s))
        };
        let p = plan(&refused, &RetryPolicy::default());
        assert_eq!(p.step, Step::Record);
        assert_eq!(p.status.phase, Some(Phase::Failed));
        assert_eq!(p.status.conditions[0].reason, reason::SOURCE_NOT_ALLOWED);
    }

    #[test]
    fn a_new_cache_in_a_namespace_the_store_does_not_admit_waits_without_a_job() {
        let c = cache(json!(null));
        let s = store();
        let refused = Observed {
            namespace_refusal: Some("not admitted".into()),
            ..observed(&c, Some(&s))
        };
        let p = plan(&refused, &RetryPolicy::default());
        assert_eq!(p.step, Step::Record);
        assert_eq!(p.status.phase, Some(Phase::Pending));
        assert_eq!(p.status.conditions[0].reason, reason::STORE_NOT_ALLOWED);
        assert!(
            p.requeue_after.is_some(),
            "looked at again, for a label added later"
        );
    }

    #[test]
    fn a_refused_source_address_fails_for_good_with_its_reason() {
        let refusal = "source address 169.254.169.254:80 is link-local; the operator's \
                       --allow-internal-address does not name it";
        let c = cache(
            json!({"attempt": 1, "phase": "Copying", "jobName": "img-copy-1",
            "progress": {"attempt": 1, "bytesCopied": 0, "error": refusal,
                         "finalReason": "AddressNotAllowed"}}),
        );
        let failed = JobState::Failed {
            message: "BackoffLimitExceeded".into(),
            at: None,
        };
        let p = plan_for(&c, failed.clone(), Some(&store()));
        assert_eq!(p.step, Step::Record, "no further attempt");
        assert_eq!(p.requeue_after, None);
        assert_eq!(p.status.phase, Some(Phase::Failed));
        let ready =
            templatecache_api::conditions::find(&p.status.conditions, READY).expect("Ready");
        assert_eq!(ready.reason, reason::ADDRESS_NOT_ALLOWED);
        assert_eq!(ready.message, refusal);

        // A reason the operator does not know is an ordinary failure, retried.
        let c = cache(
            json!({"attempt": 1, "phase": "Copying", "jobName": "img-copy-1",
            "progress": {"attempt": 1, "bytesCopied": 0, "error": "x", "finalReason": "Whatever"}}),
        );
        let p = plan_for(&c, failed, Some(&store()));
        let ready =
            templatecache_api::conditions::find(&p.status.conditions, READY).expect("Ready");
        assert_eq!(ready.reason, reason::COPY_FAILED);
    }

    #[test]
    fn a_job_of_the_attempt_made_by_someone_else_is_never_trusted_nor_uses_an_attempt() {
        let c = cache(
            json!({"attempt": 1, "phase": "Copying", "jobName": "img-copy-1",
            "progress": {"attempt": 1, "bytesCopied": 5, "totalBytes": 5,
                         "checksum": format!("sha256:{}", "0".repeat(64))}}),
        );
        let squatted = JobState::NotOurs("Job img-copy-1 was not created".into());
        let p = plan_for(&c, squatted, Some(&store()));
        assert_eq!(p.step, Step::Record, "no new attempt, no Job");
        assert_eq!(p.status.phase, Some(Phase::Failed));
        assert_eq!(p.status.attempt, Some(1));
        assert_eq!(p.status.job_name, None, "no Pod of it is the current Job's");
        let ready =
            templatecache_api::conditions::find(&p.status.conditions, READY).expect("Ready");
        assert_eq!(ready.reason, reason::JOB_NOT_OURS);
        assert!(ready.message.contains("img-copy-1"));
        assert!(
            p.requeue_after.is_some(),
            "looks again for the squatter's removal"
        );

        // Once it is gone, the operator makes its own Job for the same attempt.
        let after = cache(json!({"attempt": 1, "phase": "Failed"}));
        let p = plan_for(&after, JobState::Missing, Some(&store()));
        assert_eq!(p.step, Step::EnsureJob(1));
        assert_eq!(p.status.job_name.as_deref(), Some("img-copy-1"));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay_after(1), Duration::from_secs(10));
        assert_eq!(policy.delay_after(3), Duration::from_secs(40));
        assert_eq!(policy.delay_after(30), Duration::from_secs(600));
    }
}
