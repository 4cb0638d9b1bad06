//! The operator's Prometheus metrics, in the text exposition format on `/metrics`.
//!
//! Counters move only after the write that makes the event true has succeeded (a copy counts as
//! started once its attempt is won, as succeeded once Ready is recorded), so with one leader
//! they match what happened to the caches.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use templatecache_api::Phase;

/// Which controller a reconcile belongs to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
}

/// A cache phase, as the API writes it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

fn phase_label(phase: Phase) -> PhaseLabel {
    PhaseLabel {
        phase: format!("{phase:?}"),
    }
}

/// A StagingStore, by name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabel {
    pub store: String,
}

/// Every phase, exported from the start, so that a phase no cache is in shows 0.
const PHASES: [Phase; 6] = [
    Phase::Pending,
    Phase::Copying,
    Phase::Ready,
    Phase::Failed,
    Phase::Evicted,
    Phase::Deleting,
];

/// A cache as the metrics count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSample {
    pub references: u32,
    pub phase: Phase,
}

/// A store's room, as its last reconcile saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreSample {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub high_watermark_bytes: u64,
    pub evictable_bytes: u64,
    /// Copies waiting for room (refused as StoreFull).
    pub waiting_copies: u64,
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ControllerLabel, Counter>,
    pub reconcile_errors: Family<ControllerLabel, Counter>,
    pub reconcile_duration: Family<ControllerLabel, Histogram>,
    pub copies_started: Counter,
    pub copies_succeeded: Counter,
    pub copies_failed: Counter,
    pub bytes_copied: Counter,
    pub evictions: Counter,
    pub reference_commits: Counter,
    pub references_added: Counter,
    pub references_removed: Counter,
    pub references_held: Gauge,
    pub caches: Family<PhaseLabel, Gauge>,
    pub store_capacity_bytes: Family<StoreLabel, Gauge>,
    pub store_used_bytes: Family<StoreLabel, Gauge>,
    pub store_high_watermark_bytes: Family<StoreLabel, Gauge>,
    pub store_evictable_bytes: Family<StoreLabel, Gauge>,
    pub store_waiting_copies: Family<StoreLabel, Gauge>,
    pub leader: Gauge,
    /// Each cache's references and phase, summed into `references_held` and `caches`.
    cache_samples: Mutex<BTreeMap<(String, String), CacheSample>>,
    /// The stores the `store_*` families hold a gauge for.
    stores: Mutex<BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("templatecache");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let reconcile_errors = Family::<ControllerLabel, Counter>::default();
        let reconcile_duration = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
        });
        let metrics = Self {
            reconciles,
            reconcile_errors,
            reconcile_duration,
            copies_started: Counter::default(),
            copies_succeeded: Counter::default(),
            copies_failed: Counter::default(),
            bytes_copied: Counter::default(),
            evictions: Counter::default(),
            reference_commits: Counter::default(),
            references_added: Counter::default(),
            references_removed: Counter::default(),
            references_held: Gauge::default(),
            caches: Family::default(),
            store_capacity_bytes: Family::default(),
            store_used_bytes: Family::default(),
            store_high_watermark_bytes: Family::default(),
            store_evictable_bytes: Family::default(),
            store_waiting_copies: Family::default(),
            leader: Gauge::default(),
            cache_samples: Mutex::default(),
            stores: Mutex::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("reconciles", "Reconciles run", metrics.reconciles.clone());
        r.register(
            "reconcile_errors",
            "Reconciles that ended in an error",
            metrics.reconcile_errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time a reconcile took",
            metrics.reconcile_duration.clone(),
        );
        r.register(
            "copies_started",
            "Copy attempts started (one copy Job each)",
            metrics.copies_started.clone(),
        );
        r.register(
            "copies_succeeded",
            "Copies that became Ready",
            metrics.copies_succeeded.clone(),
        );
        r.register(
            "copies_failed",
            "Copy attempts that failed",
            metrics.copies_failed.clone(),
        );
        r.register(
            "bytes_copied",
            "Bytes of copies that became Ready",
            metrics.bytes_copied.clone(),
        );
        r.register(
            "evictions",
            "Caches evicted to free space",
            metrics.evictions.clone(),
        );
        r.register(
            "reference_commits",
            "Writes that committed a batch of references to a cache",
            metrics.reference_commits.clone(),
        );
        r.register(
            "references_added",
            "References of claims and Pods recorded on caches",
            metrics.references_added.clone(),
        );
        r.register(
            "references_removed",
            "References of claims and Pods that are gone, removed from caches",
            metrics.references_removed.clone(),
        );
        r.register(
            "references_held",
            "References held on the caches this operator reconciles",
            metrics.references_held.clone(),
        );
        r.register(
            "caches",
            "Caches this operator reconciles, by phase",
            metrics.caches.clone(),
        );
        r.register(
            "store_capacity_bytes",
            "A StagingStore's capacity",
            metrics.store_capacity_bytes.clone(),
        );
        r.register(
            "store_used_bytes",
            "Bytes a StagingStore's caches hold or have reserved",
            metrics.store_used_bytes.clone(),
        );
        r.register(
            "store_high_watermark_bytes",
            "Usage past which a StagingStore evicts",
            metrics.store_high_watermark_bytes.clone(),
        );
        r.register(
            "store_evictable_bytes",
            "Bytes of Ready, unreferenced caches that eviction may take from a StagingStore",
            metrics.store_evictable_bytes.clone(),
        );
        r.register(
            "store_waiting_copies",
            "Copies waiting for room in a StagingStore",
            metrics.store_waiting_copies.clone(),
        );
        r.register(
            "leader",
            "Whether this replica holds the leader Lease (1) or stands by (0)",
            metrics.leader.clone(),
        );
        for phase in PHASES {
            metrics.caches.get_or_create(&phase_label(phase)).set(0);
        }
        Self {
            registry,
            ..metrics
        }
    }

    /// Counts one reconcile of `controller` that took `elapsed`.
    pub fn observe_reconcile(&self, controller: &'static str, elapsed: Duration, failed: bool) {
        let label = ControllerLabel { controller };
        self.reconciles.get_or_create(&label).inc();
        self.reconcile_duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        if failed {
            self.reconcile_errors.get_or_create(&label).inc();
        }
    }

    /// Records a cache's references and phase now; `None` once the cache is gone.
    pub fn observe_cache(&self, namespace: &str, name: &str, sample: Option<CacheSample>) {
        let mut all = self.cache_samples.lock().unwrap_or_else(|e| e.into_inner());
        let key = (namespace.to_owned(), name.to_owned());
        let before = match sample {
            Some(sample) => all.insert(key, sample),
            None => all.remove(&key),
        };
        // Running totals, kept under the same lock as the samples: a storm reconciles a cache
        // many times a second, and summing thousands of caches on each would cost far more.
        for (counted, sign) in [(before, -1), (sample, 1)] {
            let Some(counted) = counted else { continue };
            self.references_held
                .inc_by(sign * i64::from(counted.references));
            self.caches
                .get_or_create(&phase_label(counted.phase))
                .inc_by(sign);
        }
    }

    /// Records a store's room as its reconcile saw it.
    pub fn observe_store(&self, store: &str, sample: StoreSample) {
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        stores.insert(store.to_owned());
        let label = StoreLabel {
            store: store.to_owned(),
        };
        let gauge = |bytes: u64| i64::try_from(bytes).unwrap_or(i64::MAX);
        let values = [
            sample.capacity_bytes,
            sample.used_bytes,
            sample.high_watermark_bytes,
            sample.evictable_bytes,
            sample.waiting_copies,
        ];
        for (family, value) in self.store_families().into_iter().zip(values) {
            family.get_or_create(&label).set(gauge(value));
        }
    }

    /// Drops the gauges of every store `exists` says is gone: a deleted store is never
    /// reconciled again, so its last room would otherwise be exported until a restart.
    pub fn keep_stores(&self, exists: impl Fn(&str) -> bool) {
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        stores.retain(|store| {
            if exists(store) {
                return true;
            }
            let label = StoreLabel {
                store: store.clone(),
            };
            for family in self.store_families() {
                family.remove(&label);
            }
            false
        });
    }

    /// The per-store families, in [`StoreSample`]'s field order.
    fn store_families(&self) -> [&Family<StoreLabel, Gauge>; 5] {
        [
            &self.store_capacity_bytes,
            &self.store_used_bytes,
            &self.store_high_watermark_bytes,
            &self.store_evictable_bytes,
            &self.store_waiting_copies,
        ]
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(references: u32, phase: Phase) -> Option<CacheSample> {
        Some(CacheSample { references, phase })
    }

    #[test]
    fn references_and_phases_are_summed_over_caches_and_dropped_with_them() {
        let m = Metrics::new();
        m.observe_cache("a", "x", sample(3, Phase::Copying));
        m.observe_cache("b", "x", sample(2, Phase::Ready));
        m.observe_cache("a", "x", sample(1, Phase::Ready));
        assert_eq!(m.references_held.get(), 3);
        m.observe_cache("b", "x", None);
        assert_eq!(m.references_held.get(), 1);
        let text = m.encode();
        assert!(text.contains("templatecache_references_held 1"), "{text}");
        assert!(
            text.contains("templatecache_caches{phase=\"Ready\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("templatecache_caches{phase=\"Copying\"} 0"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_store_is_exported_by_name() {
        let m = Metrics::new();
        let room = StoreSample {
            capacity_bytes: 100,
            used_bytes: 95,
            high_watermark_bytes: 90,
            evictable_bytes: 0,
            waiting_copies: 2,
        };
        m.observe_store("fast", room);
        let text = m.encode();
        for line in [
            "templatecache_store_used_bytes{store=\"fast\"} 95",
            "templatecache_store_high_watermark_bytes{store=\"fast\"} 90",
            "templatecache_store_evictable_bytes{store=\"fast\"} 0",
            "templatecache_store_waiting_copies{store=\"fast\"} 2",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn a_deleted_store_is_no_longer_exported() {
        let m = Metrics::new();
        m.observe_store("kept", StoreSample::default());
        m.observe_store("deleted", StoreSample::default());
        m.keep_stores(|store| store == "kept");
        let text = m.encode();
        assert!(!text.contains("store=\"deleted\""), "{text}");
        assert!(
            text.contains("templatecache_store_used_bytes{store=\"kept\"} 0"),
            "{text}"
        );
    }
}
