//! What a StagingStore holds and what to do about it, as a pure function of its caches: the bytes
//! in use, which copies may start (room is reserved before a byte is written), and which
//! unreferenced caches to evict, least recently referenced first. No I/O here.
//!
//! Bytes are counted from the caches' status, never from the volume: a Ready, Evicted (data not
//! yet removed) or Deleting cache counts its `size`; a copy counts the room reserved for it, and
//! so does a failed one that a later attempt may resume (its partial file stays).
//!
//! A copy is first judged by the store's tenancy rules (its namespace must be selected and stay
//! within its quota), then by the room left: a copy refused on tenancy grounds reserves nothing
//! and evicts nothing, so one namespace cannot push another's caches out.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::tenancy::Tenancy;
use templatecache_api::conditions::{READY, find};
use templatecache_api::reasons::cache as reason;
use templatecache_api::references::count_references;
use templatecache_api::{EvictionPolicy, Phase, TemplateCache, TemplateCacheStatus};

/// What the store controller should do now.
#[derive(Debug, Default, PartialEq)]
pub struct Decision {
    /// Bytes the store's caches hold or have reserved.
    pub used_bytes: u64,
    /// Caches holding or reserving bytes.
    pub caches: u32,
    /// Bytes of the caches eviction may take, now or once unused for `minUnusedSeconds`
    /// (Ready, unreferenced, not being deleted): a store past its high watermark with none
    /// can only be helped by a person.
    pub evictable_bytes: u64,
    /// Indices (into the caches given) to evict, in order.
    pub evict: Vec<usize>,
    /// Indices of copies granted room, with the bytes reserved.
    pub admit: Vec<(usize, u64)>,
    /// Copies refused room for now.
    pub refuse: Vec<Refusal>,
    /// When to look again even if nothing changes (an unreferenced cache reaching
    /// `minUnusedSeconds` while the store is over its high watermark or a copy waits).
    pub recheck_after: Option<Duration>,
}

/// A copy refused room: which (index into the caches given), the bytes it asked for, the
/// Ready reason and a message that says what to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub index: usize,
    pub bytes: u64,
    pub reason: &'static str,
    pub message: String,
}

/// Decides for one store of `capacity` bytes holding `caches`, under its `tenancy` rules.
pub fn decide(
    store: &str,
    capacity: u64,
    policy: &EvictionPolicy,
    tenancy: &Tenancy,
    caches: &[TemplateCache],
    now: Timestamp,
) -> Decision {
    let occupied: Vec<u64> = caches.iter().map(occupied_bytes).collect();
    let mut used: u64 = occupied.iter().sum();
    let mut held = held_per_namespace(caches, &occupied);
    let mut decision = Decision {
        used_bytes: used,
        caches: u32::try_from(occupied.iter().filter(|b| **b > 0).count()).unwrap_or(u32::MAX),
        evictable_bytes: caches
            .iter()
            .zip(&occupied)
            .filter(|(cache, _)| unused_since(cache).is_some())
            .map(|(_, bytes)| bytes)
            .sum(),
        ..Decision::default()
    };
    let min_unused = Duration::from_secs(policy.min_unused_seconds);
    let mut candidates = eviction_candidates(caches, now, min_unused);
    let mut evicting = false;

    for (index, bytes) in requests(caches) {
        let namespace = caches[index].namespace().unwrap_or_default();
        let held_here = held.get(&namespace).copied().unwrap_or(0);
        if let Some(refusal) = tenancy.judge(store, &namespace, bytes, held_here) {
            let (reason, message) = (refusal.reason, refusal.message);
            decision.refuse.push(Refusal {
                index,
                bytes,
                reason,
                message,
            });
            continue;
        }
        if used.saturating_add(bytes) <= capacity {
            used += bytes;
            *held.entry(namespace).or_default() += bytes;
            decision.admit.push((index, bytes));
            continue;
        }
        let freeable: u64 = candidates.iter().map(|i| occupied[*i]).sum();
        if used.saturating_add(bytes) > capacity.saturating_add(freeable) {
            let message = format!(
                "StagingStore {store} cannot hold {bytes} more bytes: {used} of {capacity} are held by \
                 caches that are referenced, copying, or unused for less than {}s; the copy starts \
                 when room is freed",
                policy.min_unused_seconds
            );
            decision.refuse.push(Refusal {
                index,
                bytes,
                reason: reason::STORE_FULL,
                message,
            });
            continue;
        }
        // Room comes once the evicted data is removed; admit on a later pass, not now.
        while used.saturating_add(bytes) > capacity && !candidates.is_empty() {
            let victim = candidates.remove(0);
            used -= occupied[victim];
            decision.evict.push(victim);
        }
        evicting = true;
        break;
    }

    let high = high_watermark_bytes(capacity, policy);
    let low = percent_of(capacity, policy.low_watermark_percent);
    if used > high {
        while used >= low && !candidates.is_empty() {
            let victim = candidates.remove(0);
            used -= occupied[victim];
            decision.evict.push(victim);
        }
    }
    let waiting = evicting || !decision.refuse.is_empty() || used > high;
    if waiting {
        decision.recheck_after = next_candidate_in(caches, now, min_unused);
    }
    decision
}

/// The usage past which the store evicts.
pub fn high_watermark_bytes(capacity: u64, policy: &EvictionPolicy) -> u64 {
    percent_of(capacity, policy.high_watermark_percent)
}

/// Bytes each namespace holds or has reserved in the store: what its quota is counted against.
fn held_per_namespace(caches: &[TemplateCache], occupied: &[u64]) -> BTreeMap<String, u64> {
    let mut held = BTreeMap::new();
    for (cache, bytes) in caches.iter().zip(occupied) {
        *held
            .entry(cache.namespace().unwrap_or_default())
            .or_default() += bytes;
    }
    held
}

/// Bytes a cache holds (its finished copy) or has reserved (its admitted copy).
pub fn occupied_bytes(cache: &TemplateCache) -> u64 {
    let Some(status) = &cache.status else {
        return 0;
    };
    match status.phase {
        Some(Phase::Ready | Phase::Evicted | Phase::Deleting) => status.size.unwrap_or(0),
        Some(Phase::Copying | Phase::Pending) => reserved_for_current_attempt(status),
        // A failed attempt may leave a partial file for the next one to resume, up to the room
        // it was granted: counted until the next attempt asks again. A failure no attempt
        // follows leaves none (the last attempt removes every partial file).
        Some(Phase::Failed) if !failed_for_good(status) => reserved_for_current_attempt(status),
        Some(Phase::Failed) | None => 0,
    }
}

/// The room granted to the current attempt (what its partial file may grow to).
fn reserved_for_current_attempt(status: &TemplateCacheStatus) -> u64 {
    status
        .storage
        .as_ref()
        .filter(|s| s.admitted && Some(s.attempt) == status.attempt)
        .and_then(|s| s.bytes)
        .unwrap_or(0)
}

fn failed_for_good(status: &TemplateCacheStatus) -> bool {
    find(&status.conditions, READY).is_some_and(|c| reason::FINAL.contains(&c.reason.as_str()))
}

/// Copies asking for room: the current attempt's mover reported the size and waits.
pub fn requests(caches: &[TemplateCache]) -> impl Iterator<Item = (usize, u64)> + '_ {
    caches.iter().enumerate().filter_map(|(index, cache)| {
        let status = cache.status.as_ref()?;
        let attempt = status.attempt?;
        if !matches!(status.phase, Some(Phase::Copying | Phase::Pending))
            || cache.metadata.deletion_timestamp.is_some()
        {
            return None;
        }
        let granted = status
            .storage
            .as_ref()
            .is_some_and(|s| s.attempt == attempt && s.admitted);
        let progress = status.progress.as_ref()?;
        if granted || progress.attempt != Some(attempt) || progress.error.is_some() {
            return None;
        }
        Some((index, progress.total_bytes?))
    })
}

/// Ready, unreferenced caches unused for at least `min_unused`, least recently referenced first.
fn eviction_candidates(
    caches: &[TemplateCache],
    now: Timestamp,
    min_unused: Duration,
) -> Vec<usize> {
    let mut candidates: Vec<(Timestamp, String, usize)> = caches
        .iter()
        .enumerate()
        .filter_map(|(index, cache)| {
            let since = unused_since(cache)?;
            let unused_for = now.duration_since(since);
            (unused_for >= min_unused.try_into().ok()?).then(|| (since, cache.name_any(), index))
        })
        .collect();
    candidates.sort();
    candidates.into_iter().map(|(_, _, index)| index).collect()
}

/// When an unreferenced Ready cache was last referenced (its creation, if never).
fn unused_since(cache: &TemplateCache) -> Option<Timestamp> {
    let status = cache.status.as_ref()?;
    let unreferenced = count_references(cache.finalizers()) == 0;
    if status.phase != Some(Phase::Ready)
        || !unreferenced
        || cache.metadata.deletion_timestamp.is_some()
    {
        return None;
    }
    status
        .last_referenced
        .as_ref()
        .or(cache.metadata.creation_timestamp.as_ref())
        .map(|t| t.0)
}

/// Time until the next unreferenced cache becomes old enough to evict.
fn next_candidate_in(
    caches: &[TemplateCache],
    now: Timestamp,
    min_unused: Duration,
) -> Option<Duration> {
    caches
        .iter()
        .filter_map(unused_since)
        .filter_map(|since| {
            let due = since.checked_add(min_unused).ok()?;
            Duration::try_from(now.duration_until(due)).ok()
        })
        .filter(|wait| !wait.is_zero())
        .min()
        .map(|wait| wait + Duration::from_secs(1))
}

fn percent_of(capacity: u64, percent: u8) -> u64 {
    u64::try_from(u128::from(capacity) * u128::from(percent) / 100).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    const MIB: u64 = 1 << 20;

    /// [`decide`] for store `s` of `capacity` bytes, with no namespace rules, now.
    fn decide_untenanted(
        capacity: u64,
        policy: &EvictionPolicy,
        caches: &[TemplateCache],
    ) -> Decision {
        decide("s", capacity, policy, &Tenancy::default(), caches, now())
    }

    fn cache(name: &str, refs: usize, status: serde_json::Value) -> TemplateCache {
        let references = (0..refs).map(|i| format!("ref.templatecache.io/c{i}"));
        let mut cache = fixtures::holding(fixtures::cache(name, status), references);
        cache.metadata.creation_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        cache
    }

    fn ready(name: &str, refs: usize, last_referenced_secs: i64) -> TemplateCache {
        let at = Timestamp::from_second(last_referenced_secs).unwrap();
        cache(
            name,
            refs,
            json!({"phase": "Ready", "attempt": 1, "size": MIB, "lastReferenced": at.to_string()}),
        )
    }

    fn copying(name: &str, bytes: u64) -> TemplateCache {
        cache(
            name,
            1,
            json!({"phase": "Copying", "attempt": 1,
                   "progress": {"attempt": 1, "bytesCopied": 0, "totalBytes": bytes}}),
        )
    }

    fn policy(high: u8, low: u8) -> EvictionPolicy {
        EvictionPolicy {
            high_watermark_percent: high,
            low_watermark_percent: low,
            min_unused_seconds: 0,
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(10_000).unwrap()
    }

    #[test]
    fn over_the_high_watermark_evicts_least_recently_referenced_first_down_to_the_low() {
        let caches = [
            ready("newest", 0, 300),
            ready("held", 1, 100),
            ready("oldest", 0, 100),
            ready("middle", 0, 200),
        ];
        let d = decide_untenanted(4 * MIB, &policy(80, 50), &caches);
        assert_eq!(d.used_bytes, 4 * MIB);
        // 4 → 3 → 2 MiB (50 %, not under it) → 1 MiB: the held cache is never chosen.
        assert_eq!(d.evict, vec![2, 3, 0]);
    }

    #[test]
    fn a_referenced_cache_is_never_evicted_whatever_the_pressure() {
        let caches = [ready("a", 1, 0), ready("b", 2, 0), copying("c", 10 * MIB)];
        let d = decide_untenanted(2 * MIB, &policy(50, 10), &caches);
        assert!(d.evict.is_empty());
        assert_eq!(d.refuse.len(), 1);
        assert!(
            d.refuse[0].message.contains("cannot hold"),
            "{}",
            d.refuse[0].message
        );
        assert_eq!(d.refuse[0].reason, reason::STORE_FULL);
    }

    #[test]
    fn evictable_bytes_are_those_of_ready_unreferenced_caches_even_if_used_recently() {
        let caches = [
            ready("held", 1, 0),
            ready("free", 0, 9_990),
            copying("c", MIB),
        ];
        let mut p = policy(50, 10);
        p.min_unused_seconds = 60;
        let d = decide_untenanted(4 * MIB, &p, &caches);
        assert_eq!(d.evictable_bytes, MIB);
        let all_held = [ready("a", 1, 0), ready("b", 2, 0)];
        let d = decide_untenanted(2 * MIB, &p, &all_held);
        assert_eq!(d.evictable_bytes, 0);
    }

    #[test]
    fn a_copy_that_fits_is_admitted_and_counts_against_the_next() {
        let caches = [copying("a", 2 * MIB), copying("b", 2 * MIB)];
        let d = decide_untenanted(3 * MIB, &policy(100, 90), &caches);
        assert_eq!(d.admit, vec![(0, 2 * MIB)]);
        assert_eq!(d.refuse.len(), 1);
    }

    #[test]
    fn a_copy_that_fits_after_eviction_waits_for_the_removal() {
        let caches = [ready("old", 0, 0), ready("held", 1, 0), copying("new", MIB)];
        let d = decide_untenanted(2 * MIB, &policy(100, 90), &caches);
        assert_eq!(d.evict, vec![0]);
        assert!(
            d.admit.is_empty(),
            "room is granted only once the data is gone"
        );
        assert!(d.refuse.is_empty());
    }

    #[test]
    fn recently_used_caches_wait_for_min_unused_seconds() {
        let caches = [ready("recent", 0, 9_990)];
        let mut p = policy(10, 0);
        p.min_unused_seconds = 60;
        let d = decide_untenanted(2 * MIB, &p, &caches);
        assert!(d.evict.is_empty());
        assert_eq!(d.recheck_after, Some(Duration::from_secs(51)));
    }

    #[test]
    fn admitted_reservations_and_evicted_data_still_count() {
        let admitted = cache(
            "a",
            1,
            json!({"phase": "Copying", "attempt": 2,
                   "storage": {"attempt": 2, "admitted": true, "bytes": 5}}),
        );
        let stale_grant = cache(
            "b",
            1,
            json!({"phase": "Copying", "attempt": 3,
                   "storage": {"attempt": 2, "admitted": true, "bytes": 7}}),
        );
        let evicted = cache("c", 0, json!({"phase": "Evicted", "size": 11}));
        let failed = cache("d", 0, json!({"phase": "Failed", "attempt": 1}));
        let d = decide_untenanted(
            100,
            &policy(100, 90),
            &[admitted, stale_grant, evicted, failed],
        );
        assert_eq!(d.used_bytes, 16);
        assert_eq!(d.caches, 2);
    }

    #[test]
    fn a_failed_copy_counts_the_room_its_kept_partial_file_may_fill_until_it_fails_for_good() {
        let failed = |reason: &str| {
            cache(
                "d",
                0,
                json!({"phase": "Failed", "attempt": 2,
                       "storage": {"attempt": 2, "admitted": true, "bytes": 13},
                       "conditions": [{"type": "Ready", "status": "False", "reason": reason,
                                       "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
            )
        };
        let resumable = decide_untenanted(100, &policy(100, 90), &[failed(reason::COPY_FAILED)]);
        assert_eq!((resumable.used_bytes, resumable.caches), (13, 1));
        let for_good =
            decide_untenanted(100, &policy(100, 90), &[failed(reason::RETRIES_EXHAUSTED)]);
        assert_eq!((for_good.used_bytes, for_good.caches), (0, 0));
    }

    fn in_namespace(namespace: &str, mut cache: TemplateCache) -> TemplateCache {
        cache.metadata.namespace = Some(namespace.to_owned());
        cache
    }

    #[test]
    fn a_copy_from_a_namespace_outside_the_selector_gets_no_room_and_evicts_nothing() {
        let caches = [
            in_namespace("ok", ready("old", 0, 0)),
            in_namespace("evil", copying("x", 2 * MIB)),
            in_namespace("ok", copying("y", MIB)),
        ];
        let tenancy = Tenancy {
            outside: ["evil".to_owned()].into(),
            ..Tenancy::default()
        };
        let d = decide("s", 2 * MIB, &policy(100, 90), &tenancy, &caches, now());
        assert_eq!(d.refuse.len(), 1);
        assert_eq!(d.refuse[0].index, 1);
        assert_eq!(d.refuse[0].reason, reason::STORE_NOT_ALLOWED);
        assert!(d.evict.is_empty(), "a refused tenant pushes no one out");
        assert_eq!(d.admit, vec![(2, MIB)], "the others are not held up");
    }

    #[test]
    fn the_quota_counts_what_a_namespace_holds_reserves_and_is_granted_in_this_pass() {
        let caches = [
            in_namespace("a", ready("held", 1, 0)),
            in_namespace("a", copying("fits", MIB)),
            in_namespace("a", copying("over", MIB)),
            in_namespace("b", copying("other", 2 * MIB)),
        ];
        let tenancy = Tenancy {
            quota: Some(2 * MIB),
            ..Tenancy::default()
        };
        let d = decide("s", 100 * MIB, &policy(100, 90), &tenancy, &caches, now());
        assert_eq!(d.admit, vec![(1, MIB), (3, 2 * MIB)]);
        assert_eq!(d.refuse.len(), 1);
        let refusal = &d.refuse[0];
        assert_eq!((refusal.index, refusal.reason), (2, reason::QUOTA_EXCEEDED));
        assert!(
            refusal.message.contains(&format!("{}", 2 * MIB)),
            "{}",
            refusal.message
        );
    }
}
