//! `templatecache populate`: what a populate Job runs. It fills one new volume (the prime claim
//! the operator made for a user's PersistentVolumeClaim) from one staged cache: a Filesystem
//! volume gets the template as `disk.img` at its root (the name KubeVirt reads), a Block volume
//! the raw bytes from offset 0. The volume counts as filled only once its bytes are synced and
//! read back with the cache's SHA-256.
//!
//! The staged file is reached through the same link-refusing path as every store access (a
//! Pod of the cache's namespace may have planted a link at the cache's name), must be a regular
//! file of the cache's size, and what lands is checked against the checksum the copy recorded,
//! so bytes that are not the template never reach a user's volume.
//!
//! The copy is `std::io::copy` between the two files, which on Linux uses `copy_file_range`
//! (a reflink where the filesystem shares extents, an in-kernel copy otherwise) and falls back
//! to `sendfile` or a read/write loop where it cannot (a block device, two filesystems on an
//! older kernel).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Instant;

use sha2::{Digest, Sha256};
use tracing::info;

use crate::folder::StoreFolder;
use crate::transfer::hex;
use crate::{CopyError, io_error};

/// The exit code of a fill that failed in a way another try would meet again (a staged file
/// that is not the cache's, a volume too small, a link in the store): the populate Job's
/// podFailurePolicy fails the Job at once on it instead of retrying.
pub const EXIT_FINAL: u8 = 3;

/// Whether another try of the fill would fail the same way.
pub fn is_final(error: &CopyError) -> bool {
    matches!(
        error,
        CopyError::StagedFileChanged { .. }
            | CopyError::FilledVolumeMismatch { .. }
            | CopyError::VolumeTooSmall { .. }
            | CopyError::LinkInStore { .. }
            | CopyError::NotAFile { .. }
            | CopyError::InvalidArguments(_)
    )
}

/// The file a Filesystem volume gets, at its root: the name KubeVirt's disks read.
pub const DISK_IMAGE: &str = "disk.img";

/// How the volume is presented to the populate Job's container.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeMode {
    /// Mounted as a folder: the template becomes [`DISK_IMAGE`] in it.
    Filesystem,
    /// A block device: the template is written from offset 0.
    Block,
}

/// Arguments of `templatecache populate`.
#[derive(clap::Args, Debug, Clone)]
pub struct PopulateArgs {
    /// The cache's file in the Job's read-only mount of its namespace's store folder.
    #[arg(long)]
    pub source: PathBuf,
    /// The volume to fill: its mount folder (Filesystem) or its device (Block).
    #[arg(long)]
    pub volume: PathBuf,
    #[arg(long, value_enum)]
    pub volume_mode: VolumeMode,
    /// The template's size in bytes, as the cache's status records it.
    #[arg(long)]
    pub size: u64,
    /// `sha256:<hex>` the filled volume must read back with (the cache's checksum).
    #[arg(long)]
    pub checksum: String,
}

impl PopulateArgs {
    /// The command line that parses back into these arguments.
    pub fn to_command_line(&self) -> Vec<String> {
        let mode = match self.volume_mode {
            VolumeMode::Filesystem => "filesystem",
            VolumeMode::Block => "block",
        };
        vec![
            "populate".to_owned(),
            format!("--source={}", self.source.display()),
            format!("--volume={}", self.volume.display()),
            format!("--volume-mode={mode}"),
            format!("--size={}", self.size),
            format!("--checksum={}", self.checksum),
        ]
    }
}

/// A volume filled and checked.
#[derive(Debug)]
pub struct Filled {
    pub target: PathBuf,
    pub bytes: u64,
    pub checksum: String,
    pub seconds: f64,
}

/// Fills the volume from the staged file and reads it back. Blocking: file I/O only.
pub fn run_populate(args: &PopulateArgs) -> Result<Filled, CopyError> {
    let started = Instant::now();
    let source = StoreFolder::open(&args.source)?.open_final()?;
    let staged = source
        .metadata()
        .map_err(|e| io_error(&args.source, e))?
        .len();
    if staged != args.size {
        return Err(CopyError::StagedFileChanged {
            path: args.source.clone(),
            size: staged,
            expected: args.size,
        });
    }
    let (mut target, path) = open_target(args)?;
    let copied = std::io::copy(&mut (&source).take(args.size), &mut target)
        .map_err(|e| io_error(&path, e))?;
    if copied != args.size {
        return Err(CopyError::StagedFileChanged {
            path: args.source.clone(),
            size: copied,
            expected: args.size,
        });
    }
    target.sync_all().map_err(|e| io_error(&path, e))?;
    let checksum = read_back(&mut target, args.size).map_err(|e| io_error(&path, e))?;
    if checksum != args.checksum {
        return Err(CopyError::FilledVolumeMismatch {
            path,
            expected: args.checksum.clone(),
            actual: checksum,
        });
    }
    let seconds = started.elapsed().as_secs_f64();
    info!(bytes = args.size, seconds, target = %path.display(), "volume filled and checked");
    Ok(Filled {
        target: path,
        bytes: args.size,
        checksum,
        seconds,
    })
}

/// The file the template goes to, open for reading and writing, with room for `args.size`.
fn open_target(args: &PopulateArgs) -> Result<(File, PathBuf), CopyError> {
    match args.volume_mode {
        VolumeMode::Filesystem => {
            let path = args.volume.join(DISK_IMAGE);
            // The volume is the user's alone; whoever their Pod runs as must be able to write
            // the disk, and the volume's own ownership (fsGroup) is the access control.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o666)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&path)
                .map_err(|e| io_error(&path, e))?;
            Ok((file, path))
        }
        VolumeMode::Block => {
            let path = args.volume.clone();
            let mut device = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_error(&path, e))?;
            let capacity = device
                .seek(SeekFrom::End(0))
                .and_then(|end| device.rewind().map(|()| end))
                .map_err(|e| io_error(&path, e))?;
            if capacity < args.size {
                return Err(CopyError::VolumeTooSmall {
                    path,
                    capacity,
                    size: args.size,
                });
            }
            Ok((device, path))
        }
    }
}

/// SHA-256 of the first `size` bytes of `file`, read from the start: what the volume holds now.
fn read_back(file: &mut File, size: u64) -> std::io::Result<String> {
    file.rewind()?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    let mut left = file.take(size);
    loop {
        let read = left.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(format!("sha256:{}", hex(&hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store folder with `bytes` staged as `cache`, and an empty volume folder.
    fn staged(bytes: &[u8]) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let root = tempfile::tempdir().expect("temp");
        let store = root.path().join("store/ns");
        let volume = root.path().join("volume");
        std::fs::create_dir_all(&store).expect("store");
        std::fs::create_dir_all(&volume).expect("volume");
        std::fs::write(store.join("img"), bytes).expect("staged file");
        (root, store.join("img"), volume)
    }

    fn args(source: PathBuf, volume: PathBuf, bytes: &[u8]) -> PopulateArgs {
        PopulateArgs {
            source,
            volume,
            volume_mode: VolumeMode::Filesystem,
            size: bytes.len() as u64,
            checksum: format!("sha256:{}", hex(&Sha256::digest(bytes))),
        }
    }

    fn template() -> Vec<u8> {
        (0..(3 << 20) + 17)
            .map(|i: u32| (i * 7 % 251) as u8)
            .collect()
    }

    #[test]
    fn a_filesystem_volume_gets_the_template_as_disk_img_checked() {
        let bytes = template();
        let (_root, source, volume) = staged(&bytes);
        let filled = run_populate(&args(source, volume.clone(), &bytes)).expect("filled");
        assert_eq!(filled.bytes, bytes.len() as u64);
        assert_eq!(
            std::fs::read(volume.join(DISK_IMAGE)).expect("disk.img"),
            bytes
        );
    }

    #[test]
    fn a_block_volume_gets_the_raw_bytes_from_offset_zero_and_keeps_the_rest() {
        let bytes = template();
        let (_root, source, volume) = staged(&bytes);
        // A regular file stands in for the device: its length is the device's size.
        let device = volume.join("device");
        std::fs::write(&device, vec![0xEE; bytes.len() + 4096]).expect("device");
        let mut block = args(source, device.clone(), &bytes);
        block.volume_mode = VolumeMode::Block;
        run_populate(&block).expect("filled");
        let written = std::fs::read(&device).expect("device");
        assert_eq!(&written[..bytes.len()], &bytes[..]);
        assert!(written[bytes.len()..].iter().all(|b| *b == 0xEE));
    }

    #[test]
    fn a_block_volume_smaller_than_the_template_is_refused_before_writing() {
        let bytes = template();
        let (_root, source, volume) = staged(&bytes);
        let device = volume.join("device");
        std::fs::write(&device, vec![0xEE; 4096]).expect("device");
        let mut block = args(source, device.clone(), &bytes);
        block.volume_mode = VolumeMode::Block;
        let error = run_populate(&block).expect_err("too small");
        assert!(
            matches!(error, CopyError::VolumeTooSmall { capacity: 4096, .. }),
            "{error}"
        );
        assert_eq!(std::fs::read(&device).expect("device"), vec![0xEE; 4096]);
    }

    #[test]
    fn bytes_that_do_not_read_back_with_the_caches_checksum_fail_the_fill() {
        let bytes = template();
        let (_root, source, volume) = staged(&bytes);
        let mut wrong = args(source, volume, &bytes);
        wrong.checksum = format!("sha256:{}", "0".repeat(64));
        let error = run_populate(&wrong).expect_err("mismatch");
        assert!(
            matches!(error, CopyError::FilledVolumeMismatch { .. }),
            "{error}"
        );
        assert!(error.to_string().contains(&wrong.checksum), "{error}");
    }

    #[test]
    fn a_staged_file_of_another_size_than_the_cache_says_is_refused() {
        let bytes = template();
        let (_root, source, volume) = staged(&bytes);
        let mut other = args(source, volume.clone(), &bytes);
        other.size += 1;
        let error = run_populate(&other).expect_err("size");
        assert!(
            matches!(error, CopyError::StagedFileChanged { .. }),
            "{error}"
        );
        assert!(!volume.join(DISK_IMAGE).exists(), "nothing written");
    }

    #[test]
    fn a_link_planted_at_the_caches_name_is_never_read_through() {
        let bytes = template();
        let (root, source, volume) = staged(&bytes);
        let secret = root.path().join("other-tenant");
        std::fs::write(&secret, &bytes).expect("another file");
        std::fs::remove_file(&source).expect("unstage");
        std::os::unix::fs::symlink(&secret, &source).expect("plant a link");
        let error = run_populate(&args(source, volume.clone(), &bytes)).expect_err("link");
        assert!(matches!(error, CopyError::LinkInStore { .. }), "{error}");
        assert!(!volume.join(DISK_IMAGE).exists(), "nothing written");
    }

    #[test]
    fn the_command_line_parses_back_into_the_same_arguments() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: PopulateArgs,
        }
        let bytes = template();
        let mut original = args("/store/img".into(), "/volume".into(), &bytes);
        original.volume_mode = VolumeMode::Block;
        let line = original.to_command_line();
        assert_eq!(line[0], "populate");
        let parsed = Cli::parse_from(&line).args;
        assert_eq!(parsed.to_command_line(), line);
    }
}
