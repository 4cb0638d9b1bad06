//! The local Job executor (crates/local-executor), run as a process for one test namespace.

use std::process::Stdio;

use tokio::process::{Child, Command};

/// A running executor; killed when dropped.
pub struct Executor {
    _child: Child,
}

impl Executor {
    pub fn start(namespace: &str) -> Self {
        Self::spawn(namespace, &[])
    }

    /// An executor that runs each Job's process with a token of the Job's ServiceAccount, as a
    /// kubelet would, so the process has only the rights RBAC grants that account.
    pub fn start_as_job_accounts(namespace: &str) -> Self {
        Self::spawn(namespace, &["--as-job-service-account"])
    }

    fn spawn(namespace: &str, extra: &[&str]) -> Self {
        super::ensure_cluster();
        let child = Command::new(super::executor_binary())
            .arg("--templatecache")
            .arg(super::operator_binary())
            .arg("--namespace")
            .arg(namespace)
            .args(extra)
            .env("KUBECONFIG", super::kubeconfig_path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the local Job executor");
        Self { _child: child }
    }
}
