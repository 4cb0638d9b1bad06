//! Where the parts of a parallel download land: one thread writes each chunk in place at its
//! offset (`pwrite`), a second feeds SHA-256 strictly in offset order.
//!
//! The hasher never holds a part in memory waiting for its turn. A chunk that arrives exactly at
//! the hashed front is hashed as it comes (no copy); any other chunk is only noted as landed, and
//! when the front reaches it the hasher reads it back from the file (the page cache, since it was
//! just written). So memory stays at a few channels of chunks whatever K and P are, and what is
//! hashed is what is in the file: a chunk written at a wrong offset would fail the checksum, not
//! pass it. How far ahead of the front parts may land is the caller's window (see `ranged`).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::transfer::Writeback;

/// A chunk of the source and where it goes in the file.
pub struct Landing {
    pub offset: u64,
    pub bytes: Bytes,
}

/// How far a parallel download has come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Front {
    /// Bytes hashed in order from offset 0: written, and verified-in-order so far.
    pub hashed: u64,
    /// Bytes written anywhere in the file, in order or not (a prefix taken over included).
    pub landed: u64,
    /// Bytes taken over from an earlier attempt's partial file: re-hashed, not fetched.
    pub resumed: u64,
    /// Time the hasher spent hashing (and reading back): set against the wall time, it says
    /// whether the hash or the source is the bottleneck.
    pub hashing: std::time::Duration,
}

/// Chunks queued between the downloads and the writer, and between the writer and the hasher.
/// object_store's chunks are up to a few hundred KiB, so each queue holds a few MiB at most.
const QUEUED_CHUNKS: usize = 32;

/// Read-back buffer of the hasher.
const READ_BACK: usize = 1 << 20;

/// The hashed front is offered to the checkpoint whenever it has moved this much, or
/// [`CHECKPOINT_EVERY`] has passed: what a killed copy may have to fetch again.
const CHECKPOINT_STEP: u64 = 64 << 20;
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Where hashing starts: at offset 0, or past a prefix already in the file and hashed into
/// `hasher` (taken over from an earlier attempt).
#[derive(Default)]
pub struct Start {
    pub hasher: Sha256,
    pub at: u64,
}

/// Told the hashed front now and then, on a thread of its own, so a slow sync never holds up
/// the hash; while it is busy one offered front waits and any further one is skipped.
pub type Checkpoint = Box<dyn FnMut(u64) + Send>;

/// The running writer and hasher of one file.
pub struct Sink {
    pub chunks: mpsc::Sender<Landing>,
    pub front: watch::Receiver<Front>,
    writer: std::thread::JoinHandle<std::io::Result<()>>,
    hasher: std::thread::JoinHandle<std::io::Result<[u8; 32]>>,
    checkpoints: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// Starts writing into `file` (already sized) and hashing its first `size` bytes from
    /// `start`, offering the hashed front to `checkpoint` now and then.
    pub fn start(
        file: File,
        size: u64,
        start: Start,
        checkpoint: Option<Checkpoint>,
    ) -> std::io::Result<Self> {
        let reader = file.try_clone()?;
        let (chunks, to_write) = mpsc::channel(QUEUED_CHUNKS);
        let (to_hasher, to_hash) = mpsc::channel(QUEUED_CHUNKS);
        let (front_tx, front) = watch::channel(Front {
            hashed: start.at,
            landed: start.at,
            resumed: start.at,
            ..Front::default()
        });
        let (offers, checkpoints) = match checkpoint {
            Some(mut checkpoint) => {
                let (offer, offered) = std::sync::mpsc::sync_channel::<u64>(1);
                let thread = std::thread::spawn(move || {
                    while let Ok(front) = offered.recv() {
                        checkpoint(front);
                    }
                });
                (Some(offer), Some(thread))
            }
            None => (None, None),
        };
        let writer = std::thread::spawn(move || write_in_place(file, to_write, to_hasher));
        let hasher = std::thread::spawn(move || {
            hash_in_order(reader, size, start, to_hash, front_tx, offers)
        });
        Ok(Self {
            chunks,
            front,
            writer,
            hasher,
            checkpoints,
        })
    }

    /// Waits for every queued chunk to be written, synced and hashed; the digest of the file.
    /// Call it once every sender of [`Sink::chunks`] is dropped.
    pub fn finish(self) -> std::io::Result<[u8; 32]> {
        drop(self.chunks);
        let written = join(self.writer);
        let digest = join(self.hasher);
        // The hasher dropped its end: the checkpoint thread ends after its last record.
        if let Some(checkpoints) = self.checkpoints {
            let _ = checkpoints.join();
        }
        written?;
        digest
    }
}

fn join<T>(thread: std::thread::JoinHandle<std::io::Result<T>>) -> std::io::Result<T> {
    thread
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("a copy thread panicked")))
}

/// Writes every chunk at its offset, then fsyncs; passes each written chunk on to the hasher.
fn write_in_place(
    file: File,
    mut chunks: mpsc::Receiver<Landing>,
    to_hasher: mpsc::Sender<Landing>,
) -> std::io::Result<()> {
    let mut writeback = Writeback::start(&file)?;
    while let Some(chunk) = chunks.blocking_recv() {
        file.write_all_at(&chunk.bytes, chunk.offset)?;
        writeback.wrote(chunk.bytes.len() as u64);
        if to_hasher.blocking_send(chunk).is_err() {
            // The hasher failed; its error is the one reported.
            break;
        }
    }
    writeback.finish();
    file.sync_all()
}

/// Hashes the file from `start` to `size` in order, as chunks land, publishes the front, and
/// offers it to the checkpoint (bytes below it are written: the writer passes a chunk on only
/// once it is in the file).
fn hash_in_order(
    file: File,
    size: u64,
    start: Start,
    mut landed: mpsc::Receiver<Landing>,
    front: watch::Sender<Front>,
    checkpoint: Option<std::sync::mpsc::SyncSender<u64>>,
) -> std::io::Result<[u8; 32]> {
    let mut hasher = start.hasher;
    let mut state = *front.borrow();
    let (mut offered, mut offered_at) = (state.hashed, std::time::Instant::now());
    // Landed ranges beyond the hashed front, start -> end, merged when they touch.
    let mut ahead = BTreeMap::<u64, u64>::new();
    let mut buffer = vec![0; READ_BACK];
    while let Some(chunk) = landed.blocking_recv() {
        let len = chunk.bytes.len() as u64;
        let busy = std::time::Instant::now();
        state.landed += len;
        if chunk.offset == state.hashed {
            hasher.update(&chunk.bytes);
            state.hashed += len;
        } else {
            note_landed(&mut ahead, chunk.offset, chunk.offset + len);
        }
        drop(chunk);
        while let Some(end) = ahead.remove(&state.hashed) {
            read_back(&file, state.hashed..end, &mut buffer, &mut hasher)?;
            state.hashed = end;
        }
        state.hashing += busy.elapsed();
        front.send_replace(state);
        let due = state.hashed >= offered + CHECKPOINT_STEP
            || (state.hashed > offered && offered_at.elapsed() >= CHECKPOINT_EVERY);
        if let Some(checkpoint) = checkpoint.as_ref().filter(|_| due)
            && checkpoint.try_send(state.hashed).is_ok()
        {
            (offered, offered_at) = (state.hashed, std::time::Instant::now());
        }
    }
    if state.hashed != size {
        return Err(std::io::Error::other(format!(
            "only {} of {size} bytes were hashed in order",
            state.hashed
        )));
    }
    Ok(hasher.finalize().into())
}

/// Records `start..end` as landed, merged with the range it continues, if any, so the hasher
/// finds a whole run of landed bytes in one lookup.
fn note_landed(ahead: &mut BTreeMap<u64, u64>, start: u64, end: u64) {
    let before = ahead
        .range(..=start)
        .next_back()
        .filter(|(_, e)| **e == start)
        .map(|(s, _)| *s);
    let end = ahead.remove(&end).unwrap_or(end);
    match before {
        Some(s) => ahead.insert(s, end),
        None => ahead.insert(start, end),
    };
}

fn read_back(
    file: &File,
    range: std::ops::Range<u64>,
    buffer: &mut [u8],
    hasher: &mut Sha256,
) -> std::io::Result<()> {
    let mut at = range.start;
    while at < range.end {
        let len = (range.end - at).min(buffer.len() as u64) as usize;
        file.read_exact_at(&mut buffer[..len], at)?;
        hasher.update(&buffer[..len]);
        at += len as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landed_ranges_merge_when_they_touch() {
        let mut ahead = BTreeMap::new();
        note_landed(&mut ahead, 10, 20);
        note_landed(&mut ahead, 30, 40);
        note_landed(&mut ahead, 20, 30);
        assert_eq!(ahead.into_iter().collect::<Vec<_>>(), [(10, 40)]);
    }

    #[test]
    fn chunks_landing_out_of_order_hash_as_the_file_in_order() {
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let file = File::create_new(&path).expect("file");
        file.set_len(bytes.len() as u64).expect("size");
        let sink = Sink::start(file, bytes.len() as u64, Start::default(), None).expect("sink");
        let pieces: Vec<(usize, usize)> = (0..bytes.len())
            .step_by(100_000)
            .map(|s| (s, (s + 100_000).min(bytes.len())))
            .collect();
        // Every second piece first, then the rest backwards: little lands at the front.
        let order = pieces
            .iter()
            .skip(1)
            .step_by(2)
            .chain(pieces.iter().step_by(2).rev());
        for &(start, end) in order {
            let chunk = Landing {
                offset: start as u64,
                bytes: Bytes::copy_from_slice(&bytes[start..end]),
            };
            sink.chunks.blocking_send(chunk).expect("send");
        }
        let front = sink.front.clone();
        let digest = sink.finish().expect("finish");
        assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&bytes)));
        let whole = bytes.len() as u64;
        let end = *front.borrow();
        assert_eq!((end.hashed, end.landed), (whole, whole));
        assert_eq!(std::fs::read(&path).expect("read"), bytes);
    }
}
