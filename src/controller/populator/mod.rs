//! The volume populator: a PersistentVolumeClaim whose `dataSourceRef` names a TemplateCache of
//! its namespace gets its own volume, filled from the one staged copy (the contract: DESIGN,
//! "Volume populator"). The state machine is [`plan`]; this module reads what it needs and
//! carries out the one step it decides.
//!
//! What the populator makes lives in the operator's namespace: the prime claim
//! `prime-<claim uid>` (provisioned as any claim of the user's class) and the populate Job
//! `populate-<claim uid>` that fills it. Once the Job has read the volume back with the cache's
//! checksum, the prime claim's volume is handed to the user's claim (its `claimRef`), the PV
//! controller binds the two, and the prime claim and the Job are deleted. While the claim is
//! unbound its reference `pvc.ref.templatecache.io/<uid>` holds the cache (the group commit
//! writes it), so no fill ever reads a cache that is being evicted or deleted.

pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::info;

use super::context::Context;
use super::error::Error;
use super::jobs::{Fill, populate_job, populate_job_name};
use super::watched::cache_of_volume;
use super::writes::Answer;
use plan::{Seen, Step, prime_claim, prime_name, reason};
use templatecache_api::TemplateCache;
use templatecache_api::names::{
    OPERATOR_MANAGER, POPULATE_FOR_ANNOTATION, POPULATE_FOR_LABEL, POPULATED_FROM_ANNOTATION,
};

/// How often a claim waiting on something no watch of the populator shows (the PV controller's
/// binding, a volume being provisioned) is looked at again.
const RECHECK: Duration = Duration::from_secs(5);

/// Reconciles one PersistentVolumeClaim: nothing unless its `dataSourceRef` names a cache.
pub async fn reconcile(
    claim: Arc<PersistentVolumeClaim>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let Some(key) = cache_of_volume(&claim) else {
        return Ok(Action::await_change());
    };
    let Some(uid) = claim.uid() else {
        return Ok(Action::await_change());
    };
    let cache = ctx.watched.cache(&key);
    let made = Made::read(&ctx, &uid).await?;
    let class = storage_class(&ctx, &claim).await?;
    let seen = Seen {
        claim: &claim,
        cache: cache.as_deref(),
        class: class.as_ref(),
        prime: made.prime.as_ref(),
        job: made.job.as_ref(),
        volume: made.volume.as_ref(),
    };
    let step = plan::next_step(&seen);
    match step {
        Step::Wait { reason, message } => {
            if let Some(reason) = reason {
                let message = match reason {
                    reason::POPULATE_FAILED => with_pod_message(&ctx, &uid, message).await,
                    _ => message,
                };
                let type_ = match reason {
                    reason::POPULATING | reason::WAITING_FOR_CONSUMER | reason::CACHE_NOT_READY => {
                        EventType::Normal
                    }
                    _ => EventType::Warning,
                };
                ctx.events
                    .publish(&*claim, type_, reason, &message, "Populate")
                    .await;
                return Ok(Action::await_change());
            }
            Ok(Action::requeue(RECHECK))
        }
        Step::CreatePrime => {
            let prime = prime_claim(&claim, populate_namespace(&ctx));
            create(&made.primes, &prime).await?;
            info!(claim = %plan::user_key(&claim), prime = %prime.name_any(), "prime claim created");
            Ok(Action::await_change())
        }
        Step::CreateJob => {
            let (Some(cache), Some(prime)) = (cache.as_deref(), made.prime.as_ref()) else {
                return Ok(Action::await_change());
            };
            create_job(&ctx, &claim, cache, prime, &made.jobs).await?;
            Ok(Action::await_change())
        }
        Step::Rebind { volume } => {
            let Some(cache) = cache.as_deref() else {
                return Ok(Action::await_change());
            };
            hand_over(&ctx, &claim, cache, &volume, made.volume.as_ref()).await?;
            Ok(Action::requeue(RECHECK))
        }
        Step::CleanUp => {
            clean_up(&made, &uid).await?;
            if plan::bound_volume(&claim).is_some() {
                let note = "the volume is filled and bound; the prime claim and the populate Job are deleted";
                ctx.events
                    .publish(
                        &*claim,
                        EventType::Normal,
                        reason::POPULATED,
                        note,
                        "Populate",
                    )
                    .await;
            }
            Ok(Action::await_change())
        }
        Step::Done => Ok(Action::await_change()),
    }
}

/// `message` and what the populate Job's last failed Pod said (its termination message, or the
/// end of its log): the mover's own sentence, where the Job only says it gave up.
async fn with_pod_message(ctx: &Context, uid: &str, message: String) -> String {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), populate_namespace(ctx));
    let selector = format!("job-name={}", populate_job_name(uid));
    let Ok(listed) = pods.list(&ListParams::default().labels(&selector)).await else {
        return message;
    };
    let said = (listed.items.iter())
        .filter_map(|pod| {
            let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
            let ended = statuses
                .iter()
                .find_map(|c| c.state.as_ref()?.terminated.clone())?;
            Some((ended.finished_at.map(|t| t.0), ended.message?))
        })
        .max_by_key(|(at, _)| *at)
        .map(|(_, said)| said.trim().to_owned());
    match said {
        Some(said) if !said.is_empty() => format!("{message}; its last Pod said: {said}"),
        _ => message,
    }
}

/// The namespace the populator's prime claims and Jobs live in: the operator's.
fn populate_namespace(ctx: &Context) -> &str {
    &ctx.config.operator_namespace
}

/// What the populator made for one claim, as the API server has it now.
struct Made {
    primes: Api<PersistentVolumeClaim>,
    jobs: Api<Job>,
    prime: Option<PersistentVolumeClaim>,
    job: Option<Job>,
    volume: Option<PersistentVolume>,
}

impl Made {
    async fn read(ctx: &Context, uid: &str) -> Result<Self, Error> {
        let namespace = populate_namespace(ctx);
        let primes: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
        let (prime_name, job_name) = (prime_name(uid), populate_job_name(uid));
        let (prime, job) =
            futures::try_join!(primes.get_opt(&prime_name), jobs.get_opt(&job_name))?;
        let volume = match prime.as_ref().and_then(plan::bound_volume) {
            Some(name) => {
                Api::<PersistentVolume>::all(ctx.client.clone())
                    .get_opt(name)
                    .await?
            }
            None => None,
        };
        Ok(Self {
            primes,
            jobs,
            prime,
            job,
            volume,
        })
    }
}

/// The claim's StorageClass, if it names one that exists.
async fn storage_class(
    ctx: &Context,
    claim: &PersistentVolumeClaim,
) -> Result<Option<StorageClass>, Error> {
    let name = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref());
    match name.filter(|n| !n.is_empty()) {
        Some(name) => Ok(Api::<StorageClass>::all(ctx.client.clone())
            .get_opt(name)
            .await?),
        None => Ok(None),
    }
}

/// Creates `object`; one already there (made by an earlier reconcile) is the same object.
async fn create<K>(api: &Api<K>, object: &K) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = PostParams {
        field_manager: Some(OPERATOR_MANAGER.to_owned()),
        ..PostParams::default()
    };
    match api.create(&params, object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates the populate Job, from the cache's store, and tells the claim.
async fn create_job(
    ctx: &Context,
    claim: &PersistentVolumeClaim,
    cache: &TemplateCache,
    prime: &PersistentVolumeClaim,
    jobs: &Api<Job>,
) -> Result<(), Error> {
    let store_name = ctx.store_name_of(cache).to_owned();
    let Some(store) = ctx.store(&store_name).await? else {
        let note = format!("StagingStore {store_name} of the cache does not exist");
        ctx.events
            .publish(
                claim,
                EventType::Warning,
                reason::POPULATE_FAILED,
                &note,
                "Populate",
            )
            .await;
        return Ok(());
    };
    let fill = Fill {
        claim,
        prime,
        cache,
        store: &store,
        as_root: ctx.config.populate_as_root,
    };
    let job = populate_job(&fill, &ctx.config.jobs)?;
    create(jobs, &job).await?;
    let size = cache
        .status
        .as_ref()
        .and_then(|s| s.size)
        .unwrap_or_default();
    let note = format!(
        "populate Job {}/{} fills the volume with TemplateCache {} ({size} bytes)",
        populate_namespace(ctx),
        job.name_any(),
        cache.name_any()
    );
    ctx.events
        .publish(
            claim,
            EventType::Normal,
            reason::POPULATING,
            &note,
            "Populate",
        )
        .await;
    Ok(())
}

/// Hands the prime claim's filled volume to the user's claim: its `claimRef` names the user's
/// claim (with its UID, so no other claim of that name could take it) and its annotation says
/// what it was filled from. Written only on the version read, while it is still the prime's.
async fn hand_over(
    ctx: &Context,
    claim: &PersistentVolumeClaim,
    cache: &TemplateCache,
    name: &str,
    volume: Option<&PersistentVolume>,
) -> Result<(), Error> {
    let version = volume.and_then(|v| v.metadata.resource_version.clone());
    let checksum = cache
        .status
        .as_ref()
        .and_then(|s| s.checksum.clone())
        .unwrap_or_default();
    let from = format!(
        "{}/{}@{checksum}",
        cache.namespace().unwrap_or_default(),
        cache.name_any()
    );
    let patch = json!({
        "metadata": {
            "resourceVersion": version,
            "annotations": {POPULATED_FROM_ANNOTATION: from},
        },
        "spec": {"claimRef": {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "namespace": claim.namespace(), "name": claim.name_any(), "uid": claim.uid(),
            "resourceVersion": null,
        }},
    });
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    volumes
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .or_version_conflict(name)?;
    info!(claim = %plan::user_key(claim), volume = name, from = %from, "volume handed over");
    Ok(())
}

/// Deletes the prime claim and the populate Job (its Pods with it).
async fn clean_up(made: &Made, uid: &str) -> Result<(), Error> {
    let background = DeleteParams::background();
    if made.job.is_some() {
        made.jobs
            .delete(&populate_job_name(uid), &background)
            .await
            .unless_gone()?;
    }
    if made.prime.is_some() {
        made.primes
            .delete(&prime_name(uid), &background)
            .await
            .unless_gone()?;
    }
    Ok(())
}

/// Deletes a prime claim (and its populate Job) whose user claim is gone. A claim deleted
/// without a finalizer may leave no trace the populator's reconcile sees (the controller does
/// not reconcile an object that is no longer there), and what the populator made lives in
/// another namespace, where no owner reference can collect it: the prime claim's own watch does.
pub async fn collect_orphan(
    prime: Arc<PersistentVolumeClaim>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let (Some(user), Some(uid)) = (
        user_claim_of(&*prime),
        prime.labels().get(POPULATE_FOR_LABEL).cloned(),
    ) else {
        return Ok(Action::await_change());
    };
    let namespace = user.namespace.clone().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let current = claims.get_opt(&user.name).await?;
    if current.and_then(|c| c.uid()).as_deref() == Some(uid.as_str()) {
        // Its claim is there: the populator's reconcile of it decides.
        return Ok(Action::await_change());
    }
    let made = Made::read(&ctx, &uid).await?;
    clean_up(&made, &uid).await?;
    info!(claim = %format!("{namespace}/{}", user.name), "user claim gone: prime claim and populate Job deleted");
    Ok(Action::await_change())
}

/// The user claim a prime claim or populate Job was made for, from its annotation.
pub fn user_claim_of<K: kube::Resource>(object: &K) -> Option<ObjectRef<PersistentVolumeClaim>> {
    let key = object
        .meta()
        .annotations
        .as_ref()?
        .get(POPULATE_FOR_ANNOTATION)?;
    let (namespace, name) = key.split_once('/')?;
    Some(ObjectRef::new(name).within(namespace))
}
