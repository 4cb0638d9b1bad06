//! A bound on the tar headers the tar crate reads whole into memory: GNU long names and long
//! link names (`L`, `K`) and PAX extended headers (`x`, `g`) are read into one buffer of the
//! size their header announces, so a 1 GiB long name (a 1 MB gzip layer) would take 1 GiB of a
//! copy Pod limited to 128 MiB, on every attempt.
//!
//! [`BoundedHeaders`] sits between the decompressor and the tar crate and follows the archive's
//! layout as the bytes go through: a 512-byte header, then the entry's data padded to 512 bytes
//! (for a GNU sparse entry, its extension headers first). It fails the read that would hand over
//! a header of such an entry over [`HEADER_LIMIT`], so the tar crate never sees it. The size of
//! the next entry may be given by a PAX `size` record, as the tar crate reads it; those records
//! are small (they are bounded here) and are parsed for that one key.

use std::io::Read;

/// Largest long name, long link or PAX header accepted: real ones are a few hundred bytes.
pub const HEADER_LIMIT: u64 = 64 << 10;

const BLOCK: usize = 512;

/// A header over [`HEADER_LIMIT`], as the io error the tar crate passes on.
#[derive(Debug, thiserror::Error)]
#[error("a tar {kind} header of {size} bytes")]
pub struct TooLarge {
    pub kind: &'static str,
    pub size: u64,
}

/// Where in the archive the next byte is.
enum At {
    /// In a 512-byte header (or GNU sparse extension) block; `extension` for the latter.
    Header { extension: bool },
    /// In an entry's data and padding: `left` bytes, then the next header.
    Data { left: u64 },
    /// In a PAX extended header's records (kept to find `size`), then `padding` bytes.
    Pax { left: u64, padding: u64 },
}

/// A tar stream that refuses oversized long-name and PAX headers before they are read.
pub struct BoundedHeaders<R> {
    inner: R,
    at: At,
    block: Vec<u8>,
    pax: Vec<u8>,
    /// The next entry's size from a PAX `size` record.
    next_size: Option<u64>,
    /// Data of a GNU sparse entry, passed once its extension blocks are.
    after_extensions: u64,
}

impl<R: Read> BoundedHeaders<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            at: At::Header { extension: false },
            block: Vec::with_capacity(BLOCK),
            pax: vec![],
            next_size: None,
            after_extensions: 0,
        }
    }

    /// Follows `bytes` through the archive's layout.
    fn follow(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let taken = match &mut self.at {
                At::Data { left } => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *left -= n as u64;
                    n
                }
                At::Pax { left, .. } => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *left -= n as u64;
                    self.pax.extend_from_slice(&bytes[..n]);
                    n
                }
                At::Header { .. } => {
                    let n = (BLOCK - self.block.len()).min(bytes.len());
                    self.block.extend_from_slice(&bytes[..n]);
                    n
                }
            };
            bytes = &bytes[taken..];
            self.next()?;
        }
        Ok(())
    }

    /// Moves on once the current block, data or records are whole.
    fn next(&mut self) -> std::io::Result<()> {
        match self.at {
            At::Data { left: 0 } => self.at = At::Header { extension: false },
            At::Pax { left: 0, padding } => {
                self.next_size = pax_size(&std::mem::take(&mut self.pax)).or(self.next_size);
                self.at = At::Data { left: padding };
            }
            At::Header { extension } if self.block.len() == BLOCK => {
                let block = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK));
                self.at = if extension {
                    self.extension(&block)
                } else {
                    self.header(&block)?
                };
            }
            _ => {}
        }
        Ok(())
    }

    /// What follows a header block.
    fn header(&mut self, block: &[u8]) -> std::io::Result<At> {
        let kind = block[156];
        let size = match kind {
            // The PAX size applies to the entry after the extended headers.
            b'x' | b'g' | b'L' | b'K' => header_size(block),
            _ => self.next_size.take().unwrap_or_else(|| header_size(block)),
        };
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let named = match kind {
            b'L' => Some("GNU long name"),
            b'K' => Some("GNU long link name"),
            b'x' => Some("PAX extended"),
            b'g' => Some("PAX global"),
            _ => None,
        };
        if let Some(kind) = named
            && size > HEADER_LIMIT
        {
            return Err(std::io::Error::other(TooLarge { kind, size }));
        }
        Ok(match kind {
            b'x' => At::Pax {
                left: size,
                padding: padded - size,
            },
            // A GNU sparse entry whose map goes on in extension blocks before its data.
            b'S' if block[482] != 0 => {
                self.after_extensions = padded;
                At::Header { extension: true }
            }
            _ => At::Data { left: padded },
        })
    }

    /// What follows a GNU sparse extension block: another one, or the entry's data.
    fn extension(&mut self, block: &[u8]) -> At {
        if block[504] != 0 {
            At::Header { extension: true }
        } else {
            At::Data {
                left: std::mem::take(&mut self.after_extensions),
            }
        }
    }
}

impl<R: Read> Read for BoundedHeaders<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.follow(&buf[..n])?;
        Ok(n)
    }
}

/// A header's size field: octal digits, or GNU's base-256 when its first byte has the top bit.
fn header_size(block: &[u8]) -> u64 {
    let field = &block[124..136];
    if field[0] & 0x80 != 0 {
        return field[1..].iter().fold(u64::from(field[0] & 0x7f), |n, b| {
            n.saturating_mul(256).saturating_add(u64::from(*b))
        });
    }
    let digits = String::from_utf8_lossy(field);
    let digits = digits.trim_matches(|c: char| c == '\0' || c == ' ');
    u64::from_str_radix(digits, 8).unwrap_or(0)
}

/// The value of the `size` record of PAX extended header records (`<len> size=<n>\n`).
fn pax_size(records: &[u8]) -> Option<u64> {
    String::from_utf8_lossy(records)
        .lines()
        .filter_map(|record| record.split_once(' ')?.1.strip_prefix("size="))
        .filter_map(|n| n.parse().ok())
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header block of `kind` announcing `size` bytes, with a valid checksum.
    fn header(kind: tar::EntryType, size: u64) -> Vec<u8> {
        let mut header = tar::Header::new_gnu();
        header.set_path("././@LongLink").expect("name");
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(0o644);
        header.set_cksum();
        header.as_bytes().to_vec()
    }

    /// `head`, then `len` bytes of `a` made as they are read (never held), counting what was read.
    struct Lazy {
        head: std::io::Cursor<Vec<u8>>,
        left: u64,
        read: u64,
    }

    impl Read for Lazy {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = match self.head.read(buf)? {
                0 => {
                    let n = usize::try_from(self.left)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    buf[..n].fill(b'a');
                    self.left -= n as u64;
                    n
                }
                n => n,
            };
            self.read += n as u64;
            Ok(n)
        }
    }

    fn refused(kind: tar::EntryType, before: Vec<u8>) -> (TooLarge, u64) {
        const GIB: u64 = 1 << 30;
        let mut head = before;
        head.extend(header(kind, GIB));
        let mut lazy = Lazy {
            head: std::io::Cursor::new(head),
            left: GIB,
            read: 0,
        };
        let mut archive = tar::Archive::new(BoundedHeaders::new(&mut lazy));
        let error = archive
            .entries()
            .expect("entries")
            .find_map(Result::err)
            .expect("refused");
        let inner = error.into_inner().expect("the guard's error");
        let too_large = *inner.downcast::<TooLarge>().expect("TooLarge");
        (too_large, lazy.read)
    }

    #[test]
    fn a_one_gib_long_name_or_pax_header_is_refused_before_it_is_read() {
        let cases = [
            (tar::EntryType::GNULongName, "GNU long name"),
            (tar::EntryType::GNULongLink, "GNU long link name"),
            (tar::EntryType::XHeader, "PAX extended"),
            (tar::EntryType::XGlobalHeader, "PAX global"),
        ];
        for (kind, named) in cases {
            let (error, read) = refused(kind, vec![]);
            assert_eq!((error.kind, error.size), (named, 1 << 30));
            assert!(
                read <= 1 << 20,
                "{named}: {read} bytes read before the refusal"
            );
        }
    }

    /// The archive's entries without the two zero blocks that end it, so more can follow.
    fn without_end(tar: tar::Builder<Vec<u8>>) -> Vec<u8> {
        let mut bytes = tar.into_inner().expect("tar");
        bytes.truncate(bytes.len() - 2 * BLOCK);
        bytes
    }

    /// A file whose true size is in a PAX `size` record, its ustar field saying 0.
    fn pax_sized_file(data: &[u8]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        let size = data.len().to_string();
        tar.append_pax_extensions([("size", size.as_bytes())])
            .expect("pax");
        let mut bytes = without_end(tar);
        let mut file = tar::Header::new_ustar();
        file.set_path("disk/disk.img").expect("path");
        file.set_size(0);
        file.set_mode(0o644);
        file.set_cksum();
        bytes.extend(file.as_bytes());
        bytes.extend(data);
        bytes.resize(bytes.len().div_ceil(BLOCK) * BLOCK, 0);
        bytes
    }

    #[test]
    fn the_layout_is_followed_past_long_names_pax_sizes_and_file_data() {
        // A long name made by the tar crate itself, then a file whose size is in PAX: a huge
        // long name after them is found only if every size before it was read right.
        let mut tar = tar::Builder::new(Vec::new());
        let mut file = tar::Header::new_gnu();
        file.set_size(5000);
        file.set_mode(0o644);
        let long = format!("disk/{}.img", "n".repeat(300));
        tar.append_data(&mut file, &long, &[1u8; 5000][..])
            .expect("long name");
        let mut before = without_end(tar);
        before.extend(pax_sized_file(&[2u8; 70_000]));
        let (error, _) = refused(tar::EntryType::GNULongName, before.clone());
        assert_eq!(error.size, 1 << 30);

        // The same archive, well ended, passes through untouched and reads as it is.
        before.extend([0u8; 2 * BLOCK]);
        let mut passed = vec![];
        BoundedHeaders::new(&before[..])
            .read_to_end(&mut passed)
            .expect("read");
        assert_eq!(passed, before);
        let mut archive = tar::Archive::new(BoundedHeaders::new(&before[..]));
        let sizes: Vec<u64> = archive
            .entries()
            .expect("entries")
            .map(|e| e.expect("entry").size())
            .collect();
        assert_eq!(sizes, [5000, 70_000]);
    }

    #[test]
    fn sizes_are_read_in_octal_and_in_base_256() {
        let mut block = vec![0u8; BLOCK];
        block[124..136].copy_from_slice(b"00000001750\0");
        assert_eq!(header_size(&block), 1000);
        block[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x04, 0]);
        assert_eq!(header_size(&block), 1 << 10);
        assert_eq!(pax_size(b"20 size=123456789\n10 a=b\n"), Some(123_456_789));
    }
}
