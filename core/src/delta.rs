//! Binary patches between two images, applied streaming with bounded memory.
//!
//! A patch is a self-describing container: a fixed header, a region table, then each region's
//! payload in table order. Regions cover the new image in order, each producing one
//! contiguous new byte range from a bounded *reference*: up to [`MAX_EXTENTS`] byte ranges of
//! the old image, at most [`DeltaLimits::max_window`] bytes in total.
//!
//! ```text
//! offset size field (little-endian)
//!      0    8 magic "FLOTDLT\0"
//!      8    2 format version (1)
//!     10    2 flags (bit 0: the table is a u64 decoded length + a zstd frame)
//!     12    4 region count
//!     16    8 old image size
//!     24    8 new image size
//!     32    8 region table length in bytes (as stored)
//!     40    8 window: the largest reference or patched region in this patch
//!     48    … region table, per region:
//!               u8 op (0 copy, 1 zstd, 2 bsdiff, 3 sparse bsdiff), u8 reserved, u16 extent count,
//!               u64 new length, u64 payload length, then per extent u64 old offset, u64 length
//!      …    … payloads, concatenated in table order
//! ```
//!
//! Ops: **copy** writes the extents' old bytes (no payload; extents may add up to any length);
//! **zstd** is a zstd frame compressed with the concatenated extents as reference prefix
//! (`zstd --patch-from` on a window) and long-distance matching; **bsdiff** is a zstd frame of
//! bsdiff-style records (add-to-old bytes, literal bytes, seek) against the concatenated
//! extents; **sparse bsdiff** is the same with the add-to-old bytes run-length coded, so one
//! region carries many small edits and the unchanged stretches between them for a few bytes
//! each (op 3 came after the first agents: a reader without it refuses the table as
//! malformed, and an agent then falls back to chunks). A zstd op with no extents is a plain
//! zstd literal.
//!
//! [`apply`] reads the header and table (bounded by [`DeltaLimits::max_table_len`]), checks
//! every offset and length against the old image and the limits before it allocates, then
//! streams: it holds one reference (≤ window) and the zstd decoder's window (≤ the region's
//! new length, itself ≤ window) plus small buffers — about 2 × window whatever the image size.
//! The caller verifies the output's chunk ids and SHA-256; a patch does not repeat them.
//!
//! Contract notes for the agent: a region's reference is a *list* of old extents (not one
//! range), so a changed file's old copy can be found wherever it moved; [`PatchHeader::read`]
//! exposes the table, so a planner can see which new ranges are copies and which are patched.
//! [`encode`] holds the patch it builds in memory (bounded by
//! [`EncodeOptions::max_patch_size`]) because the table precedes the payloads.

use std::io::{self, Read, Write};

use crate::index::MAX_IMAGE_SIZE;
use crate::manifest::DeltaMethod;

mod bsdiff;
mod encode;

pub use encode::{EncodeOptions, EncodeStats, encode};

/// The patch container's magic bytes.
pub const MAGIC: [u8; 8] = *b"FLOTDLT\0";
/// The only container version this build reads and writes.
pub const FORMAT_VERSION: u16 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 48;
/// Size of a region record without its extents.
pub const REGION_RECORD_LEN: usize = 20;
/// Size of one extent in a region record.
pub const EXTENT_RECORD_LEN: usize = 16;
/// Most old extents one region may reference.
pub const MAX_EXTENTS: usize = 1024;
/// Default [`DeltaLimits::max_window`]: 8 MiB keeps two windows and the rest of the agent
/// under its 32 MiB bound.
pub const DEFAULT_MAX_WINDOW: u64 = 8 << 20;

/// Header flag: the region table is stored as a u64 decoded length and a zstd frame.
pub const FLAG_TABLE_ZSTD: u16 = 1;

/// Bytes moved per read or write while copying and decoding.
const IO_BUF_LEN: usize = 64 << 10;

/// What a patch may demand of the applier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeltaLimits {
    /// Largest reference (sum of a region's old extents) and largest patched region.
    pub max_window: u64,
    /// Largest region table in bytes.
    pub max_table_len: u64,
    /// Largest new image.
    pub max_new_size: u64,
}

impl Default for DeltaLimits {
    fn default() -> Self {
        Self { max_window: DEFAULT_MAX_WINDOW, max_table_len: 4 << 20, max_new_size: MAX_IMAGE_SIZE }
    }
}

impl DeltaLimits {
    /// Limits with another window (the encoder's [`EncodeOptions::window`] must not exceed it).
    pub fn with_window(max_window: u64) -> Self {
        Self { max_window, ..Self::default() }
    }
}

/// Why a patch could not be built or applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    /// Not a Flotilla patch.
    #[error("not a Flotilla patch (bad magic bytes)")]
    BadMagic,
    /// A container version this build does not know.
    #[error("patch format version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    /// The patch ended early.
    #[error("patch is truncated: it ended inside {what}")]
    Truncated {
        /// Which part was cut.
        what: &'static str,
    },
    /// The patch goes on after its last region.
    #[error("patch has bytes after its last region")]
    TrailingBytes,
    /// The patch needs a larger window than the applier allows.
    #[error("patch needs a {declared}-byte window, the limit is {limit}")]
    WindowTooLarge {
        /// Declared by the patch.
        declared: u64,
        /// Allowed.
        limit: u64,
    },
    /// The region table is larger than allowed.
    #[error("patch region table is {declared} bytes, the limit is {limit}")]
    TableTooLarge {
        /// Declared by the patch.
        declared: u64,
        /// Allowed.
        limit: u64,
    },
    /// The new image is larger than allowed.
    #[error("patch produces {declared} bytes, the limit is {limit}")]
    ImageTooLarge {
        /// Declared by the patch.
        declared: u64,
        /// Allowed.
        limit: u64,
    },
    /// The header or region table is inconsistent.
    #[error("patch is malformed: {reason}")]
    Malformed {
        /// What is inconsistent.
        reason: &'static str,
    },
    /// The old image is not the one the patch was made from.
    #[error("patch applies to an old image of {expected} bytes, this one has {actual}")]
    BaseMismatch {
        /// Size the patch declares.
        expected: u64,
        /// Size of the image given.
        actual: u64,
    },
    /// A region's payload did not decode to its declared length.
    #[error("patch region {region} is corrupt: {reason}")]
    CorruptRegion {
        /// Zero-based region number.
        region: u32,
        /// What went wrong.
        reason: String,
    },
    /// Reading the patch failed.
    #[error("reading the patch: {0}")]
    ReadPatch(#[source] io::Error),
    /// Reading the old image failed.
    #[error("reading the old image: {0}")]
    ReadOld(#[source] io::Error),
    /// Writing the new image failed.
    #[error("writing the new image: {0}")]
    Write(#[source] io::Error),
    /// A chunk index does not describe the image it came with.
    #[error("the {which} chunk index describes {index_size} bytes, the image has {image_size}")]
    IndexMismatch {
        /// `old` or `new`.
        which: &'static str,
        /// Size in the index.
        index_size: u64,
        /// Size of the image.
        image_size: u64,
    },
    /// The patch being built outgrew [`EncodeOptions::max_patch_size`].
    #[error("the patch outgrew the {limit}-byte limit; ship chunks instead")]
    PatchTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The encoder options are unusable.
    #[error("invalid encode options: {reason}")]
    InvalidOptions {
        /// What is wrong.
        reason: &'static str,
    },
    /// The compressor failed (a bug or out of memory).
    #[error("compressing a patch region: {0}")]
    Compress(#[source] io::Error),
}

/// A read-only image addressed by offset: the old image a patch refers to.
///
/// `Sync` because the encoder reads references from several threads.
pub trait OldImage: Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    ///
    /// # Errors
    /// Any I/O error; reading past the end is `UnexpectedEof`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl OldImage for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl OldImage for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src =
            start.checked_add(buf.len()).and_then(|end| self.get(start..end)).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl OldImage for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_at(buf, offset)
    }
}

/// How one region produces its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegionOp {
    /// The extents' old bytes, verbatim.
    Copy,
    /// A zstd frame with the extents as reference prefix.
    Zstd,
    /// bsdiff-style records against the extents, in a zstd frame.
    Bsdiff,
    /// bsdiff-style records with run-length coded add bytes, in a zstd frame.
    BsdiffSparse,
}

impl RegionOp {
    fn code(self) -> u8 {
        match self {
            Self::Copy => 0,
            Self::Zstd => 1,
            Self::Bsdiff => 2,
            Self::BsdiffSparse => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Copy),
            1 => Some(Self::Zstd),
            2 => Some(Self::Bsdiff),
            3 => Some(Self::BsdiffSparse),
            _ => None,
        }
    }
}

/// A byte range of the old image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the old image.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// One entry of a patch's region table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// How the bytes are produced.
    pub op: RegionOp,
    /// Offset of the produced bytes in the new image (the running sum of `new_len`).
    pub new_offset: u64,
    /// Bytes produced.
    pub new_len: u64,
    /// Old bytes referenced, in reference order.
    pub extents: Vec<Extent>,
    /// Offset of the payload in the patch.
    pub payload_offset: u64,
    /// Payload length.
    pub payload_len: u64,
}

impl Region {
    /// Sum of the extents' lengths.
    pub fn reference_len(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }
}

/// A patch's header and region table, checked against limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchHeader {
    /// Size of the old image the patch applies to.
    pub old_size: u64,
    /// Size of the image it produces.
    pub new_size: u64,
    /// Largest reference or patched region.
    pub window: u64,
    /// The regions, in new-image order.
    pub regions: Vec<Region>,
}

impl PatchHeader {
    /// Reads and checks the header and region table, leaving `patch` at the first payload.
    ///
    /// # Errors
    /// [`DeltaError::BadMagic`], [`DeltaError::UnsupportedVersion`], limits exceeded, a
    /// table that is inconsistent (extents past the old image, lengths that do not add up),
    /// or a truncated patch.
    pub fn read(patch: &mut dyn Read, limits: &DeltaLimits) -> Result<Self, DeltaError> {
        let mut fixed = [0u8; HEADER_LEN];
        read_full(patch, &mut fixed, "the header")?;
        let Fixed { flags, count, old_size, new_size, table_len, window } = Fixed::parse(&fixed, limits)?;
        let stored_len = usize::try_from(table_len).map_err(|_| DeltaError::Malformed { reason: "table length" })?;
        let mut stored = vec![0u8; stored_len];
        read_full(patch, &mut stored, "the region table")?;
        let table = if flags & FLAG_TABLE_ZSTD != 0 {
            // u64 decoded length, then one zstd frame; the decoded length is bounded too.
            let raw_len = stored
                .get(..8)
                .map(|b| u64::from_le_bytes(word(b)))
                .ok_or(DeltaError::Malformed { reason: "compressed region table without its length" })?;
            if raw_len > limits.max_table_len {
                return Err(DeltaError::TableTooLarge { declared: raw_len, limit: limits.max_table_len });
            }
            let raw_len = usize::try_from(raw_len).map_err(|_| DeltaError::Malformed { reason: "table length" })?;
            let raw = zstd::bulk::decompress(&stored[8..], raw_len)
                .map_err(|_| DeltaError::Malformed { reason: "compressed region table does not decode" })?;
            if raw.len() != raw_len {
                return Err(DeltaError::Malformed { reason: "compressed region table has the wrong length" });
            }
            raw
        } else {
            stored
        };
        if u64::from(count) * REGION_RECORD_LEN as u64 > table.len() as u64 {
            return Err(DeltaError::Malformed { reason: "region count does not fit the table length" });
        }
        let payloads_start = HEADER_LEN as u64 + table_len;
        let regions = parse_table(&table, count, old_size, new_size, window, payloads_start)?;
        Ok(Self { old_size, new_size, window, regions })
    }

    /// Bytes the header and region table occupy at the start of a patch, from its fixed
    /// header (the first [`HEADER_LEN`] bytes), so a reader can fetch exactly them before it
    /// knows anything else. The same checks as [`PatchHeader::read`] apply to the fixed part.
    ///
    /// # Errors
    /// [`DeltaError::BadMagic`], [`DeltaError::UnsupportedVersion`], limits exceeded, unknown
    /// flags.
    pub fn stored_len(fixed: &[u8; HEADER_LEN], limits: &DeltaLimits) -> Result<u64, DeltaError> {
        Ok(HEADER_LEN as u64 + Fixed::parse(fixed, limits)?.table_len)
    }

    /// Where the last payload ends: the length of the whole patch.
    pub fn payload_end(&self) -> u64 {
        self.regions.last().map_or(0, |r| r.payload_offset + r.payload_len)
    }

    /// Encoded length of the header and table.
    pub fn encoded_len(&self) -> u64 {
        self.encode().len() as u64
    }

    fn raw_table(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for region in &self.regions {
            out.push(region.op.code());
            out.push(0);
            out.extend_from_slice(&u16::try_from(region.extents.len()).unwrap_or(u16::MAX).to_le_bytes());
            out.extend_from_slice(&region.new_len.to_le_bytes());
            out.extend_from_slice(&region.payload_len.to_le_bytes());
            for extent in &region.extents {
                out.extend_from_slice(&extent.offset.to_le_bytes());
                out.extend_from_slice(&extent.len.to_le_bytes());
            }
        }
        out
    }

    /// Encodes the header and table (the payloads follow them). The table is stored zstd
    /// compressed when that is smaller (large images have thousands of regions).
    pub fn encode(&self) -> Vec<u8> {
        let raw = self.raw_table();
        let (flags, table) = match zstd::bulk::compress(&raw, 19) {
            Ok(z) if z.len() + 8 < raw.len() => {
                let mut t = (raw.len() as u64).to_le_bytes().to_vec();
                t.extend_from_slice(&z);
                (FLAG_TABLE_ZSTD, t)
            }
            _ => (0u16, raw),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + table.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&u32::try_from(self.regions.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&self.old_size.to_le_bytes());
        out.extend_from_slice(&self.new_size.to_le_bytes());
        out.extend_from_slice(&(table.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.window.to_le_bytes());
        out.extend_from_slice(&table);
        out
    }

    /// The manifest method that describes this patch: a single patched region names its op,
    /// anything else is [`DeltaMethod::Regions`].
    pub fn method(&self) -> DeltaMethod {
        let mut patched = self.regions.iter().filter(|r| r.op != RegionOp::Copy);
        match (patched.next(), patched.next()) {
            (Some(r), None) if matches!(r.op, RegionOp::Bsdiff | RegionOp::BsdiffSparse) => DeltaMethod::Bsdiff,
            (Some(_), None) | (None, None) => DeltaMethod::Zstd,
            _ => DeltaMethod::Regions,
        }
    }
}

/// The fixed header's fields, checked against the limits.
struct Fixed {
    flags: u16,
    count: u32,
    old_size: u64,
    new_size: u64,
    table_len: u64,
    window: u64,
}

impl Fixed {
    fn parse(fixed: &[u8; HEADER_LEN], limits: &DeltaLimits) -> Result<Self, DeltaError> {
        if fixed[..8] != MAGIC {
            return Err(DeltaError::BadMagic);
        }
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        if version != FORMAT_VERSION {
            return Err(DeltaError::UnsupportedVersion(version));
        }
        let flags = u16::from_le_bytes([fixed[10], fixed[11]]);
        let count = u32::from_le_bytes(word(&fixed[12..16]));
        let old_size = u64::from_le_bytes(word(&fixed[16..24]));
        let new_size = u64::from_le_bytes(word(&fixed[24..32]));
        let table_len = u64::from_le_bytes(word(&fixed[32..40]));
        let window = u64::from_le_bytes(word(&fixed[40..48]));
        if old_size > MAX_IMAGE_SIZE {
            return Err(DeltaError::Malformed { reason: "old image size above the 16 TiB limit" });
        }
        if new_size > limits.max_new_size {
            return Err(DeltaError::ImageTooLarge { declared: new_size, limit: limits.max_new_size });
        }
        if window > limits.max_window {
            return Err(DeltaError::WindowTooLarge { declared: window, limit: limits.max_window });
        }
        if table_len > limits.max_table_len {
            return Err(DeltaError::TableTooLarge { declared: table_len, limit: limits.max_table_len });
        }
        if flags & !FLAG_TABLE_ZSTD != 0 {
            return Err(DeltaError::Malformed { reason: "unknown header flags" });
        }
        if flags & FLAG_TABLE_ZSTD == 0 && u64::from(count) * REGION_RECORD_LEN as u64 > table_len {
            return Err(DeltaError::Malformed { reason: "region count does not fit the table length" });
        }
        Ok(Self { flags, count, old_size, new_size, table_len, window })
    }
}

fn word<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

fn parse_table(
    table: &[u8],
    count: u32,
    old_size: u64,
    new_size: u64,
    window: u64,
    payloads_start: u64,
) -> Result<Vec<Region>, DeltaError> {
    let malformed = |reason| DeltaError::Malformed { reason };
    let mut regions = Vec::with_capacity(count as usize);
    let mut pos = 0usize;
    let mut new_offset = 0u64;
    let mut payload_offset = payloads_start;
    for _ in 0..count {
        let record = table.get(pos..pos + REGION_RECORD_LEN).ok_or(malformed("region table ends inside a region"))?;
        pos += REGION_RECORD_LEN;
        let op = RegionOp::from_code(record[0]).ok_or(malformed("unknown region op"))?;
        let extent_count = usize::from(u16::from_le_bytes([record[2], record[3]]));
        let new_len = u64::from_le_bytes(word(&record[4..12]));
        let payload_len = u64::from_le_bytes(word(&record[12..20]));
        if extent_count > MAX_EXTENTS {
            return Err(malformed("a region lists too many extents"));
        }
        let mut extents = Vec::with_capacity(extent_count);
        for _ in 0..extent_count {
            let raw = table.get(pos..pos + EXTENT_RECORD_LEN).ok_or(malformed("region table ends inside an extent"))?;
            pos += EXTENT_RECORD_LEN;
            extents
                .push(Extent { offset: u64::from_le_bytes(word(&raw[..8])), len: u64::from_le_bytes(word(&raw[8..])) });
        }
        let region = Region { op, new_offset, new_len, extents, payload_offset, payload_len };
        check_region(&region, old_size, window)?;
        regions.push(region);
        new_offset = new_offset.checked_add(new_len).ok_or(malformed("region lengths overflow"))?;
        payload_offset = payload_offset.checked_add(payload_len).ok_or(malformed("payload lengths overflow"))?;
    }
    if pos != table.len() {
        return Err(malformed("region table is longer than its regions"));
    }
    if new_offset != new_size {
        return Err(malformed("region lengths do not add up to the new image size"));
    }
    Ok(regions)
}

fn read_full(reader: &mut dyn Read, buf: &mut [u8], what: &'static str) -> Result<(), DeltaError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => DeltaError::Truncated { what },
        _ => DeltaError::ReadPatch(e),
    })
}

/// Applies `patch` to `old`, writing the new image to `out`; returns the bytes written.
///
/// Streaming: reads the patch once, front to back, and writes the new image in order,
/// holding at most one reference and one region's decoder window (each ≤
/// [`DeltaLimits::max_window`]) plus small buffers. The caller checks the result's chunk ids
/// and SHA-256 (the patch carries neither).
///
/// # Errors
/// Header and table errors as [`PatchHeader::read`]; [`DeltaError::BaseMismatch`] when `old`
/// is not the size the patch was made against; [`DeltaError::CorruptRegion`] when a payload
/// does not decode to its region; [`DeltaError::Truncated`] / [`DeltaError::TrailingBytes`];
/// I/O errors on any side.
pub fn apply(
    patch: &mut dyn Read,
    old: &dyn OldImage,
    out: &mut dyn Write,
    limits: &DeltaLimits,
) -> Result<u64, DeltaError> {
    let header = PatchHeader::read(patch, limits)?;
    let mut applier = RegionApplier::new(&header, old, limits)?;
    let mut written = 0u64;
    for number in 0..header.regions.len() {
        let number = u32::try_from(number).map_err(|_| DeltaError::Malformed { reason: "region count" })?;
        written += applier.apply(number, patch, out)?;
    }
    let mut probe = [0u8; 1];
    match patch.read(&mut probe) {
        Ok(0) => Ok(written),
        Ok(_) => Err(DeltaError::TrailingBytes),
        Err(e) => Err(DeltaError::ReadPatch(e)),
    }
}

/// Applies single regions of a patch, each from its own payload bytes, in any order and any
/// subset: what a device needs when it takes some regions from the patch and fetches the
/// rest of the image as chunks. [`apply`] is this over every region in turn.
///
/// Memory is the same as [`apply`]'s: one reference and one decoder window (each ≤ the
/// patch's window, itself ≤ [`DeltaLimits::max_window`]) plus small buffers, kept between
/// regions. Each region is checked again before anything is allocated for it (extents
/// inside the old image, reference and output within the window), so a [`PatchHeader`]
/// built by hand is held to the same bounds as one [`PatchHeader::read`] returned.
///
/// ```no_run
/// # use flotilla_core::delta::{DeltaLimits, PatchHeader, RegionApplier};
/// # fn run(patch_file: &std::fs::File, old: &std::fs::File, out: &mut Vec<u8>) -> Result<(), Box<dyn std::error::Error>> {
/// use std::os::unix::fs::FileExt as _;
/// let limits = DeltaLimits::default();
/// let mut fixed = [0u8; flotilla_core::delta::HEADER_LEN];
/// patch_file.read_exact_at(&mut fixed, 0)?;
/// let mut head = vec![0u8; usize::try_from(PatchHeader::stored_len(&fixed, &limits)?)?];
/// patch_file.read_exact_at(&mut head, 0)?;
/// let header = PatchHeader::read(&mut head.as_slice(), &limits)?;
/// let mut applier = RegionApplier::new(&header, old, &limits)?;
/// // Region 2 alone: its payload, then its new bytes (new_offset..new_offset + new_len).
/// let region = &header.regions[2];
/// let mut payload = vec![0u8; usize::try_from(region.payload_len)?];
/// patch_file.read_exact_at(&mut payload, region.payload_offset)?;
/// applier.apply(2, &mut payload.as_slice(), out)?;
/// # Ok(()) }
/// ```
pub struct RegionApplier<'a> {
    header: &'a PatchHeader,
    old: &'a dyn OldImage,
    reference: Vec<u8>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for RegionApplier<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionApplier").field("regions", &self.header.regions.len()).finish_non_exhaustive()
    }
}

impl<'a> RegionApplier<'a> {
    /// An applier of `header`'s regions over `old`.
    ///
    /// # Errors
    /// [`DeltaError::WindowTooLarge`] / [`DeltaError::ImageTooLarge`] when the header asks
    /// more than `limits`; [`DeltaError::BaseMismatch`] when `old` is not the size the patch
    /// was made against.
    pub fn new(header: &'a PatchHeader, old: &'a dyn OldImage, limits: &DeltaLimits) -> Result<Self, DeltaError> {
        if header.window > limits.max_window {
            return Err(DeltaError::WindowTooLarge { declared: header.window, limit: limits.max_window });
        }
        if header.new_size > limits.max_new_size {
            return Err(DeltaError::ImageTooLarge { declared: header.new_size, limit: limits.max_new_size });
        }
        if old.size() != header.old_size {
            return Err(DeltaError::BaseMismatch { expected: header.old_size, actual: old.size() });
        }
        Ok(Self { header, old, reference: Vec::new(), buf: vec![0u8; IO_BUF_LEN] })
    }

    /// Applies region `number`: reads exactly its `payload_len` bytes from `payload` (which
    /// may go on past them, as a whole patch does) and writes exactly its `new_len` bytes,
    /// the new image's `new_offset..new_offset + new_len`, to `out`. Returns the bytes
    /// written.
    ///
    /// # Errors
    /// [`DeltaError::Malformed`] for a region number not in the table or a region outside
    /// the bounds; [`DeltaError::CorruptRegion`] when the payload does not decode to exactly
    /// the region (a frame longer than the payload is [`DeltaError::Truncated`]); read and
    /// write errors. The payload carries no checksum: a flipped literal byte can decode to
    /// wrong bytes of the right length, so the caller verifies the output (chunk ids).
    pub fn apply(&mut self, number: u32, payload: &mut dyn Read, out: &mut dyn Write) -> Result<u64, DeltaError> {
        let region = usize::try_from(number)
            .ok()
            .and_then(|n| self.header.regions.get(n))
            .ok_or(DeltaError::Malformed { reason: "no such region in the table" })?;
        check_region(region, self.old.size(), self.header.window)?;
        let mut payload = payload.take(region.payload_len);
        let (old, reference, buf, window) = (self.old, &mut self.reference, &mut self.buf, self.header.window);
        let produced = match region.op {
            RegionOp::Copy => copy_extents(old, &region.extents, out, buf)?,
            RegionOp::Zstd => {
                load_reference(old, &region.extents, reference)?;
                apply_zstd(&mut payload, reference, region.new_len, out, buf, window)
                    .map_err(|e| region_error(number, e))?
            }
            RegionOp::Bsdiff | RegionOp::BsdiffSparse => {
                load_reference(old, &region.extents, reference)?;
                let sparse = region.op == RegionOp::BsdiffSparse;
                bsdiff::apply(&mut payload, reference, region.new_len, out, buf, window, sparse)
                    .map_err(|e| region_error(number, e))?
            }
        };
        if produced != region.new_len {
            return Err(DeltaError::CorruptRegion {
                region: number,
                reason: format!("produced {produced} bytes, the table says {}", region.new_len),
            });
        }
        if payload.limit() != 0 {
            return Err(DeltaError::CorruptRegion { region: number, reason: "payload longer than its frame".into() });
        }
        Ok(produced)
    }
}

/// The table's per-region bounds, checked again where a region is applied: extents inside
/// the old image, a patched region's reference and output within the window, a copy
/// region's extents adding up to its output and carrying no payload.
fn check_region(region: &Region, old_size: u64, window: u64) -> Result<(), DeltaError> {
    let malformed = |reason| DeltaError::Malformed { reason };
    if region.extents.len() > MAX_EXTENTS {
        return Err(malformed("a region lists too many extents"));
    }
    let mut reference = 0u64;
    for e in &region.extents {
        if e.offset.checked_add(e.len).is_none_or(|end| end > old_size) {
            return Err(malformed("an extent reaches past the old image"));
        }
        reference = reference.checked_add(e.len).ok_or(malformed("extent lengths overflow"))?;
    }
    match region.op {
        RegionOp::Copy if reference != region.new_len => Err(malformed("a copy region's extents do not add up")),
        RegionOp::Copy if region.payload_len != 0 => Err(malformed("a copy region has a payload")),
        RegionOp::Zstd | RegionOp::Bsdiff | RegionOp::BsdiffSparse if reference > window || region.new_len > window => {
            Err(malformed("a patched region is larger than the declared window"))
        }
        _ => Ok(()),
    }
}

/// Errors inside one region's decoding: truncation is told apart from corruption.
#[derive(Debug)]
enum RegionFailure {
    Truncated,
    Corrupt(String),
    Write(io::Error),
}

fn region_error(region: u32, failure: RegionFailure) -> DeltaError {
    match failure {
        RegionFailure::Truncated => DeltaError::Truncated { what: "a region payload" },
        RegionFailure::Corrupt(reason) => DeltaError::CorruptRegion { region, reason },
        RegionFailure::Write(e) => DeltaError::Write(e),
    }
}

fn copy_extents(
    old: &dyn OldImage,
    extents: &[Extent],
    out: &mut dyn Write,
    buf: &mut [u8],
) -> Result<u64, DeltaError> {
    let mut total = 0u64;
    for extent in extents {
        let mut done = 0u64;
        while done < extent.len {
            let n = usize::try_from((extent.len - done).min(buf.len() as u64)).unwrap_or(buf.len());
            old.read_at(&mut buf[..n], extent.offset + done).map_err(DeltaError::ReadOld)?;
            out.write_all(&buf[..n]).map_err(DeltaError::Write)?;
            done += n as u64;
        }
        total += extent.len;
    }
    Ok(total)
}

/// Reads the concatenated extents into `reference` (the table check bounds their sum by the
/// window).
fn load_reference(old: &dyn OldImage, extents: &[Extent], reference: &mut Vec<u8>) -> Result<(), DeltaError> {
    let total: u64 = extents.iter().map(|e| e.len).sum();
    let total = usize::try_from(total).map_err(|_| DeltaError::Malformed { reason: "reference length" })?;
    reference.clear();
    reference.resize(total, 0);
    let mut pos = 0usize;
    for extent in extents {
        let len = usize::try_from(extent.len).map_err(|_| DeltaError::Malformed { reason: "extent length" })?;
        old.read_at(&mut reference[pos..pos + len], extent.offset).map_err(DeltaError::ReadOld)?;
        pos += len;
    }
    Ok(())
}

/// zstd's window log needed to reach from the end of `new_len` bytes back to the start of a
/// `reference_len` prefix.
fn window_log(reference_len: u64, new_len: u64) -> u32 {
    let span = (reference_len + new_len).max(1 << 10);
    (64 - (span - 1).leading_zeros()).clamp(10, 30)
}

fn apply_zstd(
    payload: &mut dyn Read,
    reference: &[u8],
    new_len: u64,
    out: &mut dyn Write,
    buf: &mut [u8],
    window: u64,
) -> Result<u64, RegionFailure> {
    let corrupt = |e: io::Error| RegionFailure::Corrupt(e.to_string());
    let mut decoder = zstd::stream::raw::Decoder::with_ref_prefix(reference).map_err(corrupt)?;
    decoder.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(window_log(window, window))).map_err(corrupt)?;
    let mut reader = zstd::stream::zio::Reader::new(io::BufReader::with_capacity(IO_BUF_LEN, payload), decoder);
    reader.set_single_frame();
    pump(&mut reader, new_len, out, buf)
}

/// Copies a decoded stream to `out`, refusing more than `limit` bytes.
fn pump(reader: &mut dyn Read, limit: u64, out: &mut dyn Write, buf: &mut [u8]) -> Result<u64, RegionFailure> {
    let mut total = 0u64;
    loop {
        let n = match reader.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(RegionFailure::Truncated),
            Err(e) => return Err(RegionFailure::Corrupt(e.to_string())),
        };
        total += n as u64;
        if total > limit {
            return Err(RegionFailure::Corrupt(format!("decodes to more than its {limit} bytes")));
        }
        out.write_all(&buf[..n]).map_err(RegionFailure::Write)?;
    }
}

/// Compresses `data` as one zstd frame with `reference` as prefix and long-distance matching.
fn compress_zstd(level: i32, reference: &[u8], data: &[u8]) -> io::Result<Vec<u8>> {
    use zstd::stream::raw::CParameter;
    let mut encoder = zstd::stream::raw::Encoder::with_ref_prefix(level, reference)?;
    encoder.set_parameter(CParameter::WindowLog(window_log(reference.len() as u64, data.len() as u64)))?;
    encoder.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
    encoder.set_parameter(CParameter::ChecksumFlag(false))?;
    encoder.set_parameter(CParameter::ContentSizeFlag(true))?;
    encoder.set_pledged_src_size(Some(data.len() as u64))?;
    let mut writer = zstd::stream::zio::Writer::new(Vec::with_capacity(data.len() / 4 + 64), encoder);
    writer.write_all(data)?;
    writer.finish()?;
    Ok(writer.into_inner().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 56) as u8 % 16
            })
            .collect()
    }

    fn single_region_patch(op: RegionOp, old: &[u8], new: &[u8]) -> Vec<u8> {
        let payload = match op {
            RegionOp::Zstd => compress_zstd(3, old, new).unwrap(),
            RegionOp::Bsdiff => bsdiff::diff(old, new, 3).unwrap(),
            RegionOp::BsdiffSparse => bsdiff::diff_sparse(old, new, &bsdiff::records(old, new), 3).unwrap(),
            RegionOp::Copy => Vec::new(),
        };
        let header = PatchHeader {
            old_size: old.len() as u64,
            new_size: new.len() as u64,
            window: (old.len().max(new.len())) as u64,
            regions: vec![Region {
                op,
                new_offset: 0,
                new_len: new.len() as u64,
                extents: vec![Extent { offset: 0, len: old.len() as u64 }],
                payload_offset: 0,
                payload_len: payload.len() as u64,
            }],
        };
        let mut patch = header.encode();
        patch.extend_from_slice(&payload);
        patch
    }

    #[test]
    fn zstd_region_round_trips() {
        let old = sample(200_000, 1);
        let mut new = old.clone();
        new[1000..1010].copy_from_slice(b"0123456789");
        new.extend_from_slice(&sample(5000, 2));
        let patch = single_region_patch(RegionOp::Zstd, &old, &new);
        assert!(patch.len() < 5000, "patch of {} bytes", patch.len());
        let mut out = Vec::new();
        let n = apply(&mut patch.as_slice(), &old, &mut out, &DeltaLimits::default()).unwrap();
        assert_eq!(n, new.len() as u64);
        assert_eq!(out, new);
    }

    #[test]
    fn bsdiff_region_round_trips() {
        let old = sample(100_000, 3);
        let mut new = old.clone();
        for i in (0..new.len()).step_by(997) {
            new[i] = new[i].wrapping_add(1);
        }
        let patch = single_region_patch(RegionOp::Bsdiff, &old, &new);
        let mut out = Vec::new();
        apply(&mut patch.as_slice(), &old, &mut out, &DeltaLimits::default()).unwrap();
        assert_eq!(out, new);
    }

    #[test]
    fn sparse_bsdiff_region_round_trips() {
        let old = sample(100_000, 3);
        let mut new = old.clone();
        for i in (0..new.len()).step_by(4999) {
            new[i] = new[i].wrapping_add(1);
        }
        new.extend_from_slice(&sample(3000, 12));
        let patch = single_region_patch(RegionOp::BsdiffSparse, &old, &new);
        let mut out = Vec::new();
        apply(&mut patch.as_slice(), &old, &mut out, &DeltaLimits::default()).unwrap();
        assert_eq!(out, new);
    }

    #[test]
    fn wrong_base_size_is_refused() {
        let old = sample(10_000, 4);
        let patch = single_region_patch(RegionOp::Zstd, &old, &sample(10_000, 5));
        let err = apply(&mut patch.as_slice(), &old[..9_999].to_vec(), &mut Vec::new(), &DeltaLimits::default());
        assert!(matches!(err, Err(DeltaError::BaseMismatch { expected: 10_000, actual: 9_999 })), "{err:?}");
    }

    #[test]
    fn huge_declared_table_is_refused_before_allocating() {
        let old = sample(1000, 6);
        let mut patch = single_region_patch(RegionOp::Zstd, &old, &old);
        patch[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = apply(&mut patch.as_slice(), &old, &mut Vec::new(), &DeltaLimits::default());
        assert!(matches!(err, Err(DeltaError::TableTooLarge { declared, .. }) if declared == 1 << 40), "{err:?}");
    }

    #[test]
    fn huge_declared_window_is_refused() {
        let old = sample(1000, 6);
        let mut patch = single_region_patch(RegionOp::Zstd, &old, &old);
        patch[40..48].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = apply(&mut patch.as_slice(), &old, &mut Vec::new(), &DeltaLimits::default());
        assert!(matches!(err, Err(DeltaError::WindowTooLarge { .. })), "{err:?}");
    }

    #[test]
    fn extent_past_old_image_is_refused() {
        let old = sample(1000, 7);
        let mut patch = single_region_patch(RegionOp::Zstd, &old, &old);
        let extent_len_at = HEADER_LEN + REGION_RECORD_LEN + 8;
        patch[extent_len_at..extent_len_at + 8].copy_from_slice(&1001u64.to_le_bytes());
        let err = apply(&mut patch.as_slice(), &old, &mut Vec::new(), &DeltaLimits::default());
        assert!(matches!(err, Err(DeltaError::Malformed { .. })), "{err:?}");
    }

    #[test]
    fn truncated_patch_is_refused_at_every_length() {
        let old = sample(50_000, 8);
        let mut new = old.clone();
        new.extend_from_slice(&sample(20_000, 9));
        for op in [RegionOp::Zstd, RegionOp::Bsdiff, RegionOp::BsdiffSparse] {
            let patch = single_region_patch(op, &old, &new);
            for cut in 0..patch.len() {
                let err = apply(&mut &patch[..cut], &old, &mut Vec::new(), &DeltaLimits::default());
                assert!(
                    matches!(err, Err(DeltaError::Truncated { .. } | DeltaError::CorruptRegion { .. })),
                    "{op:?} cut at {cut}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let old = sample(1000, 10);
        let mut patch = single_region_patch(RegionOp::Zstd, &old, &old);
        patch.push(0);
        let err = apply(&mut patch.as_slice(), &old, &mut Vec::new(), &DeltaLimits::default());
        assert!(matches!(err, Err(DeltaError::CorruptRegion { .. } | DeltaError::TrailingBytes)), "{err:?}");
    }

    #[test]
    fn large_tables_are_stored_compressed_and_read_back() {
        let regions: Vec<Region> = (0..200u64)
            .map(|i| Region {
                op: RegionOp::Copy,
                new_offset: i * 4096,
                new_len: 4096,
                extents: vec![Extent { offset: (199 - i) * 4096, len: 4096 }],
                payload_offset: 0,
                payload_len: 0,
            })
            .collect();
        let header = PatchHeader { old_size: 200 * 4096, new_size: 200 * 4096, window: 0, regions };
        let bytes = header.encode();
        assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), FLAG_TABLE_ZSTD);
        assert!(bytes.len() < HEADER_LEN + 200 * (REGION_RECORD_LEN + EXTENT_RECORD_LEN) / 2, "{} bytes", bytes.len());
        let read = PatchHeader::read(&mut bytes.as_slice(), &DeltaLimits::default()).unwrap();
        assert_eq!(read.regions.len(), 200);
        assert_eq!(read.regions[7].extents, header.regions[7].extents);
        let old: Vec<u8> = (0..200 * 4096u32).map(|i| (i / 4096) as u8).collect();
        let mut out = Vec::new();
        apply(&mut bytes.as_slice(), &old, &mut out, &DeltaLimits::default()).unwrap();
        assert_eq!(out[0], 199);
        // A compressed table claiming a decoded length above the limit is refused first.
        let mut huge = bytes.clone();
        huge[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = PatchHeader::read(&mut huge.as_slice(), &DeltaLimits::default());
        assert!(matches!(err, Err(DeltaError::TableTooLarge { .. })), "{err:?}");
    }

    #[test]
    fn header_round_trips() {
        let old = sample(3000, 11);
        let patch = single_region_patch(RegionOp::Zstd, &old, &old);
        let header = PatchHeader::read(&mut patch.as_slice(), &DeltaLimits::default()).unwrap();
        assert_eq!(header.regions.len(), 1);
        assert_eq!(header.regions[0].payload_offset, header.encoded_len());
        assert_eq!(header.method(), DeltaMethod::Zstd);
    }
}
