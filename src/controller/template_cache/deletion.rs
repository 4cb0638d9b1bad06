//! What a deleted cache does next: a pure decision from what the reconciler read, like
//! [`super::lifecycle::plan`], so the path that deletes data is table-tested as the rest.
//!
//! The order is the safety: references first (a cache in use is never emptied), then the copy
//! (stopped before its data goes, so nothing is written after the removal), then the data
//! (removed by a Job of the operator's), and only then the cleanup finalizer. A Job the cache
//! does not control is never trusted as the removal.

use crate::controller::jobs::JobState;

/// What the reconciler saw of a deleted cache.
#[derive(Debug)]
pub struct Seen {
    /// The cleanup finalizer is still on the cache: its data may still be in the store.
    pub holds_cleanup: bool,
    pub references: u32,
    /// The last attempt (0 when no copy ever started).
    pub attempt: u32,
    /// The cache's store still exists (with it gone, so is its data).
    pub store_exists: bool,
    /// The copy Job of `attempt`.
    pub copy: JobState,
    /// The remove Job of `attempt`.
    pub removal: JobState,
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
    /// The copy still runs: stop it first, so it cannot write after the data is removed.
    StopCopy,
    /// Start the remove Job.
    StartRemoval,
    /// The remove Job runs.
    WaitForRemoval,
    /// The data is gone: let the cache go.
    Release,
    /// The removal failed (or a Job that is not the operator's stands under its name).
    RemovalFailed(String),
}

pub fn plan(seen: &Seen) -> Deletion {
    if !seen.holds_cleanup {
        return Deletion::Done;
    }
    if seen.references > 0 {
        return Deletion::WaitForReferences;
    }
    if seen.attempt == 0 || !seen.store_exists {
        return Deletion::ReleaseWithoutRemoval;
    }
    // Only its own Job is stopped: one someone else made under the name is not ours to delete.
    if seen.copy == JobState::Running {
        return Deletion::StopCopy;
    }
    match &seen.removal {
        JobState::Missing => Deletion::StartRemoval,
        JobState::Running => Deletion::WaitForRemoval,
        JobState::Succeeded => Deletion::Release,
        JobState::Failed { message, .. } | JobState::NotOurs(message) => {
            Deletion::RemovalFailed(message.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen() -> Seen {
        Seen {
            holds_cleanup: true,
            references: 0,
            attempt: 2,
            store_exists: true,
            copy: JobState::Succeeded,
            removal: JobState::Missing,
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
                "someone else's copy Job",
                Seen {
                    copy: JobState::NotOurs("x".into()),
                    ..seen()
                },
                Deletion::StartRemoval,
            ),
            (
                "copy failed",
                Seen {
                    copy: failed("boom"),
                    ..seen()
                },
                Deletion::StartRemoval,
            ),
            ("no removal yet", seen(), Deletion::StartRemoval),
            (
                "removal running",
                Seen {
                    removal: JobState::Running,
                    ..seen()
                },
                Deletion::WaitForRemoval,
            ),
            (
                "removal done",
                Seen {
                    removal: JobState::Succeeded,
                    ..seen()
                },
                Deletion::Release,
            ),
            (
                "removal failed",
                Seen {
                    removal: failed("disk"),
                    ..seen()
                },
                Deletion::RemovalFailed("disk".into()),
            ),
            (
                "someone else's remove Job",
                Seen {
                    removal: JobState::NotOurs("forged".into()),
                    ..seen()
                },
                Deletion::RemovalFailed("forged".into()),
            ),
        ];
        for (case, seen, expected) in cases {
            assert_eq!(plan(&seen), expected, "{case}");
        }
    }
}
