//! The objects the controllers' unit tests start from; each test changes what it is about.

use serde_json::{Value, json};

use templatecache_api::{StagingStore, TemplateCache};

/// TemplateCache `name` in namespace `ns` (generation 1) of an HTTP source, with `status` (JSON
/// as the API server stores it; `null` for none).
pub fn cache(name: &str, status: Value) -> TemplateCache {
    let spec = serde_json::from_value(json!({"source": {"http": {"url": "http://example/x"}}}))
        .expect("a valid spec");
    let mut cache = TemplateCache::new(name, spec);
    cache.metadata.namespace = Some("ns".into());
    cache.metadata.generation = Some(1);
    cache.status = serde_json::from_value(status).expect("a valid status");
    cache
}

/// StagingStore `name` of `capacity` on host path `/srv`.
pub fn store(name: &str, capacity: &str) -> StagingStore {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"volume": {"hostPath": {"path": "/srv"}}, "capacity": capacity}
    }))
    .expect("a valid store")
}

/// `cache` holding `finalizers`.
pub fn holding(
    mut cache: TemplateCache,
    finalizers: impl IntoIterator<Item = impl Into<String>>,
) -> TemplateCache {
    cache.metadata.finalizers = Some(finalizers.into_iter().map(Into::into).collect());
    cache
}
