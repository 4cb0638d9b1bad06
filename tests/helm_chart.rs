//! The Helm chart, with `helm` built from its Go module (hack/helm): it lints, renders and refuses
//! bad values by name; and on the real node (`make test-node`), `helm install` creates every
//! object, `kubectl auth can-i` shows what the operator's and the mover's accounts must not do,
//! and a cache lives its whole life under the chart's RBAC: the operator in its Deployment's
//! Pods, the copy and remove Jobs' Pods with the mover's account.

use templatecache_test_support as support;

use std::time::Duration;

use kube::Api;
use serde_json::json;
use support::TestNamespace;
use support::chart::{Release, STORE_CLAIM};
use support::eventually;
use support::http_server::HttpServer;
use support::jobs::{wait_for_cache, wait_for_cache_gone};
use support::node::{self, ProvisionedVolume};
use support::rig::{random_bytes, sha256};
use support::tools::{helm_offline, run};
use templatecache_api::{ClaimPhase, Phase, TemplateCache, TemplateCacheClaim};

const CHART: &str = "charts/templatecache-operator";
const MOVER: &str = "templatecache-mover";

fn template(values: &[&str]) -> Result<String, String> {
    let mut command = helm_offline();
    command.args(["template", "t", CHART, "--namespace", "ops"]);
    command.args(values);
    run(command)
}

#[test]
fn the_chart_lints_renders_restricted_pods_and_refuses_bad_values_by_name() {
    let mut lint = helm_offline();
    lint.args(["lint", "--strict", CHART]);
    run(lint).expect("helm lint passes");
    let objects = render_with_every_option_on();
    assert_every_kind_rendered(&objects);
    assert_restricted_operator_pod(&objects);
    assert_bad_values_refused_by_name();
}

/// The chart's objects with a default store, two copy namespaces, a ServiceMonitor and internal
/// destinations.
fn render_with_every_option_on() -> Vec<serde_json::Value> {
    let rendered = template(&[
        "--set",
        "defaultStore.create=true",
        "--set-json",
        r#"defaultStore.volume={"persistentVolumeClaim":{"claimName":"templates"}}"#,
        "--set",
        "copyJobs.namespaces={team-a,team-b}",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set-json",
        r#"operator.allowInternalAddresses=["10.96.0.10:9000","fd00::/8"]"#,
        "--api-versions",
        "populator.storage.k8s.io/v1beta1/VolumePopulator",
    ])
    .expect("helm template renders");
    serde_yaml::Deserializer::from_str(&rendered)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("rendered YAML"))
        .filter(|o: &serde_json::Value| !o.is_null())
        .collect()
}

/// Every kind of object, and the mover's account in the release namespace and each listed one.
fn assert_every_kind_rendered(objects: &[serde_json::Value]) {
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PodDisruptionBudget",
        "StagingStore",
        "FlowSchema",
        "PriorityLevelConfiguration",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "VolumePopulator",
    ] {
        assert!(
            kinds.contains(&kind),
            "the chart renders a {kind}: {kinds:?}"
        );
    }
    let movers: Vec<&str> = objects
        .iter()
        .filter(|o| o["kind"] == "ServiceAccount" && o["metadata"]["name"] == MOVER)
        .filter_map(|o| o["metadata"]["namespace"].as_str())
        .collect();
    assert_eq!(movers, ["ops", "team-a", "team-b"]);
}

/// The operator's pod runs restricted, with probes, and gets the internal destinations.
fn assert_restricted_operator_pod(objects: &[serde_json::Value]) {
    let deployment = objects
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("a Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(deployment["spec"]["replicas"], 2, "two replicas by default");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    let args = container["args"].as_array().expect("args");
    assert!(
        args.contains(&json!("--allow-internal-address=10.96.0.10:9000,fd00::/8")),
        "the operator gets the internal destinations copy Jobs may reach: {args:?}"
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
}

/// Each bad value is refused by the chart's schema, which names the field.
fn assert_bad_values_refused_by_name() {
    for (values, field) in [
        (vec!["--set", "replicaCount=0"], "/replicaCount"),
        (vec!["--set", "logFormat=xml"], "/logFormat"),
        (vec!["--set", "replicas=2"], "replicas"),
        (
            vec!["--set", "defaultStore.create=true"],
            "/defaultStore/volume",
        ),
        (
            vec!["--set", "leaderElection.leaseDurationSeconds=1"],
            "/leaderElection/leaseDurationSeconds",
        ),
        (
            vec!["--set", "copyJobs.namespaces={Team_A}"],
            "/copyJobs/namespaces/0",
        ),
        (vec!["--set", "metrics.port=80"], "/metrics/port"),
        // A finished copy Job must outlive the wait before the next attempt.
        (
            vec!["--set", "copyJobs.ttlSecondsAfterFinished=60"],
            "/copyJobs/ttlSecondsAfterFinished",
        ),
        (
            vec!["--set", "copyJobs.minBytesPerSecond=0"],
            "/copyJobs/minBytesPerSecond",
        ),
        // A cluster older than the chart supports is refused before anything is installed.
        (
            vec!["--kube-version", "v1.30.0"],
            "requires kubeVersion: >=1.31.0-0",
        ),
        (
            vec![
                "--set",
                "operator.allowInternalAddresses={minio.storage.svc:9000}",
            ],
            "/operator/allowInternalAddresses/0",
        ),
    ] {
        let refused = template(&values).expect_err(&format!("{values:?} is refused"));
        support::corpus::record(&format!("helm value {}", values[1]), &refused);
        assert!(
            refused.contains(field),
            "helm names {field} when refusing {values:?}: {refused}"
        );
    }
}

/// `kubectl auth can-i` as `account` in `namespace`: true for "yes", false for "no"; any other
/// answer (an error, a typo in a resource name) fails the test, so a "no" is never an error.
fn can_i(namespace: &str, account: &str, args: &[&str]) -> bool {
    let mut command = support::kubectl();
    command
        .args(["auth", "can-i"])
        .args(args)
        .arg(format!("--as=system:serviceaccount:{namespace}:{account}"));
    let out = command.output().expect("kubectl auth can-i");
    let stderr = String::from_utf8_lossy(&out.stderr);
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => true,
        "no" if !stderr.contains("the server doesn't have a resource type") => false,
        answer => panic!("kubectl auth can-i {args:?}: {answer:?} {stderr}"),
    }
}

/// The chart's objects, each where it belongs: the operator's in the release namespace, the
/// mover's account and binding in the caches' namespace too, the rest cluster-scoped. The
/// release's name contains the chart's, so the chart names its objects after the release.
fn assert_every_object_created(release: &Release, caches_ns: &str) {
    let (ns, account) = (release.namespace.as_str(), release.name.as_str());
    let objects = [
        (ns, format!("serviceaccount/{account}")),
        (ns, format!("serviceaccount/{MOVER}")),
        (caches_ns, format!("serviceaccount/{MOVER}")),
        (ns, format!("deployment/{account}")),
        (ns, format!("service/{account}-metrics")),
        (ns, format!("poddisruptionbudget/{account}")),
        (ns, format!("role/{account}-leader-election")),
        (ns, format!("rolebinding/{account}-leader-election")),
        (ns, format!("rolebinding/{account}-mover")),
        (ns, format!("role/{account}-populator")),
        (ns, format!("rolebinding/{account}-populator")),
        (caches_ns, format!("rolebinding/{account}-mover")),
        (ns, format!("clusterrole/{account}")),
        (ns, format!("clusterrole/{account}-mover")),
        (ns, format!("clusterrolebinding/{account}")),
        (ns, format!("stagingstore/{account}")),
        // On by default: the copy below runs under them, with the kubelet's bound token.
        (
            ns,
            format!("validatingadmissionpolicy/{account}-credentials"),
        ),
        (
            ns,
            format!("validatingadmissionpolicy/{account}-mover-status"),
        ),
        (
            ns,
            format!("validatingadmissionpolicy/{account}-mover-workloads"),
        ),
        (
            ns,
            format!("validatingadmissionpolicybinding/{account}-credentials"),
        ),
        (
            ns,
            format!("validatingadmissionpolicybinding/{account}-mover-status"),
        ),
        (
            ns,
            format!("validatingadmissionpolicybinding/{account}-mover-workloads"),
        ),
    ];
    for (namespace, object) in objects {
        let mut get = support::kubectl();
        get.args(["get", "-n", namespace, &object]);
        run(get).unwrap_or_else(|e| panic!("helm install created {object} in {namespace}: {e}"));
    }
}

/// The names the rights are checked with: the release's namespace, the caches' namespace and
/// the operator's account.
struct Accounts<'a> {
    namespace: &'a str,
    caches: &'a str,
    operator_account: &'a str,
}

impl Accounts<'_> {
    /// What the operator's account may and must not do.
    fn assert_operator_rights(&self) {
        let ns_arg = format!("--namespace={}", self.caches);
        let own_ns = format!("--namespace={}", self.namespace);
        let operator_may = |args: &[&str]| can_i(self.namespace, self.operator_account, args);
        assert!(operator_may(&["create", "jobs.batch", &ns_arg]));
        assert!(operator_may(&[
            "patch",
            "templatecaches.templatecache.io",
            "--subresource=status",
            &ns_arg
        ]));
        assert!(operator_may(&[
            "update",
            "leases.coordination.k8s.io",
            &own_ns
        ]));
        assert!(
            !operator_may(&["list", "secrets", "--all-namespaces"]),
            "operator reads no Secret"
        );
        assert!(
            !operator_may(&["get", "secrets", &ns_arg]),
            "operator reads no Secret"
        );
        assert!(
            !operator_may(&["delete", "pods", &ns_arg]),
            "operator deletes no Pod"
        );
        assert!(
            operator_may(&["get", "namespaces"]) && !operator_may(&["list", "namespaces"]),
            "operator gets the namespaces' labels for StagingStore namespaceSelectors, one by one"
        );
        assert!(
            !operator_may(&["patch", "namespaces"]),
            "operator changes no namespace"
        );
        assert!(!operator_may(&[
            "delete",
            "templatecaches.templatecache.io",
            &ns_arg
        ]));
        assert!(!operator_may(&[
            "update",
            "leases.coordination.k8s.io",
            "--namespace=kube-system"
        ]));
        assert!(!operator_may(&[
            "create",
            "customresourcedefinitions.apiextensions.k8s.io"
        ]));
        assert!(operator_may(&[
            "watch",
            "templatecacheclaims.templatecache.io",
            "--all-namespaces"
        ]));
        assert!(operator_may(&[
            "patch",
            "templatecacheclaims.templatecache.io",
            "--subresource=status",
            &ns_arg
        ]));
        assert!(
            !operator_may(&["create", "templatecacheclaims.templatecache.io", &ns_arg]),
            "claims are the consumers' to make"
        );
        // The populator: prime claims in its own namespace only; volumes handed over, never
        // deleted.
        assert!(operator_may(&["create", "persistentvolumeclaims", &own_ns]));
        assert!(
            !operator_may(&["create", "persistentvolumeclaims", &ns_arg]),
            "the populator makes no claim in a user's namespace"
        );
        assert!(
            !operator_may(&["delete", "persistentvolumeclaims", &ns_arg]),
            "nor deletes one there"
        );
        assert!(operator_may(&["patch", "persistentvolumes"]));
        assert!(!operator_may(&["delete", "persistentvolumes"]));
    }

    /// What the mover's account may and must not do.
    fn assert_mover_rights(&self) {
        let ns_arg = format!("--namespace={}", self.caches);
        let mover_may = |args: &[&str]| can_i(self.caches, MOVER, args);
        assert!(mover_may(&[
            "patch",
            "templatecaches.templatecache.io",
            "--subresource=status",
            &ns_arg
        ]));
        assert!(
            !mover_may(&["patch", "templatecaches.templatecache.io", &ns_arg]),
            "mover adds no reference"
        );
        assert!(!mover_may(&[
            "get",
            "templatecaches.templatecache.io",
            "--namespace=default"
        ]));
        assert!(
            !mover_may(&["get", "secrets", &ns_arg]),
            "mover reads no Secret"
        );
        assert!(!mover_may(&["create", "jobs.batch", &ns_arg]));
    }
}

/// A consumer's claim with a template: the operator creates the cache from it, under the
/// chart's RBAC, the copy Job's Pod writes `bytes` into the store's volume, and the claim is
/// told when the copy is Ready; the leader's metrics count the copy.
async fn claim_until_ready(
    ns: &TestNamespace,
    release: &Release,
    volume: &ProvisionedVolume,
    bytes: &[u8],
    url: String,
) {
    ns.create::<TemplateCacheClaim>(json!({
        "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCacheClaim",
        "metadata": {"name": "vm-1"},
        "spec": {"cacheName": "image", "template":
            {"source": {"http": {"url": url}}, "checksum": sha256(bytes)}}
    }))
    .await;
    let ready = wait_for_cache(&ns.client, &ns.name, "image", "Ready", |c| {
        c.status.as_ref().and_then(|s| s.phase) == Some(Phase::Ready)
    })
    .await;
    assert_eq!(ready.status.and_then(|s| s.size), Some(bytes.len() as u64));
    assert_eq!(
        std::fs::read(volume.data(&ns.name, "image")).expect("the copy"),
        bytes,
        "the copy is byte for byte"
    );
    let metrics = release.leader_metrics().await;
    assert!(
        metrics.contains("templatecache_copies_succeeded_total 1"),
        "the leader counted the copy: {metrics}"
    );
    let claims: Api<TemplateCacheClaim> = ns.api();
    eventually("the claim says Ready", Duration::from_secs(20), || async {
        let claim = claims.get("vm-1").await.expect("read the claim");
        (claim.status.and_then(|s| s.phase) == Some(ClaimPhase::Ready)).then_some(())
    })
    .await;
}

/// Releasing the claim, then deleting the cache, removes its data through a remove Job, also
/// under the chart's RBAC.
async fn release_and_delete(ns: &TestNamespace, volume: &ProvisionedVolume) {
    ns.api::<TemplateCacheClaim>()
        .delete("vm-1", &Default::default())
        .await
        .expect("release the claim");
    ns.api::<TemplateCache>()
        .delete("image", &Default::default())
        .await
        .expect("delete the cache");
    // The cache is gone once its data is removed.
    wait_for_cache_gone(&ns.client, &ns.name, "image").await;
    assert!(
        !volume.data(&ns.name, "image").exists(),
        "its data is removed from the store"
    );
}

/// `helm install` as the README says, on the node: the operator's two replicas in Pods of the
/// pushed image with the chart's account, the copy and remove Jobs' Pods with the mover's
/// account and the kubelet's bound tokens, `restricted` enforced on both namespaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real node: make test-node"]
async fn a_cache_lives_its_whole_life_under_the_charts_rbac() {
    let (node, images) = node::up();
    let operator_ns = TestNamespace::new("helm-ops").await;
    let caches_ns = TestNamespace::new("helm-caches").await;
    for ns in [&operator_ns, &caches_ns] {
        node::enforce_restricted(&ns.name);
    }
    let volume = ProvisionedVolume::new(&caches_ns, STORE_CLAIM);
    let server = HttpServer::start_on(node.ip).await;
    let mut release = Release::new(&operator_ns, &caches_ns);
    release.install(&images, &node, server.addr, &[]);
    release.assert_available_from_the_registry(&images).await;
    assert_every_object_created(&release, &caches_ns.name);
    let accounts = Accounts {
        namespace: &release.namespace,
        caches: &caches_ns.name,
        operator_account: &release.name,
    };
    accounts.assert_operator_rights();
    accounts.assert_mover_rights();

    let bytes = random_bytes(3 << 20);
    server.put("disk.img", &bytes);
    claim_until_ready(
        &caches_ns,
        &release,
        &volume,
        &bytes,
        server.url("disk.img"),
    )
    .await;
    release_and_delete(&caches_ns, &volume).await;

    release.uninstall();
    let mut cluster_role = support::kubectl();
    cluster_role.args(["get", &format!("clusterrole/{}", release.name)]);
    assert!(
        run(cluster_role).is_err(),
        "uninstall removes the cluster-scoped objects"
    );
}
