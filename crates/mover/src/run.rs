//! One copy attempt from start to end, and a removal: the top of the mover.
//!
//! A reader never sees a half copy: bytes go to `.partial/<cache>-<attempt>` beside the final
//! file, are hashed on the way, verified against the expected checksum, fsynced, and renamed
//! into place (then the folders are fsynced so the rename survives a crash). A failure keeps a
//! partial file only when a later attempt can resume it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};

use tracing::{info, warn};

use crate::folder::StoreFolder;
use crate::landing::Front;
use crate::plan::Tuning;
use crate::transfer::Transferred;
use crate::{CopyArgs, CopyError, RemoveArgs, oci, ranged, report, resume, source, transfer};

/// Where a copy reads from: an object (HTTP(S) or S3) or an OCI registry.
enum Origin<'a> {
    Object(source::Source),
    Oci(&'a str),
}

/// Copies the template into place and reports the outcome.
pub async fn run_copy(args: CopyArgs) -> Result<Transferred, CopyError> {
    // A source refused by its arguments is refused before the store is touched.
    let origin = match &args.oci_reference {
        Some(reference) => Origin::Oci(reference),
        None => Origin::Object(source::open(&args)?),
    };
    let mut reporter = report::Reporter::connect(args.cache.as_deref(), args.attempt)
        .await
        .map_err(CopyError::InvalidArguments)?;
    let folder = Arc::new(StoreFolder::open(&args.dest)?);
    let mut copied = 0;
    let mut terminate = sigterm();
    let attempt = async {
        // A link planted at the cache's name stops the copy before a byte is fetched.
        folder.check_final()?;
        let partial = Partial {
            folder: Arc::clone(&folder),
            attempt: args.attempt,
        };
        let source = match &origin {
            Origin::Object(source) => source,
            Origin::Oci(reference) => {
                partial.drop_earlier_attempts()?;
                let done =
                    oci::download(&args, reference, &mut reporter, &partial, &mut copied).await?;
                return publish(&args, &folder, done);
            }
        };
        // Nothing is written before the store has reserved the room (see StorageAdmission).
        let meta = source.head().await?;
        reporter.wait_for_room(meta.size).await?;
        copy_into_place(&args, source, &meta, &partial, async |front, total| {
            copied = front.hashed;
            reporter.progress(front, total).await;
        })
        .await
    };
    // Stopping drops the attempt where it stands: its streams and parts end, and the partial
    // file and its resume record stay as a broken-off source leaves them (the record never
    // claims more than is synced).
    let result = tokio::select! {
        result = attempt => result,
        () = terminated(&mut terminate) => Err(CopyError::Terminated),
    };
    match result {
        Ok(done) => {
            reporter
                .succeeded(&done)
                .await
                .map_err(|e| CopyError::Report(e.to_string()))?;
            Ok(done)
        }
        Err(error) => {
            // The copy's own error is the one to report; a link in the way of the cleanup is
            // left alone (never removed through). A download the source broke off keeps what
            // it verified for the next attempt (see `resume`); any other failure leaves nothing.
            let partial = Partial {
                folder: Arc::clone(&folder),
                attempt: args.attempt,
            };
            let discarded = if args.final_attempt {
                folder.remove_partials_up_to(args.attempt)
            } else if resume::worth_keeping(&partial, &error) {
                info!("the partial file stays for the next attempt to resume");
                Ok(())
            } else {
                folder.remove_partial(args.attempt)
            };
            if let Err(cleanup) = discarded {
                warn!("the partial file stays: {cleanup}");
            }
            // Bounded: after a SIGTERM the grace period is running, and a report the API
            // server does not take must not hold the exit.
            let report = reporter.failed(copied, &error);
            if tokio::time::timeout(FAILURE_REPORT_TIMEOUT, report)
                .await
                .is_err()
            {
                warn!("the failure could not be reported in time");
            }
            Err(error)
        }
    }
}

/// How long the report of a failure may take before the mover exits anyway.
const FAILURE_REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The SIGTERM handler, installed before anything is fetched: the mover runs as PID 1 in its
/// container, where a signal without a handler is ignored, so a deleted copy Pod would run on
/// (and write into the store) until the kubelet's SIGKILL at the end of the grace period.
fn sigterm() -> Option<Signal> {
    match signal(SignalKind::terminate()) {
        Ok(handler) => Some(handler),
        Err(e) => {
            warn!("no SIGTERM handler (the copy stops only when killed): {e}");
            None
        }
    }
}

/// Resolves when SIGTERM arrives; never without a handler.
async fn terminated(handler: &mut Option<Signal>) {
    match handler {
        Some(handler) => {
            handler.recv().await;
            info!("SIGTERM: stopping the copy");
        }
        None => std::future::pending().await,
    }
}

async fn copy_into_place(
    args: &CopyArgs,
    source: &source::Source,
    meta: &object_store::ObjectMeta,
    partial: &Partial,
    mut progress: impl AsyncFnMut(Front, Option<u64>),
) -> Result<Transferred, CopyError> {
    let done = download(args, source, meta, partial, &mut progress).await?;
    publish(args, &partial.folder, done)
}

/// Checks the copy against the expected checksum and renames it into place through the store
/// folder (which syncs both folders so the rename survives a crash).
fn publish(
    args: &CopyArgs,
    folder: &StoreFolder,
    done: Transferred,
) -> Result<Transferred, CopyError> {
    if let Some(expected) = &args.checksum
        && *expected != done.checksum
    {
        return Err(CopyError::ChecksumMismatch {
            expected: expected.clone(),
            actual: done.checksum,
        });
    }
    folder.publish(args.attempt)?;
    Ok(done)
}

/// Where one attempt lands: its partial file in the store folder. Cheap to clone, so a blocking
/// writer thread (the OCI unpacker) can own one.
#[derive(Clone)]
pub(crate) struct Partial {
    pub(crate) folder: Arc<StoreFolder>,
    pub(crate) attempt: u32,
}

impl Partial {
    /// Creates the partial file, empty, for reading and writing.
    pub(crate) fn create(&self) -> Result<std::fs::File, CopyError> {
        self.folder.create_partial(self.attempt)
    }

    /// Its path, for messages.
    pub(crate) fn path(&self) -> PathBuf {
        self.folder.partial_path(self.attempt)
    }

    /// Removes what earlier attempts left, before a copy that cannot resume it (one stream, an
    /// OCI pull) starts from zero: only the ranged path takes a partial file over.
    pub(crate) fn drop_earlier_attempts(&self) -> Result<(), CopyError> {
        self.folder
            .remove_partials_up_to(self.attempt.saturating_sub(1))
    }
}

/// Downloads in parts when the source allows it, else as one stream. Either way no more than
/// `meta.size` (what the HEAD announced and the store reserved) is accepted from the source.
async fn download(
    args: &CopyArgs,
    source: &source::Source,
    meta: &object_store::ObjectMeta,
    partial: &Partial,
    progress: &mut impl AsyncFnMut(Front, Option<u64>),
) -> Result<Transferred, CopyError> {
    let tuning = Tuning {
        streams: args.streams,
        part_size: args.part_size,
    };
    let parallel = ranged::transfer(source, meta, partial, tuning, async |front, total| {
        progress(front, Some(total)).await;
    })
    .await?;
    match parallel {
        ranged::Outcome::Done(done) => {
            info!(
                streams = args.streams,
                part_size = args.part_size,
                "copied in parts"
            );
            Ok(done)
        }
        ranged::Outcome::SingleStream(why) => {
            info!("copying as one stream: {why}");
            partial.drop_earlier_attempts()?;
            transfer::transfer(source, meta.size, partial, async |bytes, total| {
                let front = Front {
                    hashed: bytes,
                    landed: bytes,
                    ..Front::default()
                };
                progress(front, total).await;
            })
            .await
        }
    }
}

/// Removes a cache's data: the final file and every partial file of any attempt of this cache.
pub async fn run_remove(args: RemoveArgs) -> Result<(), CopyError> {
    StoreFolder::open(&args.dest)?.remove_all()
}
