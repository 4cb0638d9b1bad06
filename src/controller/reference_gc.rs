//! Garbage collection of Pod references: a `pod.ref.templatecache.io/<uid>` reference whose Pod
//! is gone (or has finished, or no longer names the cache) is removed. It runs inside every
//! TemplateCache reconcile, which a Pod's deletion triggers, and the operator's start and a
//! periodic requeue catch what a missed event left. Consumer references (`ref.templatecache.io/`)
//! are never touched: only their holder knows when it is done.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use tracing::info;

use super::Error;
use crate::api::TemplateCache;
use crate::api::names::POD_CACHE_LABEL;
use crate::api::references::{pod_reference, pod_uid_of};
use crate::client;

/// Removes the cache's references of Pods that no longer hold it; returns how many.
///
/// The cache was read before the Pods are listed, with a quorum read, so a Pod whose reference
/// the cache shows was created before the list and is in it unless it is really gone: a Pod
/// created a moment ago can never lose its fresh reference here.
pub async fn collect(
    cache: &TemplateCache,
    caches: &Api<TemplateCache>,
    pods: &Api<Pod>,
) -> Result<usize, Error> {
    let held: Vec<&str> = cache
        .finalizers()
        .iter()
        .filter_map(|f| pod_uid_of(f))
        .collect();
    if held.is_empty() {
        return Ok(0);
    }
    let name = cache.name_any();
    let selector = format!("{POD_CACHE_LABEL}={name}");
    let live: BTreeSet<String> = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .iter()
        .filter(|pod| !has_finished(pod))
        .filter_map(|pod| pod.uid())
        .collect();
    let stale: BTreeSet<&str> = held
        .into_iter()
        .filter(|uid| !live.contains(*uid))
        .collect();
    for uid in &stale {
        client::remove_entry(caches, &name, &pod_reference(uid)).await?;
    }
    if !stale.is_empty() {
        info!(cache = %name, removed = stale.len(), "removed references of Pods that are gone");
    }
    Ok(stale.len())
}

/// True for a Pod that ran to completion: it no longer reads the data.
pub fn has_finished(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}
