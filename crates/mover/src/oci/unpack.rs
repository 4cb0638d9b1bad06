//! What the mover keeps of a blob, on a blocking thread fed by the fetch channel: an ORAS layer
//! whole, or from a containerDisk's tar layer (gzip, zstd or plain) only the regular file
//! `disk/<name>`, decompressed and unpacked on the fly. Only that file's bytes are written, to the
//! attempt's partial file (created through the store folder, never by path): no path from the
//! archive is ever used, so links and `..` in a hostile image lead nowhere.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, Bytes};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::tar_guard::{BoundedHeaders, HEADER_LIMIT, TooLarge};
use crate::transfer::{Transferred, Writeback, hex};
use crate::{CopyError, Partial, io_error};

/// The consumer's side of the fetch channel as a `Read`; end of file when the fetch ends (the
/// fetch's own result says whether that end was complete).
pub struct ChannelReader {
    chunks: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    pub fn new(chunks: mpsc::Receiver<Bytes>) -> Self {
        Self {
            chunks,
            current: Bytes::new(),
        }
    }
}

impl ChannelReader {
    /// The next chunk as it came from the network (after what `read` left of the current one).
    fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.current.is_empty() {
            return Some(std::mem::take(&mut self.current));
        }
        self.chunks.blocking_recv()
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(bytes) => self.current = bytes,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// Bytes written so far and, once known, the size of the file being written: read by the async
/// side for progress reports.
#[derive(Default)]
pub struct Written {
    pub bytes: AtomicU64,
    pub total: AtomicU64,
}

/// Asks the async side for room in the store once the file's size is known, and waits for it.
pub struct RoomGate {
    pub ask: Option<oneshot::Sender<u64>>,
    pub granted: Option<std::sync::mpsc::Receiver<bool>>,
}

impl RoomGate {
    fn wait_for(&mut self, size: u64) -> bool {
        let (Some(ask), Some(granted)) = (self.ask.take(), self.granted.take()) else {
            return true;
        };
        ask.send(size).is_ok() && granted.recv().unwrap_or(false)
    }
}

/// Writes the whole stream to `partial`, each chunk as it arrives (no copy into a small buffer).
/// The file is hashed only when `hash`: a SHA-256 blob is already hashed by the fetch, and that
/// verified digest is the file's. Returns the bytes written and the file's digest if computed.
pub fn write_layer(
    mut reader: ChannelReader,
    partial: &Partial,
    written: &Written,
    hash: bool,
) -> Result<(u64, Option<String>), CopyError> {
    let mut file = FileSink::create(partial, written, hash)?;
    while let Some(chunk) = reader.next_chunk() {
        file.write_all(&chunk)
            .map_err(|e| io_error(&partial.path(), e))?;
    }
    file.finish(partial)
}

/// Copies `reader` into `sink` a MiB at a time (`std::io::copy` uses 8 KiB, a write call each).
fn copy_large(
    mut reader: impl Read,
    sink: &mut FileSink<'_>,
    partial: &Partial,
) -> Result<(), CopyError> {
    let mut buffer = vec![0; COPY_BUFFER];
    loop {
        let n = reader
            .read(&mut buffer)
            .map_err(|e| io_error(&partial.path(), e))?;
        if n == 0 {
            return Ok(());
        }
        sink.write_all(&buffer[..n])
            .map_err(|e| io_error(&partial.path(), e))?;
    }
}

/// Bytes read from the decompressed tar per write.
const COPY_BUFFER: usize = 1 << 20;

/// What a containerDisk layer held.
pub enum DiskLayer {
    /// The disk file, written to the partial file.
    Written(Transferred),
    /// No match in this layer; these are the files under `disk/` it has.
    NotHere(Vec<String>),
}

/// Finds `disk/<file>` (the only file under `disk/` when `file` is unset) in the tar stream and
/// writes it to `partial`, asking `gate` for room first. The rest of the archive is read to list
/// the files that are there, so an unset `file` with two disks is refused rather than guessed.
pub fn unpack_disk(
    reader: impl Read + 'static,
    file: Option<&str>,
    display: &str,
    partial: &Partial,
    written: &Written,
    gate: &mut RoomGate,
) -> Result<DiskLayer, CopyError> {
    let unreadable = |e: std::io::Error| match e.get_ref().and_then(|e| e.downcast_ref()) {
        Some(TooLarge { kind, size }) => CopyError::TarHeaderTooLarge {
            source_name: display.to_owned(),
            kind,
            size: *size,
            limit: HEADER_LIMIT,
        },
        None => CopyError::Source(
            display.to_owned(),
            format!("the containerDisk layer is not a readable tar: {e}"),
        ),
    };
    let tar = BoundedHeaders::new(decompressed(reader).map_err(unreadable)?);
    let mut archive = tar::Archive::new(tar);
    let mut candidates = vec![];
    let mut done = None;
    for entry in archive.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(unreadable)?
            .to_string_lossy()
            .into_owned();
        let Some(name) = disk_file_name(&path) else {
            continue;
        };
        let name = name.to_owned();
        candidates.push(name.clone());
        let wanted = match file {
            Some(file) => file == name,
            None => done.is_none(),
        };
        if !wanted || done.is_some() {
            continue;
        }
        let size = entry.size();
        written.total.store(size, Ordering::Relaxed);
        if !gate.wait_for(size) {
            return Err(CopyError::Superseded(
                "no room was granted for the disk".into(),
            ));
        }
        let mut sink = FileSink::create(partial, written, true)?;
        copy_large(&mut entry, &mut sink, partial)?;
        let (bytes, checksum) = sink.finish(partial)?;
        done = Some(Transferred {
            bytes,
            checksum: checksum.unwrap_or_default(),
            resumed: 0,
        });
    }
    if file.is_none() && candidates.len() > 1 {
        return Err(CopyError::SeveralFiles {
            reference: display.to_owned(),
            candidates: candidates.join(", "),
        });
    }
    Ok(match done {
        Some(done) => DiskLayer::Written(done),
        None => DiskLayer::NotHere(candidates),
    })
}

/// `name` for `disk/name` (also `./disk/name`, `/disk/name`): a file right under `disk/`.
fn disk_file_name(path: &str) -> Option<&str> {
    let path = path.trim_start_matches("./").trim_start_matches('/');
    let name = path.strip_prefix("disk/")?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// Largest zstd window the mover accepts (64 MiB): a frame may ask for up to 2 GiB, and the copy
/// Job's memory is limited to 128 MiB. Every level without `--long` stays at or under 8 MiB.
const ZSTD_WINDOW_LOG_MAX: u32 = 26;

/// The tar stream inside a layer: gzip and zstd are recognised by their magic bytes, whatever
/// the media type claims; anything else is read as plain tar.
fn decompressed(reader: impl Read + 'static) -> std::io::Result<Box<dyn Read>> {
    let mut buffered = BufReader::with_capacity(1 << 20, reader);
    let head = buffered.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut decoder = zstd::stream::read::Decoder::with_buffer(buffered)?;
        decoder.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
        Box::new(decoder)
    } else {
        Box::new(buffered)
    })
}

/// The partial file, hashed as it is written, with writeback so the final fsync is short.
struct FileSink<'a> {
    file: File,
    hasher: Option<Sha256>,
    writeback: Writeback,
    written: &'a Written,
    bytes: u64,
}

impl<'a> FileSink<'a> {
    fn create(partial: &Partial, written: &'a Written, hash: bool) -> Result<Self, CopyError> {
        let file = partial.create()?;
        let writeback = Writeback::start(&file).map_err(|e| io_error(&partial.path(), e))?;
        written.bytes.store(0, Ordering::Relaxed);
        Ok(Self {
            file,
            hasher: hash.then(Sha256::new),
            writeback,
            written,
            bytes: 0,
        })
    }

    /// Bytes written and, when hashed, their `sha256:<hex>`, once they are on disk.
    fn finish(self, partial: &Partial) -> Result<(u64, Option<String>), CopyError> {
        self.writeback.finish();
        self.file
            .sync_all()
            .map_err(|e| io_error(&partial.path(), e))?;
        let checksum = self
            .hasher
            .map(|h| format!("sha256:{}", hex(&h.finalize())));
        Ok((self.bytes, checksum))
    }
}

impl Write for FileSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buf[..n]);
        }
        self.writeback.wrote(n as u64);
        self.bytes += n as u64;
        self.written.bytes.store(self.bytes, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Shared counters for one layer.
pub fn counters() -> Arc<Written> {
    Arc::new(Written::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar of `entries`: regular files, or symlinks when the content starts with `->`.
    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut header = tar::Header::new_gnu();
            if let Some(target) = content.strip_prefix(b"->") {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                let target = std::str::from_utf8(target).expect("utf-8");
                tar.append_link(&mut header, path, target).expect("link");
            } else {
                header.set_size(content.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                tar.append_data(&mut header, path, *content).expect("entry");
            }
        }
        tar.into_inner().expect("tar")
    }

    fn unpack(layer: Vec<u8>, file: Option<&str>) -> (Result<DiskLayer, CopyError>, Vec<u8>) {
        let dir = tempfile::tempdir().expect("dir");
        let folder = crate::folder::StoreFolder::open(&dir.path().join("disk"));
        let partial = Partial {
            folder: Arc::new(folder.expect("store folder")),
            attempt: 1,
        };
        let mut gate = RoomGate {
            ask: None,
            granted: None,
        };
        let result = unpack_disk(
            std::io::Cursor::new(layer),
            file,
            "reg/vm:1",
            &partial,
            &Written::default(),
            &mut gate,
        );
        (result, std::fs::read(partial.path()).unwrap_or_default())
    }

    #[test]
    fn the_disk_is_read_from_gzip_zstd_and_plain_tar_layers() {
        let disk = vec![7u8; 300_000];
        let tar = tar_of(&[("disk/", b""), ("disk/disk.img", &disk)]);
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&tar).expect("gzip");
        let zstd = zstd::encode_all(&tar[..], 3).expect("zstd");
        for layer in [gzip.finish().expect("gzip"), zstd, tar.clone()] {
            let (result, written) = unpack(layer, None);
            match result {
                Ok(DiskLayer::Written(done)) => assert_eq!(done.bytes, disk.len() as u64),
                other => panic!("the disk is found: {:?}", other.err()),
            }
            assert_eq!(written, disk);
        }
    }

    #[test]
    fn a_zstd_layer_that_asks_for_a_window_past_the_memory_limit_is_refused() {
        let tar = tar_of(&[("disk/disk.img", &[1u8; 4096])]);
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
        encoder.window_log(ZSTD_WINDOW_LOG_MAX + 1).expect("window");
        encoder.write_all(&tar).expect("zstd");
        let (result, written) = unpack(encoder.finish().expect("zstd"), None);
        let error = result.err().expect("refused").to_string();
        assert!(error.contains("not a readable tar"), "{error}");
        assert!(written.is_empty());
    }

    #[test]
    fn links_and_paths_outside_disk_are_never_candidates() {
        let tar = tar_of(&[
            ("disk/disk.img", b"->/etc/shadow"),
            ("etc/disk.img", b"elsewhere"),
            ("disk/sub/deep.img", b"too deep"),
        ]);
        let (result, written) = unpack(tar, Some("disk.img"));
        assert!(matches!(result, Ok(DiskLayer::NotHere(ref names)) if names.is_empty()));
        assert!(written.is_empty(), "nothing written");
    }

    #[test]
    fn two_disks_without_a_file_named_are_refused_with_both_listed() {
        let tar = tar_of(&[("disk/a.qcow2", b"a"), ("disk/b.qcow2", b"b")]);
        let error = unpack(tar.clone(), None)
            .0
            .err()
            .expect("refused")
            .to_string();
        assert!(error.contains("a.qcow2, b.qcow2"), "{error}");
        let (result, written) = unpack(tar, Some("b.qcow2"));
        assert!(matches!(result, Ok(DiskLayer::Written(_))));
        assert_eq!(written, b"b");
    }

    #[test]
    fn a_gzip_layer_with_a_huge_long_name_is_refused_naming_the_header() {
        let mut header = tar::Header::new_gnu();
        header.set_path("././@LongLink").expect("name");
        header.set_entry_type(tar::EntryType::GNULongName);
        header.set_size(1 << 30);
        header.set_cksum();
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(header.as_bytes()).expect("gzip");
        gzip.write_all(&[b'a'; 1 << 20]).expect("gzip");
        let (result, written) = unpack(gzip.finish().expect("gzip"), None);
        let error = result.err().expect("refused").to_string();
        assert!(
            error.contains("GNU long name header of 1073741824 bytes")
                && error.contains("65536-byte limit"),
            "{error}"
        );
        assert!(written.is_empty());
    }

    #[test]
    fn only_files_right_under_disk_are_disks() {
        assert_eq!(disk_file_name("disk/disk.img"), Some("disk.img"));
        assert_eq!(disk_file_name("./disk/a.qcow2"), Some("a.qcow2"));
        assert_eq!(disk_file_name("disk/"), None);
        assert_eq!(disk_file_name("disk/sub/x.img"), None);
        assert_eq!(disk_file_name("etc/disk/x.img"), None);
    }
}
