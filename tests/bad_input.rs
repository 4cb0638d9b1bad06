//! Hostile and mistaken requests, beyond what the schema refuses (tests/api_validation.rs):
//! each is refused with a clear message or handled without harm, and recorded for the table in
//! docs/reliability.md.

use templatecache_test_support as support;

use futures::future::join_all;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::corpus::record;
use support::http_spec;
use support::jobs::wait_for_cache;
use support::registry::{PASSWORD, Registry};
use support::rig::{Rig, ready_reason};
use support::{TestNamespace, kubectl};
use templatecache_api::conditions::{READY, find};
use templatecache_api::reasons::cache as reason;
use templatecache_api::references::count_references;
use templatecache_api::{TemplateCache, TemplateCacheClaim};
use templatecache_client::{self as client, ClientError};

async fn refs(ns: &TestNamespace, name: &str) -> (u32, String) {
    let cache = ns.api::<TemplateCache>().get(name).await.expect("cache");
    let version = cache.resource_version().unwrap_or_default();
    (count_references(cache.finalizers()), version)
}

/// Waits until the cache holds `count` references and its status says so; returns its
/// resourceVersion.
async fn settled_refs(ns: &TestNamespace, name: &str, count: u32) -> String {
    let cache = wait_for_cache(&ns.client, &ns.name, name, "references settled", |c| {
        count_references(c.finalizers()) == count
            && c.status.as_ref().and_then(|s| s.ref_count) == Some(count)
    })
    .await;
    cache.resource_version().unwrap_or_default()
}

async fn claim_count(ns: &TestNamespace) -> usize {
    let claims: Api<TemplateCacheClaim> = ns.api();
    claims
        .list(&Default::default())
        .await
        .expect("claims")
        .items
        .len()
}

#[tokio::test]
async fn consumers_that_misbehave_change_nothing_they_should_not() {
    let rig = Rig::operator("bad-consumer").await;
    let ns = &rig.ns;
    let url = "https://templates.invalid/img.qcow2";
    let cache = ns.request("img", Some(http_spec(url)));
    let holder = client::acquire(ns.client.clone(), &cache, "holder")
        .await
        .expect("acquire");
    // The copy Job never runs here (the rig makes no mover account, so the Job controller
    // cannot make its Pod), so it waits for ever: once the cache says Copying,
    // records its Job's uid and counts the holder, the operator has nothing left to write, and
    // any change of its resourceVersion is the misbehaving consumer's.
    wait_for_cache(&ns.client, &ns.name, "img", "copying, Job recorded", |c| {
        let status = c.status.clone().unwrap_or_default();
        let ready = find(&status.conditions, READY);
        ready.is_some_and(|r| r.reason == reason::COPYING) && status.job_uid.is_some()
    })
    .await;
    let before = settled_refs(ns, "img", 1).await;

    for (case, id) in [
        ("consumer id that is empty", String::new()),
        ("consumer id with a slash", "../../x".to_owned()),
        ("consumer id of 64 characters", "c".repeat(64)),
        ("consumer id of 10,000 characters", "c".repeat(10_000)),
    ] {
        let result = client::acquire(ns.client.clone(), &cache, &id).await;
        let Err(e @ ClientError::InvalidConsumerId(_)) = result else {
            panic!("{case}: {result:?}");
        };
        assert_eq!(claim_count(ns).await, 1, "{case}: no claim made");
        assert_eq!(
            refs(ns, "img").await,
            (1, before.clone()),
            "{case}: cache untouched"
        );
        record(
            case,
            &format!("refused by the library: {e}; no claim made, the cache untouched"),
        );
    }

    client::release(ns.client.clone(), &ns.name, "img", "never-held")
        .await
        .expect("a release of nothing is a no-op");
    assert_eq!(refs(ns, "img").await, (1, before.clone()));
    record(
        "releasing a reference never held",
        "no-op: Ok, refCount and resourceVersion unchanged",
    );

    let spare = client::acquire(ns.client.clone(), &cache, "twice")
        .await
        .expect("acquire");
    settled_refs(ns, "img", 2).await;
    spare.clone().release().await.expect("release");
    spare.release().await.expect("second release");
    settled_refs(ns, "img", 1).await;
    record(
        "releasing the same reference twice",
        "second release is a no-op; refCount back to 1",
    );

    let storm =
        join_all((0..50).map(|_| client::acquire(ns.client.clone(), &cache, "same-one"))).await;
    assert!(storm.iter().all(Result::is_ok), "{storm:?}");
    assert_eq!(claim_count(ns).await, 2, "one consumer, one claim");
    settled_refs(ns, "img", 2).await;
    client::release(ns.client.clone(), &ns.name, "img", "same-one")
        .await
        .expect("release");
    settled_refs(ns, "img", 1).await;
    record(
        "one consumer acquiring 50 times at once",
        "one claim, counted once (refCount +1); one release frees it",
    );

    let other = ns.request(
        "img",
        Some(http_spec("https://elsewhere.invalid/other.qcow2")),
    );
    let mismatch = client::acquire(ns.client.clone(), &other, "mismatch")
        .await
        .expect("the claim is made");
    let result = mismatch
        .wait_ready(std::time::Duration::from_secs(60))
        .await;
    let Err(e @ ClientError::SpecMismatch { .. }) = result else {
        panic!("spec mismatch: {result:?}");
    };
    assert_eq!(
        refs(ns, "img").await.0,
        1,
        "a mismatched claim holds nothing"
    );
    record(
        "claiming an existing cache with a different source",
        &format!("claim Failed (TemplateMismatch), no reference, cache unchanged: {e}"),
    );

    ns.api::<TemplateCache>()
        .delete("img", &Default::default())
        .await
        .expect("delete");
    settled_refs(ns, "img", 1).await;
    let late = client::acquire(ns.client.clone(), &ns.request("img", None), "late")
        .await
        .expect("the claim is made");
    let result = late.wait_ready(std::time::Duration::from_secs(3)).await;
    assert!(
        matches!(result, Err(ClientError::Timeout(..))),
        "{result:?}"
    );
    assert_eq!(
        refs(ns, "img").await.0,
        1,
        "a cache being deleted takes no new reference"
    );
    record(
        "claiming a cache that is being deleted",
        "the claim stays Pending (CacheDeleting) and holds nothing; it binds if the cache is made again",
    );
    late.release().await.expect("release");
    mismatch.release().await.expect("release");
    holder.release().await.expect("release");
}

/// A consumer id that is `h-` and 20 hex characters is used as it is in its claim's name; it
/// once equalled the hashed name of another id (`Pod_UID.x`), and the two consumers shared a
/// claim: one release dropped the other's reference.
#[tokio::test]
async fn two_consumers_whose_ids_once_named_one_claim_hold_a_reference_each() {
    use sha2::{Digest, Sha256};
    let rig = Rig::operator("lookalike-id").await;
    let ns = &rig.ns;
    let cache = ns.request(
        "img",
        Some(http_spec("https://templates.invalid/img.qcow2")),
    );
    let hashed_id = "Pod_UID.x";
    let digest = Sha256::digest(hashed_id.as_bytes());
    let lookalike: String = std::iter::once("h-".to_owned())
        .chain(digest.iter().take(10).map(|b| format!("{b:02x}")))
        .collect();
    let first = client::acquire(ns.client.clone(), &cache, hashed_id)
        .await
        .expect("acquire");
    let second = client::acquire(ns.client.clone(), &cache, &lookalike)
        .await
        .expect("acquire");
    let names = format!("{} and {}", first.claim_name(), second.claim_name());
    assert_ne!(first.claim_name(), second.claim_name(), "two claims");
    settled_refs(ns, "img", 2).await;
    first.release().await.expect("release");
    settled_refs(ns, "img", 1).await;
    let left: TemplateCacheClaim = ns.api().get(second.claim_name()).await.expect("claim");
    assert_eq!(left.spec.cache_name, "img");
    record(
        &format!("consumer ids {hashed_id} and {lookalike} (once the same claim name)"),
        &format!("two claims ({names}), refCount 2; releasing one leaves the other's reference"),
    );
}

#[tokio::test]
async fn ten_thousand_references_on_one_cache_are_counted_and_released() {
    let rig = Rig::operator("tenk").await;
    let ns = &rig.ns;
    ns.create_cache(
        "img",
        json!({"source": {"http": {"url": "https://t.invalid/x"}}}),
    )
    .await;
    // Appends need the list the operator starts with its cleanup finalizer.
    wait_for_cache(&ns.client, &ns.name, "img", "finalized", |c| {
        !c.finalizers().is_empty()
    })
    .await;
    let caches: Api<TemplateCache> = ns.api();
    let ids: Vec<String> = (0..10_000)
        .map(|i| format!("ref.templatecache.io/consumer-{i:05}"))
        .collect();
    for batch in ids.chunks(500) {
        let ops: Vec<_> = batch
            .iter()
            .map(|f| json!({"op": "add", "path": "/metadata/finalizers/-", "value": f}))
            .collect();
        let patch: json_patch::Patch = serde_json::from_value(json!(ops)).expect("patch");
        caches
            .patch("img", &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
            .expect("500 references in one patch");
    }
    let counted = wait_for_cache(&ns.client, &ns.name, "img", "refCount 10000", |c| {
        c.status.as_ref().and_then(|s| s.ref_count) == Some(10_000)
    })
    .await;
    let size = serde_json::to_vec(&counted).expect("json").len();
    let remaining: Vec<String> = counted
        .finalizers()
        .iter()
        .filter(|f| !f.starts_with("ref."))
        .cloned()
        .collect();
    let patch = json!({"metadata": {"finalizers": remaining}});
    caches
        .patch("img", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("release all");
    wait_for_cache(&ns.client, &ns.name, "img", "refCount 0", |c| {
        c.status.as_ref().and_then(|s| s.ref_count) == Some(0)
    })
    .await;
    record(
        "10,000 references on one cache",
        &format!(
            "accepted in 20 patches; refCount 10000 ({size} bytes of JSON, under etcd's 1.5 MB); all released: refCount 0"
        ),
    );
}

#[tokio::test]
async fn sources_the_operator_must_not_fetch_start_no_job() {
    let rig = Rig::builder("bad-source")
        .configured(|cfg| {
            cfg.source_allowlist = vec![
                "https://images.example.com/".into(),
                "oci://registry.example.com/vms/".into(),
            ];
        })
        .start()
        .await;
    let ns = &rig.ns;

    ns.create_cache(
        "internal",
        json!({"source": {"http": {"url": "http://169.254.169.254/latest/meta-data/"}}}),
    )
    .await;
    let message = ready_reason(ns, "internal", reason::SOURCE_NOT_ALLOWED).await;
    assert!(
        message.contains("outside the operator's source allowlist"),
        "{message}"
    );
    record(
        "a source outside the operator's allowlist (cloud metadata address)",
        &format!("Failed, reason SourceNotAllowed, no Job: {message}"),
    );
    ns.create_cache(
        "lookalike",
        json!({"source": {"http": {"url": "https://images.example.com.evil.example/x"}}}),
    )
    .await;
    ready_reason(ns, "lookalike", reason::SOURCE_NOT_ALLOWED).await;
    record(
        "a look-alike host that shares the allowlisted prefix but not its slash",
        "Failed, reason SourceNotAllowed, no Job",
    );

    for (name, reference, case) in [
        (
            "oci-lookalike",
            "registry.example.com/vms-evil/ubuntu:24.04",
            "an OCI repository that shares the allowlisted oci:// prefix but not its slash",
        ),
        (
            "oci-metadata",
            "169.254.169.254/latest:1",
            "an OCI registry outside the allowlist (cloud metadata address)",
        ),
    ] {
        ns.create_cache(name, json!({"source": {"oci": {"reference": reference}}}))
            .await;
        let message = ready_reason(ns, name, reason::SOURCE_NOT_ALLOWED).await;
        let repository = reference.rsplit_once(':').map_or(reference, |(r, _)| r);
        assert!(
            message.contains(&format!("source oci://{repository} is outside")),
            "{message}"
        );
        record(
            case,
            &format!("Failed, reason SourceNotAllowed, no Job: {message}"),
        );
    }

    ns.create_cache(
        "nowhere",
        json!({"source": {"http": {"url": "https://images.example.com/x"}}, "storeRef": {"name": "no-such-store"}}),
    )
    .await;
    let message = ready_reason(ns, "nowhere", reason::STORE_NOT_FOUND).await;
    record(
        "a cache naming a StagingStore that does not exist",
        &format!("Pending, reason StoreNotFound, no Job: {message}"),
    );
    let jobs = ns
        .api::<Job>()
        .list(&Default::default())
        .await
        .expect("jobs");
    assert!(jobs.items.is_empty(), "no Job for any of them");
}

#[tokio::test]
async fn the_data_mover_refuses_a_key_that_climbs_out_of_its_bucket() {
    let dir = tempfile::tempdir().expect("dir");
    let dest = dir.path().join("ns/img");
    // A listening endpoint, so that "before any request" is seen, not assumed.
    let endpoint = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    endpoint.set_nonblocking(true).expect("non-blocking");
    let url = format!("http://{}", endpoint.local_addr().expect("address"));
    let mover = tokio::process::Command::new(env!("CARGO_BIN_EXE_templatecache"))
        .args(["copy", "--attempt", "1", "--dest"])
        .arg(&dest)
        .args(["--s3-bucket", "templates", "--s3-key", "../../etc/passwd"])
        .args(["--s3-endpoint", &url])
        // The endpoint's address is allowed, so only the key check can keep the mover away.
        .args(["--allow-internal-address", support::LOOPBACK_SOURCES])
        .kill_on_drop(true)
        .output();
    // A mover that got past the key would wait on the silent endpoint: fail, not hang.
    let output = tokio::time::timeout(std::time::Duration::from_secs(30), mover)
        .await
        .expect("the mover refused the key at once, without waiting on the endpoint")
        .expect("run the mover");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("../../etc/passwd"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        0,
        "nothing written"
    );
    let connection = endpoint.accept().map(|_| ()).map_err(|e| e.kind());
    assert_eq!(
        connection,
        Err(std::io::ErrorKind::WouldBlock),
        "the mover connected to the endpoint"
    );
    record(
        "an S3 key with ../ segments",
        &format!(
            "the data mover refuses it before any request, writes nothing: {}",
            stderr.trim()
        ),
    );
}

#[tokio::test]
async fn a_container_disk_whose_disk_is_a_link_or_outside_disk_stages_nothing() {
    let registry = Registry::start().await;
    let mut tar = tar::Builder::new(Vec::new());
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    tar.append_link(&mut link, "disk/disk.img", "/etc/shadow")
        .expect("link entry");
    let mut beside = tar::Header::new_gnu();
    beside.set_size(4);
    beside.set_mode(0o644);
    beside.set_cksum();
    tar.append_data(&mut beside, "etc/disk.img", &b"evil"[..])
        .expect("file entry");
    let tar = tar.into_inner().expect("tar");
    registry.push_tar_image("vms/hostile", "v1", &tar);
    let rig = Rig::new("bad-disk", 1).await;
    rig.ns
        .create::<Secret>(registry.pull_secret("pull", PASSWORD))
        .await;
    let reference = format!("{}/vms/hostile:v1", registry.host);
    rig.create(
        "hostile",
        json!({"source": {"oci": {"reference": reference, "file": "disk.img", "secretRef": {"name": "pull"}}}}),
    )
    .await;
    let message = rig.failed_for_good("hostile").await;
    assert!(message.contains("has no file disk.img"), "{message}");
    assert!(rig.files().is_empty(), "nothing staged: {:?}", rig.files());
    record(
        "a containerDisk whose disk/disk.img is a symlink to /etc/shadow, with a disk.img outside disk/",
        &format!("Failed, nothing staged (links and other paths are never read): {message}"),
    );
}

#[tokio::test]
async fn unknown_fields_are_refused_by_kubectl_apply() {
    let rig = Rig::namespace("strict").await;
    let ns = &rig.ns;
    let manifest = format!(
        "apiVersion: templatecache.io/v1alpha1\nkind: TemplateCache\nmetadata: {{name: typo, namespace: {}}}\nspec:\n  source: {{http: {{url: 'https://a.example/x'}}}}\n  checksumm: sha256:abc\n",
        ns.name
    );
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("typo.yaml");
    std::fs::write(&file, manifest).expect("manifest");
    let output = kubectl()
        .args(["apply", "-f"])
        .arg(&file)
        .output()
        .expect("kubectl");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("unknown field \"spec.checksumm\""),
        "{stderr}"
    );
    record(
        "a misspelt field (spec.checksumm) in kubectl apply",
        &format!("refused: {}", stderr.trim()),
    );
}
