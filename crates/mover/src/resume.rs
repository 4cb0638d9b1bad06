//! Resume across attempts: a copy killed halfway (its Pod evicted, OOM-killed, its node gone)
//! leaves its partial file, and the next attempt keeps what was verified instead of fetching
//! 50 GiB again.
//!
//! While a parallel download runs, the mover records beside its partial file
//! (`.partial/<cache>-<attempt>.resume`, see `folder`) how far the file is verified in offset
//! order and which version of which source it holds (URL or `s3://bucket/key`, size, ETag, S3
//! version). The record is written only after the bytes it covers are synced, and whole or not
//! at all, so after a crash it never claims more than the disk holds.
//!
//! The next attempt takes the newest such file over when its record names the very version the
//! HEAD sees now (every part it fetches is then a conditional read of that version, `If-Match`),
//! re-hashes the verified prefix from disk and fetches only the rest. Anything else (no record,
//! another version, a record that does not parse or claims more than the file holds, a link, a
//! hard link) means a clean start, and the file is removed.
//!
//! The record is not trusted: a Pod of the namespace can write it. It names no path (the file it
//! covers is the one beside it, reached through `folder`'s primitives like every other), it only
//! says where to start fetching, and every byte of the file, taken over or fetched, goes through
//! the final SHA-256: with `spec.checksum` set a bad prefix fails the attempt, and a failed
//! attempt's file is removed, so the next one starts clean.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::folder::StoreFolder;
use crate::{CopyError, Partial, io_error};

/// Largest record read: a few hundred bytes in practice.
const RECORD_LIMIT: usize = 4096;

/// The record's layout; a record of another layout is not used.
const FORMAT: u32 = 1;

/// Which version of which source a partial file holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Identity {
    /// The URL (without credentials) or `s3://bucket/key`.
    pub source: String,
    pub size: u64,
    /// The strong ETag every part is conditional on.
    pub e_tag: Option<String>,
    /// S3's `versionId`, when the bucket keeps versions.
    pub version: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Record {
    format: u32,
    identity: Identity,
    /// Bytes from offset 0 that are synced and were hashed in order.
    verified: u64,
}

/// An earlier attempt's partial file, now this attempt's: its first `verified` bytes are the
/// source's, as far as its record says.
pub struct TakenOver {
    pub file: File,
    pub verified: u64,
}

/// Takes over the newest partial file an earlier attempt (or this attempt, run before) left of
/// the same version of the source, and removes every other one of this cache's attempts up to
/// this one.
pub fn take_over(partial: &Partial, identity: &Identity) -> Result<Option<TakenOver>, CopyError> {
    let folder = &partial.folder;
    let mut taken = None;
    for earlier in folder.attempts_left_behind(partial.attempt)? {
        if taken.is_none()
            && let Some(verified) = usable_record(folder, earlier, identity)?
            && let Some(file) = folder.take_over_partial(earlier, partial.attempt)?
        {
            let len = file
                .metadata()
                .map_err(|e| io_error(&partial.path(), e))?
                .len();
            if len == identity.size {
                info!(
                    attempt = earlier,
                    verified, "taking over the partial file of an earlier attempt"
                );
                taken = Some(TakenOver { file, verified });
                continue;
            }
            warn!(
                len,
                "the partial file is not the size of the source: starting clean"
            );
            drop(file);
            folder.remove_partial(partial.attempt)?;
            continue;
        }
        folder.remove_partial(earlier)?;
    }
    Ok(taken)
}

/// Whether a failed attempt's partial file stays for the next attempt: when the source broke
/// off or stalled, or the mover was told to stop (the link or the Pod, not the data, failed),
/// and the file has a resume record. Any other failure (a checksum that does not match, a
/// source that changed, a full store) would meet the same bytes again.
pub fn worth_keeping(partial: &Partial, error: &CopyError) -> bool {
    matches!(
        error,
        CopyError::Truncated { .. }
            | CopyError::Source(..)
            | CopyError::Stalled { .. }
            | CopyError::Terminated
    ) && partial
        .folder
        .read_resume(partial.attempt, RECORD_LIMIT)
        .is_ok_and(|record| record.is_some())
}

/// The verified length `attempt`'s record gives, if it describes `identity` and is sound.
fn usable_record(
    folder: &StoreFolder,
    attempt: u32,
    identity: &Identity,
) -> Result<Option<u64>, CopyError> {
    let Some(bytes) = folder.read_resume(attempt, RECORD_LIMIT)? else {
        return Ok(None);
    };
    let record = match serde_json::from_slice::<Record>(&bytes) {
        Ok(record) => record,
        Err(error) => {
            warn!(
                attempt,
                "the resume record does not parse ({error}): starting clean"
            );
            return Ok(None);
        }
    };
    if record.format != FORMAT || record.identity != *identity {
        info!(
            attempt,
            "the partial file holds another version of the source: starting clean"
        );
        return Ok(None);
    }
    Ok((record.verified > 0 && record.verified <= identity.size).then_some(record.verified))
}

/// Hashes the first `len` bytes of `file`, counting them in `done` as it goes.
pub fn rehash(file: &File, len: u64, done: &AtomicU64) -> std::io::Result<Sha256> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buffer.len() as u64) as usize;
        file.read_exact_at(&mut buffer[..n], at)?;
        hasher.update(&buffer[..n]);
        at += n as u64;
        done.store(at, Ordering::Relaxed);
    }
    Ok(hasher)
}

/// Writes the resume record of one attempt's partial file.
pub struct Recorder {
    folder: Arc<StoreFolder>,
    attempt: u32,
    identity: Identity,
    /// The partial file, synced before each record.
    file: File,
}

impl Recorder {
    pub fn new(partial: &Partial, identity: Identity, file: &File) -> std::io::Result<Self> {
        Ok(Self {
            folder: Arc::clone(&partial.folder),
            attempt: partial.attempt,
            identity,
            file: file.try_clone()?,
        })
    }

    /// Records that the first `verified` bytes are the source's, once they are on disk. Call
    /// it with bytes already written: the sync covers what was written before it started.
    pub fn record(&self, verified: u64) -> Result<(), CopyError> {
        let path = self.folder.resume_path(self.attempt);
        self.file.sync_data().map_err(|e| io_error(&path, e))?;
        let record = Record {
            format: FORMAT,
            identity: self.identity.clone(),
            verified,
        };
        let bytes =
            serde_json::to_vec(&record).map_err(|e| io_error(&path, std::io::Error::other(e)))?;
        self.folder.write_resume(self.attempt, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            source: "http://mirror/disk.img".into(),
            size: 1000,
            e_tag: Some("\"v1\"".into()),
            version: None,
        }
    }

    struct Store {
        _dir: tempfile::TempDir,
        root: std::path::PathBuf,
    }

    fn store() -> Store {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("team-a");
        std::fs::create_dir(&root).expect("namespace folder");
        Store { _dir: dir, root }
    }

    fn partial(store: &Store, attempt: u32) -> Partial {
        let folder = StoreFolder::open(&store.root.join("img")).expect("open");
        Partial {
            folder: Arc::new(folder),
            attempt,
        }
    }

    /// Attempt 1's partial file of `len` bytes, with a record of `verified` bytes of `id`.
    fn left_by_attempt_one(store: &Store, len: u64, id: &Identity, verified: u64) {
        let first = partial(store, 1);
        let file = first.create().expect("partial");
        file.set_len(len).expect("size");
        Recorder::new(&first, id.clone(), &file)
            .expect("recorder")
            .record(verified)
            .expect("record");
    }

    fn files(store: &Store) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(store.root.join(".partial"))
            .expect("partials")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_next_attempt_takes_over_a_file_of_the_same_version() {
        let store = store();
        left_by_attempt_one(&store, 1000, &identity(), 600);
        assert_eq!(files(&store), ["img-1", "img-1.resume"]);
        let taken = take_over(&partial(&store, 2), &identity())
            .expect("take over")
            .expect("resumed");
        assert_eq!(taken.verified, 600);
        assert_eq!(files(&store), ["img-2", "img-2.resume"]);
    }

    #[test]
    fn another_version_a_bad_record_or_a_wrong_size_starts_clean_and_removes_the_file() {
        let other_version = Identity {
            e_tag: Some("\"v2\"".into()),
            ..identity()
        };
        let other_source = Identity {
            source: "http://mirror/other.img".into(),
            ..identity()
        };
        let cases: [(&str, u64, Identity, u64); 4] = [
            ("another ETag", 1000, other_version, 600),
            ("another source", 1000, other_source, 600),
            ("verified past the end", 1000, identity(), 1001),
            ("a file of another size", 999, identity(), 600),
        ];
        for (case, len, recorded, verified) in cases {
            let store = store();
            left_by_attempt_one(&store, len, &recorded, verified);
            let taken = take_over(&partial(&store, 2), &identity()).expect("take over");
            assert!(taken.is_none(), "{case}");
            assert_eq!(files(&store), Vec::<String>::new(), "{case}");
        }
    }

    #[test]
    fn a_record_that_is_not_a_record_starts_clean() {
        for record in [
            b"not json".to_vec(),
            br#"{"format":1,"identity":{"source":"http://mirror/disk.img","size":1000,"eTag":"\"v1\"","version":null},"verified":600,"path":"/etc/passwd"}"#.to_vec(),
            vec![b' '; RECORD_LIMIT + 1],
        ] {
            let store = store();
            left_by_attempt_one(&store, 1000, &identity(), 600);
            std::fs::write(store.root.join(".partial/img-1.resume"), &record).expect("craft");
            assert!(take_over(&partial(&store, 2), &identity()).expect("take over").is_none());
            assert_eq!(files(&store), Vec::<String>::new());
        }
    }

    #[test]
    fn a_link_or_a_hard_link_as_the_old_partial_is_removed_never_written_through() {
        let store = store();
        let victim = store.root.parent().expect("store").join("victim");
        std::fs::write(&victim, vec![7u8; 1000]).expect("victim");
        left_by_attempt_one(&store, 1000, &identity(), 600);
        std::fs::remove_file(store.root.join(".partial/img-1")).expect("unlink");
        std::os::unix::fs::symlink(&victim, store.root.join(".partial/img-1")).expect("link");
        assert!(
            take_over(&partial(&store, 2), &identity())
                .expect("take over")
                .is_none()
        );
        assert_eq!(files(&store), Vec::<String>::new());

        let other_cache = store.root.join("other");
        std::fs::write(&other_cache, vec![9u8; 1000]).expect("other cache");
        left_by_attempt_one(&store, 1000, &identity(), 600);
        std::fs::remove_file(store.root.join(".partial/img-1")).expect("unlink");
        std::fs::hard_link(&other_cache, store.root.join(".partial/img-1")).expect("hard link");
        assert!(
            take_over(&partial(&store, 2), &identity())
                .expect("take over")
                .is_none()
        );
        assert_eq!(files(&store), Vec::<String>::new());
        assert_eq!(std::fs::read(&victim).expect("victim"), vec![7u8; 1000]);
        assert_eq!(std::fs::read(&other_cache).expect("other"), vec![9u8; 1000]);
    }

    #[test]
    fn a_fresh_partial_file_drops_the_record_of_the_file_it_replaces() {
        let store = store();
        left_by_attempt_one(&store, 1000, &identity(), 600);
        partial(&store, 1)
            .create()
            .expect("a new file for attempt 1");
        assert_eq!(files(&store), ["img-1"]);
    }
}
