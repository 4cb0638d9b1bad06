//! The populator's state machine as a pure function: from what the watches show of one user
//! claim (a PersistentVolumeClaim whose `dataSourceRef` names a TemplateCache), its cache, its
//! StorageClass, its prime claim, the populate Job and the prime's volume, the one next step.
//! The steps, in the order a fill meets them:
//!
//! 1. wait for the cache to exist, to hold the claim's reference and to be Ready; refuse a
//!    claim smaller than the template; wait for a first consumer where the class says so;
//! 2. create the prime claim `prime-<uid>` in the populate namespace, same class, modes, size
//!    and volume mode (and the node the scheduler chose, for `WaitForFirstConsumer`);
//! 3. create the populate Job, which fills the prime's volume and reads it back;
//! 4. once the Job is complete, rebind: the prime's volume gets the user's claim as its
//!    `claimRef`, and the PV controller binds the user's claim to it;
//! 5. once the user's claim is bound (or deleted), delete the prime claim and the Job.
//!
//! The claim's reference on the cache is not a step here: the group commit holds it while the
//! claim is unbound, so the cache cannot be evicted or deleted under a fill.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use kube::api::ObjectMeta;

use super::super::jobs::JobState;
use templatecache_api::conditions::{READY, find};
use templatecache_api::names::{
    POPULATE_FOR_ANNOTATION, POPULATE_FOR_LABEL, SELECTED_NODE_ANNOTATION,
};
use templatecache_api::references::volume_reference;
use templatecache_api::{Phase, TemplateCache, quantity_bytes};

/// Event reasons on the user's claim, one for each step a user waits on.
pub mod reason {
    pub const CACHE_NOT_FOUND: &str = "CacheNotFound";
    pub const CACHE_DELETING: &str = "CacheDeleting";
    pub const CACHE_NOT_READY: &str = "CacheNotReady";
    pub const CACHE_FAILED: &str = "CacheFailed";
    pub const VOLUME_TOO_SMALL: &str = "VolumeTooSmall";
    pub const WAITING_FOR_CONSUMER: &str = "WaitingForFirstConsumer";
    pub const POPULATING: &str = "Populating";
    pub const POPULATED: &str = "Populated";
    pub const POPULATE_FAILED: &str = "PopulateFailed";
}

/// What the watches show of one user claim and everything its fill made.
pub struct Seen<'a> {
    pub claim: &'a PersistentVolumeClaim,
    pub cache: Option<&'a TemplateCache>,
    /// The claim's StorageClass, when it names one that exists.
    pub class: Option<&'a StorageClass>,
    pub prime: Option<&'a PersistentVolumeClaim>,
    pub job: Option<&'a Job>,
    /// The prime claim's volume, once it is bound.
    pub volume: Option<&'a PersistentVolume>,
}

/// The one next step for a user claim.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Nothing to do until something changes; `reason` and `message` say what the claim
    /// waits for (an Event on the claim), or nothing when it only waits for the operator.
    Wait {
        reason: Option<&'static str>,
        message: String,
    },
    CreatePrime,
    CreateJob,
    /// Hand the prime's volume to the user's claim.
    Rebind {
        volume: String,
    },
    /// Delete the prime claim and the Job: the fill is over (bound) or not wanted (deleted).
    CleanUp,
    /// Nothing is left to do.
    Done,
}

impl Step {
    fn wait(reason: &'static str, message: String) -> Self {
        Step::Wait {
            reason: Some(reason),
            message,
        }
    }

    fn quiet(message: &str) -> Self {
        Step::Wait {
            reason: None,
            message: message.to_owned(),
        }
    }
}

/// The next step for the claim in `seen`.
pub fn next_step(seen: &Seen) -> Step {
    let claim = seen.claim;
    let made_something = seen.prime.is_some() || seen.job.is_some();
    if claim.metadata.deletion_timestamp.is_some() || bound_volume(claim).is_some() {
        return if made_something {
            Step::CleanUp
        } else {
            Step::Done
        };
    }
    if let Some(step) = cache_not_usable(seen) {
        return step;
    }
    if let Some(step) = claim_not_fillable(seen) {
        return step;
    }
    if seen.prime.is_none() {
        return Step::CreatePrime;
    }
    let Some(job) = seen.job else {
        return Step::CreateJob;
    };
    match JobState::of(Some(job)) {
        JobState::Failed { message, .. } => Step::wait(
            reason::POPULATE_FAILED,
            format!("populate Job {} failed: {message}", job.name_any()),
        ),
        JobState::Succeeded => rebind(seen),
        _ => Step::wait(
            reason::POPULATING,
            format!(
                "populate Job {} is filling the volume from the cache",
                job.name_any()
            ),
        ),
    }
}

/// Why the claim's cache cannot fill it yet, if it cannot.
fn cache_not_usable(seen: &Seen) -> Option<Step> {
    let claim = seen.claim;
    let name = cache_name(claim);
    let Some(cache) = seen.cache else {
        return Some(Step::wait(
            reason::CACHE_NOT_FOUND,
            format!(
                "TemplateCache {name} does not exist in this namespace; the claim waits for it"
            ),
        ));
    };
    let referenced = claim
        .uid()
        .is_some_and(|uid| cache.finalizers().contains(&volume_reference(&uid)));
    if !referenced && cache.metadata.deletion_timestamp.is_some() {
        return Some(Step::wait(
            reason::CACHE_DELETING,
            format!("TemplateCache {name} is being deleted and fills no new volume"),
        ));
    }
    let status = cache.status.clone().unwrap_or_default();
    if status.phase == Some(Phase::Failed) {
        let ready = find(&status.conditions, READY);
        let why = ready.map(|c| c.message.clone()).unwrap_or_default();
        return Some(Step::wait(
            reason::CACHE_FAILED,
            format!("TemplateCache {name} failed and cannot fill the volume: {why}"),
        ));
    }
    // A cache being deleted keeps its data until its last reference goes: a fill that holds
    // one finishes from it.
    let usable = match status.phase {
        Some(Phase::Ready) => true,
        Some(Phase::Deleting) => referenced,
        _ => false,
    };
    if !usable || status.checksum.is_none() || status.size.is_none() {
        return Some(Step::wait(
            reason::CACHE_NOT_READY,
            format!("TemplateCache {name} is not Ready yet; the fill starts once it is"),
        ));
    }
    if !referenced {
        return Some(Step::quiet(
            "the claim's reference on the cache is being recorded",
        ));
    }
    None
}

/// Why the claim cannot be filled yet, if it cannot: too small, or no consumer yet where its
/// class binds only for one.
fn claim_not_fillable(seen: &Seen) -> Option<Step> {
    let claim = seen.claim;
    let size = seen.cache?.status.as_ref()?.size?;
    let requested = requested_bytes(claim);
    if requested.is_none_or(|bytes| bytes < size) {
        let asked = requested.map_or_else(|| "no size".to_owned(), |b| format!("{b} bytes"));
        return Some(Step::wait(
            reason::VOLUME_TOO_SMALL,
            format!(
                "the claim asks for {asked}, less than the template's {size} bytes: nothing is \
                 filled (make a claim of at least {size} bytes)"
            ),
        ));
    }
    let waits_for_consumer = seen
        .class
        .and_then(|c| c.volume_binding_mode.as_deref())
        .is_some_and(|mode| mode == "WaitForFirstConsumer");
    if waits_for_consumer && !claim.annotations().contains_key(SELECTED_NODE_ANNOTATION) {
        return Some(Step::wait(
            reason::WAITING_FOR_CONSUMER,
            "the claim's StorageClass binds volumes where their first Pod runs: the fill \
             starts once a Pod uses the claim"
                .to_owned(),
        ));
    }
    None
}

/// After the Job: hand the prime's volume over, then wait for the PV controller to bind.
fn rebind(seen: &Seen) -> Step {
    let Some(volume) = seen.volume else {
        return Step::quiet("the prime claim's volume is not bound yet");
    };
    let claim_uid = seen.claim.uid();
    let handed = volume
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .is_some_and(|r| r.uid.is_some() && r.uid == claim_uid);
    if handed {
        Step::quiet("the volume is handed to the claim; the PV controller binds it")
    } else {
        Step::Rebind {
            volume: volume.name_any(),
        }
    }
}

/// The cache a user claim names (its `dataSourceRef`).
pub fn cache_name(claim: &PersistentVolumeClaim) -> String {
    let source = claim.spec.as_ref().and_then(|s| s.data_source_ref.as_ref());
    source.map(|s| s.name.clone()).unwrap_or_default()
}

/// The volume a claim is bound to, if any.
pub fn bound_volume(claim: &PersistentVolumeClaim) -> Option<&str> {
    let name = claim.spec.as_ref()?.volume_name.as_deref()?;
    (!name.is_empty()).then_some(name)
}

/// The storage a claim requests, in bytes.
fn requested_bytes(claim: &PersistentVolumeClaim) -> Option<u64> {
    let requests = claim.spec.as_ref()?.resources.as_ref()?.requests.as_ref()?;
    quantity_bytes(&requests.get("storage")?.0)
}

/// The name of the prime claim of a user claim with `uid`.
pub fn prime_name(uid: &str) -> String {
    format!("prime-{uid}")
}

/// The prime claim for `claim`, in `namespace`: the same class, access modes, size and volume
/// mode, without the data source (the provisioner makes it an empty volume), on the node the
/// scheduler chose for the claim if it chose one; labelled with the claim's UID and annotated
/// with its name, so a change of it wakes the claim.
pub fn prime_claim(claim: &PersistentVolumeClaim, namespace: &str) -> PersistentVolumeClaim {
    let spec = claim.spec.clone().unwrap_or_default();
    let uid = claim.uid().unwrap_or_default();
    let mut annotations = BTreeMap::from([(POPULATE_FOR_ANNOTATION.to_owned(), user_key(claim))]);
    if let Some(node) = claim.annotations().get(SELECTED_NODE_ANNOTATION) {
        annotations.insert(SELECTED_NODE_ANNOTATION.to_owned(), node.clone());
    }
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(prime_name(&uid)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(POPULATE_FOR_LABEL.to_owned(), uid)])),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: spec.access_modes,
            resources: spec.resources,
            storage_class_name: spec.storage_class_name,
            volume_mode: spec.volume_mode,
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// `<namespace>/<name>` of a user claim, as the prime claim and the Job name it.
pub fn user_key(claim: &PersistentVolumeClaim) -> String {
    format!(
        "{}/{}",
        claim.namespace().unwrap_or_default(),
        claim.name_any()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    const UID: &str = "u-1";

    fn claim(storage: &str) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": "vm-1", "namespace": "ns", "uid": UID},
            "spec": {
                "accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                "volumeMode": "Filesystem",
                "resources": {"requests": {"storage": storage}},
                "dataSourceRef": {"apiGroup": "templatecache.io", "kind": "TemplateCache",
                                  "name": "img"}
            }
        }))
        .expect("claim")
    }

    fn ready_cache(referenced: bool) -> TemplateCache {
        let cache = fixtures::cache(
            "img",
            json!({"phase": "Ready", "size": 1 << 20, "checksum": "sha256:ab",
                   "conditions": [{"type": "Ready", "status": "True", "reason": "Copied",
                                   "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
        );
        fixtures::holding(cache, referenced.then(|| volume_reference(UID)))
    }

    fn job(condition: Option<&str>) -> Job {
        let conditions: Vec<_> = condition
            .map(|c| json!({"type": c, "status": "True", "message": "exit 1"}))
            .into_iter()
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "populate-u-1"},
            "status": {"conditions": conditions}
        }))
        .expect("job")
    }

    fn volume(claim_uid: Option<&str>) -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": "pv-1"},
            "spec": {"claimRef": {"namespace": "ops", "name": "prime-u-1", "uid": claim_uid}}
        }))
        .expect("volume")
    }

    fn class(mode: &str) -> StorageClass {
        serde_json::from_value(json!({
            "metadata": {"name": "fast"}, "provisioner": "x", "volumeBindingMode": mode
        }))
        .expect("class")
    }

    fn reason_of(step: &Step) -> Option<&'static str> {
        match step {
            Step::Wait { reason, .. } => *reason,
            _ => None,
        }
    }

    #[test]
    fn a_fill_goes_prime_job_rebind_clean_up_in_that_order() {
        let claim = claim("1Gi");
        let cache = ready_cache(true);
        let prime = prime_claim(&claim, "ops");
        let (running, complete) = (job(None), job(Some("Complete")));
        let (primes, handed) = (volume(Some("prime-uid")), volume(Some(UID)));
        let seen = |prime, job, volume| Seen {
            claim: &claim,
            cache: Some(&cache),
            class: None,
            prime,
            job,
            volume,
        };
        assert_eq!(next_step(&seen(None, None, None)), Step::CreatePrime);
        assert_eq!(next_step(&seen(Some(&prime), None, None)), Step::CreateJob);
        let filling = next_step(&seen(Some(&prime), Some(&running), None));
        assert_eq!(reason_of(&filling), Some(reason::POPULATING));
        assert_eq!(
            next_step(&seen(Some(&prime), Some(&complete), Some(&primes))),
            Step::Rebind {
                volume: "pv-1".into()
            }
        );
        let binding = next_step(&seen(Some(&prime), Some(&complete), Some(&handed)));
        assert!(
            matches!(binding, Step::Wait { reason: None, .. }),
            "{binding:?}"
        );

        let mut bound = claim.clone();
        bound.spec.as_mut().expect("spec").volume_name = Some("pv-1".into());
        let after = Seen {
            claim: &bound,
            ..seen(Some(&prime), Some(&complete), Some(&handed))
        };
        assert_eq!(next_step(&after), Step::CleanUp);
        let clean = Seen {
            claim: &bound,
            ..seen(None, None, None)
        };
        assert_eq!(next_step(&clean), Step::Done);
    }

    #[test]
    fn nothing_is_made_until_the_cache_exists_is_ready_and_holds_the_reference() {
        let claim = claim("1Gi");
        let seen = |cache| Seen {
            claim: &claim,
            cache,
            class: None,
            prime: None,
            job: None,
            volume: None,
        };
        assert_eq!(
            reason_of(&next_step(&seen(None))),
            Some(reason::CACHE_NOT_FOUND)
        );
        let copying = fixtures::cache("img", json!({"phase": "Copying"}));
        assert_eq!(
            reason_of(&next_step(&seen(Some(&copying)))),
            Some(reason::CACHE_NOT_READY)
        );
        let failed = fixtures::cache("img", json!({"phase": "Failed"}));
        assert_eq!(
            reason_of(&next_step(&seen(Some(&failed)))),
            Some(reason::CACHE_FAILED)
        );
        let unreferenced = ready_cache(false);
        let waiting = next_step(&seen(Some(&unreferenced)));
        assert!(
            matches!(waiting, Step::Wait { reason: None, .. }),
            "{waiting:?}"
        );
        let mut deleting = ready_cache(false);
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        assert_eq!(
            reason_of(&next_step(&seen(Some(&deleting)))),
            Some(reason::CACHE_DELETING)
        );
        // A cache being deleted that holds this claim's reference keeps its data for it.
        let mut held = ready_cache(true);
        held.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        held.status.as_mut().expect("status").phase = Some(Phase::Deleting);
        assert_eq!(next_step(&seen(Some(&held))), Step::CreatePrime);
    }

    #[test]
    fn a_claim_smaller_than_the_template_is_never_filled() {
        let cache = ready_cache(true);
        for storage in ["1Mi", "1048576"] {
            let fits = claim(storage);
            let seen = Seen {
                claim: &fits,
                cache: Some(&cache),
                class: None,
                prime: None,
                job: None,
                volume: None,
            };
            assert_eq!(next_step(&seen), Step::CreatePrime, "{storage}");
        }
        let small = claim("1048575");
        let seen = Seen {
            claim: &small,
            cache: Some(&cache),
            class: None,
            prime: None,
            job: None,
            volume: None,
        };
        let step = next_step(&seen);
        assert_eq!(reason_of(&step), Some(reason::VOLUME_TOO_SMALL));
        assert!(format!("{step:?}").contains("1048576 bytes"), "{step:?}");
    }

    #[test]
    fn a_wait_for_first_consumer_class_fills_only_once_a_node_is_chosen() {
        let cache = ready_cache(true);
        let wffc = class("WaitForFirstConsumer");
        let claim = claim("1Gi");
        let mut chosen = claim.clone();
        chosen
            .annotations_mut()
            .insert(SELECTED_NODE_ANNOTATION.into(), "node-1".into());
        let seen = |claim| Seen {
            claim,
            cache: Some(&cache),
            class: Some(&wffc),
            prime: None,
            job: None,
            volume: None,
        };
        assert_eq!(
            reason_of(&next_step(&seen(&claim))),
            Some(reason::WAITING_FOR_CONSUMER)
        );
        assert_eq!(next_step(&seen(&chosen)), Step::CreatePrime);
        let prime = prime_claim(&chosen, "ops");
        assert_eq!(
            prime.annotations().get(SELECTED_NODE_ANNOTATION),
            Some(&"node-1".to_owned()),
            "the prime's volume is made on the chosen node"
        );
    }

    #[test]
    fn a_failed_job_is_reported_and_a_deleted_claim_leaves_nothing_behind() {
        let claim = claim("1Gi");
        let mut deleted = claim.clone();
        deleted.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let cache = ready_cache(true);
        let prime = prime_claim(&claim, "ops");
        let failed = job(Some("Failed"));
        let seen = |claim| Seen {
            claim,
            cache: Some(&cache),
            class: None,
            prime: Some(&prime),
            job: Some(&failed),
            volume: None,
        };
        let step = next_step(&seen(&claim));
        assert_eq!(reason_of(&step), Some(reason::POPULATE_FAILED));
        assert!(format!("{step:?}").contains("exit 1"), "{step:?}");
        assert_eq!(next_step(&seen(&deleted)), Step::CleanUp);
    }

    #[test]
    fn the_prime_claim_copies_class_modes_size_and_mode_but_not_the_data_source() {
        let claim = claim("10Gi");
        let prime = prime_claim(&claim, "ops");
        assert_eq!(prime.name_any(), format!("prime-{UID}"));
        assert_eq!(prime.namespace().as_deref(), Some("ops"));
        let spec = prime.spec.expect("spec");
        let original = claim.spec.expect("spec");
        assert_eq!(spec.access_modes, original.access_modes);
        assert_eq!(spec.resources, original.resources);
        assert_eq!(spec.storage_class_name, original.storage_class_name);
        assert_eq!(spec.volume_mode, original.volume_mode);
        assert_eq!((spec.data_source, spec.data_source_ref), (None, None));
        assert_eq!(
            prime
                .metadata
                .labels
                .expect("labels")
                .get(POPULATE_FOR_LABEL),
            Some(&UID.to_owned())
        );
        assert_eq!(
            prime
                .metadata
                .annotations
                .expect("annotations")
                .get(POPULATE_FOR_ANNOTATION),
            Some(&"ns/vm-1".to_owned())
        );
    }
}
