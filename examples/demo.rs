//! `make demo`: CLOUDSTACK-7539's parallel deployment on the local cluster's real node, with real
//! bytes.
//!
//! Serves a generated template over HTTP on the node's address, runs the operator with its copy
//! and remove Jobs as Pods of the pushed image (the integration tests' rig, from
//! `crates/test-support`), lets 50 consumers acquire the same template at once, and prints what happened: caches and Jobs created, the final and the
//! lowest reference count seen, and how long the slowest consumer waited for Ready.

use templatecache_test_support as support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, future};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use support::http_server::HttpServer;
use support::jobs::wait_for_cache_gone;
use support::rig::Rig;
use templatecache_api::TemplateCache;
use templatecache_client as client;
use templatecache_mover::address::AllowedInternal;

const CONSUMERS: usize = 50;
const TEMPLATE_MIB: usize = 64;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What the run leaves to report.
struct Outcome {
    caches: usize,
    copy_jobs: usize,
    ref_count: u32,
    lowest_ref_count: Option<i64>,
    copied: Vec<u8>,
    slowest: Duration,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let server = HttpServer::start().await;
    let template: Vec<u8> = (0..TEMPLATE_MIB << 20)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    server.put("template.img", &template);
    // The template is served on the node's address, which copy Jobs may not reach unless the
    // operator names it: exactly this address and port, nothing else of the machine.
    let served_at = server.addr;
    let rig = Rig::builder("demo")
        .configured(move |cfg| {
            cfg.jobs.oci_plain_http_registries = vec![];
            cfg.jobs.allow_internal_addresses = vec![AllowedInternal::Endpoint(served_at)];
        })
        .runs_jobs()
        .start()
        .await;
    let lowest = watch_lowest_ref_count(rig.client().clone(), &rig.ns.name);

    println!("{CONSUMERS} consumers acquire the same {TEMPLATE_MIB} MiB template at once...");
    let slowest = acquire_all(&rig, server.url("template.img")).await?;
    tokio::time::sleep(Duration::from_secs(1)).await; // let refCount settle
    let outcome = observe(&rig, slowest, &lowest).await?;
    print_summary(&outcome, &template);
    release_all(&rig).await?;
    Ok(())
}

/// `CONSUMERS` consumers, each with a client of its own, acquire the template at once and wait
/// for it to be Ready; the slowest one's wait.
async fn acquire_all(rig: &Rig, url: String) -> Result<Duration, Error> {
    let request = rig.ns.request("template", Some(support::http_spec(&url)));
    let started = Instant::now();
    let consumers = (0..CONSUMERS).map(|i| {
        let request = request.clone();
        tokio::spawn(async move {
            let client = support::client().await;
            let reference = client::acquire(client, &request, &format!("consumer-{i}")).await?;
            reference.wait_ready(Duration::from_secs(300)).await?;
            Ok::<_, Error>(started.elapsed())
        })
    });
    let mut slowest = Duration::ZERO;
    for result in future::join_all(consumers).await {
        slowest = slowest.max(result??);
    }
    Ok(slowest)
}

/// Caches and copy Jobs in the namespace, the cache's count and the copy in the store.
async fn observe(
    rig: &Rig,
    slowest: Duration,
    lowest: &Mutex<Option<i64>>,
) -> Result<Outcome, Error> {
    let caches: Api<TemplateCache> = rig.ns.api();
    let copy_jobs = rig
        .ns
        .api::<Job>()
        .list(&ListParams::default().labels("templatecache.io/operation=copy"))
        .await?
        .items
        .len();
    let status = caches.get("template").await?.status.unwrap_or_default();
    Ok(Outcome {
        caches: caches.list(&ListParams::default()).await?.items.len(),
        copy_jobs,
        ref_count: status.ref_count.unwrap_or(0),
        lowest_ref_count: *lowest.lock().unwrap_or_else(|e| e.into_inner()),
        copied: std::fs::read(rig.data("template"))?,
        slowest,
    })
}

fn print_summary(outcome: &Outcome, template: &[u8]) {
    let lowest = outcome
        .lowest_ref_count
        .map_or("none".into(), |l| l.to_string());
    let same = if outcome.copied == template {
        "identical to the source"
    } else {
        "DIFFERENT"
    };
    println!();
    println!("| what                               | value |");
    println!("|------------------------------------|-------|");
    println!("| consumers                          | {CONSUMERS} |");
    println!(
        "| TemplateCaches created             | {} |",
        outcome.caches
    );
    println!(
        "| copy Jobs created                  | {} |",
        outcome.copy_jobs
    );
    println!(
        "| final refCount                     | {} |",
        outcome.ref_count
    );
    println!("| lowest refCount seen (watch)       | {lowest} |");
    println!(
        "| bytes in the store                 | {} ({same}) |",
        outcome.copied.len()
    );
    println!(
        "| slowest consumer's time to Ready   | {:.2} s |",
        outcome.slowest.as_secs_f64()
    );
}

/// Releases every consumer and deletes the cache: its data goes with it, through a remove Job.
/// The rig stops the operator and deletes the namespace when it drops.
async fn release_all(rig: &Rig) -> Result<(), Error> {
    let (client, namespace) = (rig.client(), &rig.ns.name);
    for i in 0..CONSUMERS {
        let id = format!("consumer-{i}");
        client::release(client.clone(), namespace, "template", &id).await?;
    }
    rig.ns
        .api::<TemplateCache>()
        .delete("template", &DeleteParams::default())
        .await?;
    wait_for_cache_gone(client, namespace, "template").await;
    Ok(())
}

/// Records the lowest `status.refCount` a watch of the namespace sees, read as a signed number so
/// a negative count would show.
fn watch_lowest_ref_count(client: Client, namespace: &str) -> Arc<Mutex<Option<i64>>> {
    let lowest = Arc::new(Mutex::new(None));
    let ar = ApiResource::erase::<TemplateCache>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &ar);
    let seen = lowest.clone();
    tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).applied_objects());
        while let Some(Ok(obj)) = events.next().await {
            if let Some(count) = obj.data["status"]["refCount"].as_i64() {
                let mut low = seen.lock().unwrap_or_else(|e| e.into_inner());
                *low = Some(low.map_or(count, |l: i64| l.min(count)));
            }
        }
    });
    lowest
}
