//! The API server itself refuses invalid TemplateCaches and StagingStores, with a message that
//! names the offending field (OpenAPI schema and CEL rules from the CRDs in `crds/`).

use templatecache_test_support as support;

use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Resource};
use serde_json::{Value, json};
use support::rig::Rig;
use templatecache_api::{StagingStore, TemplateCache, TemplateCacheClaim};

fn cache(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCache",
        "metadata": {"name": name}, "spec": spec
    }))
    .expect("cache literal")
}

fn store(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "templatecache.io/v1alpha1", "kind": "StagingStore",
        "metadata": {"name": name}, "spec": spec
    }))
    .expect("store literal")
}

fn http(url: &str) -> Value {
    json!({"http": {"url": url}})
}

/// Asserts the API server refused `result` with status 422 and a message containing every
/// fragment of `expected`.
fn assert_refused(case: &str, result: kube::Result<DynamicObject>, expected: &[&str]) {
    let err = match result {
        Ok(_) => panic!("{case}: the API server accepted an invalid object"),
        Err(kube::Error::Api(status)) => status,
        Err(other) => panic!("{case}: unexpected error kind: {other}"),
    };
    assert_eq!(err.code, 422, "{case}: expected 422 Invalid, got {err:?}");
    for fragment in expected {
        assert!(
            err.message.contains(fragment),
            "{case}: message does not name `{fragment}`: {}",
            err.message
        );
    }
    println!("refused ({case}): {}", err.message);
    support::corpus::record(case, &format!("refused, 422: {}", err.message));
}

#[tokio::test]
async fn invalid_template_caches_are_refused_with_the_field_named() {
    let rig = Rig::namespace("invalid-tc").await;
    let ns = &rig.ns;
    let ar = ApiResource::erase::<TemplateCache>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
    let pp = PostParams::default();
    let s3 = json!({"bucket": "templates", "key": "ubuntu.qcow2"});

    let cases: Vec<(&str, DynamicObject, Vec<&str>)> = vec![
        (
            "two sources",
            cache(
                "two",
                json!({"source": {"http": {"url": "http://a.example/x"}, "s3": s3}}),
            ),
            vec![
                "spec.source",
                "exactly one of spec.source.http, spec.source.s3 or spec.source.oci",
            ],
        ),
        (
            "empty source",
            cache("none", json!({"source": {}})),
            vec!["spec.source", "exactly one of"],
        ),
        (
            "missing source",
            cache("missing", json!({})),
            vec!["spec.source", "Required value"],
        ),
        (
            "non-http URL",
            cache("ftp", json!({"source": http("ftp://a.example/x.qcow2")})),
            vec!["spec.source.http.url"],
        ),
        (
            "credentials in the URL (they belong in a Secret)",
            cache(
                "userinfo",
                json!({"source": http("https://user:pass@a.example/x.qcow2")}),
            ),
            vec!["spec.source.http.url"],
        ),
        (
            "file URL",
            cache("file", json!({"source": http("file:///etc/passwd")})),
            vec!["spec.source.http.url"],
        ),
        (
            "malformed checksum",
            cache(
                "sum",
                json!({"source": http("https://a.example/x"), "checksum": "md5:abc"}),
            ),
            vec!["spec.checksum"],
        ),
        (
            "empty bucket",
            cache(
                "bucket",
                json!({"source": {"s3": {"bucket": "", "key": "k"}}}),
            ),
            vec!["spec.source.s3.bucket"],
        ),
        (
            "empty key",
            cache(
                "key",
                json!({"source": {"s3": {"bucket": "templates", "key": ""}}}),
            ),
            vec!["spec.source.s3.key"],
        ),
        (
            "non-http S3 endpoint",
            cache(
                "endpoint",
                json!({"source": {"s3": {"bucket": "templates", "key": "k", "endpoint": "gopher://x"}}}),
            ),
            vec!["spec.source.s3.endpoint"],
        ),
        (
            "name too long for its Job names",
            cache(
                &"n".repeat(53),
                json!({"source": http("https://a.example/x")}),
            ),
            vec!["metadata.name", "52"],
        ),
        (
            "javascript: URL",
            cache(
                "js",
                json!({"source": http("javascript:alert(document.cookie)")}),
            ),
            vec!["spec.source.http.url"],
        ),
        (
            "URL with a line break (header injection)",
            cache(
                "crlf",
                json!({"source": http("http://a.example/x\r\nHost: evil")}),
            ),
            vec!["spec.source.http.url"],
        ),
        (
            "URL of 3000 characters",
            cache(
                "huge",
                json!({"source": http(&format!("https://a.example/{}", "x".repeat(3000)))}),
            ),
            vec!["spec.source.http.url", "2048"],
        ),
        (
            "URL of the wrong type (a number)",
            cache("type", json!({"source": {"http": {"url": 42}}})),
            vec!["spec.source.http.url", "string"],
        ),
        (
            "checksum in upper case",
            cache(
                "upper",
                json!({"source": http("https://a.example/x"), "checksum": format!("sha256:{}", "A".repeat(64))}),
            ),
            vec!["spec.checksum"],
        ),
        (
            "bucket with upper case and a slash",
            cache(
                "bucket2",
                json!({"source": {"s3": {"bucket": "Templates/../x", "key": "k"}}}),
            ),
            vec!["spec.source.s3.bucket"],
        ),
        (
            "S3 endpoint that is a file path",
            cache(
                "endpoint2",
                json!({"source": {"s3": {"bucket": "templates", "key": "k", "endpoint": "file:///etc"}}}),
            ),
            vec!["spec.source.s3.endpoint"],
        ),
        (
            "S3 region with spaces",
            cache(
                "region",
                json!({"source": {"s3": {"bucket": "templates", "key": "k", "region": "us east"}}}),
            ),
            vec!["spec.source.s3.region"],
        ),
        (
            "empty secretRef name",
            cache(
                "secret",
                json!({"source": {"http": {"url": "https://a.example/x", "secretRef": {"name": ""}}}}),
            ),
            vec!["spec.source.http.secretRef.name"],
        ),
        (
            "empty storeRef name",
            cache(
                "storeref",
                json!({"source": http("https://a.example/x"), "storeRef": {"name": ""}}),
            ),
            vec!["spec.storeRef.name"],
        ),
        (
            "path traversal in the name",
            cache("../etc", json!({"source": http("https://a.example/x")})),
            vec!["metadata.name"],
        ),
        (
            "a reference finalizer that is not a valid name",
            {
                let mut c = cache("badref", json!({"source": http("https://a.example/x")}));
                c.metadata.finalizers = Some(vec!["ref.templatecache.io/has space".into()]);
                c
            },
            vec!["metadata.finalizers"],
        ),
    ];
    for (case, obj, expected) in cases {
        assert_refused(case, api.create(&pp, &obj).await, &expected);
    }

    // Immutable fields: create a valid cache, then try to change them.
    let valid = cache(
        "valid",
        json!({"source": http("https://a.example/x"), "checksum": format!("sha256:{}", "a".repeat(64))}),
    );
    api.create(&pp, &valid)
        .await
        .expect("a valid cache is accepted");
    let patch = |spec: Value| Patch::Merge(json!({"spec": spec}));
    let params = PatchParams::default();
    assert_refused(
        "changing spec.source",
        api.patch(
            "valid",
            &params,
            &patch(json!({"source": http("https://b.example/y")})),
        )
        .await,
        &["spec.source", "immutable"],
    );
    assert_refused(
        "changing spec.checksum",
        api.patch(
            "valid",
            &params,
            &patch(json!({"checksum": format!("sha256:{}", "b".repeat(64))})),
        )
        .await,
        &["spec.checksum", "immutable"],
    );
    assert_refused(
        "removing spec.checksum",
        api.patch("valid", &params, &patch(json!({"checksum": null})))
            .await,
        &["spec.checksum", "immutable"],
    );
    let status = |status: Value| Patch::Merge(json!({"status": status}));
    assert_refused(
        "a negative refCount written into the status",
        api.patch_status("valid", &params, &status(json!({"refCount": -1})))
            .await,
        &["status.refCount"],
    );
    assert_refused(
        "an unknown phase written into the status",
        api.patch_status("valid", &params, &status(json!({"phase": "Hacked"})))
            .await,
        &["status.phase", "supported values"],
    );
}

/// `kubectl patch tc <name> --type merge -p <patch>` in `namespace`: kubectl's answer.
fn kubectl_patch(namespace: &str, name: &str, patch: &Value) -> Result<String, String> {
    let mut command = support::kubectl();
    command
        .args([
            "patch", "tc", name, "-n", namespace, "--type", "merge", "-p",
        ])
        .arg(patch.to_string());
    support::tools::run(command)
}

/// `storeRef` and `checksum` are fixed at creation: the rules sit on the spec, since CEL does
/// not evaluate a field's own transition rule when the field is absent on one side, which once
/// let `storeRef` be added (the bytes stayed in one store and were counted in another).
#[tokio::test]
async fn store_ref_and_checksum_cannot_be_added_changed_or_removed_with_kubectl() {
    let rig = Rig::namespace("immutable-tc").await;
    let ns = &rig.ns;
    let checksum = |c: &str| format!("sha256:{}", c.repeat(64));
    ns.create_cache("plain", json!({"source": http("https://a.example/x")}))
        .await;
    ns.create_cache(
        "pinned",
        json!({"source": http("https://a.example/y"), "storeRef": {"name": "fast"},
               "checksum": checksum("a")}),
    )
    .await;
    let cases = [
        (
            "adding spec.storeRef",
            "plain",
            json!({"storeRef": {"name": "other"}}),
            "spec.storeRef",
        ),
        (
            "changing spec.storeRef",
            "pinned",
            json!({"storeRef": {"name": "other"}}),
            "spec.storeRef",
        ),
        (
            "removing spec.storeRef",
            "pinned",
            json!({"storeRef": null}),
            "spec.storeRef",
        ),
        (
            "adding spec.checksum",
            "plain",
            json!({"checksum": checksum("b")}),
            "spec.checksum",
        ),
        (
            "changing spec.checksum",
            "pinned",
            json!({"checksum": checksum("b")}),
            "spec.checksum",
        ),
        (
            "removing spec.checksum",
            "pinned",
            json!({"checksum": null}),
            "spec.checksum",
        ),
    ];
    for (case, name, spec, field) in cases {
        let refused = kubectl_patch(&ns.name, name, &json!({"spec": spec}))
            .expect_err(&format!("{case}: kubectl patch is refused"));
        for fragment in [field, "immutable", "cannot be added, changed or removed"] {
            assert!(refused.contains(fragment), "{case}: {refused}");
        }
        println!("refused ({case}): {refused}");
        support::corpus::record(
            &format!("kubectl patch tc: {case}"),
            &format!("refused: {}", refused.trim()),
        );
    }
    // What the rules leave alone: the same values written again, and the rest of the object.
    let same = json!({"spec": {"storeRef": {"name": "fast"}, "checksum": checksum("a")},
                      "metadata": {"labels": {"team": "a"}}});
    kubectl_patch(&ns.name, "pinned", &same).expect("the same storeRef and checksum pass");
    kubectl_patch(
        &ns.name,
        "plain",
        &json!({"metadata": {"labels": {"team": "a"}}}),
    )
    .expect("a cache without storeRef or checksum may still be labelled");
    let plain: TemplateCache = ns.api().get("plain").await.expect("plain");
    assert_eq!((plain.spec.store_ref, plain.spec.checksum), (None, None));
}

fn oci(source: Value) -> Value {
    json!({"source": {"oci": source}})
}

#[tokio::test]
async fn invalid_oci_sources_are_refused_with_the_field_named() {
    let rig = Rig::namespace("invalid-oci").await;
    let ns = &rig.ns;
    let ar = ApiResource::erase::<TemplateCache>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
    let pp = PostParams::default();
    let digest = format!("sha256:{}", "c".repeat(64));

    let cases: Vec<(&str, DynamicObject, Vec<&str>)> = vec![
        (
            "an OCI source beside an http one",
            cache(
                "two",
                json!({"source": {"http": {"url": "http://a.example/x"},
                                  "oci": {"reference": "reg.example/vms/a:1"}}}),
            ),
            vec!["spec.source", "exactly one of"],
        ),
        (
            "a scheme in the reference",
            cache(
                "scheme",
                oci(json!({"reference": "oci://reg.example/vms/a:1"})),
            ),
            vec!["spec.source.oci.reference", "without a scheme"],
        ),
        (
            "neither tag nor digest (an implicit latest)",
            cache(
                "latest",
                oci(json!({"reference": "reg.example:5000/vms/a"})),
            ),
            vec!["spec.source.oci.reference", "needs a tag"],
        ),
        (
            "no registry host (no implicit Docker Hub)",
            cache("hub", oci(json!({"reference": "ubuntu:24.04"}))),
            vec!["spec.source.oci.reference"],
        ),
        (
            "a malformed digest",
            cache(
                "digest",
                oci(json!({"reference": "reg.example/vms/a@sha256:abc"})),
            ),
            vec!["spec.source.oci.reference"],
        ),
        (
            "a file name that climbs out of the folder",
            cache(
                "file",
                oci(json!({"reference": "reg.example/vms/a:1", "file": "../etc/passwd"})),
            ),
            vec!["spec.source.oci.file"],
        ),
        (
            "an empty pull secret name",
            cache(
                "secret",
                oci(json!({"reference": "reg.example/vms/a:1", "secretRef": {"name": ""}})),
            ),
            vec!["spec.source.oci.secretRef.name"],
        ),
    ];
    for (case, obj, expected) in cases {
        assert_refused(case, api.create(&pp, &obj).await, &expected);
    }

    for (name, reference) in [
        ("tag", "reg.example:5000/vms/ubuntu:24.04".to_owned()),
        ("digest", format!("localhost/models/llama@{digest}")),
        ("both", format!("127.0.0.1:5000/a/b_c/d-e:v1.0@{digest}")),
    ] {
        let source = oci(
            json!({"reference": reference, "file": "disk.qcow2", "secretRef": {"name": "pull"}}),
        );
        api.create(&pp, &cache(name, source))
            .await
            .unwrap_or_else(|e| panic!("{reference} is accepted: {e}"));
    }
    assert_refused(
        "changing spec.source.oci.reference",
        api.patch(
            "tag",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": oci(json!({"reference": "reg.example:5000/vms/ubuntu:26.04"}))}),
            ),
        )
        .await,
        &["spec.source", "immutable"],
    );
}

#[tokio::test]
async fn invalid_staging_stores_are_refused_with_the_field_named() {
    let client = support::client().await;
    let ar = ApiResource::erase::<StagingStore>(&());
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let pp = PostParams::default();
    let suffix = std::process::id();
    let name = |n: &str| format!("invalid-{n}-{suffix}");
    let host = json!({"hostPath": {"path": "/var/lib/staging"}});

    let cases: Vec<(&str, DynamicObject, Vec<&str>)> = vec![
        (
            "watermarks out of order",
            store(
                &name("wm"),
                json!({"volume": host, "capacity": "10Gi",
                       "eviction": {"highWatermarkPercent": 60, "lowWatermarkPercent": 80}}),
            ),
            vec!["spec.eviction", "lowWatermarkPercent must be below"],
        ),
        (
            "watermark above 100",
            store(
                &name("wm100"),
                json!({"volume": host, "capacity": "10Gi",
                       "eviction": {"highWatermarkPercent": 150, "lowWatermarkPercent": 80}}),
            ),
            vec!["spec.eviction.highWatermarkPercent"],
        ),
        (
            "two volumes",
            store(
                &name("two"),
                json!({"volume": {"hostPath": {"path": "/a"}, "nfs": {"server": "n", "path": "/b"}},
                       "capacity": "10Gi"}),
            ),
            vec!["spec.volume", "exactly one of"],
        ),
        (
            "capacity is not a quantity",
            store(&name("cap"), json!({"volume": host, "capacity": "lots"})),
            vec!["spec.capacity"],
        ),
        (
            "relative hostPath",
            store(
                &name("rel"),
                json!({"volume": {"hostPath": {"path": "data"}}, "capacity": "1Gi"}),
            ),
            vec!["spec.volume.hostPath.path"],
        ),
        (
            "hostPath escaping with ..",
            store(
                &name("dots"),
                json!({"volume": {"hostPath": {"path": "/srv/../etc"}}, "capacity": "1Gi"}),
            ),
            vec!["spec.volume.hostPath.path", ".."],
        ),
        (
            "capacity of zero",
            store(&name("zero"), json!({"volume": host, "capacity": "0"})),
            vec!["spec.capacity", "at least 1 byte"],
        ),
        (
            "capacity below one byte",
            store(&name("milli"), json!({"volume": host, "capacity": "100m"})),
            vec!["spec.capacity", "at least 1 byte"],
        ),
        (
            "capacity past 8 EiB",
            store(&name("exa"), json!({"volume": host, "capacity": "20Ei"})),
            vec!["spec.capacity", "under 8Ei"],
        ),
        (
            "negative minUnusedSeconds",
            store(
                &name("unused"),
                json!({"volume": host, "capacity": "1Gi", "eviction": {"minUnusedSeconds": -5}}),
            ),
            vec!["spec.eviction.minUnusedSeconds"],
        ),
        (
            "namespaceQuota is not a quantity",
            store(
                &name("quota"),
                json!({"volume": host, "capacity": "1Gi", "namespaceQuota": "plenty"}),
            ),
            vec!["spec.namespaceQuota", "quantity"],
        ),
        (
            "namespaceQuota of zero",
            store(
                &name("quota0"),
                json!({"volume": host, "capacity": "1Gi", "namespaceQuota": "0"}),
            ),
            vec!["spec.namespaceQuota", "at least 1 byte"],
        ),
        (
            "namespaceSelector that is not a label selector",
            store(
                &name("selector"),
                json!({"volume": host, "capacity": "1Gi", "namespaceSelector": {"matchLabels": ["a"]}}),
            ),
            vec!["spec.namespaceSelector.matchLabels"],
        ),
        (
            "NFS path that is not absolute",
            store(
                &name("nfs"),
                json!({"volume": {"nfs": {"server": "nfs.example", "path": "exports"}}, "capacity": "1Gi"}),
            ),
            vec!["spec.volume.nfs.path"],
        ),
    ];
    for (case, obj, expected) in cases {
        assert_refused(case, api.create(&pp, &obj).await, &expected);
    }

    // Large stores are whole bytes too (a CEL isInteger() check once refused 100Ti and up).
    for (i, capacity) in ["100Ti", "1Pi", "7Ei", "1.5Gi"].into_iter().enumerate() {
        let big = store(
            &name(&format!("big{i}")),
            json!({"volume": host, "capacity": capacity}),
        );
        api.create(&pp, &big)
            .await
            .unwrap_or_else(|e| panic!("capacity {capacity} is accepted: {e}"));
        let _ = api
            .delete(&name(&format!("big{i}")), &Default::default())
            .await;
    }
    let tenancy = store(
        &name("tenancy"),
        json!({"volume": host, "capacity": "10Gi", "namespaceQuota": "2Gi",
               "namespaceSelector": {"matchLabels": {"tier": "vms"}}}),
    );
    api.create(&pp, &tenancy)
        .await
        .expect("a store with a namespace selector and quota is accepted");
    let _ = api.delete(&name("tenancy"), &Default::default()).await;
    let valid = store(&name("ok"), json!({"volume": host, "capacity": "10Gi"}));
    let created = api
        .create(&pp, &valid)
        .await
        .expect("a valid store is accepted");
    let eviction = &created.data["spec"]["eviction"];
    assert_eq!(eviction["highWatermarkPercent"], 85, "defaults are applied");
    assert_refused(
        "changing spec.volume",
        api.patch(
            &name("ok"),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"volume": {"hostPath": {"path": "/elsewhere"}}}})),
        )
        .await,
        &["spec.volume", "immutable"],
    );
    let _ = api
        .delete(
            created.meta().name.as_deref().unwrap_or_default(),
            &Default::default(),
        )
        .await;
}

fn claim(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCacheClaim",
        "metadata": {"name": name}, "spec": spec
    }))
    .expect("claim literal")
}

#[tokio::test]
async fn invalid_claims_are_refused_with_the_field_named() {
    let rig = Rig::namespace("invalid-tcc").await;
    let ns = &rig.ns;
    let ar = ApiResource::erase::<TemplateCacheClaim>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
    let pp = PostParams::default();
    let cases: Vec<(&str, DynamicObject, Vec<&str>)> = vec![
        (
            "claim without cacheName",
            claim("no-name", json!({})),
            vec!["spec.cacheName", "Required value"],
        ),
        (
            "claim whose cacheName is not a valid name",
            claim("bad-name", json!({"cacheName": "Not_A/Name"})),
            vec!["spec.cacheName", "should match"],
        ),
        (
            "claim whose cacheName is longer than a cache name may be",
            claim("long-name", json!({"cacheName": "c".repeat(53)})),
            vec!["spec.cacheName", "52"],
        ),
        (
            "claim whose template has two sources",
            claim(
                "two-sources",
                json!({"cacheName": "img", "template": {"source": {
                    "http": {"url": "http://a.example/x"},
                    "s3": {"bucket": "templates", "key": "x"}}}}),
            ),
            vec!["spec.template.source", "exactly one of"],
        ),
        (
            "claim whose template has a URL that is not http(s)",
            claim(
                "bad-url",
                json!({"cacheName": "img", "template": {"source": {"http": {"url": "file:///etc/passwd"}}}}),
            ),
            vec!["spec.template.source.http.url"],
        ),
        (
            "claim whose template has a malformed checksum",
            claim(
                "bad-sum",
                json!({"cacheName": "img", "template": {"source": http("http://a.example/x"), "checksum": "md5:abc"}}),
            ),
            vec!["spec.template.checksum"],
        ),
        (
            "claim whose OCI template has neither tag nor digest",
            claim(
                "oci-latest",
                json!({"cacheName": "img", "template": {"source": {"oci": {"reference": "reg.example/vms/a"}}}}),
            ),
            vec!["spec.template.source.oci.reference", "needs a tag"],
        ),
    ];
    for (case, object, expected) in cases {
        assert_refused(case, api.create(&pp, &object).await, &expected);
    }

    let template = json!({"source": http("http://a.example/x")});
    api.create(
        &pp,
        &claim("vm-1", json!({"cacheName": "img", "template": template})),
    )
    .await
    .expect("a valid claim is accepted");
    let params = PatchParams::default();
    for (case, patch, expected) in [
        (
            "changing a claim's cacheName",
            json!({"spec": {"cacheName": "other"}}),
            vec!["spec.cacheName", "immutable"],
        ),
        (
            "changing a claim's template",
            json!({"spec": {"template": {"source": http("http://b.example/y")}}}),
            vec!["spec.template", "immutable"],
        ),
        (
            "dropping a claim's template",
            json!({"spec": {"template": null}}),
            vec!["spec.template", "immutable"],
        ),
    ] {
        let result = api.patch("vm-1", &params, &Patch::Merge(&patch)).await;
        assert_refused(case, result, &expected);
    }
}
