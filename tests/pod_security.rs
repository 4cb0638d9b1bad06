//! The copy and remove Jobs' pods meet the `restricted` Pod Security Standard, as the API
//! server's own PodSecurity admission judges it in a namespace that enforces `restricted`.

use templatecache_test_support as support;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use support::rig::Rig;
use templatecache::controller::jobs::{self, JobSettings};
use templatecache::controller::retry::RetryPolicy;
use templatecache_api::{StagingStore, TemplateCache};

fn store(volume: serde_json::Value) -> StagingStore {
    serde_json::from_value(json!({
        "apiVersion": "templatecache.io/v1alpha1", "kind": "StagingStore",
        "metadata": {"name": "staging"}, "spec": {"volume": volume, "capacity": "1Ti"}
    }))
    .expect("store literal")
}

fn cache(namespace: &str) -> TemplateCache {
    let mut cache: TemplateCache = serde_json::from_value(json!({
        "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCache",
        "metadata": {"name": "img", "uid": "00000000-0000-0000-0000-000000000001"},
        "spec": {"source": {"s3": {"bucket": "templates", "key": "img.qcow2",
                 "endpoint": "http://minio:9000", "secretRef": {"name": "s3-creds"}}}}
    }))
    .expect("cache literal");
    cache.metadata.namespace = Some(namespace.to_owned());
    cache
}

/// The pod the Job controller would create from `job`.
fn pod_of(job: &Job, name: &str) -> Pod {
    let template = job.spec.as_ref().expect("spec").template.clone();
    Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        spec: template.spec,
        ..Default::default()
    }
}

async fn create(pods: &Api<Pod>, pod: &Pod) -> Result<(), String> {
    match pods.create(&PostParams::default(), pod).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err(s.message),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn copy_and_remove_pods_are_admitted_where_restricted_is_enforced() {
    let rig = Rig::namespace("restricted").await;
    let ns = &rig.ns;
    let labels = json!({"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest"
    }}});
    Api::<Namespace>::all(ns.client.clone())
        .patch(&ns.name, &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .expect("enforce restricted");
    let account = json!({"metadata": {"name": "templatecache-copy"}});
    ns.api::<ServiceAccount>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(account).expect("SA"),
        )
        .await
        .expect("the copy Jobs' ServiceAccount");
    let pods: Api<Pod> = ns.api();
    let settings = JobSettings {
        image: "templatecache:test".into(),
        service_account: Some("templatecache-copy".into()),
        copy: Default::default(),
        oci_plain_http_registries: vec![],
        allow_internal_addresses: vec![],
        limits: Default::default(),
    };
    let cache = cache(&ns.name);
    let pvc = store(json!({"persistentVolumeClaim": {"claimName": "staging"}}));

    let copy =
        jobs::copy_job(&cache, &pvc, 1, &settings, &RetryPolicy::default()).expect("copy Job");
    create(&pods, &pod_of(&copy, "copy"))
        .await
        .expect("copy pod admitted");
    let placement = jobs::RemovalJob::new(&cache, 1, None);
    let remove = jobs::remove_job(&cache, &pvc, &placement, 1, &settings).expect("remove Job");
    create(&pods, &pod_of(&remove, "remove"))
        .await
        .expect("remove pod admitted");

    // The check has teeth: the same pod without its security context is refused...
    let mut bare = pod_of(&copy, "bare");
    if let Some(spec) = bare.spec.as_mut() {
        spec.security_context = None;
        spec.containers[0].security_context = None;
    }
    let refused = create(&pods, &bare).await.expect_err("refused");
    assert!(
        refused.contains("violates PodSecurity \"restricted:latest\""),
        "{refused}"
    );
    // ...and so is a hostPath store, which no restricted pod may mount: hostPath stores are for
    // single-node and test clusters; production stores are PersistentVolumeClaims.
    let host = store(json!({"hostPath": {"path": "/srv/staging"}}));
    let on_host =
        jobs::copy_job(&cache, &host, 1, &settings, &RetryPolicy::default()).expect("copy Job");
    let refused = create(&pods, &pod_of(&on_host, "on-host"))
        .await
        .expect_err("refused");
    assert!(refused.contains("hostPath"), "{refused}");
}
