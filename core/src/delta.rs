//! Binary patches between two images, applied streaming with bounded memory.
//!
//! A patch is a self-describing container: a fixed header, a region table, then the shared
//! stream's payload (if any) and each region's payload in table order. Regions cover the new
//! image in order, each producing one contiguous new byte range from a bounded *reference*:
//! up to [`MAX_EXTENTS`] byte ranges of the old image, at most [`DeltaLimits::max_window`]
//! bytes in total.
//!
//! ```text
//! offset size field (little-endian)
//!      0    8 magic "FLOTDLT\0"
//!      8    2 format version (2; version 1 is still read)
//!     10    2 flags (bit 0: the table is a u64 decoded length + a zstd frame;
//!               bit 1: the patch has a shared stream)
//!     12    4 region count
//!     16    8 old image size
//!     24    8 new image size
//!     32    8 region table length in bytes (as stored)
//!     40    8 window: the largest reference or patched region in this patch
//!     48    … region table (LEB128 numbers):
//!               with flag bit 1, the shared stream: decoded length, payload length,
//!                 extent count, per extent zigzag(offset − end of the extent before it, or
//!                 − 0) and length;
//!               per region: u8 op (0 copy, 1 zstd, 2 bsdiff, 3 sparse bsdiff), u8 flags
//!                 (bit 0: its records are a slice of the shared stream), new length,
//!                 extent count, per extent zigzag(offset − end of the region's extent before
//!                 it, or − the region's new offset) and zigzag(length − the new length not
//!                 yet covered by its extents before it), then the payload length, or with
//!                 flag bit 0 the slice's offset and length in the decoded shared stream (no
//!                 payload)
//!      …    … the shared stream's payload, then the regions' payloads in table order
//! ```
//!
//! Version 1 (the first agents') has the same fixed header with flag bit 0 only and
//! fixed-width records: u8 op, u8 reserved, u16 extent count, u64 new length, u64 payload
//! length, per extent u64 offset and u64 length. A reader of version 1 only refuses a
//! version 2 patch (unsupported version), and an agent then falls back to chunks.
//!
//! **Shared stream.** Regions are independent so that a device can apply any subset of
//! them, but then a code change repeated in three files (one edit in each of three bundles
//! of an app tree) is paid three times, where bsdiff's single stream pays it once. The
//! shared stream is one zstd frame, compressed with its own few old extents as reference
//! prefix (the old bytes around the edits, so the new code's literals still match old
//! code), that decodes to the record streams of several bsdiff regions one after the other;
//! each such region names its slice. A device that applies any of them fetches and decodes
//! the shared stream once (at most [`DeltaLimits::max_shared`] bytes, kept while it
//! applies), so regions stay independent of each other and depend only on it.
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
//! new length, itself ≤ window) plus small buffers, and the decoded shared stream (≤
//! [`DeltaLimits::max_shared`], 1 MiB) — about 2 × window whatever the image size.
//! The caller verifies the output's chunk ids and SHA-256; a patch does not repeat them.
//!
//! Contract notes for the agent: a region's reference is a *list* of old extents (not one
//! range), so a changed file's old copy can be found wherever it moved; [`PatchHeader::read`]
//! exposes the table, so a planner can see which new ranges are copies and which are patched.
//! [`encode`] holds the patch it builds in memory (bounded by
//! [`EncodeOptions::max_patch_size`]) because the table precedes the payloads.

use std::io::{self, Read, Write};

use crate::index::MAX_IMAGE_SIZE;

mod bsdiff;
mod encode;
mod share;
mod table;

pub use encode::{EncodeOptions, EncodeStats, encode};

/// The patch container's magic bytes.
pub const MAGIC: [u8; 8] = *b"FLOTDLT\0";
/// The container version this build writes (it reads [`FORMAT_VERSION_1`] too).
pub const FORMAT_VERSION: u16 = 2;
/// The first container version: fixed-width table records, no shared stream.
pub const FORMAT_VERSION_1: u16 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 48;
/// Size of a version 1 region record without its extents.
pub const REGION_RECORD_LEN: usize = 20;
/// Size of one extent in a version 1 region record.
pub const EXTENT_RECORD_LEN: usize = 16;
/// Most old extents one region may reference.
pub const MAX_EXTENTS: usize = 1024;
/// Default [`DeltaLimits::max_window`]: 8 MiB keeps two windows and the rest of the agent
/// under its 32 MiB bound.
pub const DEFAULT_MAX_WINDOW: u64 = 8 << 20;

/// Header flag: the region table is stored as a u64 decoded length and a zstd frame.
pub const FLAG_TABLE_ZSTD: u16 = 1;
/// Header flag (version 2): the table starts with the shared stream's record.
pub const FLAG_SHARED_STREAM: u16 = 2;
/// Default [`DeltaLimits::max_shared`]: the encoder keeps the shared stream to small record
/// streams (a few KiB on real releases); 1 MiB bounds what a hostile patch can make a device
/// hold next to its two windows.
pub const DEFAULT_MAX_SHARED: u64 = 1 << 20;

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
    /// Largest decoded shared stream.
    pub max_shared: u64,
}

impl Default for DeltaLimits {
    fn default() -> Self {
        Self {
            max_window: DEFAULT_MAX_WINDOW,
            max_table_len: 4 << 20,
            max_new_size: MAX_IMAGE_SIZE,
            max_shared: DEFAULT_MAX_SHARED,
        }
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
    #[error("patch format version {0} is not supported (this build reads versions 1 and {FORMAT_VERSION})")]
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
    /// The shared stream is larger than allowed.
    #[error("patch shared stream is {declared} bytes, the limit is {limit}")]
    SharedTooLarge {
        /// Declared by the patch.
        declared: u64,
        /// Allowed.
        limit: u64,
    },
    /// The shared stream's payload did not decode to its declared length.
    #[error("patch shared stream is corrupt: {reason}")]
    CorruptShared {
        /// What went wrong.
        reason: String,
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
    /// Payload length (0 when the records are a slice of the shared stream).
    pub payload_len: u64,
    /// Where its records are in the decoded shared stream, instead of a payload of its own
    /// (bsdiff ops only).
    pub shared: Option<SharedSlice>,
}

/// A byte range of the decoded shared stream: one region's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedSlice {
    /// Offset in the decoded shared stream.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The patch's shared stream: one zstd frame holding the records of several regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedStream {
    /// Old bytes used as the frame's reference prefix, in reference order.
    pub extents: Vec<Extent>,
    /// Decoded length.
    pub len: u64,
    /// Offset of the frame in the patch (the first payload).
    pub payload_offset: u64,
    /// Length of the frame.
    pub payload_len: u64,
}

impl SharedStream {
    /// Its bounds: extents inside the old image and within the window, the decoded length
    /// within the limit and not empty.
    fn check(&self, old_size: u64, window: u64, limits: &DeltaLimits) -> Result<(), DeltaError> {
        if self.len > limits.max_shared {
            return Err(DeltaError::SharedTooLarge { declared: self.len, limit: limits.max_shared });
        }
        if self.len == 0 {
            return Err(DeltaError::Malformed { reason: "an empty shared stream" });
        }
        if check_extents(&self.extents, old_size)? > window {
            return Err(DeltaError::Malformed { reason: "the shared stream's reference is larger than the window" });
        }
        Ok(())
    }
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
    /// The shared stream, when some regions' records are in it.
    pub shared: Option<SharedStream>,
    /// The regions, in new-image order.
    pub regions: Vec<Region>,
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
    if header.shared.is_some() {
        applier.load_shared(patch)?;
    }
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
/// regions, and the decoded shared stream once [`RegionApplier::load_shared`] read it (a
/// region whose records are in it needs it first; its own payload is empty). Each region is checked again before anything is allocated for it (extents
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
    limits: DeltaLimits,
    reference: Vec<u8>,
    buf: Vec<u8>,
    shared: Option<Vec<u8>>,
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
        Ok(Self { header, old, limits: *limits, reference: Vec::new(), buf: vec![0u8; IO_BUF_LEN], shared: None })
    }

    /// Reads exactly the shared stream's payload (`payload_len` bytes) from `payload` and
    /// decodes it, for the regions whose records are in it. Checks the stream's bounds again
    /// first (a hand-built header is held to them too).
    ///
    /// # Errors
    /// [`DeltaError::Malformed`] when the patch has no shared stream or its extents are out of
    /// bounds; [`DeltaError::SharedTooLarge`]; [`DeltaError::CorruptShared`] when the frame
    /// does not decode to exactly its declared length ([`DeltaError::Truncated`] when it is
    /// cut); read errors.
    pub fn load_shared(&mut self, payload: &mut dyn Read) -> Result<(), DeltaError> {
        let shared =
            self.header.shared.as_ref().ok_or(DeltaError::Malformed { reason: "the patch has no shared stream" })?;
        shared.check(self.old.size(), self.header.window, &self.limits)?;
        self.shared = None;
        load_reference(self.old, &shared.extents, &mut self.reference)?;
        let mut payload = payload.take(shared.payload_len);
        let capacity = usize::try_from(shared.len).map_err(|_| DeltaError::Malformed { reason: "shared length" })?;
        let mut decoded = Vec::with_capacity(capacity);
        let failure = |f| match f {
            RegionFailure::Truncated => DeltaError::Truncated { what: "the shared stream" },
            RegionFailure::Corrupt(reason) => DeltaError::CorruptShared { reason },
            RegionFailure::Write(e) => DeltaError::CorruptShared { reason: e.to_string() },
        };
        let window = self.header.window;
        let produced = apply_zstd(&mut payload, &self.reference, shared.len, &mut decoded, &mut self.buf, window)
            .map_err(failure)?;
        if produced != shared.len {
            return Err(DeltaError::CorruptShared {
                reason: format!("decoded to {produced} bytes, the table says {}", shared.len),
            });
        }
        if payload.limit() != 0 {
            return Err(DeltaError::CorruptShared { reason: "payload longer than its frame".into() });
        }
        self.shared = Some(decoded);
        Ok(())
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
        check_region(region, self.old.size(), self.header.window, self.header.shared.as_ref())?;
        let mut payload = payload.take(region.payload_len);
        let (old, reference, buf, window) = (self.old, &mut self.reference, &mut self.buf, self.header.window);
        let produced = match (region.op, region.shared) {
            (RegionOp::Bsdiff | RegionOp::BsdiffSparse, Some(slice)) => {
                let shared = self
                    .shared
                    .as_deref()
                    .ok_or(DeltaError::Malformed { reason: "the shared stream is not loaded" })?;
                // check_region bounded the slice by the stream's declared length, which the
                // loaded stream has.
                let records = usize::try_from(slice.offset)
                    .ok()
                    .zip(usize::try_from(slice.offset + slice.len).ok())
                    .and_then(|(start, end)| shared.get(start..end))
                    .ok_or(DeltaError::Malformed { reason: "a region's slice reaches past the shared stream" })?;
                load_reference(old, &region.extents, reference)?;
                let sparse = region.op == RegionOp::BsdiffSparse;
                bsdiff::apply_records(&mut &records[..], reference, region.new_len, out, buf, sparse).map_err(|e| {
                    match e {
                        // The slice is all the records there are: ending early is corruption.
                        RegionFailure::Truncated => DeltaError::CorruptRegion {
                            region: number,
                            reason: "its records in the shared stream end early".into(),
                        },
                        e => region_error(number, e),
                    }
                })?
            }
            (_, Some(_)) => {
                return Err(DeltaError::Malformed {
                    reason: "only a bsdiff region may take its records from the shared stream",
                });
            }
            (RegionOp::Copy, None) => copy_extents(old, &region.extents, out, buf)?,
            (RegionOp::Zstd, None) => {
                load_reference(old, &region.extents, reference)?;
                apply_zstd(&mut payload, reference, region.new_len, out, buf, window)
                    .map_err(|e| region_error(number, e))?
            }
            (RegionOp::Bsdiff | RegionOp::BsdiffSparse, None) => {
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
/// region's extents adding up to its output and carrying no payload, a slice of the shared
/// stream (`shared`) only for bsdiff ops, inside the stream and without a payload.
fn check_region(region: &Region, old_size: u64, window: u64, shared: Option<&SharedStream>) -> Result<(), DeltaError> {
    let malformed = |reason| DeltaError::Malformed { reason };
    let reference = check_extents(&region.extents, old_size)?;
    if let Some(slice) = region.shared {
        if !matches!(region.op, RegionOp::Bsdiff | RegionOp::BsdiffSparse) {
            return Err(malformed("only a bsdiff region may take its records from the shared stream"));
        }
        if region.payload_len != 0 {
            return Err(malformed("a region in the shared stream has a payload"));
        }
        let len = shared.ok_or(malformed("a region names a shared stream the patch does not have"))?.len;
        if slice.offset.checked_add(slice.len).is_none_or(|end| end > len) {
            return Err(malformed("a region's slice reaches past the shared stream"));
        }
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

/// Checks extents lie inside the old image and returns their total length.
fn check_extents(extents: &[Extent], old_size: u64) -> Result<u64, DeltaError> {
    let malformed = |reason| DeltaError::Malformed { reason };
    if extents.len() > MAX_EXTENTS {
        return Err(malformed("a region lists too many extents"));
    }
    let mut reference = 0u64;
    for e in extents {
        if e.offset.checked_add(e.len).is_none_or(|end| end > old_size) {
            return Err(malformed("an extent reaches past the old image"));
        }
        reference = reference.checked_add(e.len).ok_or(malformed("extent lengths overflow"))?;
    }
    Ok(reference)
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
    let produced = pump(&mut reader, new_len, out, buf)?;
    frame_ended_payload(reader.reader())?;
    Ok(produced)
}

/// After a frame: the payload must end with it. The frame reader buffers ahead, so bytes
/// after the frame are in its buffer (or still unread, which the caller's `take` sees).
fn frame_ended_payload<R: Read>(reader: &io::BufReader<R>) -> Result<(), RegionFailure> {
    if reader.buffer().is_empty() {
        Ok(())
    } else {
        Err(RegionFailure::Corrupt("payload longer than its frame".into()))
    }
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
    use crate::manifest::DeltaMethod;

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
            RegionOp::BsdiffSparse => bsdiff::diff_sparse(old, new, &bsdiff::records(old, new), 3).unwrap().0,
            RegionOp::Copy => Vec::new(),
        };
        let header = PatchHeader {
            old_size: old.len() as u64,
            new_size: new.len() as u64,
            window: (old.len().max(new.len())) as u64,
            shared: None,
            regions: vec![Region {
                op,
                new_offset: 0,
                new_len: new.len() as u64,
                extents: vec![Extent { offset: 0, len: old.len() as u64 }],
                payload_offset: 0,
                payload_len: payload.len() as u64,
                shared: None,
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
        let mut patch = to_v1(&single_region_patch(RegionOp::Zstd, &old, &old));
        let extent_len_at = HEADER_LEN + REGION_RECORD_LEN + 8;
        patch[extent_len_at..extent_len_at + 8].copy_from_slice(&1001u64.to_le_bytes());
        let err = apply(&mut patch.as_slice(), &old, &mut Vec::new(), &DeltaLimits::default());
        assert!(matches!(err, Err(DeltaError::Malformed { .. })), "{err:?}");
        // The same in version 2: the extent's offset (zigzag, relative to the region's new
        // offset) is the record's sixth byte (the new length 1000 takes two); 2 moves the
        // extent to 1..1001.
        let mut patch = single_region_patch(RegionOp::Zstd, &old, &old);
        assert_eq!(patch[HEADER_LEN + 5], 0);
        patch[HEADER_LEN + 5] = 2;
        let err = apply(&mut patch.as_slice(), &old, &mut Vec::new(), &DeltaLimits::default());
        assert!(matches!(err, Err(DeltaError::Malformed { .. })), "{err:?}");
    }

    /// The same patch with a version 1 header and table.
    fn to_v1(patch: &[u8]) -> Vec<u8> {
        let header = PatchHeader::read(&mut &patch[..], &DeltaLimits::default()).unwrap();
        let mut v1 = header.encode_v1();
        v1.extend_from_slice(&patch[header.encoded_len() as usize..]);
        v1
    }

    #[test]
    fn version_1_patches_still_apply() {
        let old = sample(100_000, 3);
        let mut new = old.clone();
        new[500..520].copy_from_slice(&sample(20, 4));
        for op in [RegionOp::Zstd, RegionOp::Bsdiff, RegionOp::BsdiffSparse] {
            let patch = to_v1(&single_region_patch(op, &old, &new));
            assert_eq!(u16::from_le_bytes([patch[8], patch[9]]), FORMAT_VERSION_1);
            let mut out = Vec::new();
            apply(&mut patch.as_slice(), &old, &mut out, &DeltaLimits::default()).unwrap();
            assert_eq!(out, new, "{op:?}");
        }
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
                shared: None,
            })
            .collect();
        let header = PatchHeader { old_size: 200 * 4096, new_size: 200 * 4096, window: 0, shared: None, regions };
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
