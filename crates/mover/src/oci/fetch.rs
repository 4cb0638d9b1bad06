//! One blob, read from the registry in order into a bounded channel, resumed from the last byte
//! on a broken connection, and checked against its registry digest and size whether or not the
//! cache names a checksum. The blob is always read to its end, even when the reader of the
//! channel needs only its beginning (a containerDisk's tar padding), so its digest is checked.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use oci_client::Reference;
use oci_client::manifest::OciDescriptor;
use sha2::Digest;
use tokio::sync::mpsc;

use super::registry::Registry;
use crate::CopyError;
use crate::transfer::hex;

/// Times a broken stream is resumed before the copy fails as truncated.
const MAX_RESUMES: u32 = 5;

/// Chunks queued for the writer. hyper hands over chunks of up to a few hundred KiB on a fast
/// link, so this keeps a few MiB in flight (64 made the mover's peak RSS 79 MiB on loopback).
pub const CHUNKS_IN_FLIGHT: usize = 16;

/// Reads `layer` into `chunks` and checks it; `Ok` only when every byte arrived and the digest
/// and size are the registry's.
pub async fn fetch(
    registry: Arc<Registry>,
    image: Reference,
    layer: OciDescriptor,
    chunks: mpsc::Sender<Bytes>,
) -> Result<(), CopyError> {
    let expected_size = u64::try_from(layer.size).unwrap_or(0);
    let mut hasher = BlobHasher::for_digest(&registry.display, &layer.digest)?;
    let mut received: u64 = 0;
    let mut reader_open = true;
    let mut resumes = 0;
    loop {
        let asked = registry.blob_from(&image, &layer, received);
        let mut blob = registry
            .stall
            .wait(&registry.display, received, asked)
            .await??;
        // Bytes of this response that were already received (a registry that ignored the range).
        let mut skip = received - blob.starts_at.min(received);
        let mut broken = None;
        let stall = registry.stall;
        while let Some(chunk) = stall
            .wait(&registry.display, received, blob.stream.next())
            .await?
        {
            let mut bytes = match chunk {
                Ok(bytes) => bytes,
                Err(e) => {
                    broken = Some(e.to_string());
                    break;
                }
            };
            if skip > 0 {
                let cut = skip.min(bytes.len() as u64);
                bytes = bytes.slice(cut as usize..);
                skip -= cut;
            }
            received += bytes.len() as u64;
            // The manifest's size is the room the store reserved: not a byte more is taken.
            if received > expected_size {
                return Err(CopyError::SentMoreThanAnnounced {
                    source_name: registry.display.clone(),
                    announced: expected_size,
                });
            }
            hasher.update(&bytes);
            // A reader that has what it needs stops reading; the rest is still hashed.
            if reader_open && chunks.send(bytes).await.is_err() {
                reader_open = false;
            }
        }
        if received == expected_size {
            break;
        }
        if resumes == MAX_RESUMES {
            return Err(CopyError::Truncated {
                source_name: registry.display.clone(),
                got: received,
                expected: expected_size,
                cause: broken.unwrap_or_else(|| "the connection closed early".into()),
            });
        }
        resumes += 1;
        tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(resumes))).await;
    }
    let actual = hasher.finish();
    if actual != layer.digest {
        return Err(CopyError::DigestMismatch {
            what: format!("blob {} of {}", layer.digest, registry.display),
            expected: layer.digest.clone(),
            actual,
        });
    }
    Ok(())
}

/// The hash a digest names: registries use SHA-256, and the OCI spec allows SHA-512.
enum BlobHasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl BlobHasher {
    fn for_digest(display: &str, digest: &str) -> Result<Self, CopyError> {
        match digest.split_once(':') {
            Some(("sha256", _)) => Ok(Self::Sha256(sha2::Sha256::new())),
            Some(("sha512", _)) => Ok(Self::Sha512(sha2::Sha512::new())),
            _ => Err(CopyError::Source(
                display.to_owned(),
                format!("blob digest {digest} uses an algorithm other than sha256 or sha512"),
            )),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::Sha512(h) => h.update(bytes),
        }
    }

    fn finish(self) -> String {
        match self {
            Self::Sha256(h) => format!("sha256:{}", hex(&h.finalize())),
            Self::Sha512(h) => format!("sha512:{}", hex(&h.finalize())),
        }
    }
}
