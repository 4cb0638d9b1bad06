//! Group commit of references: one reconcile of a cache adds the reference of every claim and
//! gated Pod that names it and is not on it yet, and removes the reference of every claim or
//! Pod that is gone, in **one** patch of the cache's finalizers. Consumers never write to the
//! cache (the contract: README, "How it works"), so a storm of N consumers is N creates of their
//! own small objects plus a handful of writes to the one shared object, instead of N writes to it, each
//! serialized by the API server and each costing the object's whole size.
//!
//! Invariants:
//! - A reference is added only for a consumer the operator's watch has shown, and removed only
//!   after a live list (not the watch) confirms its consumer is gone, so a lagging watch can
//!   delay a release but never drop a reference that is still held.
//! - The patch tests the resourceVersion it was computed from, so it never undoes a concurrent
//!   change (a hand-written `ref.templatecache.io/` entry, a removal by a user).
//! - A claim or Pod that names a cache protects it from eviction before its reference lands:
//!   eviction asks [`unbound_consumers`] first, with a live list, as PVC protection does. A
//!   cache being deleted takes no new reference (the API server refuses new finalizers on it),
//!   so its deletion waits for the references it holds; claims that came too late wait for the
//!   cache to be made again (from their template) instead of holding a cache on its way out.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::{debug, info};

use super::context::Context;
use super::error::Error;
use super::writes::{self, Answer};
use templatecache_api::names::{CLEANUP_FINALIZER, POD_CACHE_LABEL};
use templatecache_api::references::{
    claim_reference, count_references, is_operator_reference, is_reference, operator_reference_uid,
    pod_reference, volume_reference,
};
use templatecache_api::{TemplateCache, TemplateCacheClaim};

/// Rounds of read-again-and-retry when the cache changed under a commit.
const COMMIT_ROUNDS: u32 = 4;

/// Whether `claim` should hold a reference on `cache`: it names the cache, is not being deleted,
/// and asks for the cache's own spec (if it asks for one). A cache being deleted takes no new
/// reference (the API server refuses new finalizers on an object being deleted): the claim
/// waits for the cache to be made again.
pub fn claim_may_bind(claim: &TemplateCacheClaim, cache: &TemplateCache) -> bool {
    claim.metadata.deletion_timestamp.is_none()
        && cache.metadata.deletion_timestamp.is_none()
        && claim.spec.cache_name == cache.name_any()
        && claim.namespace() == cache.namespace()
        && template_matches(claim, cache)
}

/// True unless the claim carries a template that differs from the cache's spec.
pub fn template_matches(claim: &TemplateCacheClaim, cache: &TemplateCache) -> bool {
    claim
        .spec
        .template
        .as_ref()
        .is_none_or(|template| *template == cache.spec)
}

/// Whether `pod` should hold a reference on `cache`: it names the cache and has not finished,
/// and the cache is not being deleted.
pub fn pod_may_bind(pod: &Pod, cache: &TemplateCache) -> bool {
    !has_finished(pod)
        && cache.metadata.deletion_timestamp.is_none()
        && pod.labels().get(POD_CACHE_LABEL) == Some(&cache.name_any())
        && pod.namespace() == cache.namespace()
}

/// True for a Pod that ran to completion: it no longer reads the data.
pub fn has_finished(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// Whether `volume` (a PersistentVolumeClaim whose `dataSourceRef` names `cache`) should hold a
/// reference on it: it is not being deleted and not yet bound (its fill is to come or under
/// way), and the cache is not being deleted. Once bound, its volume holds the data and the
/// cache may go.
pub fn volume_may_bind(volume: &PersistentVolumeClaim, cache: &TemplateCache) -> bool {
    volume_waits_for_fill(volume)
        && cache.metadata.deletion_timestamp.is_none()
        && volume.namespace() == cache.namespace()
        && super::watched::cache_of_volume(volume).is_some_and(|key| key.name == cache.name_any())
}

/// A claim not being deleted and not bound: its fill is to come or under way.
pub fn volume_waits_for_fill(volume: &PersistentVolumeClaim) -> bool {
    let bound = volume.spec.as_ref().and_then(|s| s.volume_name.as_deref());
    volume.metadata.deletion_timestamp.is_none() && bound.is_none_or(str::is_empty)
}

/// The consumers of one cache, as some view (the watch, or a live list) shows them.
pub struct Consumers<'a> {
    pub claims: &'a [Arc<TemplateCacheClaim>],
    pub pods: &'a [Arc<Pod>],
    pub volumes: &'a [Arc<PersistentVolumeClaim>],
}

impl Consumers<'_> {
    /// References of consumers that should hold one, oldest consumer first (first come, first
    /// served when the cache's reference limit is reached).
    fn wanted(&self, cache: &TemplateCache) -> Vec<String> {
        let mut wanted: Vec<(Option<Time>, String)> = vec![];
        for claim in self.claims.iter().filter(|c| claim_may_bind(c, cache)) {
            if let Some(uid) = claim.uid() {
                let created = claim.metadata.creation_timestamp.clone();
                wanted.push((created, claim_reference(&uid)));
            }
        }
        for pod in self.pods.iter().filter(|p| pod_may_bind(p, cache)) {
            if let Some(uid) = pod.uid() {
                let created = pod.metadata.creation_timestamp.clone();
                wanted.push((created, pod_reference(&uid)));
            }
        }
        for volume in self.volumes.iter().filter(|v| volume_may_bind(v, cache)) {
            if let Some(uid) = volume.uid() {
                let created = volume.metadata.creation_timestamp.clone();
                wanted.push((created, volume_reference(&uid)));
            }
        }
        wanted.sort_by(|a, b| {
            (a.0.as_ref().map(|t| t.0), &a.1).cmp(&(b.0.as_ref().map(|t| t.0), &b.1))
        });
        wanted.into_iter().map(|(_, reference)| reference).collect()
    }

    /// UIDs of the claims, Pods and volumes that still need the cache (Pods that still run,
    /// volumes not filled yet): whose references must stay.
    fn live(&self) -> BTreeSet<String> {
        let claims = self
            .claims
            .iter()
            .filter(|c| c.metadata.deletion_timestamp.is_none())
            .filter_map(|c| c.uid());
        let pods = self
            .pods
            .iter()
            .filter(|p| !has_finished(p))
            .filter_map(|p| p.uid());
        let volumes = self
            .volumes
            .iter()
            .filter(|v| volume_waits_for_fill(v))
            .filter_map(|v| v.uid());
        claims.chain(pods).chain(volumes).collect()
    }
}

/// What one commit changes in a cache's finalizers.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub add: Vec<String>,
    pub remove: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    fn touches_references(&self) -> bool {
        !self.remove.is_empty() || self.add.iter().any(|f| is_reference(f))
    }

    /// `finalizers` with this change made: removals dropped, additions appended once.
    pub fn applied_to(&self, finalizers: &[String]) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let kept = finalizers
            .iter()
            .filter(|f| !self.remove.contains(f))
            .chain(&self.add)
            .filter(|f| seen.insert(f.as_str()));
        kept.cloned().collect()
    }
}

/// The change that brings `cache`'s operator references in line with `consumers`: every wanted
/// reference missing (while the cache holds fewer than `limit` references) is added; every
/// operator reference whose consumer is not live is removed when `may_remove` (the view is
/// complete). Hand-written references are never touched. A live cache also gets the cleanup
/// finalizer here, so the first commit costs no extra write.
pub fn changes(
    cache: &TemplateCache,
    consumers: &Consumers,
    limit: usize,
    may_remove: bool,
) -> Changes {
    let present: BTreeSet<&str> = cache.finalizers().iter().map(String::as_str).collect();
    let live = consumers.live();
    let remove: Vec<String> = if may_remove {
        present
            .iter()
            .filter(|f| is_operator_reference(f))
            .filter(|f| !live.contains(operator_reference_uid(f).unwrap_or_default()))
            .map(|f| f.to_string())
            .collect()
    } else {
        vec![]
    };
    let held = present.iter().filter(|f| is_reference(f)).count() - remove.len();
    let room = limit.saturating_sub(held);
    let mut add: Vec<String> = consumers
        .wanted(cache)
        .into_iter()
        .filter(|r| !present.contains(r.as_str()))
        .take(room)
        .collect();
    if cache.metadata.deletion_timestamp.is_none() && !present.contains(CLEANUP_FINALIZER) {
        add.insert(0, CLEANUP_FINALIZER.to_owned());
    }
    Changes { add, remove }
}

/// Brings the cache's references in line with its claims and Pods, in one patch. Returns the
/// cache as it is after the commit, and when to look again if the commit had to wait its turn.
pub async fn commit(
    cache: Arc<TemplateCache>,
    ctx: &Context,
) -> Result<(Arc<TemplateCache>, Option<Duration>), Error> {
    let key = ObjectRef::from_obj(&*cache);
    let claims = ctx.watched.claims_of(&key);
    let pods = ctx.watched.pods_of(&key);
    let volumes = ctx.watched.volumes_of(&key);
    let view = Consumers {
        claims: &claims,
        pods: &pods,
        volumes: &volumes,
    };
    let limit = ctx.config.max_references;
    let mut wanted = changes(&cache, &view, limit, ctx.watched.synced());
    if wanted.is_empty() {
        return Ok((cache, None));
    }
    if !wanted.remove.is_empty() {
        wanted.remove = confirmed_gone(&cache, &wanted.remove, ctx).await?;
    }
    if wanted.is_empty() {
        return Ok((cache, None));
    }
    let pace_key = format!(
        "{}/{}",
        key.namespace.as_deref().unwrap_or_default(),
        key.name
    );
    if let Some(wait) = ctx.reference_commits.wait(&pace_key) {
        return Ok((cache, Some(wait)));
    }
    let started = Instant::now();
    let mut current = cache;
    for _ in 0..COMMIT_ROUNDS {
        let committed = match lower_count_before_removal(current.clone(), &wanted, ctx).await {
            Ok(lowered) => {
                current = lowered;
                patch_finalizers(&current, &wanted, ctx).await
            }
            Err(e) => Err(e),
        };
        match committed {
            Ok(updated) => {
                // Only a commit of references opens a batch window: a cache's first commit of
                // its cleanup finalizer alone must not delay its first consumers.
                if wanted.touches_references() {
                    ctx.reference_commits.done(&pace_key, started);
                }
                record(&updated, &wanted, ctx);
                return Ok((Arc::new(updated), None));
            }
            Err(Error::Conflict(name)) => {
                let api = caches_of(&current, ctx);
                let Some(fresh) = api.get_opt(&current.name_any()).await? else {
                    return Ok((current, None));
                };
                if fresh.resource_version() == current.resource_version() {
                    // Not a change under us: the API server refused the patch itself.
                    return Err(Error::Refused(name));
                }
                // The consumers are the same; only the cache moved on. Removals stay confirmed.
                let remove = std::mem::take(&mut wanted.remove);
                wanted = changes(&fresh, &view, limit, false);
                wanted.remove = remove
                    .into_iter()
                    .filter(|r| fresh.finalizers().contains(r))
                    .collect();
                current = Arc::new(fresh);
                if wanted.is_empty() {
                    return Ok((current, None));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::Conflict(current.name_any()))
}

/// The recorded count is written after the references it counts, so it never shows more
/// references than the object holds: up after an addition, and before a removal (here), down.
/// Written only on the version the removal was computed from (a stale view could record more
/// than the cache holds); the finalizer patch then tests the version this write made.
async fn lower_count_before_removal(
    cache: Arc<TemplateCache>,
    changes: &Changes,
    ctx: &Context,
) -> Result<Arc<TemplateCache>, Error> {
    let recorded = cache.status.as_ref().and_then(|s| s.ref_count);
    let after = count_references(&changes.applied_to(cache.finalizers()));
    if changes.remove.is_empty() || recorded.is_none_or(|r| r <= after) {
        return Ok(cache);
    }
    let patch = writes::status_merge(
        cache.resource_version().as_deref(),
        json!({"refCount": after, "lastReferenced": Time(Timestamp::now())}),
    );
    let lowered = caches_of(&cache, ctx)
        .patch_status(&cache.name_any(), &PatchParams::default(), &patch)
        .await
        .unless_gone()
        .or_version_conflict(&cache.name_any())?;
    Ok(lowered.map_or(cache, Arc::new))
}

fn record(cache: &TemplateCache, changes: &Changes, ctx: &Context) {
    let added = changes.add.iter().filter(|r| is_reference(r)).count();
    ctx.metrics.reference_commits.inc();
    ctx.metrics.references_added.inc_by(added as u64);
    ctx.metrics
        .references_removed
        .inc_by(changes.remove.len() as u64);
    debug!(cache = %cache.name_any(), added, removed = changes.remove.len(), "references committed");
    if !changes.remove.is_empty() {
        info!(cache = %cache.name_any(), removed = changes.remove.len(), "released references of claims and Pods that are gone");
    }
}

/// The finalizers replaced by their changed list, under a test of the resourceVersion the change
/// was computed from: a concurrent change fails the patch (a conflict) instead of being undone.
async fn patch_finalizers(
    cache: &TemplateCache,
    changes: &Changes,
    ctx: &Context,
) -> Result<TemplateCache, Error> {
    let finalizers = changes.applied_to(cache.finalizers());
    let patch = writes::json_patch(vec![
        writes::test(
            writes::pointer(["metadata", "resourceVersion"]),
            cache.resource_version(),
        )?,
        writes::add(writes::pointer(["metadata", "finalizers"]), finalizers)?,
    ]);
    caches_of(cache, ctx)
        .patch(&cache.name_any(), &PatchParams::default(), &patch)
        .await
        .or_conflict(&cache.name_any())
}

fn caches_of(cache: &TemplateCache, ctx: &Context) -> Api<TemplateCache> {
    Api::namespaced(ctx.client.clone(), &cache.namespace().unwrap_or_default())
}

/// The claims and Pods that name `cache`, read live from the API server (never from a watch):
/// what removals and protections are decided on.
/// A cache's consumers as a live list shows them.
struct Listed {
    claims: Vec<Arc<TemplateCacheClaim>>,
    pods: Vec<Arc<Pod>>,
    volumes: Vec<Arc<PersistentVolumeClaim>>,
}

impl Listed {
    fn view(&self) -> Consumers<'_> {
        Consumers {
            claims: &self.claims,
            pods: &self.pods,
            volumes: &self.volumes,
        }
    }
}

/// The claims, Pods and volumes that name `cache`, listed from the API server. No selector
/// finds a volume by its `dataSourceRef`: the namespace's claims are listed and filtered.
async fn live_consumers(cache: &TemplateCache, ctx: &Context) -> Result<Listed, Error> {
    let namespace = cache.namespace().unwrap_or_default();
    let name = cache.name_any();
    let claims: Api<TemplateCacheClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let volumes: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let by_name = ListParams::default().fields(&format!("spec.cacheName={name}"));
    let by_label = ListParams::default().labels(&format!("{POD_CACHE_LABEL}={name}"));
    let every = ListParams::default();
    let (claims, pods, volumes) = futures::try_join!(
        claims.list(&by_name),
        pods.list(&by_label),
        volumes.list(&every)
    )?;
    let names_cache = |v: &PersistentVolumeClaim| {
        super::watched::cache_of_volume(v).is_some_and(|key| key.name == name)
    };
    Ok(Listed {
        claims: claims.items.into_iter().map(Arc::new).collect(),
        pods: pods.items.into_iter().map(Arc::new).collect(),
        volumes: (volumes.items.into_iter())
            .filter(names_cache)
            .map(Arc::new)
            .collect(),
    })
}

/// Of the references in `candidates`, those whose claim or Pod a live list confirms is gone (or
/// finished): only these may be removed.
async fn confirmed_gone(
    cache: &TemplateCache,
    candidates: &[String],
    ctx: &Context,
) -> Result<Vec<String>, Error> {
    let live = live_consumers(cache, ctx).await?.view().live();
    Ok(candidates
        .iter()
        .filter(|f| !live.contains(operator_reference_uid(f).unwrap_or_default()))
        .cloned()
        .collect())
}

/// How many claims and Pods, by a live list, should hold a reference on `cache` but do not yet
/// (their commit is still to come). While any do, the cache is not evicted.
pub async fn unbound_consumers(cache: &TemplateCache, ctx: &Context) -> Result<usize, Error> {
    let listed = live_consumers(cache, ctx).await?;
    let present: BTreeSet<&str> = cache.finalizers().iter().map(String::as_str).collect();
    let wanted = listed.view().wanted(cache);
    Ok(wanted
        .iter()
        .filter(|r| !present.contains(r.as_str()))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures;
    use kube::api::ObjectMeta;
    use serde_json::json;

    fn cache(finalizers: &[&str]) -> TemplateCache {
        fixtures::holding(
            fixtures::cache("img", json!(null)),
            finalizers.iter().copied(),
        )
    }

    fn meta(uid: &str, created_secs: i64) -> ObjectMeta {
        ObjectMeta {
            name: Some(format!("n-{uid}")),
            namespace: Some("ns".into()),
            uid: Some(uid.into()),
            creation_timestamp: Some(Time(
                Timestamp::from_second(created_secs).expect("timestamp"),
            )),
            ..Default::default()
        }
    }

    fn claim(uid: &str, created_secs: i64, template_url: Option<&str>) -> Arc<TemplateCacheClaim> {
        let template = template_url.map(|url| json!({"source": {"http": {"url": url}}}));
        let spec = serde_json::from_value(json!({"cacheName": "img", "template": template}))
            .expect("claim spec");
        Arc::new(TemplateCacheClaim {
            metadata: meta(uid, created_secs),
            spec,
            status: None,
        })
    }

    fn pod(uid: &str, created_secs: i64, phase: &str) -> Arc<Pod> {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"labels": {POD_CACHE_LABEL: "img"}},
            "status": {"phase": phase},
        }))
        .expect("pod");
        let labels = pod.metadata.labels.take();
        pod.metadata = meta(uid, created_secs);
        pod.metadata.labels = labels;
        Arc::new(pod)
    }

    #[test]
    fn one_commit_adds_every_new_consumer_and_removes_every_gone_one() {
        let cache = cache(&[
            CLEANUP_FINALIZER,
            "claim.ref.templatecache.io/gone",
            "claim.ref.templatecache.io/kept",
            "ref.templatecache.io/by-hand",
            "pod.ref.templatecache.io/finished",
        ]);
        let claims = [claim("kept", 1, None), claim("new", 2, None)];
        let pods = [
            pod("finished", 1, "Succeeded"),
            pod("running", 3, "Pending"),
        ];
        let view = Consumers {
            claims: &claims,
            pods: &pods,
            volumes: &[],
        };
        let change = changes(&cache, &view, 100, true);
        assert_eq!(
            change.add,
            [
                "claim.ref.templatecache.io/new",
                "pod.ref.templatecache.io/running"
            ]
        );
        assert_eq!(
            change.remove,
            [
                "claim.ref.templatecache.io/gone",
                "pod.ref.templatecache.io/finished"
            ]
        );
        let after = change.applied_to(cache.finalizers());
        assert!(after.contains(&"ref.templatecache.io/by-hand".to_owned()));
        assert_eq!(after.len(), 5);

        let incomplete_view = changes(&cache, &view, 100, false);
        assert!(
            incomplete_view.remove.is_empty(),
            "no removal on a view still syncing"
        );
    }

    #[test]
    fn a_claim_with_another_template_gets_no_reference() {
        let cache = cache(&[CLEANUP_FINALIZER]);
        let claims = [
            claim("same", 1, Some("http://example/x")),
            claim("other", 1, Some("http://example/other")),
        ];
        let view = Consumers {
            claims: &claims,
            pods: &[],
            volumes: &[],
        };
        assert_eq!(
            changes(&cache, &view, 100, true).add,
            ["claim.ref.templatecache.io/same"]
        );
    }

    #[test]
    fn a_deleting_cache_takes_no_new_reference_and_keeps_the_ones_it_holds() {
        let mut cache = cache(&[CLEANUP_FINALIZER, "claim.ref.templatecache.io/held"]);
        cache.metadata.deletion_timestamp =
            Some(Time(Timestamp::from_second(10).expect("timestamp")));
        let claims = [claim("held", 1, None), claim("new", 5, None)];
        let pods = [pod("pod", 3, "Pending")];
        let view = Consumers {
            claims: &claims,
            pods: &pods,
            volumes: &[],
        };
        assert_eq!(changes(&cache, &view, 100, true), Changes::default());
    }

    #[test]
    fn past_the_limit_the_oldest_consumers_are_bound_first_and_nothing_is_dropped() {
        let cache = cache(&[CLEANUP_FINALIZER, "ref.templatecache.io/by-hand"]);
        let claims = [
            claim("late", 9, None),
            claim("early", 1, None),
            claim("mid", 5, None),
        ];
        let view = Consumers {
            claims: &claims,
            pods: &[],
            volumes: &[],
        };
        let change = changes(&cache, &view, 3, true);
        assert_eq!(
            change.add,
            [
                "claim.ref.templatecache.io/early",
                "claim.ref.templatecache.io/mid"
            ]
        );
        assert!(change.remove.is_empty());
    }

    #[test]
    fn a_new_cache_gets_its_cleanup_finalizer_in_the_same_commit() {
        let cache = cache(&[]);
        let claims = [claim("a", 1, None)];
        let view = Consumers {
            claims: &claims,
            pods: &[],
            volumes: &[],
        };
        let change = changes(&cache, &view, 100, true);
        assert_eq!(
            change.add,
            [CLEANUP_FINALIZER, "claim.ref.templatecache.io/a"]
        );
    }
}
