//! The CRDs work on a real API server: create, read, status update, delete.

use templatecache_test_support as support;

use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::rig::Rig;
use templatecache_api::{Phase, TemplateCache, TemplateCacheStatus};

fn http_cache(name: &str) -> TemplateCache {
    serde_json::from_value(json!({
        "apiVersion": "templatecache.io/v1alpha1",
        "kind": "TemplateCache",
        "metadata": {"name": name},
        "spec": {"source": {"http": {"url": "http://127.0.0.1:9/ubuntu.qcow2"}}}
    }))
    .expect("cache literal")
}

#[tokio::test]
async fn create_read_update_status_and_delete_a_template_cache() {
    let rig = Rig::namespace("crud").await;
    let ns = &rig.ns;
    let caches = ns.api::<TemplateCache>();

    let created = caches
        .create(&PostParams::default(), &http_cache("ubuntu"))
        .await
        .expect("create");
    println!(
        "created tc/{} in {}",
        created.metadata.name.as_deref().unwrap_or(""),
        ns.name
    );

    let read = caches.get("ubuntu").await.expect("read");
    assert_eq!(read.spec, created.spec);

    let status = TemplateCacheStatus {
        phase: Some(Phase::Copying),
        ref_count: Some(3),
        attempt: Some(1),
        ..Default::default()
    };
    let patched = caches
        .patch_status(
            "ubuntu",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .expect("status subresource update");
    let got = patched.status.expect("status present");
    assert_eq!(got.phase, Some(Phase::Copying));
    assert_eq!(got.ref_count, Some(3));
    println!("updated status of tc/ubuntu: phase Copying, refCount 3");

    // A status write through the main resource is ignored: status is a subresource.
    let spec_patch = json!({"status": {"phase": "Ready"}});
    let after = caches
        .patch("ubuntu", &PatchParams::default(), &Patch::Merge(spec_patch))
        .await
        .expect("patch main resource");
    assert_eq!(after.status.and_then(|s| s.phase), Some(Phase::Copying));

    caches
        .delete("ubuntu", &DeleteParams::default())
        .await
        .expect("delete");
    let gone = caches.get_opt("ubuntu").await.expect("get after delete");
    assert!(gone.is_none(), "deleted cache is gone");
    println!("deleted tc/ubuntu");
}
