//! The TemplateCacheClaim controller: creates a claim's cache from its template when the cache
//! does not exist, and mirrors into the claim what its reference on the cache means (Bound, then
//! the cache's Ready). It never writes the reference itself: the TemplateCache controller records
//! all of a cache's new references in one commit (see `references`), so this controller writes
//! only to claims, each its own small object, many at once.
//!
//! Every decision is [`claim_status`], a pure function of the claim and the cache as the
//! operator's watch shows them; the watch that woke the reconcile has already stored the cache,
//! so what a claim says is never older than the change that woke it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tracing::info;

use super::context::Context;
use super::error::Error;
use super::group_commit::{claim_may_bind, template_matches};
use super::writes::{self, Answer};
use templatecache_api::conditions::{BOUND, READY, condition, find, set_condition};
use templatecache_api::names::{CLEANUP_FINALIZER, OPERATOR_MANAGER};
use templatecache_api::reasons::cache as cache_reason;
use templatecache_api::reasons::claim as reason;
use templatecache_api::references::{claim_reference, count_references};
use templatecache_api::{
    ClaimPhase, ClaimedCache, Phase, TemplateCache, TemplateCacheClaim, TemplateCacheClaimStatus,
};

/// The status a claim should have, and whether its cache must be created from its template.
#[derive(Debug, PartialEq)]
pub struct ClaimPlan {
    pub status: TemplateCacheClaimStatus,
    pub create_cache: bool,
}

/// Decides a claim's status from the cache as seen (`None` when it does not exist).
/// `reference_limit` is the most references one cache takes.
pub fn claim_status(
    claim: &TemplateCacheClaim,
    cache: Option<&TemplateCache>,
    reference_limit: usize,
) -> ClaimPlan {
    let name = &claim.spec.cache_name;
    let generation = claim.metadata.generation;
    let mut status = claim.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let mut set = |type_: &str, ok: bool, reason: &str, message: String| {
        set_condition(
            &mut status.conditions,
            condition(type_, ok, reason, message, generation),
        );
    };
    let Some(cache) = cache else {
        let (reason, message) = match &claim.spec.template {
            Some(_) => (
                reason::CREATING_CACHE,
                format!("creating TemplateCache {name} from spec.template"),
            ),
            None => (
                reason::CACHE_NOT_FOUND,
                format!(
                    "TemplateCache {name} does not exist; the claim waits for it (set \
                     spec.template to have it created)"
                ),
            ),
        };
        set(BOUND, false, reason, message.clone());
        set(READY, false, reason, message);
        status.phase = Some(ClaimPhase::Pending);
        status.cache = None;
        return ClaimPlan {
            status,
            create_cache: claim.spec.template.is_some(),
        };
    };
    let bound = claim
        .uid()
        .is_some_and(|uid| cache.finalizers().contains(&claim_reference(&uid)));
    if !bound {
        let (phase, reason, message) = unbound(claim, cache, reference_limit);
        set(BOUND, false, reason, message.clone());
        set(READY, false, reason, message);
        status.phase = Some(phase);
        status.cache = None;
        return ClaimPlan {
            status,
            create_cache: false,
        };
    }
    set(
        BOUND,
        true,
        reason::BOUND,
        format!("the claim's reference is on TemplateCache {name}"),
    );
    let (phase, ready, reason, message) = mirrored_readiness(cache);
    set(READY, ready, &reason, message);
    status.phase = Some(phase);
    status.cache = ready.then(|| ClaimedCache {
        store: cache.status.as_ref().and_then(|s| s.store.clone()),
        path: cache.status.as_ref().and_then(|s| s.path.clone()),
        size: cache.status.as_ref().and_then(|s| s.size),
        checksum: cache.status.as_ref().and_then(|s| s.checksum.clone()),
    });
    ClaimPlan {
        status,
        create_cache: false,
    }
}

/// Why a claim whose cache exists holds no reference yet.
fn unbound(
    claim: &TemplateCacheClaim,
    cache: &TemplateCache,
    reference_limit: usize,
) -> (ClaimPhase, &'static str, String) {
    let name = &claim.spec.cache_name;
    if !template_matches(claim, cache) {
        let message = format!(
            "spec.template differs from the spec of the existing TemplateCache {name}; the claim \
             holds no reference (use another cacheName, or no template)"
        );
        return (ClaimPhase::Failed, reason::TEMPLATE_MISMATCH, message);
    }
    if cache.metadata.deletion_timestamp.is_some() {
        let then = match claim.spec.template {
            Some(_) => "binds to it once it is made again from spec.template",
            None => "binds to it if it is made again",
        };
        let message = format!("TemplateCache {name} is being deleted; the claim {then}");
        return (ClaimPhase::Pending, reason::CACHE_DELETING, message);
    }
    if count_references(cache.finalizers()) as usize >= reference_limit {
        let message = format!(
            "TemplateCache {name} holds its limit of {reference_limit} references; the claim \
             binds as soon as one is released"
        );
        return (ClaimPhase::Pending, reason::REFERENCE_LIMIT, message);
    }
    let message = format!("waiting for the reference to be recorded on TemplateCache {name}");
    (ClaimPhase::Pending, reason::BINDING, message)
}

/// A bound claim's phase and Ready condition, from the cache's.
///
/// While the cache is being copied the claim says so in words of its own, not the cache's
/// message: that message names the attempt and its Job and changes as the copy starts, and a
/// claim mirroring it would be written again, for every claim of the cache at once, at each
/// change (1,440 status writes for 1,000 claims in a storm, issue 28). What a claim's user can
/// act on (a store full, a quota, a failed attempt) is still mirrored as the cache says it.
fn mirrored_readiness(cache: &TemplateCache) -> (ClaimPhase, bool, String, String) {
    let status = cache.status.clone().unwrap_or_default();
    let ready = find(&status.conditions, READY);
    let cache_reason = ready.map_or(cache_reason::COPYING, |c| c.reason.as_str());
    let message = match ready {
        Some(c) if cache_reason != cache_reason::COPYING => c.message.clone(),
        _ => format!(
            "TemplateCache {} is being copied; the claim is Ready once it is",
            cache.name_any()
        ),
    };
    if status.phase == Some(Phase::Ready) && ready.is_some_and(|c| c.status == "True") {
        let message = ready.map(|c| c.message.clone()).unwrap_or_default();
        return (ClaimPhase::Ready, true, reason::CACHE_READY.into(), message);
    }
    if cache_reason::FINAL.contains(&cache_reason) {
        return (ClaimPhase::Failed, false, cache_reason.into(), message);
    }
    (ClaimPhase::Bound, false, cache_reason.into(), message)
}

/// How long at most a claim's first Bound write waits for the rest of its storm to be recorded.
const STORM_HOLD: Duration = Duration::from_secs(10);

/// Whether a claim's first Bound write waits for its cache's commits to settle (issue 28).
/// While other claims of the cache still wait to be recorded, the API server's time goes to the
/// commits that record them rather than to N status writes competing with them; this claim's
/// reference is on the cache already (that is what protects it), and its status follows once
/// the storm is recorded, as one write with Ready when the copy is done by then. Only while
/// the claim is younger than [`STORM_HOLD`], so a claim that is never recorded cannot hold
/// the others' status for long.
pub fn waits_for_the_storm(
    claim: &TemplateCacheClaim,
    planned: &TemplateCacheClaimStatus,
    cache: &TemplateCache,
    claims_of_cache: &[Arc<TemplateCacheClaim>],
    reference_limit: usize,
    now: k8s_openapi::jiff::Timestamp,
) -> bool {
    let said_bound = claim
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, BOUND))
        .is_some_and(|c| c.status == "True");
    let young = claim
        .metadata
        .creation_timestamp
        .as_ref()
        .is_some_and(|t| now.duration_since(t.0).unsigned_abs() < STORM_HOLD);
    if said_bound || planned.phase != Some(ClaimPhase::Bound) || !young {
        return false;
    }
    let references: HashSet<&str> = cache.finalizers().iter().map(String::as_str).collect();
    if count_references(cache.finalizers()) as usize >= reference_limit {
        return false;
    }
    claims_of_cache.iter().any(|other| {
        claim_may_bind(other, cache)
            && other
                .uid()
                .is_some_and(|uid| !references.contains(claim_reference(&uid).as_str()))
    })
}

/// Reconciles one claim.
pub async fn reconcile(claim: Arc<TemplateCacheClaim>, ctx: Arc<Context>) -> Result<Action, Error> {
    if claim.metadata.deletion_timestamp.is_some() {
        // Its reference goes with the cache's next commit; nothing to write here.
        return Ok(Action::await_change());
    }
    let namespace = claim.namespace().ok_or(Error::MissingNamespace)?;
    let key = ObjectRef::new(&claim.spec.cache_name).within(&namespace);
    let cache = ctx.watched.cache(&key);
    let plan = claim_status(&claim, cache.as_deref(), ctx.config.max_references);
    let creation = format!("{namespace}/{}", claim.spec.cache_name);
    if plan.create_cache {
        if let Some(wait) = ctx.cache_creations.wait(&creation) {
            // Another claim has just created it; the watch shows it in a moment.
            return Ok(Action::requeue(wait));
        }
        let started = std::time::Instant::now();
        create_cache(&claim, &namespace, &ctx).await?;
        ctx.cache_creations.done(&creation, started);
    }
    if claim.status.is_none() && is_transient(&plan.status) {
        // Being bound within moments: a storm of claims costs no extra write for it.
        return Ok(Action::await_change());
    }
    if let Some(cache) = &cache {
        let claims_of_cache = ctx.watched.claims_of(&key);
        let now = k8s_openapi::jiff::Timestamp::now();
        let limit = ctx.config.max_references;
        if waits_for_the_storm(&claim, &plan.status, cache, &claims_of_cache, limit, now) {
            // The next commit wakes it; the requeue is the backstop for the hold's end.
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
    }
    write_status(&claim, &plan.status, &namespace, &ctx).await?;
    Ok(Action::await_change())
}

/// A status a claim holds only for the moments until the next reference commit: the cache is
/// being created, or the claim is waiting for its batch.
fn is_transient(status: &TemplateCacheClaimStatus) -> bool {
    find(&status.conditions, BOUND)
        .is_some_and(|c| [reason::CREATING_CACHE, reason::BINDING].contains(&c.reason.as_str()))
}

/// Creates the claim's cache from its template, with the claim's reference already on it. Its
/// name is the claim's `cacheName`, so of several claims racing to create it one wins and the
/// others are bound by the cache's next commit.
async fn create_cache(
    claim: &TemplateCacheClaim,
    namespace: &str,
    ctx: &Context,
) -> Result<(), Error> {
    let (Some(template), Some(uid)) = (&claim.spec.template, claim.uid()) else {
        return Ok(());
    };
    let name = &claim.spec.cache_name;
    let mut cache = TemplateCache::new(name, template.clone());
    cache.metadata.finalizers = Some(vec![CLEANUP_FINALIZER.to_owned(), claim_reference(&uid)]);
    let api: Api<TemplateCache> = Api::namespaced(ctx.client.clone(), namespace);
    let params = PostParams {
        field_manager: Some(OPERATOR_MANAGER.to_owned()),
        ..Default::default()
    };
    match api.create(&params, &cache).await {
        Ok(created) => {
            info!(cache = %name, claim = %claim.name_any(), "created the cache from the claim's template");
            let note = format!(
                "created TemplateCache {name} from the template of claim {}",
                claim.name_any()
            );
            ctx.events
                .publish(
                    &created,
                    EventType::Normal,
                    "CreatedFromClaim",
                    &note,
                    "Create",
                )
                .await;
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.reason == "AlreadyExists" => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes the claim's status when it differs from what the claim shows.
async fn write_status(
    claim: &TemplateCacheClaim,
    desired: &TemplateCacheClaimStatus,
    namespace: &str,
    ctx: &Context,
) -> Result<(), Error> {
    if claim.status.as_ref() == Some(desired) {
        return Ok(());
    }
    let api: Api<TemplateCacheClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = writes::status_merge(None, serde_json::to_value(desired)?);
    // Deleted meanwhile: nothing to tell.
    api.patch_status(&claim.name_any(), &PatchParams::default(), &patch)
        .await
        .unless_gone()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    fn claim(template: Option<&str>) -> TemplateCacheClaim {
        let template = template.map(|url| json!({"source": {"http": {"url": url}}}));
        let mut claim = TemplateCacheClaim::new(
            "vm-1",
            serde_json::from_value(json!({"cacheName": "img", "template": template}))
                .expect("spec"),
        );
        claim.metadata.namespace = Some("ns".into());
        claim.metadata.uid = Some("uid-1".into());
        claim
    }

    fn cache(finalizers: &[&str], status: serde_json::Value) -> TemplateCache {
        fixtures::holding(fixtures::cache("img", status), finalizers.iter().copied())
    }

    /// A cache with `finalizers` in `phase`, whose Ready condition is `ready` for `reason`.
    fn cache_in(
        finalizers: &[&str],
        phase: &str,
        ready: bool,
        reason: &str,
        message: &str,
    ) -> TemplateCache {
        let status = if ready { "True" } else { "False" };
        cache(
            finalizers,
            json!({"phase": phase, "conditions": [
                {"type": "Ready", "status": status, "reason": reason, "message": message,
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
        )
    }

    fn reason_of(plan: &ClaimPlan, type_: &str) -> String {
        find(&plan.status.conditions, type_)
            .map(|c| c.reason.clone())
            .unwrap_or_default()
    }

    const MINE: &str = "claim.ref.templatecache.io/uid-1";

    #[test]
    fn a_missing_cache_is_created_only_from_a_template() {
        let with = claim_status(&claim(Some("http://example/x")), None, 100);
        assert!(with.create_cache);
        assert_eq!(reason_of(&with, BOUND), reason::CREATING_CACHE);
        let without = claim_status(&claim(None), None, 100);
        assert!(!without.create_cache);
        assert_eq!(without.status.phase, Some(ClaimPhase::Pending));
        assert_eq!(reason_of(&without, READY), reason::CACHE_NOT_FOUND);
    }

    #[test]
    fn bound_then_ready_as_the_cache_says() {
        let copying = cache_in(&[MINE], "Copying", false, "Copying", "copying");
        let plan = claim_status(&claim(None), Some(&copying), 100);
        assert_eq!(plan.status.phase, Some(ClaimPhase::Bound));
        assert_eq!(reason_of(&plan, BOUND), reason::BOUND);
        assert_eq!(reason_of(&plan, READY), "Copying");

        let mut ready = cache_in(&[MINE], "Ready", true, "Copied", "copied");
        let data = ready.status.as_mut().expect("status");
        data.path = Some("ns/img".into());
        data.size = Some(3);
        data.checksum = Some("sha256:00".into());
        let plan = claim_status(&claim(None), Some(&ready), 100);
        assert_eq!(plan.status.phase, Some(ClaimPhase::Ready));
        assert_eq!(plan.status.cache.as_ref().and_then(|c| c.size), Some(3));
    }

    /// Issue 28: the steps of a copy (the cache looked at, each attempt's Job) leave a bound
    /// claim's status as it is, so they cost no write per claim; a reason its user can act on
    /// still reaches it.
    #[test]
    fn a_bound_claims_status_stays_as_it_is_while_its_cache_is_copied() {
        let mut bound = claim(None);
        let unseen = cache(&[MINE], json!({}));
        bound.status = Some(claim_status(&bound, Some(&unseen), 100).status);
        for attempt in ["attempt 1: Job img-copy-1", "attempt 2: Job img-copy-2"] {
            let copying = cache_in(&[MINE], "Copying", false, "Copying", attempt);
            let plan = claim_status(&bound, Some(&copying), 100);
            assert_eq!(Some(&plan.status), bound.status.as_ref(), "{attempt}");
        }
        let full = cache_in(&[MINE], "Pending", false, "StoreFull", "store full");
        let plan = claim_status(&bound, Some(&full), 100);
        assert_eq!(reason_of(&plan, READY), "StoreFull");
        let ready = find(&plan.status.conditions, READY).expect("Ready");
        assert_eq!(ready.message, "store full");
    }

    /// A claim made at `created` (seconds after the epoch) with uid `uid`, naming `img`.
    fn claim_made(uid: &str, created: i64) -> TemplateCacheClaim {
        let mut made = claim(None);
        made.metadata.uid = Some(uid.into());
        made.metadata.creation_timestamp =
            Some(Time(Timestamp::from_second(created).expect("time")));
        made
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("time")
    }

    /// Issue 28: a claim recorded in the middle of a storm says Bound once the rest of the storm
    /// is recorded, so its status write never competes with the commits; never longer than the
    /// hold, never for a claim that cannot be recorded, never once it has said Bound.
    #[test]
    fn a_bound_claims_first_write_waits_while_others_of_its_storm_are_unrecorded() {
        let mine = claim_made("uid-1", 1_000);
        let other = Arc::new(claim_made("uid-2", 1_000));
        let copying = cache_in(&[MINE], "Copying", false, "Copying", "copying");
        let planned = claim_status(&mine, Some(&copying), 100).status;
        let waits = |claim: &TemplateCacheClaim, cache: &TemplateCache, now: i64| {
            let others = [Arc::new(claim.clone()), other.clone()];
            waits_for_the_storm(claim, &planned, cache, &others, 100, at(now))
        };
        assert!(
            waits(&mine, &copying, 1_002),
            "the other claim is unrecorded"
        );

        let both = cache_in(
            &[MINE, "claim.ref.templatecache.io/uid-2"],
            "Copying",
            false,
            "Copying",
            "copying",
        );
        assert!(!waits(&mine, &both, 1_002), "the storm is recorded");
        assert!(
            !waits(&mine, &copying, 1_011),
            "held no longer than the hold"
        );
        let others = std::slice::from_ref(&other);
        let full = waits_for_the_storm(&mine, &planned, &copying, others, 1, at(1_002));
        assert!(
            !full,
            "the other can never be recorded: the cache is at its limit"
        );

        let mut said = mine.clone();
        said.status = Some(planned.clone());
        assert!(!waits(&said, &copying, 1_002), "it said Bound already");

        let ready = cache_in(&[MINE], "Ready", true, "Copied", "copied");
        let ready_plan = claim_status(&mine, Some(&ready), 100).status;
        let others = [other.clone()];
        assert!(
            !waits_for_the_storm(&mine, &ready_plan, &ready, &others, 100, at(1_002)),
            "Ready is written at once"
        );
    }

    #[test]
    fn ready_is_never_claimed_without_the_reference() {
        let ready = cache_in(&[], "Ready", true, "Copied", "copied");
        let plan = claim_status(&claim(None), Some(&ready), 100);
        assert_eq!(plan.status.phase, Some(ClaimPhase::Pending));
        assert_eq!(reason_of(&plan, READY), reason::BINDING);
    }

    #[test]
    fn a_copy_that_failed_for_good_fails_the_claim_with_the_caches_message() {
        let failed = cache_in(
            &[MINE],
            "Failed",
            false,
            "RetriesExhausted",
            "attempt 5 of 5 failed: 404",
        );
        let plan = claim_status(&claim(None), Some(&failed), 100);
        assert_eq!(plan.status.phase, Some(ClaimPhase::Failed));
        let ready = find(&plan.status.conditions, READY).expect("Ready");
        assert!(ready.message.contains("404"));

        // A refused address is final on the cache: a claim that stayed Bound would keep its
        // consumer waiting until its own timeout.
        let refused = cache_in(
            &[MINE],
            "Failed",
            false,
            "AddressNotAllowed",
            "127.0.0.1 is a loopback address",
        );
        let plan = claim_status(&claim(None), Some(&refused), 100);
        assert_eq!(plan.status.phase, Some(ClaimPhase::Failed));
        assert_eq!(reason_of(&plan, READY), "AddressNotAllowed");

        // Between attempts the cache is Failed too, but the claim waits for the next attempt.
        let retrying = cache_in(&[MINE], "Failed", false, "CopyFailed", "attempt 1 of 5");
        let plan = claim_status(&claim(None), Some(&retrying), 100);
        assert_eq!(plan.status.phase, Some(ClaimPhase::Bound));
    }

    #[test]
    fn unbound_claims_say_why() {
        let other = claim_status(
            &claim(Some("http://example/other")),
            Some(&cache(&[], json!(null))),
            100,
        );
        assert_eq!(other.status.phase, Some(ClaimPhase::Failed));
        assert_eq!(reason_of(&other, BOUND), reason::TEMPLATE_MISMATCH);

        let mut deleting = cache(&["ref.templatecache.io/x"], json!(null));
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let plan = claim_status(&claim(Some("http://example/x")), Some(&deleting), 100);
        assert_eq!(plan.status.phase, Some(ClaimPhase::Pending));
        assert_eq!(reason_of(&plan, BOUND), reason::CACHE_DELETING);
        assert!(
            !plan.create_cache,
            "a cache being deleted is made again only once it is gone"
        );

        let full = cache(
            &["ref.templatecache.io/a", "ref.templatecache.io/b"],
            json!(null),
        );
        let plan = claim_status(&claim(None), Some(&full), 2);
        assert_eq!(plan.status.phase, Some(ClaimPhase::Pending));
        assert_eq!(reason_of(&plan, BOUND), reason::REFERENCE_LIMIT);
    }
}
