//! `make demo`: CLOUDSTACK-7539's parallel deployment on the local control plane, with real bytes.
//!
//! Serves a generated template over HTTP on loopback, runs the operator and the local Job
//! executor, lets 50 consumers acquire the same template at once, and prints what happened:
//! caches and Jobs created, the final and the lowest reference count seen, and how long the
//! slowest consumer waited for Ready.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, future};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::json;
use templatecache::api::{StagingStore, TemplateCache, TemplateCacheSpec};
use templatecache::client::{self, CacheRequest};
use templatecache::controller::jobs::JobSettings;
use templatecache::controller::{self, Config};
use templatecache::copy::address::AllowedInternal;

const CONSUMERS: usize = 50;
const TEMPLATE_MIB: usize = 64;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = Client::try_default().await?;
    let tag = std::process::id();
    let namespace = format!("demo-{tag}");
    let store_name = format!("demo-store-{tag}");
    let work = tempfile::tempdir()?;

    // A template served over HTTP on loopback.
    let served = work.path().join("served");
    std::fs::create_dir_all(&served)?;
    let template: Vec<u8> = (0..TEMPLATE_MIB << 20)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    std::fs::write(served.join("template.img"), &template)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let served_at = listener.local_addr()?;
    let url = format!("http://{served_at}/template.img");
    let app = axum::Router::new().fallback_service(tower_http::services::ServeDir::new(&served));
    tokio::spawn(async move { axum::serve(listener, app).await });

    // A namespace, a hostPath store, the operator and the executor.
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let store_dir = work.path().join("store");
    let store: StagingStore = serde_json::from_value(json!({
        "metadata": {"name": store_name},
        "spec": {"volume": {"hostPath": {"path": store_dir}}, "capacity": "10Gi"}
    }))?;
    Api::<StagingStore>::all(client.clone())
        .create(&PostParams::default(), &store)
        .await?;
    let config = Config {
        namespace: Some(namespace.clone()),
        default_store: store_name.clone(),
        jobs: JobSettings {
            image: "templatecache:dev".into(),
            service_account: None,
            copy: Default::default(),
            oci_plain_http_registries: vec![],
            // The template is served on loopback, which copy Jobs may not reach unless the
            // operator names it: exactly this address and port, nothing else of the machine.
            allow_internal_addresses: vec![AllowedInternal::Endpoint(served_at)],
        },
        ..Config::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(controller::run(client.clone(), config, async {
        let _ = stop_rx.await;
    }));
    let bin_dir = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .ok_or("cannot find the target folder")?
        .to_owned();
    let mut executor = tokio::process::Command::new(bin_dir.join("templatecache-local-executor"))
        .arg("--templatecache")
        .arg(bin_dir.join("templatecache"))
        .args(["--namespace", &namespace])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;

    // Watch the reference count over the whole run.
    let caches: Api<TemplateCache> = Api::namespaced(client.clone(), &namespace);
    let lowest = watch_lowest_ref_count(client.clone(), &namespace);

    println!("{CONSUMERS} consumers acquire the same {TEMPLATE_MIB} MiB template at once...");
    let spec: TemplateCacheSpec =
        serde_json::from_value(json!({"source": {"http": {"url": url}}}))?;
    let request = CacheRequest {
        namespace: namespace.clone(),
        name: "template".into(),
        spec: Some(spec),
    };
    let started = Instant::now();
    let consumers = (0..CONSUMERS).map(|i| {
        let request = request.clone();
        tokio::spawn(async move {
            let client = Client::try_default().await?;
            let reference = client::acquire(client, &request, &format!("consumer-{i}")).await?;
            reference.wait_ready(Duration::from_secs(300)).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(started.elapsed())
        })
    });
    let mut waits = vec![];
    for result in future::join_all(consumers).await {
        waits.push(result??);
    }
    let slowest = waits.iter().max().copied().unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(1)).await; // let refCount settle

    let all_caches = caches.list(&ListParams::default()).await?.items;
    let jobs = Api::<Job>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default().labels("templatecache.io/operation=copy"))
        .await?
        .items;
    let cache = caches.get("template").await?;
    let status = cache.status.unwrap_or_default();
    let copied = std::fs::read(store_dir.join(&namespace).join("template"))?;
    let lowest = *lowest.lock().unwrap_or_else(|e| e.into_inner());

    println!();
    println!("| what                               | value |");
    println!("|------------------------------------|-------|");
    println!("| consumers                          | {CONSUMERS} |");
    println!(
        "| TemplateCaches created             | {} |",
        all_caches.len()
    );
    println!("| copy Jobs created                  | {} |", jobs.len());
    println!(
        "| final refCount                     | {} |",
        status.ref_count.unwrap_or(0)
    );
    println!(
        "| lowest refCount seen (watch)       | {} |",
        lowest.map_or("none".into(), |l: i64| l.to_string())
    );
    println!(
        "| bytes in the store                 | {} ({}) |",
        copied.len(),
        if copied == template {
            "identical to the source"
        } else {
            "DIFFERENT"
        }
    );
    println!(
        "| slowest consumer's time to Ready   | {:.2} s |",
        slowest.as_secs_f64()
    );

    // Clean up: release everyone, delete the cache (its data goes with it), stop.
    for i in 0..CONSUMERS {
        client::release(
            client.clone(),
            &namespace,
            "template",
            &format!("consumer-{i}"),
        )
        .await?;
    }
    caches.delete("template", &DeleteParams::default()).await?;
    for _ in 0..100 {
        if caches.get_opt("template").await?.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_tx.send(());
    let _ = operator.await;
    let _ = executor.kill().await;
    Api::<StagingStore>::all(client.clone())
        .delete(&store_name, &DeleteParams::default())
        .await?;
    Api::<Namespace>::all(client)
        .delete(&namespace, &DeleteParams::default())
        .await?;
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
