//! The Helm chart, with `helm` built from its Go module (hack/helm): it lints, renders and refuses
//! bad values by name; `helm install` into the local control plane creates every object; and the
//! operator, run with exactly the Deployment's arguments and a token of the chart's
//! ServiceAccount, takes a cache through its whole life while the copy Job runs with a token of
//! the chart's mover account. `kubectl auth can-i` shows what both accounts must not do.

use templatecache_test_support as support;

use templatecache_local_executor::identity;

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::config::Kubeconfig;
use serde_json::json;
use support::TestNamespace;
use support::eventually;
use support::http_server::HttpServer;
use support::jobs::{wait_for_cache, wait_for_cache_gone};
use support::operator::OperatorProcess;
use support::rig::Rig;
use support::rig::{random_bytes, sha256};
use support::tools::{helm, helm_offline, run};
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

/// One install of the chart into a test namespace: the names the chart gives its objects. A
/// drop guard: a release still installed when it drops (a test that failed half-way) is
/// uninstalled, for its cluster-scoped objects (admission policies among them) outlive the
/// namespace and would act on the tests after it.
struct Release {
    name: String,
    namespace: String,
    /// The operator's ServiceAccount, also the Deployment's and the ClusterRole's name.
    operator_account: String,
    store_name: String,
    store_dir: tempfile::TempDir,
    installed: bool,
}

impl Drop for Release {
    fn drop(&mut self) {
        if self.installed {
            let _ = run(self.uninstall_command());
        }
    }
}

impl Release {
    fn new(ns: &TestNamespace) -> Self {
        let name = format!("tc-{}", std::process::id());
        Self {
            operator_account: format!("{name}-templatecache"),
            name,
            namespace: ns.name.clone(),
            store_name: format!("{}-store", ns.name),
            store_dir: tempfile::tempdir().expect("store folder"),
            installed: false,
        }
    }

    /// `helm install` watching the namespace only, with a hostPath default store and loopback
    /// sources allowed.
    fn install(&mut self) {
        self.installed = true;
        let mut install = helm();
        install
            .args(["install", &self.name, CHART, "--namespace", &self.namespace])
            .args(["--set", &format!("watchNamespace={}", self.namespace)])
            .args(["--set", "image.tag=test", "--set", "replicaCount=1"])
            .args(["--set", "leaderElection.leaseDurationSeconds=5"])
            .args(["--set", "operator.retryBaseSeconds=1"])
            // The tests' control plane already has the API priority settings, applied by kubectl.
            .args(["--set", "flowControl.enabled=false"])
            // The local executor stands in for the Job controller, as the control plane's admin.
            .args(["--set-json", r#"copyJobs.podCreators=["admin"]"#])
            .args(["--set", "defaultStore.create=true"])
            .args(["--set", &format!("defaultStore.name={}", self.store_name)])
            .args(["--set", "defaultStore.capacity=1Gi"])
            // The test's HTTP server is on loopback, which copy Jobs may not reach by default.
            .args([
                "--set-json",
                &format!(
                    "operator.allowInternalAddresses={}",
                    json!(support::LOOPBACK_SOURCES.split(',').collect::<Vec<_>>())
                ),
            ])
            .args([
                "--set-json",
                &format!(
                    r#"defaultStore.volume={{"hostPath":{{"path":"{}"}}}}"#,
                    self.store_dir.path().display()
                ),
            ]);
        run(install).expect("helm install");
    }

    fn uninstall_command(&self) -> std::process::Command {
        let mut uninstall = helm();
        uninstall
            .args(["uninstall", &self.name, "--namespace", &self.namespace])
            .arg("--wait");
        uninstall
    }

    /// Where the store keeps cache `name` of the namespace.
    fn data(&self, name: &str) -> PathBuf {
        self.store_dir.path().join(&self.namespace).join(name)
    }

    fn get(&self, object: &str) -> Result<String, String> {
        let mut command = support::kubectl();
        command.args(["get", "-n", &self.namespace, object]);
        run(command)
    }

    fn assert_every_object_created(&self) {
        let account = &self.operator_account;
        for object in [
            format!("serviceaccount/{account}"),
            format!("serviceaccount/{MOVER}"),
            format!("deployment/{account}"),
            format!("service/{account}-metrics"),
            format!("role/{account}-leader-election"),
            format!("rolebinding/{account}-leader-election"),
            format!("rolebinding/{account}-mover"),
            format!("clusterrole/{account}"),
            format!("clusterrole/{account}-mover"),
            format!("clusterrolebinding/{account}"),
            format!("stagingstore/{}", self.store_name),
            // On by default: the copy below runs under them (its mover's token is bound to a
            // Pod of the copy Job by the executor, as a kubelet's is).
            format!("validatingadmissionpolicy/{account}-credentials"),
            format!("validatingadmissionpolicy/{account}-mover-status"),
            format!("validatingadmissionpolicybinding/{account}-credentials"),
            format!("validatingadmissionpolicybinding/{account}-mover-status"),
            format!("validatingadmissionpolicy/{account}-mover-workloads"),
            format!("validatingadmissionpolicybinding/{account}-mover-workloads"),
        ] {
            self.get(&object)
                .unwrap_or_else(|e| panic!("helm install created {object}: {e}"));
        }
    }

    /// What the operator's account may and must not do.
    fn assert_operator_rights(&self) {
        let ns_arg = format!("--namespace={}", self.namespace);
        let operator_may = |args: &[&str]| can_i(&self.namespace, &self.operator_account, args);
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
            &ns_arg
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
    }

    /// What the mover's account may and must not do.
    fn assert_mover_rights(&self) {
        let ns_arg = format!("--namespace={}", self.namespace);
        let mover_may = |args: &[&str]| can_i(&self.namespace, MOVER, args);
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

    /// The operator as the Deployment runs it, with a token of the chart's account; the
    /// kubeconfig holding that token is deleted when dropped, so it must outlive the process.
    async fn start_operator(
        &self,
        ns: &TestNamespace,
    ) -> (OperatorProcess, identity::AccountKubeconfig) {
        let deployment: Deployment = ns
            .api()
            .get(&self.operator_account)
            .await
            .expect("the Deployment");
        let mut args = deployment.spec.template.spec.expect("pod spec").containers[0]
            .args
            .clone()
            .expect("args");
        let own = Kubeconfig::read_from(support::kubeconfig_path()).expect("kubeconfig");
        let token = identity::AccountKubeconfig::issue(
            &ns.client,
            own,
            &ns.name,
            &self.operator_account,
            &self.name,
        )
        .await
        .expect("a token of the operator's account");
        // The Deployment sets the Lease namespace from the pod's own; here it is set the same way.
        args.push(format!("--leader-election-namespace={}", ns.name));
        let operator = OperatorProcess::spawn("helm-replica-0", &args, token.path());
        (operator, token)
    }

    /// `helm uninstall`, which removes the cluster-scoped objects too.
    fn uninstall(&mut self) {
        run(self.uninstall_command()).expect("helm uninstall");
        self.installed = false;
        assert!(
            self.get(&format!("clusterrole/{}", self.operator_account))
                .is_err(),
            "uninstall removes the cluster-scoped objects"
        );
    }
}

/// A consumer's claim with a template: the operator creates the cache from it, under the
/// chart's RBAC, copies `bytes` into the store and tells the claim when the copy is Ready.
async fn claim_until_ready(
    ns: &TestNamespace,
    release: &Release,
    operator: &OperatorProcess,
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
        std::fs::read(release.data("image")).expect("the copy"),
        bytes,
        "the copy is byte for byte"
    );
    assert!(
        operator
            .metrics()
            .await
            .contains("templatecache_copies_succeeded_total 1")
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
async fn release_and_delete(ns: &TestNamespace, release: &Release) {
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
        !release.data("image").exists(),
        "its data is removed from the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_lives_its_whole_life_under_the_charts_rbac() {
    // The executor runs each Job with its ServiceAccount's token, requested per Job, so it may
    // start before the release creates the accounts.
    let rig = Rig::builder("helm")
        .executor_as_job_accounts()
        .start()
        .await;
    let mut release = Release::new(&rig.ns);
    release.install();
    release.assert_every_object_created();
    release.assert_operator_rights();
    release.assert_mover_rights();

    let (mut operator, _token) = release.start_operator(&rig.ns).await;
    let server = HttpServer::start().await;
    let bytes = random_bytes(3 << 20);
    server.put("disk.img", &bytes);
    claim_until_ready(&rig.ns, &release, &operator, &bytes, server.url("disk.img")).await;
    release_and_delete(&rig.ns, &release).await;

    operator.kill().await;
    release.uninstall();
}
