//! `TemplateCacheClaim`: what a consumer creates to use a cache (the contract: README, "How it
//! works"), the Kubernetes claim pattern of PersistentVolumeClaims and ResourceClaims.
//!
//! A consumer writes only its own small claim; the operator records the claim's reference on the
//! shared cache together with every other new reference in one write (group commit), so a
//! thousand consumers cost a thousand independent creates, not a thousand writes to one object.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::TemplateCacheSpec;

/// Desired state of a TemplateCacheClaim: the cache it uses, and how to create that cache when
/// it does not exist yet.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "templatecache.io",
    version = "v1alpha1",
    kind = "TemplateCacheClaim",
    namespaced,
    status = "TemplateCacheClaimStatus",
    shortname = "tcc",
    category = "templatecaching",
    selectable = ".spec.cacheName",
    doc = "A consumer's claim on a TemplateCache in its namespace: the operator records its reference on the cache and mirrors the cache's readiness. Delete the claim to release the reference.",
    printcolumn(name = "Cache", type_ = "string", json_path = ".spec.cacheName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.cacheName == oldSelf.cacheName").message("spec.cacheName is immutable").field_path(".cacheName"))]
#[x_kube(validation = Rule::new("has(self.template) == has(oldSelf.template) && (!has(self.template) || self.template == oldSelf.template)").message("spec.template is immutable").field_path(".template"))]
#[serde(rename_all = "camelCase")]
pub struct TemplateCacheClaimSpec {
    /// Name of the TemplateCache, in the claim's namespace. Immutable.
    #[schemars(
        length(min = 1, max = 52),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub cache_name: String,
    /// The TemplateCache spec to create the cache with when it does not exist yet. When the
    /// cache exists with a different spec, the claim fails with `TemplateMismatch` and holds no
    /// reference. Without a template the claim waits for the cache to exist. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateCacheSpec>,
}

/// Where a claim is: the cache's readiness as seen through the claim's reference.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClaimPhase {
    /// The reference is not on the cache yet (the cache does not exist, is being deleted, or the
    /// operator has not recorded it yet).
    #[default]
    Pending,
    /// The reference is on the cache; the cache is not Ready yet.
    Bound,
    /// The reference is on the cache and the cache is Ready: its data may be read.
    Ready,
    /// The cache failed for good, or the claim's template differs from the cache's spec
    /// (`TemplateMismatch`). A claim past the cache's reference limit stays Pending.
    Failed,
}

/// The claimed cache's data, once Ready: what a consumer needs to read it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClaimedCache {
    /// The StagingStore that holds the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Where the data lives inside the store: `<namespace>/<cache name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Size of the data in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Digest of the data, `sha256:<hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// Observed state of a TemplateCacheClaim, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TemplateCacheClaimStatus {
    /// Summary of the claim; the conditions carry the detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ClaimPhase>,
    /// The cache's data, once the claim is Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<ClaimedCache>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Bound` (the reference is on the cache) and `Ready` (the cache is Ready); wait on `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
