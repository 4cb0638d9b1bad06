//! The Pod-gate controller: a Pod labelled `templatecache.io/cache: <name>` and created with the
//! scheduling gate `templatecache.io/ready` loses the gate once its reference
//! `pod.ref.templatecache.io/<pod-uid>` is on that cache and the cache is Ready.
//!
//! This controller writes only to Pods. The TemplateCache controller records the references of
//! all of a cache's new Pods in one commit (see `references`), so a 1,000-replica rollout is a
//! handful of writes to the cache, not 1,000.
//!
//! The gate comes off only when one version of the cache shows both the Pod's reference and
//! Ready: from that version on the cache cannot be evicted (eviction is preconditioned on an
//! unreferenced resourceVersion, and the reference stays until the Pod is gone), so a Pod never
//! starts on a cache without data.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::PatchParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tracing::info;

use super::context::Context;
use super::error::Error;
use super::writes::{self, Answer};
use templatecache_api::conditions::{READY, find};
use templatecache_api::names::{POD_CACHE_LABEL, READY_GATE};
use templatecache_api::references::pod_reference;
use templatecache_api::{Phase, TemplateCache};

/// Event reasons on Pods.
pub mod reason {
    pub const CACHE_NOT_FOUND: &str = "CacheNotFound";
    pub const CACHE_DELETING: &str = "CacheDeleting";
    pub const CACHE_READY: &str = "CacheReady";
}

/// Reconciles one labelled Pod.
pub async fn reconcile(pod: Arc<Pod>, ctx: Arc<Context>) -> Result<Action, Error> {
    let (Some(cache_name), Some(uid)) = (pod.labels().get(POD_CACHE_LABEL), pod.uid()) else {
        return Ok(Action::await_change());
    };
    if gate_index(&pod).is_none() {
        // Not gated (or no longer): its reference is the TemplateCache controller's business.
        return Ok(Action::await_change());
    }
    let namespace = pod.namespace().ok_or(Error::MissingNamespace)?;
    let Some(cache) = ctx
        .watched
        .cache(&ObjectRef::new(cache_name).within(&namespace))
    else {
        let note = format!(
            "TemplateCache {cache_name} does not exist in namespace {namespace}; the Pod stays \
             gated until it exists and is Ready"
        );
        warn_gated(&ctx, &pod, reason::CACHE_NOT_FOUND, &note).await;
        return Ok(Action::await_change());
    };
    let referenced = cache.finalizers().contains(&pod_reference(&uid));
    if !referenced && cache.metadata.deletion_timestamp.is_some() {
        let note = format!(
            "TemplateCache {cache_name} is being deleted and takes no new references; the Pod \
             stays gated"
        );
        warn_gated(&ctx, &pod, reason::CACHE_DELETING, &note).await;
        return Ok(Action::await_change());
    }
    if referenced && is_ready(&cache) {
        ungate(&pod, &ctx).await?;
        let note =
            format!("TemplateCache {cache_name} is Ready; scheduling gate {READY_GATE} removed");
        ctx.events
            .publish(
                &*pod,
                EventType::Normal,
                reason::CACHE_READY,
                &note,
                "Ungate",
            )
            .await;
        info!(pod = %pod.name_any(), cache = %cache_name, "ungated");
    }
    // The cache's changes (its commit, Ready) bring the Pod back here through the index.
    Ok(Action::await_change())
}

/// Ready, in the same version of the cache that holds the Pod's reference.
fn is_ready(cache: &TemplateCache) -> bool {
    let Some(status) = &cache.status else {
        return false;
    };
    status.phase == Some(Phase::Ready)
        && find(&status.conditions, READY).is_some_and(|c| c.status == "True")
}

fn gate_index(pod: &Pod) -> Option<usize> {
    pod.spec
        .as_ref()?
        .scheduling_gates
        .as_ref()?
        .iter()
        .position(|g| g.name == READY_GATE)
}

/// Removes the gate at its index, testing it first, so a gate list changed meanwhile fails
/// cleanly and the Pod is looked at again.
async fn ungate(pod: &Pod, ctx: &Context) -> Result<(), Error> {
    let Some(index) = gate_index(pod) else {
        return Ok(());
    };
    let index = index.to_string();
    let patch = writes::json_patch(vec![
        writes::test(
            writes::pointer(["spec", "schedulingGates", &index, "name"]),
            READY_GATE,
        )?,
        writes::remove(writes::pointer(["spec", "schedulingGates", &index])),
    ]);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    // Gone: nothing to ungate; its reference is collected with the cache.
    pods.patch(&pod.name_any(), &PatchParams::default(), &patch)
        .await
        .unless_gone()
        .or_conflict(&pod.name_any())
        .map(drop)
}

async fn warn_gated(ctx: &Context, pod: &Pod, reason: &str, note: &str) {
    if gate_index(pod).is_some() {
        ctx.events
            .publish(pod, EventType::Warning, reason, note, "Gate")
            .await;
    }
}
