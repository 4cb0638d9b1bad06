//! Shared setup for the integration tests: a real control plane and a namespace per test.
//!
//! The first test of each test binary starts the local control plane with `hack/cluster.sh up`
//! (a no-op when `make cluster-up` already started it) and applies the CRDs from `crds/`. Each
//! test then gets a fresh client (kube clients are bound to the tokio runtime they were made on,
//! and every `#[tokio::test]` has its own) and a namespace of its own, so tests run in parallel.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Writes `text` to `relative` under `target/` (a report a make target turns into a doc).
pub fn write_report(relative: &str, text: &str) {
    let path = repo_root().join("target").join(relative);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("report folder");
    }
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The operator's binary.
pub fn operator_binary() -> PathBuf {
    built_binary("templatecache")
}

/// A workspace binary beside the running test, bench or example: they run from
/// `target/<profile>/deps` or `target/<profile>/examples`, the binaries sit in
/// `target/<profile>`. `cargo test --workspace` (what `make test` runs) builds them first.
fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running program's path");
    let folder = exe.parent().expect("the program's folder");
    let binary = folder.parent().expect("the target folder").join(name);
    assert!(
        binary.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        binary.display()
    );
    binary
}

pub fn kubeconfig_path() -> PathBuf {
    repo_root().join(".cluster/kubeconfig")
}

pub fn kubectl() -> Command {
    let mut cmd = Command::new(repo_root().join(".cluster/kubectl"));
    cmd.arg("--kubeconfig").arg(kubeconfig_path());
    cmd
}

fn run_checked(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cluster this test binary started, once: every later [`client`] call finds it up.
static CLUSTER: OnceLock<()> = OnceLock::new();

/// Starts the control plane and installs the CRDs, once per test binary: in node mode when the
/// binary's Jobs run on the node ([`jobs_on_node`]).
pub fn ensure_cluster() {
    CLUSTER.get_or_init(|| start_cluster(jobs_run_on_the_node()));
}

/// Whether this run's Jobs run on the real node (`TEMPLATECACHE_JOBS=node`, which `make
/// test-node` sets for the suites it runs there). Without it no Job runs: the plain control
/// plane has no Job controller and no kubelet.
fn jobs_run_on_the_node() -> bool {
    std::env::var("TEMPLATECACHE_JOBS").is_ok_and(|v| v == "node")
}

/// The node and its images when this run's Jobs run on the node: a [`rig::Rig`] then gives its
/// operator the image and the mover's ServiceAccount, and every test server listens on the
/// node's address ([`source_ip`]).
pub fn jobs_on_node() -> Option<&'static (node::Node, node::Images)> {
    static NODE: OnceLock<Option<(node::Node, node::Images)>> = OnceLock::new();
    NODE.get_or_init(|| jobs_run_on_the_node().then(node::up))
        .as_ref()
}

/// The address the tests' servers listen on: loopback, or the node's address when Jobs run on
/// the node (the one address of this machine its Pods reach).
pub fn source_ip() -> std::net::IpAddr {
    jobs_on_node().map_or(std::net::Ipv4Addr::LOCALHOST.into(), |(node, _)| node.ip)
}

/// The same in node mode (a kubelet, the real Job controller): `hack/cluster.sh up` switches
/// the control plane to the mode it is asked for, so a node test must ask for node mode before
/// its first [`client`], or `client` would switch the node off.
pub(crate) fn ensure_node_cluster() {
    CLUSTER.get_or_init(|| start_cluster(true));
}

fn start_cluster(node: bool) {
    {
        let mut up = Command::new(repo_root().join("hack/cluster.sh"));
        up.arg("up")
            .env("TEMPLATECACHE_NODE", if node { "1" } else { "0" });
        run_checked(up, "hack/cluster.sh up");
        // The CRDs and the API priority and fairness settings a user installs with the chart.
        for manifests in [
            "crds",
            "charts/templatecache-operator/files/flowcontrol.yaml",
        ] {
            let mut apply = kubectl();
            apply
                .args(["apply", "--server-side", "--force-conflicts", "-f"])
                .arg(repo_root().join(manifests));
            run_checked(apply, &format!("kubectl apply {manifests}"));
        }
        let mut wait = kubectl();
        wait.args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/templatecaches.templatecache.io",
            "crd/templatecacheclaims.templatecache.io",
            "crd/stagingstores.templatecache.io",
        ]);
        run_checked(wait, "kubectl wait crds");
    }
}

/// Where the tests' sources are: every test server (HTTP, S3, throttling proxies) listens on
/// loopback, which the data mover refuses unless the operator names it. The one place the tests
/// allow it: the operator's config ([`operator::config`]), the operator process's arguments and
/// the tests that run the mover themselves all take it from here.
pub const LOOPBACK_SOURCES: &str = "127.0.0.0/8,::1";

/// [`LOOPBACK_SOURCES`] as the operator's setting, and the node's address when Jobs run on the
/// node ([`source_ip`]).
pub fn loopback_sources() -> Vec<templatecache_mover::address::AllowedInternal> {
    let node = jobs_on_node().map(|(node, _)| node.ip.to_string());
    LOOPBACK_SOURCES
        .split(',')
        .map(str::to_owned)
        .chain(node)
        .map(|entry| entry.parse().expect("a valid allowlist entry"))
        .collect()
}

/// Polls `probe` until it gives a value, and returns it; fails the test naming `what` (and what
/// the probe last saw, if it says) when none came `within`. It looks about 300 times in that
/// span (every 50 ms to 1 s). For states no watch reports (a Lease's holder, a Pod's gates, an
/// endpoint that answers); a TemplateCache's state is watched by [`jobs::wait_for_cache`].
pub async fn eventually<T, F, Fut, P>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = P>,
    P: Probe<T>,
{
    let interval = (within / 300).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let seen = match probe().await.seen() {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}{}",
            seen.map(|s| format!("; last seen: {s}"))
                .unwrap_or_default()
        );
        tokio::time::sleep(interval).await;
    }
}

/// What one look of [`eventually`] found: `Some`/`Ok` the awaited value; `None`, or `Err` with
/// what was seen instead (for the failure message).
pub trait Probe<T> {
    fn seen(self) -> Result<T, Option<String>>;
}

impl<T> Probe<T> for Option<T> {
    fn seen(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T> Probe<T> for Result<T, String> {
    fn seen(self) -> Result<T, Option<String>> {
        self.map_err(Some)
    }
}

/// A template of `url` over HTTP, without checksum.
pub fn http_spec(url: &str) -> templatecache_api::TemplateCacheSpec {
    serde_json::from_value(serde_json::json!({"source": {"http": {"url": url}}}))
        .expect("spec literal")
}

/// A client for the local control plane, made on the calling test's runtime.
pub async fn client() -> Client {
    ensure_cluster();
    let kubeconfig = Kubeconfig::read_from(kubeconfig_path()).expect("read .cluster/kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is valid");
    // Tests with hundreds of concurrent clients must not trip the default 295s read timeout
    // nor pile up on one connection.
    config.read_timeout = Some(std::time::Duration::from_secs(60));
    Client::try_from(config).expect("client from kubeconfig")
}

/// A kind of object that lives in a namespace (a built-in kind or one of the CRDs), as the
/// helpers that create and list them need it.
pub trait Namespaced:
    kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::Serialize
    + serde::de::DeserializeOwned
{
}

impl<K> Namespaced for K where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned
{
}

/// A namespace of the test's own; a [`rig::Rig`] makes it and deletes it.
#[derive(Clone)]
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

impl TestNamespace {
    pub async fn new(prefix: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let client = client().await;
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"templatecache.io/test": "true"}}
        }))
        .expect("namespace literal");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create test namespace");
        Self { name, client }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Every `K` in the namespace.
    pub async fn list<K: Namespaced>(&self) -> kube::api::ObjectList<K> {
        self.api()
            .list(&Default::default())
            .await
            .unwrap_or_else(|e| panic!("list {}: {e}", K::plural(&Default::default())))
    }

    /// Creates `object` (JSON, as a user would write it) in the namespace.
    pub async fn create<K: Namespaced>(&self, object: serde_json::Value) -> K {
        let what = format!(
            "{}/{}",
            K::kind(&Default::default()),
            object["metadata"]["name"]
        );
        let object: K = serde_json::from_value(object)
            .unwrap_or_else(|e| panic!("{what} is not a valid literal: {e}"));
        self.api()
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("create {what}: {e}"))
    }

    /// A consumer's request for cache `name` of the namespace, with or without a template.
    pub fn request(
        &self,
        name: &str,
        spec: Option<templatecache_api::TemplateCacheSpec>,
    ) -> templatecache_client::CacheRequest {
        templatecache_client::CacheRequest {
            namespace: self.name.clone(),
            name: name.to_owned(),
            spec,
        }
    }

    /// Creates TemplateCache `name` with `spec` (JSON, as a user would write it).
    pub async fn create_cache(
        &self,
        name: &str,
        spec: serde_json::Value,
    ) -> templatecache_api::TemplateCache {
        self.create(serde_json::json!({
            "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCache",
            "metadata": {"name": name}, "spec": spec
        }))
        .await
    }
}

pub mod api_writes;
pub mod cache_watch;
pub mod chart;
pub mod consumer;
pub mod corpus;
pub mod http_server;
pub mod job_status;
pub mod jobs;
pub mod node;
pub mod operator;
pub mod ranged_server;
pub mod registry;
pub mod rig;
pub mod s3_server;
pub mod tenant;
pub mod throttle;
pub mod tools;
