//! The mover's failures: one enum, each variant a line a user can act on, and how a store or
//! source error becomes one.

use std::path::{Path, PathBuf};

use crate::address;

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
    #[error(
        "{source_name} sent nothing for {seconds} s after {got} bytes: the source stalled, so this attempt stops (the limit is the copy's --stall-seconds)"
    )]
    Stalled {
        source_name: String,
        got: u64,
        seconds: u64,
    },
    #[error(
        "stopped by SIGTERM (the copy's Pod is being deleted, or its node drained) before the copy was done"
    )]
    Terminated,
    #[error(
        "the store granted {granted} bytes of room to this attempt, but the source is {size} bytes: nothing is written (the room was asked for with another size)"
    )]
    RoomTooSmall { size: u64, granted: u64 },
    #[error(
        "{source_name} holds a tar {kind} header of {size} bytes, over the {limit}-byte limit: the containerDisk layer is refused before the header is read"
    )]
    TarHeaderTooLarge {
        source_name: String,
        kind: &'static str,
        size: u64,
        limit: u64,
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
    #[error(
        "the staged file {path} holds {size} bytes, not the cache's {expected}: it changed after the copy, so no volume is filled from it"
    )]
    StagedFileChanged {
        path: PathBuf,
        size: u64,
        expected: u64,
    },
    #[error(
        "{path} reads back with {actual}, not the cache's {expected}: the volume is not filled"
    )]
    FilledVolumeMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path} holds {capacity} bytes, less than the template's {size}")]
    VolumeTooSmall {
        path: PathBuf,
        capacity: u64,
        size: u64,
    },
}

impl CopyError {
    pub(crate) fn from_source(display: &str, error: object_store::Error) -> Self {
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

pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub(crate) fn io_error(path: &Path, source: std::io::Error) -> CopyError {
    if source.kind() == std::io::ErrorKind::StorageFull {
        return CopyError::StoreFull(path.to_owned());
    }
    CopyError::Io {
        path: path.to_owned(),
        source,
    }
}
