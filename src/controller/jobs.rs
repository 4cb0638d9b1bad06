//! The Jobs the operator runs: `<cache>-copy-<attempt>` (the data mover),
//! `<cache>-remove-<attempt>` (removes a copy's data from its store) and `populate-<claim uid>`
//! (fills a volume from a cache, in the operator's namespace).
//!
//! Names are deterministic so a second create for the same attempt can only ever meet the first
//! Job: there is no way to have two copy Jobs for one attempt. Jobs are owned by their cache, run
//! once (`backoffLimit: 0`, retries are new attempts decided by the controller), and meet the
//! `restricted` Pod Security Standard.
//!
//! A Job mounts only its namespace's folder of the store (`subPath: <namespace>`), so a mover
//! that is misled (a planted link, a hostile source) can reach no other tenant's data: the
//! `--dest` it is given is a path inside that folder.

use std::path::{Path, PathBuf};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::Resource;
use serde_json::{Value, json};

use super::retry::RetryPolicy;
use templatecache_api::names::{
    JOB_ATTEMPT_LABEL, JOB_CACHE_LABEL, JOB_CACHE_NAMESPACE_LABEL, JOB_OPERATION_LABEL, MANAGED_BY,
    MANAGED_BY_LABEL, POPULATE_FOR_ANNOTATION, POPULATE_FOR_LABEL,
};
use templatecache_api::{
    AddressingStyle, OciSource, StagingStore, StoreVolume, TemplateCache, TemplateSource,
};
use templatecache_mover::address::AllowedInternal;
use templatecache_mover::{CopyArgs, PopulateArgs, RemoveArgs, VolumeMode, env};

/// Where copy and remove Jobs mount the store.
pub const STORE_MOUNT: &str = "/store";

/// How the operator's Jobs run: image and identity.
#[derive(Clone, Debug)]
pub struct JobSettings {
    /// Image that contains the `templatecache` binary.
    pub image: String,
    /// ServiceAccount of the Jobs' pods; the namespace's default when unset.
    pub service_account: Option<String>,
    /// Streams and part size of copy Jobs (`templatecache copy --streams --part-size`).
    pub copy: templatecache_mover::Tuning,
    /// OCI registries (`host:port`, or `host` for all its ports) served over plain HTTP, like
    /// containerd's and CDI's insecure registries: their copy Jobs get `--oci-plain-http`. TLS
    /// for every other one.
    pub oci_plain_http_registries: Vec<String>,
    /// Internal destinations copy Jobs may read from (`templatecache copy
    /// --allow-internal-address`); every other non-global address is refused by the mover.
    pub allow_internal_addresses: Vec<AllowedInternal>,
    /// How long Jobs may run and stay.
    pub limits: JobLimits,
}

/// Deadlines of the operator's Jobs: no Job holds its cache (and the room reserved for it)
/// forever, and finished Jobs do not pile up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobLimits {
    /// Seconds a copy's source may send nothing (`templatecache copy --stall-seconds`).
    pub stall_seconds: u64,
    /// The slowest copy worth waiting for: a copy Job's `activeDeadlineSeconds` is the
    /// template's size at this rate, plus [`JobLimits::ALLOWANCE_SECONDS`].
    pub min_bytes_per_second: u64,
    /// `ttlSecondsAfterFinished` of every Job.
    pub ttl_seconds_after_finished: i32,
}

impl JobLimits {
    pub const DEFAULT_MIN_BYTES_PER_SECOND: u64 = 1 << 20;
    /// An hour: long enough to read a failed Job's Pod, and longer than the longest wait
    /// between attempts (the retry policy's 10 minutes), so the operator always sees how an
    /// attempt ended.
    pub const DEFAULT_TTL_SECONDS: i32 = 3600;
    /// Time a copy Job gets on top of its bytes: image pull, waiting for room, re-hashing a
    /// resumed prefix, the final sync.
    pub const ALLOWANCE_SECONDS: u64 = 600;
    /// A copy Job's deadline when the template's size is not known yet (the first attempt):
    /// a day, 84 GiB at the default floor rate.
    pub const UNKNOWN_SIZE_SECONDS: u64 = 24 * 3600;

    /// `activeDeadlineSeconds` of a copy of `size` bytes, if known.
    pub fn copy_deadline(&self, size: Option<u64>) -> i64 {
        let seconds = match size {
            Some(bytes) => {
                let rate = self.min_bytes_per_second.max(1);
                Self::ALLOWANCE_SECONDS.saturating_add(bytes.div_ceil(rate))
            }
            None => Self::UNKNOWN_SIZE_SECONDS,
        };
        i64::try_from(seconds).unwrap_or(i64::MAX)
    }
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            stall_seconds: templatecache_mover::DEFAULT_STALL_SECONDS,
            min_bytes_per_second: Self::DEFAULT_MIN_BYTES_PER_SECOND,
            ttl_seconds_after_finished: Self::DEFAULT_TTL_SECONDS,
        }
    }
}

/// What a Job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Copy,
    Remove,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Copy => "copy",
            Operation::Remove => "remove",
        }
    }
}

/// `<cache>-copy-<attempt>` or `<cache>-remove-<attempt>`.
pub fn job_name(cache: &str, operation: Operation, attempt: u32) -> String {
    format!("{cache}-{}-{attempt}", operation.as_str())
}

/// `<namespace>/<name>`: where a cache's copy lives inside its store.
pub fn data_path(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The outcome of a Job, read from its conditions the way `kubectl wait` does.
#[derive(Clone, Debug, PartialEq)]
pub enum JobState {
    Missing,
    Running,
    Succeeded,
    Failed {
        message: String,
        at: Option<k8s_openapi::jiff::Timestamp>,
    },
    /// A Job has the name but it is not the one the operator created and recorded: someone
    /// else made it (the name is predictable, and ownerReferences are anyone's to write). Its
    /// state means nothing for the cache, and its Pods are never the copy's; the sentence says
    /// whose it is and what to do.
    NotOurs(String),
}

impl JobState {
    /// The state of the Job under the name if it is the one whose uid the operator recorded
    /// when it created it, else [`JobState::NotOurs`]: a tenant can make a Job of that name
    /// whose controller ownerReference carries the cache's uid, but not one with the uid the
    /// API server gave the operator's.
    pub fn of_recorded(job: Option<&Job>, recorded: Option<&str>, cache: &TemplateCache) -> Self {
        match job {
            Some(job) if recorded.is_none() || job.metadata.uid.as_deref() != recorded => {
                JobState::NotOurs(not_ours(job, cache))
            }
            other => Self::of(other),
        }
    }

    /// The Job's own outcome, whoever made it; the controller judges its Jobs with
    /// [`JobState::of_recorded`].
    pub fn of(job: Option<&Job>) -> Self {
        let Some(job) = job else {
            return JobState::Missing;
        };
        let conditions = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default();
        let is_true = |type_: &str| {
            conditions
                .iter()
                .find(|c| c.type_ == type_ && c.status == "True")
        };
        if is_true("Complete").is_some() {
            return JobState::Succeeded;
        }
        match is_true("Failed") {
            Some(c) => JobState::Failed {
                message: c
                    .message
                    .clone()
                    .or_else(|| c.reason.clone())
                    .unwrap_or_else(|| "the Job failed".to_owned()),
                at: c.last_transition_time.as_ref().map(|t| t.0),
            },
            None => JobState::Running,
        }
    }
}

/// Whether the cache is the Job's controller: true of the operator's Jobs, but also of any Job
/// a namespace user writes so, so never a reason to trust one (see [`JobState::of_recorded`]).
pub fn is_controlled_by(job: &Job, cache: &TemplateCache) -> bool {
    let uid = cache.metadata.uid.as_deref();
    let owners = job.metadata.owner_references.as_deref().unwrap_or_default();
    uid.is_some()
        && owners
            .iter()
            .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}

fn not_ours(job: &Job, cache: &TemplateCache) -> String {
    let name = job.metadata.name.as_deref().unwrap_or_default();
    let owners = job.metadata.owner_references.as_deref().unwrap_or_default();
    let controller = owners.iter().find(|o| o.controller == Some(true));
    let whose = match controller {
        Some(o) => format!("its controller is {} {} (uid {})", o.kind, o.name, o.uid),
        None => "it has no controller".to_owned(),
    };
    let uid = job.metadata.uid.as_deref().unwrap_or_default();
    format!(
        "Job {name} (uid {uid}) is not the Job the operator created and recorded for \
         TemplateCache {} ({whose}); a Job made by someone else is never taken for this \
         cache's copy or removal or trusted for its status. Delete that Job and the operator \
         creates its own under this name",
        cache.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The copy Job of `attempt`: its arguments are the mover's own [`CopyArgs`], rendered.
pub fn copy_job(
    cache: &TemplateCache,
    store: &StagingStore,
    attempt: u32,
    settings: &JobSettings,
    retry: &RetryPolicy,
) -> Result<Job, serde_json::Error> {
    let args = copy_args(cache, attempt, settings, retry).to_command_line();
    let env = credential_env(&cache.spec.source);
    let mut job = build_job(cache, store, Operation::Copy, attempt, args, env, settings)?;
    if let Some(spec) = job.spec.as_mut() {
        // A Job past its deadline is Failed (reason DeadlineExceeded): the attempt fails and
        // the next one resumes what was verified.
        spec.active_deadline_seconds = Some(settings.limits.copy_deadline(template_size(cache)));
    }
    Ok(job)
}

/// The template's size, when an earlier attempt learnt it: the size of the staged copy, or the
/// total the mover reported.
fn template_size(cache: &TemplateCache) -> Option<u64> {
    let status = cache.status.as_ref()?;
    status
        .size
        .or_else(|| status.progress.as_ref()?.total_bytes)
}

/// What the mover of `attempt` is told: the source, where the copy goes, and how to run.
pub fn copy_args(
    cache: &TemplateCache,
    attempt: u32,
    settings: &JobSettings,
    retry: &RetryPolicy,
) -> CopyArgs {
    let source = &cache.spec.source;
    let s3 = source.s3.as_ref();
    let oci = source.oci.as_ref();
    CopyArgs {
        cache: Some(cache_key(cache)),
        attempt,
        // The last attempt keeps no partial file for a resume that will never come.
        final_attempt: retry.is_last(attempt),
        dest: dest_in_mount(cache),
        http_url: source.http.as_ref().map(|h| h.url.clone()),
        oci_reference: oci.map(|o| o.reference.clone()),
        oci_file: oci.and_then(|o| o.file.clone()),
        // Every retry pulls the digest the first attempt resolved the tag to.
        oci_digest: oci.and_then(|_| cache.status.as_ref()?.resolved_digest.clone()),
        oci_plain_http: oci.is_some_and(|o| served_over_plain_http(o, settings)),
        s3_bucket: s3.map(|s| s.bucket.clone()),
        s3_key: s3.map(|s| s.key.clone()),
        s3_endpoint: s3.and_then(|s| s.endpoint.clone()),
        s3_region: s3.and_then(|s| s.region.clone()),
        s3_virtual_host: s3
            .is_some_and(|s| s.addressing_style == Some(AddressingStyle::VirtualHost)),
        checksum: cache.spec.checksum.clone(),
        streams: settings.copy.streams,
        part_size: settings.copy.part_size,
        allow_internal_address: settings.allow_internal_addresses.clone(),
        stall_seconds: settings.limits.stall_seconds,
    }
}

/// Whether the operator lists the source's registry (`host:port`, or `host` for all its ports)
/// as served without TLS.
fn served_over_plain_http(oci: &OciSource, settings: &JobSettings) -> bool {
    let registry = oci.repository().split('/').next().unwrap_or_default();
    let host = registry.rsplit_once(':').map_or(registry, |(host, _)| host);
    settings
        .oci_plain_http_registries
        .iter()
        .any(|r| r == registry || r == host)
}

/// Where a remove Job runs and under which name.
#[derive(Clone, Debug, PartialEq)]
pub struct RemovalJob {
    pub name: String,
    pub namespace: String,
}

impl RemovalJob {
    /// Try `attempt` of the cache's removal: `<cache>-remove-<attempt>` in the cache's own
    /// namespace, or `remove-<cache uid>-<attempt>` in `operator_namespace` (given when the
    /// cache's namespace takes no new objects), where every namespace's caches share the names.
    pub fn new(cache: &TemplateCache, attempt: u32, operator_namespace: Option<&str>) -> Self {
        let cache_name = cache.metadata.name.as_deref().unwrap_or_default();
        let uid = cache.metadata.uid.as_deref().unwrap_or_default();
        let in_place = job_name(cache_name, Operation::Remove, attempt);
        match operator_namespace {
            // A Job's name is also a label value: 63 characters at most.
            None if in_place.len() <= 63 => RemovalJob {
                name: in_place,
                namespace: cache.metadata.namespace.clone().unwrap_or_default(),
            },
            elsewhere => RemovalJob {
                name: format!("remove-{uid}-{attempt}"),
                namespace: elsewhere
                    .map(str::to_owned)
                    .or_else(|| cache.metadata.namespace.clone())
                    .unwrap_or_default(),
            },
        }
    }
}

/// The Job that removes the cache's data (final file and any partial file of every attempt).
/// It mounts only the cache's namespace folder of the store, wherever it runs.
pub fn remove_job(
    cache: &TemplateCache,
    store: &StagingStore,
    job: &RemovalJob,
    attempt: u32,
    settings: &JobSettings,
) -> Result<Job, serde_json::Error> {
    let args = RemoveArgs {
        dest: dest_in_mount(cache),
    };
    let mut built = build_job(
        cache,
        store,
        Operation::Remove,
        attempt,
        args.to_command_line(),
        vec![],
        settings,
    )?;
    built.metadata.name = Some(job.name.clone());
    if built.metadata.namespace.as_deref() != Some(job.namespace.as_str()) {
        // An owner in another namespace is not allowed; the Job's labels name the cache.
        built.metadata.owner_references = None;
        built.metadata.namespace = Some(job.namespace.clone());
    }
    Ok(built)
}

/// Where the cache's copy lives as the Job sees the store: the mount is already its namespace's
/// folder, so the path is the cache name under it (`data_path` inside the whole store).
fn dest_in_mount(cache: &TemplateCache) -> PathBuf {
    let name = cache.metadata.name.as_deref().unwrap_or_default();
    Path::new(STORE_MOUNT).join(name)
}

fn cache_key(cache: &TemplateCache) -> String {
    data_path(
        cache.metadata.namespace.as_deref().unwrap_or_default(),
        cache.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Credentials reach the data mover only as environment variables from the Secret the spec
/// names (the mover's own table of variables and keys): never in arguments, logs or status.
fn credential_env(source: &TemplateSource) -> Vec<Value> {
    let secrets = [
        (
            source.http.as_ref().and_then(|h| h.secret_ref.as_ref()),
            &env::HTTP_SECRET_KEYS[..],
        ),
        (
            source.s3.as_ref().and_then(|s| s.secret_ref.as_ref()),
            &env::S3_SECRET_KEYS[..],
        ),
        (
            source.oci.as_ref().and_then(|o| o.secret_ref.as_ref()),
            &env::OCI_SECRET_KEYS[..],
        ),
    ];
    secrets
        .into_iter()
        .filter_map(|(secret, keys)| Some((secret?, keys)))
        .flat_map(|(secret, keys)| {
            keys.iter().map(|(var, key)| {
                json!({"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key, "optional": true}}})
            })
        })
        .collect()
}

/// Where a populate Job mounts (Filesystem) or finds (Block) the volume it fills.
pub const VOLUME_MOUNT: &str = "/volume";
pub const VOLUME_DEVICE: &str = "/dev/volume";

/// Tries the Job controller makes of a populate Job's Pod, with its own backoff, before the
/// Job fails.
const POPULATE_BACKOFF_LIMIT: i32 = 3;

/// The name of the populate Job of a user claim with `uid`.
pub fn populate_job_name(uid: &str) -> String {
    format!("populate-{uid}")
}

/// What a populate Job fills and from what.
pub struct Fill<'a> {
    /// The user's claim.
    pub claim: &'a PersistentVolumeClaim,
    /// Its prime claim, which the Job mounts.
    pub prime: &'a PersistentVolumeClaim,
    pub cache: &'a TemplateCache,
    pub store: &'a StagingStore,
    /// Run as UID 0 with no capability (see `Config::populate_as_root`).
    pub as_root: bool,
}

/// The populate Job of `fill`, in the prime claim's namespace (the operator's): it mounts the
/// cache's namespace folder of the store read-only and the prime claim's volume, and runs
/// `templatecache populate`. No ServiceAccount token: it reads and writes files only. Not owned
/// by the user's claim (owners never cross namespaces): labelled with its UID instead.
pub fn populate_job(fill: &Fill, settings: &JobSettings) -> Result<Job, serde_json::Error> {
    let uid = fill.claim.metadata.uid.clone().unwrap_or_default();
    let cache = fill.cache.metadata.name.clone().unwrap_or_default();
    let status = fill.cache.status.clone().unwrap_or_default();
    let block = fill
        .prime
        .spec
        .as_ref()
        .and_then(|s| s.volume_mode.as_deref())
        == Some("Block");
    let args = PopulateArgs {
        source: Path::new(STORE_MOUNT).join(&cache),
        volume: PathBuf::from(if block { VOLUME_DEVICE } else { VOLUME_MOUNT }),
        volume_mode: if block {
            VolumeMode::Block
        } else {
            VolumeMode::Filesystem
        },
        size: status.size.unwrap_or_default(),
        checksum: status.checksum.unwrap_or_default(),
    };
    let (volume_mounts, volume_devices) = if block {
        (
            vec![],
            vec![json!({"name": "volume", "devicePath": VOLUME_DEVICE})],
        )
    } else {
        (
            vec![json!({"name": "volume", "mountPath": VOLUME_MOUNT})],
            vec![],
        )
    };
    let mut mounts = vec![json!({
        "name": "store", "mountPath": STORE_MOUNT, "readOnly": true,
        "subPath": fill.cache.metadata.namespace,
    })];
    mounts.extend(volume_mounts);
    let user = if fill.as_root { 0 } else { 65532 };
    let labels = json!({
        MANAGED_BY_LABEL: MANAGED_BY,
        JOB_OPERATION_LABEL: "populate",
        POPULATE_FOR_LABEL: uid,
    });
    let annotations =
        json!({POPULATE_FOR_ANNOTATION: super::populator::plan::user_key(fill.claim)});
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": populate_job_name(&uid),
            "namespace": fill.prime.metadata.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "backoffLimit": POPULATE_BACKOFF_LIMIT,
            // A fill that would fail the same way again (the staged file is not the cache's,
            // the volume is too small) fails the Job at once.
            "podFailurePolicy": {"rules": [{
                "action": "FailJob",
                "onExitCodes": {"containerName": "populate", "operator": "In",
                                "values": [templatecache_mover::EXIT_FINAL]}
            }]},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "securityContext": {
                        "runAsNonRoot": !fill.as_root,
                        "runAsUser": user,
                        "runAsGroup": user,
                        "fsGroup": 65532,
                        "fsGroupChangePolicy": "OnRootMismatch",
                        "seccompProfile": {"type": "RuntimeDefault"}
                    },
                    "containers": [{
                        "name": "populate",
                        "image": settings.image,
                        "args": args.to_command_line(),
                        "volumeMounts": mounts,
                        "volumeDevices": volume_devices,
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "securityContext": container_security(),
                        "resources": mover_resources()
                    }],
                    "volumes": [
                        store_volume(&fill.store.spec.volume),
                        {"name": "volume", "persistentVolumeClaim":
                            {"claimName": fill.prime.metadata.name}}
                    ]
                }
            }
        }
    }))
}

/// The container settings of every operator Job: the `restricted` Pod Security Standard.
fn container_security() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]}
    })
}

/// What a mover container asks for: it streams, so it needs little memory whatever the size.
fn mover_resources() -> Value {
    json!({
        "requests": {"cpu": "100m", "memory": "64Mi"},
        "limits": {"memory": "128Mi"}
    })
}

/// The pod volume for a store.
pub fn store_volume(volume: &StoreVolume) -> Value {
    if let Some(nfs) = &volume.nfs {
        json!({"name": "store", "nfs": {"server": nfs.server, "path": nfs.path}})
    } else if let Some(host) = &volume.host_path {
        json!({"name": "store", "hostPath": {"path": host.path, "type": "DirectoryOrCreate"}})
    } else if let Some(pvc) = &volume.persistent_volume_claim {
        json!({"name": "store", "persistentVolumeClaim": {"claimName": pvc.claim_name}})
    } else {
        json!({"name": "store", "emptyDir": {}})
    }
}

fn build_job(
    cache: &TemplateCache,
    store: &StagingStore,
    operation: Operation,
    attempt: u32,
    args: Vec<String>,
    env: Vec<Value>,
    settings: &JobSettings,
) -> Result<Job, serde_json::Error> {
    let name = cache.metadata.name.as_deref().unwrap_or_default();
    let pod_labels = json!({
        MANAGED_BY_LABEL: MANAGED_BY,
        JOB_ATTEMPT_LABEL: attempt.to_string(),
        JOB_OPERATION_LABEL: operation.as_str(),
    });
    // The cache label only on the Job: it is also the label a consumer Pod carries, so on the
    // Job's own Pods it would make the copy (or remove) Pod a reference to its cache.
    let mut labels = pod_labels.clone();
    labels[JOB_CACHE_LABEL] = json!(name);
    labels[JOB_CACHE_NAMESPACE_LABEL] = json!(cache.metadata.namespace);
    let owner = cache.controller_owner_ref(&());
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name, operation, attempt),
            "namespace": cache.metadata.namespace,
            "labels": labels,
            "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
        },
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": settings.limits.ttl_seconds_after_finished,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": settings.service_account,
                    "automountServiceAccountToken": operation == Operation::Copy,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "fsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"}
                    },
                    "containers": [{
                        "name": operation.as_str(),
                        "image": settings.image,
                        "args": args,
                        "env": env,
                        "volumeMounts": [{
                            "name": "store",
                            "mountPath": STORE_MOUNT,
                            "subPath": cache.metadata.namespace,
                        }],
                        "securityContext": container_security(),
                        "resources": mover_resources()
                    }],
                    "volumes": [store_volume(&store.spec.volume)]
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures;
    use kube::ResourceExt;
    use templatecache_api::TemplateCacheSpec;

    fn job(operation: Operation) -> Job {
        let mut cache = fixtures::cache("img", Value::Null);
        cache.metadata.namespace = Some("team-a".into());
        let store = fixtures::store("s", "1Gi");
        let settings = JobSettings {
            image: "i".into(),
            service_account: None,
            copy: Default::default(),
            oci_plain_http_registries: vec![],
            allow_internal_addresses: vec![
                "10.96.0.0/12".parse().expect("network"),
                "127.0.0.1:9000".parse().expect("endpoint"),
            ],
            limits: JobLimits::default(),
        };
        match operation {
            Operation::Copy => copy_job(&cache, &store, 1, &settings, &RetryPolicy::default()),
            Operation::Remove => {
                let placement = RemovalJob::new(&cache, 1, None);
                remove_job(&cache, &store, &placement, 1, &settings)
            }
        }
        .expect("job")
    }

    #[test]
    fn only_the_last_attempts_copy_job_is_told_it_is_final() {
        let cache = fixtures::cache("img", serde_json::Value::Null);
        let store = fixtures::store("s", "1Gi");
        let retry = RetryPolicy {
            max_attempts: 2,
            ..RetryPolicy::default()
        };
        let settings = crate::controller::Config::default().jobs;
        let finals: Vec<bool> = [1, 2]
            .into_iter()
            .map(|attempt| {
                let job = copy_job(&cache, &store, attempt, &settings, &retry).expect("job");
                let pod = job.spec.expect("spec").template.spec.expect("pod");
                let args = pod.containers[0].args.clone().unwrap_or_default();
                args.contains(&"--final-attempt".to_owned())
            })
            .collect();
        assert_eq!(finals, [false, true]);
    }

    #[test]
    fn jobs_mount_only_their_namespaces_folder_and_write_inside_it() {
        for operation in [Operation::Copy, Operation::Remove] {
            let job = job(operation);
            let pod = job.spec.expect("spec").template.spec.expect("pod");
            let container = &pod.containers[0];
            let mount = &container.volume_mounts.as_ref().expect("mounts")[0];
            assert_eq!(mount.sub_path.as_deref(), Some("team-a"));
            let args = container.args.as_ref().expect("args");
            assert!(args.contains(&"--dest=/store/img".to_owned()), "{args:?}");
        }
    }

    #[test]
    fn an_oci_copy_job_gets_the_pinned_digest_its_pull_secret_and_plain_http_only_when_listed() {
        let spec: TemplateCacheSpec = serde_json::from_value(json!({"source": {"oci": {
            "reference": "127.0.0.1:5000/vms/a:1", "file": "disk.img", "secretRef": {"name": "pull"}}}}))
        .expect("spec");
        let mut cache = TemplateCache::new("img", spec);
        cache.metadata.namespace = Some("team-a".into());
        cache.status = Some(templatecache_api::TemplateCacheStatus {
            resolved_digest: Some(format!("sha256:{}", "d".repeat(64))),
            ..Default::default()
        });
        let store = fixtures::store("s", "1Gi");
        let container = |plain: &[&str]| {
            let settings = JobSettings {
                image: "i".into(),
                service_account: None,
                copy: Default::default(),
                oci_plain_http_registries: plain.iter().map(|r| r.to_string()).collect(),
                allow_internal_addresses: vec![],
                limits: JobLimits::default(),
            };
            let job = copy_job(&cache, &store, 2, &settings, &RetryPolicy::default()).expect("job");
            job.spec
                .expect("spec")
                .template
                .spec
                .expect("pod")
                .containers[0]
                .clone()
        };
        let args = container(&["127.0.0.1"]).args.expect("args");
        for expected in [
            "--oci-reference=127.0.0.1:5000/vms/a:1".to_owned(),
            "--oci-file=disk.img".to_owned(),
            format!("--oci-digest=sha256:{}", "d".repeat(64)),
            "--oci-plain-http".to_owned(),
        ] {
            assert!(args.contains(&expected), "{expected} in {args:?}");
        }
        assert!(
            container(&["127.0.0.1:5000"])
                .args
                .expect("args")
                .contains(&"--oci-plain-http".to_owned())
        );
        let tls = container(&["127.0.0.2", "127.0.0.1:5001"]);
        assert!(
            !tls.args
                .expect("args")
                .contains(&"--oci-plain-http".to_owned())
        );
        let env = tls.env.expect("env");
        let secret = env[0]
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .expect("secret ref");
        assert_eq!(env[0].name, templatecache_mover::env::OCI_DOCKER_CONFIG);
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("pull", ".dockerconfigjson")
        );
    }

    #[test]
    fn copy_jobs_carry_the_operators_internal_address_allowlist_and_remove_jobs_do_not() {
        let args = |operation| {
            let job = job(operation);
            let pod = job.spec.expect("spec").template.spec.expect("pod");
            pod.containers[0].args.clone().expect("args")
        };
        let copy = args(Operation::Copy);
        for expected in [
            "--allow-internal-address=10.96.0.0/12",
            "--allow-internal-address=127.0.0.1:9000",
        ] {
            assert!(copy.contains(&expected.to_owned()), "{copy:?}");
        }
        let remove = args(Operation::Remove);
        assert!(
            !remove.iter().any(|a| a.starts_with("--allow-internal")),
            "{remove:?}"
        );
    }

    #[test]
    fn only_the_job_whose_uid_the_operator_recorded_is_ours_whatever_its_owners_say() {
        let mut cache = fixtures::cache("img", Value::Null);
        cache.metadata.uid = Some("cache-uid".into());
        let complete = |uid: &str, owners: Value| -> Job {
            serde_json::from_value(json!({
                "metadata": {"name": "img-copy-2", "uid": uid, "ownerReferences": owners},
                "status": {"conditions": [{"type": "Complete", "status": "True"}]}
            }))
            .expect("job")
        };
        let owner = |uid: &str, controller: bool| {
            json!([{"apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCache",
                    "name": "img", "uid": uid, "controller": controller}])
        };
        let ours = complete("job-uid", owner("cache-uid", true));
        assert_eq!(
            JobState::of_recorded(Some(&ours), Some("job-uid"), &cache),
            JobState::Succeeded
        );
        // A tenant's Job under the name, "owned" by the cache as ownerReferences allow anyone
        // to write: not the recorded uid, not ours.
        let forged = complete("tenant-uid", owner("cache-uid", true));
        for (job, recorded, whose) in [
            (
                &forged,
                Some("job-uid"),
                "its controller is TemplateCache img (uid cache-uid)",
            ),
            (&forged, None, "(uid tenant-uid)"),
            (&ours, None, "(uid job-uid)"),
            (
                &complete("x", json!([])),
                Some("job-uid"),
                "it has no controller",
            ),
            (
                &complete("x", owner("other-uid", true)),
                Some("job-uid"),
                "(uid other-uid)",
            ),
        ] {
            match JobState::of_recorded(Some(job), recorded, &cache) {
                JobState::NotOurs(message) => {
                    assert!(message.contains("Job img-copy-2"), "{message}");
                    assert!(message.contains(whose), "{message}");
                }
                other => panic!("a Job not recorded must not count, got {other:?}"),
            }
        }
        assert_eq!(
            JobState::of_recorded(None, Some("job-uid"), &cache),
            JobState::Missing
        );
    }

    #[test]
    fn a_removal_runs_in_the_operators_namespace_under_a_name_no_other_cache_shares() {
        let mut cache = fixtures::cache("img", Value::Null);
        cache.metadata.uid = Some("0b5c".into());
        let store = fixtures::store("s", "1Gi");
        let settings = crate::controller::Config::default().jobs;
        let here = RemovalJob::new(&cache, 2, None);
        assert_eq!(
            (here.name.as_str(), here.namespace.as_str()),
            ("img-remove-2", "ns")
        );
        let elsewhere = RemovalJob::new(&cache, 2, Some("templatecache-system"));
        assert_eq!(
            (elsewhere.name.as_str(), elsewhere.namespace.as_str()),
            ("remove-0b5c-2", "templatecache-system")
        );
        let job = remove_job(&cache, &store, &elsewhere, 2, &settings).expect("job");
        assert_eq!(
            job.metadata.namespace.as_deref(),
            Some("templatecache-system")
        );
        assert_eq!(
            job.metadata.owner_references, None,
            "no owner across namespaces"
        );
        let spec = job.spec.and_then(|s| s.template.spec).expect("pod spec");
        let mount = &spec.containers[0].volume_mounts.as_ref().expect("mounts")[0];
        assert_eq!(
            mount.sub_path.as_deref(),
            Some("ns"),
            "only the cache's namespace folder"
        );
    }

    #[test]
    fn a_job_past_its_deadline_is_failed_with_the_deadline_named() {
        // As the Job controller leaves it: FailureTarget first, then Failed.
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": "img-copy-1"},
            "status": {"conditions": [
                {"type": "FailureTarget", "status": "True", "reason": "DeadlineExceeded",
                 "message": "Job was active longer than specified deadline"},
                {"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                 "message": "Job was active longer than specified deadline",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .expect("job");
        match JobState::of(Some(&job)) {
            JobState::Failed { message, at } => {
                assert_eq!(message, "Job was active longer than specified deadline");
                assert!(at.is_some());
            }
            other => panic!("a Job past its deadline is Failed, got {other:?}"),
        }
        // Only FailureTarget so far: its Pod is still being stopped.
        let stopping: Job = serde_json::from_value(json!({
            "status": {"conditions": [{"type": "FailureTarget", "status": "True",
                                       "reason": "DeadlineExceeded"}]}
        }))
        .expect("job");
        assert_eq!(JobState::of(Some(&stopping)), JobState::Running);
    }

    #[test]
    fn copy_jobs_get_a_deadline_from_the_template_size_and_every_job_a_ttl() {
        let limits = JobLimits::default();
        assert_eq!(limits.copy_deadline(None), 24 * 3600);
        assert_eq!(limits.copy_deadline(Some(10 << 30)), 600 + 10 * 1024);
        assert_eq!(limits.copy_deadline(Some(1)), 601);
        let slow = JobLimits {
            min_bytes_per_second: 0,
            ..JobLimits::default()
        };
        assert_eq!(slow.copy_deadline(Some(u64::MAX)), i64::MAX);

        let mut cache = fixtures::cache("img", Value::Null);
        cache.status = Some(
            serde_json::from_value(json!({"progress": {"attempt": 1, "bytesCopied": 0,
                                                       "totalBytes": 1u64 << 30}}))
            .expect("status"),
        );
        let store = fixtures::store("s", "1Gi");
        let settings = crate::controller::Config::default().jobs;
        let copy = copy_job(&cache, &store, 2, &settings, &RetryPolicy::default()).expect("job");
        let spec = copy.spec.expect("spec");
        assert_eq!(spec.active_deadline_seconds, Some(600 + 1024));
        assert_eq!(spec.ttl_seconds_after_finished, Some(3600));
        let args = spec.template.spec.expect("pod").containers[0]
            .args
            .clone()
            .expect("args");
        assert!(args.contains(&"--stall-seconds=60".to_owned()), "{args:?}");
        let remove = job(Operation::Remove).spec.expect("spec");
        assert_eq!(remove.ttl_seconds_after_finished, Some(3600));
        assert_eq!(remove.active_deadline_seconds, None);
    }

    #[test]
    fn a_jobs_pods_do_not_carry_the_consumer_label() {
        let job = job(Operation::Copy);
        assert!(job.labels().contains_key(JOB_CACHE_LABEL));
        let template = job.spec.expect("spec").template.metadata.expect("metadata");
        assert!(
            !template
                .labels
                .expect("labels")
                .contains_key(JOB_CACHE_LABEL)
        );
    }
}
