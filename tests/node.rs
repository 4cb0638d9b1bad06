//! The product as it is deployed, on the real node (`make test-node`): the chart installed with
//! helm as the README says, its image pulled from the node's registry, two replicas under
//! leader election, the `restricted` Pod Security Standard enforced on the operator's and the
//! caches' namespace. Every Pod is run by the kubelet: the copy Job's mover writes into a
//! PersistentVolumeClaim, a Deployment of gated consumers starts once the cache is Ready and
//! reads the file through `subPath`, a forged status write with a real bound token is refused by
//! the chart's admission policy, and deleting the cache removes its data through a remove Job.
//!
//! Ignored by `cargo test --workspace`: it needs the node up and the images built, which
//! `make test-node` does (and `make test` after the rest of the suite).

use templatecache_test_support as support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams};
use serde_json::json;
use support::TestNamespace;
use support::chart::{Release, STORE_CLAIM, container_image_ids};
use support::eventually;
use support::http_server::HttpServer;
use support::jobs::{wait_for_cache, wait_for_cache_gone};
use support::node::{self, Images, ProvisionedVolume, restricted_container};
use support::rig::{random_bytes, sha256};
use templatecache_api::{Phase, TemplateCache};

const MOVER: &str = "templatecache-mover";
/// Gated consumer Pods of the one cache: the 100, which the 2-core node starts in
/// about 40 s.
const CONSUMERS: i32 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real node: make test-node"]
async fn the_chart_on_a_real_node_copies_starts_100_consumers_refuses_forgery_and_removes_data() {
    let mut clock = Phases::default();
    let (node, images) = node::up();
    let operator_ns = TestNamespace::new("node-ops").await;
    let caches_ns = TestNamespace::new("node-caches").await;
    let mut release = Release::new(&operator_ns, &caches_ns);
    for ns in [&operator_ns, &caches_ns] {
        node::enforce_restricted(&ns.name);
    }
    let volume = ProvisionedVolume::new(&caches_ns, STORE_CLAIM);
    let server = HttpServer::start_on(node.ip).await;
    clock.done("namespaces (restricted), PV + PVC, HTTP server on the node's address");

    release.install(&images, &node, server.addr, &[]);
    release.assert_available_from_the_registry(&images).await;
    clock.done("helm install: 2 replicas Available, image from the registry, a leader");

    let consumers = Consumers::create(&caches_ns, &images, "disk").await;
    consumers.assert_all_gated().await;
    clock.done("100 consumers created, all gated (no cache yet)");

    let bytes = random_bytes(8 << 20);
    server.put("disk.img", &bytes);
    let checksum = sha256(&bytes);
    caches_ns
        .create_cache(
            "disk",
            json!({"source": {"http": {"url": server.url("disk.img")}}, "checksum": checksum}),
        )
        .await;
    let ready = wait_for_cache(&caches_ns.client, &caches_ns.name, "disk", "Ready", |c| {
        phase(c) == Some(Phase::Ready)
    })
    .await;
    assert_eq!(
        ready.status.as_ref().and_then(|s| s.checksum.as_deref()),
        Some(checksum.as_str())
    );
    assert_eq!(
        std::fs::read(volume.data(&caches_ns.name, "disk")).expect("the staged file"),
        bytes,
        "the mover wrote the file byte for byte into the claim's volume"
    );
    assert_ran_from_the_image(&caches_ns, "disk-copy-1", &images).await;
    clock.done("copy Job Pod (restricted, PVC) ran: cache Ready, checksum right");

    consumers.assert_all_read(&checksum).await;
    clock.done("100 consumers started and printed the cache's SHA-256");

    forged_status_writes_are_refused(&caches_ns, &server, &images).await;
    clock.done("forged status writes with real bound tokens refused");

    consumers.delete().await;
    for cache in ["disk", "slow"] {
        caches_ns
            .api::<TemplateCache>()
            .delete(cache, &DeleteParams::default())
            .await
            .expect("delete the cache");
    }
    for cache in ["disk", "slow"] {
        wait_for_cache_gone(&caches_ns.client, &caches_ns.name, cache).await;
        assert!(
            !volume.data(&caches_ns.name, cache).exists(),
            "{cache}'s data is removed from the volume"
        );
        assert_remove_pod_ran(&caches_ns, cache).await;
    }
    clock.done("caches deleted: remove Job Pods took the data");

    release.uninstall();
    drop(volume);
    clock.done("helm uninstall");
    eprintln!("{clock}");
}

fn phase(cache: &TemplateCache) -> Option<Phase> {
    cache.status.as_ref().and_then(|s| s.phase)
}

/// The Job's Pod ran to completion on the node from the operator's image.
async fn assert_ran_from_the_image(ns: &TestNamespace, job: &str, images: &Images) {
    let pods = ns
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await
        .expect("list the Job's Pods");
    let pod = pods
        .items
        .first()
        .unwrap_or_else(|| panic!("{job} has a Pod"));
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    assert_eq!(phase.as_deref(), Some("Succeeded"));
    let ids = container_image_ids(pod);
    assert!(
        ids.iter().all(|id| id.ends_with(&images.operator.digest)),
        "{job} ran the operator's image: {ids:?}"
    );
}

/// A Deployment of gated Pods that reference cache `cache` by label, as the README's "Use a
/// cache" says, and print the SHA-256 of the file they read through `subPath`. They run as a
/// user other than the mover's, as a consumer would.
struct Consumers {
    ns: TestNamespace,
    name: String,
}

impl Consumers {
    async fn create(ns: &TestNamespace, images: &Images, cache: &str) -> Self {
        let name = format!("{cache}-consumers");
        ns.create::<Deployment>(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": CONSUMERS,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name, "templatecache.io/cache": cache}},
                    "spec": {
                        "schedulingGates": [{"name": "templatecache.io/ready"}],
                        "automountServiceAccountToken": false,
                        "terminationGracePeriodSeconds": 0,
                        "securityContext": {
                            "runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}
                        },
                        "containers": [{
                            "name": "sha",
                            "image": images.consumer.pinned(),
                            "command": ["sh", "-c", "sha256sum /template/disk && exec sleep 3600"],
                            "resources": {"requests": {"cpu": "1m", "memory": "8Mi"}},
                            "securityContext": restricted_container(),
                            "volumeMounts": [{
                                "name": "store", "mountPath": "/template/disk",
                                "subPath": format!("{}/{cache}", ns.name), "readOnly": true
                            }]
                        }],
                        "volumes": [{"name": "store",
                            "persistentVolumeClaim": {"claimName": STORE_CLAIM, "readOnly": true}}]
                    }
                }
            }
        }))
        .await;
        Self {
            ns: ns.clone(),
            name,
        }
    }

    async fn pods(&self) -> Vec<Pod> {
        self.ns
            .api::<Pod>()
            .list(&ListParams::default().labels(&format!("app={}", self.name)))
            .await
            .expect("list consumers")
            .items
    }

    /// Every replica exists and keeps its gate: the cache does not exist yet.
    async fn assert_all_gated(&self) {
        let pods = eventually(
            "every consumer Pod exists",
            Duration::from_secs(120),
            || async {
                let pods = self.pods().await;
                (pods.len() == CONSUMERS as usize).then_some(pods)
            },
        )
        .await;
        for pod in pods {
            let gates = pod
                .spec
                .and_then(|s| s.scheduling_gates)
                .unwrap_or_default();
            assert!(
                gates.iter().any(|g| g.name == "templatecache.io/ready"),
                "a consumer is held until its cache is Ready"
            );
        }
    }

    /// Every replica became available once the cache was Ready, and each printed the cache's
    /// checksum, read from the staged file.
    async fn assert_all_read(&self, checksum: &str) {
        let deployments: Api<Deployment> = self.ns.api();
        eventually(
            "every consumer is available",
            Duration::from_secs(300),
            || async {
                let deployment = deployments
                    .get(&self.name)
                    .await
                    .map_err(|e| e.to_string())?;
                let available = deployment.status.and_then(|s| s.available_replicas);
                if available == Some(CONSUMERS) {
                    Ok(())
                } else {
                    Err(format!("{available:?} of {CONSUMERS} available"))
                }
            },
        )
        .await;
        let hex = checksum.trim_start_matches("sha256:");
        let pods = self.ns.api::<Pod>();
        for pod in self.pods().await {
            let name = pod.metadata.name.unwrap_or_default();
            // Available means started: the container may not have printed its line yet.
            let log = eventually(
                &format!("{name} printed a line"),
                Duration::from_secs(30),
                || async {
                    let log = pods
                        .logs(&name, &LogParams::default())
                        .await
                        .unwrap_or_else(|e| panic!("logs of {name}: {e}"));
                    (!log.trim().is_empty()).then_some(log)
                },
            )
            .await;
            assert_eq!(
                log.split_whitespace().next(),
                Some(hex),
                "{name} read the staged file: {log}"
            );
        }
    }

    async fn delete(&self) {
        self.ns
            .api::<Deployment>()
            .delete(&self.name, &DeleteParams::foreground())
            .await
            .expect("delete the consumers");
        eventually(
            "the consumers are gone",
            Duration::from_secs(180),
            || async { self.pods().await.is_empty().then_some(()) },
        )
        .await;
    }
}

/// The chart's `-mover-status` policy against real bound tokens. No one but the Job controller
/// may start a Pod as the mover (the `-mover-workloads` policy: tried first), so the token is a
/// real copy Pod's: that of cache `slow`, whose copy runs from a slow source, borrowed by an
/// ephemeral container added to that Pod (which anyone with `pods/ephemeralcontainers` in the
/// namespace may add). With it, a write to another cache's status names the wrong Pod, and a
/// write of its own cache's phase changes more than `progress`: both refused, nothing changed.
async fn forged_status_writes_are_refused(
    ns: &TestNamespace,
    server: &HttpServer,
    images: &Images,
) {
    let direct = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "not-a-mover", "namespace": ns.name},
        "spec": {
            "serviceAccountName": MOVER,
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "image": images.consumer.pinned(),
                "command": ["sleep", "60"], "securityContext": restricted_container()}]
        }
    });
    let refused = node::try_apply(&direct)
        .expect_err("a Pod as the mover's account made by a user is refused");
    assert!(
        refused.contains("only the Job controller may create Pods that run as ServiceAccount"),
        "{refused}"
    );

    // About 25 s of copying (64 KiB every 50 ms): time to borrow the Pod's token.
    server.put("slow.img", &random_bytes(32 << 20));
    ns.create_cache(
        "slow",
        json!({"source": {"http": {"url": server.url("slow/slow.img")}}}),
    )
    .await;
    let pods = ns.api::<Pod>();
    let copy_pod = eventually("slow's copy Pod runs", Duration::from_secs(120), || async {
        let list = pods
            .list(&ListParams::default().labels("batch.kubernetes.io/job-name=slow-copy-1"))
            .await
            .ok()?;
        let pod = list.items.into_iter().next()?;
        (pod.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(pod)
    })
    .await;
    let pod_name = copy_pod.metadata.name.clone().unwrap_or_default();
    // The token volume the kubelet projects into the Pod (kube-api-access-<random>).
    let token_volume = copy_pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|v| v.name.clone())
        .find(|v| v.starts_with("kube-api-access-"))
        .expect("the copy Pod has its ServiceAccount token");
    let status_of = |cache: &str| {
        format!(
            "/apis/templatecache.io/v1alpha1/namespaces/{}/templatecaches/{cache}/status",
            ns.name
        )
    };
    let forge = format!(
        "kube-whoami patch {} '{{\"status\":{{\"phase\":\"Failed\"}}}}'; \
         kube-whoami patch {} '{{\"status\":{{\"phase\":\"Ready\"}}}}'",
        status_of("disk"),
        status_of("slow")
    );
    let ephemeral = json!({"spec": {"ephemeralContainers": [{
        "name": "forger",
        "image": images.consumer.pinned(),
        "command": ["sh", "-c", forge],
        "securityContext": {"allowPrivilegeEscalation": false, "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": token_volume, "readOnly": true,
            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]
    }]}});
    pods.patch_ephemeral_containers(
        &pod_name,
        &PatchParams::default(),
        &Patch::Strategic(ephemeral),
    )
    .await
    .expect("add the ephemeral container");
    let log = eventually(
        "the forger wrote twice",
        Duration::from_secs(60),
        || async {
            let params = LogParams {
                container: Some("forger".into()),
                ..LogParams::default()
            };
            let log = pods
                .logs(&pod_name, &params)
                .await
                .map_err(|e| e.to_string())?;
            if log.matches("patch: ").count() == 2 {
                Ok(log)
            } else {
                Err(log)
            }
        },
    )
    .await;
    let mut answers = log.lines().filter(|l| l.starts_with("patch: "));
    let other = answers.next().unwrap_or_default();
    assert!(
        other.starts_with("patch: 403 ")
            && other.contains("only a Pod of the current copy Job disk-copy-1 may write")
            && other.contains(&format!("Pod {pod_name}")),
        "another cache's status from slow's copy Pod is refused: {other}"
    );
    let own = answers.next().unwrap_or_default();
    assert!(
        own.starts_with("patch: 403 ")
            && own.contains("the data mover may change only status.progress"),
        "its own cache's phase is refused: {own}"
    );
    let disk: Api<TemplateCache> = ns.api();
    let disk = disk.get("disk").await.expect("read disk");
    assert_eq!(
        phase(&disk),
        Some(Phase::Ready),
        "the forgery changed nothing"
    );
    wait_for_cache(&ns.client, &ns.name, "slow", "Ready", |c| {
        phase(c) == Some(Phase::Ready)
    })
    .await;
}

/// The kubelet started a remove Job's container for `cache` (its Events outlive the Pod, which
/// goes with the cache it belongs to).
async fn assert_remove_pod_ran(ns: &TestNamespace, cache: &str) {
    let events = ns
        .api::<Event>()
        .list(&ListParams::default().fields("involvedObject.kind=Pod,reason=Started"))
        .await
        .expect("list Events");
    let prefix = format!("{cache}-remove-");
    assert!(
        events.items.iter().any(|e| e
            .involved_object
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with(&prefix))),
        "a remove Job's Pod of {cache} started on the node"
    );
}

/// How long each phase took, printed at the end (`make test-node` shows it).
struct Phases {
    start: Instant,
    last: Instant,
    lines: Vec<String>,
}

impl Default for Phases {
    fn default() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            lines: vec![],
        }
    }
}

impl Phases {
    fn done(&mut self, what: &str) {
        let now = Instant::now();
        let line = format!("{:>7.1} s  {what}", (now - self.last).as_secs_f64());
        eprintln!("node: {line}");
        self.lines.push(line);
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "phases of tests/node.rs:")?;
        for line in &self.lines {
            writeln!(f, "  {line}")?;
        }
        write!(f, "  {:>7.1} s  in all", self.start.elapsed().as_secs_f64())
    }
}
