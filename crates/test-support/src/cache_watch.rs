//! A raw watch of one TemplateCache that keeps every version it sees: its references (the
//! finalizer set) and its recorded count (`status.refCount`, or whatever a benchmark counts in),
//! read as plain JSON so that nothing the typed client would refuse goes unseen. A watch that
//! fails fails the test that reads it.

use std::collections::BTreeSet;
use std::time::Instant;

use futures::StreamExt;
use kube::Api;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher;
use templatecache_api::TemplateCache;
use templatecache_api::references::is_reference;
use tokio::sync::oneshot;

use super::TestNamespace;

/// One version of the cache, as the watch delivered it.
#[derive(Clone, Debug)]
pub struct Version {
    pub at: Instant,
    pub resource_version: String,
    pub ref_count: Option<i64>,
    pub references: BTreeSet<String>,
}

/// Watches one cache until [`CacheWatch::stop`].
pub struct CacheWatch {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<Vec<Version>, String>>,
}

impl CacheWatch {
    /// Starts watching cache `name` (which need not exist yet) in the test's namespace.
    pub fn start(ns: &TestNamespace, name: &str) -> Self {
        Self::counting(ns, name, ref_count)
    }

    /// [`CacheWatch::start`], reading each version's count with `count`.
    pub fn counting(
        ns: &TestNamespace,
        name: &str,
        count: fn(&DynamicObject) -> Option<i64>,
    ) -> Self {
        Self::counting_kind(ns, &ApiResource::erase::<TemplateCache>(&()), name, count)
    }

    /// [`CacheWatch::counting`] on an object of another kind (a benchmark's stand-in for a
    /// database row).
    pub fn counting_kind(
        ns: &TestNamespace,
        ar: &ApiResource,
        name: &str,
        count: fn(&DynamicObject) -> Option<i64>,
    ) -> Self {
        let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, ar);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut versions = vec![];
            let mut events = std::pin::pin!(watcher(api, config));
            loop {
                let event = tokio::select! {
                    _ = &mut stopped => return Ok(versions),
                    event = events.next() => event,
                };
                match event {
                    Some(Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object))) => {
                        versions.push(version_of(&object, count))
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("the watch of the cache failed: {e}")),
                    None => return Err("the watch of the cache ended".into()),
                }
            }
        });
        Self { stop, task }
    }

    /// Stops the watch and returns every version it saw; panics if the watch failed, so a
    /// check made on its versions never passes on a watch that saw nothing.
    pub async fn stop(self) -> Vec<Version> {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("watch task")
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The operator's recorded count, `status.refCount`.
pub fn ref_count(object: &DynamicObject) -> Option<i64> {
    object.data["status"]["refCount"].as_i64()
}

fn version_of(object: &DynamicObject, count: fn(&DynamicObject) -> Option<i64>) -> Version {
    Version {
        at: Instant::now(),
        resource_version: object.metadata.resource_version.clone().unwrap_or_default(),
        ref_count: count(object),
        references: object
            .metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| is_reference(f))
            .cloned()
            .collect(),
    }
}

/// Versions whose recorded count exceeds the references the same version holds.
pub fn counts_above_references(versions: &[Version]) -> Vec<String> {
    versions
        .iter()
        .filter(|v| v.ref_count.is_some_and(|c| c > v.references.len() as i64))
        .map(|v| {
            format!(
                "rv {}: refCount {:?} with {} references",
                v.resource_version,
                v.ref_count,
                v.references.len()
            )
        })
        .collect()
}

/// References in `held` that, once seen, disappear from a later version: a lost reference.
pub fn lost_references(versions: &[Version], held: &BTreeSet<String>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut lost = vec![];
    for version in versions {
        for reference in &seen {
            if !version.references.contains(reference) {
                lost.push(format!(
                    "{reference} gone at rv {}",
                    version.resource_version
                ));
            }
        }
        seen.extend(
            version
                .references
                .iter()
                .filter(|r| held.contains(*r))
                .cloned(),
        );
    }
    lost
}
