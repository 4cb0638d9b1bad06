//! The mover's and the remover's only way into the staging store.
//!
//! A copy Job mounts its namespace's folder of the store, and every Pod of that namespace that
//! mounts it may have planted anything there: a symbolic link at a cache name, at the partial
//! folder or at a partial file, pointing into another tenant's folder or anywhere else. So the
//! folder is opened once, and every name under it is reached from that handle: opened with
//! `openat2` and `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, created with `mkdirat`, published with
//! `renameat`, removed with `unlinkat`. A link on the way makes the operation fail with the path
//! named; nothing is ever written, renamed or removed through one.
//!
//! Partial files live in `.partial/<cache>-<attempt>` beside the caches. A cache name is a DNS
//! name and never starts with a dot, so no cache can be named like the partial folder or
//! anything in it (`<cache>.partial-<attempt>` could: it is a legal cache name), and the folder
//! is on the same filesystem, so publishing stays one atomic rename.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::CopyError;

/// The folder of partial files, beside the caches.
pub const PARTIAL_FOLDER: &str = ".partial";

/// The name of the partial file of `attempt` of `cache` in [`PARTIAL_FOLDER`].
pub fn partial_name(cache: &str, attempt: u32) -> String {
    format!("{cache}-{attempt}")
}

/// The resume record of a partial file, beside it: `<cache>-<attempt>.resume` (see `resume`).
/// A cache name never holds `.resume` after `-<digits>`, so it names no other cache's file.
const RESUME_SUFFIX: &str = ".resume";

/// The resume record being written, renamed over [`RESUME_SUFFIX`] once it is whole.
const RESUME_NEW_SUFFIX: &str = ".resume.new";

/// Which cache a partial file (or its resume record) belongs to. The attempt follows the last
/// `-` and is only digits, so `img-1-2` is attempt 2 of cache `img-1`, never a file of cache
/// `img`.
pub fn partial_owner(file: &str) -> Option<&str> {
    partial_of(file).map(|(cache, _)| cache)
}

/// The cache and attempt a partial file or its resume record belongs to.
fn partial_of(file: &str) -> Option<(&str, u32)> {
    let data = [RESUME_NEW_SUFFIX, RESUME_SUFFIX]
        .iter()
        .find_map(|suffix| file.strip_suffix(suffix))
        .unwrap_or(file);
    let (cache, attempt) = data.rsplit_once('-')?;
    let digits = !attempt.is_empty() && attempt.bytes().all(|b| b.is_ascii_digit());
    if !digits || cache.is_empty() {
        return None;
    }
    // More digits than an attempt has: still this cache's file (the remover takes it), but no
    // attempt to resume from.
    Some((cache, attempt.parse().unwrap_or(u32::MAX)))
}

/// The store folder a copy's `--dest` lies in, opened, and the cache's name in it.
pub struct StoreFolder {
    dir: OwnedFd,
    path: PathBuf,
    cache: String,
}

impl StoreFolder {
    /// Opens the folder holding `dest`. The folder itself is the Job's mount of its namespace's
    /// folder (created by the kubelet, not by a tenant), so it is opened by its path; only its
    /// last component must not be a link. `dest`'s file name must be a cache name: one
    /// component, not starting with a dot.
    pub fn open(dest: &Path) -> Result<Self, CopyError> {
        let cache = dest
            .file_name()
            .and_then(|name| name.to_str())
            .filter(|name| !name.starts_with('.') && !name.contains('/'))
            .ok_or_else(|| {
                CopyError::InvalidArguments(format!(
                    "--dest {} does not end in a cache name",
                    dest.display()
                ))
            })?
            .to_owned();
        let path = match dest.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&path).map_err(|e| crate::io_error(&path, e))?;
        // Not O_DIRECTORY: with O_NOFOLLOW it reports a link as "not a directory", and a link
        // should be named as one (ELOOP).
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let dir =
            rustix::fs::open(&path, flags, Mode::empty()).map_err(|errno| refusal(&path, errno))?;
        let stat = rustix::fs::fstat(&dir).map_err(|errno| refusal(&path, errno))?;
        if !rustix::fs::FileType::from_raw_mode(stat.st_mode).is_dir() {
            return Err(refusal(&path, Errno::NOTDIR));
        }
        Ok(Self { dir, path, cache })
    }

    /// The cache's final file, for messages.
    pub fn final_path(&self) -> PathBuf {
        self.path.join(&self.cache)
    }

    /// The partial file of `attempt`, for messages.
    pub fn partial_path(&self, attempt: u32) -> PathBuf {
        self.path
            .join(PARTIAL_FOLDER)
            .join(partial_name(&self.cache, attempt))
    }

    /// The cache's final file, open for reading: a regular file, reached without a link.
    pub fn open_final(&self) -> Result<File, CopyError> {
        let path = self.final_path();
        let flags = OFlags::RDONLY | OFlags::CLOEXEC;
        let file = open_beneath(&self.dir, &self.cache, flags, Mode::empty())
            .map_err(|errno| refusal(&path, errno))?;
        let stat = rustix::fs::fstat(&file).map_err(|errno| refusal(&path, errno))?;
        if !rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file() {
            return Err(CopyError::NotAFile { path });
        }
        Ok(File::from(file))
    }

    /// Fails if something other than a regular file (or nothing) holds the cache's name: a link
    /// planted there would be replaced by the rename, never written through, but it says
    /// someone is playing with the folder, and the copy stops before fetching a byte.
    pub fn check_final(&self) -> Result<(), CopyError> {
        let path = self.final_path();
        match rustix::fs::statat(&self.dir, &*self.cache, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) if rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file() => Ok(()),
            Ok(stat) if rustix::fs::FileType::from_raw_mode(stat.st_mode).is_symlink() => {
                Err(CopyError::LinkInStore { path })
            }
            Ok(_) => Err(CopyError::NotAFile { path }),
            Err(Errno::NOENT) => Ok(()),
            Err(errno) => Err(refusal(&path, errno)),
        }
    }

    /// Creates the partial file of `attempt`, new and empty, for reading and writing, making
    /// the partial folder if needed. A file already there (a broken attempt's, or a hard link
    /// someone planted to another file) is unlinked, never truncated; a link there fails. Its
    /// resume record goes first: it described the file this one replaces.
    pub fn create_partial(&self, attempt: u32) -> Result<File, CopyError> {
        let partials = self
            .partial_folder(true)?
            .ok_or_else(|| refusal(&self.path.join(PARTIAL_FOLDER), Errno::NOENT))?;
        self.remove_resume_records(&partials, attempt)?;
        let name = partial_name(&self.cache, attempt);
        let path = self.partial_path(attempt);
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC;
        let fresh = || open_beneath(&partials, &name, flags, Mode::from_raw_mode(0o644));
        let file = match fresh() {
            Err(Errno::EXIST) => {
                // A link there was planted: say so rather than quietly replace it.
                let held = rustix::fs::statat(&partials, &*name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|errno| refusal(&path, errno))?;
                if rustix::fs::FileType::from_raw_mode(held.st_mode).is_symlink() {
                    return Err(CopyError::LinkInStore { path });
                }
                unlink_if_present(&partials, &name).map_err(|errno| refusal(&path, errno))?;
                fresh()
            }
            other => other,
        }
        .map_err(|errno| refusal(&path, errno))?;
        Ok(File::from(file))
    }

    /// Moves the partial file of `attempt` into the cache's name, then syncs both folders so
    /// the rename survives a crash.
    pub fn publish(&self, attempt: u32) -> Result<(), CopyError> {
        self.check_final()?;
        let partials = self
            .partial_folder(false)?
            .ok_or_else(|| refusal(&self.partial_path(attempt), Errno::NOENT))?;
        let name = partial_name(&self.cache, attempt);
        rustix::fs::renameat(&partials, &*name, &self.dir, &*self.cache)
            .map_err(|errno| refusal(&self.final_path(), errno))?;
        rustix::fs::fsync(&self.dir).map_err(|errno| refusal(&self.path, errno))?;
        rustix::fs::fsync(&partials)
            .map_err(|errno| refusal(&self.path.join(PARTIAL_FOLDER), errno))?;
        // The copy is in place; a record left behind (the remove failed) names no file, and the
        // next copy of this cache removes it.
        if let Err(error) = self.remove_resume_records(&partials, attempt) {
            tracing::warn!("the resume record stays: {error}");
        }
        Ok(())
    }

    /// Removes the partial file of `attempt` and its resume record, if there are any.
    pub fn remove_partial(&self, attempt: u32) -> Result<(), CopyError> {
        let Some(partials) = self.partial_folder(false)? else {
            return Ok(());
        };
        self.remove_resume_records(&partials, attempt)?;
        let name = partial_name(&self.cache, attempt);
        unlink_if_present(&partials, &name).map_err(|e| refusal(&self.partial_path(attempt), e))
    }

    /// Removes the partial files and resume records of every attempt of this cache up to
    /// `attempt`.
    pub fn remove_partials_up_to(&self, attempt: u32) -> Result<(), CopyError> {
        for earlier in self.attempts_left_behind(attempt)? {
            self.remove_partial(earlier)?;
        }
        Ok(())
    }

    /// The name of `attempt`'s resume record ([`RESUME_SUFFIX`]) or of the record being
    /// written ([`RESUME_NEW_SUFFIX`]) in [`PARTIAL_FOLDER`].
    fn record_name(&self, attempt: u32, suffix: &str) -> String {
        format!("{}{suffix}", partial_name(&self.cache, attempt))
    }

    /// The resume record of `attempt`, for messages.
    pub fn resume_path(&self, attempt: u32) -> PathBuf {
        let name = self.record_name(attempt, RESUME_SUFFIX);
        self.path.join(PARTIAL_FOLDER).join(name)
    }

    /// Attempts of this cache up to `attempt` that left a partial file or a resume record,
    /// newest first.
    pub fn attempts_left_behind(&self, attempt: u32) -> Result<Vec<u32>, CopyError> {
        let Some(partials) = self.partial_folder(false)? else {
            return Ok(vec![]);
        };
        let folder = self.path.join(PARTIAL_FOLDER);
        let entries = rustix::fs::Dir::read_from(&partials).map_err(|e| refusal(&folder, e))?;
        let mut found = vec![];
        for entry in entries {
            let entry = entry.map_err(|e| refusal(&folder, e))?;
            let name = entry.file_name().to_string_lossy();
            if let Some((cache, earlier)) = partial_of(&name)
                && cache == self.cache
                && earlier <= attempt
            {
                found.push(earlier);
            }
        }
        found.sort_unstable_by(|a, b| b.cmp(a));
        found.dedup();
        Ok(found)
    }

    /// The resume record of `attempt`, at most `limit` bytes: `None` when there is none, or
    /// when what holds its name is not a regular file of at most that size (a link is never
    /// followed; it is no record).
    pub fn read_resume(&self, attempt: u32, limit: usize) -> Result<Option<Vec<u8>>, CopyError> {
        let Some(partials) = self.partial_folder(false)? else {
            return Ok(None);
        };
        let name = self.record_name(attempt, RESUME_SUFFIX);
        let path = self.resume_path(attempt);
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let file = match open_beneath(&partials, &name, flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(Errno::NOENT | Errno::LOOP | Errno::XDEV) => return Ok(None),
            Err(errno) => return Err(refusal(&path, errno)),
        };
        let meta = file.metadata().map_err(|e| crate::io_error(&path, e))?;
        if !meta.is_file() || meta.len() > limit as u64 {
            return Ok(None);
        }
        let mut bytes = Vec::with_capacity(limit);
        std::io::Read::read_to_end(
            &mut std::io::Read::take(&file, limit as u64 + 1),
            &mut bytes,
        )
        .map_err(|e| crate::io_error(&path, e))?;
        Ok((bytes.len() <= limit).then_some(bytes))
    }

    /// Replaces the resume record of `attempt` with `record`, whole or not at all: written to a
    /// new file, synced, then renamed over the old one.
    pub fn write_resume(&self, attempt: u32, record: &[u8]) -> Result<(), CopyError> {
        let partials = self
            .partial_folder(false)?
            .ok_or_else(|| refusal(&self.path.join(PARTIAL_FOLDER), Errno::NOENT))?;
        let (new, done) = (
            self.record_name(attempt, RESUME_NEW_SUFFIX),
            self.record_name(attempt, RESUME_SUFFIX),
        );
        let path = self.resume_path(attempt);
        unlink_if_present(&partials, &new).map_err(|e| refusal(&path, e))?;
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC;
        let fd = open_beneath(&partials, &new, flags, Mode::from_raw_mode(0o644))
            .map_err(|e| refusal(&path, e))?;
        let mut file = File::from(fd);
        std::io::Write::write_all(&mut file, record).map_err(|e| crate::io_error(&path, e))?;
        file.sync_all().map_err(|e| crate::io_error(&path, e))?;
        rustix::fs::renameat(&partials, &*new, &partials, &*done).map_err(|e| refusal(&path, e))
    }

    /// Makes the partial file of `from` (an earlier attempt, or this one run again) the partial
    /// file of `to`, with its resume record, and opens it for reading and writing. `None` when
    /// `from` left no partial file, or left something that must not be written into: a link
    /// (never followed), anything but a regular file, or a file with another name elsewhere (a
    /// hard link: writing it would change that other file). Those are removed (the link
    /// itself, never its target), so the copy starts clean.
    pub fn take_over_partial(&self, from: u32, to: u32) -> Result<Option<File>, CopyError> {
        let Some(partials) = self.partial_folder(false)? else {
            return Ok(None);
        };
        let old = partial_name(&self.cache, from);
        let path = self.partial_path(from);
        let flags = OFlags::RDWR | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let file = match open_beneath(&partials, &old, flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::LOOP | Errno::XDEV) => {
                self.remove_partial(from)?;
                return Ok(None);
            }
            Err(errno) => return Err(refusal(&path, errno)),
        };
        let stat = rustix::fs::fstat(&file).map_err(|e| refusal(&path, e))?;
        if !rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file() || stat.st_nlink != 1 {
            drop(file);
            self.remove_partial(from)?;
            return Ok(None);
        }
        if from != to {
            self.remove_partial(to)?;
            let new = partial_name(&self.cache, to);
            rustix::fs::renameat(&partials, &*old, &partials, &*new)
                .map_err(|e| refusal(&path, e))?;
            let (old_record, new_record) = (
                self.record_name(from, RESUME_SUFFIX),
                self.record_name(to, RESUME_SUFFIX),
            );
            match rustix::fs::renameat(&partials, &*old_record, &partials, &*new_record) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(errno) => return Err(refusal(&self.resume_path(from), errno)),
            }
            self.remove_partial(from)?;
        }
        Ok(Some(file))
    }

    fn remove_resume_records(&self, partials: &OwnedFd, attempt: u32) -> Result<(), CopyError> {
        for suffix in [RESUME_SUFFIX, RESUME_NEW_SUFFIX] {
            unlink_if_present(partials, &self.record_name(attempt, suffix))
                .map_err(|e| refusal(&self.resume_path(attempt), e))?;
        }
        Ok(())
    }

    /// Removes the cache's data: its final file (a link there is removed itself, its target is
    /// left alone) and the partial files of every attempt of this cache, and of no other.
    pub fn remove_all(&self) -> Result<(), CopyError> {
        unlink_if_present(&self.dir, &self.cache)
            .map_err(|errno| refusal(&self.final_path(), errno))?;
        let Some(partials) = self.partial_folder(false)? else {
            return Ok(());
        };
        let folder = self.path.join(PARTIAL_FOLDER);
        let entries = rustix::fs::Dir::read_from(&partials).map_err(|e| refusal(&folder, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| refusal(&folder, e))?;
            let name = entry.file_name().to_string_lossy();
            if partial_owner(&name) == Some(self.cache.as_str()) {
                unlink_if_present(&partials, &name)
                    .map_err(|e| refusal(&folder.join(&*name), e))?;
            }
        }
        Ok(())
    }

    /// The partial folder, opened without following a link; made first when `create`, else
    /// `None` when it does not exist.
    fn partial_folder(&self, create: bool) -> Result<Option<OwnedFd>, CopyError> {
        let path = self.path.join(PARTIAL_FOLDER);
        if create {
            match rustix::fs::mkdirat(&self.dir, PARTIAL_FOLDER, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(errno) => return Err(refusal(&path, errno)),
            }
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        match open_beneath(&self.dir, PARTIAL_FOLDER, flags, Mode::empty()) {
            Ok(dir) => Ok(Some(dir)),
            Err(Errno::NOENT) if !create => Ok(None),
            Err(errno) => Err(refusal(&path, errno)),
        }
    }
}

/// Opens `name` under `dir`, refusing any symbolic link on the way and any path out of `dir`.
#[cfg(target_os = "linux")]
fn open_beneath(
    dir: &OwnedFd,
    name: &str,
    flags: OFlags,
    mode: Mode,
) -> rustix::io::Result<OwnedFd> {
    use rustix::fs::ResolveFlags;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    // RESOLVE_NO_SYMLINKS refuses a link as the last component too (ELOOP), even with O_CREAT.
    rustix::fs::openat2(dir, name, flags, mode, resolve)
}

/// Without `openat2` the mover cannot prove a path stays in the store, so it does not try.
#[cfg(not(target_os = "linux"))]
fn open_beneath(_: &OwnedFd, _: &str, _: OFlags, _: Mode) -> rustix::io::Result<OwnedFd> {
    Err(Errno::NOSYS)
}

fn unlink_if_present(dir: &OwnedFd, name: &str) -> rustix::io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(errno) => Err(errno),
    }
}

/// The error for `errno` met at `path`: a link (`ELOOP` under `RESOLVE_NO_SYMLINKS`, or
/// `O_NOFOLLOW`) or a way out of the folder (`EXDEV` under `RESOLVE_BENEATH`) is named as such.
fn refusal(path: &Path, errno: Errno) -> CopyError {
    match errno {
        Errno::LOOP | Errno::XDEV => CopyError::LinkInStore {
            path: path.to_owned(),
        },
        Errno::NOSYS => CopyError::NoSafeOpen,
        errno => crate::io_error(path, std::io::Error::from(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_file_belongs_to_exactly_one_cache() {
        assert_eq!(partial_owner(&partial_name("img", 1)), Some("img"));
        assert_eq!(partial_owner(&partial_name("img-1", 2)), Some("img-1"));
        assert_eq!(partial_owner(&partial_name("img", 12)), Some("img"));
        assert_eq!(
            partial_owner(&partial_name("img.partial", 1)),
            Some("img.partial")
        );
        assert_eq!(partial_owner("img-1.resume"), Some("img"));
        assert_eq!(partial_owner("img-1-2.resume.new"), Some("img-1"));
        assert_eq!(partial_of("img-12.resume"), Some(("img", 12)));
        for stray in [
            "img",
            "img-",
            "-1",
            "img-1a",
            "img-x",
            "img.resume",
            "img-1.resumed",
        ] {
            assert_eq!(partial_owner(stray), None, "{stray}");
        }
    }

    fn store() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("team-a");
        std::fs::create_dir(&root).expect("namespace folder");
        (dir, root)
    }

    #[test]
    fn a_copy_lands_in_the_partial_folder_and_is_published_under_its_name() {
        let (_dir, root) = store();
        let folder = StoreFolder::open(&root.join("img")).expect("open");
        std::io::Write::write_all(&mut folder.create_partial(3).expect("partial"), b"bytes")
            .expect("write");
        assert_eq!(
            std::fs::read(root.join(".partial/img-3")).expect("partial"),
            b"bytes"
        );
        folder.publish(3).expect("publish");
        assert_eq!(std::fs::read(root.join("img")).expect("final"), b"bytes");
        assert!(!root.join(".partial/img-3").exists());
    }

    #[test]
    fn removing_a_cache_removes_its_files_and_no_other_caches() {
        let (_dir, root) = store();
        std::fs::create_dir(root.join(".partial")).expect("partials");
        let files = [
            "img",
            "img.partial-1",
            "img-1",
            ".partial/img-1",
            ".partial/img-22",
            ".partial/img-22.resume",
            ".partial/img-22.resume.new",
            ".partial/img-1-1",
            ".partial/img-1-1.resume",
            ".partial/img.partial-1-1",
        ];
        for file in files {
            std::fs::write(root.join(file), file).expect("file");
        }
        StoreFolder::open(&root.join("img"))
            .expect("open")
            .remove_all()
            .expect("remove");
        let mut left: Vec<&str> = files
            .into_iter()
            .filter(|f| root.join(f).exists())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".partial/img-1-1",
                ".partial/img-1-1.resume",
                ".partial/img.partial-1-1",
                "img-1",
                "img.partial-1"
            ]
        );
    }

    /// A file outside the namespace's folder, and a link to it planted at `planted`.
    const VICTIMS_DATA: &[u8] = b"another tenant's data";

    fn plant(root: &Path, planted: &str) -> PathBuf {
        let victim = root.parent().expect("store").join("victim");
        std::fs::write(&victim, VICTIMS_DATA).expect("victim");
        std::os::unix::fs::symlink(&victim, root.join(planted)).expect("plant the link");
        victim
    }

    fn assert_untouched(victim: &Path) {
        assert_eq!(std::fs::read(victim).expect("victim"), VICTIMS_DATA);
    }

    #[test]
    fn a_link_at_the_cache_name_fails_the_copy_and_is_removed_without_its_target() {
        let (_dir, root) = store();
        let victim = plant(&root, "img");
        let folder = StoreFolder::open(&root.join("img")).expect("open");
        let error = folder.check_final().expect_err("refused");
        assert!(matches!(error, CopyError::LinkInStore { .. }), "{error}");
        assert!(
            error
                .to_string()
                .contains(&*root.join("img").to_string_lossy())
        );
        folder.create_partial(1).expect("partial");
        assert!(matches!(
            folder.publish(1),
            Err(CopyError::LinkInStore { .. })
        ));
        folder.remove_all().expect("remove");
        assert!(
            root.join("img").symlink_metadata().is_err(),
            "the link is gone"
        );
        assert_untouched(&victim);
    }

    #[test]
    fn a_link_as_the_partial_folder_or_a_partial_file_is_never_written_through() {
        let (_dir, root) = store();
        let outside = root.parent().expect("store").join("team-b");
        std::fs::create_dir(&outside).expect("team-b");
        std::os::unix::fs::symlink(&outside, root.join(".partial")).expect("plant");
        let folder = StoreFolder::open(&root.join("img")).expect("open");
        let error = folder.create_partial(1).expect_err("refused");
        assert!(matches!(error, CopyError::LinkInStore { .. }), "{error}");
        assert!(matches!(
            folder.remove_all(),
            Err(CopyError::LinkInStore { .. })
        ));
        assert_eq!(std::fs::read_dir(&outside).expect("team-b").count(), 0);

        std::fs::remove_file(root.join(".partial")).expect("unplant");
        std::fs::create_dir(root.join(".partial")).expect("partials");
        let victim = plant(&root, ".partial/img-1");
        let error = folder.create_partial(1).expect_err("refused");
        assert!(error.to_string().contains(".partial/img-1"), "{error}");
        folder.remove_all().expect("the link itself goes");
        assert_untouched(&victim);
    }

    #[test]
    fn a_hard_link_at_the_partial_file_is_replaced_not_written_through() {
        let (_dir, root) = store();
        std::fs::create_dir(root.join(".partial")).expect("partials");
        let other = root.join("other");
        std::fs::write(&other, b"another cache's data").expect("other");
        std::fs::hard_link(&other, root.join(".partial/img-1")).expect("plant");
        let folder = StoreFolder::open(&root.join("img")).expect("open");
        std::io::Write::write_all(&mut folder.create_partial(1).expect("partial"), b"new")
            .expect("write");
        assert_eq!(
            std::fs::read(&other).expect("other"),
            b"another cache's data"
        );
        assert_eq!(
            std::fs::read(root.join(".partial/img-1")).expect("partial"),
            b"new"
        );
    }

    #[test]
    fn a_namespace_folder_that_is_a_link_is_refused() {
        let (dir, root) = store();
        let elsewhere = dir.path().join("team-a-link");
        std::os::unix::fs::symlink(&root, &elsewhere).expect("plant");
        let error = StoreFolder::open(&elsewhere.join("img"))
            .err()
            .expect("refused");
        assert!(matches!(error, CopyError::LinkInStore { .. }), "{error}");
    }

    #[test]
    fn a_dest_that_is_not_a_cache_name_is_refused() {
        let (_dir, root) = store();
        for dest in [".partial", ".."] {
            assert!(matches!(
                StoreFolder::open(&root.join(dest)),
                Err(CopyError::InvalidArguments(_))
            ));
        }
    }
}
