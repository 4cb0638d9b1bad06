//! The data mover: what a copy Job runs. It knows nothing of controllers; it copies one template
//! into one path of a staging store and reports to the cache's status.

use std::path::{Path, PathBuf};

/// Failures of the data mover, each a single line a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Arguments of `templatecache copy`.
#[derive(clap::Args, Debug, Clone)]
pub struct CopyArgs {
    /// The cache to report to, `<namespace>/<name>`.
    #[arg(long)]
    pub cache: String,
    /// The attempt this copy belongs to.
    #[arg(long)]
    pub attempt: u32,
    /// Final path of the copy inside the mounted store.
    #[arg(long)]
    pub dest: PathBuf,
    /// Source URL (http or https).
    #[arg(long, conflicts_with_all = ["s3_bucket"])]
    pub http_url: Option<String>,
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
}

/// Arguments of `templatecache remove`.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoveArgs {
    /// Final path of the copy inside the mounted store; partial files beside it go too.
    #[arg(long)]
    pub dest: PathBuf,
}

/// Copies the template. Not yet the real mover: it validates its arguments and writes a marker.
pub async fn run_copy(args: CopyArgs) -> Result<(), CopyError> {
    if args.http_url.is_none() && args.s3_bucket.is_none() {
        return Err(CopyError::InvalidArguments(
            "one of --http-url or --s3-bucket is required".into(),
        ));
    }
    write_file(&args.dest, b"placeholder").await
}

/// Removes a cache's data: the final file and every partial file of any attempt.
pub async fn run_remove(args: RemoveArgs) -> Result<(), CopyError> {
    remove_if_present(&args.dest).await?;
    let (Some(dir), Some(name)) = (args.dest.parent(), args.dest.file_name()) else {
        return Ok(());
    };
    let prefix = format!("{}.partial-", name.to_string_lossy());
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(io_error(dir, source)),
    };
    while let Some(entry) = entries.next_entry().await.map_err(|e| io_error(dir, e))? {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            remove_if_present(&entry.path()).await?;
        }
    }
    Ok(())
}

async fn remove_if_present(path: &Path) -> Result<(), CopyError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(io_error(path, source)),
    }
}

async fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CopyError> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| io_error(dir, e))?;
    }
    tokio::fs::write(path, bytes)
        .await
        .map_err(|e| io_error(path, e))
}

fn io_error(path: &Path, source: std::io::Error) -> CopyError {
    CopyError::Io {
        path: path.to_owned(),
        source,
    }
}
