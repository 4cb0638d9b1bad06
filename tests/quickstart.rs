//! The README's "Try it", command by command: `make up`, `kubectl apply -f examples/local/`,
//! `kubectl wait --for=condition=Ready tc/demo`, the Pods' gates removed and counted, the
//! consumers, cache and store deleted (the data with them), `make down`. `make up` runs a
//! cluster-wide operator, so this test is a binary of its own (cargo runs test binaries one
//! after another), and it leaves the control plane it found running.

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
    ["operator", "executor", "http"]
        .iter()
        .filter_map(|name| {
            let path = support::repo_root().join(format!(".cluster/quickstart/{name}.pid"));
            std::fs::read_to_string(path).ok()?.trim().parse().ok()
        })
        .collect()
}

#[tokio::test]
async fn the_readmes_try_it_commands_make_a_cache_ready_and_ungate_its_pods() {
    support::ensure_cluster();
    let shared = cluster_status();
    assert!(shared.contains("kube-apiserver running"), "{shared}");

    let guard = Quickstart;
    // `make up` as the README has it, but without its `cargo build`: the binaries it starts are
    // the ones `cargo test` built for this test, and a nested build without the
    // dev-dependencies' features would relink them (about half a minute, twice per run).
    let mut up = make("up");
    up.arg("CARGO=true");
    must(up);
    let pids = quickstart_pids();
    assert_eq!(pids.len(), 3, "operator, executor and HTTP server run");

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
}
