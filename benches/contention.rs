//! Contention benchmark: N concurrent acquirers of one template (N = 10, 100, 1000 by default),
//! each a task with its own client authenticated as a consumer ServiceAccount, against the local
//! control plane. Three ways in the same run:
//!
//! - **templatecache**: `client::acquire` with the operator running.
//! - **CloudStack before its fix** (CLOUDSTACK-7539): read the template's row, create it if
//!   absent (every worker that saw it absent starts a copy), then read-modify-write a counter with
//!   no precondition.
//! - **CloudStack after its fix**: the same steps under one global lock.
//!
//! Then the consumers release one at a time, as deployments end at different moments (a
//! CloudStack release decrements the counter the same way).
//!
//! The CloudStack rows are TemplateCache objects in a namespace no operator watches, the counter an
//! annotation written by merge patch (unconditional, as the SQL UPDATE was); the global lock is a
//! mutex in this process, standing in for CloudStack's database lock. Writes `target/bench/
//! contention.md`; `make bench` puts it into docs/benchmarks.md.
//!
//!     cargo bench --bench contention [-- 10 100 1000]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, future};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::json;
use support::TestNamespace;
use support::operator::{Operator, TestStore, config};
use templatecache::api::{TemplateCache, TemplateCacheSpec};
use templatecache::client::{self, CacheRequest};

const COUNTER: &str = "cloudstack.example/ref-count";

/// One way's results at one N.
struct Row {
    way: &'static str,
    n: usize,
    copies: usize,
    writes: u32,
    latencies: Vec<Duration>,
    elapsed: Duration,
    counter_after_acquires: i64,
    lowest: i64,
    counter_after_releases: i64,
}

impl Row {
    fn markdown(&self) -> String {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let pct =
            |p: f64| sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1];
        format!(
            "| {} | {} | {} | {:.2} | {:.0} ms | {:.0} ms | {:.1} s | {} | {} | {} |",
            self.way,
            self.n,
            self.copies,
            f64::from(self.writes) / self.n as f64,
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            self.elapsed.as_secs_f64(),
            self.counter_after_acquires,
            self.lowest,
            self.counter_after_releases,
        )
    }
}

fn spec() -> TemplateCacheSpec {
    serde_json::from_value(json!({"source": {"http": {"url": "http://127.0.0.1:9/disk.qcow2"}}}))
        .expect("spec literal")
}

/// Clients for `n` consumers, made before the clock starts.
async fn consumers(n: usize) -> Vec<Client> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(support::consumer::consumer_client().await);
    }
    clients
}

/// Watches `name` until `stop`, keeping the lowest value of `read` seen.
fn lowest_seen(
    ns: &TestNamespace,
    name: &str,
    read: fn(&DynamicObject) -> Option<i64>,
) -> (Arc<AtomicI64>, tokio::task::JoinHandle<()>) {
    let ar = ApiResource::erase::<TemplateCache>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let lowest = Arc::new(AtomicI64::new(i64::MAX));
    let seen = lowest.clone();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, cfg).applied_objects());
        while let Some(Ok(obj)) = stream.next().await {
            if let Some(value) = read(&obj) {
                seen.fetch_min(value, Ordering::Relaxed);
            }
        }
    });
    (lowest, task)
}

fn ref_count(obj: &DynamicObject) -> Option<i64> {
    obj.data["status"]["refCount"].as_i64()
}

fn annotation_counter(obj: &DynamicObject) -> Option<i64> {
    obj.metadata
        .annotations
        .as_ref()?
        .get(COUNTER)?
        .parse()
        .ok()
}

async fn templatecache_way(n: usize) -> Row {
    let ns = TestNamespace::new(&format!("bench-ours-{n}")).await;
    let store = TestStore::new(&ns.client, &format!("{}-store", ns.name), "10Gi").await;
    let operator = Operator::start(config(&ns.name, &store.name)).await;
    let (lowest, watch) = lowest_seen(&ns, "template", ref_count);
    let clients = consumers(n).await;
    let request = CacheRequest {
        namespace: ns.name.clone(),
        name: "template".into(),
        spec: Some(spec()),
    };
    let started = Instant::now();
    let acquires = clients.iter().cloned().enumerate().map(|(i, client)| {
        let request = request.clone();
        async move {
            let begun = Instant::now();
            let reference = client::acquire(client, &request, &format!("consumer-{i}"))
                .await
                .expect("acquire");
            (begun.elapsed(), reference)
        }
    });
    let acquired = future::join_all(acquires).await;
    let elapsed = started.elapsed();
    let caches: Api<TemplateCache> = ns.api();
    let after_acquires = settled_ref_count(&caches, n as u32).await;
    let writes = acquired.iter().map(|(_, r)| r.write_requests()).sum();
    let latencies = acquired.iter().map(|(l, _)| *l).collect();
    for (_, reference) in acquired {
        reference.release().await.expect("release");
    }
    let after_releases = settled_ref_count(&caches, 0).await;
    let jobs: Api<Job> = ns.api();
    let copies = jobs
        .list(&ListParams::default())
        .await
        .expect("jobs")
        .items
        .len();
    watch.abort();
    operator.stop().await;
    store.delete().await;
    ns.delete().await;
    Row {
        way: "templatecache",
        n,
        copies,
        writes,
        latencies,
        elapsed,
        counter_after_acquires: after_acquires,
        lowest: lowest.load(Ordering::Relaxed).min(after_releases),
        counter_after_releases: after_releases,
    }
}

/// The refCount once the operator has recorded `expected` (or after 60 s, whatever it is).
async fn settled_ref_count(caches: &Api<TemplateCache>, expected: u32) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = caches
            .get("template")
            .await
            .ok()
            .and_then(|c| c.status?.ref_count);
        if count == Some(expected) || Instant::now() > deadline {
            return count.map_or(-1, i64::from);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one CloudStack worker did.
#[derive(Default)]
struct Tally {
    copies: AtomicU32,
    writes: AtomicU32,
}

/// CloudStack's acquire: read the row, create it if absent (and copy), then counter += 1.
async fn cloudstack_acquire(api: &Api<TemplateCache>, tally: &Tally) {
    if api.get_opt("template").await.expect("read row").is_none() {
        // The worker saw no row, so it starts a copy (the bug: several workers do).
        tally.copies.fetch_add(1, Ordering::Relaxed);
        let mut row = TemplateCache::new("template", spec());
        row.metadata.annotations = Some([(COUNTER.to_owned(), "0".to_owned())].into());
        tally.writes.fetch_add(1, Ordering::Relaxed);
        match api.create(&PostParams::default(), &row).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create row: {e}"),
        }
    }
    add_to_counter(api, tally, 1).await;
}

/// Read-modify-write of the counter with no precondition, as the SQL UPDATE did.
async fn add_to_counter(api: &Api<TemplateCache>, tally: &Tally, delta: i64) {
    let row = api.get("template").await.expect("read counter");
    let current: i64 = row
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(COUNTER)?.parse().ok())
        .unwrap_or(0);
    let patch = json!({"metadata": {"annotations": {COUNTER: (current + delta).to_string()}}});
    tally.writes.fetch_add(1, Ordering::Relaxed);
    api.patch("template", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("write counter");
}

async fn cloudstack_way(n: usize, global_lock: bool) -> Row {
    let ns = TestNamespace::new(&format!("bench-cs-{n}")).await;
    let (lowest, watch) = lowest_seen(&ns, "template", annotation_counter);
    let clients = consumers(n).await;
    let tally = Arc::new(Tally::default());
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    let acquire_all = || {
        let clients = clients.clone();
        let (tally, lock, ns_name) = (tally.clone(), lock.clone(), ns.name.clone());
        async move {
            let workers = clients.into_iter().map(|client| {
                let (tally, lock) = (tally.clone(), lock.clone());
                let api: Api<TemplateCache> = Api::namespaced(client, &ns_name);
                async move {
                    let begun = Instant::now();
                    let _held = if global_lock {
                        Some(lock.lock().await)
                    } else {
                        None
                    };
                    cloudstack_acquire(&api, &tally).await;
                    begun.elapsed()
                }
            });
            future::join_all(workers).await
        }
    };
    let started = Instant::now();
    let latencies = acquire_all().await;
    let elapsed = started.elapsed();
    let writes = tally.writes.load(Ordering::Relaxed);
    let caches: Api<TemplateCache> = ns.api();
    let counter = |row: TemplateCache| {
        row.metadata
            .annotations
            .and_then(|a| a.get(COUNTER)?.parse().ok())
            .unwrap_or(0)
    };
    let after_acquires = counter(caches.get("template").await.expect("row"));
    for client in clients {
        add_to_counter(&Api::namespaced(client, &ns.name), &tally, -1).await;
    }
    let after_releases = counter(caches.get("template").await.expect("row"));
    // Let the watch see the last writes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    watch.abort();
    ns.delete().await;
    Row {
        way: if global_lock {
            "CloudStack after its fix (global lock)"
        } else {
            "CloudStack before its fix"
        },
        n,
        copies: tally.copies.load(Ordering::Relaxed) as usize,
        writes,
        latencies,
        elapsed,
        counter_after_acquires: after_acquires,
        lowest: lowest.load(Ordering::Relaxed).min(after_releases),
        counter_after_releases: after_releases,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --all-targets` runs bench targets without --bench: nothing to do then.
    if !args.iter().any(|a| a == "--bench") {
        println!("contention: a benchmark; run it with `cargo bench --bench contention`");
        return;
    }
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        vec![10, 100, 1000]
    } else {
        sizes
    };
    let mut rows = vec![];
    for &n in &sizes {
        for row in [
            templatecache_way(n).await,
            cloudstack_way(n, false).await,
            cloudstack_way(n, true).await,
        ] {
            println!("{}", row.markdown());
            rows.push(row);
        }
    }
    let table = rows
        .iter()
        .map(Row::markdown)
        .collect::<Vec<_>>()
        .join("\n");
    let report = format!(
        "## Contention\n\n\
         `cargo bench --bench contention -- {}` (also `make bench`), {}, {} cores: N concurrent \
         acquirers of one template, each a task with its own client authenticated as a consumer \
         ServiceAccount (so API priority and fairness applies). The CloudStack \
         rows replay its steps on the same API server: read the row, create it if absent (each \
         worker that saw no row starts a copy), read-modify-write a counter with no precondition; \
         after its fix, the same under one global lock (a mutex in the benchmark process). Then the \
         consumers release one at a time, as deployments end at different moments.\n\n\
         | way | N | copies started | API writes per acquire | p50 acquire | p99 acquire | all acquired after | count after acquires | lowest count seen | count after releases |\n\
         |---|---|---|---|---|---|---|---|---|---|\n{table}\n\n\
         Targets: 1 copy whatever N; at most 1.5 API writes per acquire at N=1000. The \
         templatecache count is `status.refCount`, derived from the references, so it is exact \
         and cannot go below 0; CloudStack's counter loses concurrent updates, so releases drive \
         it negative (the bug). Writes per acquire include failed writes (lost create races).\n",
        sizes
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        today_utc(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    support::write_report("bench/contention.md", &report);
    println!("contention: wrote target/bench/contention.md");
}

/// Today's date (UTC) from `date`, to stamp the report.
fn today_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
