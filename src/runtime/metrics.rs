//! The operator's Prometheus metrics, in the text exposition format on `/metrics`.
//!
//! Counters move only after the write that makes the event true has succeeded (a copy counts as
//! started once its attempt is won, as succeeded once Ready is recorded), so with one leader
//! they match what happened to the caches.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Which controller a reconcile belongs to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
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
    pub leader: Gauge,
    /// References per cache, summed into `references_held`.
    references: Mutex<BTreeMap<(String, String), i64>>,
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
            leader: Gauge::default(),
            references: Mutex::default(),
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
            "leader",
            "Whether this replica holds the leader Lease (1) or stands by (0)",
            metrics.leader.clone(),
        );
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

    /// Records the references a cache holds now; `None` once the cache is gone.
    pub fn set_references(&self, namespace: &str, name: &str, references: Option<u32>) {
        let mut all = self.references.lock().unwrap_or_else(|e| e.into_inner());
        let key = (namespace.to_owned(), name.to_owned());
        match references {
            Some(n) => all.insert(key, i64::from(n)),
            None => all.remove(&key),
        };
        self.references_held.set(all.values().sum());
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

    #[test]
    fn references_are_summed_over_caches_and_dropped_with_them() {
        let m = Metrics::new();
        m.set_references("a", "x", Some(3));
        m.set_references("b", "x", Some(2));
        m.set_references("a", "x", Some(1));
        assert_eq!(m.references_held.get(), 3);
        m.set_references("b", "x", None);
        assert_eq!(m.references_held.get(), 1);
        let text = m.encode();
        assert!(text.contains("templatecache_references_held 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
