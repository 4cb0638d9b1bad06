//! Every label, annotation, finalizer, gate and field-manager name the operator uses, in one
//! place, so a name is never spelled twice.

/// The API group of the custom resources.
pub const GROUP: &str = "templatecache.io";

/// The operator's own finalizer: holds a cache until its last reference is gone and its data is
/// removed.
pub const CLEANUP_FINALIZER: &str = "templatecache.io/cleanup";

/// Prefix of a reference held by a library or kubectl consumer: `ref.templatecache.io/<id>`.
pub const CONSUMER_REF_PREFIX: &str = "ref.templatecache.io/";

/// Prefix of a reference held by the operator for a Pod: `pod.ref.templatecache.io/<pod-uid>`.
pub const POD_REF_PREFIX: &str = "pod.ref.templatecache.io/";

/// Prefix of a reference held by the operator for a TemplateCacheClaim:
/// `claim.ref.templatecache.io/<claim-uid>`.
pub const CLAIM_REF_PREFIX: &str = "claim.ref.templatecache.io/";

/// Prefix of a reference held by the operator for a PersistentVolumeClaim being filled from the
/// cache (its `dataSourceRef` names the cache): `pvc.ref.templatecache.io/<pvc-uid>`.
pub const PVC_REF_PREFIX: &str = "pvc.ref.templatecache.io/";

/// Annotation on a volume the populator filled: `<namespace>/<cache>@sha256:<hex>`.
pub const POPULATED_FROM_ANNOTATION: &str = "templatecache.io/populated-from";

/// Label on a prime claim and its populate Job: the UID of the user's claim they fill.
pub const POPULATE_FOR_LABEL: &str = "templatecache.io/populate-for";

/// Annotation on a prime claim and its populate Job: `<namespace>/<name>` of the user's claim.
pub const POPULATE_FOR_ANNOTATION: &str = "templatecache.io/populate-for";

/// The annotation the scheduler puts on a claim of a `WaitForFirstConsumer` class once its
/// first Pod has a node; the prime claim carries the same so its volume is made there.
pub const SELECTED_NODE_ANNOTATION: &str = "volume.kubernetes.io/selected-node";

/// Label on a Pod that names the TemplateCache (in the Pod's namespace) it needs.
pub const POD_CACHE_LABEL: &str = "templatecache.io/cache";

/// Scheduling gate a Pod carries until its cache is Ready.
pub const READY_GATE: &str = "templatecache.io/ready";

/// Label on every copy Job: the cache it copies.
pub const JOB_CACHE_LABEL: &str = "templatecache.io/cache";

/// Label on every copy Job: the attempt number it runs.
pub const JOB_ATTEMPT_LABEL: &str = "templatecache.io/attempt";

/// Label on every operator Job: the namespace of its cache (a remove Job may run in the
/// operator's namespace when the cache's is being deleted).
pub const JOB_CACHE_NAMESPACE_LABEL: &str = "templatecache.io/cache-namespace";

/// Label on the operator's Jobs saying what they do: `copy` or `remove`.
pub const JOB_OPERATION_LABEL: &str = "templatecache.io/operation";

/// Label on every Job the operator creates (and, through its template, the Job's Pods).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "templatecache";

/// Field manager of the operator's creates (Jobs, caches made from a claim's template), and
/// the reporting controller of its Events.
pub const OPERATOR_MANAGER: &str = "templatecache-operator";

/// Field manager of the data mover's progress reports.
pub const COPY_MANAGER: &str = "templatecache-copy";

/// Longest consumer id the contract allows in `ref.templatecache.io/<id>`.
pub const MAX_CONSUMER_ID_LEN: usize = 63;

/// Longest TemplateCache name: `<name>-copy-<attempt>` must stay a valid 63-character label value
/// (the Job controller copies the Job name into a pod label), leaving room for a 5-digit attempt;
/// `<name>-remove-<attempt>` has room for a 3-digit one.
pub const MAX_CACHE_NAME_LEN: usize = 52;
