//! Which claims and Pods name each cache, kept from the operator's own watches, so a reconcile
//! finds a cache's consumers by key instead of scanning every object, and a change to a consumer
//! (its deletion included) or to a cache wakes exactly the objects it concerns.
//!
//! The index is fed the watch events after the reflector has stored them, so whatever a woken
//! reconcile reads from the store is at least as new as the event that woke it.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use kube::Resource;
use kube::runtime::reflector::{Lookup, ObjectRef};
use kube::runtime::watcher::Event;

use templatecache_api::TemplateCache;

/// A cache, by namespace and name.
pub type CacheKey = ObjectRef<TemplateCache>;

/// The objects of kind `K` that name each cache (claims by `spec.cacheName`, Pods by label).
pub struct ByCache<K: Resource + Lookup<DynamicType = ()>> {
    inner: Arc<RwLock<Members<K>>>,
    cache_of: fn(&K) -> Option<CacheKey>,
}

impl<K: Resource + Lookup<DynamicType = ()>> Clone for ByCache<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            cache_of: self.cache_of,
        }
    }
}

struct Members<K: Lookup<DynamicType = ()>> {
    by_cache: HashMap<CacheKey, HashSet<ObjectRef<K>>>,
    cache_of: HashMap<ObjectRef<K>, CacheKey>,
    /// A relist in progress: the index it will become once complete.
    relist: Option<Vec<(ObjectRef<K>, CacheKey)>>,
}

impl<K: Resource + Lookup<DynamicType = ()>> ByCache<K>
where
    ObjectRef<K>: Hash + Eq + Clone,
{
    /// An empty index; `cache_of` says which cache an object names.
    pub fn new(cache_of: fn(&K) -> Option<CacheKey>) -> Self {
        Self {
            inner: Arc::new(RwLock::new(Members {
                by_cache: HashMap::new(),
                cache_of: HashMap::new(),
                relist: None,
            })),
            cache_of,
        }
    }

    /// The objects that name `cache`.
    pub fn members(&self, cache: &CacheKey) -> Vec<ObjectRef<K>> {
        self.read()
            .by_cache
            .get(cache)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Applies one watch event; returns the caches whose consumers it changed (the one the
    /// object names now and the one it named before, if different).
    pub fn apply(&self, event: &Event<K>) -> Vec<CacheKey> {
        let mut members = self.write();
        match event {
            Event::Apply(object) => {
                let key = ObjectRef::from_obj(object);
                let before = members.remove(&key);
                let now = (self.cache_of)(object);
                if let Some(cache) = &now {
                    members.insert(key, cache.clone());
                }
                before.into_iter().chain(now).collect()
            }
            Event::Delete(object) => members
                .remove(&ObjectRef::from_obj(object))
                .into_iter()
                .collect(),
            Event::Init => {
                members.relist = Some(vec![]);
                vec![]
            }
            Event::InitApply(object) => {
                if let (Some(cache), Some(relist)) =
                    ((self.cache_of)(object), members.relist.as_mut())
                {
                    relist.push((ObjectRef::from_obj(object), cache));
                }
                vec![]
            }
            Event::InitDone => {
                let relisted = members.relist.take().unwrap_or_default();
                // After a relist every cache that had or has members may have changed.
                let mut touched: HashSet<CacheKey> = members.by_cache.keys().cloned().collect();
                members.by_cache.clear();
                members.cache_of.clear();
                for (key, cache) in relisted {
                    touched.insert(cache.clone());
                    members.insert(key, cache);
                }
                touched.into_iter().collect()
            }
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Members<K>> {
        // Plain maps updated in one step each: a panic elsewhere cannot leave them half-written.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Members<K>> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K: Lookup<DynamicType = ()>> Members<K>
where
    ObjectRef<K>: Hash + Eq + Clone,
{
    fn insert(&mut self, key: ObjectRef<K>, cache: CacheKey) {
        self.by_cache
            .entry(cache.clone())
            .or_default()
            .insert(key.clone());
        self.cache_of.insert(key, cache);
    }

    fn remove(&mut self, key: &ObjectRef<K>) -> Option<CacheKey> {
        let cache = self.cache_of.remove(key)?;
        if let Some(set) = self.by_cache.get_mut(&cache) {
            set.remove(key);
            if set.is_empty() {
                self.by_cache.remove(&cache);
            }
        }
        Some(cache)
    }
}

/// A queue of objects to reconcile, fed by another kind's watch: `Controller::reconcile_on`
/// reads the receiving end.
pub struct Wakeups<K: Lookup<DynamicType = ()>> {
    sender: UnboundedSender<ObjectRef<K>>,
}

impl<K: Lookup<DynamicType = ()>> Clone for Wakeups<K> {
    fn clone(&self) -> Self {
        Self {
            sender: self.sender.clone(),
        }
    }
}

impl<K: Lookup<DynamicType = ()>> Wakeups<K> {
    pub fn channel() -> (Self, UnboundedReceiver<ObjectRef<K>>) {
        let (sender, receiver) = unbounded();
        (Self { sender }, receiver)
    }

    /// Asks for a reconcile of each of `objects`. A controller that has stopped no longer
    /// listens; nothing is lost then, as nothing reconciles anyway.
    pub fn wake(&self, objects: impl IntoIterator<Item = ObjectRef<K>>) {
        for object in objects {
            let _ = self.sender.unbounded_send(object);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::ObjectMeta;

    fn pod(name: &str, cache: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: cache.map(|c| [("cache".to_owned(), c.to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn index() -> ByCache<Pod> {
        ByCache::new(|pod| {
            let cache = pod.metadata.labels.as_ref()?.get("cache")?;
            Some(ObjectRef::new(cache).within("ns"))
        })
    }

    fn names(index: &ByCache<Pod>, cache: &str) -> Vec<String> {
        let mut names: Vec<String> = index
            .members(&ObjectRef::new(cache).within("ns"))
            .into_iter()
            .map(|r| r.name)
            .collect();
        names.sort();
        names
    }

    #[test]
    fn members_follow_applies_moves_and_deletes() {
        let index = index();
        index.apply(&Event::Apply(pod("a", Some("img"))));
        index.apply(&Event::Apply(pod("b", Some("img"))));
        assert_eq!(names(&index, "img"), ["a", "b"]);

        let touched = index.apply(&Event::Apply(pod("b", Some("other"))));
        assert_eq!(touched.len(), 2, "a move concerns both caches");
        assert_eq!(names(&index, "img"), ["a"]);
        assert_eq!(names(&index, "other"), ["b"]);

        let touched = index.apply(&Event::Delete(pod("a", Some("img"))));
        assert_eq!(touched, vec![ObjectRef::new("img").within("ns")]);
        assert!(names(&index, "img").is_empty());
    }

    #[test]
    fn a_relist_replaces_the_index_and_wakes_old_and_new_caches() {
        let index = index();
        index.apply(&Event::Apply(pod("gone", Some("old"))));
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(pod("x", Some("new"))));
        assert_eq!(
            names(&index, "old"),
            ["gone"],
            "the index holds until the relist ends"
        );
        let mut touched: Vec<String> = index
            .apply(&Event::InitDone)
            .into_iter()
            .map(|r| r.name)
            .collect();
        touched.sort();
        assert_eq!(touched, ["new", "old"]);
        assert!(names(&index, "old").is_empty());
        assert_eq!(names(&index, "new"), ["x"]);
    }
}
