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

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Writes `text` to `relative` under `target/` (a report a make target turns into a doc).
pub fn write_report(relative: &str, text: &str) {
    let path = repo_root().join("target").join(relative);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("report folder");
    }
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
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

/// Starts the control plane and installs the CRDs, once per test binary.
pub fn ensure_cluster() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let mut up = Command::new(repo_root().join("hack/cluster.sh"));
        up.arg("up");
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
    });
}

/// Where the tests' sources are: every test server (HTTP, S3, throttling proxies) listens on
/// loopback, which the data mover refuses unless the operator names it. The one place the tests
/// allow it: the operator's config ([`operator::config`]), the operator process's arguments and
/// the tests that run the mover themselves all take it from here.
pub const LOOPBACK_SOURCES: &str = "127.0.0.0/8,::1";

/// [`LOOPBACK_SOURCES`] as the operator's setting.
pub fn loopback_sources() -> Vec<templatecache::copy::address::AllowedInternal> {
    LOOPBACK_SOURCES
        .split(',')
        .map(|entry| entry.parse().expect("a valid allowlist entry"))
        .collect()
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

/// A namespace of the test's own, deleted when the test drops it.
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

    /// Creates TemplateCache `name` with `spec` (JSON, as a user would write it).
    pub async fn create_cache(
        &self,
        name: &str,
        spec: serde_json::Value,
    ) -> templatecache::api::TemplateCache {
        let cache = serde_json::from_value(serde_json::json!({
            "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCache",
            "metadata": {"name": name}, "spec": spec
        }))
        .expect("cache literal");
        self.api()
            .create(&PostParams::default(), &cache)
            .await
            .expect("create cache")
    }

    /// Deletes the namespace and its objects. The test's operator is stopped by now, so the
    /// caches' finalizers (references and cleanup) are dropped here: otherwise every finished
    /// test would leave a namespace stuck Terminating that the namespace controller retries
    /// forever, loading the shared API server for the tests after it.
    pub async fn delete(self) {
        let caches: Api<templatecache::api::TemplateCache> =
            Api::namespaced(self.client.clone(), &self.name);
        let drop_finalizers =
            kube::api::Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}}));
        if let Ok(list) = caches.list(&Default::default()).await {
            for cache in list {
                let name = cache.metadata.name.unwrap_or_default();
                let _ = caches
                    .patch(&name, &Default::default(), &drop_finalizers)
                    .await;
            }
        }
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::background())
            .await;
    }
}

pub mod api_writes;
pub mod cache_watch;
pub mod consumer;
pub mod corpus;
pub mod cutting_proxy;
pub mod executor;
pub mod http_server;
pub mod jobs;
pub mod operator;
pub mod ranged_server;
pub mod registry;
pub mod rig;
pub mod s3_server;
pub mod throttle;
pub mod tools;
