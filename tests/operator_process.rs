//! The `templatecache run` binary as replicas run it: leader election between three processes
//! with one SIGKILLed mid-copy, and `/metrics`, `/healthz`, `/readyz` checked against what the
//! test did.

use templatecache_test_support as support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::TestNamespace;
use support::eventually;
use support::http_server::HttpServer;
use support::jobs::{jobs_of, wait_for_cache};
use support::operator::OperatorProcess;
use support::rig::Rig;
use support::rig::{random_bytes, sha256};
use templatecache_api::{Phase, TemplateCache};
use templatecache_client as client;

const LEASE: &str = "templatecache-operator";
const LEASE_SECONDS: u64 = 6;

async fn holder(ns: &TestNamespace) -> Option<String> {
    let lease = ns
        .api::<Lease>()
        .get_opt(LEASE)
        .await
        .expect("read Lease")?;
    lease.spec?.holder_identity
}

async fn wait_for_holder(ns: &TestNamespace, not: Option<&str>) -> String {
    eventually("a new leader", Duration::from_secs(30), || async {
        holder(ns).await.filter(|id| Some(id.as_str()) != not)
    })
    .await
}

/// Waits until the Lease holder is the one replica that says it leads, and returns it.
async fn one_leader(ns: &TestNamespace, replicas: &[OperatorProcess]) -> String {
    eventually(
        "a single leader, the Lease holder",
        Duration::from_secs(60),
        || async {
            let holder = wait_for_holder(ns, None).await;
            let mut leading = vec![];
            for replica in replicas {
                if replica
                    .metrics()
                    .await
                    .lines()
                    .any(|l| l == "templatecache_leader 1")
                {
                    leading.push(replica.identity.clone());
                }
                assert_eq!(
                    replica.get("/readyz").await,
                    "ready",
                    "standbys are ready too"
                );
            }
            (leading == [holder.clone()]).then_some(holder)
        },
    )
    .await
}

#[tokio::test]
async fn a_standby_takes_over_from_a_killed_leader_and_each_attempt_still_has_one_job() {
    let server = HttpServer::start().await;
    let bytes = random_bytes(16 << 20);
    server.put("big.img", &bytes);
    let rig = Rig::builder("leader")
        .store("10Gi")
        .runs_jobs()
        .start()
        .await;
    let (ns, store) = (&rig.ns, rig.store());
    let duration = LEASE_SECONDS.to_string();
    let mut replicas: Vec<OperatorProcess> = (0..3)
        .map(|i| {
            let extra = ["--lease-duration-seconds", &duration];
            OperatorProcess::start(&format!("op-{i}"), &ns.name, &store.name, &extra)
        })
        .collect();
    let leader = one_leader(ns, &replicas).await;

    // A copy of about 13 s (the slow route) is under way when the leader dies.
    let spec = json!({"source": {"http": {"url": server.url("slow/big.img")}}, "checksum": sha256(&bytes)});
    ns.create_cache("big", spec).await;
    wait_for_cache(&ns.client, &ns.name, "big", "copying", |c| {
        let progress = c.status.as_ref().and_then(|s| s.progress.as_ref());
        progress.is_some_and(|p| p.bytes_copied > 0)
    })
    .await;
    let killed = Instant::now();
    replicas
        .iter_mut()
        .find(|r| r.identity == leader)
        .expect("leader process")
        .kill()
        .await;
    let successor = wait_for_holder(ns, Some(&leader)).await;
    let takeover = killed.elapsed();
    println!("{leader} killed; {successor} leads after {takeover:?} (lease {LEASE_SECONDS}s)");
    assert!(
        takeover <= Duration::from_secs(LEASE_SECONDS + 5),
        "takeover took {takeover:?}"
    );

    // Three more caches reconciled by the new leader alone.
    for name in ["after-1", "after-2", "after-3"] {
        let spec = json!({"source": {"http": {"url": server.url("big.img")}}});
        ns.create_cache(name, spec).await;
    }
    for name in ["big", "after-1", "after-2", "after-3"] {
        let cache = wait_for_cache(&ns.client, &ns.name, name, "Ready", |c| {
            c.status.as_ref().and_then(|s| s.phase) == Some(Phase::Ready)
        })
        .await;
        let jobs: Vec<String> = jobs_of(&ns.client, &ns.name, name)
            .await
            .into_iter()
            .filter_map(|j| j.metadata.name)
            .collect();
        let attempt = cache.status.and_then(|s| s.attempt).unwrap_or(0);
        assert_eq!(attempt, 1, "{name}");
        assert_eq!(
            jobs,
            [format!("{name}-copy-1")],
            "{name}: one Job per attempt"
        );
    }
    let copy = store.dir.path().join(&ns.name).join("big");
    assert_eq!(std::fs::read(copy).expect("copy"), bytes);

    // Someone else takes the Lease: the leader stops acting (exits) at once.
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let stolen = json!({"spec": {"holderIdentity": "intruder", "renewTime": now,
                                 "leaseDurationSeconds": 600}});
    ns.api::<Lease>()
        .patch(LEASE, &PatchParams::default(), &Patch::Merge(&stolen))
        .await
        .expect("take the Lease");
    let leader = replicas
        .iter_mut()
        .find(|r| r.identity == successor)
        .expect("leader process");
    let status = leader.exited_within(Duration::from_secs(5)).await;
    println!("{successor} after losing the Lease: {status:?}");
    assert!(
        status.is_some_and(|s| !s.success()),
        "{successor} kept acting"
    );

    drop(replicas);
}

/// Samples of `text` by metric name (labels folded into the name, e.g. `x{a="b"}`).
fn parse(text: &str) -> BTreeMap<String, f64> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(h) => h.last().map_or(0.0, |b| b.count),
                prometheus_parse::Value::Summary(_) => f64::NAN,
            };
            let labels = s.labels.to_string();
            let name = if labels.is_empty() {
                s.metric
            } else {
                format!("{}{{{labels}}}", s.metric)
            };
            (name, value)
        })
        .collect()
}

#[tokio::test]
async fn metrics_count_what_the_operator_did() {
    let server = HttpServer::start().await;
    let bytes = random_bytes(1 << 20);
    server.put("ok.img", &bytes);
    let rig = Rig::builder("metrics")
        .store("10Gi")
        .runs_jobs()
        .start()
        .await;
    let (ns, store) = (&rig.ns, rig.store());
    let operator = OperatorProcess::start(
        "op-metrics",
        &ns.name,
        &store.name,
        &["--max-attempts", "2"],
    );
    assert_eq!(operator.get("/healthz").await, "ok");

    let ok = json!({"source": {"http": {"url": server.url("ok.img")}}});
    let missing = json!({"source": {"http": {"url": server.url("missing.img")}}});
    ns.create_cache("ok", ok).await;
    ns.create_cache("missing", missing).await;
    let request = ns.request("ok", None);
    let reference = client::acquire(ns.client.clone(), &request, "metrics-test")
        .await
        .expect("acquire");
    reference
        .wait_ready(Duration::from_secs(120))
        .await
        .expect("ok Ready");
    wait_for_cache(
        &ns.client,
        &ns.name,
        "missing",
        "failed for good",
        |c: &TemplateCache| {
            let status = c.status.as_ref();
            status.and_then(|s| s.attempt) == Some(2)
                && status.and_then(|s| s.phase) == Some(Phase::Failed)
        },
    )
    .await;
    // The operator counts a moment after it writes; give it that moment.
    let samples = eventually(
        "metrics with 1 reference held and 2 failed copies",
        Duration::from_secs(10),
        || async {
            let samples = parse(&operator.metrics().await);
            (samples.get("templatecache_references_held") == Some(&1.0)
                && samples.get("templatecache_copies_failed_total") == Some(&2.0))
            .then_some(samples)
        },
    )
    .await;
    let get = |name: &str| samples.get(name).copied().unwrap_or(f64::NAN);
    println!("{samples:#?}");
    assert_eq!(
        get("templatecache_copies_started_total"),
        3.0,
        "1 + 2 attempts"
    );
    assert_eq!(get("templatecache_copies_succeeded_total"), 1.0);
    assert_eq!(get("templatecache_copies_failed_total"), 2.0);
    assert_eq!(get("templatecache_bytes_copied_total"), bytes.len() as f64);
    assert_eq!(get("templatecache_references_held"), 1.0);
    assert_eq!(get("templatecache_evictions_total"), 0.0);
    assert_eq!(get("templatecache_leader"), 1.0);
    let reconciles = get(r#"templatecache_reconciles_total{controller="template_cache"}"#);
    assert!(reconciles >= 4.0, "{reconciles} reconciles");
    let timed =
        get(r#"templatecache_reconcile_duration_seconds_count{controller="template_cache"}"#);
    assert_eq!(timed, reconciles, "every reconcile is timed");

    drop(operator);
}
