//! The streaming copy: source bytes go through a SHA-256 hasher into the partial file, one chunk
//! at a time, so memory stays bounded whatever the template's size. A dropped stream is resumed
//! with a range request from the last byte written, conditional on the source's ETag, so a
//! source that changes under the copy is detected instead of spliced. The source may send no
//! more than it announced: the room the store reserved is that size, and a source that goes on
//! past it fails the copy before the extra bytes reach the file.

use std::time::Duration;

use std::io::Write;

use bytes::Bytes;
use futures::StreamExt;
use object_store::{GetOptions, GetRange};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::source::Source;
use crate::{CopyError, Partial, io_error};

/// Times a broken stream is resumed before the copy fails as truncated.
const MAX_RESUMES: u32 = 5;

/// What a finished transfer wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transferred {
    pub bytes: u64,
    /// `sha256:<hex>`.
    pub checksum: String,
    /// Bytes taken over from an earlier attempt's partial file rather than fetched.
    pub resumed: u64,
}

/// Copies `source`, which announced `announced` bytes, into `partial`, calling
/// `progress(bytes, total)` after every chunk.
///
/// Three things run side by side, so the copy goes as fast as the slowest of them rather than
/// their sum: this task reads the network; one thread hashes; one thread writes, and a helper
/// asks the kernel to flush what is written every [`WRITEBACK_STEP`], so the final fsync finds
/// little left to do. Chunks are shared, not copied, and each channel holds at most
/// [`CHUNKS_IN_FLIGHT`] of them, so memory stays bounded.
pub async fn transfer(
    source: &Source,
    announced: u64,
    partial: &Partial,
    mut progress: impl AsyncFnMut(u64, Option<u64>),
) -> Result<Transferred, CopyError> {
    let file = partial.create()?;
    let partial = &partial.path();
    let (to_writer, chunks) = mpsc::channel::<Bytes>(CHUNKS_IN_FLIGHT);
    let writer = tokio::task::spawn_blocking(move || write_all(file, chunks));
    let (to_hasher, chunks) = mpsc::channel::<Bytes>(CHUNKS_IN_FLIGHT);
    let hasher = tokio::task::spawn_blocking(move || hash_all(chunks));
    let sinks = [to_writer, to_hasher];
    let read = read_all(source, announced, &sinks, &mut progress).await;
    drop(sinks);
    let written = writer
        .await
        .map_err(|e| io_error(partial, std::io::Error::other(e)));
    let digest = hasher
        .await
        .map_err(|e| io_error(partial, std::io::Error::other(e)));
    let bytes = read?;
    written?.map_err(|e| io_error(partial, e))?;
    Ok(Transferred {
        bytes,
        checksum: format!("sha256:{}", hex(&digest?)),
        resumed: 0,
    })
}

/// Chunks queued for each of the writer and the hasher (object_store's chunks are up to a few
/// hundred KiB, so this bounds memory to a few MiB per side).
const CHUNKS_IN_FLIGHT: usize = 32;

/// How much is written between requests to the kernel to flush to disk.
const WRITEBACK_STEP: u64 = 64 << 20;

/// Reads the whole object, resuming a broken stream, and hands every chunk to `sinks`; stops
/// before handing on a byte past `announced`.
async fn read_all(
    source: &Source,
    announced: u64,
    sinks: &[mpsc::Sender<Bytes>],
    progress: &mut impl AsyncFnMut(u64, Option<u64>),
) -> Result<u64, CopyError> {
    let mut written: u64 = 0;
    let mut expected: Option<(u64, Option<String>)> = None;
    let mut resumes = 0;
    loop {
        let options = GetOptions {
            range: (written > 0).then_some(GetRange::Offset(written)),
            if_match: expected.as_ref().and_then(|(_, etag)| etag.clone()),
            ..GetOptions::default()
        };
        let answer = source.store.get_opts(&source.path, options);
        let result = match source.stall.wait(&source.display, written, answer).await? {
            Ok(result) => result,
            Err(object_store::Error::NotSupported { .. }) if written > 0 => {
                return Err(CopyError::Truncated {
                    source_name: source.display.clone(),
                    got: written,
                    expected: expected.map_or(0, |(size, _)| size),
                    cause: "the connection broke and the source cannot resume (no range requests)"
                        .into(),
                });
            }
            Err(e) => return Err(CopyError::from_source(&source.display, e)),
        };
        let size = result.meta.size;
        if size > announced {
            // The answer itself says it will go past the reservation: stop before reading it.
            return Err(sent_more(source, announced));
        }
        match &expected {
            None => expected = Some((size, result.meta.e_tag.clone())),
            Some((total, _)) if *total != size => {
                return Err(CopyError::SourceChanged(source.display.clone()));
            }
            Some(_) => {}
        }
        let mut stream = result.into_stream();
        let mut broken = None;
        while let Some(chunk) = source
            .stall
            .wait(&source.display, written, stream.next())
            .await?
        {
            match chunk {
                Ok(bytes) => {
                    written += bytes.len() as u64;
                    if written > announced {
                        return Err(sent_more(source, announced));
                    }
                    if written > size {
                        return Err(CopyError::SourceChanged(source.display.clone()));
                    }
                    for sink in sinks {
                        // A closed sink failed; its error is reported when it is joined.
                        if sink.send(bytes.clone()).await.is_err() {
                            return Ok(written);
                        }
                    }
                    progress(written, Some(size)).await;
                }
                Err(e) => {
                    broken = Some(e.to_string());
                    break;
                }
            }
        }
        if written == size {
            return Ok(written);
        }
        if resumes == MAX_RESUMES {
            return Err(CopyError::Truncated {
                source_name: source.display.clone(),
                got: written,
                expected: size,
                cause: broken.unwrap_or_else(|| "the connection closed early".into()),
            });
        }
        resumes += 1;
        tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(resumes))).await;
    }
}

fn sent_more(source: &Source, announced: u64) -> CopyError {
    CopyError::SentMoreThanAnnounced {
        source_name: source.display.clone(),
        announced,
    }
}

/// Writes every chunk, then fsyncs.
fn write_all(mut file: std::fs::File, mut chunks: mpsc::Receiver<Bytes>) -> std::io::Result<()> {
    let mut writeback = Writeback::start(&file)?;
    while let Some(bytes) = chunks.blocking_recv() {
        file.write_all(&bytes)?;
        writeback.wrote(bytes.len() as u64);
    }
    writeback.finish();
    file.sync_all()
}

/// Asks the kernel to flush a file every [`WRITEBACK_STEP`] written, on a second handle in the
/// background (at most one flush pending), so dirty pages do not pile up for the final fsync.
pub struct Writeback {
    flush: std::sync::mpsc::SyncSender<()>,
    background: std::thread::JoinHandle<()>,
    unflushed: u64,
}

impl Writeback {
    pub fn start(file: &std::fs::File) -> std::io::Result<Self> {
        let flusher = file.try_clone()?;
        let (flush, flushes) = std::sync::mpsc::sync_channel::<()>(1);
        let background = std::thread::spawn(move || {
            while flushes.recv().is_ok() {
                // Best effort: the final fsync of the writer is the one that counts.
                let _ = flusher.sync_data();
            }
        });
        Ok(Self {
            flush,
            background,
            unflushed: 0,
        })
    }

    pub fn wrote(&mut self, bytes: u64) {
        self.unflushed += bytes;
        if self.unflushed >= WRITEBACK_STEP {
            let _ = self.flush.try_send(());
            self.unflushed = 0;
        }
    }

    /// Waits for a pending flush to end.
    pub fn finish(self) {
        drop(self.flush);
        let _ = self.background.join();
    }
}

fn hash_all(mut chunks: mpsc::Receiver<Bytes>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    while let Some(bytes) = chunks.blocking_recv() {
        hasher.update(&bytes);
    }
    hasher.finalize().into()
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    use super::*;
    use crate::folder::StoreFolder;

    #[tokio::test]
    async fn a_source_sending_more_than_it_announced_stops_before_the_file_grows_past_it() {
        let store = InMemory::new();
        let path = object_store::path::Path::from("disk.img");
        store
            .put(&path, vec![7u8; 64 << 10].into())
            .await
            .expect("put");
        let source = Source {
            store: Arc::new(store),
            path,
            display: "mem://disk.img".into(),
            stall: crate::stall::StallLimit::from_seconds(60),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let folder = StoreFolder::open(&dir.path().join("img")).expect("folder");
        let partial = Partial {
            folder: Arc::new(folder),
            attempt: 1,
        };

        let error = transfer(&source, 1024, &partial, async |_, _| {})
            .await
            .expect_err("more than announced");
        assert_eq!(
            error.to_string(),
            "mem://disk.img sent more than the 1024 bytes it announced (the room the store \
             reserved for it); the copy stops there"
        );
        let landed = std::fs::metadata(partial.path()).expect("partial").len();
        assert!(landed <= 1024, "{landed} bytes landed past the reservation");

        let whole = transfer(&source, 64 << 10, &partial, async |_, _| {})
            .await
            .expect("the announced size is accepted");
        assert_eq!(whole.bytes, 64 << 10);
    }
}
