//! The operator, run in-process against the test's namespace, with a hostPath StagingStore of
//! its own.

use std::time::Duration;

use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use templatecache::controller::jobs::JobSettings;
use templatecache::controller::retry::RetryPolicy;
use templatecache::controller::{self, Config};
use templatecache_api::StagingStore;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running operator; [`Operator::stop`] shuts it down gracefully, and dropping it stops it too.
pub struct Operator {
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Operator settings for a test: its namespace, its store, fast retries. When Jobs run on the
/// node, they run the pushed image as the chart's mover account ([`super::node::mover_account`]).
pub fn config(namespace: &str, store: &str) -> Config {
    let on_node = super::jobs_on_node();
    Config {
        namespace: Some(namespace.to_owned()),
        default_store: store.to_owned(),
        jobs: JobSettings {
            image: on_node.map_or_else(
                || "templatecache:test".to_owned(),
                |(_, images)| images.operator.pinned(),
            ),
            service_account: on_node.map(|_| super::node::MOVER_ACCOUNT.to_owned()),
            copy: Default::default(),
            // The tests' registry serves plain HTTP on the source address.
            oci_plain_http_registries: vec![super::source_ip().to_string()],
            allow_internal_addresses: super::loopback_sources(),
            limits: Default::default(),
        },
        retry: RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
        },
        instance: Some(format!("test-{namespace}")),
        ..Config::default()
    }
}

impl Operator {
    /// Starts an operator with its own client. Its logs go to the test's output, at the level
    /// `RUST_LOG` asks for (warnings by default).
    pub async fn start(config: Config) -> Self {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        let client = super::client().await;
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(controller::run(client, config, async {
            let _ = rx.await;
        }));
        Self {
            shutdown: Some(tx),
            task,
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

impl Drop for Operator {
    /// Stops the operator without awaiting. On a multi-thread runtime its task runs on while this
    /// thread waits, so it gets the time [`Operator::stop`] gives it to shut down; on a
    /// current-thread runtime nothing runs while this thread is here, so after the abort the task
    /// never runs again.
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !self.task.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.task.abort();
    }
}

/// A hostPath StagingStore over a fresh temporary folder; a [`super::rig::Rig`] makes it and
/// deletes it.
pub struct TestStore {
    pub name: String,
    pub dir: tempfile::TempDir,
}

impl TestStore {
    pub async fn new(client: &Client, name: &str, capacity: &str) -> Self {
        Self::with_eviction(client, name, capacity, json!({})).await
    }

    /// A store with its own `spec.eviction` policy.
    pub async fn with_eviction(
        client: &Client,
        name: &str,
        capacity: &str,
        eviction: serde_json::Value,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temporary store folder");
        if super::jobs_on_node().is_some() {
            super::node::hand_to_the_mover(dir.path());
        }
        let store: StagingStore = serde_json::from_value(json!({
            "apiVersion": "templatecache.io/v1alpha1", "kind": "StagingStore",
            "metadata": {"name": name},
            "spec": {"volume": {"hostPath": {"path": dir.path()}}, "capacity": capacity,
                     "eviction": eviction}
        }))
        .expect("store literal");
        Api::<StagingStore>::all(client.clone())
            .create(&PostParams::default(), &store)
            .await
            .expect("create StagingStore");
        Self {
            name: name.to_owned(),
            dir,
        }
    }
}

/// The `templatecache run` binary as a separate process, as a Deployment's replica runs it:
/// leader election on a Lease in the test namespace, metrics on a loopback port of its own.
pub struct OperatorProcess {
    pub identity: String,
    pub metrics_port: u16,
    child: tokio::process::Child,
}

impl OperatorProcess {
    /// Starts replica `identity` reconciling `namespace` with `store` as its default store.
    /// Its Jobs are set up as the in-process operator's ([`config`]).
    pub fn start(identity: &str, namespace: &str, store: &str, extra: &[&str]) -> Self {
        let jobs = config(namespace, store).jobs;
        let allowed: Vec<String> = jobs
            .allow_internal_addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        let fixed = [
            "run",
            "--namespace",
            namespace,
            "--default-store",
            store,
            "--instance",
            identity,
            "--leader-election-namespace",
            namespace,
            "--job-image",
            &jobs.image,
            "--retry-base-seconds",
            "1",
            "--allow-internal-address",
            &allowed.join(","),
        ];
        let account = jobs
            .service_account
            .iter()
            .flat_map(|account| ["--job-service-account", account.as_str()]);
        let args: Vec<String> = fixed
            .into_iter()
            .chain(account)
            .chain(extra.iter().copied())
            .map(str::to_owned)
            .collect();
        Self::spawn(identity, &args, &super::kubeconfig_path())
    }

    /// Starts `templatecache` with exactly `args` (a Deployment's, say) and the credentials of
    /// `kubeconfig`; only the metrics address is moved to a free loopback port.
    pub fn spawn(identity: &str, args: &[String], kubeconfig: &std::path::Path) -> Self {
        super::ensure_cluster();
        let metrics_port = super::tools::free_port();
        let args = args
            .iter()
            .filter(|a| !a.starts_with("--metrics-address"))
            .cloned()
            .chain([format!("--metrics-address=127.0.0.1:{metrics_port}")]);
        let child = tokio::process::Command::new(super::operator_binary())
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", identity)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("start templatecache run");
        Self {
            identity: identity.to_owned(),
            metrics_port,
            child,
        }
    }

    /// The process's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let pid = self.child.id().expect("the operator is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc status");
        kib * 1024
    }

    /// SIGKILL: no chance to release the Lease or finish anything.
    pub async fn kill(&mut self) {
        // It may have exited on its own already (an operator that cannot reach the API server
        // at start exits, as it would in a Pod).
        let _ = self.child.kill().await;
    }

    /// Waits up to `limit` for the process to exit on its own.
    pub async fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .map(|status| status.expect("wait for the operator"))
    }

    /// The text of `/metrics`, once the endpoint answers.
    pub async fn metrics(&self) -> String {
        self.get("/metrics").await
    }

    pub async fn get(&self, path: &str) -> String {
        let url = format!("http://127.0.0.1:{}{path}", self.metrics_port);
        super::eventually(
            &format!("{url} answers"),
            Duration::from_secs(20),
            || async {
                let output = tokio::process::Command::new("curl")
                    .args(["-sf", &url])
                    .output()
                    .await
                    .ok()?;
                output
                    .status
                    .success()
                    .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
            },
        )
        .await
    }
}
