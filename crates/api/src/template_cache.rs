//! `TemplateCache`: one staged copy of one template in one StagingStore (the contract: README,
//! "How it works").
//!
//! The validation here is enforced by the API server (OpenAPI schema plus CEL rules), so a bad
//! spec is refused at `kubectl apply` time with a message that names the field, and the operator
//! never has to handle it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a TemplateCache: where the template comes from and where it is staged.
// The category `templatecaching` (`kubectl get templatecaching` lists all three kinds) is not
// `templatecache`: kubectl resolves a category before a singular name, so that category made
// `kubectl get templatecache NAME` fail with "you must specify only one resource".
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "templatecache.io",
    version = "v1alpha1",
    kind = "TemplateCache",
    namespaced,
    status = "TemplateCacheStatus",
    shortname = "tc",
    category = "templatecaching",
    doc = "A staged copy of a large template (VM image, dataset), copied exactly once and shared by reference.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Refs", type_ = "integer", json_path = ".status.refCount"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress.percent", description = "Percent of the template copied"),
    printcolumn(name = "Store", type_ = "string", json_path = ".status.store"),
    printcolumn(name = "Attempt", type_ = "integer", json_path = ".status.attempt", priority = 1),
    printcolumn(name = "Size", type_ = "integer", json_path = ".status.size", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 52").message("metadata.name must be at most 52 characters, so that the copy Job name <name>-copy-<attempt> stays a valid label value")
)]
// Both rules sit on the spec, not on the fields: CEL skips a field's transition rule when the
// field is absent on either side, so a rule on an optional field could not refuse adding or
// removing it. A checksum added later is refused rather than re-verified: the bytes were staged
// unchecked, and a user who wants a checked copy makes a new cache.
#[x_kube(validation = Rule::new("has(self.checksum) == has(oldSelf.checksum) && (!has(self.checksum) || self.checksum == oldSelf.checksum)").message("spec.checksum is immutable: it cannot be added, changed or removed after creation (make a new cache to check the bytes)").field_path(".checksum"))]
#[x_kube(validation = Rule::new("has(self.storeRef) == has(oldSelf.storeRef) && (!has(self.storeRef) || self.storeRef == oldSelf.storeRef)").message("spec.storeRef is immutable: it cannot be added, changed or removed after creation (the data stays in the store it was copied to)").field_path(".storeRef"))]
#[serde(rename_all = "camelCase")]
pub struct TemplateCacheSpec {
    /// Where the template is copied from. Immutable: a different source is a different cache.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.source is immutable"))]
    pub source: TemplateSource,

    /// Expected digest of the template, `sha256:<64 lowercase hex>`. When set, a copy whose digest
    /// differs fails and never becomes Ready. Immutable: it cannot be added, changed or removed
    /// after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub checksum: Option<String>,

    /// The StagingStore that holds the copy; the operator's default store when unset.
    /// Immutable: it cannot be added, changed or removed after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_ref: Option<StoreRef>,
}

/// Exactly one of `http`, `s3` or `oci`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("[has(self.http), has(self.s3), has(self.oci)].filter(set, set).size() == 1").message("exactly one of spec.source.http, spec.source.s3 or spec.source.oci must be set"))]
#[serde(rename_all = "camelCase")]
pub struct TemplateSource {
    /// Copy from an http(s) URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// Copy from an object in an S3-compatible store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Source>,
    /// Copy a file from an OCI registry: a layer of an ORAS artifact or the disk of a KubeVirt
    /// containerDisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciSource>,
}

/// A template served over http(s).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// The template's URL; only `http://` and `https://` are accepted, without credentials in
    /// it (put them in the Secret of `secretRef`).
    #[schemars(
        length(min = 8, max = 2048),
        regex(pattern = r"^https?://[^\s/?#@]+([/?#][^\s]*)?$")
    )]
    pub url: String,
    /// Secret with `username` and `password` (basic auth) or `token` (bearer), in the cache's
    /// namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

/// A template stored as an object in an S3-compatible bucket.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Source {
    /// Bucket name, as S3 names buckets.
    #[schemars(
        length(min = 3, max = 63),
        regex(pattern = r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
    )]
    pub bucket: String,
    /// Object key. Must not be empty.
    #[schemars(length(min = 1, max = 1024))]
    pub key: String,
    /// Endpoint of an S3-compatible service, `http(s)://host[:port]`; AWS when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s/?#@]+/?$"))]
    pub endpoint: Option<String>,
    /// Region; `us-east-1` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$"))]
    pub region: Option<String>,
    /// How the bucket is addressed: `Path` (`endpoint/bucket/key`, the default, what MinIO and
    /// most on-premise stores expect) or `VirtualHost` (`bucket.endpoint/key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addressing_style: Option<AddressingStyle>,
    /// Secret with `accessKeyId` and `secretAccessKey`, in the cache's namespace. Anonymous
    /// access when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

/// A template in an OCI registry: an ORAS artifact (one layer per file, named by its
/// `org.opencontainers.image.title` annotation) or a KubeVirt containerDisk (an image whose tar
/// layer holds `disk/<file>`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OciSource {
    /// `registry/repository:tag` or `registry/repository@sha256:<64 hex>` (or both), with the
    /// registry host always written out (no implicit Docker Hub) and no scheme. A tag is
    /// resolved to a digest once, on the first attempt, and every later attempt pulls that
    /// digest (`status.resolvedDigest`).
    #[schemars(
        length(min = 3, max = 1024),
        regex(
            pattern = r"^((localhost|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+)(:[0-9]{1,5})?|[A-Za-z0-9-]+:[0-9]{1,5})(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)+(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[0-9a-f]{64})?$"
        )
    )]
    #[x_kube(validation = Rule::new("!self.contains('://')").message("spec.source.oci.reference is registry/repository:tag, without a scheme such as oci://"))]
    #[x_kube(validation = Rule::new("self.contains('@sha256:') || self.matches(':[A-Za-z0-9_][A-Za-z0-9_.-]*$')").message("spec.source.oci.reference needs a tag (registry/repository:tag) or a digest (registry/repository@sha256:...): an implicit latest would change under the cache"))]
    pub reference: String,
    /// The file to stage: the ORAS layer whose `org.opencontainers.image.title` is this name, or
    /// the file of this name under `disk/` in a containerDisk. When unset the artifact must hold
    /// exactly one candidate; otherwise the copy fails and lists them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 255),
        regex(pattern = r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]*$")
    )]
    pub file: Option<String>,
    /// A `kubernetes.io/dockerconfigjson` Secret (an image pull secret) in the cache's namespace;
    /// anonymous pulls when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

impl OciSource {
    /// `registry/repository`, without tag or digest.
    pub fn repository(&self) -> &str {
        let without_digest = self.reference.split('@').next().unwrap_or_default();
        let last_slash = without_digest.rfind('/').unwrap_or(0);
        match without_digest[last_slash..].find(':') {
            Some(colon) => &without_digest[..last_slash + colon],
            None => without_digest,
        }
    }
}

impl TemplateCacheSpec {
    /// The StagingStore the cache lives in: its `storeRef`, else `default` (the operator's).
    pub fn store_name<'a>(&'a self, default: &'a str) -> &'a str {
        self.store_ref.as_ref().map_or(default, |s| s.name.as_str())
    }
}

impl TemplateSource {
    /// Where the template is, as one string to match against the operator's source allowlist:
    /// the URL for http, `<endpoint>/<bucket>/<key>` for S3 with an endpoint, and
    /// `s3://<bucket>/<key>` for AWS itself, `oci://<registry>/<repository>` for OCI (tags and
    /// digests are versions of one repository, so the allowlist names repositories).
    pub fn location(&self) -> String {
        if let Some(oci) = &self.oci {
            return format!("oci://{}", oci.repository());
        }
        match (&self.http, &self.s3) {
            (Some(http), _) => http.url.clone(),
            (None, Some(s3)) => match &s3.endpoint {
                Some(endpoint) => format!(
                    "{}/{}/{}",
                    endpoint.trim_end_matches('/'),
                    s3.bucket,
                    s3.key
                ),
                None => format!("s3://{}/{}", s3.bucket, s3.key),
            },
            (None, None) => String::new(),
        }
    }
}

/// How an S3 bucket is addressed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AddressingStyle {
    /// `endpoint/bucket/key`.
    #[default]
    Path,
    /// `bucket.endpoint/key`.
    VirtualHost,
}

/// A Secret in the cache's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A StagingStore, by name (StagingStores are cluster-scoped).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StoreRef {
    /// The StagingStore's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Where a cache is in its life. The phase is derived from the copy Job and the data each
/// reconcile; it is a summary for people, the conditions carry the detail.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Phase {
    /// Waiting for a copy to start.
    #[default]
    Pending,
    /// A copy Job is running.
    Copying,
    /// The copy is complete and verified; consumers may read it.
    Ready,
    /// The last attempt failed and no retry is left (or one is waiting out its backoff).
    Failed,
    /// The data was evicted to free space; a new reference copies it again.
    Evicted,
    /// The cache is being deleted and waits for its last reference to go.
    Deleting,
}

/// Copy progress and outcome, as reported by the data mover of one attempt. The data mover owns
/// this field; the controller reads it to record the result of a finished attempt.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// The attempt this report belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Bytes written to the staging store and hashed in order from the start: the settled part
    /// of the copy.
    pub bytes_copied: u64,
    /// Bytes written to the staging store in any order: `bytesCopied` plus the parts of a
    /// parallel download that landed ahead of it. At least `bytesCopied`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_landed: Option<u64>,
    /// Bytes this attempt took over from the partial file of an earlier attempt that was cut
    /// off (same source, same version): hashed again from the store, not fetched again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_resumed: Option<u64>,
    /// Size of the template, when the source announced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// `bytesCopied / totalBytes` as a whole percentage, e.g. `42%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<String>,
    /// Digest of the finished copy, `sha256:<hex>`; set once the copy is complete and in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// One-line reason the copy failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For an OCI source given by tag: the manifest digest (`sha256:<hex>`) the tag named when
    /// this attempt resolved it. The controller keeps it in `status.resolvedDigest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_digest: Option<String>,
    /// Set when the failure is one any further attempt would meet again (`AddressNotAllowed`):
    /// the cache is then Failed for good with this reason, and not retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_reason: Option<String>,
}

/// The values of [`Progress::final_reason`] the operator acts on; any other is ignored and the
/// attempt is retried as usual.
pub mod final_reason {
    /// The source is at an internal address (loopback, link-local, private, ...) that the
    /// operator's `--allow-internal-address` does not name, or redirects to one.
    pub const ADDRESS_NOT_ALLOWED: &str = "AddressNotAllowed";
}

/// Whether a copy may take room in its store. The data mover asks (it reports the template's
/// size in `progress.totalBytes` before writing) and waits; the StagingStore controller, which
/// alone sees every cache of the store, grants the room or says why it cannot. So two copies can
/// never both count on the same free bytes, and a store is never filled past its capacity.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StorageAdmission {
    /// The attempt this answer belongs to.
    pub attempt: u32,
    /// True once the room is reserved; the copy may start.
    pub admitted: bool,
    /// Bytes reserved (or asked for, when not admitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Why the room cannot be granted yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The refusal's reason (`StoreFull`, `StoreNotAllowed`, `QuotaExceeded`), which becomes
    /// the reason of the cache's Ready condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The removal of a cache's data: which Job does it, so that only that Job is trusted, and how
/// many tries it took. Each try is a new Job under a new name, so a failed or squatted name is
/// never waited on.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Removal {
    /// Tries so far, the first included; it only grows, over every removal of the cache.
    pub attempt: u32,
    /// The remove Job of the current try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// Its namespace: the cache's, or the operator's when the cache's namespace is being
    /// deleted (no new object can be made there then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_namespace: Option<String>,
    /// Its uid as the operator created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_uid: Option<String>,
    /// Why the last try failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Observed state of a TemplateCache.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TemplateCacheStatus {
    /// Summary of where the cache is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Number of references (reference finalizers) the cache holds. Never negative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_count: Option<u32>,
    /// Name of the copy Job of the current attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// Uid of that Job as the operator created it. Only this Job is trusted as the copy: a Job
    /// under the same name with another uid (whatever its ownerReferences say, which any
    /// namespace user can write) is not the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_uid: Option<String>,
    /// Current copy attempt, from 1. Written by a JSON patch that first tests the attempt the
    /// writer saw, so exactly one reconciler starts each attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The StagingStore that holds the copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Where the finished copy lives inside the store: `<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Size of the finished copy in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Digest the copy actually had, `sha256:<hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Progress of the running copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// For an OCI source given by tag: the manifest digest the first attempt resolved the tag to.
    /// Every later attempt pulls this digest, so a tag moved meanwhile never changes (or splices)
    /// what is staged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_digest: Option<String>,
    /// Room for the current attempt's copy in the store, granted or refused by the StagingStore
    /// controller; the data mover writes nothing before it is granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageAdmission>,
    /// The removal of the cache's data (after an eviction, or when the cache is deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal: Option<Removal>,
    /// Last time the set of references changed while it was not empty; drives LRU eviction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_referenced: Option<Time>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions in Kubernetes' conventions; `Ready` is the one to wait on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
