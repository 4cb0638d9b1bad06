//! The README's "Try it", command by command, on the real node: `make up` (the chart installed
//! with helm, its image from the node's registry), `kubectl apply -f examples/local/`,
//! `kubectl wait --for=condition=Ready tc/demo`, the Pods' gates removed and counted, the
//! consumers running on the node and printing the cache's checksum in `kubectl logs`, the
//! consumers, cache and store deleted (the data with them), `make down`. `make up` installs a
//! cluster-wide operator, so this test is a binary of its own, run by `make test-node` with the
//! node's other test (ignored by plain `cargo test --workspace`); it leaves the control plane it
//! found running.

use templatecache_test_support as support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::eventually;

/// The store's hostPath, as examples/local/store.yaml names it.
const STORE: &str = "/tmp/templatecache-quickstart";

fn make(target: &str) -> Command {
    let mut command = Command::new("make");
    command.arg(target).current_dir(support::repo_root());
    command
}

fn must(mut command: Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl(args: &[&str]) -> String {
    let mut command = support::kubectl();
    command.args(args).current_dir(support::repo_root());
    must(command)
}

/// What `make up` started, stopped by `make down` even when the test fails half-way.
struct Quickstart;

impl Drop for Quickstart {
    fn drop(&mut self) {
        let _ = make("down").output();
    }
}

fn cluster_status() -> String {
    let mut status = Command::new(support::repo_root().join("hack/cluster.sh"));
    status.arg("status");
    must(status)
}

fn quickstart_pids() -> Vec<u32> {
    ["http"]
        .iter()
        .filter_map(|name| {
            let path = support::repo_root().join(format!(".cluster/quickstart/{name}.pid"));
            std::fs::read_to_string(path).ok()?.trim().parse().ok()
        })
        .collect()
}

#[tokio::test]
#[ignore = "needs the real node: make test-node"]
async fn the_readmes_try_it_commands_make_a_cache_ready_and_its_pods_read_it_on_the_node() {
    support::node::up();
    let shared = cluster_status();
    assert!(shared.contains("kube-apiserver running"), "{shared}");

    let guard = Quickstart;
    // `make up` as the README has it, but without its `cargo build`: the images are made from
    // the release binary `make check-dockerfile` built, as `make test-node`'s are.
    let mut up = make("up");
    up.arg("CARGO=true");
    must(up);
    let pids = quickstart_pids();
    assert_eq!(pids.len(), 1, "the HTTP server runs");
    let operator = kubectl(&[
        "-n",
        "templatecache-system",
        "get",
        "deploy/templatecache",
        "-o",
        "jsonpath={.status.availableReplicas}",
    ]);
    assert_eq!(operator, "2", "the chart's two replicas are available");

    kubectl(&["apply", "-f", "examples/local/"]);
    let started = Instant::now();
    kubectl(&[
        "wait",
        "--for=condition=Ready",
        "tc/demo",
        "tcc/vm-1",
        "tcc/vm-2",
        "--timeout=120s",
    ]);
    println!("tc/demo and its claims Ready after {:?}", started.elapsed());
    let path = kubectl(&["get", "tcc/vm-1", "-o", "jsonpath={.status.cache.path}"]);
    assert_eq!(path, "default/demo", "a Ready claim says where the data is");

    // All four consumers counted, and the Pods let through.
    let counted = "refCount 4 and the Pods ungated";
    eventually(counted, Duration::from_secs(60), || async {
        let refs = kubectl(&["get", "tc/demo", "-o", "jsonpath={.status.refCount}"]);
        let gates = kubectl(&[
            "get",
            "pod/consumer-1",
            "pod/consumer-2",
            "-o",
            "jsonpath={.items[*].spec.schedulingGates}",
        ]);
        if refs == "4" && gates.trim().is_empty() {
            Ok(())
        } else {
            Err(format!("refCount {refs:?}, gates left {gates:?}"))
        }
    })
    .await;
    println!("{}", kubectl(&["get", "tc,tcc,sst"]));

    // The consumers run on the node and read the staged file: `kubectl logs` shows its digest.
    kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/consumer-1",
        "pod/consumer-2",
        "--timeout=120s",
    ]);
    let checksum = kubectl(&["get", "tc/demo", "-o", "jsonpath={.status.checksum}"]);
    let hex = checksum.trim_start_matches("sha256:");
    assert_eq!(hex.len(), 64, "the cache's checksum: {checksum:?}");
    for pod in ["consumer-1", "consumer-2"] {
        let log = kubectl(&["logs", pod]);
        assert_eq!(
            log.split_whitespace().next(),
            Some(hex),
            "{pod} printed the SHA-256 of the file it read: {log}"
        );
    }

    // The consumers and the cache first: the cache's remove Job needs its store to delete the
    // data.
    let data = std::path::Path::new(STORE).join("default/demo");
    assert!(data.exists(), "{} holds the copy", data.display());
    kubectl(&[
        "delete",
        "-f",
        "examples/local/pods.yaml",
        "-f",
        "examples/local/claims.yaml",
        "-f",
        "examples/local/cache.yaml",
        "--timeout=120s",
    ]);
    assert!(!data.exists(), "the remove Job deleted {}", data.display());
    kubectl(&["delete", "-f", "examples/local/store.yaml", "--timeout=60s"]);
    drop(guard);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "make down stopped pid {pid}"
        );
    }
    assert!(
        cluster_status().contains("kube-apiserver running"),
        "make down leaves a control plane it did not start"
    );
    let mut list = support::tools::helm();
    list.args(["list", "--all-namespaces", "--short"]);
    let releases = must(list);
    assert!(
        !releases.lines().any(|r| r == "templatecache"),
        "make down uninstalled the chart: {releases}"
    );
}
