//! The Helm chart, with `helm` built from its Go module (hack/helm): it lints, renders and refuses
//! bad values by name; `helm install` into the local control plane creates every object; and the
//! operator, run with exactly the Deployment's arguments and a token of the chart's
//! ServiceAccount, takes a cache through its whole life while the copy Job runs with a token of
//! the chart's mover account. `kubectl auth can-i` shows what both accounts must not do.

mod support;

#[path = "../dev/local_executor/identity.rs"]
mod identity;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::config::Kubeconfig;
use serde_json::json;
use support::TestNamespace;
use support::executor::Executor;
use support::http_server::HttpServer;
use support::jobs::wait_for_cache;
use support::operator::OperatorProcess;
use support::rig::{random_bytes, sha256};
use templatecache::api::{ClaimPhase, Phase, TemplateCache, TemplateCacheClaim};

const CHART: &str = "charts/templatecache-operator";
const MOVER: &str = "templatecache-mover";

/// The helm binary, built once per version into .cache/helm.
fn helm() -> Command {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        let out = Command::new(support::repo_root().join("hack/helm/build.sh"))
            .output()
            .expect("run hack/helm/build.sh");
        assert!(
            out.status.success(),
            "building helm failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    });
    let mut command = Command::new(path);
    command
        .current_dir(support::repo_root())
        .env("KUBECONFIG", support::kubeconfig_path())
        .env(
            "HELM_CACHE_HOME",
            support::repo_root().join("target/helm/cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            support::repo_root().join("target/helm/config"),
        )
        .env(
            "HELM_DATA_HOME",
            support::repo_root().join("target/helm/data"),
        );
    command
}

/// Runs `command`; its stdout, or its stderr as the error.
fn run(mut command: Command) -> Result<String, String> {
    let out = command.output().expect("run a command");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn template(values: &[&str]) -> Result<String, String> {
    let mut command = helm();
    command.args(["template", "t", CHART, "--namespace", "ops"]);
    command.args(values);
    run(command)
}

#[test]
fn the_chart_lints_renders_restricted_pods_and_refuses_bad_values_by_name() {
    let mut lint = helm();
    lint.args(["lint", "--strict", CHART]);
    run(lint).expect("helm lint passes");

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
    let objects: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("rendered YAML"))
        .filter(|o: &serde_json::Value| !o.is_null())
        .collect();
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
    // The mover's account and binding in the release namespace and each listed one.
    let movers: Vec<&str> = objects
        .iter()
        .filter(|o| o["kind"] == "ServiceAccount" && o["metadata"]["name"] == MOVER)
        .filter_map(|o| o["metadata"]["namespace"].as_str())
        .collect();
    assert_eq!(movers, ["ops", "team-a", "team-b"]);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_lives_its_whole_life_under_the_charts_rbac() {
    let ns = TestNamespace::new("helm").await;
    let release = format!("tc-{}", std::process::id());
    let operator_account = format!("{release}-templatecache");
    let store_dir = tempfile::tempdir().expect("store folder");
    let store_name = format!("{}-store", ns.name);

    let mut install = helm();
    install
        .args(["install", &release, CHART, "--namespace", &ns.name])
        .args(["--set", &format!("watchNamespace={}", ns.name)])
        .args(["--set", "image.tag=test", "--set", "replicaCount=1"])
        .args(["--set", "leaderElection.leaseDurationSeconds=5"])
        .args(["--set", "operator.retryBaseSeconds=1"])
        // The tests' control plane already has the API priority settings, applied by kubectl.
        .args(["--set", "flowControl.enabled=false"])
        // The local executor stands in for the Job controller, as the control plane's admin.
        .args(["--set-json", r#"copyJobs.podCreators=["admin"]"#])
        .args(["--set", "defaultStore.create=true"])
        .args(["--set", &format!("defaultStore.name={store_name}")])
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
                store_dir.path().display()
            ),
        ]);
    run(install).expect("helm install");

    let kubectl_get = |what: &[&str]| {
        let mut command = support::kubectl();
        command.args(["get", "-n", &ns.name]).args(what);
        run(command)
    };
    for object in [
        format!("serviceaccount/{operator_account}"),
        format!("serviceaccount/{MOVER}"),
        format!("deployment/{operator_account}"),
        format!("service/{operator_account}-metrics"),
        format!("role/{operator_account}-leader-election"),
        format!("rolebinding/{operator_account}-leader-election"),
        format!("rolebinding/{operator_account}-mover"),
        format!("clusterrole/{operator_account}"),
        format!("clusterrole/{operator_account}-mover"),
        format!("clusterrolebinding/{operator_account}"),
        format!("stagingstore/{store_name}"),
        // On by default: the copy below runs under them (its mover's token is bound to a Pod
        // of the copy Job by the executor, as a kubelet's is).
        format!("validatingadmissionpolicy/{operator_account}-credentials"),
        format!("validatingadmissionpolicy/{operator_account}-mover-status"),
        format!("validatingadmissionpolicybinding/{operator_account}-credentials"),
        format!("validatingadmissionpolicybinding/{operator_account}-mover-status"),
        format!("validatingadmissionpolicy/{operator_account}-mover-workloads"),
        format!("validatingadmissionpolicybinding/{operator_account}-mover-workloads"),
    ] {
        kubectl_get(&[&object]).unwrap_or_else(|e| panic!("helm install created {object}: {e}"));
    }

    // What the accounts may and must not do.
    let ns_arg = format!("--namespace={}", ns.name);
    let operator_may = |args: &[&str]| can_i(&ns.name, &operator_account, args);
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
    let mover_may = |args: &[&str]| can_i(&ns.name, MOVER, args);
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

    // The operator as the Deployment runs it, with a token of the chart's account.
    let deployment: Deployment = Api::namespaced(ns.client.clone(), &ns.name)
        .get(&operator_account)
        .await
        .expect("the Deployment");
    let args = deployment.spec.template.spec.expect("pod spec").containers[0]
        .args
        .clone()
        .expect("args");
    let own = Kubeconfig::read_from(support::kubeconfig_path()).expect("kubeconfig");
    let token =
        identity::AccountKubeconfig::issue(&ns.client, own, &ns.name, &operator_account, &release)
            .await
            .expect("a token of the operator's account");
    // The Deployment sets the Lease namespace from the pod's own; here it is set the same way.
    let mut args = args;
    args.push(format!("--leader-election-namespace={}", ns.name));
    let mut operator = OperatorProcess::spawn("helm-replica-0", &args, token.path());
    let _executor = Executor::start_as_job_accounts(&ns.name);

    let server = HttpServer::start().await;
    let bytes = random_bytes(3 << 20);
    server.put("disk.img", &bytes);
    // A consumer's claim with a template: the operator creates the cache from it, under the
    // chart's RBAC, and tells the claim when the copy is Ready.
    let claim: TemplateCacheClaim = serde_json::from_value(json!({
        "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCacheClaim",
        "metadata": {"name": "vm-1"},
        "spec": {"cacheName": "image", "template":
            {"source": {"http": {"url": server.url("disk.img")}}, "checksum": sha256(&bytes)}}
    }))
    .expect("claim literal");
    let claims: Api<TemplateCacheClaim> = ns.api();
    claims
        .create(&Default::default(), &claim)
        .await
        .expect("create the claim");
    let ready = wait_for_cache(&ns.client, &ns.name, "image", "Ready", |c| {
        c.status.as_ref().and_then(|s| s.phase) == Some(Phase::Ready)
    })
    .await;
    assert_eq!(ready.status.and_then(|s| s.size), Some(bytes.len() as u64));
    let data = store_dir.path().join(&ns.name).join("image");
    assert_eq!(
        std::fs::read(&data).expect("the copy"),
        bytes,
        "the copy is byte for byte"
    );
    assert!(
        operator
            .metrics()
            .await
            .contains("templatecache_copies_succeeded_total 1")
    );

    let mut claim_ready = false;
    for _ in 0..200 {
        let claim = claims.get("vm-1").await.expect("read the claim");
        claim_ready = claim.status.and_then(|s| s.phase) == Some(ClaimPhase::Ready);
        if claim_ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(claim_ready, "the claim says Ready");

    // Releasing the claim, then deleting the cache, removes its data through a remove Job, also
    // under the chart's RBAC.
    claims
        .delete("vm-1", &Default::default())
        .await
        .expect("release the claim");
    let caches: Api<TemplateCache> = ns.api();
    caches
        .delete("image", &Default::default())
        .await
        .expect("delete the cache");
    let gone = tokio::time::timeout(Duration::from_secs(120), async {
        while caches
            .get_opt("image")
            .await
            .expect("read the cache")
            .is_some()
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the cache is gone once its data is removed");
    assert!(!data.exists(), "its data is removed from the store");

    operator.kill().await;
    let mut uninstall = helm();
    uninstall.args(["uninstall", &release, "--namespace", &ns.name, "--wait"]);
    run(uninstall).expect("helm uninstall");
    assert!(
        kubectl_get(&[&format!("clusterrole/{operator_account}")]).is_err(),
        "uninstall removes the cluster-scoped objects"
    );
    ns.delete().await;
}
