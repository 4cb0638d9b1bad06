//! The StagingStore controller: reports what each store holds, grants copies room before they
//! write, and evicts unreferenced caches, least recently referenced first, when a store passes
//! its high watermark or a copy needs the room. [`usage::decide`] makes every decision; this
//! module reads and writes.
//!
//! Eviction never races a new reference into a Ready cache without data: the eviction is a
//! status write preconditioned on the resourceVersion the decision saw, so a reference added
//! since (which changes the resourceVersion) makes it fail, and the cache stays. Once the phase
//! is `Evicted`, nothing treats the cache as Ready; its data is removed after that, by the
//! TemplateCache controller's remove Job.

pub mod tenancy;
pub mod usage;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::writes::{self, Answer};
use crate::controller::context::Context;
use crate::controller::error::Error;
use crate::controller::group_commit;
use crate::controller::run::drop_managed_fields;
use crate::infra::metrics::StoreSample;
use templatecache_api::conditions::{READY, condition, set_condition};
use templatecache_api::reasons::cache as reason;
use templatecache_api::{Phase, StagingStore, StorageAdmission, TemplateCache, quantity_bytes};
use tenancy::Tenancy;
use usage::Refusal;

/// How often a store is looked at even when nothing changes.
const RESYNC: Duration = Duration::from_secs(300);

/// Caches that live in store `name`, read in pages of [`LIST_PAGE`]: one list of thousands of
/// caches holds the whole response in memory at once, and the pages are one consistent snapshot.
async fn caches_in(name: &str, ctx: &Context) -> Result<Vec<TemplateCache>, Error> {
    let api = ctx.scoped::<TemplateCache>();
    let mut params = ListParams::default().limit(LIST_PAGE);
    let mut caches = vec![];
    loop {
        let page = api.list(&params).await?;
        let in_store = page.items.into_iter();
        caches.extend(
            in_store
                .filter(|cache| ctx.store_name_of(cache) == name)
                .map(|mut cache| {
                    drop_managed_fields(&mut cache);
                    cache
                }),
        );
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(caches),
        }
    }
}

/// Caches per list request.
const LIST_PAGE: u32 = 500;

/// Reconciles one StagingStore.
pub async fn reconcile(store: Arc<StagingStore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = store.name_any();
    let capacity = store
        .spec
        .capacity_bytes()
        .ok_or_else(|| Error::InvalidCapacity(name.clone(), store.spec.capacity.clone()))?;
    // Every change to any cache asks its store to look again; under a storm of changes the
    // store would list all its caches back to back, and with thousands of caches those lists
    // cost the API server more than everything else the operator does.
    if let Some(wait) = ctx.store_lists.wait(&name) {
        return Ok(Action::requeue(wait));
    }
    // A fresh list, not the watch cache: room is granted on it, and a stale view could grant
    // the same free bytes twice.
    let started = Instant::now();
    let caches = caches_in(&name, &ctx).await?;
    ctx.store_lists.done(&name, started);
    if ctx.config.namespace.is_some() && caches.is_empty() {
        // An operator limited to one namespace leaves stores it has no caches in to others.
        return Ok(Action::await_change());
    }
    let tenancy = tenancy_of(&store, &caches, &ctx).await?;
    let decision = usage::decide(
        &name,
        capacity,
        &store.spec.eviction,
        &tenancy,
        &caches,
        Timestamp::now(),
    );
    let mut contended = false;
    for index in &decision.evict {
        contended |= !evict(&caches[*index], &name, &ctx).await?;
    }
    for (index, bytes) in &decision.admit {
        grant(&caches[*index], *bytes, None, &ctx).await?;
    }
    for refusal in &decision.refuse {
        grant(&caches[refusal.index], refusal.bytes, Some(refusal), &ctx).await?;
    }
    record_usage(&store, &decision, &ctx).await?;
    let room = StoreSample {
        capacity_bytes: capacity,
        used_bytes: decision.used_bytes,
        high_watermark_bytes: usage::high_watermark_bytes(capacity, &store.spec.eviction),
        evictable_bytes: decision.evictable_bytes,
        waiting_copies: waiting_for_room(&decision),
    };
    ctx.metrics.observe_store(&name, room);
    // The store may have been deleted while this reconcile listed its caches, after the watch
    // forgot its gauges: forget them again rather than export them until a restart.
    ctx.forget_deleted_stores();
    let requeue = if contended {
        Some(Duration::from_secs(1))
    } else if refused_by_tenancy(&decision) {
        // A namespace's labels, or the room its other caches take, change without any change
        // to the caches of this store; look again soon rather than at the next resync.
        Some(TENANCY_RECHECK.min(decision.recheck_after.unwrap_or(RESYNC)))
    } else {
        decision.recheck_after
    };
    Ok(Action::requeue(requeue.unwrap_or(RESYNC).min(RESYNC)))
}

/// How soon a store looks again at copies it refused on tenancy grounds.
const TENANCY_RECHECK: Duration = Duration::from_secs(30);

/// Copies refused for want of room (not on tenancy grounds).
fn waiting_for_room(decision: &usage::Decision) -> u64 {
    let full = decision
        .refuse
        .iter()
        .filter(|r| r.reason == reason::STORE_FULL);
    u64::try_from(full.count()).unwrap_or(u64::MAX)
}

fn refused_by_tenancy(decision: &usage::Decision) -> bool {
    decision
        .refuse
        .iter()
        .any(|r| r.reason != reason::STORE_FULL)
}

/// The store's tenancy rules, with the namespaces of the copies asking for room judged against
/// its selector on their labels as the API server has them now (a get each, not a watch: only
/// namespaces with a copy waiting are read, and a stale label must not grant room).
async fn tenancy_of(
    store: &StagingStore,
    caches: &[TemplateCache],
    ctx: &Context,
) -> Result<Tenancy, Error> {
    let name = store.name_any();
    let quota = match &store.spec.namespace_quota {
        Some(q) => Some(quantity_bytes(q).ok_or_else(|| Error::InvalidQuota(name, q.clone()))?),
        None => None,
    };
    let selector = store.spec.namespace_selector.as_ref();
    let mut outside = BTreeSet::new();
    if selector.is_some() {
        let asking: BTreeSet<String> = usage::requests(caches)
            .filter_map(|(index, _)| caches[index].namespace())
            .collect();
        let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
        for namespace in asking {
            // A namespace that is gone has no labels: it is outside any selector.
            let labels = namespaces
                .get_opt(&namespace)
                .await?
                .and_then(|n| n.metadata.labels)
                .unwrap_or_default();
            if !tenancy::selects(selector, &labels) {
                outside.insert(namespace);
            }
        }
    }
    Ok(Tenancy {
        outside,
        selector: tenancy::describe(selector),
        quota,
    })
}

/// Marks an unreferenced Ready cache `Evicted`, only if no claim or Pod names it (by a live
/// list) and it is unchanged since it was read. Returns false when it is held or changed
/// (typically: it gained a reference), leaving it as it is.
async fn evict(cache: &TemplateCache, store: &str, ctx: &Context) -> Result<bool, Error> {
    // A claim or Pod whose reference is still to be committed already holds the cache.
    if group_commit::unbound_consumers(cache, ctx).await? > 0 {
        return Ok(false);
    }
    let mut conditions = cache
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let message = reason::evicted_removing(store);
    let generation = cache.metadata.generation;
    set_condition(
        &mut conditions,
        condition(READY, false, reason::EVICTED, message.clone(), generation),
    );
    let patch = writes::status_merge(
        cache.resource_version().as_deref(),
        json!({"phase": Phase::Evicted, "conditions": conditions}),
    );
    match merge_status(cache, &patch, ctx)
        .await
        .unless_gone()
        .or_version_conflict(&cache.name_any())
    {
        Ok(Some(_)) => {
            info!(cache = %cache.name_any(), store, "evicted");
            ctx.metrics.evictions.inc();
            ctx.events
                .publish(cache, EventType::Normal, reason::EVICTED, &message, "Evict")
                .await;
            Ok(true)
        }
        // Changed since we read it (a new reference, a new attempt) or gone: it stays.
        Ok(None) | Err(Error::Conflict(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes the store's answer to a copy's request for room, when it differs from the last one.
async fn grant(
    cache: &TemplateCache,
    bytes: u64,
    refusal: Option<&Refusal>,
    ctx: &Context,
) -> Result<(), Error> {
    let status = cache.status.as_ref();
    let answer = StorageAdmission {
        attempt: status.and_then(|s| s.attempt).unwrap_or(0),
        admitted: refusal.is_none(),
        bytes: Some(bytes),
        message: refusal.map(|r| r.message.clone()),
        reason: refusal.map(|r| r.reason.to_owned()),
    };
    if status.and_then(|s| s.storage.as_ref()) == Some(&answer) {
        return Ok(());
    }
    if let Some(refusal) = refusal {
        warn!(cache = %cache.name_any(), reason = refusal.reason, "{}", refusal.message);
        ctx.events
            .publish(
                cache,
                EventType::Warning,
                refusal.reason,
                &refusal.message,
                "Admit",
            )
            .await;
    }
    let patch = writes::status_merge(None, json!({"storage": answer}));
    merge_status(cache, &patch, ctx).await.unless_gone()?;
    Ok(())
}

async fn merge_status(
    cache: &TemplateCache,
    patch: &Patch<serde_json::Value>,
    ctx: &Context,
) -> kube::Result<TemplateCache> {
    let api: Api<TemplateCache> =
        Api::namespaced(ctx.client.clone(), &cache.namespace().unwrap_or_default());
    api.patch_status(&cache.name_any(), &PatchParams::default(), patch)
        .await
}

async fn record_usage(
    store: &StagingStore,
    decision: &usage::Decision,
    ctx: &Context,
) -> Result<(), Error> {
    let current = store.status.clone().unwrap_or_default();
    if current.used_bytes == Some(decision.used_bytes) && current.caches == Some(decision.caches) {
        return Ok(());
    }
    let patch = writes::status_merge(
        None,
        json!({"usedBytes": decision.used_bytes, "caches": decision.caches}),
    );
    ctx.stores()
        .patch_status(&store.name_any(), &PatchParams::default(), &patch)
        .await?;
    Ok(())
}
