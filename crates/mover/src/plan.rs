//! Whether an object can be downloaded in parts, and how: the version every part is pinned to
//! and the part size (the configured one, or an S3 multipart upload's own).

use object_store::ObjectMeta;

/// How many streams and how large their parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    pub streams: u16,
    pub part_size: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            streams: crate::DEFAULT_STREAMS,
            part_size: crate::DEFAULT_PART_SIZE,
        }
    }
}

/// A source must span this many parts for a parallel download to pay for its extra requests.
pub const MIN_PARTS: u64 = 4;

/// Why a copy goes single-stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Fallback {
    #[error("one stream is configured")]
    OneStream,
    #[error("{size} bytes is under {MIN_PARTS} parts of {part_size} bytes")]
    Small { size: u64, part_size: u64 },
    #[error("the source names no version its parts could be pinned to (no strong ETag)")]
    Unversioned,
    #[error("the source ignores Range requests (it answered a ranged GET with 200)")]
    NoRanges,
}

/// The version every part must come from, and the part size.
#[derive(Clone, Debug)]
pub struct Pin {
    pub e_tag: Option<String>,
    pub version: Option<String>,
    pub part_size: u64,
}

/// Whether `meta` can be downloaded in parts, pinned to what, in parts of what size.
pub fn plan(meta: &ObjectMeta, tuning: Tuning) -> Result<Pin, Fallback> {
    if tuning.streams <= 1 {
        return Err(Fallback::OneStream);
    }
    let part_size = meta
        .e_tag
        .as_deref()
        .and_then(|tag| upload_part_size(meta.size, tag))
        .filter(|upload| *upload <= 4 * tuning.part_size)
        .unwrap_or(tuning.part_size);
    if meta.size < MIN_PARTS * part_size {
        return Err(Fallback::Small {
            size: meta.size,
            part_size,
        });
    }
    // A weak ETag (`W/"..."`) never matches `If-Match` (RFC 9110, 13.1.1): it pins nothing.
    let e_tag = meta.e_tag.clone().filter(|tag| !tag.starts_with("W/"));
    if e_tag.is_none() && meta.version.is_none() {
        return Err(Fallback::Unversioned);
    }
    Ok(Pin {
        e_tag,
        version: meta.version.clone(),
        part_size,
    })
}

/// The part size of an S3 multipart upload, when its ETag (`"<md5>-<parts>"`) and size name
/// exactly one whole number of MiB: ranges aligned to the stored parts are what S3 serves best
/// (AWS's own guidance). Every part but the last has that size, so it lies in
/// `[size / parts, size / (parts - 1))`; uploaders use whole MiB, and when one MiB multiple fits,
/// it is the one. Otherwise (or if the guess were wrong) the parts are merely unaligned.
fn upload_part_size(size: u64, e_tag: &str) -> Option<u64> {
    const MIB: u64 = 1 << 20;
    let parts: u64 = e_tag.trim_matches('"').rsplit_once('-')?.1.parse().ok()?;
    if parts < 2 {
        return None;
    }
    let smallest = size.div_ceil(parts).div_ceil(MIB);
    let largest = (size - 1) / (parts - 1) / MIB;
    (smallest == largest && smallest > 0).then_some(smallest * MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u64, e_tag: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            location: object_store::path::Path::from("t"),
            last_modified: Default::default(),
            size,
            e_tag: e_tag.map(str::to_owned),
            version: None,
        }
    }

    const TUNING: Tuning = Tuning {
        streams: 8,
        part_size: 1 << 20,
    };

    #[test]
    fn parts_align_to_an_s3_multipart_upload_named_by_its_etag() {
        const MIB: u64 = 1 << 20;
        // The AWS CLI's 8 MiB parts: 12 whole ones and a 4 MiB tail.
        assert_eq!(upload_part_size(100 * MIB, "\"abc-13\""), Some(8 * MIB));
        assert_eq!(upload_part_size(1000 * MIB, "\"abc-1000\""), Some(MIB));
        // Not multipart; 5 to 9 MiB all fit; no whole MiB fits.
        assert_eq!(upload_part_size(64 * MIB, "\"abc\""), None);
        assert_eq!(upload_part_size(10 * MIB, "\"abc-2\""), None);
        assert_eq!(upload_part_size(25 * MIB, "\"abc-10\""), None);
        let sixteen = Tuning {
            part_size: 16 * MIB,
            ..TUNING
        };
        let aligned = plan(&meta(100 * MIB, Some("\"abc-13\"")), sixteen).expect("parts");
        assert_eq!(aligned.part_size, 8 * MIB);
        // Over four times the configured part: a broken part would cost too much again.
        let too_large = plan(&meta(100 * MIB, Some("\"abc-13\"")), TUNING).expect("parts");
        assert_eq!(too_large.part_size, TUNING.part_size);
    }

    #[test]
    fn only_a_large_object_pinned_to_a_strong_etag_is_split() {
        assert!(plan(&meta(4 << 20, Some("\"v1\"")), TUNING).is_ok());
        assert_eq!(
            plan(&meta((4 << 20) - 1, Some("\"v1\"")), TUNING).err(),
            Some(Fallback::Small {
                size: (4 << 20) - 1,
                part_size: 1 << 20
            })
        );
        assert_eq!(
            plan(&meta(64 << 20, None), TUNING).err(),
            Some(Fallback::Unversioned)
        );
        assert_eq!(
            plan(&meta(64 << 20, Some("W/\"v1\"")), TUNING).err(),
            Some(Fallback::Unversioned)
        );
        let one = Tuning {
            streams: 1,
            ..TUNING
        };
        assert_eq!(
            plan(&meta(64 << 20, Some("\"v1\"")), one).err(),
            Some(Fallback::OneStream)
        );
    }
}
