//! Parallel ranged download: K streams fetch parts of P bytes of one object at once, so a copy
//! runs at the speed of the link rather than of one connection (object stores and mirrors serve
//! a single GET at a fraction of a fast link).
//!
//! Invariants:
//! - **One version.** Every part is a conditional read of the version the HEAD saw: `If-Match`
//!   on its strong ETag, and S3's `versionId` when the bucket keeps versions. Each answer's ETag
//!   and total size are compared too, for servers that ignore `If-Match`. A source that changes
//!   mid-copy fails the attempt; it is never spliced into one file.
//! - **Bounded.** A part starts only when it is within K parts of the hashed front, so at most
//!   K x P bytes have landed ahead of the hash: a slow part stalls the window, never grows it.
//!   Memory holds chunks in flight only (see `landing`), not parts.
//! - **A broken part is retried alone**, from its last landed byte, a bounded number of times.
//!
//! Sources that cannot be split this way take the single-stream path (see `plan`).

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use object_store::{GetOptions, GetRange, GetResult, ObjectMeta, ObjectStore};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::landing::{Checkpoint, Front, Landing, Sink, Start};
use crate::plan::{Fallback, Pin, Tuning, plan};
use crate::resume::{self, Identity, Recorder, TakenOver};
use crate::source::Source;
use crate::stall::StallLimit;
use crate::transfer::{Transferred, hex};
use crate::{CopyError, Partial, io_error};

/// Times one part is fetched again after it broke, before the copy fails.
const PART_RETRIES: u32 = 5;

/// What a parallel attempt came to.
pub enum Outcome {
    Done(Transferred),
    SingleStream(Fallback),
}

/// Downloads the object `meta` describes into `partial` in parts, or says why it cannot.
/// `progress(front, total)` follows the hashed and the landed bytes. A partial file an earlier
/// attempt left of the same version is taken over (see `resume`): only the rest is fetched.
pub async fn transfer(
    source: &Source,
    meta: &ObjectMeta,
    partial: &Partial,
    tuning: Tuning,
    mut progress: impl AsyncFnMut(Front, u64),
) -> Result<Outcome, CopyError> {
    let pin = match plan(meta, tuning) {
        Ok(pin) => pin,
        Err(fallback) => return Ok(Outcome::SingleStream(fallback)),
    };
    let identity = Identity {
        source: source.display.clone(),
        size: meta.size,
        e_tag: pin.e_tag.clone(),
        version: pin.version.clone(),
    };
    let parts = Parts {
        store: source.store.clone(),
        path: source.path.clone(),
        display: source.display.clone(),
        size: meta.size,
        part_size: pin.part_size,
        pin,
        stall: source.stall,
    };
    let (file, start) = match resume::take_over(partial, &identity)? {
        Some(taken) => {
            let (file, start) = rehash(&parts, taken, partial, &mut progress).await?;
            (Some(file), start)
        }
        None => (None, Start::default()),
    };
    let (first_part, resumed_at) = (start.at / parts.part_size, start.at);
    // The first part's answer tells whether the server splits at all, before a byte is written.
    let asked = parts.get(parts.range(first_part));
    let first = match parts.stall.wait(&parts.display, start.at, asked).await? {
        Err(object_store::Error::NotSupported { .. }) => {
            return Ok(Outcome::SingleStream(Fallback::NoRanges));
        }
        other => other.map_err(|e| parts.fatal(e))?,
    };
    parts.check(&first.meta)?;
    // Read as well as write: the hasher reads parts back (see `landing`).
    let file = match file {
        Some(file) => file,
        None => partial.create()?,
    };
    let recorder =
        Recorder::new(partial, identity, &file).map_err(|e| io_error(&partial.path(), e))?;
    let partial = &partial.path();
    // Sized up front so every part can be written at its offset; the store already reserved
    // the room (see StorageAdmission).
    file.set_len(meta.size).map_err(|e| io_error(partial, e))?;
    let checkpoint: Checkpoint = Box::new(move |verified| {
        if let Err(error) = recorder.record(verified) {
            warn!(
                "could not record how far the copy is verified (a retry would start over): {error}"
            );
        }
    });
    let sink =
        Sink::start(file, meta.size, start, Some(checkpoint)).map_err(|e| io_error(partial, e))?;
    let download = Arc::new(Download {
        parts,
        window: u64::from(tuning.streams),
        next: AtomicU64::new(first_part + 1),
        chunks: sink.chunks.clone(),
        front: sink.front.clone(),
    });
    let fetched = fetch_all(
        download,
        (first_part, first),
        tuning.streams,
        &sink,
        &mut progress,
    )
    .await;
    // Joining the writer waits for its last fsync: not on the runtime's threads.
    let digest = tokio::task::spawn_blocking(move || sink.finish())
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match (fetched, digest) {
        (Ok(()), Ok(digest)) => Ok(Outcome::Done(Transferred {
            bytes: meta.size,
            checksum: format!("sha256:{}", hex(&digest)),
            resumed: resumed_at,
        })),
        // The writer or hasher stopped first: its error is the cause.
        (Err(Stop::SinkClosed), Err(e)) | (Ok(()), Err(e)) => Err(io_error(partial, e)),
        (Err(Stop::SinkClosed), Ok(_)) => Err(io_error(
            partial,
            std::io::Error::other("the writer stopped early"),
        )),
        (Err(Stop::Failed(error)), _) => Err(error),
    }
}

/// How often progress is told while a taken-over prefix is re-hashed.
const REHASH_REPORTS: Duration = Duration::from_secs(2);

/// Re-hashes the verified prefix of a taken-over file from disk, down to a part boundary (the
/// part it ends in is fetched again whole: parts stay aligned, and at least one part is left to
/// fetch, whose answer says the server still splits). The file and where hashing goes on.
async fn rehash(
    parts: &Parts,
    taken: TakenOver,
    partial: &Partial,
    progress: &mut impl AsyncFnMut(Front, u64),
) -> Result<(File, Start), CopyError> {
    let at = taken.verified.min(parts.size - 1) / parts.part_size * parts.part_size;
    info!(at, "re-hashing the prefix taken over from disk");
    let done = Arc::new(AtomicU64::new(0));
    let (file, counted) = (taken.file, done.clone());
    let mut hashing = tokio::task::spawn_blocking(move || {
        let hasher = resume::rehash(&file, at, &counted);
        (file, hasher)
    });
    let mut ticks = tokio::time::interval(REHASH_REPORTS);
    let failed = |e| io_error(&partial.path(), e);
    let (file, hasher) = loop {
        tokio::select! {
            joined = &mut hashing => break joined.map_err(|e| failed(std::io::Error::other(e)))?,
            _ = ticks.tick() => {
                let hashed = done.load(Ordering::Relaxed);
                let front = Front { hashed, landed: at, resumed: at, ..Front::default() };
                progress(front, parts.size).await;
            }
        }
    };
    let hasher = hasher.map_err(failed)?;
    Ok((file, Start { hasher, at }))
}

/// Why a worker stopped.
enum Stop {
    Failed(CopyError),
    /// The writer or hasher is gone; its own error says why.
    SinkClosed,
}

impl From<CopyError> for Stop {
    fn from(error: CopyError) -> Self {
        Stop::Failed(error)
    }
}

/// Bytes one stream brings before the mover judges whether more streams would help.
const SAMPLE: u64 = 4 << 20;

/// Runs the workers over every part, reporting the front as it moves. One stream starts; the
/// others open once it is plain that the source, not the hash, is the bottleneck: when one
/// stream keeps the hasher busy under a third of the time, K streams can bring several times
/// more. Where one stream already comes close to the hash's speed (a fast local mirror), more
/// streams would only add work on the same cores: opened at once, 8 streams were 13 to 26 %
/// slower than one on loopback on 2 cores (docs/design-notes.md).
async fn fetch_all(
    download: Arc<Download>,
    first: (u64, GetResult),
    streams: u16,
    sink: &Sink,
    progress: &mut impl AsyncFnMut(Front, u64),
) -> Result<(), Stop> {
    let (size, name) = (download.parts.size, download.parts.display.clone());
    let started = std::time::Instant::now();
    let mut workers = JoinSet::new();
    workers.spawn(download.clone().work(Some(first)));
    let mut closed = Some(download);
    let mut front = sink.front.clone();
    let mut reporting = true;
    // The reporter drops changes that come within its interval of the last report; this tick
    // tells the last of them once the interval has passed. Without it a front that moved and
    // then stopped (a slow part holding the window) stays unreported until the part lands.
    let mut trailing = tokio::time::interval(TRAILING_REPORT);
    trailing.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                None => break Ok(()),
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(stop))) => break Err(stop),
                Some(Err(panic)) => {
                    let cause = format!("a download task failed: {panic}");
                    break Err(Stop::Failed(CopyError::Source(name, cause)));
                }
            },
            changed = front.changed(), if reporting => match changed {
                Ok(()) => {
                    let now = *front.borrow_and_update();
                    if let Some(download) =
                        closed.take_if(|_| source_bound(now, started.elapsed()))
                    {
                        info!(streams, "the source is slower than the hash: opening more streams");
                        for _ in 1..streams {
                            workers.spawn(download.clone().work(None));
                        }
                    }
                    progress(now, size).await;
                }
                Err(_) => reporting = false,
            },
            _ = trailing.tick(), if reporting => {
                let now = *front.borrow();
                progress(now, size).await;
            }
        }
    };
    // The other workers stop at once after a failure; waiting for them drops their handles on
    // the sink, which the sink needs to finish.
    workers.shutdown().await;
    result
}

/// How often a download checks for a change of its front the reporter has not told yet.
const TRAILING_REPORT: Duration = Duration::from_secs(1);

/// Whether the hasher, after a fair sample of this attempt's bytes, spent under a third of the
/// time working.
fn source_bound(front: Front, elapsed: Duration) -> bool {
    front.hashed - front.resumed >= SAMPLE && front.hashing * 3 < elapsed
}

/// The parts of one object, pinned to one version.
struct Parts {
    store: Arc<dyn ObjectStore>,
    path: object_store::path::Path,
    display: String,
    pin: Pin,
    size: u64,
    part_size: u64,
    stall: StallLimit,
}

impl Parts {
    fn count(&self) -> u64 {
        self.size.div_ceil(self.part_size)
    }

    fn range(&self, index: u64) -> Range<u64> {
        let start = index * self.part_size;
        start..(start + self.part_size).min(self.size)
    }

    /// A conditional read of `range` of the pinned version.
    async fn get(&self, range: Range<u64>) -> Result<GetResult, object_store::Error> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            if_match: self.pin.e_tag.clone(),
            version: self.pin.version.clone(),
            ..GetOptions::default()
        };
        self.store.get_opts(&self.path, options).await
    }

    /// Fails unless an answer comes from the pinned version.
    fn check(&self, meta: &ObjectMeta) -> Result<(), CopyError> {
        if meta.size != self.size {
            return Err(self.changed(format!(
                "its size went from {} to {} bytes",
                self.size, meta.size
            )));
        }
        if let Some(pinned) = &self.pin.e_tag
            && meta.e_tag.as_ref() != Some(pinned)
        {
            let now = meta.e_tag.as_deref().unwrap_or("none");
            return Err(self.changed(format!("its ETag went from {pinned} to {now}")));
        }
        Ok(())
    }

    fn changed(&self, detail: String) -> CopyError {
        CopyError::ChangedMidCopy {
            source_name: self.display.clone(),
            detail,
        }
    }

    /// The error a failed request ends the copy with, when it is not worth retrying.
    fn fatal(&self, error: object_store::Error) -> CopyError {
        match error {
            object_store::Error::Precondition { .. } => {
                let pinned = self.pin.e_tag.as_deref().unwrap_or("the pinned version");
                self.changed(format!(
                    "it no longer matches ETag {pinned}: 412 Precondition Failed"
                ))
            }
            error => CopyError::from_source(&self.display, error),
        }
    }
}

/// Whether a failed part is worth fetching again: only the source's transient failures are.
fn retryable(error: &object_store::Error) -> bool {
    matches!(
        error,
        object_store::Error::Generic { .. } | object_store::Error::NotSupported { .. }
    )
}

/// The shared state of the workers of one download.
struct Download {
    parts: Parts,
    /// Parts that may land ahead of the hashed front: K.
    window: u64,
    /// The next part no worker has taken.
    next: AtomicU64,
    chunks: mpsc::Sender<Landing>,
    front: watch::Receiver<Front>,
}

impl Download {
    /// Takes parts in order until none is left; the first worker starts with the first part's
    /// answer.
    async fn work(self: Arc<Self>, first: Option<(u64, GetResult)>) -> Result<(), Stop> {
        let (mut index, mut first) = match first {
            Some((index, answer)) => (index, Some(answer)),
            None => (self.next.fetch_add(1, Ordering::Relaxed), None),
        };
        while index < self.parts.count() {
            self.wait_for_window(index).await?;
            self.fetch_part(index, first.take()).await?;
            index = self.next.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Waits until part `index` is within the window of the hashed front.
    async fn wait_for_window(&self, index: u64) -> Result<(), Stop> {
        let (window, part_size) = (self.window, self.parts.part_size);
        let mut front = self.front.clone();
        front
            .wait_for(|f| index < f.hashed / part_size + window)
            .await
            .map(drop)
            .map_err(|_| Stop::SinkClosed)
    }

    /// Lands part `index`, resuming from its last landed byte after a break.
    async fn fetch_part(&self, index: u64, mut answer: Option<GetResult>) -> Result<(), Stop> {
        let range = self.parts.range(index);
        let mut at = range.start;
        let mut retries = 0;
        loop {
            let got = match answer.take() {
                Some(result) => Ok(result),
                None => {
                    let asked = self.parts.get(at..range.end);
                    self.parts
                        .stall
                        .wait(&self.parts.display, at, asked)
                        .await?
                }
            };
            let cause = match got {
                Ok(result) => {
                    self.parts.check(&result.meta)?;
                    match self.land(result, &mut at, range.end).await? {
                        None => return Ok(()),
                        Some(cause) => cause,
                    }
                }
                Err(error) if retryable(&error) => crate::one_line(&error.to_string()),
                Err(error) => return Err(self.parts.fatal(error).into()),
            };
            if retries == PART_RETRIES {
                return Err(Stop::Failed(CopyError::Truncated {
                    source_name: self.parts.display.clone(),
                    got: at,
                    expected: self.parts.size,
                    cause: format!("part {index} broke {} times: {cause}", retries + 1),
                }));
            }
            retries += 1;
            warn!(
                part = index,
                at,
                "part broke ({cause}); fetching the rest of it again ({retries}/{PART_RETRIES})"
            );
            tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(retries))).await;
        }
    }

    /// Streams one answer into the sink; `None` once the part is whole, else why it broke.
    async fn land(
        &self,
        result: GetResult,
        at: &mut u64,
        end: u64,
    ) -> Result<Option<String>, Stop> {
        let asked = *at;
        let mut stream = result.into_stream();
        let stall = self.parts.stall;
        while let Some(chunk) = stall.wait(&self.parts.display, *at, stream.next()).await? {
            let bytes = match chunk {
                Ok(bytes) => bytes,
                Err(e) => return Ok(Some(crate::one_line(&e.to_string()))),
            };
            let len = bytes.len() as u64;
            if *at + len > end {
                // Parts tile the announced size, the room the store reserved: a part longer
                // than its range would write past it (or over the next part).
                return Err(Stop::Failed(CopyError::SentMoreThanAnnounced {
                    source_name: format!(
                        "{} (answering bytes {asked}-{} of {})",
                        self.parts.display,
                        end - 1,
                        self.parts.size
                    ),
                    announced: end - asked,
                }));
            }
            let offset = *at;
            self.chunks
                .send(Landing { offset, bytes })
                .await
                .map_err(|_| Stop::SinkClosed)?;
            *at += len;
        }
        Ok((*at < end).then(|| "the connection closed early".to_owned()))
    }
}
