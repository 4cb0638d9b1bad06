//! Go tools built from the modules pinned under `hack/` (helm, promtool), once per version into
//! `.cache/`, and the commands that run them from the repository root.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use super::repo_root;

/// The binary `hack/<tool>/build.sh` builds (a no-op once built), built at most once per test
/// binary.
pub fn built(tool: &str) -> PathBuf {
    static PATHS: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    paths
        .entry(tool.to_owned())
        .or_insert_with(|| {
            let script = repo_root().join(format!("hack/{tool}/build.sh"));
            let out = Command::new(&script)
                .output()
                .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
            assert!(
                out.status.success(),
                "building {tool} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
        .clone()
}

/// helm, with its caches and configuration under `target/helm`, never the user's.
pub fn helm() -> Command {
    let mut command = Command::new(built("helm"));
    let home = repo_root().join("target/helm");
    command
        .current_dir(repo_root())
        .env("KUBECONFIG", super::kubeconfig_path())
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    command
}

/// The oldest Kubernetes the chart supports (its `kubeVersion`).
pub const OLDEST_KUBERNETES: &str = "v1.31.0";

/// helm for what renders without a cluster (`template`, `lint`), as for the oldest Kubernetes
/// the chart supports: a helm built from its Go module assumes v1.20 otherwise, which the
/// chart refuses.
pub fn helm_offline() -> Command {
    let mut command = helm();
    command.args(["--kube-version", OLDEST_KUBERNETES]);
    command
}

/// promtool, Prometheus's rule checker and rule unit-test runner.
pub fn promtool() -> Command {
    let mut command = Command::new(built("promtool"));
    command.current_dir(repo_root());
    command
}

/// Runs `command`: its stdout, or its stdout and stderr as the error.
pub fn run(mut command: Command) -> Result<String, String> {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// A free port on loopback, for a server that cannot be handed a listener.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Starts a source server process on a free port of [`super::source_ip`] (`command` makes its
/// command line for that address), quiet and killed when dropped, and waits until it accepts
/// connections there.
pub async fn serve_source(
    what: &str,
    command: impl FnOnce(std::net::SocketAddr) -> tokio::process::Command,
) -> (tokio::process::Child, std::net::SocketAddr) {
    let ip = super::source_ip();
    let addr = std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("free port");
    let child = command(addr)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let listening = format!("{what} listening on {addr}");
    super::eventually(&listening, std::time::Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(addr).await.ok().map(drop)
    })
    .await;
    (child, addr)
}
