//! What a deleted cache does next: a pure decision from what the reconciler read, like
//! [`super::lifecycle::plan`], so the path that deletes data is table-tested as the rest.
//!
//! The order is the safety: references first (a cache in use is never emptied), then the copy
//! (stopped before its data goes, so nothing is written after the removal), then the data
//! (removed by a Job of the operator's), and only then the cleanup finalizer. A Job the cache
//! does not control is never trusted as the removal.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::removal::{self, Next};
use crate::controller::jobs::JobState;
use crate::controller::retry::RetryPolicy;
use templatecache_api::Removal;

/// What the reconciler saw of a deleted cache.
#[derive(Debug)]
pub struct Seen {
    /// The cleanup finalizer is still on the cache: its data may still be in the store.
    pub holds_cleanup: bool,
    pub references: u32,
    /// The last copy attempt (0 when no copy ever started).
    pub attempt: u32,
    /// The cache's store still exists (with it gone, so is its data).
    pub store_exists: bool,
    /// The copy Job of `attempt` (the recorded one; another's Job is not ours to stop).
    pub copy: JobState,
    /// A Pod of that Job still exists (a deleted Job's Pods outlive it while they terminate; a
    /// failed Job keeps its Pods until it is deleted).
    pub copy_pods_running: bool,
    /// `status.removal`, and the state of its Job.
    pub removal_record: Option<Removal>,
    pub removal: JobState,
    pub now: Timestamp,
}

/// The one thing to do now.
#[derive(Debug, PartialEq)]
pub enum Deletion {
    /// The cleanup finalizer is gone already: nothing to do.
    Done,
    /// References remain: the cache stays, `Deleting`, until they are released.
    WaitForReferences,
    /// Nothing was ever copied, or the store is gone with its data: let the cache go.
    ReleaseWithoutRemoval,
    /// The copy still runs, or failed with its Pods kept: delete its Job first, so nothing of
    /// it can write after the data is removed.
    StopCopy,
    /// The copy Job is gone but a Pod of it still runs: wait until none can write.
    WaitForCopyPods,
    /// Start removal try `n`.
    StartRemoval(u32),
    /// Make the Job of the recorded try (recorded, never made).
    CreateRemoval,
    /// The remove Job runs, or a failed try's backoff does.
    WaitForRemoval(Option<Duration>),
    /// The data is gone: let the cache go.
    Release,
}

pub fn plan(seen: &Seen, policy: &RetryPolicy) -> Deletion {
    if !seen.holds_cleanup {
        return Deletion::Done;
    }
    if seen.references > 0 {
        return Deletion::WaitForReferences;
    }
    if seen.attempt == 0 || !seen.store_exists {
        return Deletion::ReleaseWithoutRemoval;
    }
    if seen.copy == JobState::Running {
        return Deletion::StopCopy;
    }
    // A failed Job keeps its Pods (stopped, kept for their logs) until the Job goes: deleting
    // it lets the garbage collector take them, or the removal would wait for the Job's TTL.
    if matches!(seen.copy, JobState::Failed { .. }) && seen.copy_pods_running {
        return Deletion::StopCopy;
    }
    if seen.copy_pods_running {
        return Deletion::WaitForCopyPods;
    }
    match removal::next(
        seen.removal_record.as_ref(),
        &seen.removal,
        seen.now,
        policy,
    ) {
        Next::Start(attempt) => Deletion::StartRemoval(attempt),
        Next::Create => Deletion::CreateRemoval,
        Next::Wait(after) => Deletion::WaitForRemoval(after),
        Next::Done => Deletion::Release,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(uid: Option<&str>) -> Option<Removal> {
        Some(Removal {
            attempt: 1,
            job_name: Some("img-remove-1".into()),
            job_namespace: Some("ns".into()),
            job_uid: uid.map(str::to_owned),
            message: None,
        })
    }

    fn seen() -> Seen {
        Seen {
            holds_cleanup: true,
            references: 0,
            attempt: 2,
            store_exists: true,
            copy: JobState::Succeeded,
            copy_pods_running: false,
            removal_record: None,
            removal: JobState::Missing,
            now: Timestamp::from_second(1_800_000_000).expect("time"),
        }
    }

    fn failed(message: &str) -> JobState {
        JobState::Failed {
            message: message.to_owned(),
            at: None,
        }
    }

    #[test]
    fn a_deleted_cache_goes_references_then_copy_then_data_then_finalizer() {
        let cases = [
            (
                "released already",
                Seen {
                    holds_cleanup: false,
                    references: 3,
                    ..seen()
                },
                Deletion::Done,
            ),
            (
                "still referenced",
                Seen {
                    references: 1,
                    copy: JobState::Running,
                    ..seen()
                },
                Deletion::WaitForReferences,
            ),
            (
                "never copied",
                Seen {
                    attempt: 0,
                    ..seen()
                },
                Deletion::ReleaseWithoutRemoval,
            ),
            (
                "store gone",
                Seen {
                    store_exists: false,
                    copy: JobState::Running,
                    ..seen()
                },
                Deletion::ReleaseWithoutRemoval,
            ),
            (
                "copy running",
                Seen {
                    copy: JobState::Running,
                    removal: JobState::Succeeded,
                    ..seen()
                },
                Deletion::StopCopy,
            ),
            (
                "copy Job gone, its Pod not yet",
                Seen {
                    copy: JobState::Missing,
                    copy_pods_running: true,
                    ..seen()
                },
                Deletion::WaitForCopyPods,
            ),
            (
                "someone else's copy Job",
                Seen {
                    copy: JobState::NotOurs("x".into()),
                    ..seen()
                },
                Deletion::StartRemoval(1),
            ),
            (
                "copy failed",
                Seen {
                    copy: failed("boom"),
                    ..seen()
                },
                Deletion::StartRemoval(1),
            ),
            (
                "copy failed, its Pod kept by the Job",
                Seen {
                    copy: failed("boom"),
                    copy_pods_running: true,
                    ..seen()
                },
                Deletion::StopCopy,
            ),
            ("no removal yet", seen(), Deletion::StartRemoval(1)),
            (
                "recorded, never made",
                Seen {
                    removal_record: recorded(None),
                    ..seen()
                },
                Deletion::CreateRemoval,
            ),
            (
                "removal running",
                Seen {
                    removal_record: recorded(Some("u")),
                    removal: JobState::Running,
                    ..seen()
                },
                Deletion::WaitForRemoval(None),
            ),
            (
                "removal done",
                Seen {
                    removal_record: recorded(Some("u")),
                    removal: JobState::Succeeded,
                    ..seen()
                },
                Deletion::Release,
            ),
            (
                "removal failed long ago: the next try",
                Seen {
                    removal_record: recorded(Some("u")),
                    removal: failed("disk"),
                    ..seen()
                },
                Deletion::StartRemoval(2),
            ),
            (
                "a forged remove Job, complete, is not the removal",
                Seen {
                    removal_record: recorded(None),
                    removal: JobState::NotOurs("forged".into()),
                    ..seen()
                },
                Deletion::StartRemoval(2),
            ),
        ];
        for (case, seen, expected) in cases {
            assert_eq!(plan(&seen, &RetryPolicy::default()), expected, "{case}");
        }
    }
}
