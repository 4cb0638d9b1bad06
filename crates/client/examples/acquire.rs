//! Acquire a TemplateCache from an in-cluster controller, wait for the copy, use it, release it.
//! Under the hood: a TemplateCacheClaim of this consumer's own; the operator records its
//! reference on the cache with every other new one in one write.
//!
//!     KUBECONFIG=.cluster/kubeconfig cargo run --example acquire -- <namespace> <name> <url>
//!
//! The consumer id is the caller's choice; a stable one (the UID of the object the reference is
//! for) makes acquire and release idempotent across restarts.

use std::time::Duration;

use templatecache_api::{HttpSource, TemplateCacheSpec, TemplateSource};
use templatecache_client::CacheRequest;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(namespace), Some(name), Some(url)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: acquire <namespace> <name> <http-url>".into());
    };
    let request = CacheRequest {
        namespace,
        name,
        // Created with this spec if it does not exist yet; refused if it exists with another.
        spec: Some(TemplateCacheSpec {
            source: TemplateSource {
                http: Some(HttpSource {
                    url,
                    secret_ref: None,
                }),
                s3: None,
                oci: None,
            },
            checksum: None,
            store_ref: None,
        }),
    };
    let kube = kube::Client::try_default().await?;
    let reference =
        templatecache_client::acquire(kube.clone(), &request, "example-consumer").await?;
    println!(
        "claim {} made for cache {}",
        reference.claim_name(),
        reference.name()
    );

    let claim = reference.wait_ready(Duration::from_secs(600)).await?;
    let data = claim.status.and_then(|s| s.cache).unwrap_or_default();
    println!(
        "ready: {} bytes at <{}>/{}",
        data.size.unwrap_or(0),
        data.store.unwrap_or_default(),
        data.path.unwrap_or_default()
    );

    reference.release().await?;
    println!("released");
    Ok(())
}
