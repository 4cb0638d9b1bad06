//! The operator's settings, with each default in one place: `templatecache run`'s flags take
//! their defaults from here.

use std::time::Duration;

use super::jobs::{JobLimits, JobSettings};
use super::retry::RetryPolicy;

/// Settings of `templatecache run`.
#[derive(Clone, Debug)]
pub struct Config {
    /// Reconcile only this namespace; all namespaces when unset.
    pub namespace: Option<String>,
    /// StagingStore of caches that name none.
    pub default_store: String,
    /// The operator's own namespace: where a remove Job runs when the cache's namespace is
    /// being deleted (no new object can be made there).
    pub operator_namespace: String,
    /// How copy, remove and populate Jobs run.
    pub jobs: JobSettings,
    /// Populate Jobs run as UID 0 (with no capability) instead of 65532: for volumes whose
    /// ownership Kubernetes does not hand to the Pod's fsGroup (hostPath, the in-tree host-path
    /// provisioner, some local-volume provisioners make root-owned folders; raw block devices).
    pub populate_as_root: bool,
    /// How failed copies are retried.
    pub retry: RetryPolicy,
    /// Caches reconciled at once.
    pub concurrency: u16,
    /// Claims reconciled (and so claim statuses written) at once.
    pub claim_concurrency: u16,
    /// Most references one cache takes; consumers past it wait, with a condition that says so.
    /// Bounded by etcd's object size limit (see the README's "Limits").
    pub max_references: usize,
    /// How often a cache holding Pod references is checked for Pods that are gone, in case a
    /// deletion event was missed.
    pub reference_sweep: Duration,
    /// Name of this replica in Events (the Pod name in a cluster).
    pub instance: Option<String>,
    /// Prefixes a source location must start with (see `TemplateSource::location`); empty
    /// allows every source. Keeps namespace users from making the cluster fetch from addresses
    /// they should not reach.
    pub source_allowlist: Vec<String>,
}

impl Config {
    /// The StagingStore of caches that name none, unless told otherwise.
    pub const DEFAULT_STORE: &str = "default";
    /// The operator's namespace unless told otherwise (the chart tells it its own).
    pub const DEFAULT_OPERATOR_NAMESPACE: &str = "default";
    /// The image of the Jobs unless told otherwise: this build's release image.
    pub const DEFAULT_JOB_IMAGE: &str = concat!(
        "ghcr.io/templatecache/templatecache:",
        env!("CARGO_PKG_VERSION")
    );
    pub const DEFAULT_CONCURRENCY: u16 = 16;
    pub const DEFAULT_CLAIM_CONCURRENCY: u16 = 32;
    pub const DEFAULT_REFERENCE_SWEEP_SECONDS: u64 = 60;
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: None,
            default_store: Self::DEFAULT_STORE.to_owned(),
            operator_namespace: Self::DEFAULT_OPERATOR_NAMESPACE.to_owned(),
            jobs: JobSettings {
                image: Self::DEFAULT_JOB_IMAGE.to_owned(),
                service_account: None,
                copy: templatecache_mover::Tuning::default(),
                oci_plain_http_registries: vec![],
                allow_internal_addresses: vec![],
                limits: JobLimits::default(),
            },
            populate_as_root: false,
            retry: RetryPolicy::default(),
            concurrency: Self::DEFAULT_CONCURRENCY,
            claim_concurrency: Self::DEFAULT_CLAIM_CONCURRENCY,
            max_references: DEFAULT_MAX_REFERENCES,
            reference_sweep: Duration::from_secs(Self::DEFAULT_REFERENCE_SWEEP_SECONDS),
            instance: None,
            source_allowlist: vec![],
        }
    }
}

/// The default of [`Config::max_references`]: a cache with this many claim references still
/// weighs well under etcd's 1.5 MiB object limit (see the README's "Limits").
pub const DEFAULT_MAX_REFERENCES: usize = 5_000;
