//! Templates from OCI registries: an ORAS artifact's layer (the one whose title is the file
//! asked for) or the disk inside a KubeVirt containerDisk.
//!
//! The registry side fetches one blob on the async runtime, in order, verified against its
//! digest; a blocking thread writes what is kept of it (the layer, or the disk file out of the
//! decompressed tar) into the partial file, created through the store folder like every
//! source's (so a link planted in `.partial/` fails the copy). The same publish rules as every
//! source then apply: the cache's checksum is checked against the staged file, and the file is
//! renamed into place through the folder only when all of that holds.

mod fetch;
mod registry;
mod tar_guard;
mod unpack;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use oci_client::Reference;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use tokio::sync::{mpsc, oneshot};

use registry::{Pinned, Registry, TITLE_ANNOTATION};
use unpack::{DiskLayer, RoomGate, Written};

use super::address::AddressPolicy;
use super::landing::Front;
use super::report::Reporter;
use super::stall::StallLimit;
use super::{CopyArgs, CopyError, Partial, Transferred};

/// How often progress is read from the writing thread.
const PROGRESS_TICK: Duration = Duration::from_millis(500);

/// Pulls the file the arguments name into `partial` (not yet published).
pub async fn download(
    args: &CopyArgs,
    reference: &str,
    reporter: &mut Reporter,
    partial: &Partial,
    copied: &mut u64,
) -> Result<Transferred, CopyError> {
    let policy = AddressPolicy::new(args.allow_internal_address.clone());
    let stall = StallLimit::from_seconds(args.stall_seconds);
    let registry = Arc::new(Registry::open(reference, args.oci_plain_http, policy, stall).await?);
    let pinned = registry.pin(args.oci_digest.as_deref()).await?;
    if args.oci_digest.is_none() {
        reporter.resolved(&pinned.digest).await?;
    }
    match choose(
        &registry.display,
        &pinned.manifest,
        args.oci_file.as_deref(),
    )? {
        Target::Layer(layer) => {
            download_layer(&registry, &pinned, layer, reporter, partial, copied).await
        }
        Target::Disk(layers) => {
            download_disk(args, &registry, &pinned, layers, reporter, partial, copied).await
        }
    }
}

/// An ORAS layer, written as it is.
async fn download_layer(
    registry: &Arc<Registry>,
    pinned: &Pinned,
    layer: OciDescriptor,
    reporter: &mut Reporter,
    partial: &Partial,
    copied: &mut u64,
) -> Result<Transferred, CopyError> {
    let size = u64::try_from(layer.size).unwrap_or(0);
    reporter.wait_for_room(size).await?;
    let written = unpack::counters();
    written.total.store(size, Ordering::Relaxed);
    let sink = Arc::clone(&written);
    let partial = partial.clone();
    // The fetch verifies the blob's digest; when that is a SHA-256 it is the file's too,
    // and hashing the bytes a second time on the way to disk would cost a core.
    let digest = Some(layer.digest.clone()).filter(|d| d.starts_with("sha256:"));
    let hash_file = digest.is_none();
    let writer = move |reader: unpack::ChannelReader| {
        unpack::write_layer(reader, &partial, &sink, hash_file)
    };
    let (bytes, checksum) = pull_layer(
        registry,
        &pinned.image,
        layer,
        written,
        None,
        reporter,
        copied,
        writer,
    )
    .await?;
    // pull_layer returns only once the fetch has verified the blob against `digest`.
    let checksum = checksum.or(digest).ok_or_else(|| {
        CopyError::Source(registry.display.clone(), "the layer was not hashed".into())
    })?;
    Ok(Transferred {
        bytes,
        checksum,
        resumed: 0,
    })
}

/// The disk file of a containerDisk, looked for in its tar layers from the top one down.
async fn download_disk(
    args: &CopyArgs,
    registry: &Arc<Registry>,
    pinned: &Pinned,
    layers: Vec<OciDescriptor>,
    reporter: &mut Reporter,
    partial: &Partial,
    copied: &mut u64,
) -> Result<Transferred, CopyError> {
    let mut seen = vec![];
    for layer in layers {
        let written = unpack::counters();
        let (ask, asked) = oneshot::channel();
        let (grant, granted) = std::sync::mpsc::channel();
        let mut gate = RoomGate {
            ask: Some(ask),
            granted: Some(granted),
        };
        let sink = Arc::clone(&written);
        let partial = partial.clone();
        let file = args.oci_file.clone();
        let display = registry.display.clone();
        let writer = move |reader: unpack::ChannelReader| {
            unpack::unpack_disk(
                reader,
                file.as_deref(),
                &display,
                &partial,
                &sink,
                &mut gate,
            )
        };
        let room = Room { asked, grant };
        let found = pull_layer(
            registry,
            &pinned.image,
            layer,
            written,
            Some(room),
            reporter,
            copied,
            writer,
        )
        .await?;
        match found {
            DiskLayer::Written(done) => return Ok(done),
            DiskLayer::NotHere(names) => seen.extend(names),
        }
    }
    Err(CopyError::FileMissing {
        reference: registry.display.clone(),
        file: args.oci_file.clone().unwrap_or_else(|| "disk/*".into()),
        candidates: listing(&seen),
    })
}

/// The async side of a room request made from the writing thread.
struct Room {
    asked: oneshot::Receiver<u64>,
    grant: std::sync::mpsc::Sender<bool>,
}

/// Fetches `layer` and runs `writer` over it on a blocking thread, reporting progress and
/// answering the writer's room request; the fetch's verdict (digest, size, connection) comes
/// before the writer's, since a writer fed a short stream may well think it is done.
#[allow(clippy::too_many_arguments)]
async fn pull_layer<T: Send + 'static>(
    registry: &Arc<Registry>,
    image: &Reference,
    layer: OciDescriptor,
    written: Arc<Written>,
    room: Option<Room>,
    reporter: &mut Reporter,
    copied: &mut u64,
    writer: impl FnOnce(unpack::ChannelReader) -> Result<T, CopyError> + Send + 'static,
) -> Result<T, CopyError> {
    let (chunks_in, chunks_out) = mpsc::channel(fetch::CHUNKS_IN_FLIGHT);
    let mut fetching = tokio::spawn(fetch::fetch(
        Arc::clone(registry),
        image.clone(),
        layer,
        chunks_in,
    ));
    let mut writing =
        tokio::task::spawn_blocking(move || writer(unpack::ChannelReader::new(chunks_out)));
    let mut room = room;
    let mut fetched = None;
    let mut tick = tokio::time::interval(PROGRESS_TICK);
    let outcome = loop {
        tokio::select! {
            result = &mut fetching, if fetched.is_none() => {
                let result = result.unwrap_or_else(|e| Err(CopyError::Source(registry.display.clone(), e.to_string())));
                if result.is_err() {
                    // The writer may wait on a room answer or a chunk: let it go.
                    room = None;
                    fetched = Some(result);
                    break None;
                }
                fetched = Some(result);
            }
            asked = async {
                match room.as_mut() {
                    Some(room) => (&mut room.asked).await,
                    None => std::future::pending().await,
                }
            }, if room.is_some() => {
                let Some(Room { grant, .. }) = room.take() else { continue };
                let granted = match asked {
                    Ok(size) => reporter.wait_for_room(size).await.map(|()| true),
                    Err(_) => Ok(false),
                };
                let ok = matches!(granted, Ok(true));
                let _ = grant.send(ok);
                if let Err(e) = granted {
                    // The attempt is over (superseded, or the cache is going): reading the rest
                    // of the blob would only delay the exit.
                    fetching.abort();
                    return Err(e);
                }
            }
            result = &mut writing => {
                break Some(result.unwrap_or_else(|e| Err(CopyError::Source(registry.display.clone(), e.to_string()))));
            }
            _ = tick.tick() => {
                let bytes = written.bytes.load(Ordering::Relaxed);
                let total = written.total.load(Ordering::Relaxed);
                *copied = bytes;
                let front = Front { hashed: bytes, landed: bytes, ..Front::default() };
                reporter.progress(front, (total > 0).then_some(total)).await;
            }
        }
    };
    drop(room);
    let outcome = match outcome {
        Some(outcome) => outcome,
        // The fetch failed: the writer ends on its closed channel; its verdict does not matter.
        None => writing
            .await
            .unwrap_or_else(|e| Err(CopyError::Source(registry.display.clone(), e.to_string()))),
    };
    let fetched = match fetched {
        Some(result) => result,
        None => fetching
            .await
            .unwrap_or_else(|e| Err(CopyError::Source(registry.display.clone(), e.to_string()))),
    };
    fetched?;
    *copied = written.bytes.load(Ordering::Relaxed);
    outcome
}

/// What to read from the manifest.
enum Target {
    /// An ORAS artifact's layer, staged as it is.
    Layer(OciDescriptor),
    /// A containerDisk's tar layers, the top one first (an upper layer wins, as in a container).
    Disk(Vec<OciDescriptor>),
}

/// Titled layers make an ORAS artifact, and `file` names one of their titles; without titles the
/// image is a containerDisk and `file` is looked for under `disk/` in its tar layers.
fn choose(
    display: &str,
    manifest: &OciImageManifest,
    file: Option<&str>,
) -> Result<Target, CopyError> {
    let title = |layer: &OciDescriptor| {
        layer
            .annotations
            .as_ref()
            .and_then(|a| a.get(TITLE_ANNOTATION))
            .cloned()
    };
    let titled: Vec<_> = manifest
        .layers
        .iter()
        .filter_map(|l| title(l).map(|t| (t, l)))
        .collect();
    if !titled.is_empty() {
        let names: Vec<_> = titled.iter().map(|(t, _)| t.clone()).collect();
        let chosen = match file {
            Some(file) => titled.iter().find(|(t, _)| t == file),
            None if titled.len() == 1 => titled.first(),
            None => {
                return Err(CopyError::SeveralFiles {
                    reference: display.to_owned(),
                    candidates: listing(&names),
                });
            }
        };
        return chosen
            .map(|(_, layer)| Target::Layer((*layer).clone()))
            .ok_or_else(|| CopyError::FileMissing {
                reference: display.to_owned(),
                file: file.unwrap_or_default().to_owned(),
                candidates: listing(&names),
            });
    }
    let tar_layers: Vec<_> = manifest
        .layers
        .iter()
        .rev()
        .filter(|l| l.media_type.contains("tar"))
        .cloned()
        .collect();
    if tar_layers.is_empty() {
        return Err(CopyError::FileMissing {
            reference: display.to_owned(),
            file: file.unwrap_or("a file").to_owned(),
            candidates: listing(&[]),
        });
    }
    Ok(Target::Disk(tar_layers))
}

fn listing(names: &[String]) -> String {
    if names.is_empty() {
        "none: no titled layer and no file under disk/".to_owned()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(layers: serde_json::Value) -> OciImageManifest {
        serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                       "digest": format!("sha256:{}", "4".repeat(64)), "size": 2},
            "layers": layers,
        }))
        .expect("manifest")
    }

    fn titled(title: &str) -> serde_json::Value {
        serde_json::json!({"mediaType": "application/octet-stream", "size": 1,
            "digest": format!("sha256:{}", "1".repeat(64)),
            "annotations": {TITLE_ANNOTATION: title}})
    }

    #[test]
    fn an_artifact_gives_the_titled_layer_asked_for_or_its_only_one() {
        let one = manifest(serde_json::json!([titled("model.bin")]));
        assert!(matches!(choose("r", &one, None), Ok(Target::Layer(_))));
        let two = manifest(serde_json::json!([titled("a.bin"), titled("b.bin")]));
        assert!(matches!(
            choose("r", &two, Some("b.bin")),
            Ok(Target::Layer(_))
        ));
        let several = choose("r", &two, None)
            .err()
            .expect("ambiguous")
            .to_string();
        assert!(several.contains("a.bin, b.bin"), "{several}");
        let missing = choose("r", &two, Some("c.bin"))
            .err()
            .expect("missing")
            .to_string();
        assert!(
            missing.contains("c.bin") && missing.contains("a.bin, b.bin"),
            "{missing}"
        );
    }

    #[test]
    fn an_image_without_titles_is_a_container_disk_read_from_its_top_layer() {
        let layer = |d: char| {
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "size": 1, "digest": format!("sha256:{}", d.to_string().repeat(64))})
        };
        let image = manifest(serde_json::json!([layer('1'), layer('2')]));
        let Ok(Target::Disk(layers)) = choose("r", &image, None) else {
            panic!("a containerDisk");
        };
        assert!(layers[0].digest.starts_with("sha256:2"));
    }
}
