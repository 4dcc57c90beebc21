//! The patch's fixed header and region table: writing them (format version 2) and reading
//! them back (versions 1 and 2), every count and length checked before anything is allocated
//! for it.

use std::io::{self, Read};

use super::{
    DeltaError, DeltaLimits, EXTENT_RECORD_LEN, Extent, FLAG_SHARED_STREAM, FLAG_TABLE_ZSTD, FORMAT_VERSION,
    FORMAT_VERSION_1, HEADER_LEN, MAGIC, MAX_EXTENTS, PatchHeader, REGION_RECORD_LEN, Region, RegionOp, SharedSlice,
    SharedStream, check_region,
};
use crate::index::MAX_IMAGE_SIZE;
use crate::manifest::DeltaMethod;

/// Fewest bytes a version 2 region record takes: op, flags, extent count, new length and
/// payload length of one byte each. Bounds the region count by the table's length.
const MIN_RECORD_LEN: u64 = 5;

/// Region record flag (version 2): the region's records are a slice of the shared stream.
const REGION_SHARED: u8 = 1;

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
        let Fixed { version, flags, count, old_size, new_size, table_len, window } = Fixed::parse(&fixed, limits)?;
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
        let min_record = if version == FORMAT_VERSION_1 { REGION_RECORD_LEN as u64 } else { MIN_RECORD_LEN };
        if u64::from(count) * min_record > table.len() as u64 {
            return Err(DeltaError::Malformed { reason: "region count does not fit the table length" });
        }
        let bounds = Bounds { count, old_size, new_size, window, payloads_start: HEADER_LEN as u64 + table_len };
        let (shared, regions) = if version == FORMAT_VERSION_1 {
            (None, parse_v1(&table, &bounds)?)
        } else {
            parse_v2(&table, &bounds, flags & FLAG_SHARED_STREAM != 0, limits)?
        };
        Ok(Self { old_size, new_size, window, shared, regions })
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
        let shared = self.shared.as_ref().map_or(0, |s| s.payload_offset + s.payload_len);
        self.regions.last().map_or(shared, |r| (r.payload_offset + r.payload_len).max(shared))
    }

    /// Encoded length of the header and table.
    pub fn encoded_len(&self) -> u64 {
        self.encode().len() as u64
    }

    /// The version 2 table: the shared stream's record, then one record per region (see the
    /// module docs of [`crate::delta`]).
    fn raw_table(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(shared) = &self.shared {
            push_varint(&mut out, shared.len);
            push_varint(&mut out, shared.payload_len);
            push_extents(&mut out, &shared.extents, 0, None);
        }
        for region in &self.regions {
            out.push(region.op.code());
            out.push(if region.shared.is_some() { REGION_SHARED } else { 0 });
            push_varint(&mut out, region.new_len);
            push_extents(&mut out, &region.extents, region.new_offset, Some(region.new_len));
            match region.shared {
                Some(slice) => {
                    push_varint(&mut out, slice.offset);
                    push_varint(&mut out, slice.len);
                }
                None => push_varint(&mut out, region.payload_len),
            }
        }
        out
    }

    /// Encodes the header and table (the payloads follow them) in format version 2. The table
    /// is stored zstd compressed when that is smaller (large images have thousands of
    /// regions).
    pub fn encode(&self) -> Vec<u8> {
        let raw = self.raw_table();
        let (mut flags, table) = match zstd::bulk::compress(&raw, 19) {
            Ok(z) if z.len() + 8 < raw.len() => {
                let mut t = (raw.len() as u64).to_le_bytes().to_vec();
                t.extend_from_slice(&z);
                (FLAG_TABLE_ZSTD, t)
            }
            _ => (0u16, raw),
        };
        if self.shared.is_some() {
            flags |= FLAG_SHARED_STREAM;
        }
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

    /// Encodes the header and table in format version 1 (fixed-width records, no shared
    /// stream), as the first agents read it: what tests use to check that such patches still
    /// apply.
    #[cfg(test)]
    pub(super) fn encode_v1(&self) -> Vec<u8> {
        let mut table = Vec::new();
        for region in &self.regions {
            table.push(region.op.code());
            table.push(0);
            table.extend_from_slice(&u16::try_from(region.extents.len()).unwrap_or(u16::MAX).to_le_bytes());
            table.extend_from_slice(&region.new_len.to_le_bytes());
            table.extend_from_slice(&region.payload_len.to_le_bytes());
            for extent in &region.extents {
                table.extend_from_slice(&extent.offset.to_le_bytes());
                table.extend_from_slice(&extent.len.to_le_bytes());
            }
        }
        let mut out = self.encode();
        out.truncate(HEADER_LEN);
        out[8..10].copy_from_slice(&FORMAT_VERSION_1.to_le_bytes());
        out[10..12].copy_from_slice(&0u16.to_le_bytes());
        out[32..40].copy_from_slice(&(table.len() as u64).to_le_bytes());
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
    version: u16,
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
        if version != FORMAT_VERSION && version != FORMAT_VERSION_1 {
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
        let known = if version == FORMAT_VERSION_1 { FLAG_TABLE_ZSTD } else { FLAG_TABLE_ZSTD | FLAG_SHARED_STREAM };
        if flags & !known != 0 {
            return Err(DeltaError::Malformed { reason: "unknown header flags" });
        }
        let min_record = if version == FORMAT_VERSION_1 { REGION_RECORD_LEN as u64 } else { MIN_RECORD_LEN };
        if flags & FLAG_TABLE_ZSTD == 0 && u64::from(count) * min_record > table_len {
            return Err(DeltaError::Malformed { reason: "region count does not fit the table length" });
        }
        Ok(Self { version, flags, count, old_size, new_size, table_len, window })
    }
}

/// What every region is checked against while the table is parsed.
struct Bounds {
    count: u32,
    old_size: u64,
    new_size: u64,
    window: u64,
    payloads_start: u64,
}

fn word<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

fn malformed(reason: &'static str) -> DeltaError {
    DeltaError::Malformed { reason }
}

/// Checks the parsed regions add up to the new image and the table has no bytes left.
fn finish(regions: &[Region], pos: usize, table: &[u8], new_size: u64) -> Result<(), DeltaError> {
    if pos != table.len() {
        return Err(malformed("region table is longer than its regions"));
    }
    if regions.last().map_or(0, |r| r.new_offset + r.new_len) != new_size {
        return Err(malformed("region lengths do not add up to the new image size"));
    }
    Ok(())
}

/// Version 1: fixed-width records (see [`encode_v1`](PatchHeader::encode_v1)).
fn parse_v1(table: &[u8], b: &Bounds) -> Result<Vec<Region>, DeltaError> {
    let mut regions = Vec::with_capacity(b.count as usize);
    let mut pos = 0usize;
    let mut new_offset = 0u64;
    let mut payload_offset = b.payloads_start;
    for _ in 0..b.count {
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
        let region = Region { op, new_offset, new_len, extents, payload_offset, payload_len, shared: None };
        check_region(&region, b.old_size, b.window, None)?;
        regions.push(region);
        new_offset = new_offset.checked_add(new_len).ok_or(malformed("region lengths overflow"))?;
        payload_offset = payload_offset.checked_add(payload_len).ok_or(malformed("payload lengths overflow"))?;
    }
    finish(&regions, pos, table, b.new_size)?;
    Ok(regions)
}

/// Reads the version 2 table's LEB128 fields, refusing any that runs past the table.
struct Cursor<'t> {
    table: &'t [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Result<u8, DeltaError> {
        let b = *self.table.get(self.pos).ok_or(malformed("region table ends inside a record"))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, DeltaError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("a table varint is longer than 64 bits"))
    }

    /// Extents as [`push_extents`] wrote them (wrapping arithmetic: the caller checks the
    /// results against the old image).
    fn extents(&mut self, base: u64, cover: Option<u64>) -> Result<Vec<Extent>, DeltaError> {
        let count = self.varint()?;
        // Each extent takes at least two bytes: the count is bounded before allocating.
        if count > MAX_EXTENTS as u64 || count.saturating_mul(2) > (self.table.len() - self.pos) as u64 {
            return Err(malformed("a region lists too many extents"));
        }
        let mut extents = Vec::with_capacity(count as usize);
        let (mut prev, mut rest) = (base, cover.unwrap_or(0));
        for _ in 0..count {
            let offset = prev.wrapping_add(unzigzag(self.varint()?) as u64);
            let raw = self.varint()?;
            let len = if cover.is_some() { rest.wrapping_add(unzigzag(raw) as u64) } else { raw };
            prev = offset.wrapping_add(len);
            rest = rest.wrapping_sub(len);
            extents.push(Extent { offset, len });
        }
        Ok(extents)
    }
}

/// Writes an extent list: the count, then per extent its offset zigzag coded relative to the
/// end of the extent before it (the first relative to `base`: a region's own new offset, as
/// old and new images mostly keep things in place) and its length, for a region relative to
/// the bytes of `cover` (its new length) the extents before it left (a copy's last extent,
/// and a patch's single reference of about its new length, then cost a byte or two).
fn push_extents(out: &mut Vec<u8>, extents: &[Extent], base: u64, cover: Option<u64>) {
    push_varint(out, extents.len() as u64);
    let (mut prev, mut rest) = (base, cover.unwrap_or(0));
    for extent in extents {
        push_varint(out, zigzag(extent.offset.wrapping_sub(prev) as i64));
        let len = if cover.is_some() { zigzag(extent.len.wrapping_sub(rest) as i64) } else { extent.len };
        push_varint(out, len);
        prev = extent.offset.wrapping_add(extent.len);
        rest = rest.wrapping_sub(extent.len);
    }
}

/// Version 2: LEB128 records and an optional shared stream.
fn parse_v2(
    table: &[u8],
    b: &Bounds,
    has_shared: bool,
    limits: &DeltaLimits,
) -> Result<(Option<SharedStream>, Vec<Region>), DeltaError> {
    let mut cur = Cursor { table, pos: 0 };
    let mut payload_offset = b.payloads_start;
    let shared = if has_shared {
        let len = cur.varint()?;
        let payload_len = cur.varint()?;
        let extents = cur.extents(0, None)?;
        let shared = SharedStream { extents, len, payload_offset, payload_len };
        shared.check(b.old_size, b.window, limits)?;
        payload_offset = payload_offset.checked_add(payload_len).ok_or(malformed("payload lengths overflow"))?;
        Some(shared)
    } else {
        None
    };
    let mut regions = Vec::with_capacity(b.count as usize);
    let mut new_offset = 0u64;
    for _ in 0..b.count {
        let op = RegionOp::from_code(cur.byte()?).ok_or(malformed("unknown region op"))?;
        let flags = cur.byte()?;
        if flags & !REGION_SHARED != 0 {
            return Err(malformed("unknown region flags"));
        }
        let new_len = cur.varint()?;
        let extents = cur.extents(new_offset, Some(new_len))?;
        let (payload_len, slice) = if flags & REGION_SHARED != 0 {
            let offset = cur.varint()?;
            let len = cur.varint()?;
            (0, Some(SharedSlice { offset, len }))
        } else {
            (cur.varint()?, None)
        };
        let region = Region { op, new_offset, new_len, extents, payload_offset, payload_len, shared: slice };
        check_region(&region, b.old_size, b.window, shared.as_ref())?;
        regions.push(region);
        new_offset = new_offset.checked_add(new_len).ok_or(malformed("region lengths overflow"))?;
        payload_offset = payload_offset.checked_add(payload_len).ok_or(malformed("payload lengths overflow"))?;
    }
    finish(&regions, cur.pos, table, b.new_size)?;
    Ok((shared, regions))
}

pub(super) fn read_full(reader: &mut dyn Read, buf: &mut [u8], what: &'static str) -> Result<(), DeltaError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => DeltaError::Truncated { what },
        _ => DeltaError::ReadPatch(e),
    })
}

pub(super) fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 2 header with a shared stream: one sparse region whose records are all of it,
    /// then a copy. Small numbers, so every field is one byte and the table is stored raw:
    /// shared `[len, payload len, 0 extents]`, then `[op 3, flags 1, new len 50, 1 extent,
    /// offset 0, length 0, slice offset 0, slice len 100]` and `[op 0, flags 0, new len 20,
    /// 1 extent, offset, length 0, payload len 0]`.
    fn shared_header() -> PatchHeader {
        PatchHeader {
            old_size: 100,
            new_size: 70,
            window: 100,
            shared: Some(SharedStream { extents: Vec::new(), len: 100, payload_offset: 0, payload_len: 10 }),
            regions: vec![
                Region {
                    op: RegionOp::BsdiffSparse,
                    new_offset: 0,
                    new_len: 50,
                    extents: vec![Extent { offset: 0, len: 50 }],
                    payload_offset: 0,
                    payload_len: 0,
                    shared: Some(SharedSlice { offset: 0, len: 100 }),
                },
                Region {
                    op: RegionOp::Copy,
                    new_offset: 50,
                    new_len: 20,
                    extents: vec![Extent { offset: 80, len: 20 }],
                    payload_offset: 0,
                    payload_len: 0,
                    shared: None,
                },
            ],
        }
    }

    fn read(bytes: &[u8]) -> Result<PatchHeader, DeltaError> {
        PatchHeader::read(&mut &bytes[..], &DeltaLimits::default())
    }

    #[test]
    fn a_shared_header_round_trips_with_its_offsets() {
        let header = shared_header();
        let bytes = header.encode();
        assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), FLAG_SHARED_STREAM);
        assert_eq!(&bytes[HEADER_LEN..], &[100, 10, 0, 3, 1, 50, 1, 0, 0, 0, 100, 0, 0, 20, 1, 60, 0, 0]);
        let read = read(&bytes).unwrap();
        let start = bytes.len() as u64;
        assert_eq!(read.shared.as_ref().map(|s| (s.payload_offset, s.payload_len)), Some((start, 10)));
        assert_eq!(read.regions[0].payload_offset, start + 10);
        assert_eq!(read.regions, {
            let mut r = header.regions.clone();
            r[0].payload_offset = start + 10;
            r[1].payload_offset = start + 10;
            r
        });
        assert_eq!(read.payload_end(), start + 10);
    }

    #[test]
    fn a_header_cut_anywhere_is_refused_as_truncated() {
        let bytes = shared_header().encode();
        for cut in 0..bytes.len() {
            let err = read(&bytes[..cut]).unwrap_err();
            assert!(matches!(err, DeltaError::Truncated { .. }), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn tampered_tables_are_refused() {
        let good = shared_header().encode();
        let table = HEADER_LEN;
        let tampered = |at: usize, value: u8| {
            let mut bad = good.clone();
            bad[table + at] = value;
            read(&bad)
        };
        // The slice reaches past the shared stream; a region flag nobody knows; an op that
        // cannot take records from the shared stream; an extent past the old image; an
        // extent count above the limit (and above what the table holds).
        for (at, value) in [(10, 101), (4, 3), (3, 1), (7, 120), (6, 0x7f)] {
            let err = tampered(at, value).unwrap_err();
            assert!(matches!(err, DeltaError::Malformed { .. }), "byte {at} = {value}: {err}");
        }
        // A varint that never ends within 64 bits, in a longer table.
        let mut bad = good.clone();
        bad.truncate(table);
        bad[32..40].copy_from_slice(&20u64.to_le_bytes());
        bad.extend_from_slice(&[0xff; 20]);
        assert!(matches!(read(&bad), Err(DeltaError::Malformed { .. })));
        // The shared-stream flag on a version 1 patch, a flag bit nobody knows.
        for (version, flags) in [(FORMAT_VERSION_1, FLAG_SHARED_STREAM), (FORMAT_VERSION, 4)] {
            let mut bad = good.clone();
            bad[8..10].copy_from_slice(&version.to_le_bytes());
            bad[10..12].copy_from_slice(&flags.to_le_bytes());
            assert!(matches!(read(&bad), Err(DeltaError::Malformed { reason: "unknown header flags" })));
        }
        // Without the shared-stream flag the first bytes are read as a region: refused.
        let mut bad = good.clone();
        bad[10..12].copy_from_slice(&0u16.to_le_bytes());
        assert!(matches!(read(&bad), Err(DeltaError::Malformed { .. })));
        // A region count the table cannot hold is refused before anything is allocated.
        let mut bad = good.clone();
        bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read(&bad), Err(DeltaError::Malformed { .. })));
    }

    #[test]
    fn a_shared_stream_above_the_limit_or_empty_is_refused() {
        let mut header = shared_header();
        header.shared.as_mut().unwrap().len = DeltaLimits::default().max_shared + 1;
        let err = read(&header.encode()).unwrap_err();
        assert!(matches!(err, DeltaError::SharedTooLarge { .. }), "{err}");
        header.shared.as_mut().unwrap().len = 0;
        header.regions[0].shared = Some(SharedSlice { offset: 0, len: 0 });
        assert!(matches!(read(&header.encode()), Err(DeltaError::Malformed { .. })));
        // Its reference must be inside the old image and within the window.
        let mut header = shared_header();
        header.shared.as_mut().unwrap().extents = vec![Extent { offset: 0, len: 101 }];
        assert!(matches!(read(&header.encode()), Err(DeltaError::Malformed { .. })));
        // A region naming a shared stream the patch does not have.
        let mut header = shared_header();
        header.shared = None;
        assert!(matches!(read(&header.encode()), Err(DeltaError::Malformed { .. })));
    }

    #[test]
    fn version_1_tables_are_still_read() {
        let mut header = shared_header();
        header.shared = None;
        header.regions[0].shared = None;
        header.regions[0].payload_len = 7;
        let bytes = header.encode_v1();
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), FORMAT_VERSION_1);
        let read = read(&bytes).unwrap();
        assert_eq!(read.regions.len(), 2);
        assert_eq!(read.regions[0].payload_len, 7);
        assert_eq!(read.regions[1].extents, header.regions[1].extents);
        assert!(read.shared.is_none());
        assert!(bytes.len() > header.encode().len(), "version 2 tables are smaller");
    }
}
