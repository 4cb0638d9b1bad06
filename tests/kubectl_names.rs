//! Every name a user types reaches its kind with kubectl: singular, plural and short name of all
//! three kinds, and the category that lists them together. A category named like a kind shadows
//! that kind's singular name ("you must specify only one resource"), which this test catches.

use templatecache_test_support as support;

use serde_json::json;
use support::kubectl;
use support::rig::Rig;
use templatecache_api::TemplateCacheClaim;

fn get(namespace: &str, args: &[&str]) -> Result<String, String> {
    let out = kubectl()
        .args(["get", "-n", namespace, "-o", "name"])
        .args(args)
        .output()
        .expect("run kubectl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn singular_plural_short_names_and_the_category_all_work() {
    let rig = Rig::builder("names").store("1Gi").start().await;
    let (ns, store) = (&rig.ns, rig.store());
    ns.create_cache(
        "img",
        json!({"source": {"http": {"url": "http://127.0.0.1:9/a"}}}),
    )
    .await;
    let claim: TemplateCacheClaim = serde_json::from_value(json!({
        "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCacheClaim",
        "metadata": {"name": "vm-1"}, "spec": {"cacheName": "img"}
    }))
    .expect("claim literal");
    ns.api::<TemplateCacheClaim>()
        .create(&Default::default(), &claim)
        .await
        .expect("create claim");

    let kinds = [
        ("templatecache", "templatecaches", "tc", "img"),
        ("templatecacheclaim", "templatecacheclaims", "tcc", "vm-1"),
        ("stagingstore", "stagingstores", "sst", store.name.as_str()),
    ];
    for (singular, plural, short, name) in kinds {
        for resource in [singular, plural, short] {
            let listed = get(&ns.name, &[resource, name])
                .unwrap_or_else(|e| panic!("kubectl get {resource} {name}: {e}"));
            assert!(
                listed.trim().ends_with(&format!("/{name}")),
                "kubectl get {resource} {name} printed {listed:?}"
            );
        }
    }
    let all = get(&ns.name, &["templatecaching"]).expect("kubectl get templatecaching");
    for expected in [
        "templatecache.templatecache.io/img",
        "templatecacheclaim.templatecache.io/vm-1",
        &format!("stagingstore.templatecache.io/{}", store.name),
    ] {
        assert!(
            all.contains(expected),
            "the category lists {expected}: {all}"
        );
    }
}
