//! The binary chunk index: the ordered list of a release's chunks.
//!
//! Layout, little-endian:
//! ```text
//! offset size field
//!      0    8 magic "FLOTIDX\0"
//!      8    2 format version (1)
//!     10    2 reserved (0)
//!     12    4 min chunk size
//!     16    4 average chunk size
//!     20    4 max chunk size
//!     24    8 image size in bytes
//!     32    8 chunk count
//!     40  36n records: 32-byte BLAKE3 chunk id, u32 length
//! ```
//! Offsets are the running sum of lengths. The index is named by the BLAKE3 of its encoding
//! ([`IndexId`]). Decoding checks the declared count against the byte length and the image
//! size before it allocates anything, so a hostile index cannot make a device allocate more
//! than its own length.

use std::io::Read;

use crate::chunking::{ChunkParams, ChunkParamsError};
use crate::ids::{ChunkId, IndexId};

/// The index's magic bytes.
pub const MAGIC: [u8; 8] = *b"FLOTIDX\0";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u16 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 40;
/// Size of one chunk record.
pub const RECORD_LEN: usize = 36;
/// Largest image an index may describe (16 TiB): a sanity bound on a field that sizes
/// allocations.
pub const MAX_IMAGE_SIZE: u64 = 1 << 44;
/// Largest encoded index accepted (64 MiB, about 1.8 million chunks). A 1 GiB image at the
/// image preset needs about 600 KiB.
pub const MAX_ENCODED_LEN: u64 = 64 << 20;

/// Why an index was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// Shorter than its fixed header.
    #[error("chunk index is {len} bytes, shorter than its {HEADER_LEN}-byte header; the file is truncated")]
    Truncated {
        /// Bytes present.
        len: usize,
    },
    /// Not a Flotilla index.
    #[error("not a Flotilla chunk index (bad magic bytes)")]
    BadMagic,
    /// A format this build does not know.
    #[error(
        "chunk index format version {0} is not supported (this build reads version {FORMAT_VERSION}); upgrade the agent"
    )]
    UnsupportedVersion(u16),
    /// Header chunking parameters are invalid.
    #[error("chunk index has invalid chunking parameters: {0}")]
    Params(#[from] ChunkParamsError),
    /// The declared image size exceeds [`MAX_IMAGE_SIZE`].
    #[error("chunk index declares an image of {0} bytes, above the 16 TiB limit")]
    ImageTooLarge(u64),
    /// More chunks than the image size allows at the minimum chunk size.
    #[error("chunk index declares {count} chunks, but {max} is the most an image of its size can have")]
    TooManyChunks {
        /// Declared count.
        count: u64,
        /// Largest possible count.
        max: u64,
    },
    /// Byte length disagrees with the declared count.
    #[error("chunk index is {actual} bytes, but its header implies {expected}")]
    LengthMismatch {
        /// Length implied by the header.
        expected: u64,
        /// Actual length.
        actual: u64,
    },
    /// Larger than [`MAX_ENCODED_LEN`] or than the size the manifest declared.
    #[error("chunk index is larger than the {limit} bytes allowed")]
    TooLarge {
        /// The limit that was exceeded.
        limit: u64,
    },
    /// A record's length is outside the chunking parameters.
    #[error("chunk {position} has length {len}, outside [{min}, {max}]")]
    BadChunkLength {
        /// Zero-based record number.
        position: u64,
        /// Declared length.
        len: u32,
        /// Smallest allowed here.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
    /// Lengths do not add up to the image size.
    #[error("chunk lengths add up to {sum} bytes, but the index declares an image of {declared}")]
    SizeMismatch {
        /// Declared image size.
        declared: u64,
        /// Sum of record lengths.
        sum: u64,
    },
    /// Reading the index failed.
    #[error("reading chunk index: {0}")]
    Io(#[from] std::io::Error),
}

/// One chunk of an image: its id and uncompressed length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// BLAKE3 of the chunk.
    pub id: ChunkId,
    /// Uncompressed length in bytes.
    pub len: u32,
}

/// The ordered chunk list of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkIndex {
    params: ChunkParams,
    image_size: u64,
    entries: Vec<IndexEntry>,
}

impl ChunkIndex {
    /// Builds an index and checks it as [`decode`](Self::decode) would.
    ///
    /// # Errors
    /// The same structural errors `decode` reports (bad lengths, size mismatch).
    pub fn new(params: ChunkParams, entries: Vec<IndexEntry>) -> Result<Self, IndexError> {
        params.validate()?;
        let image_size = entries.iter().map(|e| u64::from(e.len)).sum();
        let index = Self { params, image_size, entries };
        index.check_entries()?;
        Ok(index)
    }

    /// Chunking parameters the image was cut with.
    pub fn params(&self) -> ChunkParams {
        self.params
    }

    /// Total image size.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// The chunks, in image order.
    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the image is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Chunks with their byte offsets in the image.
    pub fn iter_with_offsets(&self) -> impl Iterator<Item = (u64, &IndexEntry)> + '_ {
        self.entries.iter().scan(0u64, |offset, e| {
            let at = *offset;
            *offset += u64::from(e.len);
            Some((at, e))
        })
    }

    /// Length of the encoding.
    pub fn encoded_len(&self) -> u64 {
        HEADER_LEN as u64 + RECORD_LEN as u64 * self.entries.len() as u64
    }

    /// The binary encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(usize::try_from(self.encoded_len()).unwrap_or(0));
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.params.min.to_le_bytes());
        out.extend_from_slice(&self.params.avg.to_le_bytes());
        out.extend_from_slice(&self.params.max.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(e.id.as_bytes());
            out.extend_from_slice(&e.len.to_le_bytes());
        }
        out
    }

    /// The index's content id (BLAKE3 of [`encode`](Self::encode)).
    pub fn id(&self) -> IndexId {
        IndexId::of(&self.encode())
    }

    /// Decodes and checks an index.
    ///
    /// # Errors
    /// Any [`IndexError`] other than `Io`; the count is checked against the byte length, the
    /// image size and [`MAX_ENCODED_LEN`] before anything is allocated.
    pub fn decode(bytes: &[u8]) -> Result<Self, IndexError> {
        if bytes.len() as u64 > MAX_ENCODED_LEN {
            return Err(IndexError::TooLarge { limit: MAX_ENCODED_LEN });
        }
        if bytes.len() < HEADER_LEN {
            return Err(IndexError::Truncated { len: bytes.len() });
        }
        let (header, body) = bytes.split_at(HEADER_LEN);
        if header[..8] != MAGIC {
            return Err(IndexError::BadMagic);
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != FORMAT_VERSION {
            return Err(IndexError::UnsupportedVersion(version));
        }
        let u32_at = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let params = ChunkParams { min: u32_at(12), avg: u32_at(16), max: u32_at(20) };
        params.validate()?;
        let image_size = u64_at(24);
        let count = u64_at(32);
        if image_size > MAX_IMAGE_SIZE {
            return Err(IndexError::ImageTooLarge(image_size));
        }
        let max_count = image_size.div_ceil(u64::from(params.min));
        if count > max_count {
            return Err(IndexError::TooManyChunks { count, max: max_count });
        }
        let expected = count * RECORD_LEN as u64;
        if body.len() as u64 != expected {
            return Err(IndexError::LengthMismatch {
                expected: expected + HEADER_LEN as u64,
                actual: bytes.len() as u64,
            });
        }
        let entries = body
            .chunks_exact(RECORD_LEN)
            .map(|rec| {
                let mut id = [0u8; 32];
                id.copy_from_slice(&rec[..32]);
                IndexEntry {
                    id: ChunkId::from_bytes(id),
                    len: u32::from_le_bytes([rec[32], rec[33], rec[34], rec[35]]),
                }
            })
            .collect();
        let index = Self { params, image_size, entries };
        index.check_entries()?;
        Ok(index)
    }

    /// Reads at most `declared_len` bytes (the size the manifest gives) and decodes them.
    ///
    /// # Errors
    /// `TooLarge` when the reader has more than `declared_len` bytes, `LengthMismatch` when it
    /// has fewer, plus everything [`decode`](Self::decode) reports.
    pub fn read_from(reader: impl Read, declared_len: u64) -> Result<Self, IndexError> {
        let limit = declared_len.min(MAX_ENCODED_LEN);
        if declared_len > MAX_ENCODED_LEN {
            return Err(IndexError::TooLarge { limit: MAX_ENCODED_LEN });
        }
        let mut buf = Vec::with_capacity(usize::try_from(limit).unwrap_or(0));
        reader.take(limit + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > limit {
            return Err(IndexError::TooLarge { limit });
        }
        if (buf.len() as u64) < limit {
            return Err(IndexError::LengthMismatch { expected: limit, actual: buf.len() as u64 });
        }
        Self::decode(&buf)
    }

    fn check_entries(&self) -> Result<(), IndexError> {
        let last = self.entries.len().saturating_sub(1);
        let mut sum = 0u64;
        for (i, e) in self.entries.iter().enumerate() {
            // FastCDC only cuts a chunk shorter than `min` at the end of the image.
            let min = if i == last { 1 } else { self.params.min };
            if e.len < min || e.len > self.params.max {
                return Err(IndexError::BadChunkLength { position: i as u64, len: e.len, min, max: self.params.max });
            }
            sum += u64::from(e.len);
        }
        if sum != self.image_size {
            return Err(IndexError::SizeMismatch { declared: self.image_size, sum });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ChunkIndex {
        let p = ChunkParams::BUNDLE;
        ChunkIndex::new(
            p,
            vec![
                IndexEntry { id: ChunkId::of(b"a"), len: p.min },
                IndexEntry { id: ChunkId::of(b"b"), len: p.max },
                IndexEntry { id: ChunkId::of(b"c"), len: 7 },
            ],
        )
        .unwrap()
    }

    #[test]
    fn roundtrip() {
        let idx = sample();
        let bytes = idx.encode();
        assert_eq!(bytes.len() as u64, idx.encoded_len());
        assert_eq!(ChunkIndex::decode(&bytes).unwrap(), idx);
        assert_eq!(ChunkIndex::read_from(&bytes[..], bytes.len() as u64).unwrap(), idx);
    }

    #[test]
    fn absurd_count_rejected_before_allocation() {
        let mut bytes = sample().encode();
        bytes[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(ChunkIndex::decode(&bytes), Err(IndexError::TooManyChunks { .. })));
    }

    #[test]
    fn short_middle_chunk_rejected() {
        let mut bytes = sample().encode();
        bytes[HEADER_LEN + 32..HEADER_LEN + 36].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(ChunkIndex::decode(&bytes), Err(IndexError::BadChunkLength { position: 0, .. })));
    }

    #[test]
    fn reader_longer_than_declared_is_refused() {
        let bytes = sample().encode();
        let err = ChunkIndex::read_from(&bytes[..], bytes.len() as u64 - 1).unwrap_err();
        assert!(matches!(err, IndexError::TooLarge { .. }));
    }
}
