//! The data mover: what a copy Job runs. It knows nothing of controllers; it copies one template
//! into one path of a staging store and reports to the cache's status.
//!
//! A reader never sees a half copy: bytes go to `.partial/<cache>-<attempt>` beside the final
//! file, are hashed on the way, verified against the expected checksum, fsynced, and renamed
//! into place (then the folders are fsynced so the rename survives a crash). Every failure
//! removes the partial file.
//!
//! The store folder is shared with every Pod of the namespace, so nothing in it is trusted:
//! every path is reached without following a link (see `folder`), and no source may send more
//! than the size it announced, which is the room the store reserved.

pub mod address;
mod folder;
mod landing;
mod oci;
mod plan;
mod ranged;
mod report;
mod resume;
mod source;
mod transfer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

pub use oci::OCI_DOCKER_CONFIG;
pub use plan::{MIN_PARTS, Tuning};
pub use transfer::Transferred;

use folder::StoreFolder;
use landing::Front;

/// Failures of the data mover, each a single line a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    #[error("{0} does not exist (404 Not Found)")]
    NotFound(String),
    #[error("{0} refused our credentials (check the secretRef)")]
    AuthRefused(String),
    #[error("reading {0} failed: {1}")]
    Source(String, String),
    #[error("{0} changed size or content during the copy")]
    SourceChanged(String),
    #[error(
        "{source_name} changed during the copy ({detail}); the attempt stops rather than splice two versions into one file"
    )]
    ChangedMidCopy { source_name: String, detail: String },
    #[error("{source_name} ended after {got} of {expected} bytes: {cause}")]
    Truncated {
        source_name: String,
        got: u64,
        expected: u64,
        cause: String,
    },
    #[error("checksum mismatch: expected {expected}, the source has {actual}")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("the staging store is full: {0} does not fit")]
    StoreFull(PathBuf),
    #[error(
        "{source_name} sent more than the {announced} bytes it announced (the room the store reserved for it); the copy stops there"
    )]
    SentMoreThanAnnounced { source_name: String, announced: u64 },
    #[error(
        "{path} is a symbolic link or lies under one: the mover never follows a link in the store, so this copy stops (remove the link)"
    )]
    LinkInStore { path: PathBuf },
    #[error("{path} is not a regular file: the cache's name is taken by something else")]
    NotAFile { path: PathBuf },
    #[error(
        "this kernel has no openat2 (Linux 5.6 or newer): the mover cannot open store paths without following links, so it does not copy"
    )]
    NoSafeOpen,
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the copy is in place but its report could not be written: {0}")]
    Report(String),
    #[error("stopped before copying: the digest the tag resolved to could not be recorded: {0}")]
    DigestNotRecorded(String),
    #[error("stopped before copying: {0}")]
    Superseded(String),
    #[error(
        "{what} has digest {actual}, not {expected}: the registry sent other bytes than it names"
    )]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{reference} is an index without a {wanted} manifest (it offers {offered})")]
    NoMatchingPlatform {
        reference: String,
        wanted: String,
        offered: String,
    },
    #[error("{reference} has no file {file} (it holds: {candidates})")]
    FileMissing {
        reference: String,
        file: String,
        candidates: String,
    },
    #[error("{reference} holds several files ({candidates}): name one in spec.source.oci.file")]
    SeveralFiles {
        reference: String,
        candidates: String,
    },
    #[error("{0}")]
    AddressRefused(#[from] address::AddressRefused),
}

impl CopyError {
    fn from_source(display: &str, error: object_store::Error) -> Self {
        if let Some(refused) = address::guard::refusal_in(&error) {
            return CopyError::AddressRefused(refused);
        }
        match error {
            object_store::Error::NotFound { .. } => CopyError::NotFound(display.to_owned()),
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => {
                CopyError::AuthRefused(display.to_owned())
            }
            object_store::Error::Precondition { .. } => {
                CopyError::SourceChanged(display.to_owned())
            }
            other => CopyError::Source(display.to_owned(), one_line(&other.to_string())),
        }
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Arguments of `templatecache copy`.
#[derive(clap::Args, Debug, Clone)]
pub struct CopyArgs {
    /// The cache to report to, `<namespace>/<name>`; no reports when unset (benchmarks).
    #[arg(long)]
    pub cache: Option<String>,
    /// The attempt this copy belongs to.
    #[arg(long)]
    pub attempt: u32,
    /// No attempt follows this one: a failure leaves no partial file, of this attempt or of
    /// an earlier one, since no later attempt would resume it.
    #[arg(long)]
    pub final_attempt: bool,
    /// Final path of the copy inside the mounted store.
    #[arg(long)]
    pub dest: PathBuf,
    /// Source URL (http or https).
    #[arg(long, conflicts_with_all = ["s3_bucket", "oci_reference"])]
    pub http_url: Option<String>,
    /// OCI reference, `registry/repository:tag` or `...@sha256:<hex>`.
    #[arg(long, conflicts_with_all = ["s3_bucket"])]
    pub oci_reference: Option<String>,
    /// The ORAS layer title, or the file under `disk/` of a containerDisk, to stage.
    #[arg(long, requires = "oci_reference")]
    pub oci_file: Option<String>,
    /// The manifest digest an earlier attempt resolved the reference's tag to: pulled instead of
    /// the tag, so every attempt stages the same version.
    #[arg(long, requires = "oci_reference")]
    pub oci_digest: Option<String>,
    /// Talk to the registry over plain HTTP (a registry the operator lists as served without TLS).
    #[arg(long, requires = "oci_reference")]
    pub oci_plain_http: bool,
    /// Source bucket (S3-compatible).
    #[arg(long, requires = "s3_key")]
    pub s3_bucket: Option<String>,
    /// Source object key.
    #[arg(long, requires = "s3_bucket")]
    pub s3_key: Option<String>,
    /// S3 endpoint, `http(s)://host[:port]`.
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long)]
    pub s3_region: Option<String>,
    /// Address the bucket as `bucket.endpoint` instead of `endpoint/bucket`.
    #[arg(long)]
    pub s3_virtual_host: bool,
    /// Expected digest, `sha256:<hex>`.
    #[arg(long)]
    pub checksum: Option<String>,
    /// Ranged GETs of one object in flight at once (HTTP(S) and S3); 1 reads it as one stream.
    #[arg(long, default_value_t = DEFAULT_STREAMS, env = "TEMPLATECACHE_COPY_STREAMS",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub streams: u16,
    /// Size of each ranged GET, in bytes or with a binary suffix (`16Mi`, `512Ki`, `1Gi`).
    /// Objects under four parts are read as one stream.
    #[arg(long, default_value = "16Mi", env = "TEMPLATECACHE_COPY_PART_SIZE",
          value_parser = parse_part_size)]
    pub part_size: u64,
    /// Internal destinations the source may be at, comma-separated or repeated: networks
    /// (`10.96.0.0/12`), addresses (`10.96.0.10`) or address:port (`10.96.0.10:9000`). Every
    /// other loopback, link-local, private or otherwise non-global address is refused.
    #[arg(long, value_delimiter = ',')]
    pub allow_internal_address: Vec<address::AllowedInternal>,
}

/// Part size unless told otherwise: AWS's guidance is 8 to 16 MiB ranges.
pub const DEFAULT_PART_SIZE: u64 = 16 << 20;

/// Streams of a copy unless told otherwise: AWS's guidance and the tools people use (rclone 4,
/// s5cmd 5, the AWS CLI 10) sit around it.
pub const DEFAULT_STREAMS: u16 = 8;

/// Smallest and largest part: under 64 KiB the requests cost more than they carry; over 1 GiB
/// a broken part costs too much to fetch again.
const PART_SIZES: std::ops::RangeInclusive<u64> = (64 << 10)..=(1 << 30);

/// `16Mi`, `512Ki`, `1Gi` or a plain number of bytes.
pub fn parse_part_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit {
        "" => 0,
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        _ => {
            return Err(format!(
                "{text}: expected bytes, or a number with Ki, Mi or Gi"
            ));
        }
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{text}: not a size"))?;
    if !PART_SIZES.contains(&bytes) {
        return Err(format!("{text}: a part must be between 64Ki and 1Gi"));
    }
    Ok(bytes)
}

/// Arguments of `templatecache remove`.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoveArgs {
    /// Final path of the copy inside the mounted store; its partial files (in `.partial/`) go too.
    #[arg(long)]
    pub dest: PathBuf,
}

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
    let result = async {
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
    }
    .await;
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
            reporter.failed(copied, &error).await;
            Err(error)
        }
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
struct Partial {
    folder: Arc<StoreFolder>,
    attempt: u32,
}

impl Partial {
    /// Creates the partial file, empty, for reading and writing.
    fn create(&self) -> Result<std::fs::File, CopyError> {
        self.folder.create_partial(self.attempt)
    }

    /// Its path, for messages.
    fn path(&self) -> PathBuf {
        self.folder.partial_path(self.attempt)
    }

    /// Removes what earlier attempts left, before a copy that cannot resume it (one stream, an
    /// OCI pull) starts from zero: only the ranged path takes a partial file over.
    fn drop_earlier_attempts(&self) -> Result<(), CopyError> {
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

fn io_error(path: &Path, source: std::io::Error) -> CopyError {
    if source.kind() == std::io::ErrorKind::StorageFull {
        return CopyError::StoreFull(path.to_owned());
    }
    CopyError::Io {
        path: path.to_owned(),
        source,
    }
}
