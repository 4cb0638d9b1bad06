//! The chart installed on the real node as the README's "Install with Helm" says: the image
//! from the node's registry, two replicas under leader election, a default store on a claim,
//! copy Jobs allowed in the caches' namespace. The node's tests share it (`tests/node.rs`, the
//! chaos test on the node).

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;

use super::node::{Images, Node};
use super::tools::{helm, run};
use super::{TestNamespace, eventually};

const CHART: &str = "charts/templatecache-operator";
/// The store's claim in the caches' namespace (the chart's `defaultStore.volume`); make it with
/// [`super::node::ProvisionedVolume`].
pub const STORE_CLAIM: &str = "templates";
/// The chart's `metrics.port`.
const METRICS_PORT: u16 = 8080;

/// The chart installed into `operator_ns` as the README installs it, with copy Jobs allowed in
/// the caches' namespace. A drop guard: on a failure half-way it frees the caches (their
/// finalizers would hold the namespace forever without the operator), uninstalls the release
/// (its admission policies and ClusterRoles are cluster-scoped) and deletes both namespaces.
pub struct Release {
    pub name: String,
    pub namespace: String,
    caches_namespace: String,
    installed: bool,
}

impl Release {
    pub fn new(operator_ns: &TestNamespace, caches_ns: &TestNamespace) -> Self {
        Self {
            // Contains "templatecache": the chart names its objects after the release.
            name: format!("templatecache-{}", std::process::id()),
            namespace: operator_ns.name.clone(),
            caches_namespace: caches_ns.name.clone(),
            installed: false,
        }
    }

    /// `helm install --wait`, with `settings` (`key=value`, as `--set` takes them) after the
    /// test's own, so a test can tune the operator.
    pub fn install(&mut self, images: &Images, node: &Node, server: SocketAddr, settings: &[&str]) {
        self.installed = true;
        let operator = &images.operator;
        let mut install = helm();
        install
            .args(["install", &self.name, CHART, "--namespace", &self.namespace])
            .args([
                "--set",
                &format!("image.repository={}", operator.repository),
            ])
            // The chart has no digest value: `tag@digest` pins the image all the same.
            .args([
                "--set",
                &format!("image.tag={}@{}", operator.tag, operator.digest),
            ])
            .args([
                "--set",
                "replicaCount=2",
                "--set",
                "leaderElection.enabled=true",
            ])
            .args(["--set", "defaultStore.create=true"])
            .args(["--set", &format!("defaultStore.name={}", self.name)])
            .args(["--set", "defaultStore.capacity=1Gi"])
            .args([
                "--set-json",
                &format!(
                    r#"defaultStore.volume={{"persistentVolumeClaim":{{"claimName":"{STORE_CLAIM}"}}}}"#
                ),
            ])
            .args([
                "--set",
                &format!("copyJobs.namespaces={{{}}}", self.caches_namespace),
            ])
            // The test's HTTP server is on the node's address, private, so copy Jobs may not
            // read it unless the operator names it: exactly that address and port.
            .args([
                "--set-json",
                &format!(
                    r#"operator.allowInternalAddresses=["{}:{}"]"#,
                    node.ip,
                    server.port()
                ),
            ])
            // The cluster already has the API priority settings, applied with kubectl by the
            // test support as for every test binary: helm would refuse to adopt them.
            .args(["--set", "flowControl.enabled=false"])
            .args(["--wait", "--timeout", "5m"]);
        for setting in settings {
            install.args(["--set", setting]);
        }
        run(install).expect("helm install");
    }

    /// Both replicas run the image pulled from the node's registry (the kubelet's image ID is
    /// the pushed digest) and one holds the Lease.
    pub async fn assert_available_from_the_registry(&self, images: &Images) {
        let client = super::client().await;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &self.namespace);
        eventually(
            "both replicas are available",
            Duration::from_secs(180),
            || async {
                let deployment = deployments.get(&self.name).await.ok()?;
                (deployment.status?.available_replicas == Some(2)).then_some(())
            },
        )
        .await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &self.namespace);
        let pods = pods.list(&ListParams::default()).await.expect("list Pods");
        let phases: Vec<String> = pods
            .items
            .iter()
            .map(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                format!(
                    "{} {phase:?}",
                    p.metadata.name.as_deref().unwrap_or_default()
                )
            })
            .collect();
        assert_eq!(pods.items.len(), 2, "the operator's Pods: {phases:?}");
        for pod in &pods.items {
            let image_ids: Vec<String> = container_image_ids(pod);
            assert!(
                image_ids
                    .iter()
                    .all(|id| id.starts_with(&images.operator.repository)
                        && id.ends_with(&images.operator.digest)),
                "the operator runs {} from the registry: {image_ids:?}",
                images.operator.digest
            );
        }
        eventually("a replica leads", Duration::from_secs(60), || {
            self.lease_holder()
        })
        .await;
    }

    /// The Pod that holds the release's Lease now, if one does.
    pub async fn lease_holder(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(super::client().await, &self.namespace);
        let lease = leases.get_opt(&self.name).await.ok()??;
        lease.spec?.holder_identity
    }

    /// The leader's `/metrics`, read from its Pod's address (this machine is the node).
    pub async fn leader_metrics(&self) -> String {
        let leader = eventually("a leader", Duration::from_secs(60), || self.lease_holder()).await;
        let pods: Api<Pod> = Api::namespaced(super::client().await, &self.namespace);
        let pod = pods.get(&leader).await.expect("the leader's Pod");
        let ip = pod
            .status
            .and_then(|s| s.pod_ip)
            .expect("the leader's address");
        let url = format!("http://{ip}:{METRICS_PORT}/metrics");
        let mut curl = std::process::Command::new("curl");
        curl.args(["-sf", &url]);
        run(curl).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    pub fn uninstall(&mut self) {
        let mut uninstall = helm();
        uninstall
            .args(["uninstall", &self.name, "--namespace", &self.namespace])
            .arg("--wait");
        run(uninstall).expect("helm uninstall");
        self.installed = false;
    }
}

impl Drop for Release {
    /// The operator goes first (`--wait`: its Pods are gone), so nothing adds a finalizer back
    /// once they are taken off the caches and claims the test left; then the namespaces go.
    fn drop(&mut self) {
        if self.installed {
            let mut uninstall = helm();
            uninstall
                .args(["uninstall", &self.name, "--namespace", &self.namespace])
                .args(["--wait", "--timeout", "2m"]);
            let _ = run(uninstall);
            let mut left = super::kubectl();
            left.args(["get", "tc,tcc", "-o", "name", "-n", &self.caches_namespace]);
            for object in run(left).unwrap_or_default().lines() {
                let mut free = super::kubectl();
                free.args(["patch", object, "-n", &self.caches_namespace])
                    .args(["--type=merge", "-p", r#"{"metadata":{"finalizers":null}}"#]);
                let _ = run(free);
            }
        }
        let mut delete = super::kubectl();
        delete
            .args(["delete", "namespace", "--wait=false", "--ignore-not-found"])
            .args([&self.namespace, &self.caches_namespace]);
        let _ = run(delete);
    }
}

/// The image IDs the kubelet reports for a Pod's containers (`registry/name@sha256:...`).
pub fn container_image_ids(pod: &Pod) -> Vec<String> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|c| c.image_id.clone())
        .collect()
}
