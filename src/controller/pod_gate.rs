//! The Pod-gate controller: a Pod labelled `templatecache.io/cache: <name>` and created with the
//! scheduling gate `templatecache.io/ready` gets the reference
//! `pod.ref.templatecache.io/<pod-uid>` on that cache, and loses the gate once the cache is Ready.
//!
//! The gate comes off only after the reference is in place and a read that includes it shows the
//! cache Ready: from then on the cache cannot be evicted (an eviction is preconditioned on an
//! unreferenced resourceVersion), so a Pod never starts on a cache without data. References of
//! Pods that are gone are removed by the TemplateCache controller (see `reference_gc`).

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::info;

use super::reference_gc::has_finished;
use super::{Context, Error};
use crate::api::names::{POD_CACHE_LABEL, READY_GATE};
use crate::api::references::pod_reference;
use crate::api::{Phase, TemplateCache};
use crate::client::{self, ClientError};
use crate::controller::conditions::{READY, find};

/// Event reasons on Pods.
pub mod reason {
    pub const CACHE_NOT_FOUND: &str = "CacheNotFound";
    pub const CACHE_DELETING: &str = "CacheDeleting";
    pub const CACHE_READY: &str = "CacheReady";
}

/// Reconciles one labelled Pod.
pub async fn reconcile(pod: Arc<Pod>, ctx: Arc<Context>) -> Result<Action, Error> {
    let Some(cache_name) = pod.labels().get(POD_CACHE_LABEL) else {
        return Ok(Action::await_change());
    };
    let namespace = pod.namespace().ok_or(Error::MissingNamespace)?;
    let caches: Api<TemplateCache> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(uid) = pod.uid() else {
        return Ok(Action::await_change());
    };
    let reference = pod_reference(&uid);
    if has_finished(&pod) {
        // A Pod that ran to completion no longer reads the data.
        client::remove_entry(&caches, cache_name, &reference).await?;
        return Ok(Action::await_change());
    }
    let cache = match client::add_entry(&caches, cache_name, &reference).await {
        Ok(cache) => cache,
        Err(ClientError::NotFound(_)) => {
            let note = format!(
                "TemplateCache {cache_name} does not exist in namespace {namespace}; the Pod \
                 stays gated until it exists and is Ready"
            );
            warn_gated(&ctx, &pod, reason::CACHE_NOT_FOUND, &note).await;
            return Ok(Action::await_change());
        }
        Err(ClientError::Deleting(_)) => {
            let note = format!(
                "TemplateCache {cache_name} is being deleted and takes no new references; the Pod \
                 stays gated"
            );
            warn_gated(&ctx, &pod, reason::CACHE_DELETING, &note).await;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e.into()),
    };
    if gate_index(&pod).is_some() && is_ready(&cache) {
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
    // The cache's own changes (Ready, created) bring the Pod back here; see `pods_of`.
    Ok(Action::await_change())
}

/// The Pods in `store` that name `cache`: what a change to the cache concerns.
pub fn pods_of(store: &Store<Pod>, cache: &TemplateCache) -> Vec<ObjectRef<Pod>> {
    let namespace = cache.namespace();
    let name = cache.name_any();
    store
        .state()
        .iter()
        .filter(|pod| pod.namespace() == namespace)
        .filter(|pod| pod.labels().get(POD_CACHE_LABEL) == Some(&name))
        .map(|pod| ObjectRef::from_obj(&**pod))
        .collect()
}

/// Ready, as seen in the read that already holds the Pod's reference.
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
    let path = format!("/spec/schedulingGates/{index}");
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": format!("{path}/name"), "value": READY_GATE},
        {"op": "remove", "path": path},
    ]))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    match pods
        .patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Gone: nothing to ungate; its reference is collected with the cache.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(kube::Error::Api(s)) if matches!(s.code, 409 | 422) => {
            Err(Error::Conflict(pod.name_any()))
        }
        Err(e) => Err(e.into()),
    }
}

async fn warn_gated(ctx: &Context, pod: &Pod, reason: &str, note: &str) {
    if gate_index(pod).is_some() {
        ctx.events
            .publish(pod, EventType::Warning, reason, note, "Gate")
            .await;
    }
}
