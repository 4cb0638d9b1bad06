//! The streaming copy: source bytes go through a SHA-256 hasher into the partial file, one chunk
//! at a time, so memory stays bounded whatever the template's size. A dropped stream is resumed
//! with a range request from the last byte written, conditional on the source's ETag, so a
//! source that changes under the copy is detected instead of spliced.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use object_store::{GetOptions, GetRange};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWriteExt, BufWriter};

use super::source::Source;
use super::{CopyError, io_error};

/// Times a broken stream is resumed before the copy fails as truncated.
const MAX_RESUMES: u32 = 5;

/// What a finished transfer wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transferred {
    pub bytes: u64,
    /// `sha256:<hex>`.
    pub checksum: String,
}

/// Copies `source` into `partial`, calling `progress(bytes, total)` after every chunk.
pub async fn transfer(
    source: &Source,
    partial: &Path,
    mut progress: impl AsyncFnMut(u64, Option<u64>),
) -> Result<Transferred, CopyError> {
    let file = tokio::fs::File::create(partial)
        .await
        .map_err(|e| io_error(partial, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut written: u64 = 0;
    let mut expected: Option<(u64, Option<String>)> = None;
    let mut resumes = 0;
    loop {
        let options = GetOptions {
            range: (written > 0).then_some(GetRange::Offset(written)),
            if_match: expected.as_ref().and_then(|(_, etag)| etag.clone()),
            ..GetOptions::default()
        };
        let result = match source.store.get_opts(&source.path, options).await {
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
        match &expected {
            None => expected = Some((size, result.meta.e_tag.clone())),
            Some((total, _)) if *total != size => {
                return Err(CopyError::SourceChanged(source.display.clone()));
            }
            Some(_) => {}
        }
        let mut stream = result.into_stream();
        let mut broken = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    hasher.update(&bytes);
                    out.write_all(&bytes)
                        .await
                        .map_err(|e| io_error(partial, e))?;
                    written += bytes.len() as u64;
                    if written > size {
                        return Err(CopyError::SourceChanged(source.display.clone()));
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
            break;
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
    out.flush().await.map_err(|e| io_error(partial, e))?;
    let file = out.into_inner();
    file.sync_all().await.map_err(|e| io_error(partial, e))?;
    Ok(Transferred {
        bytes: written,
        checksum: format!("sha256:{}", hex(&hasher.finalize())),
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
