//! The removal of a cache's data, after an eviction or a deletion, as a pure decision: which
//! try comes next and when. Shared by [`super::lifecycle`] (evicted) and [`super::deletion`].
//!
//! Each try is a Job under a new name (`<cache>-remove-<try>`), recorded in `status.removal`
//! before it is made and trusted only under the uid recorded after: a failed Job is retried
//! under the next name after a backoff, and a Job someone else made under the name is never
//! waited on or believed; the next try simply takes the next name.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::controller::jobs::JobState;
use crate::controller::retry::RetryPolicy;
use templatecache_api::Removal;

/// What the removal needs now.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Start try `n`: record it, make its Job, record the Job's uid.
    Start(u32),
    /// The recorded try's Job was never made (a crash between recording and creating it).
    Create,
    /// Its Job runs, or a failed try's backoff runs (look again after it).
    Wait(Option<Duration>),
    /// The data is gone.
    Done,
}

/// The next step of the removal recorded in `record`, whose Job is in `job` state. A record
/// without a Job name is a finished removal of the past (its tries still count, so names are
/// never reused).
pub fn next(
    record: Option<&Removal>,
    job: &JobState,
    now: Timestamp,
    policy: &RetryPolicy,
) -> Next {
    let tries = record.map_or(0, |r| r.attempt);
    let Some(record) = record.filter(|r| r.job_name.is_some()) else {
        return Next::Start(tries + 1);
    };
    match job {
        JobState::Missing if record.job_uid.is_none() => Next::Create,
        // Deleted before its outcome was seen (its namespace went, say), or another's Job
        // under the name: either way this try tells nothing, the next one will.
        JobState::Missing | JobState::NotOurs(_) => Next::Start(tries + 1),
        JobState::Running => Next::Wait(None),
        JobState::Succeeded => Next::Done,
        JobState::Failed { at, .. } => {
            let backoff = policy.delay_after(tries);
            let waited = at.map_or(backoff, |at| elapsed_since(at, now));
            match backoff.checked_sub(waited) {
                Some(left) if !left.is_zero() => Next::Wait(Some(left)),
                _ => Next::Start(tries + 1),
            }
        }
    }
}

/// Why the last try failed, for the cache's condition, when it did.
pub fn failure(job: &JobState) -> Option<&str> {
    match job {
        JobState::Failed { message, .. } | JobState::NotOurs(message) => Some(message),
        _ => None,
    }
}

fn elapsed_since(at: Timestamp, now: Timestamp) -> Duration {
    let nanos = now
        .as_nanosecond()
        .saturating_sub(at.as_nanosecond())
        .max(0);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(attempt: u32, uid: Option<&str>) -> Removal {
        Removal {
            attempt,
            job_name: Some(format!("img-remove-{attempt}")),
            job_namespace: Some("ns".into()),
            job_uid: uid.map(str::to_owned),
            message: None,
        }
    }

    fn failed(seconds_ago: i64) -> JobState {
        JobState::Failed {
            message: "evicted".into(),
            at: Some(now() - jiff_seconds(seconds_ago)),
        }
    }

    fn jiff_seconds(seconds: i64) -> k8s_openapi::jiff::SignedDuration {
        k8s_openapi::jiff::SignedDuration::from_secs(seconds)
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("time")
    }

    #[test]
    fn every_try_is_a_new_name_and_only_the_recorded_job_counts() {
        let policy = RetryPolicy::default(); // 10 s, doubling
        let past = Removal {
            job_name: None,
            ..recorded(3, Some("u"))
        };
        let cases = [
            ("first removal", None, JobState::Missing, Next::Start(1)),
            (
                "a past removal's tries still count",
                Some(past),
                JobState::Missing,
                Next::Start(4),
            ),
            (
                "recorded, never made",
                Some(recorded(1, None)),
                JobState::Missing,
                Next::Create,
            ),
            (
                "made, then gone",
                Some(recorded(1, Some("u"))),
                JobState::Missing,
                Next::Start(2),
            ),
            (
                "someone else's Job",
                Some(recorded(2, None)),
                JobState::NotOurs("x".into()),
                Next::Start(3),
            ),
            (
                "running",
                Some(recorded(1, Some("u"))),
                JobState::Running,
                Next::Wait(None),
            ),
            (
                "done",
                Some(recorded(1, Some("u"))),
                JobState::Succeeded,
                Next::Done,
            ),
            (
                "failed 4 s ago, 10 s backoff",
                Some(recorded(1, Some("u"))),
                failed(4),
                Next::Wait(Some(Duration::from_secs(6))),
            ),
            (
                "failed 11 s ago",
                Some(recorded(1, Some("u"))),
                failed(11),
                Next::Start(2),
            ),
            (
                "second failure waits 20 s",
                Some(recorded(2, Some("u"))),
                failed(11),
                Next::Wait(Some(Duration::from_secs(9))),
            ),
        ];
        for (case, record, job, expected) in cases {
            assert_eq!(
                next(record.as_ref(), &job, now(), &policy),
                expected,
                "{case}"
            );
        }
    }
}
