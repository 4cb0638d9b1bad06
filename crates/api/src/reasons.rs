//! Reasons of the Ready conditions: part of the contract, since users, alerts and scripts match
//! on them (`kubectl get tc -o jsonpath=...`), so they live with the API types. Each names a
//! state a user can act on.

/// Reasons of a TemplateCache's Ready condition.
pub mod cache {
    pub const COPYING: &str = "Copying";
    pub const COPIED: &str = "Copied";
    pub const COPY_FAILED: &str = "CopyFailed";
    pub const RETRIES_EXHAUSTED: &str = "RetriesExhausted";
    pub const STORE_NOT_FOUND: &str = "StoreNotFound";
    pub const DELETING: &str = "Deleting";
    pub const STORE_FULL: &str = "StoreFull";
    pub const EVICTED: &str = "Evicted";
    pub const EVICTION_FAILED: &str = "EvictionFailed";
    /// A deleted cache's remove Job failed; the removal is tried again under a new Job.
    pub const REMOVE_FAILED: &str = "RemoveFailed";
    pub const SOURCE_NOT_ALLOWED: &str = "SourceNotAllowed";
    pub const STORE_NOT_ALLOWED: &str = "StoreNotAllowed";
    pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";
    pub const JOB_NOT_OURS: &str = "JobNotOurs";
    pub const ADDRESS_NOT_ALLOWED: &str = crate::final_reason::ADDRESS_NOT_ALLOWED;

    /// The reasons of a Failed cache that no further attempt changes: the operator will not
    /// copy it again, so a claim on it has failed too. (A cache is also Failed between
    /// attempts, with `CopyFailed`, and while a foreign Job holds its name, with `JobNotOurs`.)
    pub const FINAL: [&str; 3] = [RETRIES_EXHAUSTED, SOURCE_NOT_ALLOWED, ADDRESS_NOT_ALLOWED];

    /// The message of [`EVICTED`] from the eviction until the data is removed: the store
    /// controller writes it when it evicts, the cache controller while its remove Job runs.
    pub fn evicted_removing(store: &str) -> String {
        format!("evicted from StagingStore {store} to free space; removing the data")
    }
}

/// Reasons of a TemplateCacheClaim's Ready condition.
pub mod claim {
    pub const CACHE_NOT_FOUND: &str = "CacheNotFound";
    pub const CREATING_CACHE: &str = "CreatingCache";
    pub const BINDING: &str = "Binding";
    pub const BOUND: &str = "Bound";
    pub const CACHE_DELETING: &str = "CacheDeleting";
    pub const TEMPLATE_MISMATCH: &str = "TemplateMismatch";
    pub const REFERENCE_LIMIT: &str = "ReferenceLimit";
    pub const CACHE_READY: &str = "CacheReady";
}
