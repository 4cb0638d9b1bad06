//! The one error type of the reconcilers.

/// Errors of a reconcile; each is retried by the controller with a short backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("the TemplateCache has no namespace")]
    MissingNamespace,
    #[error("TemplateCache {0} changed while it was being reconciled; reconciling it again")]
    Conflict(String),
    #[error("the API server refused the change to {0}")]
    Refused(String),
    #[error("cannot build a manifest: {0}")]
    Manifest(#[from] serde_json::Error),
    #[error("Job {0} failed to remove the cached data: {1}")]
    CleanupFailed(String, String),
    #[error("StagingStore {0}: capacity {1} is not a whole number of bytes")]
    InvalidCapacity(String, String),
    #[error("StagingStore {0}: namespaceQuota {1} is not a whole number of bytes")]
    InvalidQuota(String, String),
}
