//! Templates from a real OCI registry, end to end on the real node: the CNCF distribution
//! registry on the node's address behind htpasswd auth, artifacts pushed with `oras`, the
//! operator's copy Jobs run as Pods, the pull secret handed over as a
//! `kubernetes.io/dockerconfigjson` Secret.

use templatecache_test_support as support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use support::jobs::{jobs_of, wait_for_cache};
use support::registry::{PASSWORD, Registry};
use support::rig::{Rig, random_bytes, sha256};
use support::throttle::ThrottleProxy;
use templatecache_api::{Phase, StagingStore, TemplateCache};
use templatecache_mover::address::classify;

/// The pull secret every test uses, and one with a wrong password, for the registry reached as
/// `host` (itself, or a proxy in front of it).
async fn pull_secrets(rig: &Rig, registry: &Registry, host: &str) {
    for (name, password) in [("pull", PASSWORD), ("pull-wrong", "not-the-password")] {
        rig.ns
            .create::<Secret>(registry.pull_secret_as(name, password, host))
            .await;
    }
}

/// An OCI source at `host` with the pull secret.
fn oci(host: &str, repository_and_version: &str, file: Option<&str>) -> serde_json::Value {
    let mut source = json!({
        "reference": format!("{host}/{repository_and_version}"),
        "secretRef": {"name": "pull"},
    });
    if let Some(file) = file {
        source["file"] = json!(file);
    }
    json!({"oci": source})
}

fn resolved_digest(cache: &TemplateCache) -> Option<String> {
    cache
        .status
        .as_ref()
        .and_then(|s| s.resolved_digest.clone())
}

#[tokio::test]
async fn an_oras_artifact_and_a_container_disk_each_reach_ready_byte_identical() {
    let registry = Registry::start().await;
    let model = random_bytes(5 << 20);
    let readme = b"not this one".to_vec();
    let artifact = registry.push_artifact(
        "models/tiny",
        "v1",
        &[("model.bin", &model), ("README.md", &readme)],
    );
    let disk = random_bytes(3 << 20);
    let image = registry.push_container_disk("vms/cirros", "0.6", &[("disk.img", &disk)]);
    let rig = Rig::new("oci-ready", 1).await;
    pull_secrets(&rig, &registry, &registry.host).await;

    rig.create(
        "model",
        json!({"source": oci(&registry.host, "models/tiny:v1", Some("model.bin"))}),
    )
    .await;
    // The cache's checksum is the disk file's, not the compressed layer's.
    rig.create(
        "cirros",
        json!({"source": oci(&registry.host, "vms/cirros:0.6", None), "checksum": sha256(&disk)}),
    )
    .await;

    rig.assert_copied("model", &model).await;
    rig.assert_copied("cirros", &disk).await;
    let model_cache = rig.settled("model").await;
    assert_eq!(
        resolved_digest(&model_cache),
        Some(artifact),
        "the tag's digest is recorded"
    );
    assert_eq!(resolved_digest(&rig.settled("cirros").await), Some(image));
    let mut files = rig.files();
    files.sort();
    assert_eq!(files, ["cirros", "model"], "no partial file left");
}

#[tokio::test]
async fn registry_failures_end_failed_with_the_reason_named_and_nothing_left() {
    let registry = Registry::start().await;
    let bytes = random_bytes(1 << 20);
    registry.push_artifact("models/two", "v1", &[("a.bin", &bytes), ("b.bin", b"b")]);
    let tampered = registry.push_artifact("models/tampered", "v1", &[("a.bin", &bytes)]);
    registry.corrupt_blob(&registry.layer_of("models/tampered", &tampered));
    registry.push_index("vms/arm-only", "v1", &["arm64", "s390x"], &bytes);
    let rig = Rig::new("oci-failures", 1).await;
    pull_secrets(&rig, &registry, &registry.host).await;

    let mut wrong_password = oci(&registry.host, "models/two:v1", Some("a.bin"));
    wrong_password["oci"]["secretRef"]["name"] = json!("pull-wrong");
    let cases = [
        ("wrong-password", wrong_password, "refused our credentials"),
        (
            "missing-tag",
            oci(&registry.host, "models/two:v9", Some("a.bin")),
            "does not exist",
        ),
        (
            "missing-file",
            oci(&registry.host, "models/two:v1", Some("c.bin")),
            "has no file c.bin (it holds: a.bin, b.bin)",
        ),
        (
            "ambiguous",
            oci(&registry.host, "models/two:v1", None),
            "holds several files (a.bin, b.bin): name one in spec.source.oci.file",
        ),
        (
            "tampered",
            oci(&registry.host, "models/tampered:v1", None),
            "the registry sent other bytes than it names",
        ),
        (
            "no-platform",
            oci(&registry.host, "vms/arm-only:v1", None),
            "without a linux/amd64 manifest (it offers linux/arm64, linux/s390x)",
        ),
    ];
    for (name, source, _) in &cases {
        rig.create(name, json!({"source": source})).await;
    }
    for (name, _, expected) in &cases {
        let message = rig.failed_for_good(name).await;
        assert!(message.contains(expected), "{name}: {message}");
        assert!(!message.contains(PASSWORD) && !message.contains("not-the-password"));
        println!("{name}: {message}");
    }
    assert!(rig.files().is_empty(), "nothing left: {:?}", rig.files());
}

#[tokio::test]
async fn a_tag_moved_during_a_copy_does_not_change_what_is_staged() {
    let registry = Registry::start().await;
    let first = random_bytes(2 << 20);
    let second: Vec<u8> = first.iter().map(|b| b ^ 0x5a).collect();
    let first_digest = registry.push_artifact("models/moving", "stable", &[("m.bin", &first)]);
    // A store too small for the file: the mover resolves the tag, then waits for room.
    let rig = Rig::with_store("oci-moved", 1, "1Mi", json!({})).await;
    pull_secrets(&rig, &registry, &registry.host).await;
    rig.create(
        "moving",
        json!({"source": oci(&registry.host, "models/moving:stable", None)}),
    )
    .await;
    let waiting = wait_for_cache(
        &rig.ns.client,
        &rig.ns.name,
        "moving",
        "waiting for room with its tag resolved",
        |c| {
            let status = c.status.as_ref();
            let resolved = status.and_then(|s| s.resolved_digest.as_ref()).is_some();
            let refused = status
                .and_then(|s| s.storage.as_ref())
                .is_some_and(|s| !s.admitted);
            resolved && refused
        },
    )
    .await;
    assert_eq!(resolved_digest(&waiting), Some(first_digest.clone()));

    // The tag moves while the copy waits; then the room comes.
    let second_digest = registry.push_artifact("models/moving", "stable", &[("m.bin", &second)]);
    assert_ne!(first_digest, second_digest);
    let stores: kube::Api<StagingStore> = kube::Api::all(rig.ns.client.clone());
    stores
        .patch(
            &rig.store().name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"capacity": "10Gi"}})),
        )
        .await
        .expect("grow the store");

    rig.assert_copied("moving", &first).await;
    assert_eq!(
        resolved_digest(&rig.settled("moving").await),
        Some(first_digest)
    );
}

#[tokio::test]
async fn a_retry_pulls_the_digest_the_first_attempt_resolved_not_the_moved_tag() {
    let registry = Registry::start().await;
    let first = random_bytes(1 << 20);
    let second = random_bytes(1 << 19);
    let first_digest = registry.push_artifact("models/retry", "stable", &[("m.bin", &first)]);
    // The first version's blob is broken, so every attempt at it fails.
    registry.corrupt_blob(&registry.layer_of("models/retry", &first_digest));
    let rig = Rig::with_config("oci-retry", |cfg| {
        cfg.retry.max_attempts = 2;
        cfg.retry.base_delay = Duration::from_secs(5);
        cfg.retry.max_delay = Duration::from_secs(5);
    })
    .await;
    pull_secrets(&rig, &registry, &registry.host).await;
    rig.create(
        "retry",
        json!({"source": oci(&registry.host, "models/retry:stable", None)}),
    )
    .await;
    let resolved = wait_for_cache(&rig.ns.client, &rig.ns.name, "retry", "resolved", |c| {
        resolved_digest(c).is_some()
    })
    .await;
    assert_eq!(resolved_digest(&resolved), Some(first_digest.clone()));
    // The tag now names a sound version; a retry that resolved it again would succeed.
    registry.push_artifact("models/retry", "stable", &[("m.bin", &second)]);

    let message = rig.failed_for_good("retry").await;
    assert!(message.contains("other bytes than it names"), "{message}");
    let jobs = jobs_of(&rig.ns.client, &rig.ns.name, "retry").await;
    let second_attempt = jobs
        .iter()
        .find(|j| j.metadata.name.as_deref() == Some("retry-copy-2"))
        .expect("a second attempt ran");
    let args = second_attempt
        .spec
        .as_ref()
        .expect("spec")
        .template
        .spec
        .as_ref()
        .expect("pod")
        .containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(
        args.contains(&format!("--oci-digest={first_digest}")),
        "{args:?}"
    );

    // The same tag, read afresh by a new cache, is the second version: the tag did move.
    rig.create(
        "fresh",
        json!({"source": oci(&registry.host, "models/retry:stable", None)}),
    )
    .await;
    rig.assert_copied("fresh", &second).await;
    assert!(!rig.data("retry").exists());
}

#[tokio::test]
async fn a_blob_download_cut_mid_way_resumes_from_its_last_byte() {
    let registry = Registry::start().await;
    let model = random_bytes(6 << 20);
    let digest = registry.push_artifact("models/flaky", "v1", &[("model.bin", &model)]);
    let upstream = registry.host.parse().expect("registry address");
    // Every connection drops after 2 MiB: the blob needs at least three.
    let proxy = ThrottleProxy::cutting(upstream, 2 << 20).await;
    let via_proxy = proxy.addr.to_string();
    let rig = Rig::new("oci-resume", 1).await;
    pull_secrets(&rig, &registry, &via_proxy).await;
    rig.create(
        "flaky",
        json!({"source": oci(&via_proxy, "models/flaky:v1", None), "checksum": sha256(&model)}),
    )
    .await;

    rig.assert_copied("flaky", &model).await;
    assert_eq!(resolved_digest(&rig.settled("flaky").await), Some(digest));
    assert!(
        proxy.connections() >= 3,
        "the download was cut and resumed: {} connections",
        proxy.connections()
    );
    assert_eq!(rig.files(), ["flaky"], "no partial file left");
}

#[tokio::test]
async fn a_container_disk_copy_reports_its_progress_in_the_disk_files_bytes() {
    let registry = Registry::start().await;
    let disk = random_bytes(8 << 20);
    registry.push_container_disk("vms/slow", "v1", &[("disk.img", &disk)]);
    // 2 MiB/s: about four seconds for the layer, time for several reports.
    let proxy = ThrottleProxy::start(registry.host.parse().expect("address"), 2 << 20).await;
    let via_proxy = proxy.addr.to_string();
    let rig = Rig::new("oci-progress", 1).await;
    pull_secrets(&rig, &registry, &via_proxy).await;
    rig.create(
        "slow",
        json!({"source": oci(&via_proxy, "vms/slow:v1", None)}),
    )
    .await;

    let midway = wait_for_cache(&rig.ns.client, &rig.ns.name, "slow", "part copied", |c| {
        let status = c.status.as_ref();
        let progress = status.and_then(|s| s.progress.as_ref());
        status.and_then(|s| s.phase) == Some(Phase::Copying)
            && progress.is_some_and(|p| p.bytes_copied > 0 && p.checksum.is_none())
    })
    .await;
    let progress = midway.status.and_then(|s| s.progress).expect("progress");
    // The total is the disk file's size from its tar header, not the compressed layer's.
    assert_eq!(progress.total_bytes, Some(disk.len() as u64));
    assert!(progress.bytes_copied < disk.len() as u64, "{progress:?}");
    rig.assert_copied("slow", &disk).await;
}

#[tokio::test]
async fn an_oci_copy_never_writes_through_a_planted_link_and_never_reaches_an_internal_registry() {
    let registry = Registry::start().await;
    let bytes = random_bytes(1 << 20);
    registry.push_artifact("models/guarded", "v1", &[("a.bin", &bytes)]);

    // Links a Pod of the namespace could plant: at a cache's name, at a cache's partial file.
    let rig = Rig::new("oci-links", 1).await;
    pull_secrets(&rig, &registry, &registry.host).await;
    let outside = tempfile::tempdir().expect("outside the store");
    let victim = outside.path().join("node-file");
    std::fs::write(&victim, b"a file outside the store").expect("victim");
    let folder = rig.make_folders();
    let planted = [
        ("at-name", folder.join("at-name")),
        ("at-partial", folder.join(".partial/at-partial-1")),
    ];
    for (name, link) in &planted {
        std::os::unix::fs::symlink(&victim, link).expect("plant a link");
        rig.create(
            name,
            json!({"source": oci(&registry.host, "models/guarded:v1", None)}),
        )
        .await;
    }
    for (name, link) in &planted {
        let message = rig.failed_for_good(name).await;
        // The mover names the link as it sees the store, through its mount in the copy Pod;
        // the part within the store is the test's.
        let in_store = link.strip_prefix(&folder).expect("planted in the store");
        for part in [&*format!("/{}", in_store.display()), "symbolic link"] {
            assert!(message.contains(part), "{name} names {part}: {message}");
        }
    }
    assert_eq!(
        std::fs::read(&victim).expect("victim"),
        b"a file outside the store"
    );
    drop(rig);

    // The operator's default: no internal destination, so the tests' registry (on loopback, or
    // on the node's private address) is refused for good, like an HTTP source there.
    let rig = Rig::with_config("oci-internal", |cfg| {
        cfg.jobs.allow_internal_addresses = vec![];
    })
    .await;
    pull_secrets(&rig, &registry, &registry.host).await;
    rig.create(
        "internal",
        json!({"source": oci(&registry.host, "models/guarded:v1", None)}),
    )
    .await;
    let kind = classify(support::source_ip())
        .expect("the tests' sources are on an internal address")
        .to_string();
    let parts = [&*registry.host, &*kind, "--allow-internal-address"];
    rig.refused_for_good("internal", &parts).await;
}
